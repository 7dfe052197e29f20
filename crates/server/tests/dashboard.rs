//! The live dashboard in a real browser: headless Chromium (Debian's
//! `chromium`, driven through `chromedriver` over the WebDriver protocol)
//! loads the page, a client acquires a lock over TCP, and the page must
//! show the key and the holder's fence within 2 s, from the event stream.
//!
//! Chromium and chromedriver are installed with apt-get when missing (as
//! the interop tests install the Python client). The screenshot goes to
//! `target/tmp/dashboard.png`; with `DFLOCKD_UPDATE_SCREENSHOT=1` also to
//! `docs/dashboard.png` (the README's picture).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use dflockd_server::{HttpConfig, Server, ServerConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Installs Debian's chromium and chromium-driver if either is missing.
fn ensure_browser() {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return;
    }
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let packages = ["install", "-y", "-q", "chromium", "chromium-driver"];
    if !apt(&packages) {
        assert!(apt(&["update", "-q"]), "apt-get update failed");
        assert!(
            apt(&packages),
            "apt-get install chromium chromium-driver failed (run the tests as root, or install them)"
        );
    }
}

/// A chromedriver process, killed on drop.
struct Driver {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = driver
                .http
                .get(format!("{}/status", driver.base))
                .send()
                .await
                .ok();
            if let Some(response) = ready {
                let status: Value = response.json().await.unwrap_or_default();
                if status["value"]["ready"] == true {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        driver
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("webdriver call");
        let value: Value = response.json().await.expect("webdriver JSON");
        assert!(
            value["value"].get("error").is_none(),
            "webdriver {path}: {value}"
        );
        value["value"].clone()
    }
}

struct Browser<'a> {
    driver: &'a Driver,
    session: String,
}

impl Browser<'_> {
    async fn open<'d>(driver: &'d Driver, profile: &Path) -> Browser<'d> {
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--window-size=1280,900",
            &format!("--user-data-dir={}", profile.display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let session = driver
            .call(reqwest::Method::POST, "/session", Some(capabilities))
            .await;
        Browser {
            driver,
            session: session["sessionId"]
                .as_str()
                .expect("session id")
                .to_owned(),
        }
    }

    async fn goto(&self, url: &str) {
        self.driver
            .call(
                reqwest::Method::POST,
                &format!("/session/{}/url", self.session),
                Some(json!({"url": url})),
            )
            .await;
    }

    async fn eval(&self, script: &str) -> Value {
        self.driver
            .call(
                reqwest::Method::POST,
                &format!("/session/{}/execute/sync", self.session),
                Some(json!({"script": script, "args": []})),
            )
            .await
    }

    async fn text(&self) -> String {
        self.eval("return document.body.innerText")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn screenshot(&self) -> Vec<u8> {
        let data = self
            .driver
            .call(
                reqwest::Method::GET,
                &format!("/session/{}/screenshot", self.session),
                None,
            )
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(data.as_str().expect("base64 PNG"))
            .expect("decodes")
    }

    async fn close(self) {
        self.driver
            .call(
                reqwest::Method::DELETE,
                &format!("/session/{}", self.session),
                None,
            )
            .await;
    }
}

async fn tcp_line(stream: &mut BufReader<tokio::net::TcpStream>, frame: &str) -> String {
    stream.write_all(frame.as_bytes()).await.unwrap();
    let mut line = String::new();
    stream.read_line(&mut line).await.unwrap();
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_tcp_holder_and_its_fence_within_two_seconds() {
    ensure_browser();
    let server = Server::start(ServerConfig {
        http: Some(HttpConfig::default()),
        ..ServerConfig::ephemeral()
    })
    .await
    .unwrap();
    let url = format!("http://{}/", server.http_addr().unwrap());
    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = Browser::open(&driver, profile.path()).await;
    browser.goto(&url).await;
    // The page is up and its event stream open.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state = browser
            .eval("return document.getElementById('state').textContent")
            .await;
        if state == "live" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the page never went live: {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        browser.text().await.contains("no lock held"),
        "{}",
        browser.text().await
    );

    // A TCP client takes the lock; a second one queues behind it.
    let mut holder = BufReader::new(
        tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap(),
    );
    let acquired = Instant::now();
    let granted = tcp_line(&mut holder, "l\nnightly-report\n0 60\n").await;
    let token = granted.split(' ').nth(1).expect("granted").to_owned();
    let fence = u64::from_str_radix(&token[..16], 16).unwrap();
    let shown = loop {
        let text = browser.text().await;
        if text.contains("nightly-report") && text.contains(&fence.to_string()) {
            break acquired.elapsed();
        }
        assert!(
            acquired.elapsed() < Duration::from_secs(10),
            "the page never showed the holder:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    println!("the dashboard showed nightly-report with fence {fence} {shown:?} after the grant");
    assert!(
        shown <= Duration::from_secs(2),
        "shown after {shown:?}, over 2 s"
    );

    // More to look at in the screenshot: a waiter, a semaphore.
    let mut waiter = BufReader::new(
        tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap(),
    );
    waiter.write_all(b"l\nnightly-report\n30\n").await.unwrap();
    let mut pool = BufReader::new(
        tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap(),
    );
    for _ in 0..2 {
        assert!(
            tcp_line(&mut pool, "sl\ndb-pool\n0 4 60\n")
                .await
                .starts_with("ok ")
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = browser.text().await;
        if text.contains("db-pool") && text.contains("2 / 4") && text.contains("conn ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no waiter or semaphore shown:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&out, &png).unwrap();
    println!("screenshot: {} ({} bytes)", out.display(), png.len());
    if std::env::var_os("DFLOCKD_UPDATE_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/dashboard.png");
        std::fs::write(docs, &png).unwrap();
    }
    browser.close().await;
    // Idle TCP clients would hold the drain up to their read timeout.
    drop((holder, waiter, pool));
    server.shutdown().await;
}
