//! HTTP error responses: `{"error": "<code>", "detail": "…"}` with the
//! status and code of spec §9, and the mapping from protocol replies.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use dflockd_proto::{Reply, Status};
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// Machine-readable code (stable): `bad_request`, `unauthorized`,
    /// `not_found`, `not_held`, `method_not_allowed`, `body_too_large`,
    /// `limit_mismatch`, `already_enqueued`, `not_enqueued`,
    /// `lease_expired`, `session_gone`, `rate_limited`, `max_locks`,
    /// `max_waiters`, `max_sessions`, `max_sessions_per_ip`, `draining`,
    /// `not_leader`, `fence_persistence`, `cluster_disabled`, `admin_disabled`,
    /// `admin_unauthorized`, `add_voter_failed`, `remove_voter_failed`,
    /// `internal`.
    pub(crate) error: &'static str,
    /// What went wrong, for people.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) detail: String,
}

/// An error response.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) detail: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            detail: detail.into(),
        }
    }

    pub(crate) fn bad_request(detail: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    pub(crate) fn session_gone() -> Self {
        ApiError::new(
            StatusCode::GONE,
            "session_gone",
            "the session is unknown, closed or expired; open a new one",
        )
    }

    pub(crate) fn draining() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the server is shutting down",
        )
    }

    pub(crate) fn unauthorized() -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        )
    }

    /// A failure reply of the lock table to `op` (e.g. `release`).
    pub(crate) fn from_reply(reply: &Reply, op: &str) -> Self {
        let conflict = |code| ApiError::new(StatusCode::CONFLICT, code, op.to_owned());
        let unavailable =
            |code| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, op.to_owned());
        match reply {
            Reply::NotLeader(leader) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_leader",
                match leader {
                    Some(addr) => {
                        format!("this node does not lead; the leader's client address is {addr}")
                    }
                    None => "this node does not lead and knows no leader yet".to_owned(),
                },
            ),
            Reply::Failure(status) => match status {
                Status::ErrorMaxLocks => unavailable("max_locks"),
                Status::ErrorMaxWaiters => unavailable("max_waiters"),
                Status::ErrorDraining => ApiError::draining(),
                Status::ErrorNotLeader => unavailable("not_leader"),
                Status::ErrorLimitMismatch => conflict("limit_mismatch"),
                Status::ErrorAlreadyEnqueued => conflict("already_enqueued"),
                Status::ErrorNotEnqueued => conflict("not_enqueued"),
                Status::ErrorLeaseExpired => conflict("lease_expired"),
                Status::ErrorAuth => ApiError::unauthorized(),
                // `error` to a request the HTTP layer validated: the token
                // is not (or no longer) held on that key.
                Status::Error | Status::Timeout => ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_held",
                    format!(
                        "{op}: the token does not hold this key (released, expired or never granted)"
                    ),
                ),
            },
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("{op}: unexpected reply {other:?}"),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code,
            detail: self.detail,
        };
        (self.status, Json(body)).into_response()
    }
}
