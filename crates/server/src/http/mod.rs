//! The HTTP API (spec §9): sessions, locks and semaphores over JSON, the
//! OpenAPI document, health and readiness probes, Prometheus metrics, the
//! event stream and the live dashboard. Opt-in with `--http-port`.
//!
//! Lock requests go through the same lock table and FIFO queues as TCP:
//! each HTTP session is an in-process connection in the multiplexed
//! protocol ([`pipe`]), served by the server's own connection code.

mod admin;
mod api;
mod error;
mod limits;
mod pipe;
mod sessions;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use self::error::ApiError;
use self::sessions::{InFlight, Refused, Sessions};
use crate::config::HttpConfig;
use crate::ingress::{HttpLink, InProcess};
use crate::metrics::{Gauges, Metrics, Transport};
use crate::replica::Replica;
use crate::shared::Shared;

/// What the handlers share.
pub(crate) struct ApiState {
    shared: Arc<Shared>,
    replica: Option<Arc<Replica>>,
    sessions: Sessions,
    ingress: mpsc::UnboundedSender<InProcess>,
    config: HttpConfig,
    /// Cancelled when the server stops: event streams end.
    stop: CancellationToken,
}

/// The running HTTP listener.
pub(crate) struct HttpServer {
    pub(crate) addr: SocketAddr,
    pub(crate) task: JoinHandle<()>,
}

/// The paths anyone may read without the bearer token.
const OPEN_PATHS: [&str; 4] = ["/health", "/ready", "/v1/openapi.json", "/"];

#[derive(OpenApi)]
#[openapi(
    info(
        title = "dflockd HTTP API",
        description = "Distributed FIFO locks and counting semaphores with leases and fencing tokens. Lock requests need a session (`X-Dflockd-Session`); with `--auth-token`, every route but /health, /ready, / and this document needs `Authorization: Bearer <token>`.",
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "sessions", description = "The identity holds and queue places belong to"),
        (name = "locks", description = "Exclusive locks"),
        (name = "semaphores", description = "Counting semaphores"),
        (name = "operations", description = "Probes, stats, metrics, events, dashboard"),
        (name = "cluster", description = "Cluster mode: read point and membership (admin secret)"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The routes and the OpenAPI document generated from them.
fn routes() -> (Router<Arc<ApiState>>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(api::create_session))
        .routes(routes!(api::delete_session))
        .routes(routes!(api::ping_session))
        .routes(routes!(api::acquire_lock))
        .routes(routes!(api::release_lock))
        .routes(routes!(api::renew_lock))
        .routes(routes!(api::enqueue_lock))
        .routes(routes!(api::wait_lock))
        .routes(routes!(api::acquire_semaphore))
        .routes(routes!(api::release_semaphore))
        .routes(routes!(api::renew_semaphore))
        .routes(routes!(api::enqueue_semaphore))
        .routes(routes!(api::wait_semaphore))
        .routes(routes!(api::health))
        .routes(routes!(api::ready))
        .routes(routes!(api::stats))
        .routes(routes!(api::overview))
        .routes(routes!(api::metrics))
        .routes(routes!(api::events))
        .routes(routes!(api::dashboard))
        .routes(routes!(admin::read_index))
        .routes(routes!(admin::add_voter))
        .routes(routes!(admin::remove_voter))
        .split_for_parts()
}

/// The OpenAPI document of the API, as served at `/v1/openapi.json`.
pub(crate) fn openapi_json() -> String {
    let (_, mut doc) = routes();
    add_openapi_path(&mut doc);
    doc.to_pretty_json().unwrap_or_default()
}

/// The document describes its own route too.
fn add_openapi_path(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItem};
    use utoipa::openapi::{ContentBuilder, ResponseBuilder};
    let operation = OperationBuilder::new()
        .summary(Some("This OpenAPI 3.1 document"))
        .tag("operations")
        .response(
            "200",
            ResponseBuilder::new()
                .description("the document")
                .content("application/json", ContentBuilder::new().build())
                .build(),
        )
        .build();
    doc.paths.paths.insert(
        "/v1/openapi.json".into(),
        PathItem::new(HttpMethod::Get, operation),
    );
}

impl ApiState {
    /// Opens a session for a client at `ip`.
    async fn open_session(&self, ip: IpAddr) -> Result<InFlight, ApiError> {
        if self.shared.is_draining() {
            return Err(ApiError::draining());
        }
        let place = self.sessions.reserve(ip).map_err(|refused| match refused {
            Refused::MaxSessions => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "max_sessions",
                "the server's session cap is reached",
            ),
            Refused::MaxSessionsPerIp => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "max_sessions_per_ip",
                format!("the per-address session cap is reached for {ip}"),
            ),
        })?;
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (opened_tx, opened) = oneshot::channel();
        let (closed_tx, closed) = oneshot::channel();
        let link = HttpLink {
            opened: opened_tx,
            closed: closed_tx,
        };
        self.ingress
            .send(InProcess {
                stream: server,
                http: Some(link),
            })
            .map_err(|_| ApiError::draining())?;
        let conn = opened.await.map_err(|_| ApiError::draining())?;
        let auth = self.shared.config.auth_token.as_ref().map(|s| s.expose());
        // Well inside the server's read timeout.
        let keepalive = (self.shared.config.read_timeout / 3).max(Duration::from_millis(100));
        let pipe = pipe::Pipe::open(client, auth, keepalive, closed)
            .await
            .map_err(|_| ApiError::draining())?;
        Ok(self.sessions.insert(place, new_session_id(), pipe, conn))
    }

    /// Closes session `id`, waiting until the server released what it
    /// held; `false` if there was no such session.
    async fn close_session(&self, id: &str) -> bool {
        match self.sessions.remove(id) {
            Some(session) => {
                // Closed even if the caller goes away meanwhile.
                let _ = tokio::spawn(async move { session.pipe.close().await }).await;
                true
            }
            None => false,
        }
    }

    fn stats(&self) -> dflockd_proto::Stats {
        let connections = self.shared.connections() as u64;
        match &self.replica {
            Some(replica) => replica.stats(connections),
            None => self.shared.stats(),
        }
    }

    fn overview(&self) -> Overview {
        let queues = match &self.replica {
            Some(replica) => replica.node().view().read(|table| table.queues()),
            None => {
                let mut all = Vec::new();
                self.shared
                    .each_shard(|shard| all.extend(shard.table().queues()));
                all
            }
        };
        let queues = queues
            .into_iter()
            .map(|(rid, conns)| Queue {
                key: rid.key().to_string_lossy(),
                namespace: match rid.namespace() {
                    dflockd_proto::Namespace::Lock => "lock",
                    dflockd_proto::Namespace::Semaphore => "semaphore",
                },
                conns: conns.into_iter().map(|c| c.0.to_string()).collect(),
            })
            .collect();
        // Fences (and, in cluster mode, connection ids) exceed
        // JavaScript's exact integers (2^53): the dashboard gets them as
        // decimal strings.
        let mut stats = serde_json::to_value(self.stats()).unwrap_or_default();
        if let Some(locks) = stats.get_mut("locks").and_then(|l| l.as_array_mut()) {
            for lock in locks {
                for field in ["fence", "owner_conn_id"] {
                    if let Some(value) = lock.get_mut(field).filter(|v| v.is_u64()) {
                        *value = serde_json::Value::String(value.to_string());
                    }
                }
            }
        }
        Overview {
            stats,
            queues,
            http_sessions: self.sessions.len(),
            draining: self.shared.is_draining(),
        }
    }
}

#[derive(Serialize)]
struct Overview {
    /// The stats document, each lock's `fence` as a decimal string.
    stats: serde_json::Value,
    queues: Vec<Queue>,
    http_sessions: usize,
    draining: bool,
}

#[derive(Serialize)]
struct Queue {
    key: String,
    namespace: &'static str,
    /// Waiting connections, first in line first (decimal strings: in
    /// cluster mode connection ids exceed JavaScript's exact integers).
    conns: Vec<String>,
}

/// 128 random bits, hex.
fn new_session_id() -> String {
    let mut bytes = [0u8; 16];
    // The OS's generator; a failure (no entropy source at all) falls back
    // to the process's randomly seeded hasher, still unguessable enough
    // to name a session that also needs the bearer token.
    if getrandom::fill(&mut bytes).is_err() {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        bytes[..8].copy_from_slice(&h.finish().to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `/metrics` response.
pub(crate) fn metrics_response(shared: &Shared, replica: Option<&Replica>) -> Response {
    let text = shared.telemetry.metrics.encode(gauges(shared, replica));
    ([(header::CONTENT_TYPE, Metrics::CONTENT_TYPE)], text).into_response()
}

fn gauges(shared: &Shared, replica: Option<&Replica>) -> Gauges {
    let mut gauges = Gauges::default();
    let mut count = |table_leases: usize, waiters: usize, resources: usize| {
        gauges.live_leases += table_leases as u64;
        gauges.waiters += waiters as u64;
        gauges.resources += resources as u64;
    };
    match replica {
        Some(replica) => replica.node().view().read(|table| {
            count(
                table.holder_count(),
                table.waiter_count(),
                table.resource_count(),
            );
        }),
        None => shared.each_shard(|shard| {
            let table = shard.table();
            count(
                table.holder_count(),
                table.waiter_count(),
                table.resource_count(),
            );
        }),
    }
    let http = shared
        .http_sessions
        .load(std::sync::atomic::Ordering::Acquire) as u64;
    gauges.http_sessions = http;
    gauges.tcp_connections = (shared.connections() as u64).saturating_sub(http);
    gauges.draining = shared.is_draining();
    gauges
}

/// Bearer auth: every path but [`OPEN_PATHS`]; a failure waits 100 ms,
/// as a failed TCP `auth` does, then answers `401 unauthorized`.
async fn require_bearer(
    State(api): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(secret) = &api.shared.config.auth_token else {
        return next.run(request).await;
    };
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    let authorised = given.is_some_and(|token| {
        !token.is_empty() && bool::from(token.ct_eq(secret.expose().as_bytes()))
    });
    if authorised {
        return next.run(request).await;
    }
    api.shared.telemetry.metrics.auth_failure(Transport::Http);
    tracing::warn!(path = request.uri().path(), "HTTP authentication failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
    ApiError::unauthorized().into_response()
}

/// Times each request by its route.
async fn time_requests(State(api): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    // A fixed set: any token is a valid HTTP method, and each label value
    // would be a series kept for ever.
    let method = match *request.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    api.shared
        .telemetry
        .metrics
        .http_request(method, &route, started.elapsed());
    response
}

/// axum's own rejections (a path or query that does not decode) are
/// plain text: they get the API's JSON error body too.
async fn json_rejections(response: Response) -> Response {
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"text/plain"));
    if response.status() != StatusCode::BAD_REQUEST || !plain {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    ApiError::bad_request(String::from_utf8_lossy(&body).into_owned()).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static(api::SESSION_HEADER),
                header::HeaderName::from_static(admin::ADMIN_HEADER),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// Starts the API on `listener`.
pub(crate) fn start(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    replica: Option<Arc<Replica>>,
    ingress: mpsc::UnboundedSender<InProcess>,
    config: HttpConfig,
) -> std::io::Result<HttpServer> {
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        for (flag, value) in [
            ("--http-max-sessions", config.max_sessions),
            ("--http-max-sessions-per-ip", config.max_sessions_per_ip),
        ] {
            if value == 0 {
                tracing::warn!(flag, "unbounded limit on a non-loopback HTTP listener");
            }
        }
    }
    let stop = CancellationToken::new();
    let state = Arc::new(ApiState {
        sessions: Sessions::new(config.max_sessions, config.max_sessions_per_ip),
        shared: Arc::clone(&shared),
        replica,
        ingress,
        config: config.clone(),
        stop: stop.clone(),
    });
    let (router, _) = routes();
    let openapi = openapi_json();
    let mut app = router
        .route(
            "/v1/openapi.json",
            axum::routing::get(move || {
                let doc = openapi.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], doc) }
            }),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::map_response(json_rejections))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            time_requests,
        ))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_bearer,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(Arc::clone(&state));
    let mut limiter = None;
    if config.rate_limit_per_ip > 0 {
        let (layer, config) = limits::rate_limit(config.rate_limit_per_ip, config.rate_limit_burst);
        limiter = Some(config);
        app = app.layer(layer);
    }
    if let Some(cors) = cors(&config.cors_allowed_origins) {
        app = app.layer(cors);
    }
    let handle = axum_server::Handle::new();
    let acceptor = limits::PerIpAcceptor::new(config.max_connections_per_ip);
    let serve_handle = handle.clone();
    let tls = shared.config.tls.clone();
    let make = app.into_make_service_with_connect_info::<SocketAddr>();
    listener.set_nonblocking(true)?;
    let mut server = axum_server::from_tcp(listener)?
        // A client must send its first request, and every request's
        // headers, within the read timeout (slow clients are cut off).
        .first_request_timeout(shared.config.read_timeout);
    server
        .http_builder()
        .http1()
        .header_read_timeout(shared.config.read_timeout);
    let task = tokio::spawn(async move {
        let served = match tls {
            None => {
                server
                    .acceptor(acceptor)
                    .handle(serve_handle)
                    .serve(make)
                    .await
            }
            Some(tls) => {
                let rustls = axum_server::tls_rustls::RustlsConfig::from_config(tls.server);
                let acceptor =
                    axum_server::tls_rustls::RustlsAcceptor::new(rustls).acceptor(acceptor);
                server
                    .acceptor(acceptor)
                    .handle(serve_handle)
                    .serve(make)
                    .await
            }
        };
        if let Err(error) = served {
            tracing::error!(%error, "HTTP server failed");
        }
    });
    let supervisor = tokio::spawn(supervise(state, handle, stop, limiter, task));
    Ok(HttpServer {
        addr,
        task: supervisor,
    })
}

/// Starts the metrics-only listener (`--metrics-addr`): `/metrics`
/// (bearer auth when the server has a token), `/health` and `/ready`.
pub(crate) fn start_metrics(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    replica: Option<Arc<Replica>>,
) -> std::io::Result<HttpServer> {
    let addr = listener.local_addr()?;
    let (ingress, _) = mpsc::unbounded_channel();
    let state = Arc::new(ApiState {
        sessions: Sessions::new(0, 0),
        shared: Arc::clone(&shared),
        replica,
        ingress,
        config: HttpConfig::default(),
        stop: CancellationToken::new(),
    });
    let app = Router::new()
        .route("/metrics", axum::routing::get(api::metrics))
        .route("/health", axum::routing::get(api::health))
        .route("/ready", axum::routing::get(api::ready))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_bearer,
        ))
        .with_state(state);
    listener.set_nonblocking(true)?;
    let mut server =
        axum_server::from_tcp(listener)?.first_request_timeout(shared.config.read_timeout);
    server
        .http_builder()
        .http1()
        .header_read_timeout(shared.config.read_timeout);
    let handle = axum_server::Handle::new();
    let serve_handle = handle.clone();
    let served = tokio::spawn(async move {
        if let Err(error) = server
            .handle(serve_handle)
            .serve(app.into_make_service())
            .await
        {
            tracing::error!(%error, "metrics listener failed");
        }
    });
    let task = tokio::spawn(async move {
        shared.drain.cancelled().await;
        handle.graceful_shutdown(Some(Duration::from_secs(1)));
        let _ = served.await;
    });
    Ok(HttpServer { addr, task })
}

/// Reaps idle sessions until the server drains; then ends event streams,
/// stops the listener and closes every session.
async fn supervise(
    state: Arc<ApiState>,
    handle: axum_server::Handle<SocketAddr>,
    stop: CancellationToken,
    limiter: Option<limits::Limiter>,
    server: JoinHandle<()>,
) {
    let idle = state.config.session_idle_timeout * 2;
    let period = (state.config.session_idle_timeout / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.shared.drain.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Some(limiter) = &limiter {
            limiter.forget_idle();
        }
        // Zero: never idle for too long, but a session whose connection
        // the server closed (a leader that stepped down, say) still goes.
        let idle = if idle.is_zero() { Duration::MAX } else { idle };
        for session in state.sessions.take_idle(tokio::time::Instant::now(), idle) {
            tracing::debug!("HTTP session reaped after {idle:?} idle");
            state.shared.telemetry.metrics.sessions_reaped.inc();
            tokio::spawn(async move { session.pipe.close().await });
        }
    }
    // Draining: event streams end; waiting requests are answered 503
    // `draining` (the table answers them `error`), new ones too, and
    // `/ready` says 503 — the listener stays open for the probes until
    // the server's other connections are gone. Idle sessions close now,
    // busy ones as soon as their requests are answered.
    stop.cancel();
    let limit = state
        .shared
        .config
        .shutdown_timeout
        .map(|t| tokio::time::Instant::now() + t);
    loop {
        for session in state
            .sessions
            .take_idle(tokio::time::Instant::now(), Duration::ZERO)
        {
            session.pipe.close().await;
        }
        let http = state
            .shared
            .http_sessions
            .load(std::sync::atomic::Ordering::Acquire);
        let others = state.shared.connections().saturating_sub(http);
        let out_of_time = limit.is_some_and(|at| tokio::time::Instant::now() >= at);
        if (others == 0 && state.sessions.len() == 0)
            || out_of_time
            || state.shared.kill.is_cancelled()
        {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = state.shared.kill.cancelled() => {}
        }
    }
    handle.graceful_shutdown(Some(Duration::from_secs(1)));
    let _ = server.await;
    for session in state.sessions.take_all() {
        session.pipe.close().await;
    }
}
