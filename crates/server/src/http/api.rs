//! The routes of the HTTP API (spec §9) and their bodies. The OpenAPI
//! document is generated from these types and annotations.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, Path, Query, Request as HttpRequest, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use dflockd_proto::{
    Key, Kind, Lease, Limit, Namespace, Reply, Request, Seconds, StableRef, Status,
};
use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use utoipa::{IntoParams, ToSchema};

use super::ApiState;
use super::error::{ApiError, ErrorBody};
use super::sessions::InFlight;
use crate::metrics::{Command, Outcome, Transport};

/// The header that names the session of a lock request.
pub(crate) const SESSION_HEADER: &str = "x-dflockd-session";

type Api = State<Arc<ApiState>>;

/// A JSON body: unknown fields, bad types and trailing data are
/// `400 bad_request`; an oversized body is `413 body_too_large`. Any
/// content type is read as JSON (so `curl -d` works as is).
pub(crate) struct JsonBody<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: HttpRequest, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    rejection.body_text(),
                )
            } else {
                ApiError::bad_request(rejection.body_text())
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            // No body: every field takes its default (and a required one
            // is reported missing by the handler).
            return Ok(JsonBody(T::default()));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// `POST /v1/sessions` body (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateSession {
    /// Names the session so that, in cluster mode with `--orphan-ttl`, a
    /// new session with the same name takes over what this one held
    /// (1–64 printable ASCII characters).
    #[serde(default)]
    stable_ref: Option<String>,
}

/// A new session.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SessionCreated {
    /// Send it as `X-Dflockd-Session` with every lock request.
    session_id: String,
    /// Seconds; the session is closed after twice this without requests.
    idle_timeout_s: u64,
}

/// `POST /v1/locks/{key}` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AcquireLock {
    /// How long to wait in the key's FIFO queue, in seconds; 0 = try once.
    acquire_timeout_s: Option<u64>,
    /// The lease in seconds; absent or 0 = the server's default.
    #[serde(default)]
    lease_ttl_s: Option<u64>,
}

/// `POST /v1/semaphores/{key}` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AcquireSemaphore {
    /// How long to wait, in seconds; 0 = try once.
    acquire_timeout_s: Option<u64>,
    /// How many may hold the semaphore at once (every holder must agree).
    limit: Option<u64>,
    /// The lease in seconds; absent or 0 = the server's default.
    #[serde(default)]
    lease_ttl_s: Option<u64>,
}

/// `POST …/release` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Release {
    /// The grant's token.
    token: Option<String>,
}

/// `POST …/renew` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Renew {
    /// The grant's token.
    token: Option<String>,
    /// The new lease in seconds; absent or 0 = the server's default.
    #[serde(default)]
    lease_ttl_s: Option<u64>,
}

/// `POST /v1/locks/{key}/enqueue` body (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EnqueueLock {
    /// The lease in seconds once granted; absent or 0 = the default.
    #[serde(default)]
    lease_ttl_s: Option<u64>,
}

/// `POST /v1/semaphores/{key}/enqueue` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EnqueueSemaphore {
    /// How many may hold the semaphore at once.
    limit: Option<u64>,
    /// The lease in seconds once granted; absent or 0 = the default.
    #[serde(default)]
    lease_ttl_s: Option<u64>,
}

/// `POST …/wait` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Wait {
    /// How long to wait for the queued place's grant, in seconds.
    timeout_s: Option<u64>,
}

/// The answer to an acquire, enqueue or wait.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Granted {
    /// `ok` (held), `timeout` (not granted in time), `acquired` (enqueue
    /// granted at once) or `queued` (enqueue joined the queue).
    status: &'static str,
    /// The grant's token (when held): send it to release and renew.
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    /// The lease in seconds (when held).
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_ttl_s: Option<u64>,
    /// The grant's fence: larger than every earlier grant's (when held).
    #[serde(skip_serializing_if = "Option::is_none")]
    fence: Option<u64>,
}

impl Granted {
    fn from_reply(reply: Reply, op: &str) -> Result<Granted, ApiError> {
        let held = |status, token: dflockd_proto::Token, lease: Lease| Granted {
            status,
            token: Some(token.to_string()),
            lease_ttl_s: Some(lease.get()),
            fence: Some(token.fence()),
        };
        let bare = |status| Granted {
            status,
            token: None,
            lease_ttl_s: None,
            fence: None,
        };
        match reply {
            Reply::Granted { token, lease } => Ok(held("ok", token, lease)),
            Reply::Acquired { token, lease } => Ok(held("acquired", token, lease)),
            Reply::Queued => Ok(bare("queued")),
            Reply::Failure(Status::Timeout) => Ok(bare("timeout")),
            // A validated acquire, enqueue or wait is answered a bare
            // `error` only when the server could not mint its token: the
            // fence counter could not be persisted (spec §4.3).
            Reply::Failure(Status::Error) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "fence_persistence",
                format!("{op}: the server could not persist its fence counter"),
            )),
            other => Err(ApiError::from_reply(&other, op)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_replies_map_to_statuses_and_codes() {
        let token = dflockd_proto::Token::new(7, 9);
        let lease = Lease::new(30).unwrap();
        let ok = Granted::from_reply(Reply::Granted { token, lease }, "acquire").unwrap();
        assert_eq!(
            (ok.status, ok.fence, ok.lease_ttl_s),
            ("ok", Some(7), Some(30))
        );
        let cases = [
            (
                Status::Error,
                StatusCode::SERVICE_UNAVAILABLE,
                "fence_persistence",
            ),
            (
                Status::ErrorMaxLocks,
                StatusCode::SERVICE_UNAVAILABLE,
                "max_locks",
            ),
            (
                Status::ErrorMaxWaiters,
                StatusCode::SERVICE_UNAVAILABLE,
                "max_waiters",
            ),
            (
                Status::ErrorDraining,
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
            ),
            (
                Status::ErrorLimitMismatch,
                StatusCode::CONFLICT,
                "limit_mismatch",
            ),
            (
                Status::ErrorAlreadyEnqueued,
                StatusCode::CONFLICT,
                "already_enqueued",
            ),
            (
                Status::ErrorNotEnqueued,
                StatusCode::CONFLICT,
                "not_enqueued",
            ),
            (
                Status::ErrorLeaseExpired,
                StatusCode::CONFLICT,
                "lease_expired",
            ),
        ];
        for (status, http, code) in cases {
            let error = Granted::from_reply(Reply::Failure(status), "acquire").unwrap_err();
            assert_eq!((error.status, error.code), (http, code), "{status:?}");
        }
        let release = ApiError::from_reply(&Reply::Failure(Status::Error), "release");
        assert_eq!(
            (release.status, release.code),
            (StatusCode::NOT_FOUND, "not_held")
        );
        let redirect =
            ApiError::from_reply(&Reply::NotLeader(Some("10.0.0.2:6388".into())), "acquire");
        assert_eq!(redirect.code, "not_leader");
        assert!(redirect.detail.contains("10.0.0.2:6388"));
    }
}

/// The answer to a renew.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Renewed {
    /// The lease now running, in seconds.
    remaining_s: u64,
}

/// `GET /health` and `GET /ready` body.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Health {
    /// `ok`, `ready` or `draining`.
    status: &'static str,
}

/// `GET /v1/events` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    /// Only events of keys starting with this prefix.
    prefix: Option<String>,
}

fn key_of(raw: &str) -> Result<Key, ApiError> {
    Key::new(raw).map_err(|e| ApiError::bad_request(format!("key {raw:?}: {e}")))
}

fn seconds(name: &str, value: Option<u64>) -> Result<Seconds, ApiError> {
    let value = value.ok_or_else(|| ApiError::bad_request(format!("{name} is required")))?;
    Seconds::new(value).map_err(|e| ApiError::bad_request(format!("{name}: {e}")))
}

fn lease(value: Option<u64>) -> Result<Option<Lease>, ApiError> {
    match value {
        None | Some(0) => Ok(None),
        Some(secs) => Lease::new(secs)
            .map(Some)
            .map_err(|e| ApiError::bad_request(format!("lease_ttl_s: {e}"))),
    }
}

fn limit(value: Option<u64>) -> Result<Limit, ApiError> {
    let value = value.ok_or_else(|| ApiError::bad_request("limit is required"))?;
    Limit::new(value).map_err(|e| ApiError::bad_request(format!("limit: {e}")))
}

/// A token as sent: 1–256 characters, none of them white space or control.
fn token(value: Option<String>) -> Result<dflockd_proto::TokenText, ApiError> {
    let value = value.ok_or_else(|| ApiError::bad_request("token is required"))?;
    if value.is_empty()
        || value.len() > 256
        || value.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ApiError::bad_request(
            "token: 1-256 characters, no white space",
        ));
    }
    Ok(dflockd_proto::TokenText::from(value.into_bytes()))
}

impl ApiState {
    /// The session a request names in its header, marked in flight.
    fn session(&self, headers: &HeaderMap) -> Result<InFlight, ApiError> {
        if self.shared.is_draining() {
            return Err(ApiError::draining());
        }
        let id = headers
            .get(SESSION_HEADER)
            .ok_or_else(|| ApiError::bad_request("the X-Dflockd-Session header is required"))?
            .to_str()
            .map_err(|_| ApiError::session_gone())?;
        self.sessions.begin(id).ok_or_else(ApiError::session_gone)
    }

    /// Sends `request` on the session's connection and counts its outcome.
    async fn call(
        &self,
        session: &InFlight,
        command: Command,
        request: Request,
        ticket: u64,
    ) -> Result<Reply, ApiError> {
        if self.shared.is_draining() {
            self.shared
                .telemetry
                .metrics
                .request(Transport::Http, command, Outcome::ErrorDraining);
            return Err(ApiError::draining());
        }
        match session.pipe.call(&request, ticket).await {
            // A waiting request the drain answered.
            Ok(Reply::Failure(Status::Error)) if self.shared.is_draining() => {
                self.shared.telemetry.metrics.request(
                    Transport::Http,
                    command,
                    Outcome::ErrorDraining,
                );
                Err(ApiError::draining())
            }
            Ok(reply) => {
                self.shared.telemetry.metrics.request(
                    Transport::Http,
                    command,
                    Outcome::of(&reply),
                );
                Ok(reply)
            }
            // The connection closed under the request: the server drains,
            // or the session was closed meanwhile.
            Err(_) if self.shared.is_draining() => Err(ApiError::draining()),
            Err(_) => Err(ApiError::session_gone()),
        }
    }
}

/// Opens a session.
#[utoipa::path(post, path = "/v1/sessions", tag = "sessions",
    request_body(content = Option<CreateSession>, description = "optional"),
    responses(
        (status = 200, description = "opened", body = SessionCreated),
        (status = 400, description = "bad body", body = ErrorBody),
        (status = 503, description = "`max_sessions`, `max_sessions_per_ip` or `draining`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn create_session(
    State(api): Api,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    JsonBody(body): JsonBody<CreateSession>,
) -> Result<Json<SessionCreated>, ApiError> {
    let stable_ref = body
        .stable_ref
        .map(|name| {
            StableRef::new(&name)
                .ok_or_else(|| ApiError::bad_request("stable_ref: 1-64 printable ASCII characters"))
        })
        .transpose()?;
    let session = api.open_session(peer.ip()).await?;
    if let Some(name) = stable_ref {
        let reply = api
            .call(&session, Command::StableRef, Request::StableRef(name), 0)
            .await;
        if let Err(error) | Ok(Err(error)) = reply.map(|reply| match reply {
            Reply::Ok => Ok(()),
            other => Err(ApiError::from_reply(&other, "stable_ref")),
        }) {
            let id = session.id.clone();
            drop(session);
            api.close_session(&id).await;
            return Err(error);
        }
    }
    Ok(Json(SessionCreated {
        session_id: session.id.clone(),
        idle_timeout_s: api.config.session_idle_timeout.as_secs(),
    }))
}

/// Closes a session: everything it held is released and everything it
/// queued is withdrawn before the answer.
#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "the session id")),
    responses(
        (status = 204, description = "closed"),
        (status = 410, description = "`session_gone`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn delete_session(
    State(api): Api,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if api.close_session(&id).await {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::session_gone())
    }
}

/// Keeps a session from being reaped.
#[utoipa::path(post, path = "/v1/sessions/{id}/ping", tag = "sessions",
    params(("id" = String, Path, description = "the session id")),
    responses(
        (status = 204, description = "alive"),
        (status = 410, description = "`session_gone`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn ping_session(
    State(api): Api,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if api.shared.is_draining() {
        return Err(ApiError::draining());
    }
    let session = api.sessions.begin(&id).ok_or_else(ApiError::session_gone)?;
    match api.call(&session, Command::Ping, Request::Ping, 0).await? {
        Reply::Ok => Ok(StatusCode::NO_CONTENT),
        other => Err(ApiError::from_reply(&other, "ping")),
    }
}

async fn acquire(
    api: &ApiState,
    headers: &HeaderMap,
    key: &str,
    kind: Kind,
    timeout: Seconds,
    lease: Option<Lease>,
) -> Result<Json<Granted>, ApiError> {
    let key = key_of(key)?;
    let session = api.session(headers)?;
    let request = Request::Acquire {
        key,
        kind,
        timeout,
        lease,
    };
    let reply = api.call(&session, Command::Acquire, request, 0).await?;
    Granted::from_reply(reply, "acquire").map(Json)
}

/// Acquires a lock, waiting in the key's FIFO queue (shared with TCP
/// clients) for up to `acquire_timeout_s`.
#[utoipa::path(post, path = "/v1/locks/{key}", tag = "locks",
    params(("key" = String, Path, description = "1-256 bytes, no white space"), ("X-Dflockd-Session" = String, Header, description = "the session")),
    request_body = AcquireLock,
    responses(
        (status = 200, description = "`ok` with the grant, or `timeout`", body = Granted),
        (status = 400, description = "bad key, body or missing session header", body = ErrorBody),
        (status = 410, description = "`session_gone`", body = ErrorBody),
        (status = 503, description = "`max_locks`, `max_waiters`, `draining`, `not_leader`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn acquire_lock(
    State(api): Api,
    Path(key): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<AcquireLock>,
) -> Result<Json<Granted>, ApiError> {
    let timeout = seconds("acquire_timeout_s", body.acquire_timeout_s)?;
    let lease = lease(body.lease_ttl_s)?;
    acquire(&api, &headers, &key, Kind::Lock, timeout, lease).await
}

/// Acquires a slot of a counting semaphore.
#[utoipa::path(post, path = "/v1/semaphores/{key}", tag = "semaphores",
    params(("key" = String, Path, description = "1-256 bytes, no white space"), ("X-Dflockd-Session" = String, Header, description = "the session")),
    request_body = AcquireSemaphore,
    responses(
        (status = 200, description = "`ok` with the grant, or `timeout`", body = Granted),
        (status = 400, description = "bad key, body or missing session header", body = ErrorBody),
        (status = 409, description = "`limit_mismatch`", body = ErrorBody),
        (status = 410, description = "`session_gone`", body = ErrorBody),
        (status = 503, description = "`max_locks`, `max_waiters`, `draining`, `not_leader`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn acquire_semaphore(
    State(api): Api,
    Path(key): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<AcquireSemaphore>,
) -> Result<Json<Granted>, ApiError> {
    let timeout = seconds("acquire_timeout_s", body.acquire_timeout_s)?;
    let kind = Kind::Semaphore(limit(body.limit)?);
    let lease = lease(body.lease_ttl_s)?;
    acquire(&api, &headers, &key, kind, timeout, lease).await
}

async fn release(
    api: &ApiState,
    headers: &HeaderMap,
    key: &str,
    namespace: Namespace,
    body: Release,
) -> Result<StatusCode, ApiError> {
    let key = key_of(key)?;
    let token = token(body.token)?;
    let session = api.session(headers)?;
    let request = Request::Release {
        key,
        namespace,
        token,
    };
    match api.call(&session, Command::Release, request, 0).await? {
        Reply::Ok => Ok(StatusCode::NO_CONTENT),
        other => Err(ApiError::from_reply(&other, "release")),
    }
}

/// Releases a lock.
#[utoipa::path(post, path = "/v1/locks/{key}/release", tag = "locks",
    params(("key" = String, Path, description = "the key"), ("X-Dflockd-Session" = String, Header, description = "the session")),
    request_body = Release,
    responses(
        (status = 204, description = "released"),
        (status = 400, description = "bad key or body", body = ErrorBody),
        (status = 404, description = "`not_held`", body = ErrorBody),
        (status = 410, description = "`session_gone`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn release_lock(
    State(api): Api,
    Path(key): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Release>,
) -> Result<StatusCode, ApiError> {
    release(&api, &headers, &key, Namespace::Lock, body).await
}

/// Releases a semaphore slot.
#[utoipa::path(post, path = "/v1/semaphores/{key}/release", tag = "semaphores",
    params(("key" = String, Path, description = "the key"), ("X-Dflockd-Session" = String, Header, description = "the session")),
    request_body = Release,
    responses(
        (status = 204, description = "released"),
        (status = 400, description = "bad key or body", body = ErrorBody),
        (status = 404, description = "`not_held`", body = ErrorBody),
        (status = 410, description = "`session_gone`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn release_semaphore(
    State(api): Api,
    Path(key): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Release>,
) -> Result<StatusCode, ApiError> {
    release(&api, &headers, &key, Namespace::Semaphore, body).await
}

async fn renew(
    api: &ApiState,
    headers: &HeaderMap,
    key: &str,
    namespace: Namespace,
    body: Renew,
) -> Result<Json<Renewed>, ApiError> {
    let key = key_of(key)?;
    let token = token(body.token)?;
    let lease = lease(body.lease_ttl_s)?;
    let session = api.session(headers)?;
    let request = Request::Renew {
        key,
        namespace,
        token,
        lease,
    };
    match api.call(&session, Command::Renew, request, 0).await? {
        Reply::Renewed(remaining) => Ok(Json(Renewed {
            remaining_s: remaining.get(),
        })),
        other => Err(ApiError::from_reply(&other, "renew")),
    }
}

/// Renews a lock's lease.
#[utoipa::path(post, path = "/v1/locks/{key}/renew", tag = "locks",
    params(("key" = String, Path, description = "the key"), ("X-Dflockd-Session" = String, Header, description = "the session")),
    request_body = Renew,
    responses(
        (status = 200, description = "renewed", body = Renewed),
        (status = 400, description = "bad key or body", body = ErrorBody),
        (status = 404, description = "`not_held` (released or expired)", body = ErrorBody),
        (status = 410, description = "`session_gone`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn renew_lock(
    State(api): Api,
    Path(key): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Renew>,
) -> Result<Json<Renewed>, ApiError> {
    renew(&api, &headers, &key, Namespace::Lock, body).await
}

/// Renews a semaphore slot's lease.
#[utoipa::path(post, path = "/v1/semaphores/{key}/renew", tag = "semaphores",
    params(("key" = String, Path, description = "the key"), ("X-Dflockd-Session" = String, Header, description = "the session")),
    request_body = Renew,
    responses(
        (status = 200, description = "renewed", body = Renewed),
        (status = 400, description = "bad key or body", body = ErrorBody),
        (status = 404, description = "`not_held` (released or expired)", body = ErrorBody),
        (status = 410, description = "`session_gone`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn renew_semaphore(
    State(api): Api,
    Path(key): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Renew>,
) -> Result<Json<Renewed>, ApiError> {
    renew(&api, &headers, &key, Namespace::Semaphore, body).await
}

async fn enqueue(
    api: &ApiState,
    headers: &HeaderMap,
    key: &str,
    kind: Kind,
    lease: Option<Lease>,
) -> Result<Json<Granted>, ApiError> {
    let key = key_of(key)?;
    let session = api.session(headers)?;
    let request = Request::Enqueue { key, kind, lease };
    let reply = api.call(&session, Command::Enqueue, request, 0).await?;
    Granted::from_reply(reply, "enqueue").map(Json)
}

/// Joins a lock's FIFO queue without waiting (two-phase, phase 1).
#[utoipa::path(post, path = "/v1/locks/{key}/enqueue", tag = "locks",
    params(("key" = String, Path, description = "the key"), ("X-Dflockd-Session" = String, Header, description = "the session")),
    request_body(content = Option<EnqueueLock>, description = "optional"),
    responses(
        (status = 200, description = "`acquired` with the grant, or `queued`", body = Granted),
        (status = 400, description = "bad key or body", body = ErrorBody),
        (status = 409, description = "`already_enqueued`", body = ErrorBody),
        (status = 410, description = "`session_gone`", body = ErrorBody),
        (status = 503, description = "`max_locks`, `max_waiters`, `draining`, `not_leader`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn enqueue_lock(
    State(api): Api,
    Path(key): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<EnqueueLock>,
) -> Result<Json<Granted>, ApiError> {
    let lease = lease(body.lease_ttl_s)?;
    enqueue(&api, &headers, &key, Kind::Lock, lease).await
}

/// Joins a semaphore's FIFO queue without waiting (two-phase, phase 1).
#[utoipa::path(post, path = "/v1/semaphores/{key}/enqueue", tag = "semaphores",
    params(("key" = String, Path, description = "the key"), ("X-Dflockd-Session" = String, Header, description = "the session")),
    request_body = EnqueueSemaphore,
    responses(
        (status = 200, description = "`acquired` with the grant, or `queued`", body = Granted),
        (status = 400, description = "bad key or body", body = ErrorBody),
        (status = 409, description = "`already_enqueued`, `limit_mismatch`", body = ErrorBody),
        (status = 410, description = "`session_gone`", body = ErrorBody),
        (status = 503, description = "`max_locks`, `max_waiters`, `draining`, `not_leader`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn enqueue_semaphore(
    State(api): Api,
    Path(key): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<EnqueueSemaphore>,
) -> Result<Json<Granted>, ApiError> {
    let kind = Kind::Semaphore(limit(body.limit)?);
    let lease = lease(body.lease_ttl_s)?;
    enqueue(&api, &headers, &key, kind, lease).await
}

async fn wait(
    api: &ApiState,
    headers: &HeaderMap,
    key: &str,
    namespace: Namespace,
    body: Wait,
) -> Result<Json<Granted>, ApiError> {
    let key = key_of(key)?;
    let timeout = seconds("timeout_s", body.timeout_s)?;
    let session = api.session(headers)?;
    let request = Request::Wait {
        key,
        namespace,
        timeout,
    };
    let reply = api.call(&session, Command::Wait, request, 0).await?;
    Granted::from_reply(reply, "wait").map(Json)
}

/// Waits for the grant of an enqueued place (two-phase, phase 2).
#[utoipa::path(post, path = "/v1/locks/{key}/wait", tag = "locks",
    params(("key" = String, Path, description = "the key"), ("X-Dflockd-Session" = String, Header, description = "the session")),
    request_body = Wait,
    responses(
        (status = 200, description = "`ok` with the grant, or `timeout` (the place is given up)", body = Granted),
        (status = 400, description = "bad key or body", body = ErrorBody),
        (status = 409, description = "`not_enqueued`, `lease_expired`", body = ErrorBody),
        (status = 410, description = "`session_gone`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn wait_lock(
    State(api): Api,
    Path(key): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Wait>,
) -> Result<Json<Granted>, ApiError> {
    wait(&api, &headers, &key, Namespace::Lock, body).await
}

/// Waits for the grant of an enqueued semaphore place.
#[utoipa::path(post, path = "/v1/semaphores/{key}/wait", tag = "semaphores",
    params(("key" = String, Path, description = "the key"), ("X-Dflockd-Session" = String, Header, description = "the session")),
    request_body = Wait,
    responses(
        (status = 200, description = "`ok` with the grant, or `timeout`", body = Granted),
        (status = 400, description = "bad key or body", body = ErrorBody),
        (status = 409, description = "`not_enqueued`, `lease_expired`", body = ErrorBody),
        (status = 410, description = "`session_gone`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn wait_semaphore(
    State(api): Api,
    Path(key): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Wait>,
) -> Result<Json<Granted>, ApiError> {
    wait(&api, &headers, &key, Namespace::Semaphore, body).await
}

/// The process is up.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "up", body = Health)))]
pub(crate) async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Whether the server takes requests: 503 `draining` while it shuts down.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "ready", body = Health),
        (status = 503, description = "draining", body = Health),
    ))]
pub(crate) async fn ready(State(api): Api) -> Response {
    if api.shared.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health { status: "draining" }),
        )
            .into_response()
    } else {
        Json(Health { status: "ready" }).into_response()
    }
}

/// The `stats` document (spec §5), with each held lock's fence and label.
#[utoipa::path(get, path = "/v1/stats", tag = "operations",
    responses((status = 200, description = "the stats document", content_type = "application/json", body = Object)),
    security(("bearer" = [])))]
pub(crate) async fn stats(State(api): Api) -> Response {
    Json(api.stats()).into_response()
}

/// What the dashboard shows: the stats document (with each lock's fence
/// as a decimal string, exact in JavaScript), each key's queue in FIFO
/// order (by connection id), and the session count.
#[utoipa::path(get, path = "/v1/overview", tag = "operations",
    responses((status = 200, description = "the overview", content_type = "application/json", body = Object)),
    security(("bearer" = [])))]
pub(crate) async fn overview(State(api): Api) -> Response {
    Json(api.overview()).into_response()
}

/// Prometheus metrics (text format 0.0.4); the families are documented in
/// docs/OPERATIONS.md.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "metrics", content_type = "text/plain", body = String)),
    security(("bearer" = [])))]
pub(crate) async fn metrics(State(api): Api) -> Response {
    super::metrics_response(&api.shared, api.replica.as_deref())
}

/// A server-sent-events stream of what the lock table does: `grant`,
/// `release`, `expire`, `enqueue`, `disconnect`. Each `data` is a JSON
/// object (`type`, `key`, `namespace`, `fence`, `conn`, `session`,
/// `lease_s`, `at_ms`). A subscriber that falls 4,096 events behind is
/// dropped (its stream ends; reconnect and reload `/v1/overview`).
#[utoipa::path(get, path = "/v1/events", tag = "operations",
    params(EventsQuery),
    responses((status = 200, description = "the event stream", content_type = "text/event-stream", body = String)),
    security(("bearer" = [])))]
pub(crate) async fn events(
    State(api): Api,
    Query(query): Query<EventsQuery>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut subscription = api.shared.telemetry.events.subscribe();
    let stop = api.stop.clone();
    let prefix = query.prefix.unwrap_or_default();
    let stream = async_stream(move |tx| async move {
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                event = subscription.rx.recv() => event,
            };
            let event = match event {
                Ok(event) => event,
                Err(RecvError::Lagged(_)) => {
                    api.shared
                        .telemetry
                        .metrics
                        .events_dropped_subscribers
                        .inc();
                    return;
                }
                Err(RecvError::Closed) => return,
            };
            if !prefix.is_empty()
                && !event
                    .key
                    .as_deref()
                    .is_some_and(|key| key.starts_with(&prefix))
            {
                continue;
            }
            let sent = Sent {
                session: event.conn.and_then(|conn| api.sessions.id_of_conn(conn)),
                event: &event,
            };
            // Serialising plain strings and numbers cannot fail.
            let Ok(data) = serde_json::to_string(&sent) else {
                continue;
            };
            let message = SseEvent::default().event(event.kind.name()).data(data);
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// An event as a subscriber gets it: with the holder's HTTP session, if
/// it has one.
#[derive(Serialize)]
struct Sent<'a> {
    #[serde(flatten)]
    event: &'a crate::events::Event,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<String>,
}

/// A stream fed by a task: `f` gets the sending end of a small channel.
fn async_stream<T: Send + 'static, F>(
    f: impl FnOnce(tokio::sync::mpsc::Sender<T>) -> F,
) -> impl Stream<Item = T>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let task = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(f(tx)));
    futures_util::stream::unfold((rx, task), |(mut rx, task)| async move {
        rx.recv().await.map(|item| (item, (rx, task)))
    })
}

/// The live dashboard: one page, no external assets.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "the dashboard", content_type = "text/html", body = String)))]
pub(crate) async fn dashboard() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Html(include_str!("dashboard.html")),
    )
}
