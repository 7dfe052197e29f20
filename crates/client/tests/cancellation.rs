//! Cancellation: dropping an acquire, enqueue or wait future at any point —
//! or a `Ticket`, or a `Lease` — never leaves a grant held or a waiter
//! queued.
//!
//! Each scenario drops the future after a range of delays (0 ms … 300 ms,
//! denser at the start where the request is still on the control lane or
//! connecting), on keys of its own, concurrently. After each drop: the
//! server's stats show no waiter for the key, and once the holder lets go
//! a try-lock from another client succeeds within 3 s — far less than the
//! 33 s default lease a leaked grant would keep.
//!
//! Every scenario runs twice: against the shared server (embedded or
//! external, auto-release-on-disconnect on: closing a connection frees what
//! it held) and — embedded-only — against a server with
//! `auto_release_on_disconnect: false`, where the client must release a
//! grant that raced the cancellation explicitly.

use dflockd_testkit::client as support;

use std::future::Future;
use std::time::Duration;

use dflockd_client::{Client, Enqueue, Lease};
use dflockd_server::ServerConfig;
use support::queued_ticket;
use support::{Keys, TestServer, eventually, lock_becomes_free, no_waiters, waiters};

/// Delays after which the future is dropped.
const DELAYS_MS: &[u64] = &[
    0, 1, 2, 3, 5, 8, 12, 17, 25, 35, 50, 70, 100, 130, 160, 200, 250, 300,
];
/// In the race scenarios, the holder releases this long after the future
/// starts, so the drops land before, around and after the grant.
const RELEASE_AT: Duration = Duration::from_millis(100);
/// A leaked grant would stay 33 s (default lease); a correct client frees the
/// key at once.
const FREE_WITHIN: Duration = Duration::from_secs(3);

async fn auto_release_on() -> TestServer {
    TestServer::start().await
}

async fn auto_release_off(test: &str) -> TestServer {
    support::embedded_only(test, "needs auto_release_on_disconnect: false");
    let mut config = ServerConfig::ephemeral();
    config.auto_release_on_disconnect = false;
    TestServer::embedded(config).await
}

/// Four tests of `scenario`, in each transport mode (mux, plain):
/// `<name>::auto_release_on_<mode>` against the shared server (embedded or
/// external), and — embedded-only — `<name>::auto_release_off_<mode>`
/// against a server with `auto_release_on_disconnect: false`.
macro_rules! in_both_server_modes {
    ($name:ident, $scenario:ident) => {
        mod $name {
            use super::*;

            in_both_server_modes!(@one auto_release_on_mux, Mux, on, $name, $scenario);
            in_both_server_modes!(@one auto_release_on_plain, Plain, on, $name, $scenario);
            in_both_server_modes!(@one auto_release_off_mux, Mux, off, $name, $scenario);
            in_both_server_modes!(@one auto_release_off_plain, Plain, off, $name, $scenario);
        }
    };
    (@one $test:ident, $mode:ident, on, $name:ident, $scenario:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            support::Mode::$mode.enter();
            $scenario(super::auto_release_on().await).await;
        }
    };
    (@one $test:ident, $mode:ident, off, $name:ident, $scenario:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            support::Mode::$mode.enter();
            let test = concat!(stringify!($name), "::", stringify!($test));
            $scenario(super::auto_release_off(test).await).await;
        }
    };
}

/// Runs `scenario(key, delay)` for every delay, concurrently, each on a key
/// of its own.
async fn for_each_delay<F, Fut>(keys: &Keys, scenario: F)
where
    F: Fn(String, Duration) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<_> = DELAYS_MS
        .iter()
        .map(|&ms| tokio::spawn(scenario(keys.key(ms), Duration::from_millis(ms))))
        .collect();
    for task in tasks {
        task.await.expect("scenario");
    }
}

/// Holds `key` through `holder` and releases it after `after` (or never,
/// when `None`, until the returned handle is awaited).
async fn hold(holder: &Client, key: &str) -> Lease {
    holder.lock(key).unwrap().acquire().await.unwrap()
}

fn release_later(lease: Lease, after: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        lease.release().await.unwrap();
    })
}

/// Drops whatever the cancelled future may have produced and checks the key
/// ends up free with no waiter.
async fn settle(checker: &Client, key: &str) {
    no_waiters(checker, 0, key).await;
    lock_becomes_free(checker, key, FREE_WITHIN).await;
}

// ---------------------------------------------------------------------------
// acquire

async fn drop_acquire(server: TestServer) {
    let keys = Keys::new("drop-acquire");
    let holder = server.client();
    let waiter = server.client();

    // A free key: the try-lock on the control lane is granted, and the
    // future may be gone by the time the grant comes back.
    let free = {
        let (holder, waiter) = (holder.clone(), waiter.clone());
        move |key: String, delay: Duration| {
            let (holder, waiter) = (holder.clone(), waiter.clone());
            async move {
                let lock = waiter.lock(&key).unwrap();
                if delay.is_zero() {
                    // Polled exactly once — the try-lock is sent — then
                    // dropped before its grant can come back: the control
                    // lane must release the orphaned grant.
                    let mut acquire = Box::pin(lock.acquire());
                    let first = std::future::poll_fn(|cx| {
                        std::task::Poll::Ready(acquire.as_mut().poll(cx).is_pending())
                    })
                    .await;
                    assert!(first, "{key}: granted without waiting for the server");
                    drop(acquire);
                } else {
                    drop(tokio::time::timeout(delay, lock.acquire()).await);
                }
                settle(&holder, &key).await;
            }
        }
    };
    for_each_delay(&Keys::new("drop-acquire-free"), free).await;

    // The key stays held while the acquire is dropped: pure withdrawal.
    let blocked = {
        let (holder, waiter) = (holder.clone(), waiter.clone());
        move |key: String, delay: Duration| {
            let (holder, waiter) = (holder.clone(), waiter.clone());
            async move {
                let held = hold(&holder, &key).await;
                let lock = waiter.lock(&key).unwrap();
                let result =
                    tokio::time::timeout(delay, lock.acquire_within(Duration::from_secs(20))).await;
                assert!(result.is_err(), "{key}: acquired a held lock: {result:?}");
                no_waiters(&holder, 0, &key).await;
                held.release().await.unwrap();
                settle(&holder, &key).await;
            }
        }
    };
    for_each_delay(&keys, blocked).await;

    // The holder lets go while the acquire runs: the drop races the grant.
    let keys = Keys::new("drop-acquire-race");
    let racing = move |key: String, delay: Duration| {
        let (holder, waiter) = (holder.clone(), waiter.clone());
        async move {
            let held = hold(&holder, &key).await;
            let releaser = release_later(held, RELEASE_AT);
            let lock = waiter.lock(&key).unwrap();
            let result =
                tokio::time::timeout(delay, lock.acquire_within(Duration::from_secs(20))).await;
            drop(result); // a lease that won the race is dropped too
            releaser.await.unwrap();
            settle(&holder, &key).await;
        }
    };
    for_each_delay(&keys, racing).await;
}

in_both_server_modes!(dropped_acquire_leaves_nothing, drop_acquire);

// ---------------------------------------------------------------------------
// Ticket::wait

async fn drop_wait(server: TestServer) {
    let holder = server.client();
    let waiter = server.client();

    let blocked = {
        let (holder, waiter) = (holder.clone(), waiter.clone());
        move |key: String, delay: Duration| {
            let (holder, waiter) = (holder.clone(), waiter.clone());
            async move {
                let held = hold(&holder, &key).await;
                let ticket = queued_ticket(&waiter, &key).await;
                let result =
                    tokio::time::timeout(delay, ticket.wait(Duration::from_secs(20))).await;
                assert!(result.is_err(), "{key}: granted a held lock: {result:?}");
                no_waiters(&holder, 0, &key).await;
                held.release().await.unwrap();
                settle(&holder, &key).await;
            }
        }
    };
    for_each_delay(&Keys::new("drop-wait"), blocked).await;

    let racing = move |key: String, delay: Duration| {
        let (holder, waiter) = (holder.clone(), waiter.clone());
        async move {
            let held = hold(&holder, &key).await;
            let ticket = queued_ticket(&waiter, &key).await;
            let releaser = release_later(held, RELEASE_AT);
            let result = tokio::time::timeout(delay, ticket.wait(Duration::from_secs(20))).await;
            drop(result);
            releaser.await.unwrap();
            settle(&holder, &key).await;
        }
    };
    for_each_delay(&Keys::new("drop-wait-race"), racing).await;
}

in_both_server_modes!(dropped_wait_leaves_nothing, drop_wait);

// ---------------------------------------------------------------------------
// enqueue

async fn drop_enqueue(server: TestServer) {
    let holder = server.client();
    let waiter = server.client();

    // On a free key: the enqueue is granted at once ("acquired") unless it
    // is dropped first.
    let free = {
        let (holder, waiter) = (holder.clone(), waiter.clone());
        move |key: String, delay: Duration| {
            let (holder, waiter) = (holder.clone(), waiter.clone());
            async move {
                let lock = waiter.lock(&key).unwrap();
                let result = tokio::time::timeout(delay, lock.enqueue()).await;
                drop(result);
                settle(&holder, &key).await;
            }
        }
    };
    for_each_delay(&Keys::new("drop-enqueue-free"), free).await;

    // On a held key whose holder lets go soon after: the enqueue queues, and
    // its place may be granted before the ticket (or the future) is dropped.
    let racing = move |key: String, delay: Duration| {
        let (holder, waiter) = (holder.clone(), waiter.clone());
        async move {
            let held = hold(&holder, &key).await;
            let releaser = release_later(held, delay / 2);
            let lock = waiter.lock(&key).unwrap();
            let result = tokio::time::timeout(delay, lock.enqueue()).await;
            releaser.await.unwrap();
            drop(result);
            settle(&holder, &key).await;
        }
    };
    for_each_delay(&Keys::new("drop-enqueue-race"), racing).await;
}

in_both_server_modes!(dropped_enqueue_leaves_nothing, drop_enqueue);

// ---------------------------------------------------------------------------
// Ticket and Lease guards

async fn drop_guards(server: TestServer) {
    let keys = Keys::new("drop-guards");
    let holder = server.client();
    let waiter = server.client();

    // A ticket dropped while still queued leaves the queue.
    let key = keys.key("ticket-queued");
    let held = hold(&holder, &key).await;
    let ticket = queued_ticket(&waiter, &key).await;
    drop(ticket);
    no_waiters(&holder, 0, &key).await;
    held.release().await.unwrap();
    settle(&holder, &key).await;

    // A ticket dropped after its place was granted (the holder released,
    // nobody called wait): the grant must not outlive the ticket.
    let key = keys.key("ticket-granted");
    let held = hold(&holder, &key).await;
    let ticket = queued_ticket(&waiter, &key).await;
    held.release().await.unwrap();
    // The server has promoted the ticket: the key is held, nobody waits.
    eventually("the ticket's place was granted", support::BOUND, || async {
        let stats = holder.stats(0).await.unwrap();
        stats
            .locks
            .iter()
            .any(|l| l.key == key && l.owner_conn_id != 0 && l.waiters == 0)
    })
    .await;
    drop(ticket);
    settle(&holder, &key).await;

    // An `Acquired` enqueue result dropped without looking at it.
    let key = keys.key("enqueue-acquired");
    let result = waiter.lock(&key).unwrap().enqueue().await.unwrap();
    assert!(matches!(result, Enqueue::Acquired(_)));
    drop(result);
    settle(&holder, &key).await;

    // Leases dropped without release: control lane and wait lane.
    let key = keys.key("lease-control");
    drop(waiter.lock(&key).unwrap().acquire().await.unwrap());
    settle(&holder, &key).await;
    let key = keys.key("lease-wait");
    let lease = support::contended_lease(&holder, &waiter, &key, Duration::from_secs(30)).await;
    drop(lease);
    settle(&holder, &key).await;

    // Many at once, dropped right after the grant.
    let keys = Keys::new("drop-many");
    let leases: Vec<Lease> = futures_join((0..20).map(|i| {
        let lock = waiter.lock(&keys.key(i)).unwrap();
        async move { lock.acquire().await.unwrap() }
    }))
    .await;
    drop(leases);
    for i in 0..20 {
        settle(&holder, &keys.key(i)).await;
    }
    assert_eq!(waiters(&holder, 0, &keys.key(0)).await, 0);
}

async fn futures_join<T: Send + 'static>(
    futures: impl Iterator<Item = impl Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

in_both_server_modes!(dropped_guards_free_the_key, drop_guards);

// ---------------------------------------------------------------------------
// A reply that arrived but was never read

/// The future is polled once (its blocking acquire, or its ticket's wait,
/// is on the wire), the holder lets go, the grant reaches the client — and
/// the future is dropped without being polled again, as when a `select!`'s
/// other branch wins in the same tick. The grant must be released, not left
/// held by a connection that stays open (mux) or freed only by the
/// server's auto-release (plain).
async fn drop_unread_grant(server: TestServer) {
    let keys = Keys::new("drop-unread");
    let holder = server.client();
    let waiter = server.client();
    for (name, two_phase) in [("acquire", false), ("wait", true)] {
        let key = keys.key(name);
        let held = hold(&holder, &key).await;
        let lock = waiter.lock(&key).unwrap();
        let mut pending: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = if two_phase {
            let Enqueue::Queued(ticket) = lock.enqueue().await.unwrap() else {
                panic!("{key}: a held key queues");
            };
            Box::pin(async move {
                drop(ticket.wait(Duration::from_secs(20)).await);
            })
        } else {
            let lock = lock.clone();
            Box::pin(async move {
                drop(lock.acquire_within(Duration::from_secs(20)).await);
            })
        };
        // Poll it until its waiting request is queued on the server, then
        // stop polling.
        let what = format!("{key}: waiter queued");
        let queued = eventually(&what, FREE_WITHIN, || async {
            waiters(&holder, 0, &key).await == 1
        });
        tokio::select! {
            _ = &mut pending => panic!("{key}: finished without waiting"),
            _ = queued => {}
        }
        held.release().await.unwrap();
        // Granted to the waiter on the server…
        eventually(&format!("{key}: granted"), FREE_WITHIN, || async {
            waiters(&holder, 0, &key).await == 0
        })
        .await;
        // …and given time to reach the client, which never reads it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(pending);
        settle(&holder, &key).await;
    }
}

in_both_server_modes!(
    unread_grant_of_a_dropped_future_is_released,
    drop_unread_grant
);
