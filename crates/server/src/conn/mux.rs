//! A connection in multiplexed mode (docs/protocol-mux.md): requests carry
//! ids, waiting requests do not block the connection, and each reply names
//! the request it answers.
//!
//! One task still owns the connection. Waiting requests are entries in a
//! map; their grants arrive on one channel (tagged with the request id) and
//! their timeouts come from one `DelayQueue`, so 10,000 waiters cost a map
//! entry and a timer slot each, not a task.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use dflockd_core::{Grant, ResourceId};
use dflockd_proto::{Decoded, MuxBody, MuxError, MuxRequest, Reply, Status, encode_mux_reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::time::{DelayQueue, delay_queue};

use super::{Close, Connection, Pending, Step, observe};
use crate::config::IdlePolicy;
use crate::shared::{MuxGrant, Notify, Shared};

/// Longest span one `DelayQueue` entry may cover (its wheel reaches about
/// two years; v2 timeouts reach 292 years). A longer timeout is re-armed
/// when its capped entry fires.
const MAX_TIMER: Duration = Duration::from_secs(365 * 24 * 3600);

/// One request waiting for a grant.
struct Waiting {
    rid: ResourceId,
    pending: Pending,
    /// When its timeout really ends.
    deadline: Instant,
    /// Its timeout in the delay queue; `None` when no timer is pending (it
    /// fired, or the request was cancelled or drained, while its grant was
    /// already on its way).
    expiry: Option<delay_queue::Key>,
}

/// The multiplexing state of one connection. Dropping it (however the
/// connection ends) releases grants that reached the connection but not its
/// peer, so none is leaked, even with auto-release off.
struct Mux {
    shared: Arc<Shared>,
    waiting: HashMap<u64, Waiting>,
    expiries: DelayQueue<u64>,
    grants: mpsc::UnboundedReceiver<MuxGrant>,
    grants_tx: mpsc::UnboundedSender<MuxGrant>,
    /// Set once the drain has answered the waiting requests.
    drained: bool,
}

impl Drop for Mux {
    fn drop(&mut self) {
        self.grants.close();
        while let Ok((_, rid, grant)) = self.grants.try_recv() {
            self.shared.release_undelivered(&rid, grant.token);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Serves the rest of the connection in mux mode. On the way out, grants
    /// that reached the connection but not its peer are released, so none
    /// is leaked (even with auto-release off).
    pub(super) async fn run_mux(&mut self) -> Result<(), Close> {
        let (grants_tx, grants) = mpsc::unbounded_channel();
        let mut mux = Mux {
            shared: Arc::clone(&self.shared),
            waiting: HashMap::new(),
            expiries: DelayQueue::new(),
            grants,
            grants_tx,
            drained: false,
        };
        self.mux_loop(&mut mux).await
    }

    async fn mux_loop(&mut self, mux: &mut Mux) -> Result<(), Close> {
        self.watch.restart(self.decoder.lines_completed());
        loop {
            // Serve every complete frame already buffered, then write the
            // replies in one go.
            loop {
                let (used, decoded) = self.decoder.decode(&self.buf[self.pos..]);
                self.pos += used;
                match decoded {
                    Decoded::Frame(frame) => {
                        let parsed = MuxRequest::parse(&frame);
                        if let Err(close) = self.mux_frame(mux, parsed) {
                            let _ = self.flush().await;
                            return Err(close);
                        }
                    }
                    Decoded::Oversize => {
                        self.out.extend_from_slice(b"error\n");
                        let _ = self.flush().await;
                        return Err(Close::Protocol);
                    }
                    Decoded::NeedMore => break,
                }
            }
            self.buf.clear();
            self.pos = 0;
            self.flush().await?;
            // As on a plain connection, no read deadline runs while a
            // request waits; a frame once started must complete in time.
            let bounded = (self.shared.config.idle == IdlePolicy::ReadTimeout
                && mux.waiting.is_empty())
                || self.decoder.in_frame();
            self.watch.arm(self.decoder.lines_completed(), bounded);
            tokio::select! {
                biased;
                Some((id, rid, grant)) = mux.grants.recv() => {
                    self.mux_granted(mux, id, &rid, grant);
                    // Idle time restarts; a frame once started keeps its deadline.
                    if !self.decoder.in_frame() {
                        self.watch.restart(self.decoder.lines_completed());
                    }
                }
                Some(expired) = poll_fn(|cx| mux.expiries.poll_expired(cx)) => {
                    self.mux_expired(mux, expired.into_inner());
                    if !self.decoder.in_frame() {
                        self.watch.restart(self.decoder.lines_completed());
                    }
                }
                _ = self.shared.drain.cancelled(), if !mux.drained => {
                    self.mux_drain(mux);
                }
                read = self.stream.read_buf(&mut self.buf) => match read {
                    Ok(0) | Err(_) => return Err(Close::Gone),
                    Ok(_) => {}
                },
                _ = poll_fn(|cx| self.watch.poll_flagged(cx)), if bounded => {
                    if self.watch.overdue() {
                        self.out.extend_from_slice(b"error\n");
                        let _ = self.flush().await;
                        return Err(Close::Protocol);
                    }
                }
            }
        }
    }

    /// Serves one mux frame. Errors close the connection: a frame without
    /// an id (its reply could not be addressed), a duplicate id of a waiting
    /// request, or a request after the drain started.
    fn mux_frame(
        &mut self,
        mux: &mut Mux,
        parsed: Result<MuxRequest, MuxError>,
    ) -> Result<(), Close> {
        let request = match parsed {
            Ok(request) => request,
            Err(MuxError::NoId) => {
                tracing::debug!("mux frame without an id");
                self.out.extend_from_slice(b"error\n");
                return Err(Close::Protocol);
            }
            Err(MuxError::Invalid { id, error }) => {
                tracing::debug!(id, code = error.code(), %error, "rejected mux request");
                encode_mux_reply(id, &Reply::Failure(Status::Error), &mut self.out);
                // Reusing the id of a waiting request is a broken client.
                return if mux.waiting.contains_key(&id) {
                    Err(Close::Protocol)
                } else {
                    Ok(())
                };
            }
        };
        let id = request.id;
        if self.shared.is_draining() {
            encode_mux_reply(id, &Reply::Failure(Status::ErrorDraining), &mut self.out);
            return Err(Close::Protocol);
        }
        if mux.waiting.contains_key(&id) {
            tracing::debug!(id, "duplicate id of a waiting request");
            encode_mux_reply(id, &Reply::Failure(Status::Error), &mut self.out);
            return Err(Close::Protocol);
        }
        let (body, ticket) = match request.body {
            MuxBody::Cancel(target) => {
                self.mux_cancel(mux, target);
                encode_mux_reply(id, &Reply::Ok, &mut self.out);
                return Ok(());
            }
            MuxBody::Request(body) => (body, request.ticket),
        };
        // The cap counts what the connection has queued in the table —
        // blocking waits and two-phase places alike.
        let cap = Some(self.shared.config.mux_max_waiting).filter(|&cap| cap > 0);
        let to = mux.grants_tx.clone();
        match self.apply(body, id, ticket, cap, || Notify::Mux { id, to }) {
            Step::Reply(reply) => encode_mux_reply(id, &reply, &mut self.out),
            Step::Waiting {
                rid,
                pending,
                timeout,
            } => {
                let timeout = timeout.as_duration();
                let expiry = mux.expiries.insert(id, timeout.min(MAX_TIMER));
                mux.waiting.insert(
                    id,
                    Waiting {
                        rid,
                        pending,
                        deadline: Instant::now() + timeout,
                        expiry: Some(expiry),
                    },
                );
            }
        }
        Ok(())
    }

    /// A waiting request was granted: its lease restarts now, when the
    /// connection observes the grant (as on a plain connection).
    fn mux_granted(&mut self, mux: &mut Mux, id: u64, rid: &ResourceId, grant: Grant) {
        let Some(waiting) = mux.waiting.remove(&id) else {
            // Not expected (an entry leaves the map only when its grant is
            // read here, or when it was withdrawn and no grant comes), but
            // never leave a grant without an owner.
            tracing::warn!(id, "grant for a request that is not waiting: released");
            self.shared.release_undelivered(rid, grant.token);
            return;
        };
        if let Some(key) = waiting.expiry {
            mux.expiries.remove(&key);
        }
        let reply = observe(&self.shared, &waiting.rid, grant);
        encode_mux_reply(id, &reply, &mut self.out);
    }

    /// A waiting request's timeout fired: withdraw it and answer `timeout`,
    /// unless its grant won the race (then the grant is answered instead).
    fn mux_expired(&mut self, mux: &mut Mux, id: u64) {
        if let Some(waiting) = mux.waiting.get_mut(&id) {
            waiting.expiry = None;
            let left = waiting.deadline.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                // A capped entry of a longer timeout: wait for the rest.
                waiting.expiry = Some(mux.expiries.insert(id, left.min(MAX_TIMER)));
                return;
            }
        }
        self.mux_withdraw(mux, id, Reply::Failure(Status::Timeout));
    }

    /// `cancel`: withdraw the target as if its timeout had passed. Unknown
    /// or finished targets are ignored.
    fn mux_cancel(&mut self, mux: &mut Mux, target: u64) {
        if let Some(key) = mux.waiting.get_mut(&target).and_then(|w| w.expiry.take()) {
            mux.expiries.remove(&key);
        }
        self.mux_withdraw(mux, target, Reply::Failure(Status::Timeout));
    }

    /// The drain started: every waiting request is answered `error`, as a
    /// blocked request on a plain connection is.
    fn mux_drain(&mut self, mux: &mut Mux) {
        mux.drained = true;
        let ids: Vec<u64> = mux.waiting.keys().copied().collect();
        for id in ids {
            if let Some(key) = mux.waiting.get_mut(&id).and_then(|w| w.expiry.take()) {
                mux.expiries.remove(&key);
            }
            self.mux_withdraw(mux, id, Reply::Failure(Status::Error));
        }
    }

    /// Withdraws waiting request `id` and answers it with `reply`. If it was
    /// granted meanwhile, the grant is already in the channel (the table
    /// delivers under its lock): it is answered now, so the grant's reply
    /// comes before whatever caused the withdrawal is answered.
    fn mux_withdraw(&mut self, mux: &mut Mux, id: u64, reply: Reply) {
        let Some(waiting) = mux.waiting.get(&id) else {
            return;
        };
        if waiting
            .pending
            .withdraw(&self.shared, self.id, id, &waiting.rid)
        {
            mux.waiting.remove(&id);
            encode_mux_reply(id, &reply, &mut self.out);
            return;
        }
        while let Ok((granted, rid, grant)) = mux.grants.try_recv() {
            self.mux_granted(mux, granted, &rid, grant);
        }
    }
}
