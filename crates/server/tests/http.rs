//! The HTTP API (spec §9, docs/OPERATIONS.md): every route and error code,
//! sessions and their reaping, auth, caps, rate limiting, CORS, drain,
//! metrics, events, the OpenAPI document, TCP/HTTP FIFO and bad input.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dflockd_server::{HttpConfig, Secret, Server, ServerConfig, ServerHandle};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const SESSION: &str = "X-Dflockd-Session";

async fn start_with(http: HttpConfig, tweak: impl FnOnce(&mut ServerConfig)) -> ServerHandle {
    let mut config = ServerConfig {
        http: Some(http),
        ..ServerConfig::ephemeral()
    };
    tweak(&mut config);
    Server::start(config).await.expect("server starts")
}

async fn start() -> (ServerHandle, Api) {
    let server = start_with(HttpConfig::default(), |_| {}).await;
    let api = Api::new(server.http_addr().expect("http on"));
    (server, api)
}

/// A small client of the API.
struct Api {
    base: String,
    http: Client,
    token: Option<String>,
}

impl Api {
    fn new(addr: SocketAddr) -> Api {
        Api {
            base: format!("http://{addr}"),
            http: Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            token: None,
        }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        session: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut builder = self.request(method, path);
        if let Some(session) = session {
            builder = builder.header(SESSION, session);
        }
        if let Some(body) = body {
            builder = builder.json(&body);
        }
        let response = builder.send().await.expect("request sent");
        let status = response.status();
        let text = response.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    async fn post(&self, path: &str, session: &str, body: Value) -> (StatusCode, Value) {
        self.send(Method::POST, path, Some(session), Some(body))
            .await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(Method::GET, path, None, None).await
    }

    /// The `/metrics` text.
    async fn metrics(&self) -> String {
        let response = self
            .request(Method::GET, "/metrics")
            .send()
            .await
            .expect("scrape");
        response.text().await.expect("metrics text")
    }

    async fn session(&self) -> String {
        let (status, body) = self.send(Method::POST, "/v1/sessions", None, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["idle_timeout_s"], 20);
        body["session_id"].as_str().expect("id").to_owned()
    }

    /// The holders and waiters of lock `key` (from `/v1/stats`).
    async fn lock_state(&self, key: &str) -> Option<Value> {
        let (_, stats) = self.get("/v1/stats").await;
        stats["locks"]
            .as_array()
            .and_then(|locks| locks.iter().find(|l| l["key"] == key).cloned())
    }
}

fn error_code(body: &Value) -> &str {
    body["error"].as_str().unwrap_or("<no error code>")
}

/// Waits (bounded) until `check` holds.
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn locks_round_trip_with_every_lock_status() {
    // No sweep: a lease that ran out stays until a request notices.
    let server = start_with(HttpConfig::default(), |c| {
        c.lease_sweep_interval = Duration::from_secs(3600);
    })
    .await;
    let api = Api::new(server.http_addr().unwrap());
    let a = api.session().await;
    let b = api.session().await;

    let (status, granted) = api
        .post(
            "/v1/locks/job",
            &a,
            json!({"acquire_timeout_s": 0, "lease_ttl_s": 30}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{granted}");
    assert_eq!(granted["status"], "ok");
    assert_eq!(granted["lease_ttl_s"], 30);
    let token = granted["token"].as_str().expect("token").to_owned();
    let fence = granted["fence"].as_u64().expect("fence");
    assert_eq!(u64::from_str_radix(&token[..16], 16).unwrap(), fence);

    // Another session times out on it; the holder renews it.
    let (status, other) = api
        .post("/v1/locks/job", &b, json!({"acquire_timeout_s": 0}))
        .await;
    assert_eq!(
        (status, other["status"].as_str()),
        (StatusCode::OK, Some("timeout"))
    );
    assert!(other.get("token").is_none());
    let (status, renewed) = api
        .post(
            "/v1/locks/job/renew",
            &a,
            json!({"token": token, "lease_ttl_s": 60}),
        )
        .await;
    assert_eq!(
        (status, renewed["remaining_s"].as_u64()),
        (StatusCode::OK, Some(60))
    );
    let held = api.lock_state("job").await.expect("held");
    assert_eq!(held["fence"].as_u64(), Some(fence));

    // Release, then the same release again: not held.
    let (status, _) = api
        .post("/v1/locks/job/release", &a, json!({"token": token}))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = api
        .post("/v1/locks/job/release", &a, json!({"token": token}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::NOT_FOUND, "not_held")
    );
    let (status, body) = api
        .post("/v1/locks/job/renew", &a, json!({"token": token}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::NOT_FOUND, "not_held")
    );

    // Two-phase: enqueue (acquired at once), a second enqueue conflicts;
    // b enqueues behind and waits; a's release hands it over.
    let (status, first) = api.post("/v1/locks/two/enqueue", &a, json!({})).await;
    assert_eq!(
        (status, first["status"].as_str()),
        (StatusCode::OK, Some("acquired")),
        "{first}"
    );
    let (status, body) = api.post("/v1/locks/two/enqueue", &a, json!({})).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "already_enqueued")
    );
    let (status, queued) = api
        .send(Method::POST, "/v1/locks/two/enqueue", Some(&b), None)
        .await;
    assert_eq!(
        (status, queued["status"].as_str()),
        (StatusCode::OK, Some("queued")),
        "{queued}"
    );
    let first_token = first["token"].as_str().unwrap().to_owned();
    let (status, _) = api
        .post("/v1/locks/two/release", &a, json!({"token": first_token}))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, waited) = api
        .post("/v1/locks/two/wait", &b, json!({"timeout_s": 5}))
        .await;
    assert_eq!(
        (status, waited["status"].as_str()),
        (StatusCode::OK, Some("ok")),
        "{waited}"
    );
    assert!(waited["fence"].as_u64() > first["fence"].as_u64());
    let (status, body) = api
        .post("/v1/locks/other/wait", &b, json!({"timeout_s": 1}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "not_enqueued")
    );

    // A lease that ran out before its wait collected it: lease_expired.
    let (_, held) = api.post("/v1/locks/short/enqueue", &a, json!({})).await;
    let (_, queued) = api
        .post("/v1/locks/short/enqueue", &b, json!({"lease_ttl_s": 1}))
        .await;
    assert_eq!(queued["status"], "queued");
    let held_token = held["token"].as_str().unwrap().to_owned();
    api.post("/v1/locks/short/release", &a, json!({"token": held_token}))
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, body) = api
        .post("/v1/locks/short/wait", &b, json!({"timeout_s": 1}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "lease_expired"),
        "{body}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn semaphores_round_trip_with_limit_mismatch() {
    let (server, api) = start().await;
    let a = api.session().await;
    let b = api.session().await;
    let c = api.session().await;
    let acquire = |limit| json!({"acquire_timeout_s": 0, "limit": limit});
    let (status, one) = api.post("/v1/semaphores/pool", &a, acquire(2)).await;
    assert_eq!(
        (status, one["status"].as_str()),
        (StatusCode::OK, Some("ok")),
        "{one}"
    );
    let (_, two) = api.post("/v1/semaphores/pool", &b, acquire(2)).await;
    assert_eq!(two["status"], "ok");
    let (_, three) = api.post("/v1/semaphores/pool", &c, acquire(2)).await;
    assert_eq!(three["status"], "timeout");
    let (status, body) = api.post("/v1/semaphores/pool", &c, acquire(3)).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "limit_mismatch")
    );
    let (status, body) = api
        .post("/v1/semaphores/pool/enqueue", &c, json!({"limit": 3}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "limit_mismatch")
    );
    let (status, renewed) = api
        .post(
            "/v1/semaphores/pool/renew",
            &a,
            json!({"token": one["token"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{renewed}");
    let (status, queued) = api
        .post("/v1/semaphores/pool/enqueue", &c, json!({"limit": 2}))
        .await;
    assert_eq!(
        (status, queued["status"].as_str()),
        (StatusCode::OK, Some("queued"))
    );
    let (status, _) = api
        .post(
            "/v1/semaphores/pool/release",
            &a,
            json!({"token": one["token"]}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, waited) = api
        .post("/v1/semaphores/pool/wait", &c, json!({"timeout_s": 5}))
        .await;
    assert_eq!(
        (status, waited["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, body) = api
        .post(
            "/v1/semaphores/pool/release",
            &a,
            json!({"token": one["token"]}),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::NOT_FOUND, "not_held")
    );
    let (_, stats) = api.get("/v1/stats").await;
    let pool = &stats["semaphores"][0];
    assert_eq!(
        (pool["holders"].as_u64(), pool["limit"].as_u64()),
        (Some(2), Some(2))
    );
    server.shutdown().await;
}

#[tokio::test]
async fn sessions_close_synchronously_and_unknown_ones_are_gone() {
    let (server, api) = start().await;
    let a = api.session().await;
    let b = api.session().await;
    api.post("/v1/locks/k", &a, json!({"acquire_timeout_s": 0}))
        .await;
    // b waits; closing a hands the lock to b at once (a's hold is
    // released before the 204).
    let waiting = {
        let api = Api::new(server.http_addr().unwrap());
        let b = b.clone();
        tokio::spawn(async move {
            api.post("/v1/locks/k", &b, json!({"acquire_timeout_s": 10}))
                .await
        })
    };
    until("b queued", || async {
        api.lock_state("k").await.is_some_and(|l| l["waiters"] == 1)
    })
    .await;
    let (status, _) = api
        .send(Method::DELETE, &format!("/v1/sessions/{a}"), None, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, granted) = waiting.await.unwrap();
    assert_eq!(
        (status, granted["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );

    // The closed session, a foreign id, a missing header.
    let (status, body) = api
        .post("/v1/locks/x", &a, json!({"acquire_timeout_s": 0}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::GONE, "session_gone")
    );
    let (status, body) = api
        .send(Method::DELETE, &format!("/v1/sessions/{a}"), None, None)
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::GONE, "session_gone")
    );
    let (status, body) = api
        .send(Method::POST, &format!("/v1/sessions/{a}/ping"), None, None)
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::GONE, "session_gone")
    );
    let (status, body) = api
        .post(
            "/v1/locks/x",
            "0123456789abcdef0123456789abcdef",
            json!({"acquire_timeout_s": 0}),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::GONE, "session_gone")
    );
    let (status, body) = api
        .send(
            Method::POST,
            "/v1/locks/x",
            None,
            Some(json!({"acquire_timeout_s": 0})),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    let (status, _) = api
        .send(Method::POST, &format!("/v1/sessions/{b}/ping"), None, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    server.shutdown().await;
}

#[tokio::test]
async fn idle_sessions_are_reaped_but_never_while_a_request_is_in_flight() {
    let http = HttpConfig {
        session_idle_timeout: Duration::from_millis(500),
        ..HttpConfig::default()
    };
    let server = start_with(http, |_| {}).await;
    let api = Api::new(server.http_addr().unwrap());
    let (_, created) = api.send(Method::POST, "/v1/sessions", None, None).await;
    let holder = created["session_id"].as_str().unwrap().to_owned();
    let (_, created) = api.send(Method::POST, "/v1/sessions", None, None).await;
    let waiter = created["session_id"].as_str().unwrap().to_owned();
    api.post(
        "/v1/locks/k",
        &holder,
        json!({"acquire_timeout_s": 0, "lease_ttl_s": 60}),
    )
    .await;
    // The holder pings to stay; the waiter waits 3 s (six idle timeouts)
    // with its request in flight: not reaped meanwhile.
    let pinger = {
        let api = Api::new(server.http_addr().unwrap());
        let holder = holder.clone();
        tokio::spawn(async move {
            loop {
                let (status, _) = api
                    .send(
                        Method::POST,
                        &format!("/v1/sessions/{holder}/ping"),
                        None,
                        None,
                    )
                    .await;
                assert_eq!(status, StatusCode::NO_CONTENT);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let started = Instant::now();
    let (status, answer) = api
        .post("/v1/locks/k", &waiter, json!({"acquire_timeout_s": 3}))
        .await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (StatusCode::OK, Some("timeout"))
    );
    assert!(started.elapsed() >= Duration::from_secs(3));
    pinger.abort();
    // The holder stops pinging: reaped, and its lock released.
    until("the holder reaped", || async {
        api.lock_state("k").await.is_none()
    })
    .await;
    let (status, body) = api
        .send(
            Method::POST,
            &format!("/v1/sessions/{holder}/ping"),
            None,
            None,
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::GONE, "session_gone")
    );
    // And the waiter, idle from now on, goes the same way.
    until("the waiter reaped", || async {
        api.get("/v1/overview").await.1["http_sessions"] == 0
    })
    .await;
    let (status, _) = api
        .send(
            Method::POST,
            &format!("/v1/sessions/{waiter}/ping"),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::GONE);
    let metrics = api.metrics().await;
    assert!(
        metrics.contains("dflockd_http_sessions_reaped_total 2"),
        "{metrics}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_its_status_and_leaks_nothing() {
    let (server, api) = start().await;
    let s = api.session().await;
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        (
            "/v1/locks/k",
            json!({"acquire_timeout_s": 0, "surprise": 1}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/locks/k",
            json!({"acquire_timeout_s": -1}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/locks/k",
            json!({"acquire_timeout_s": "soon"}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/locks/k",
            json!({}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/locks/k",
            json!({"acquire_timeout_s": 9_223_372_037u64}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/locks/k",
            json!({"acquire_timeout_s": 0, "lease_ttl_s": 9_223_372_037u64}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/semaphores/k",
            json!({"acquire_timeout_s": 0}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/semaphores/k",
            json!({"acquire_timeout_s": 0, "limit": 0}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/locks/k/release",
            json!({}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/locks/k/release",
            json!({"token": "has space"}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/locks/k/release",
            json!({"token": "x".repeat(257)}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/locks/k/release",
            json!({"token": "not-a-token"}),
            StatusCode::NOT_FOUND,
            "not_held",
        ),
        (
            "/v1/locks/k/renew",
            json!({"token": ""}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/locks/k/wait",
            json!({}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "/v1/locks/a%20b",
            json!({"acquire_timeout_s": 0}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        ("/v1/nope", json!({}), StatusCode::NOT_FOUND, "not_found"),
    ];
    for (path, body, want, code) in cases {
        let (status, answer) = api.post(path, &s, body.clone()).await;
        assert_eq!(
            (status, error_code(&answer)),
            (want, code),
            "{path} {body}: {answer}"
        );
    }
    let long_key = format!("/v1/locks/{}", "k".repeat(257));
    let (status, answer) = api
        .post(&long_key, &s, json!({"acquire_timeout_s": 0}))
        .await;
    assert_eq!(
        (status, error_code(&answer)),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    // Not JSON, trailing data, an oversized body, a wrong method.
    for raw in ["{", "{} {}", "acquire"] {
        let response = api
            .request(Method::POST, "/v1/locks/k")
            .header(SESSION, &s)
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{raw}");
    }
    let huge = format!(
        "{{\"acquire_timeout_s\": 0, \"pad\": \"{}\"}}",
        "x".repeat(100_000)
    );
    let response = api
        .request(Method::POST, "/v1/locks/k")
        .header(SESSION, &s)
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "body_too_large");
    let (status, body) = api.send(Method::GET, "/v1/locks/k", Some(&s), None).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    let (status, body) = api.send(Method::PUT, "/v1/sessions", None, None).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    let (status, body) = api
        .send(
            Method::POST,
            "/v1/sessions",
            None,
            Some(json!({"stable_ref": "\u{1}"})),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    // A query or path axum itself refuses still gets the JSON body.
    for path in ["/v1/events?bogus=1", "/v1/locks/%FF"] {
        let method = if path.starts_with("/v1/events") {
            Method::GET
        } else {
            Method::POST
        };
        let (status, body) = api
            .send(
                method,
                path,
                Some(&s),
                Some(json!({"acquire_timeout_s": 0})),
            )
            .await;
        assert_eq!(
            (status, error_code(&body)),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{path}: {body}"
        );
    }
    // Any token is an HTTP method: the latency metric keeps a fixed set.
    let brew = Method::from_bytes(b"BREW").unwrap();
    let (status, _) = api.send(brew, "/health", None, None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let metrics = api.metrics().await;
    assert!(
        metrics.contains(r#"method="other",route="/health""#),
        "{metrics}"
    );
    assert!(!metrics.contains("BREW"));
    // Nothing of all that is in the table.
    let (_, stats) = api.get("/v1/stats").await;
    assert_eq!(stats["locks"], json!([]), "{stats}");
    assert_eq!(stats["semaphores"], json!([]), "{stats}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_slow_client_is_cut_off_by_the_read_timeout() {
    let server = start_with(HttpConfig::default(), |c| {
        c.read_timeout = Duration::from_millis(500);
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(server.http_addr().unwrap())
        .await
        .unwrap();
    // Half a request line, then nothing.
    stream.write_all(b"POST /v1/sess").await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest),
    )
    .await;
    assert!(
        read.is_ok(),
        "the server closes a connection that stalls inside its headers"
    );
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_waiter_whose_client_goes_away_is_withdrawn_and_no_grant_leaks() {
    let (server, api) = start().await;
    let a = api.session().await;
    let b = api.session().await;
    let (_, held) = api
        .post("/v1/locks/k", &a, json!({"acquire_timeout_s": 0}))
        .await;
    // b's client gives up after 300 ms (its connection closes).
    let impatient = Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gave_up = impatient
        .post(format!("{}/v1/locks/k", api.base))
        .header(SESSION, &b)
        .json(&json!({"acquire_timeout_s": 30}))
        .send()
        .await;
    assert!(gave_up.is_err());
    until("b's wait withdrawn", || async {
        api.lock_state("k").await.is_some_and(|l| l["waiters"] == 0)
    })
    .await;
    api.post("/v1/locks/k/release", &a, json!({"token": held["token"]}))
        .await;
    // Free: nobody was granted it behind the scenes.
    let (_, again) = api
        .post("/v1/locks/k", &a, json!({"acquire_timeout_s": 0}))
        .await;
    assert_eq!(again["status"], "ok");
    server.shutdown().await;
}

#[tokio::test]
async fn tcp_and_http_waiters_share_one_fifo_queue() {
    let (server, api) = start().await;
    let a = api.session().await;
    let b = api.session().await;
    let (_, held) = api
        .post("/v1/locks/q", &a, json!({"acquire_timeout_s": 0}))
        .await;
    // First in line: a TCP client; second: HTTP session b.
    let tcp = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let mut tcp = BufReader::new(tcp);
    tcp.write_all(b"l\nq\n10\n").await.unwrap();
    until("tcp queued", || async {
        api.lock_state("q").await.is_some_and(|l| l["waiters"] == 1)
    })
    .await;
    let second = {
        let api = Api::new(server.http_addr().unwrap());
        tokio::spawn(async move {
            api.post("/v1/locks/q", &b, json!({"acquire_timeout_s": 10}))
                .await
        })
    };
    until("http queued", || async {
        api.lock_state("q").await.is_some_and(|l| l["waiters"] == 2)
    })
    .await;
    api.post("/v1/locks/q/release", &a, json!({"token": held["token"]}))
        .await;
    let mut line = String::new();
    tcp.read_line(&mut line).await.unwrap();
    assert!(
        line.starts_with("ok "),
        "the TCP waiter, first in line, is granted first: {line}"
    );
    assert!(!second.is_finished());
    let token = line.split(' ').nth(1).unwrap();
    tcp.write_all(format!("r\nq\n{token}\n").as_bytes())
        .await
        .unwrap();
    let (status, granted) = second.await.unwrap();
    assert_eq!(
        (status, granted["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let tcp_fence = u64::from_str_radix(&token[..16], 16).unwrap();
    assert!(granted["fence"].as_u64().unwrap() > tcp_fence);
    // An idle TCP client would hold the drain up to its read timeout.
    drop(tcp);
    server.shutdown().await;
}

#[tokio::test]
async fn bearer_auth_guards_everything_but_the_probes_and_the_document() {
    let server = start_with(HttpConfig::default(), |c| {
        c.auth_token = Some(Secret::new("s3cret-token"));
    })
    .await;
    let mut api = Api::new(server.http_addr().unwrap());
    for open in ["/health", "/ready", "/v1/openapi.json", "/"] {
        let (status, _) = api.get(open).await;
        assert_eq!(status, StatusCode::OK, "{open}");
    }
    for guarded in ["/v1/stats", "/metrics", "/v1/overview", "/v1/events"] {
        let started = Instant::now();
        let (status, body) = api.get(guarded).await;
        assert_eq!(
            (status, error_code(&body)),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            "{guarded}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(100),
            "a failure waits 100 ms"
        );
    }
    let (status, _) = api.send(Method::POST, "/v1/sessions", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    api.token = Some("wrong".into());
    let (status, _) = api.get("/v1/stats").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    api.token = Some("s3cret-token".into());
    let (status, _) = api.get("/v1/stats").await;
    assert_eq!(status, StatusCode::OK);
    // A session's own connection authenticates with the server's secret.
    let s = api.session().await;
    let (_, granted) = api
        .post("/v1/locks/k", &s, json!({"acquire_timeout_s": 0}))
        .await;
    assert_eq!(granted["status"], "ok");
    let metrics = api.metrics().await;
    let failures: u64 = metrics
        .lines()
        .find(|l| l.starts_with("dflockd_auth_failures_total{transport=\"http\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("auth failures counted");
    assert_eq!(failures, 6);
    server.shutdown().await;
}

#[tokio::test]
async fn session_and_connection_caps() {
    let http = HttpConfig {
        max_sessions: 2,
        max_sessions_per_ip: 1,
        max_connections_per_ip: 1,
        ..HttpConfig::default()
    };
    let server = start_with(http, |_| {}).await;
    let api = Api::new(server.http_addr().unwrap());
    let first = api.session().await;
    let (status, body) = api.send(Method::POST, "/v1/sessions", None, None).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "max_sessions_per_ip")
    );
    // The one connection reqwest keeps open is the address's only one: a
    // second connection is closed at once.
    let mut second = tokio::net::TcpStream::connect(server.http_addr().unwrap())
        .await
        .unwrap();
    let _ = second
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut second, &mut reply),
    )
    .await
    .expect("closed");
    assert!(reply.is_empty(), "{}", String::from_utf8_lossy(&reply));
    let (status, _) = api
        .send(Method::DELETE, &format!("/v1/sessions/{first}"), None, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let _ = api.session().await;
    server.shutdown().await;

    let http = HttpConfig {
        max_sessions: 1,
        ..HttpConfig::default()
    };
    // HTTP sessions do not count against the TCP connection cap.
    let server = start_with(http, |c| c.max_connections = 1).await;
    let api = Api::new(server.http_addr().unwrap());
    let _ = api.session().await;
    let (status, body) = api.send(Method::POST, "/v1/sessions", None, None).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "max_sessions")
    );
    let mut tcp = BufReader::new(
        tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap(),
    );
    tcp.write_all(b"ping\n_\n\n").await.unwrap();
    let mut line = String::new();
    tcp.read_line(&mut line).await.unwrap();
    assert_eq!(line, "ok\n", "the one TCP place is free");
    server.shutdown().await;
}

#[tokio::test]
async fn requests_over_the_rate_limit_get_429() {
    let http = HttpConfig {
        rate_limit_per_ip: 1,
        rate_limit_burst: 3,
        ..HttpConfig::default()
    };
    let server = start_with(http, |_| {}).await;
    let api = Api::new(server.http_addr().unwrap());
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let (status, body) = api.get("/v1/stats").await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(error_code(&body), "rate_limited");
        }
        statuses.push(status.as_u16());
    }
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn cors_answers_allowed_origins_only() {
    let http = HttpConfig {
        cors_allowed_origins: vec!["https://ops.example".into()],
        ..HttpConfig::default()
    };
    let server = start_with(http, |_| {}).await;
    let api = Api::new(server.http_addr().unwrap());
    let allowed = api
        .request(Method::GET, "/v1/stats")
        .header("Origin", "https://ops.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://ops.example"
    );
    let other = api
        .request(Method::GET, "/v1/stats")
        .header("Origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    let preflight = api
        .request(Method::OPTIONS, "/v1/locks/k")
        .header("Origin", "https://ops.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "x-dflockd-session, content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    let allowed_headers = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed_headers.contains("x-dflockd-session"),
        "{allowed_headers}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn ready_turns_503_while_draining_and_waiters_get_draining() {
    let server = start_with(HttpConfig::default(), |c| {
        c.shutdown_timeout = Some(Duration::from_secs(5));
    })
    .await;
    let api = Api::new(server.http_addr().unwrap());
    let (status, body) = api.get("/ready").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
    let a = api.session().await;
    let b = api.session().await;
    api.post("/v1/locks/k", &a, json!({"acquire_timeout_s": 0}))
        .await;
    let waiting = {
        let api = Api::new(server.http_addr().unwrap());
        tokio::spawn(async move {
            api.post("/v1/locks/k", &b, json!({"acquire_timeout_s": 30}))
                .await
        })
    };
    until("b queued", || async {
        api.lock_state("k").await.is_some_and(|l| l["waiters"] == 1)
    })
    .await;
    // A TCP client keeps the server draining (it is idle).
    let _tcp = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    server.begin_drain();
    let (status, body) = waiting.await.unwrap();
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        "{body}"
    );
    let (status, body) = api.get("/ready").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("draining"))
    );
    let (status, _) = api.get("/health").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = api
        .post("/v1/locks/other", &a, json!({"acquire_timeout_s": 0}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    );
    let (status, body) = api.send(Method::POST, "/v1/sessions", None, None).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    );
    tokio::time::timeout(Duration::from_secs(20), server.wait())
        .await
        .expect("the drain ends");
}

#[tokio::test]
async fn metrics_parse_and_count_the_requests_made() {
    let (server, api) = start().await;
    let s = api.session().await;
    for i in 0..3 {
        let (_, granted) = api
            .post(
                &format!("/v1/locks/m{i}"),
                &s,
                json!({"acquire_timeout_s": 0}),
            )
            .await;
        assert_eq!(granted["status"], "ok");
    }
    // The session's own lock, again: a lock is not reentrant.
    let (_, timeout) = api
        .post("/v1/locks/m0", &s, json!({"acquire_timeout_s": 0}))
        .await;
    assert_eq!(timeout["status"], "timeout");
    // Two TCP requests.
    let mut tcp = BufReader::new(
        tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap(),
    );
    tcp.write_all(b"l\ntcp\n0\nping\n_\n\n").await.unwrap();
    let mut line = String::new();
    tcp.read_line(&mut line).await.unwrap();
    tcp.read_line(&mut line).await.unwrap();
    let response = api.request(Method::GET, "/metrics").send().await.unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("{name} {labels:?} missing in\n{text}"))
    };
    assert_eq!(
        value(
            "dflockd_requests_total",
            &[
                ("transport", "http"),
                ("command", "acquire"),
                ("outcome", "ok")
            ]
        ),
        3.0
    );
    assert_eq!(
        value(
            "dflockd_requests_total",
            &[
                ("transport", "http"),
                ("command", "acquire"),
                ("outcome", "timeout")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            "dflockd_requests_total",
            &[
                ("transport", "tcp"),
                ("command", "acquire"),
                ("outcome", "ok")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            "dflockd_requests_total",
            &[("transport", "tcp"), ("command", "ping"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(value("dflockd_grants_total", &[]), 4.0);
    assert_eq!(value("dflockd_live_leases", &[]), 4.0);
    assert_eq!(value("dflockd_connections", &[("transport", "http")]), 1.0);
    assert_eq!(value("dflockd_connections", &[("transport", "tcp")]), 1.0);
    assert_eq!(value("dflockd_queue_depth", &[]), 0.0);
    assert_eq!(value("dflockd_draining", &[]), 0.0);
    for family in [
        "dflockd_releases_total",
        "dflockd_expirations_total",
        "dflockd_lock_delay_hits_total",
        "dflockd_resources",
    ] {
        assert!(
            scrape.samples.iter().any(|s| s.metric == family),
            "{family} missing"
        );
    }
    // The parser folds a histogram family into one sample; each route's
    // series is checked in the text.
    assert!(
        scrape.samples.iter().any(|s| s.metric == "dflockd_http_request_duration_seconds"
            && matches!(&s.value, prometheus_parse::Value::Histogram(buckets) if !buckets.is_empty())),
        "latency histogram"
    );
    assert!(text.contains(r#"dflockd_http_request_duration_seconds_count{method="POST",route="/v1/locks/{key}"} 4"#), "{text}");
    // An idle TCP client would hold the drain up to its read timeout.
    drop(tcp);
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_addr_serves_metrics_and_probes_only() {
    let server = Server::start(ServerConfig {
        metrics_addr: Some("127.0.0.1:0".into()),
        ..ServerConfig::ephemeral()
    })
    .await
    .unwrap();
    let api = Api::new(server.metrics_addr().unwrap());
    let (status, _) = api.get("/health").await;
    assert_eq!(status, StatusCode::OK);
    let text = api.metrics().await;
    assert!(text.contains("dflockd_live_leases 0"), "{text}");
    let (status, _) = api.send(Method::POST, "/v1/sessions", None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.shutdown().await;
}

/// Reads SSE messages (event name, data) from a streaming response.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    async fn open(api: &Api, query: &str) -> Events {
        let response = api
            .request(Method::GET, &format!("/v1/events{query}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Events {
            response,
            buffer: String::new(),
        }
    }

    async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let event = block.lines().find_map(|l| l.strip_prefix("event: "));
                let data = block.lines().find_map(|l| l.strip_prefix("data: "));
                if let (Some(event), Some(data)) = (event, data) {
                    return (event.to_owned(), serde_json::from_str(data).unwrap());
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk())
                .await
                .expect("an event within 10 s")
                .unwrap()
                .expect("the stream stays open");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test]
async fn events_report_grants_enqueues_releases_expiries_and_disconnects() {
    let (server, api) = start().await;
    let mut events = Events::open(&api, "?prefix=ev-").await;
    let s = api.session().await;
    let (_, granted) = api
        .post(
            "/v1/locks/ev-a",
            &s,
            json!({"acquire_timeout_s": 0, "lease_ttl_s": 1}),
        )
        .await;
    api.post("/v1/locks/other", &s, json!({"acquire_timeout_s": 0}))
        .await;
    let (kind, event) = events.next().await;
    assert_eq!(kind, "grant");
    assert_eq!(
        (event["key"].as_str(), event["namespace"].as_str()),
        (Some("ev-a"), Some("lock"))
    );
    assert_eq!(event["fence"], granted["fence"]);
    assert_eq!(event["session"].as_str(), Some(s.as_str()));
    assert_eq!(event["lease_s"], 1);
    // A TCP waiter queues; the lease runs out; the waiter is granted.
    let mut tcp = BufReader::new(
        tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap(),
    );
    tcp.write_all(b"l\nev-a\n10\n").await.unwrap();
    let (kind, event) = events.next().await;
    assert_eq!(
        (kind.as_str(), event["key"].as_str()),
        ("enqueue", Some("ev-a"))
    );
    let (kind, event) = events.next().await;
    assert_eq!(
        (kind.as_str(), &event["fence"]),
        ("expire", &granted["fence"])
    );
    let (kind, event) = events.next().await;
    assert_eq!(kind, "grant");
    assert!(
        event.get("session").is_none(),
        "a TCP holder has no session"
    );
    let mut line = String::new();
    tcp.read_line(&mut line).await.unwrap();
    let token = line.split(' ').nth(1).unwrap().to_owned();
    tcp.write_all(format!("r\nev-a\n{token}\n").as_bytes())
        .await
        .unwrap();
    let (kind, event) = events.next().await;
    assert_eq!(
        (kind.as_str(), event["fence"].as_u64()),
        (
            "release",
            Some(u64::from_str_radix(&token[..16], 16).unwrap())
        )
    );
    // Unfiltered: one disconnect per connection, however many of the
    // table's shards it used.
    let mut all = Events::open(&api, "").await;
    drop(tcp);
    let (kind, _) = all.next().await;
    assert_eq!(kind, "disconnect");
    let mut many = BufReader::new(
        tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap(),
    );
    for i in 0..20 {
        let mut line = String::new();
        many.write_all(format!("l\nspread-{i}\n0\n").as_bytes())
            .await
            .unwrap();
        many.read_line(&mut line).await.unwrap();
    }
    drop(many);
    api.post("/v1/locks/marker", &s, json!({"acquire_timeout_s": 0}))
        .await;
    let mut disconnects = 0;
    loop {
        let (kind, event) = all.next().await;
        match kind.as_str() {
            "disconnect" => disconnects += 1,
            "grant" if event["key"] == "marker" => break,
            _ => {}
        }
    }
    assert_eq!(disconnects, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_is_dropped_and_the_table_goes_on() {
    let server = start_with(HttpConfig::default(), |c| c.max_locks = 100_000).await;
    let api = Api::new(server.http_addr().unwrap());
    // Subscribed, never read.
    let stalled = api.request(Method::GET, "/v1/events").send().await.unwrap();
    // Enough events to overflow its buffers (4,096 queued + the socket's).
    let mut tcp = BufReader::new(
        tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap(),
    );
    let started = Instant::now();
    for round in 0..30 {
        let mut batch = String::new();
        for i in 0..1000 {
            batch.push_str(&format!("l\nslow-{round}-{i}\n0\n"));
        }
        tcp.write_all(batch.as_bytes()).await.unwrap();
        let mut line = String::new();
        for _ in 0..1000 {
            line.clear();
            tcp.read_line(&mut line).await.unwrap();
            assert!(line.starts_with("ok "), "{line}");
        }
        let (_, stats) = api.get("/metrics").await;
        if stats
            .as_str()
            .is_some_and(|m| m.contains("dflockd_event_subscribers_dropped_total 1"))
        {
            break;
        }
        drop(line);
    }
    let metrics = api.metrics().await;
    assert!(
        metrics.contains("dflockd_event_subscribers_dropped_total 1"),
        "{metrics}"
    );
    println!("stalled subscriber dropped after {:?}", started.elapsed());
    drop(stalled);
    // An idle TCP client would hold the drain up to its read timeout.
    drop(tcp);
    server.shutdown().await;
}

#[tokio::test]
async fn overview_lists_queues_in_fifo_order() {
    let (server, api) = start().await;
    let a = api.session().await;
    api.post("/v1/locks/fifo", &a, json!({"acquire_timeout_s": 0}))
        .await;
    let mut waiters = Vec::new();
    for i in 0..3 {
        let mut tcp = BufReader::new(
            tokio::net::TcpStream::connect(server.local_addr())
                .await
                .unwrap(),
        );
        tcp.write_all(b"l\nfifo\n10\n").await.unwrap();
        until("queued", || async {
            api.lock_state("fifo")
                .await
                .is_some_and(|l| l["waiters"] == i + 1)
        })
        .await;
        waiters.push(tcp);
    }
    let (_, stats) = api.get("/v1/stats").await;
    let (status, overview) = api.get("/v1/overview").await;
    assert_eq!(status, StatusCode::OK);
    let queue = overview["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["key"] == "fifo")
        .unwrap();
    let order: Vec<u64> = queue["conns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().expect("a decimal string").parse().unwrap())
        .collect();
    assert_eq!(order.len(), 3);
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "first connected, first in line: {order:?}"
    );
    assert_eq!(overview["http_sessions"], 1);
    assert_eq!(overview["stats"]["connections"], stats["connections"]);
    // An idle TCP client would hold the drain up to its read timeout.
    drop(waiters);
    server.shutdown().await;
}

#[tokio::test]
async fn the_openapi_document_lists_every_route() {
    let (server, api) = start().await;
    let (status, doc) = api.get("/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    let expected = [
        ("/v1/sessions", "post"),
        ("/v1/sessions/{id}", "delete"),
        ("/v1/sessions/{id}/ping", "post"),
        ("/v1/locks/{key}", "post"),
        ("/v1/locks/{key}/release", "post"),
        ("/v1/locks/{key}/renew", "post"),
        ("/v1/locks/{key}/enqueue", "post"),
        ("/v1/locks/{key}/wait", "post"),
        ("/v1/semaphores/{key}", "post"),
        ("/v1/semaphores/{key}/release", "post"),
        ("/v1/semaphores/{key}/renew", "post"),
        ("/v1/semaphores/{key}/enqueue", "post"),
        ("/v1/semaphores/{key}/wait", "post"),
        ("/health", "get"),
        ("/ready", "get"),
        ("/v1/stats", "get"),
        ("/v1/overview", "get"),
        ("/metrics", "get"),
        ("/v1/events", "get"),
        ("/v1/openapi.json", "get"),
        ("/", "get"),
        ("/v1/readindex", "get"),
        ("/v1/admin/voters", "post"),
        ("/v1/admin/voters/{id}", "delete"),
    ];
    for (path, method) in expected {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    assert_eq!(
        paths.len(),
        expected
            .iter()
            .map(|(p, _)| p)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        "no undocumented extras"
    );
    // Every route answers something other than the 404 fallback (so the
    // document names real routes).
    for (path, method) in expected {
        let concrete = path.replace("{key}", "k").replace("{id}", "none");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        if path == "/v1/events" {
            continue;
        }
        let (status, body) = api.send(method, &concrete, None, None).await;
        assert!(
            status != StatusCode::NOT_FOUND || error_code(&body) != "not_found",
            "{path}"
        );
    }
    // Unknown fields are refused in the schema too.
    let acquire = &doc["components"]["schemas"]["AcquireLock"];
    assert_eq!(acquire["additionalProperties"], false, "{acquire}");
    // And a validator agrees it is OpenAPI 3.1.
    let python = openapi_validator();
    let file = std::env::temp_dir().join(format!("dflockd-openapi-{}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
    let out = std::process::Command::new(python)
        .args(["-c", "import sys, json; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1]))); print('valid')"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "openapi-spec-validator: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    server.shutdown().await;
}

/// A Python with `openapi-spec-validator`, in a venv under the target dir.
fn openapi_validator() -> std::path::PathBuf {
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pyvenv-openapi-validator");
    let python = venv.join("bin/python");
    let ready = || {
        std::process::Command::new(&python)
            .args(["-c", "import openapi_spec_validator"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready() {
        let created = std::process::Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(created.success(), "python3 -m venv");
        let installed = std::process::Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openapi-spec-validator==0.7.2",
            ])
            .status()
            .unwrap();
        assert!(installed.success(), "pip install openapi-spec-validator");
    }
    python
}

#[tokio::test]
async fn the_api_speaks_tls_with_the_servers_certificate() {
    let pki = dflockd_testkit::pki::generate("http tls CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    let tls = dflockd_server::TlsConfig::from_pem_files(&cert, &key).unwrap();
    let server = start_with(HttpConfig::default(), |c| c.tls = Some(tls)).await;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls_pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.http_addr().unwrap())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut reply)
        .await
        .unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("{\"status\":\"ok\"}"), "{reply}");
    // Plain HTTP on the TLS port gets nothing useful.
    let plain = Api::new(server.http_addr().unwrap());
    assert!(
        plain
            .http
            .get(format!("{}/health", plain.base))
            .send()
            .await
            .is_err()
    );
    server.shutdown().await;
}

/// The real Python client (`dflockd-client==2.1.1`, over TCP) and an HTTP
/// session contend for one key: granted in arrival order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_and_an_http_session_are_granted_fifo() {
    let (server, api) = start().await;
    let python = dflockd_testkit::python::interop_python(env!("CARGO_TARGET_TMPDIR"));
    let holder = api.session().await;
    let later = api.session().await;
    let (_, held) = api
        .post("/v1/locks/shared", &holder, json!({"acquire_timeout_s": 0}))
        .await;
    // First in line: the Python client.
    let script = r#"
import sys, time
from dflockd_client import SyncDistributedLock, fence_from_token
lock = SyncDistributedLock("shared", servers=[("127.0.0.1", int(sys.argv[1]))], acquire_timeout_s=20)
assert lock.acquire(), "not granted"
print("granted", fence_from_token(lock.token), flush=True)
time.sleep(0.5)
lock.release()
print("released", flush=True)
"#;
    let mut child = tokio::process::Command::new(python)
        .args(["-c", script, &server.local_addr().port().to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs");
    until("python queued", || async {
        api.lock_state("shared")
            .await
            .is_some_and(|l| l["waiters"] == 1)
    })
    .await;
    // Second in line: HTTP session `later`.
    let second = {
        let api = Api::new(server.http_addr().unwrap());
        tokio::spawn(async move {
            let answer = api
                .post("/v1/locks/shared", &later, json!({"acquire_timeout_s": 20}))
                .await;
            (answer, Instant::now())
        })
    };
    until("http queued", || async {
        api.lock_state("shared")
            .await
            .is_some_and(|l| l["waiters"] == 2)
    })
    .await;
    api.post(
        "/v1/locks/shared/release",
        &holder,
        json!({"token": held["token"]}),
    )
    .await;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut granted = String::new();
    out.read_line(&mut granted).await.unwrap();
    let python_fence: u64 = granted
        .trim()
        .strip_prefix("granted ")
        .expect("python granted first")
        .parse()
        .unwrap();
    let mut released = String::new();
    out.read_line(&mut released).await.unwrap();
    let python_released = Instant::now();
    assert_eq!(released.trim(), "released");
    let ((status, answer), http_granted) = second.await.unwrap();
    assert_eq!(
        (status, answer["status"].as_str()),
        (StatusCode::OK, Some("ok")),
        "{answer}"
    );
    let http_fence = answer["fence"].as_u64().unwrap();
    assert!(held["fence"].as_u64().unwrap() < python_fence && python_fence < http_fence);
    // Within scheduling noise of the Python release, never before it.
    assert!(http_granted + Duration::from_millis(100) >= python_released);
    assert!(child.wait().await.unwrap().success());
    println!(
        "fences in order: http {} < python {python_fence} < http {http_fence}",
        held["fence"]
    );
    server.shutdown().await;
}

/// Cluster mode: a follower's API answers lock requests `503 not_leader`
/// naming the leader; every node's event stream and metrics follow the
/// replicated table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_mode_followers_redirect_and_every_node_streams_events() {
    let cluster = dflockd_testkit::cluster::TestCluster::start_with(3, |c| {
        c.http = Some(HttpConfig::default());
    })
    .await;
    let (leader, _) = cluster.leader().await;
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let on_follower = Api::new(cluster.node(follower).http_addr().unwrap());
    let on_leader = Api::new(cluster.node(leader).http_addr().unwrap());
    let mut follower_events = Events::open(&on_follower, "?prefix=c-").await;
    let mut leader_events = Events::open(&on_leader, "?prefix=c-").await;
    let s = on_follower.session().await;
    let (status, body) = on_follower
        .post("/v1/locks/c-key", &s, json!({"acquire_timeout_s": 0}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "not_leader"),
        "{body}"
    );
    let leader_addr = cluster.node(leader).local_addr().to_string();
    assert!(
        body["detail"].as_str().unwrap().contains(&leader_addr),
        "{body}"
    );
    let s = on_leader.session().await;
    let (status, granted) = on_leader
        .post("/v1/locks/c-key", &s, json!({"acquire_timeout_s": 0}))
        .await;
    assert_eq!(
        (status, granted["status"].as_str()),
        (StatusCode::OK, Some("ok")),
        "{granted}"
    );
    let (kind, event) = follower_events.next().await;
    assert_eq!(
        (kind.as_str(), event["key"].as_str()),
        ("grant", Some("c-key"))
    );
    assert_eq!(event["fence"], granted["fence"]);
    // The leader names the holder's session (its connection id is the
    // cluster's).
    let (kind, event) = leader_events.next().await;
    assert_eq!(
        (kind.as_str(), event["session"].as_str()),
        ("grant", Some(s.as_str())),
        "{event}"
    );
    let (_, stats) = on_follower.get("/v1/stats").await;
    assert!(stats["cluster"].is_object(), "{stats}");
    let metrics = on_follower.metrics().await;
    assert!(metrics.contains("dflockd_live_leases 1"), "{metrics}");
}

#[tokio::test]
async fn cluster_routes_on_a_single_node_are_refused_in_order() {
    let (server, api) = start().await;
    let (status, body) = api.get("/v1/readindex").await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::NOT_FOUND, "cluster_disabled")
    );
    let add = json!({"node_id": 4, "raft_addr": "127.0.0.1:1", "client_addr": "127.0.0.1:2"});
    let (status, body) = api
        .send(Method::POST, "/v1/admin/voters", None, Some(add.clone()))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "admin_disabled")
    );
    server.shutdown().await;

    let http = HttpConfig {
        admin_token: Some(Secret::new("admin-secret")),
        ..HttpConfig::default()
    };
    let server = start_with(http, |_| {}).await;
    let api = Api::new(server.http_addr().unwrap());
    let started = Instant::now();
    let (status, body) = api
        .send(Method::DELETE, "/v1/admin/voters/4", None, None)
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNAUTHORIZED, "admin_unauthorized")
    );
    assert!(started.elapsed() >= Duration::from_millis(100));
    let response = api
        .request(Method::POST, "/v1/admin/voters")
        .header("X-Dflockd-Admin", "admin-secret")
        .json(&add)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "cluster_disabled");
    server.shutdown().await;
}

/// Cluster mode: `/v1/readindex` on the leader and a follower; a voter
/// added and removed through the admin routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_mode_readindex_and_admin_voters_work_on_the_leader() {
    let mut cluster = dflockd_testkit::cluster::TestCluster::start_with(3, |c| {
        c.http = Some(HttpConfig {
            admin_token: Some(Secret::new("admin-secret")),
            ..HttpConfig::default()
        });
    })
    .await;
    let (leader, _) = cluster.leader().await;
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let on_leader = Api::new(cluster.node(leader).http_addr().unwrap());
    let on_follower = Api::new(cluster.node(follower).http_addr().unwrap());
    let (status, body) = on_leader.get("/v1/readindex").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok")),
        "{body}"
    );
    let (status, body) = on_follower.get("/v1/readindex").await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "not_leader"),
        "{body}"
    );

    let admin = |api: &Api, method: Method, path: &str, body: Option<Value>| {
        let mut request = api
            .request(method, path)
            .header("X-Dflockd-Admin", "admin-secret");
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (i, member) = cluster.add_node().await;
    let id = i as u64 + 1;
    let (status, body) = admin(
        &on_leader,
        Method::POST,
        "/v1/admin/voters",
        Some(json!({"node_id": id, "raft_addr": member.raft})),
    )
    .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    let add =
        json!({"node_id": id.to_string(), "raft_addr": member.raft, "client_addr": member.client});
    let (status, body) = admin(
        &on_follower,
        Method::POST,
        "/v1/admin/voters",
        Some(add.clone()),
    )
    .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "not_leader"),
        "{body}"
    );
    let (status, body) = admin(&on_leader, Method::POST, "/v1/admin/voters", Some(add)).await;
    assert_eq!(
        (status, body["node_id"].as_str()),
        (StatusCode::OK, Some(id.to_string().as_str())),
        "{body}"
    );
    let raft = cluster.node(leader).cluster_node().unwrap().raft().clone();
    raft.wait(Some(Duration::from_secs(10)))
        .voter_ids([1, 2, 3, id], "the node added")
        .await
        .expect("four voters");
    let (status, body) = admin(
        &on_leader,
        Method::DELETE,
        &format!("/v1/admin/voters/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    raft.wait(Some(Duration::from_secs(10)))
        .voter_ids([1, 2, 3], "the node removed")
        .await
        .expect("three voters again");
}

#[tokio::test]
async fn table_caps_answer_503_max_locks_and_max_waiters() {
    let server = start_with(HttpConfig::default(), |c| {
        c.max_locks = 1;
        c.max_waiters = 1;
    })
    .await;
    let api = Api::new(server.http_addr().unwrap());
    let a = api.session().await;
    let b = api.session().await;
    let c = api.session().await;
    let (_, held) = api
        .post("/v1/locks/one", &a, json!({"acquire_timeout_s": 0}))
        .await;
    assert_eq!(held["status"], "ok");
    let (status, body) = api
        .post("/v1/locks/two", &a, json!({"acquire_timeout_s": 0}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "max_locks")
    );
    let waiting = {
        let api = Api::new(server.http_addr().unwrap());
        tokio::spawn(async move {
            api.post("/v1/locks/one", &b, json!({"acquire_timeout_s": 10}))
                .await
        })
    };
    until("b queued", || async {
        api.lock_state("one")
            .await
            .is_some_and(|l| l["waiters"] == 1)
    })
    .await;
    let (status, body) = api
        .post("/v1/locks/one", &c, json!({"acquire_timeout_s": 5}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "max_waiters")
    );
    api.post("/v1/locks/one/release", &a, json!({"token": held["token"]}))
        .await;
    let (status, granted) = waiting.await.unwrap();
    assert_eq!(
        (status, granted["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    server.shutdown().await;
}
