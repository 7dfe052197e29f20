//! Runs the client's integration suites a second time in plain mode
//! (`DFLOCKD_TEST_MUX=0`: the client never asks for the multiplexed
//! extension, so blocking waits and tickets use connections of their own),
//! so one `cargo test` covers both modes. The default run of each suite is
//! the mux mode.
//!
//! Cargo builds every test binary of the package before running any, so the
//! suites' executables sit next to this one; the newest build of each is
//! run. Set `DFLOCKD_TEST_SKIP_PLAIN=1` to skip (e.g. while iterating on one
//! suite); the skip is printed, never silent.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The suites that talk to a server through `Client` (hostile.rs uses fake
/// plain servers and runs the same either way).
const SUITES: &[&str] = &[
    "smoke",
    "locks",
    "leases",
    "cancellation",
    "blocking",
    "connection",
    "security",
];

/// The newest executable `deps/<suite>-<hash>`.
fn suite_binary(deps: &Path, suite: &str) -> Option<PathBuf> {
    let prefix = format!("{suite}-");
    std::fs::read_dir(deps)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix(&prefix)
                .is_some_and(|hash| hash.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            let modified = meta.modified().ok()?;
            is_executable(&meta).then(|| (modified, entry.path()))
        })
        .max()
        .map(|(_, path)| path)
}

#[cfg(unix)]
fn is_executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.is_file() && meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(meta: &std::fs::Metadata) -> bool {
    meta.is_file()
}

#[test]
fn client_suites_pass_in_plain_mode() {
    if std::env::var("DFLOCKD_TEST_SKIP_PLAIN").is_ok_and(|v| v == "1") {
        println!("plain-mode rerun SKIPPED (DFLOCKD_TEST_SKIP_PLAIN=1)");
        return;
    }
    let me = std::env::current_exe().expect("own path");
    let deps = me.parent().expect("deps directory");
    let mut failed = Vec::new();
    for suite in SUITES {
        let binary = suite_binary(deps, suite)
            .unwrap_or_else(|| panic!("no test binary for suite {suite} in {}", deps.display()));
        let output = Command::new(&binary)
            .env("DFLOCKD_TEST_MUX", "0")
            .arg("--test-threads=4")
            .output()
            .expect("run suite");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let summary = stdout
            .lines()
            .filter(|l| l.starts_with("test result:"))
            .collect::<Vec<_>>()
            .join("; ");
        println!("plain mode, {suite}: {summary}");
        if !output.status.success() {
            eprintln!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
            failed.push(*suite);
        }
    }
    assert!(failed.is_empty(), "suites failed in plain mode: {failed:?}");
}
