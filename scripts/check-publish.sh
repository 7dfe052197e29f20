#!/usr/bin/env bash
# Packages every publishable crate as `cargo publish` would and checks the
# manifests (metadata, files, dependency versions), without uploading and
# without building the packages (the test command builds the same code).
# Needs the crates.io index. Usage: scripts/check-publish.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(cargo publish --workspace --dry-run --no-verify --allow-dirty 2>&1) || { echo "$out"; exit 1; }
warnings=$(echo "$out" | grep -i '^warning' | grep -v 'aborting upload due to dry run' || true)
echo "$out" | grep -E '^ *(Packaged|Uploading)' || true
if [ -n "$warnings" ]; then
  echo "$warnings"
  echo "check-publish: manifest warnings" >&2
  exit 1
fi
echo "check-publish: every publishable crate packages cleanly"
