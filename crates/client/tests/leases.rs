//! Lease guards: background renewal, loss detection (refused renewal,
//! connection loss), loss notification to kameo actors, `release()` after a
//! loss, and keepalive of idle connections.
//!
//! The renewal, refusal and notification tests run against the embedded or
//! the external server; connection loss (force-closing the server) and
//! keepalive (a 1 s server read timeout) are embedded-only.

use dflockd_testkit::client as support;

use std::time::Duration;

use dflockd_client::{
    Connection, GrantService, Key, Lease, LeaseLost, LossReason, Released, RequestGrant,
};
use dflockd_proto::Namespace;
use dflockd_server::ServerConfig;
use kameo::actor::Spawn;
use kameo::error::Infallible;
use kameo::prelude::*;
use support::{BOUND, Keys, TestServer, contended_lease, embedded_only};
use support::{both_modes, queued_ticket};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Releases `lease`'s token from a raw connection, as any token bearer may:
/// the server forgets the grant, so the next renewal is refused.
async fn steal(conn: &mut Connection, lease: &Lease) {
    conn.release(
        &Key::new(&lease.key().to_string_lossy()).unwrap(),
        Namespace::Lock,
        lease.token(),
    )
    .await
    .expect("token-bearer release");
}

/// Two leases of `client` on keys of `keys`: "control", granted at once
/// (on the control lane, or the mux connection), and "wait", granted after
/// queueing behind `holder` (on a wait lane in plain mode).
async fn control_and_waited(
    client: &dflockd_client::Client,
    holder: &dflockd_client::Client,
    keys: &Keys,
    lease: Duration,
) -> (dflockd_client::Lease, dflockd_client::Lease) {
    let control = client
        .lock(&keys.key("control"))
        .unwrap()
        .with_lease(lease)
        .acquire()
        .await
        .unwrap();
    let waited = contended_lease(holder, client, &keys.key("wait"), lease).await;
    (control, waited)
}

both_modes! {
/// A 1 s lease stays held for 3+ s because it is renewed, and its deadline
/// moves forward — for a lease granted on the control lane and one granted on
/// a wait lane alike.
#[tokio::test]
async fn renewals_keep_a_one_second_lease_alive() {
    let server = TestServer::start().await;
    let keys = Keys::new("renew");
    let (client, other) = (server.client(), server.client());
    let one = Duration::from_secs(1);
    let (control, waited) = control_and_waited(&client, &other, &keys, one).await;
    let first = [control.deadline(), waited.deadline()];
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3300) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        for lease in [&control, &waited] {
            assert!(
                !lease.is_lost(),
                "{:?} lost: {:?}",
                lease.key(),
                lease.loss_reason()
            );
            assert!(lease.deadline() > Instant::now(), "deadline not renewed");
            assert_eq!(lease.ttl(), one);
        }
    }
    for (lease, first) in [&control, &waited].into_iter().zip(first) {
        assert!(
            lease.deadline() >= first + Duration::from_secs(2),
            "deadline did not move forward"
        );
        let key = lease.key().to_string_lossy();
        assert!(
            other
                .lock(&key)
                .unwrap()
                .try_acquire()
                .await
                .unwrap()
                .is_none()
        );
    }
    assert_eq!(control.release().await.unwrap(), Released::Released);
    assert_eq!(waited.release().await.unwrap(), Released::Released);
}
}

both_modes! {
/// (a) The server refuses a renewal (the token was released by another
/// connection): `lost()` resolves within about one renew interval (lease 3 s
/// → renew every ~1 s) with `LossReason::Refused`, and `release()` then
/// reports `AlreadyLost`.
#[tokio::test]
async fn refused_renewal_is_lease_loss() {
    let server = TestServer::start().await;
    let keys = Keys::new("refused");
    let (client, other) = (server.client(), server.client());
    let lease_len = Duration::from_secs(3);
    let (control, waited) = control_and_waited(&client, &other, &keys, lease_len).await;
    let mut raw = server.connection().await;
    for lease in [&control, &waited] {
        let token = lease.cancellation_token();
        steal(&mut raw, lease).await;
        let stolen_at = Instant::now();
        tokio::time::timeout(Duration::from_millis(1600), lease.lost())
            .await
            .unwrap_or_else(|_| panic!("{:?}: loss not noticed within 1.6 s", lease.key()));
        assert!(stolen_at.elapsed() < Duration::from_millis(1600));
        assert!(lease.is_lost());
        assert!(token.is_cancelled());
        assert_eq!(lease.loss_reason(), Some(LossReason::Refused));
    }
    assert_eq!(control.release().await.unwrap(), Released::AlreadyLost);
    assert_eq!(waited.release().await.unwrap(), Released::AlreadyLost);
}
}

both_modes! {
/// Embedded-only (force-closes the server). (b) Connection loss: leases
/// granted on the control lane and on a wait lane are reported lost promptly
/// — far within their 30 s lease — with `ConnectionLost`; `release()` then
/// reports `AlreadyLost`.
#[tokio::test]
async fn connection_loss_is_lease_loss() {
    embedded_only("connection_loss_is_lease_loss", "force-closes the server");
    let server = TestServer::embedded(ServerConfig::ephemeral()).await;
    let keys = Keys::new("connlost");
    let (client, other) = (server.client(), server.client());
    let lease_len = Duration::from_secs(30);
    let (control, waited) = control_and_waited(&client, &other, &keys, lease_len).await;
    let tokens = [control.cancellation_token(), waited.cancellation_token()];
    server.handle().force_close();
    let closed_at = Instant::now();
    for lease in [&control, &waited] {
        tokio::time::timeout(Duration::from_secs(1), lease.lost())
            .await
            .unwrap_or_else(|_| panic!("{:?}: connection loss not noticed", lease.key()));
        assert_eq!(lease.loss_reason(), Some(LossReason::ConnectionLost));
    }
    assert!(closed_at.elapsed() < Duration::from_secs(1));
    assert!(tokens.iter().all(|t| t.is_cancelled()));
    assert_eq!(control.release().await.unwrap(), Released::AlreadyLost);
    assert_eq!(waited.release().await.unwrap(), Released::AlreadyLost);
}
}

/// A worker actor that forwards the `LeaseLost` it receives.
struct Watcher {
    seen: mpsc::UnboundedSender<LeaseLost>,
}

impl Actor for Watcher {
    type Args = mpsc::UnboundedSender<LeaseLost>;
    type Error = Infallible;

    async fn on_start(
        seen: mpsc::UnboundedSender<LeaseLost>,
        _: ActorRef<Self>,
    ) -> Result<Self, Infallible> {
        Ok(Watcher { seen })
    }
}

impl Message<LeaseLost> for Watcher {
    type Reply = ();

    async fn handle(&mut self, lost: LeaseLost, _: &mut Context<Self, ()>) {
        let _ = self.seen.send(lost);
    }
}

both_modes! {
/// (c) An actor registered with `.notify(recipient)` receives `LeaseLost`
/// (key, token, fence, reason) — through a handle and through the
/// `GrantService`.
#[tokio::test]
async fn owner_actor_receives_lease_lost() {
    let server = TestServer::start().await;
    let keys = Keys::new("notify");
    let client = server.client();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watcher = Watcher::spawn(tx);
    let lease_len = Duration::from_secs(3);

    let direct = client
        .lock(&keys.key("direct"))
        .unwrap()
        .with_lease(lease_len)
        .notify(watcher.clone().recipient())
        .acquire()
        .await
        .unwrap();
    let service = GrantService::spawn(client.clone());
    let via_service = service
        .ask(
            RequestGrant::lock(keys.key("service"))
                .lease(lease_len)
                .notify(watcher.clone().recipient()),
        )
        .await
        .unwrap();

    let mut raw = server.connection().await;
    for lease in [&direct, &via_service] {
        steal(&mut raw, lease).await;
        let lost = tokio::time::timeout(BOUND, rx.recv())
            .await
            .expect("LeaseLost within the bound")
            .expect("watcher alive");
        assert_eq!(lost.key, lease.key().to_string_lossy());
        assert_eq!(lost.token, lease.token());
        assert_eq!(lost.fence, lease.fence());
        assert_eq!(lost.reason, LossReason::Refused);
        assert!(lease.is_lost());
    }
    // Exactly one message per loss.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_err());
    assert_eq!(direct.release().await.unwrap(), Released::AlreadyLost);
    assert_eq!(via_service.release().await.unwrap(), Released::AlreadyLost);
}
}

both_modes! {
/// A released lease is not reported lost to its owner, and releasing is
/// `Released`; dropping the guard releases in the background.
#[tokio::test]
async fn release_and_drop_free_the_key() {
    let server = TestServer::start().await;
    let keys = Keys::new("release");
    let (client, other) = (server.client(), server.client());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watcher = Watcher::spawn(tx);
    let lease = client
        .lock(&keys.key("k"))
        .unwrap()
        .with_lease(Duration::from_secs(2))
        .notify(watcher.recipient())
        .acquire()
        .await
        .unwrap();
    let token = lease.cancellation_token();
    assert_eq!(lease.release().await.unwrap(), Released::Released);
    assert!(
        token.is_cancelled(),
        "work tied to a released lease is told to stop"
    );
    support::lock_becomes_free(&other, &keys.key("k"), BOUND).await;
    // Dropped guard: freed in the background.
    let lease = client
        .lock(&keys.key("d"))
        .unwrap()
        .acquire()
        .await
        .unwrap();
    drop(lease);
    support::lock_becomes_free(&other, &keys.key("d"), BOUND).await;
    // No renewal of the released lease went wrong afterwards.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(rx.try_recv().is_err(), "a released lease was reported lost");
}
}

both_modes! {
/// Embedded-only (server read timeout 1 s). With `keepalive(300 ms)` a held
/// 30 s lease survives 3 s of otherwise idle time, on the control lane and
/// on a wait lane; without keepalive the same server drops the silent
/// connections (the control half of the test, proving the setting bites).
#[tokio::test]
async fn keepalive_keeps_idle_connections_and_their_leases() {
    embedded_only("keepalive", "needs a 1 s server read timeout");
    let mut config = ServerConfig::ephemeral();
    config.read_timeout = Duration::from_secs(1);
    let server = TestServer::embedded(config).await;
    let keys = Keys::new("keepalive");
    let lease_len = Duration::from_secs(30);
    let pinging = server
        .builder()
        .keepalive(Duration::from_millis(300))
        .build()
        .unwrap();
    let holder = server
        .builder()
        .keepalive(Duration::from_millis(300))
        .build()
        .unwrap();
    let silent = server.client(); // keepalive 10 s: silent for far longer than 1 s

    let (control, waited) = control_and_waited(&pinging, &holder, &keys, lease_len).await;
    let silent_control = silent
        .lock(&keys.key("silent-control"))
        .unwrap()
        .with_lease(lease_len)
        .acquire()
        .await
        .unwrap();
    let silent_waited =
        contended_lease(&holder, &silent, &keys.key("silent-wait"), lease_len).await;

    // The silent client's connections are dropped by the server after ~1 s.
    for lease in [&silent_control, &silent_waited] {
        tokio::time::timeout(Duration::from_secs(3), lease.lost())
            .await
            .expect("without keepalive the idle connection is dropped");
        assert_eq!(lease.loss_reason(), Some(LossReason::ConnectionLost));
    }
    // Three seconds of idleness for the pinging client's leases.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for lease in [&control, &waited] {
        assert!(
            !lease.is_lost(),
            "{:?}: {:?}",
            lease.key(),
            lease.loss_reason()
        );
        let key = lease.key().to_string_lossy();
        assert!(
            holder
                .lock(&key)
                .unwrap()
                .try_acquire()
                .await
                .unwrap()
                .is_none(),
            "{key} was freed on the server"
        );
    }
    assert_eq!(control.release().await.unwrap(), Released::Released);
    assert_eq!(waited.release().await.unwrap(), Released::Released);
}
}

both_modes! {
/// Embedded-only (server read timeout 1 s). A two-phase ticket held for
/// 2.5 s before its `wait` keeps its queue place: in plain mode its own
/// connection is pinged every keepalive, in mux mode the shared connection
/// is. Without pings the server would close the ticket's connection after
/// 1 s and the wait would fail; the silent client shows that.
#[tokio::test]
async fn queued_ticket_keeps_its_place_past_the_server_read_timeout() {
    embedded_only("ticket keepalive", "needs a 1 s server read timeout");
    let mut config = ServerConfig::ephemeral();
    config.read_timeout = Duration::from_secs(1);
    let server = TestServer::embedded(config).await;
    let keys = Keys::new("ticket-keepalive");
    let pinging = server
        .builder()
        .keepalive(Duration::from_millis(300))
        .build()
        .unwrap();
    let silent = server.client(); // keepalive 10 s
    let holder = server
        .builder()
        .keepalive(Duration::from_millis(300))
        .build()
        .unwrap();
    let key = keys.key("k");
    let held = holder
        .lock(&key)
        .unwrap()
        .with_lease(Duration::from_secs(30))
        .acquire()
        .await
        .unwrap();
    let kept = queued_ticket(&pinging, &key).await;
    let dropped = queued_ticket(&silent, &key).await;
    // Idle for 2.5 read timeouts: the time must really pass.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    held.release().await.unwrap();
    let lease = kept
        .wait(Duration::from_secs(5))
        .await
        .expect("the pinged ticket kept its place");
    lease.release().await.unwrap();
    let silent_result = dropped.wait(Duration::from_secs(2)).await;
    assert!(
        silent_result.is_err(),
        "the silent ticket's connection should be gone: {silent_result:?}"
    );
}
}
