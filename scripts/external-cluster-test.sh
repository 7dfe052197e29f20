#!/usr/bin/env bash
# The cluster-aware client suite (crates/client/tests/cluster.rs) and the
# recipes' cluster tests against an external cluster: three `dflockd`
# processes on loopback, named to the tests by DFLOCKD_TEST_CLUSTER (and
# their pids by DFLOCKD_TEST_CLUSTER_PIDS). The tests kill nodes with
# SIGKILL and start them again as they were started (Linux: /proc).
# To run the suite against another cluster (say the Go cluster branch),
# start it with orphan sessions kept (--orphan-ttl 30) and set the two
# variables yourself:
#   DFLOCKD_TEST_CLUSTER=h:p,h:p,h:p cargo test -p dflockd-client --test cluster
# Usage: scripts/external-cluster-test.sh [test filter and libtest flags]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build -q -p dflockd-server --bin dflockd
bin=$root/target/debug/dflockd
work=$(mktemp -d)
pids=()
cleanup() {
  # The tests restart killed nodes under new pids: stop whatever listens.
  pkill -f -- "--raft-dir $work/" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
base=$((30000 + RANDOM % 20000))
peers=""
for i in 1 2 3; do
  peers+="${peers:+,}$i=127.0.0.1:$((base + 10 + i))@127.0.0.1:$((base + i))"
done
for i in 1 2 3; do
  DFLOCKD_LOG=warn DFLOCKD_RAFT_AUTH_TOKEN=$secret "$bin" --host 127.0.0.1 --port $((base + i)) \
    --raft-dir "$work/n$i" --node-id "$i" --raft-addr "127.0.0.1:$((base + 10 + i))" \
    --cluster-peers "$peers" --orphan-ttl 30 >"$work/log$i" 2>&1 &
  pids+=($!)
done
nodes="127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2)),127.0.0.1:$((base + 3))"
echo "external cluster: $nodes (pids ${pids[*]})"
export DFLOCKD_TEST_CLUSTER=$nodes
DFLOCKD_TEST_CLUSTER_PIDS=$(IFS=,; echo "${pids[*]}")
export DFLOCKD_TEST_CLUSTER_PIDS
cargo test -p dflockd-client --test cluster -p dflockd-recipes --test cluster -- --test-threads=1 "$@"
