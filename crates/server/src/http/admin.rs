//! The cluster routes of spec §9: `GET /v1/readindex` (a linearizable
//! read point) and the membership changes under `/v1/admin/voters`,
//! guarded by their own secret (`X-Dflockd-Admin`, default-deny).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use dflockd_cluster::{ChangeRefused, Member};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::ApiState;
use super::api::JsonBody;
use super::error::{ApiError, ErrorBody};
use crate::cluster_config::is_host_port;
use crate::replica::Replica;

/// The header that carries the admin secret.
pub(crate) const ADMIN_HEADER: &str = "x-dflockd-admin";

type Api = State<Arc<ApiState>>;

/// `POST /v1/admin/voters` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddVoter {
    /// The new node's id (1–65535), as a number or a decimal string.
    #[schema(value_type = String)]
    node_id: Option<serde_json::Value>,
    /// Its Raft address, `host:port`.
    raft_addr: Option<String>,
    /// Its client address, `host:port` (named in redirects).
    client_addr: Option<String>,
}

/// A membership change done.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VoterChanged {
    /// `ok`.
    status: &'static str,
    /// The node added or removed.
    node_id: String,
}

/// `GET /v1/readindex` answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReadIndex {
    /// `ok`: everything committed before the call is applied here.
    status: &'static str,
}

fn cluster(api: &ApiState) -> Result<&Replica, ApiError> {
    api.replica.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "cluster_disabled",
            "this server is not in cluster mode",
        )
    })
}

fn not_leader(replica: &Replica, leader: Option<u64>) -> ApiError {
    let reply = dflockd_proto::Reply::NotLeader(replica.client_addr(leader));
    ApiError::from_reply(&reply, "cluster")
}

/// Admin authority: no secret configured → `503 admin_disabled`; a
/// missing or wrong `X-Dflockd-Admin` → `401 admin_unauthorized` after
/// 100 ms.
async fn check_admin(api: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(secret) = &api.config.admin_token else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "admin_disabled",
            "the admin routes need --admin-token",
        ));
    };
    let given = headers.get(ADMIN_HEADER).map(|v| v.as_bytes());
    let authorised = given.is_some_and(|given| {
        !given.is_empty() && bool::from(given.ct_eq(secret.expose().as_bytes()))
    });
    if authorised {
        return Ok(());
    }
    tracing::warn!("HTTP admin authentication failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "admin_unauthorized",
        "missing or wrong X-Dflockd-Admin",
    ))
}

fn changed(
    replica: &Replica,
    result: Result<(), ChangeRefused>,
    id: u64,
    failure: &'static str,
) -> Result<Json<VoterChanged>, ApiError> {
    match result {
        Ok(()) => Ok(Json(VoterChanged {
            status: "ok",
            node_id: id.to_string(),
        })),
        Err(ChangeRefused::NotLeader { leader }) => {
            Err(not_leader(replica, leader.map(|(id, _)| id)))
        }
        Err(ChangeRefused::Failed(reason)) => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, failure, reason))
        }
    }
}

fn node_id(value: &serde_json::Value) -> Option<u64> {
    let id = match value {
        serde_json::Value::Number(n) => n.as_u64()?,
        serde_json::Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    (1..=u64::from(u16::MAX)).contains(&id).then_some(id)
}

/// Waits until everything committed before the call is applied on this
/// node, which must lead (a linearizable read point).
#[utoipa::path(get, path = "/v1/readindex", tag = "cluster",
    responses(
        (status = 200, description = "applied up to the read point", body = ReadIndex),
        (status = 404, description = "`cluster_disabled`", body = ErrorBody),
        (status = 503, description = "`not_leader`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn read_index(State(api): Api) -> Result<Json<ReadIndex>, ApiError> {
    let replica = cluster(&api)?;
    match replica.node().raft().ensure_linearizable().await {
        Ok(_) => Ok(Json(ReadIndex { status: "ok" })),
        Err(error) => {
            let leader = error
                .forward_to_leader()
                .and_then(|forward| forward.leader_id);
            Err(not_leader(replica, leader))
        }
    }
}

/// Adds a voter (it catches up as a learner first). On the leader only.
#[utoipa::path(post, path = "/v1/admin/voters", tag = "cluster",
    request_body = AddVoter,
    params(("X-Dflockd-Admin" = String, Header, description = "the admin secret")),
    responses(
        (status = 200, description = "added", body = VoterChanged),
        (status = 400, description = "`bad_request`, `add_voter_failed`", body = ErrorBody),
        (status = 401, description = "`admin_unauthorized`", body = ErrorBody),
        (status = 404, description = "`cluster_disabled`", body = ErrorBody),
        (status = 503, description = "`admin_disabled`, `not_leader`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn add_voter(
    State(api): Api,
    headers: HeaderMap,
    JsonBody(body): JsonBody<AddVoter>,
) -> Result<Json<VoterChanged>, ApiError> {
    check_admin(&api, &headers).await?;
    let replica = cluster(&api)?;
    let id = body
        .node_id
        .as_ref()
        .and_then(node_id)
        .ok_or_else(|| ApiError::bad_request("node_id: 1-65535 is required"))?;
    let (Some(raft), Some(client)) = (body.raft_addr, body.client_addr) else {
        return Err(ApiError::bad_request(
            "node_id, raft_addr and client_addr are all required",
        ));
    };
    if !is_host_port(&raft) || !is_host_port(&client) {
        return Err(ApiError::bad_request(
            "raft_addr and client_addr must be host:port",
        ));
    }
    tracing::info!(node = id, raft = %raft, "admin: adding a voter");
    let result = replica
        .node()
        .add_voter(id, Member::new(raft, client))
        .await;
    changed(replica, result, id, "add_voter_failed")
}

/// Removes a voter. On the leader only.
#[utoipa::path(delete, path = "/v1/admin/voters/{id}", tag = "cluster",
    params(("id" = String, Path, description = "the node id"), ("X-Dflockd-Admin" = String, Header, description = "the admin secret")),
    responses(
        (status = 200, description = "removed", body = VoterChanged),
        (status = 400, description = "`bad_request`, `remove_voter_failed`", body = ErrorBody),
        (status = 401, description = "`admin_unauthorized`", body = ErrorBody),
        (status = 404, description = "`cluster_disabled`", body = ErrorBody),
        (status = 503, description = "`admin_disabled`, `not_leader`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn remove_voter(
    State(api): Api,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<VoterChanged>, ApiError> {
    check_admin(&api, &headers).await?;
    let replica = cluster(&api)?;
    let id = node_id(&serde_json::Value::String(id))
        .ok_or_else(|| ApiError::bad_request("node id: 1-65535"))?;
    tracing::info!(node = id, "admin: removing a voter");
    let result = replica.node().remove_voter(id).await;
    changed(replica, result, id, "remove_voter_failed")
}
