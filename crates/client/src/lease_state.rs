//! What a lease's guard and the lease supervisor share, and how a loss is
//! described: below the supervisor, which marks leases lost, and the
//! `Lease` guard, which reports it.

use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use dflockd_proto::Token;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why a lease was lost.
///
/// ```no_run
/// # async fn demo(lease: dflockd_client::Lease) {
/// use dflockd_client::LossReason;
/// lease.lost().await;
/// match lease.loss_reason() {
///     Some(LossReason::Refused) => eprintln!("someone else holds it now"),
///     Some(LossReason::ConnectionLost | LossReason::Expired) => eprintln!("could not renew in time"),
///     _ => {}
/// }
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossReason {
    /// The server refused a renewal (`error`): the lease had expired or was
    /// released by someone else.
    Refused,
    /// The connection the lease was granted on closed; with the server's
    /// default auto-release-on-disconnect the lease is already free.
    ConnectionLost,
    /// Renewals kept failing until the local expiry passed.
    Expired,
    /// The client stopped renewing (it was shut down).
    ClientStopped,
}

/// The message a worker actor receives when one of its leases is lost.
///
/// ```
/// use dflockd_client::{LeaseLost, LossReason};
/// fn on_loss(lost: &LeaseLost) -> bool { lost.reason == LossReason::Refused }
/// ```
#[derive(Debug, Clone)]
pub struct LeaseLost {
    /// The key.
    pub key: String,
    /// The lost grant's token.
    pub token: Token,
    /// Its fence.
    pub fence: u64,
    /// Why it was lost.
    pub reason: LossReason,
}

/// State shared between a guard and the lease supervisor.
///
/// The cancellation token is made on first use: most leases never have
/// anyone waiting on it, and a token costs more memory than the rest of the
/// lease (a client holding 100 000 leases saves about 11 MB).
#[derive(Debug)]
pub(crate) struct LeaseShared {
    is_lost: AtomicBool,
    lost: OnceLock<CancellationToken>,
    reason: OnceLock<LossReason>,
    timing: Mutex<(Instant, Duration)>,
}

impl LeaseShared {
    pub(crate) fn new(deadline: Instant, ttl: Duration) -> LeaseShared {
        LeaseShared {
            is_lost: AtomicBool::new(false),
            lost: OnceLock::new(),
            reason: OnceLock::new(),
            timing: Mutex::new((deadline, ttl)),
        }
    }

    pub(crate) fn mark_lost(&self, reason: LossReason) {
        let _ = self.reason.set(reason);
        self.is_lost.store(true, Ordering::SeqCst);
        // Pairs with the fence in `lost_token`: either the token made there
        // is seen here, or the flag set here is seen there.
        fence(Ordering::SeqCst);
        if let Some(token) = self.lost.get() {
            token.cancel();
        }
    }

    /// Why the lease was lost, once it was.
    pub(crate) fn reason(&self) -> Option<LossReason> {
        self.reason.get().copied()
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.is_lost.load(Ordering::SeqCst)
    }

    /// The token cancelled on loss, made on first use (cancelled at once if
    /// the lease is already lost).
    pub(crate) fn lost_token(&self) -> &CancellationToken {
        let token = self.lost.get_or_init(CancellationToken::new);
        fence(Ordering::SeqCst);
        if self.is_lost.load(Ordering::SeqCst) {
            token.cancel();
        }
        token
    }

    pub(crate) fn set_deadline(&self, deadline: Instant, ttl: Duration) {
        *self.timing.lock().unwrap_or_else(PoisonError::into_inner) = (deadline, ttl);
    }

    pub(crate) fn timing(&self) -> (Instant, Duration) {
        *self.timing.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
