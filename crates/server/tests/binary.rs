//! The real `dflockd` binary: start-up on a chosen port, flag-over-env
//! precedence, SIGTERM drain (spec §3.10, §6.1), configuration errors and
//! `--version`. Std only; every wait is bounded.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dflockd");
const STEP: Duration = Duration::from_millis(20);
const START_TIMEOUT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A port that was free a moment ago (bind 127.0.0.1:0, then drop).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The binary with every `DFLOCKD_*` variable of the test environment
/// removed, so only what a test sets applies.
fn dflockd() -> Command {
    let mut cmd = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DFLOCKD_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A `dflockd` child process, killed on drop if still running.
struct Proc(Child);

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        Proc(
            cmd.env("DFLOCKD_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start dflockd"),
        )
    }

    /// [`spawn`](Self::spawn) at the binary's own log settings (no
    /// `DFLOCKD_LOG` override).
    fn spawn_logging(cmd: &mut Command) -> Proc {
        Proc(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start dflockd"),
        )
    }

    /// Waits (bounded) for the process to exit.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "dflockd still running after {limit:?}"
            );
            std::thread::sleep(STEP);
        }
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut err) = self.0.stderr.take() {
            let _ = err.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A raw protocol connection with bounded reads.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn connect(port: u16) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr(port), Duration::from_millis(500))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            reader: BufReader::new(stream),
        })
    }

    /// Polls until the server on `port` accepts a connection (bounded).
    fn connect_when_up(port: u16, proc: &mut Proc) -> Conn {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(conn) = Conn::connect(port) {
                return conn;
            }
            if let Some(status) = proc.0.try_wait().expect("try_wait") {
                panic!("dflockd exited early ({status}): {}", proc.stderr());
            }
            assert!(Instant::now() < deadline, "dflockd not listening on {port}");
            std::thread::sleep(STEP);
        }
    }

    fn req(&mut self, bytes: &[u8]) -> String {
        self.reader.get_mut().write_all(bytes).expect("write");
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read reply");
        assert!(n > 0 && line.ends_with('\n'), "no reply line: {line:?}");
        line.pop();
        line
    }

    /// The server closes: EOF (or reset) with no further bytes.
    fn assert_closed(&mut self) {
        let mut buf = [0u8; 64];
        match self.reader.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!(
                "expected close, got {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => panic!("expected close, got {e}"),
        }
    }
}

/// Polls until connecting to `port` is refused (bounded).
fn wait_refused(port: u16) {
    let deadline = Instant::now() + IO_TIMEOUT;
    while TcpStream::connect_timeout(&addr(port), Duration::from_millis(500)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "port {port} still accepts connections"
        );
        std::thread::sleep(STEP);
    }
}

fn sigterm(proc: &Proc) {
    let status = Command::new("kill")
        .args(["-TERM", &proc.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM failed");
}

/// Runs the binary to completion (bounded) and returns its status and
/// output.
fn run_bounded(args: &[&str]) -> (ExitStatus, String, String) {
    let mut child = dflockd()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dflockd");
    let deadline = Instant::now() + IO_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("dflockd {args:?} did not exit within {IO_TIMEOUT:?}");
        }
        std::thread::sleep(STEP);
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, out, err)
}

#[test]
fn port_flag_beats_env_and_sigterm_drains() {
    let port = free_port();
    let env_port = free_port();
    let mut proc = Proc::spawn(
        dflockd()
            .args(["--port", &port.to_string()])
            .env("DFLOCKD_PORT", env_port.to_string()),
    );
    let mut idle = Conn::connect_when_up(port, &mut proc);
    assert_eq!(idle.req(b"ping\n_\n_\n"), "ok");
    // DFLOCKD_PORT is ignored when --port is given.
    assert!(
        TcpStream::connect_timeout(&addr(env_port), Duration::from_millis(500)).is_err(),
        "dflockd also listens on the DFLOCKD_PORT port"
    );

    sigterm(&proc);
    // The drain has begun once the listener is closed.
    wait_refused(port);
    assert_eq!(idle.req(b"ping\n_\n_\n"), "error_draining");
    idle.assert_closed();
    let status = proc.wait_exit(IO_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status; stderr: {}",
        proc.stderr()
    );
}

#[test]
fn env_port_used_without_flag() {
    let port = free_port();
    let mut proc = Proc::spawn(dflockd().env("DFLOCKD_PORT", port.to_string()));
    let mut conn = Conn::connect_when_up(port, &mut proc);
    assert_eq!(conn.req(b"ping\n_\n_\n"), "ok");
    drop(conn);
    sigterm(&proc);
    let status = proc.wait_exit(IO_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status; stderr: {}",
        proc.stderr()
    );
}

#[test]
fn a_config_file_sets_the_port_and_help_names_every_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("dflockd.toml");
    let port = free_port();
    std::fs::write(&path, format!("port = {port}\nmax-locks = 8\n")).expect("write config");
    let mut proc = Proc::spawn(dflockd().arg("--config").arg(&path));
    let mut conn = Conn::connect_when_up(port, &mut proc);
    assert_eq!(conn.req(b"ping\n_\n_\n"), "ok");
    drop(conn);
    sigterm(&proc);
    let status = proc.wait_exit(IO_TIMEOUT);
    assert_eq!(status.code(), Some(0), "stderr: {}", proc.stderr());

    let (status, help, stderr) = run_bounded(&["--help"]);
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    for expected in [
        "--config",
        "DFLOCKD_CONFIG",
        "DFLOCKD_READ_TIMEOUT_S",
        "[default: 6388]",
    ] {
        assert!(
            help.contains(expected),
            "{expected} missing from --help:\n{help}"
        );
    }
}

#[test]
fn read_timeout_zero_is_a_configuration_error() {
    let (status, _, stderr) = run_bounded(&["--read-timeout", "0"]);
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("configuration error: --read-timeout must be > 0"),
        "stderr: {stderr:?}"
    );
}

#[test]
fn version_exits_zero() {
    let (status, stdout, stderr) = run_bounded(&["--version"]);
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert!(!stdout.trim().is_empty(), "--version printed nothing");
}

/// Starts the binary with `args` (logs piped), makes a connection fail
/// authentication, stops it with SIGTERM and returns what it logged.
fn logs_of_a_failed_auth(args: &[&str]) -> String {
    let port = free_port();
    let mut proc = Proc::spawn_logging(
        dflockd()
            .args([
                "--port",
                &port.to_string(),
                "--auth-token",
                "the-real-token",
            ])
            .args(args),
    );
    let mut conn = Conn::connect_when_up(port, &mut proc);
    assert_eq!(conn.req(b"auth\n_\nnot-the-token\n"), "error_auth");
    conn.assert_closed();
    sigterm(&proc);
    let status = proc.wait_exit(IO_TIMEOUT);
    let stderr = proc.stderr();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    stderr
}

#[test]
fn piped_logs_have_no_colour_codes_and_name_a_failed_peer() {
    let stderr = logs_of_a_failed_auth(&[]);
    assert!(!stderr.contains('\u{1b}'), "escape codes in {stderr:?}");
    let failure = stderr
        .lines()
        .find(|l| l.contains("authentication failed"))
        .unwrap_or_else(|| panic!("no auth failure logged: {stderr}"));
    assert!(failure.contains("WARN"), "{failure}");
    assert!(failure.contains("peer=127.0.0.1:"), "{failure}");
    assert!(!stderr.contains("not-the-token") && !stderr.contains("the-real-token"));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let stderr = logs_of_a_failed_auth(&["--log-format", "json"]);
    let mut messages = Vec::new();
    for line in stderr.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(value.is_object(), "{line}");
        messages.push(
            value["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
    }
    assert!(
        messages.iter().any(|m| m == "dflockd listening"),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "authentication failed"),
        "{messages:?}"
    );
}

#[test]
fn log_level_selects_what_is_written() {
    let stderr = logs_of_a_failed_auth(&["--log-level", "warn"]);
    assert!(!stderr.contains("dflockd listening"), "{stderr}");
    assert!(stderr.contains("authentication failed"), "{stderr}");
    let (status, _, stderr) = run_bounded(&["--log-level", "loud"]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("--log-level must be one of error, warn, info, debug, trace"),
        "{stderr}"
    );
    let (status, _, stderr) = run_bounded(&["--log-format", "xml"]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("--log-format must be text or json"),
        "{stderr}"
    );
}
