//! The low-level `Connection`: every command, and poisoning after an
//! interrupted request. Runs against the embedded or the external server;
//! the server-close test is embedded-only.

use dflockd_testkit::client as support;

use std::time::Duration;

use dflockd_client::{Connection, Enqueued, ErrorKind, Key};
use dflockd_proto::{Kind, Limit, Namespace, Reply, Request, Seconds};
use dflockd_server::ServerConfig;
use support::{Keys, TestServer};
use tokio::time::Instant;

const LOCK: Namespace = Namespace::Lock;
const SEM: Namespace = Namespace::Semaphore;

fn key(keys: &Keys, name: &str) -> Key {
    Key::new(&keys.key(name)).unwrap()
}

#[tokio::test]
async fn lock_commands() {
    let server = TestServer::start().await;
    let keys = Keys::new("conn-lock");
    let mut a = server.connection().await;
    let mut b = server.connection().await;
    let k = key(&keys, "k");
    assert_eq!(a.addr(), &server.addr());

    a.ping().await.unwrap();
    // l: grant with the requested lease.
    let grant = a
        .acquire(&k, Kind::Lock, Duration::ZERO, Some(Duration::from_secs(7)))
        .await
        .unwrap()
        .expect("free");
    assert_eq!(grant.lease.get(), 7);
    // l on a held key: try-lock and a timed wait both come back empty.
    assert_eq!(
        b.acquire(&k, Kind::Lock, Duration::ZERO, None)
            .await
            .unwrap(),
        None
    );
    let started = Instant::now();
    assert_eq!(
        b.acquire(&k, Kind::Lock, Duration::from_millis(10), None)
            .await
            .unwrap(),
        None,
        "sub-second timeouts round up to 1 s"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    // n: renew, from any connection holding the token; without a lease the
    // server applies its default (33 s unless configured otherwise).
    let renewed = a.renew(&k, LOCK, grant.token, None).await.unwrap().get();
    if server.is_embedded() {
        assert_eq!(renewed, 33);
    }
    assert!(renewed > 0);
    assert_eq!(
        b.renew(&k, LOCK, grant.token, Some(Duration::from_secs(20)))
            .await
            .unwrap()
            .get(),
        20
    );
    // stats show it.
    let stats = b.stats().await.unwrap();
    let entry = stats
        .locks
        .iter()
        .find(|l| l.key == keys.key("k"))
        .expect("listed");
    assert!(entry.lease_expires_in_s > 15.0);
    // r: a wrong token is `error`; the right one releases.
    let forged = dflockd_client::Token::new(grant.token.fence(), grant.token.salt() ^ 1);
    assert!(matches!(
        b.release(&k, LOCK, forged).await,
        Err(ref e) if matches!(e.kind(), ErrorKind::Server)
    ));
    assert!(matches!(
        b.release(&k, SEM, grant.token).await,
        Err(ref e) if matches!(e.kind(), ErrorKind::Server)
    ));
    a.release(&k, LOCK, grant.token).await.unwrap();
    assert!(matches!(
        a.release(&k, LOCK, grant.token).await,
        Err(ref e) if matches!(e.kind(), ErrorKind::Server)
    ));
    assert!(matches!(
        a.renew(&k, LOCK, grant.token, None).await,
        Err(ref e) if matches!(e.kind(), ErrorKind::Server)
    ));
    // The next grant has a larger fence.
    let next = b
        .acquire(&k, Kind::Lock, Duration::from_secs(1), None)
        .await
        .unwrap()
        .expect("free again");
    assert!(next.token.fence() > grant.token.fence());
    b.release(&k, LOCK, next.token).await.unwrap();
    // A successful error reply does not poison the connection.
    assert!(!a.is_poisoned() && !b.is_poisoned());
}

#[tokio::test]
async fn two_phase_commands() {
    let server = TestServer::start().await;
    let keys = Keys::new("conn-2p");
    let mut a = server.connection().await;
    let mut b = server.connection().await;
    let k = key(&keys, "k");

    // e on a free key: acquired at once; w then collects the same grant.
    let Enqueued::Acquired(first) = a.enqueue(&k, Kind::Lock, None).await.unwrap() else {
        panic!("free key: acquired");
    };
    let collected = a
        .wait(&k, LOCK, Duration::from_secs(1))
        .await
        .unwrap()
        .expect("granted");
    assert_eq!(collected.token, first.token);
    assert!(matches!(
        a.wait(&k, LOCK, Duration::from_secs(1)).await,
        Err(ref e) if matches!(e.kind(), ErrorKind::NotEnqueued)
    ));
    // e on a held key: queued; a second e is refused; w times out (None)
    // and the place is gone.
    assert_eq!(
        b.enqueue(&k, Kind::Lock, None).await.unwrap(),
        Enqueued::Queued
    );
    assert!(matches!(
        b.enqueue(&k, Kind::Lock, None).await,
        Err(ref e) if matches!(e.kind(), ErrorKind::AlreadyEnqueued)
    ));
    assert_eq!(
        b.wait(&k, LOCK, Duration::from_secs(1)).await.unwrap(),
        None
    );
    assert!(matches!(
        b.wait(&k, LOCK, Duration::from_secs(1)).await,
        Err(ref e) if matches!(e.kind(), ErrorKind::NotEnqueued)
    ));
    // Queued, then granted on release.
    assert_eq!(
        b.enqueue(&k, Kind::Lock, None).await.unwrap(),
        Enqueued::Queued
    );
    a.release(&k, LOCK, first.token).await.unwrap();
    let second = b
        .wait(&k, LOCK, Duration::from_secs(5))
        .await
        .unwrap()
        .expect("granted after release");
    assert!(second.token.fence() > first.token.fence());
    // w in the other namespace has nothing to collect.
    assert!(matches!(
        b.wait(&k, SEM, Duration::from_secs(1)).await,
        Err(ref e) if matches!(e.kind(), ErrorKind::NotEnqueued)
    ));
    b.release(&k, LOCK, second.token).await.unwrap();
}

#[tokio::test]
async fn semaphore_commands() {
    let server = TestServer::start().await;
    let keys = Keys::new("conn-sem");
    let mut a = server.connection().await;
    let k = key(&keys, "s");
    let two = Kind::Semaphore(Limit::new(2).unwrap());
    let one = a
        .acquire(&k, two, Duration::ZERO, None)
        .await
        .unwrap()
        .expect("slot 1");
    let Enqueued::Acquired(other) = a.enqueue(&k, two, None).await.unwrap() else {
        panic!("slot 2");
    };
    assert!(
        a.wait(&k, SEM, Duration::from_secs(1))
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        a.acquire(&k, two, Duration::ZERO, None).await.unwrap(),
        None
    );
    let three = Kind::Semaphore(Limit::new(3).unwrap());
    assert!(matches!(
        a.acquire(&k, three, Duration::ZERO, None).await,
        Err(ref e) if matches!(e.kind(), ErrorKind::LimitMismatch)
    ));
    assert!(a.renew(&k, SEM, one.token, None).await.unwrap().get() > 0);
    // The lock of the same name is another resource.
    assert!(matches!(
        a.release(&k, LOCK, one.token).await,
        Err(ref e) if matches!(e.kind(), ErrorKind::Server)
    ));
    let stats = a.stats().await.unwrap();
    let entry = stats
        .semaphores
        .iter()
        .find(|s| s.key == keys.key("s"))
        .expect("listed");
    assert_eq!((entry.limit, entry.holders), (2, 2));
    a.release(&k, SEM, one.token).await.unwrap();
    a.release(&k, SEM, other.token).await.unwrap();
}

#[tokio::test]
async fn raw_requests() {
    let server = TestServer::start().await;
    let mut conn = server.connection().await;
    let timeout = Duration::from_secs(5);
    assert_eq!(
        conn.request(&Request::Ping, timeout).await.unwrap(),
        Reply::Ok
    );
    assert!(matches!(
        conn.request(&Request::Stats, timeout).await.unwrap(),
        Reply::Stats(_)
    ));
    let keys = Keys::new("conn-raw");
    let k = key(&keys, "k");
    let reply = conn
        .request(
            &Request::Acquire {
                key: k.clone(),
                kind: Kind::Lock,
                timeout: Seconds::ZERO,
                lease: None,
            },
            timeout,
        )
        .await
        .unwrap();
    let Reply::Granted { token, .. } = reply else {
        panic!("{reply:?}");
    };
    let release = Request::Release {
        key: k,
        namespace: LOCK,
        token: token.into(),
    };
    assert_eq!(conn.request(&release, timeout).await.unwrap(), Reply::Ok);
}

/// A request whose future is dropped after it was written poisons the
/// connection: a late reply would otherwise answer the next request.
#[tokio::test]
async fn interrupted_request_poisons_the_connection() {
    let server = TestServer::start().await;
    let keys = Keys::new("conn-poison");
    let k = key(&keys, "k");
    let mut holder = server.connection().await;
    let grant = holder
        .acquire(&k, Kind::Lock, Duration::ZERO, None)
        .await
        .unwrap()
        .unwrap();

    let mut conn = server.connection().await;
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        conn.acquire(&k, Kind::Lock, Duration::from_secs(5), None),
    )
    .await;
    assert!(dropped.is_err(), "the acquire was still blocked");
    assert!(conn.is_poisoned());
    assert!(matches!(conn.ping().await, Err(ref e) if matches!(e.kind(), ErrorKind::Poisoned)));
    assert!(matches!(conn.stats().await, Err(ref e) if matches!(e.kind(), ErrorKind::Poisoned)));
    drop(conn); // closing it withdraws the waiter

    // A reply timeout poisons too.
    let mut conn = server.connection().await;
    let request = Request::Acquire {
        key: k.clone(),
        kind: Kind::Lock,
        timeout: Seconds::new(5).unwrap(),
        lease: None,
    };
    let result = conn.request(&request, Duration::from_millis(100)).await;
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::ReplyTimeout)),
        "{result:?}"
    );
    assert!(conn.is_poisoned());
    assert!(matches!(conn.ping().await, Err(ref e) if matches!(e.kind(), ErrorKind::Poisoned)));
    drop(conn);

    // Neither left a waiter behind; the holder's connection is unaffected.
    let mut check = server.connection().await;
    let deadline = Instant::now() + support::BOUND;
    loop {
        let stats = check.stats().await.unwrap();
        let entry = stats
            .locks
            .iter()
            .find(|l| l.key == keys.key("k"))
            .expect("held");
        if entry.waiters == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "waiters left: {}", entry.waiters);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!holder.is_poisoned());
    holder.release(&k, LOCK, grant.token).await.unwrap();
}

/// Embedded-only (force-closes the server): a closed connection is
/// `ConnectionClosed`, not a hang.
#[tokio::test]
async fn server_close_is_connection_closed() {
    support::embedded_only(
        "server_close_is_connection_closed",
        "force-closes the server",
    );
    let server = TestServer::embedded(ServerConfig::ephemeral()).await;
    let mut conn = server.connection().await;
    conn.ping().await.unwrap();
    server.handle().force_close();
    let result = tokio::time::timeout(support::BOUND, async {
        loop {
            match conn.ping().await {
                Ok(()) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(error) => return error,
            }
        }
    })
    .await
    .expect("noticed within the bound");
    assert!(
        matches!(
            result.kind(),
            ErrorKind::ConnectionClosed | ErrorKind::Io(_)
        ),
        "{result:?}"
    );
    let refused = Connection::connect(&server.addr(), &server.connect_options()).await;
    assert!(
        matches!(refused, Err(ref e) if matches!(e.kind(), ErrorKind::Connect { .. })),
        "{refused:?}"
    );
}
