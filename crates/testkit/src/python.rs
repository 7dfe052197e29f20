//! The Python virtual environment with the real `dflockd-client==2.1.1`
//! from PyPI, shared by the interop tests (the server's python_interop.rs
//! and the workspace's tests/mux_client.rs). Created once under the
//! directory the test passes (its `CARGO_TARGET_TMPDIR`); set
//! `DFLOCKD_INTEROP_PYTHON` to use another interpreter for the venv.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The client release the interop tests use.
pub const CLIENT: &str = "dflockd-client==2.1.1";

fn run(cmd: &mut Command) -> bool {
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

/// Returns a Python interpreter that can import the real client, creating
/// the venv under `tmp` on first use (pass `env!("CARGO_TARGET_TMPDIR")`).
pub fn interop_python(tmp: &str) -> PathBuf {
    let venv = Path::new(tmp).join("pyvenv-dflockd-client-2.1.1");
    let python = venv.join("bin").join("python");
    let ready = || {
        run(Command::new(&python)
            .args([
                "-c",
                "import dflockd_client, sys; sys.exit(dflockd_client.__version__ != '2.1.1')",
            ])
            .stderr(Stdio::null()))
    };
    if ready() {
        return python;
    }
    let base = std::env::var("DFLOCKD_INTEROP_PYTHON").unwrap_or_else(|_| "python3".into());
    assert!(
        run(Command::new(&base)
            .args(["-m", "venv", "--clear"])
            .arg(&venv)),
        "{base} -m venv failed"
    );
    // The package declares Python >= 3.12 but runs on 3.11 (asyncio.timeout exists there).
    let old = run(
        Command::new(&python).args(["-c", "import sys; sys.exit(sys.version_info >= (3, 12))"])
    );
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        CLIENT,
    ]);
    if old {
        pip.arg("--ignore-requires-python");
    }
    assert!(run(&mut pip), "pip install {CLIENT} failed");
    assert!(ready(), "{CLIENT} is not importable after install");
    python
}
