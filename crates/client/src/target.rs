//! What a lock or semaphore handle targets (key, kind, server, lease and
//! wait settings) and the operations every handle shares: acquire,
//! enqueue, and turning a transport's grant into a tracked `Lease`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dflockd_proto::{Key, Kind, Namespace, Request};
use kameo::prelude::*;
use tokio::time::Instant;

use crate::connection::{lease_of, seconds};
use crate::inner::ClientInner;
use crate::lease::Lease;
use crate::lease_state::{LeaseLost, LeaseShared};
use crate::renewal::LeaseId;
use crate::supervisor::{RenewPolicy, Track};
use crate::transport::{Grant, Transport};
use crate::{Error, Result};

/// What a lock or semaphore handle targets.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) inner: Arc<ClientInner>,
    pub(crate) server: usize,
    pub(crate) key: Key,
    pub(crate) kind: Kind,
    pub(crate) lease: Option<Duration>,
    pub(crate) timeout: Duration,
    pub(crate) owner: Option<Recipient<LeaseLost>>,
}

impl Target {
    pub(crate) fn inner(&self) -> &ClientInner {
        &self.inner
    }

    /// Names this handle's key and server in `error`.
    pub(crate) fn about(&self, error: Error) -> Error {
        error.about(&self.key, &self.inner().servers[self.server].label)
    }

    /// The resource a grant for this handle holds (a grant nobody owns any
    /// more is released by it).
    pub(crate) fn resource(&self) -> (Key, Namespace) {
        (self.key.clone(), self.kind.namespace())
    }

    pub(crate) fn lease(&self) -> Result<Option<dflockd_proto::Lease>> {
        lease_of(self.lease)
    }

    /// Acquires, waiting up to `timeout` in the key's queue; `None` if it
    /// stayed busy.
    pub(crate) async fn acquire_within(&self, timeout: Duration) -> Result<Option<Lease>> {
        let wait = seconds(timeout)?;
        let lease = self.lease()?;
        let acquire = |timeout| Request::Acquire {
            key: self.key.clone(),
            kind: self.kind,
            timeout,
            lease,
        };
        let transport = Transport::open(self.inner(), self.server).await?;
        let grant = transport.acquire(acquire, wait, self.resource()).await?;
        Ok(grant.map(|grant| self.track(grant)))
    }

    /// Makes a grant a `Lease` and hands it to the supervisor.
    pub(crate) fn track(&self, grant: Grant) -> Lease {
        let Grant {
            granted,
            sent_at,
            lane,
            own_lane: wait_lane,
            renew_now,
        } = grant;
        let inner = self.inner();
        // A cluster session's own lane; a plain server's wait lanes carry
        // no session name.
        let reattach = wait_lane.is_none() && inner.servers[self.server].is_cluster;
        let id = LeaseId(inner.next_lease.fetch_add(1, Ordering::Relaxed));
        let ttl = granted.lease.as_duration();
        // The latest instant the lease is known valid, minus the safety
        // margin: counted from the request's send time — or, for a grant
        // that waited in a queue (its send time may be long past), from its
        // arrival until the immediate renew counts from that renew's send
        // time. The supervisor uses the same instant, so `deadline()` never
        // moves backwards.
        let start = if renew_now { Instant::now() } else { sent_at };
        let local_expiry = start + ttl.saturating_sub(RenewPolicy::margin(ttl));
        let shared = Arc::new(LeaseShared::new(local_expiry, ttl));
        // The guard exists before anything can fail or be cancelled, so its
        // Drop releases the grant in every case.
        let lease = Lease::new(
            id,
            self.server,
            self.key.clone(),
            self.kind,
            granted.token,
            Arc::clone(&shared),
            wait_lane,
            Arc::clone(&self.inner),
        );
        let track = Track {
            id,
            server: self.server,
            key: self.key.clone(),
            namespace: self.kind.namespace(),
            token: granted.token,
            requested: self.lease,
            ttl,
            sent_at,
            local_expiry,
            lane: lane.id,
            lane_closed: lane.closed.clone(),
            reattach,
            renew_now,
            shared: Arc::clone(&shared),
            owner: self.owner.clone(),
        };
        if inner.supervisor.tell(track).try_send().is_err() {
            shared.mark_lost(crate::LossReason::ClientStopped);
        }
        lease
    }
}
