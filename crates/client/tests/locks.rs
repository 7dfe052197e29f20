//! Locks, semaphores, two-phase acquire, input validation and sharding,
//! through the high-level `Client`.
//!
//! Runs against the embedded server, or the external one named by
//! `DFLOCKD_TEST_HOST`/`DFLOCKD_TEST_PORT` (see `support`); the sharding test
//! is embedded-only (it needs three servers of its own).

use dflockd_testkit::client as support;

use std::sync::Arc;
use std::time::Duration;

use dflockd_client::{Client, Enqueue, Error, ErrorKind, Released, Sharding};
use dflockd_server::ServerConfig;
use support::{BOUND, Keys, TestServer, eventually, listed, no_waiters, waiters};
use support::{both_modes, queued_ticket};
use tokio::time::Instant;

both_modes! {
/// A failed request names its key and the server it went to, and keeps
/// its kind for matching (issue: "server answered error" said neither).
#[tokio::test]
async fn errors_name_the_key_and_the_server() {
    let server = TestServer::start().await;
    let keys = Keys::new("context");
    let client = server.client();
    let key = keys.key("busy");
    let _held = client.semaphore(&key, 3).unwrap().acquire().await.unwrap();
    let error = client
        .semaphore(&key, 2)
        .unwrap()
        .try_acquire()
        .await
        .unwrap_err();
    assert!(
        matches!(error.kind(), ErrorKind::LimitMismatch),
        "{error:?}"
    );
    assert_eq!(error.key().map(ToString::to_string), Some(key.clone()));
    assert_eq!(error.server(), Some(server.addr().to_string().as_str()));
    let message = error.to_string();
    assert!(
        message.contains(&format!("{key:?}")) && message.contains(&server.addr().to_string()),
        "{message}"
    );

    // A server nobody listens on: the connect failure names the key too.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let nowhere = Client::builder()
        .server(addr.into())
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let error = nowhere
        .lock("jobs/x")
        .unwrap()
        .try_acquire()
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("\"jobs/x\"") && message.contains(&addr.to_string()),
        "{message}"
    );
    assert!(error.is_transient(), "{error:?}");
}
}

both_modes! {
/// A holder proclaims a label that `Lock::holder` (and `stats`) show with
/// its fence, over the multiplexed connection; a plain connection answers
/// the extension as an unknown command and its `stats` shows neither.
#[tokio::test]
async fn a_holder_proclaims_a_label() {
    let server = TestServer::start().await;
    let keys = Keys::new("label");
    let client = server.client();
    let lock = client.lock(&keys.key("leader")).unwrap();
    assert!(lock.holder().await.unwrap().is_none());
    let lease = lock.acquire().await.unwrap();
    let proclaimed = lease.proclaim("node-a:8080").await;
    let holder = lock.holder().await.unwrap().expect("held");
    match dflockd_testkit::client::Mode::current() {
        dflockd_testkit::client::Mode::Mux => {
            proclaimed.unwrap();
            assert_eq!(holder.fence, Some(lease.fence()));
            assert_eq!(holder.label.as_deref(), Some("node-a:8080"));
        }
        // A plain connection's `stats` is v2's, member for member.
        dflockd_testkit::client::Mode::Plain => {
            let error = proclaimed.unwrap_err();
            assert!(matches!(error.kind(), ErrorKind::Server), "{error:?}");
            assert_eq!((holder.fence, holder.label), (None, None));
        }
    }
    let bad = lease.proclaim("two words").await.unwrap_err();
    assert!(matches!(bad.kind(), ErrorKind::InvalidArgument(_)), "{bad:?}");
    lease.release().await.unwrap();
    assert!(lock.holder().await.unwrap().is_none());
}
}

both_modes! {
#[tokio::test]
async fn acquire_try_lock_and_release() {
    let server = TestServer::start().await;
    let keys = Keys::new("basic");
    let (a, b) = (server.client(), server.client());
    let key = keys.key("k");

    let lease = a
        .lock(&key)
        .unwrap()
        .with_lease(Duration::from_secs(20))
        .acquire()
        .await
        .unwrap();
    assert_eq!(lease.key().as_bytes(), key.as_bytes());
    assert_eq!(lease.ttl(), Duration::from_secs(20));
    assert!(!lease.is_lost());
    assert_eq!(lease.loss_reason(), None);
    assert!(lease.deadline() > Instant::now() + Duration::from_secs(15));
    assert_eq!(
        dflockd_client::fence_from_token(&lease.token().to_string()).unwrap(),
        lease.fence()
    );

    // Held: another client's try-lock gets nothing, and so does the owner's.
    assert!(b.lock(&key).unwrap().try_acquire().await.unwrap().is_none());
    assert!(a.lock(&key).unwrap().try_acquire().await.unwrap().is_none());
    let stats = b.stats(0).await.unwrap();
    let entry = stats.locks.iter().find(|l| l.key == key).expect("listed");
    assert_ne!(entry.owner_conn_id, 0);
    assert!(entry.lease_expires_in_s <= 20.0);

    let fence = lease.fence();
    assert_eq!(lease.release().await.unwrap(), Released::Released);

    let again = b
        .lock(&key)
        .unwrap()
        .try_acquire()
        .await
        .unwrap()
        .expect("free after release");
    assert!(again.fence() > fence, "fences grow per key");
    assert_eq!(again.release().await.unwrap(), Released::Released);
}
}

both_modes! {
#[tokio::test]
async fn acquire_timeout_and_acquire_within() {
    let server = TestServer::start().await;
    let keys = Keys::new("timeout");
    let (a, b) = (server.client(), server.client());
    let key = keys.key("k");
    let held = a.lock(&key).unwrap().acquire().await.unwrap();

    // `acquire` with a 1 s timeout: Err(Timeout) after about a second.
    let started = Instant::now();
    let result = b
        .lock(&key)
        .unwrap()
        .with_timeout(Duration::from_secs(1))
        .acquire()
        .await;
    let waited = started.elapsed();
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::Timeout)),
        "{result:?}"
    );
    assert!(
        waited >= Duration::from_millis(900),
        "gave up early: {waited:?}"
    );
    assert!(waited < BOUND, "took {waited:?}");

    // `acquire_within` reports the same as None; a sub-second timeout is
    // rounded up to one second, not turned into a try-lock.
    let started = Instant::now();
    let none = b
        .lock(&key)
        .unwrap()
        .acquire_within(Duration::from_millis(200))
        .await
        .unwrap();
    assert!(none.is_none());
    assert!(started.elapsed() >= Duration::from_millis(900));
    no_waiters(&b, 0, &key).await;

    // Granted while waiting.
    let lock = b.lock(&key).unwrap();
    let waiter = tokio::spawn(async move { lock.acquire_within(BOUND).await });
    eventually("waiter queued", BOUND, || async {
        waiters(&a, 0, &key).await == 1
    })
    .await;
    let first = held.fence();
    held.release().await.unwrap();
    let second = waiter.await.unwrap().unwrap().expect("granted");
    assert!(second.fence() > first);
    assert_eq!(second.release().await.unwrap(), Released::Released);
}
}

both_modes! {
/// Five waiters queued one after the other are granted in that order, each
/// with a larger fence than the one before.
#[tokio::test]
async fn fifo_of_five_waiters_with_increasing_fences() {
    let server = TestServer::start().await;
    let keys = Keys::new("fifo");
    let key = keys.key("k");
    let holder = server.client();
    let waiters_client = server.client();
    let held = holder.lock(&key).unwrap().acquire().await.unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..5u64 {
        let lock = waiters_client.lock(&key).unwrap();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let lease = lock
                .acquire_within(Duration::from_secs(20))
                .await
                .unwrap()
                .expect("granted in turn");
            tx.send((i, lease.fence())).unwrap();
            assert_eq!(lease.release().await.unwrap(), Released::Released);
        }));
        eventually(&format!("waiter {i} queued"), BOUND, || async {
            waiters(&holder, 0, &key).await == i + 1
        })
        .await;
    }
    drop(tx);
    let mut last = held.fence();
    held.release().await.unwrap();
    let mut order = Vec::new();
    while let Some((i, fence)) = tokio::time::timeout(BOUND, rx.recv()).await.unwrap() {
        assert!(fence > last, "fence {fence} after {last}");
        last = fence;
        order.push(i);
    }
    assert_eq!(order, vec![0, 1, 2, 3, 4]);
    for task in tasks {
        task.await.unwrap();
    }
}
}

both_modes! {
#[tokio::test]
async fn semaphore_limit_and_mismatch() {
    let server = TestServer::start().await;
    let keys = Keys::new("sem");
    let key = keys.key("pool");
    let (a, b) = (server.client(), server.client());
    let sem = a.semaphore(&key, 3).unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(sem.acquire().await.unwrap());
    }
    let fences: Vec<u64> = held.iter().map(dflockd_client::Lease::fence).collect();
    assert!(fences.windows(2).all(|w| w[0] < w[1]), "{fences:?}");
    // Full.
    assert!(
        b.semaphore(&key, 3)
            .unwrap()
            .try_acquire()
            .await
            .unwrap()
            .is_none()
    );
    let stats = b.stats(0).await.unwrap();
    let entry = stats
        .semaphores
        .iter()
        .find(|s| s.key == key)
        .expect("listed");
    assert_eq!((entry.limit, entry.holders, entry.waiters), (3, 3, 0));
    // Another limit for the same key.
    assert!(matches!(
        b.semaphore(&key, 2).unwrap().try_acquire().await,
        Err(ref e) if matches!(e.kind(), ErrorKind::LimitMismatch)
    ));
    assert!(matches!(
        b.semaphore(&key, 4)
            .unwrap()
            .acquire_within(Duration::from_secs(1))
            .await,
        Err(ref e) if matches!(e.kind(), ErrorKind::LimitMismatch)
    ));
    // The lock namespace is separate: a lock of the same name is free.
    let lock = b
        .lock(&key)
        .unwrap()
        .try_acquire()
        .await
        .unwrap()
        .expect("other namespace");
    lock.release().await.unwrap();
    // A freed slot is granted again.
    held.pop().unwrap().release().await.unwrap();
    let again = b
        .semaphore(&key, 3)
        .unwrap()
        .try_acquire()
        .await
        .unwrap()
        .expect("slot");
    assert!(again.fence() > fences[2]);
    again.release().await.unwrap();
    for lease in held {
        assert_eq!(lease.release().await.unwrap(), Released::Released);
    }
}
}

both_modes! {
#[tokio::test]
async fn two_phase_acquired_fast_path() {
    let server = TestServer::start().await;
    let keys = Keys::new("twophase-fast");
    let key = keys.key("k");
    let (a, b) = (server.client(), server.client());
    let Enqueue::Acquired(lease) = a.lock(&key).unwrap().enqueue().await.unwrap() else {
        panic!("a free key is granted at enqueue");
    };
    assert!(b.lock(&key).unwrap().try_acquire().await.unwrap().is_none());
    assert_eq!(lease.release().await.unwrap(), Released::Released);
    support::lock_becomes_free(&b, &key, BOUND).await;

    // Semaphore flavour.
    let skey = keys.key("s");
    let Enqueue::Acquired(slot) = a.semaphore(&skey, 2).unwrap().enqueue().await.unwrap() else {
        panic!("a free semaphore is granted at enqueue");
    };
    assert_eq!(slot.release().await.unwrap(), Released::Released);
}
}

both_modes! {
#[tokio::test]
async fn two_phase_queued_then_granted() {
    let server = TestServer::start().await;
    let keys = Keys::new("twophase-queued");
    let key = keys.key("k");
    let (a, b) = (server.client(), server.client());
    let held = a.lock(&key).unwrap().acquire().await.unwrap();
    let ticket = queued_ticket(&b, &key).await;
    assert_eq!(waiters(&a, 0, &key).await, 1);
    let first = held.fence();
    held.release().await.unwrap();
    let lease = ticket.wait(BOUND).await.unwrap();
    assert!(lease.fence() > first);
    assert!(a.lock(&key).unwrap().try_acquire().await.unwrap().is_none());
    assert_eq!(lease.release().await.unwrap(), Released::Released);
}
}

both_modes! {
/// A wait that times out is `ErrorKind::Timeout` and the queue position is gone.
#[tokio::test]
async fn two_phase_wait_timeout_forfeits_the_place() {
    let server = TestServer::start().await;
    let keys = Keys::new("twophase-timeout");
    let key = keys.key("k");
    let (a, b) = (server.client(), server.client());
    let held = a.lock(&key).unwrap().acquire().await.unwrap();
    let ticket = queued_ticket(&b, &key).await;
    assert_eq!(waiters(&a, 0, &key).await, 1);
    let started = Instant::now();
    let result = ticket.wait(Duration::from_secs(1)).await;
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::Timeout)),
        "{result:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    no_waiters(&a, 0, &key).await;
    // Nobody is granted when the holder releases.
    held.release().await.unwrap();
    support::lock_becomes_free(&a, &key, BOUND).await;
}
}

both_modes! {
#[tokio::test]
async fn invalid_input_is_rejected() {
    let server = TestServer::start().await;
    let client = server.client();
    let invalid = |r: Result<(), Error>, what: &str| {
        assert!(
            matches!(r, Err(ref e) if matches!(e.kind(), ErrorKind::InvalidArgument(_))),
            "{what}: {r:?}"
        );
    };

    // Keys.
    for bad in ["", "a b", "a\tb", "a\nb", "a\rb"] {
        invalid(client.lock(bad).map(drop), &format!("key {bad:?}"));
        invalid(client.semaphore(bad, 2).map(drop), &format!("key {bad:?}"));
    }
    invalid(client.lock(&"x".repeat(257)).map(drop), "257-byte key");
    invalid(
        client.lock(&"日".repeat(86)).map(drop),
        "258-byte key (86 × 3)",
    );
    assert!(client.lock(&"x".repeat(256)).is_ok());
    assert!(client.lock("日本\u{a0}key").is_ok());

    // Semaphore limits.
    invalid(client.semaphore("k", 0).map(drop), "limit 0");
    invalid(
        client.semaphore("k", 1_048_577).map(drop),
        "limit above 1,048,576",
    );
    assert!(client.semaphore("k", 1_048_576).is_ok());

    // Renew ratio, timeouts, leases at build time.
    for ratio in [0.0, 1.0, f64::NAN, -0.5, 1.5, f64::INFINITY] {
        invalid(
            server.builder().renew_ratio(ratio).build().map(drop),
            &format!("ratio {ratio}"),
        );
    }
    assert!(server.builder().renew_ratio(0.5).build().is_ok());
    let too_long = Duration::from_secs(dflockd_proto::MAX_SECONDS + 1);
    invalid(
        server.builder().acquire_timeout(too_long).build().map(drop),
        "acquire timeout",
    );
    invalid(
        server.builder().default_lease(too_long).build().map(drop),
        "default lease",
    );
    invalid(
        server
            .builder()
            .default_lease(Duration::ZERO)
            .build()
            .map(drop),
        "zero default lease",
    );
    invalid(
        server.builder().keepalive(Duration::ZERO).build().map(drop),
        "zero keepalive",
    );
    invalid(
        server.builder().auth_token("a\nb").map(drop),
        "auth token with newline",
    );

    // Per call: checked before any I/O.
    let keys = Keys::new("invalid");
    let lock = client.lock(&keys.key("k")).unwrap();
    invalid(
        lock.clone()
            .with_timeout(too_long)
            .acquire()
            .await
            .map(drop),
        "acquire timeout",
    );
    invalid(
        lock.acquire_within(Duration::MAX).await.map(drop),
        "Duration::MAX",
    );
    invalid(
        lock.clone()
            .with_lease(too_long)
            .try_acquire()
            .await
            .map(drop),
        "lease",
    );
    invalid(
        lock.clone()
            .with_lease(Duration::ZERO)
            .try_acquire()
            .await
            .map(drop),
        "zero lease",
    );
    invalid(client.stats(1).await.map(drop), "server index");
    assert!(!support::listed(&client, 0, &keys.key("k")).await);

    // A ticket's wait timeout.
    let held = lock.acquire().await.unwrap();
    let Enqueue::Queued(ticket) = client
        .lock(&keys.key("k"))
        .unwrap()
        .enqueue()
        .await
        .unwrap()
    else {
        panic!("queued");
    };
    invalid(ticket.wait(too_long).await.map(drop), "wait timeout");
    no_waiters(&client, 0, &keys.key("k")).await;
    held.release().await.unwrap();
}
}

both_modes! {
/// Embedded-only: three servers of its own. Keys land on CRC-32 % 3, as with
/// the Go, Python and TypeScript clients, and only there.
#[tokio::test]
async fn keys_are_sharded_by_crc32() {
    let servers = [
        TestServer::embedded(ServerConfig::ephemeral()).await,
        TestServer::embedded(ServerConfig::ephemeral()).await,
        TestServer::embedded(ServerConfig::ephemeral()).await,
    ];
    let client = Client::builder()
        .servers(servers.iter().map(support::TestServer::addr))
        .build()
        .unwrap();
    assert_eq!(client.servers().len(), 3);
    let expected = [
        ("my-key", 2),
        ("row:42", 2),
        ("a", 0),
        ("lock-0", 1),
        ("日本", 2),
    ];
    for (key, index) in expected {
        assert_eq!(client.server_for(key).unwrap(), index, "{key}");
        let lock = client.lock(key).unwrap();
        assert_eq!(lock.server(), index);
        let lease = lock.acquire().await.unwrap();
        for other in 0..3 {
            let stats = client.stats(other).await.unwrap();
            let held = stats.locks.iter().any(|l| l.key == key);
            assert_eq!(held, other == index, "{key} on server {other}");
        }
        lease.release().await.unwrap();
        for other in (0..3).filter(|&o| o != index) {
            assert!(
                !listed(&client, other, key).await,
                "{key} touched server {other}"
            );
        }
    }
    // Semaphores shard the same way.
    let sem = client.semaphore("row:42", 2).unwrap();
    assert_eq!(sem.server(), 2);
    let slot = sem.acquire().await.unwrap();
    let stats = client.stats(2).await.unwrap();
    assert!(stats.semaphores.iter().any(|s| s.key == "row:42"));
    slot.release().await.unwrap();
}
}

both_modes! {
#[tokio::test]
async fn custom_sharding_is_range_checked() {
    let server = TestServer::start().await;
    let custom = |f: fn(&str, usize) -> usize| {
        server
            .builder()
            .sharding(Sharding::Custom(Arc::new(f)))
            .build()
            .unwrap()
    };
    let out_of_range = custom(|_, n| n);
    assert!(matches!(
        out_of_range.server_for("k"),
        Err(ref e) if matches!(e.kind(), ErrorKind::InvalidArgument(_))
    ));
    assert!(matches!(
        out_of_range.lock("k"),
        Err(ref e) if matches!(e.kind(), ErrorKind::InvalidArgument(_))
    ));
    assert!(matches!(
        out_of_range.semaphore("k", 2),
        Err(ref e) if matches!(e.kind(), ErrorKind::InvalidArgument(_))
    ));
    let wild = custom(|_, _| usize::MAX);
    assert!(
        matches!(wild.lock("k"), Err(ref e) if matches!(e.kind(), ErrorKind::InvalidArgument(_)))
    );
    // An in-range custom function is used as is.
    let fixed = custom(|_, _| 0);
    let keys = Keys::new("custom-shard");
    let lease = fixed.lock(&keys.key("k")).unwrap().acquire().await.unwrap();
    lease.release().await.unwrap();
}
}
