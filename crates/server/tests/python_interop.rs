//! The real, unchanged Python client `dflockd-client==2.1.1` from PyPI drives
//! our `dflockd` binary: plain, auth, TLS and TLS + auth.
//!
//! The test creates (once) a virtual environment under Cargo's target tmp dir
//! and installs the client there with pip, so `cargo test` needs nothing but
//! `python3` with `venv` and access to PyPI. Set `DFLOCKD_INTEROP_PYTHON` to
//! use another interpreter for the venv.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dflockd_testkit::pki;
use dflockd_testkit::python::interop_python;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/interop/python_client_check.py"
);

/// A `dflockd` child process, killed on drop.
struct ServerProcess {
    child: Child,
    port: u16,
}

impl ServerProcess {
    fn start(args: &[&str]) -> ServerProcess {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_dflockd"))
            .args(["--port", &port.to_string()])
            .args(args)
            .env("DFLOCKD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start dflockd");
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "dflockd did not start listening on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ServerProcess { child, port }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

struct TestPki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn test_pki() -> TestPki {
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = pki::generate("dflockd interop test CA");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write pem");
        path
    };
    TestPki {
        ca: write("ca.pem", &pem.ca_pem),
        cert: write("cert.pem", &pem.cert_pem),
        key: write("key.pem", &pem.key_pem),
        _dir: dir,
    }
}

/// Runs the check script; returns its summary line and whether it passed.
fn run_script(python: &Path, args: &[String]) -> (bool, String) {
    let mut child = Command::new(python)
        .arg(SCRIPT)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run python");
    let mut summary = String::new();
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.expect("read script output");
        println!("{line}");
        if line.starts_with("python-interop:") {
            summary = line;
        }
    }
    let ok = child.wait().map(|s| s.success()).unwrap_or(false);
    (ok, summary)
}

#[test]
fn real_python_client_2_1_1_works_against_our_server() {
    let python = interop_python(env!("CARGO_TARGET_TMPDIR"));
    let pki = test_pki();
    let (cert, key, ca) = (
        pki.cert.to_str().unwrap(),
        pki.key.to_str().unwrap(),
        pki.ca.to_str().unwrap(),
    );

    let plain = ServerProcess::start(&[]);
    let auth = ServerProcess::start(&["--auth-token", "interop-s3cret"]);
    let tls = ServerProcess::start(&["--tls-cert", cert, "--tls-key", key]);
    let tls_auth = ServerProcess::start(&[
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--auth-token",
        "tls-s3cret",
    ]);

    let first: Vec<String> = [
        "--port",
        &plain.port.to_string(),
        "--auth-port",
        &auth.port.to_string(),
        "--auth-token",
        "interop-s3cret",
        "--tls-port",
        &tls.port.to_string(),
        "--tls-ca",
        ca,
    ]
    .iter()
    .map(std::string::ToString::to_string)
    .collect();
    let (ok, summary) = run_script(&python, &first);
    assert!(ok, "plain/auth/TLS interop failed: {summary}");

    let second: Vec<String> = [
        "--port",
        &plain.port.to_string(),
        "--tls-port",
        &tls_auth.port.to_string(),
        "--tls-ca",
        ca,
        "--tls-auth-token",
        "tls-s3cret",
        "-k",
        "tls",
    ]
    .iter()
    .map(std::string::ToString::to_string)
    .collect();
    let (ok, summary) = run_script(&python, &second);
    assert!(ok, "TLS + auth interop failed: {summary}");
}
