//! TLS and auth.
//!
//! Embedded mode: a fresh rcgen CA and a leaf for `localhost` and 127.0.0.1
//! (distinct CommonNames), a random auth token. External mode: the servers
//! named by `DFLOCKD_TEST_TLS_PORT` + `DFLOCKD_TEST_TLS_CA` (on 127.0.0.1)
//! and `DFLOCKD_TEST_AUTH_PORT` + `DFLOCKD_TEST_AUTH_TOKEN`; a test whose
//! variables are missing prints `SKIPPED …` and passes. Tests combining TLS
//! with auth are embedded-only.

use dflockd_testkit::client as support;

use std::time::Duration;

use dflockd_client::{AuthToken, ConnectOptions, Connection, ErrorKind, Released, TlsOptions};
use dflockd_server::{Secret, ServerConfig};
use support::{BOUND, Keys, TestPki, TestServer, both_modes};

async fn round_trip(server: &TestServer, test: &str) {
    let keys = Keys::new(test);
    let client = server.client();
    let other = server.client();
    let key = keys.key("k");
    client.ping(0).await.unwrap();
    let lease = client.lock(&key).unwrap().acquire().await.unwrap();
    assert!(
        other
            .lock(&key)
            .unwrap()
            .try_acquire()
            .await
            .unwrap()
            .is_none()
    );
    let stats = other.stats(0).await.unwrap();
    assert!(stats.locks.iter().any(|l| l.key == key));
    assert_eq!(lease.release().await.unwrap(), Released::Released);
    // Contended: a wait lane opens its own TLS / authenticated connection.
    let waited =
        support::contended_lease(&other, &client, &keys.key("w"), Duration::from_secs(5)).await;
    assert_eq!(waited.release().await.unwrap(), Released::Released);
    // Low level.
    let mut conn = server.connection().await;
    conn.ping().await.unwrap();
    let key = dflockd_client::Key::new(&keys.key("raw")).unwrap();
    let grant = conn
        .acquire(&key, dflockd_proto::Kind::Lock, Duration::ZERO, None)
        .await
        .unwrap()
        .expect("free");
    conn.release(&key, dflockd_proto::Namespace::Lock, grant.token)
        .await
        .unwrap();
}

both_modes! {
#[tokio::test]
async fn tls_round_trip() {
    let Some(server) = TestServer::with_tls("tls_round_trip").await else {
        return;
    };
    round_trip(&server, "tls").await;
}
}

both_modes! {
/// The certificate is checked against the address's host (127.0.0.1, an IP
/// SAN) by default, or against an explicit server name (`localhost`).
#[tokio::test]
async fn tls_server_name() {
    let Some(server) = TestServer::with_tls("tls_server_name").await else {
        return;
    };
    let tls = server.tls().unwrap().server_name("localhost").unwrap();
    let options = ConnectOptions {
        tls: Some(tls.clone()),
        ..server.connect_options()
    };
    let mut conn = Connection::connect(&server.addr(), &options).await.unwrap();
    conn.ping().await.unwrap();
    // A name the certificate does not carry is refused.
    let wrong = ConnectOptions {
        tls: Some(
            server
                .tls()
                .unwrap()
                .server_name("dflockd.invalid")
                .unwrap(),
        ),
        ..server.connect_options()
    };
    let result = Connection::connect(&server.addr(), &wrong).await;
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::Connect { .. })),
        "{result:?}"
    );
}
}

both_modes! {
/// A server whose certificate is not signed by a trusted CA is refused, by
/// the low-level connection and by the client.
#[tokio::test]
async fn tls_untrusted_ca_is_refused() {
    let Some(server) = TestServer::with_tls("tls_untrusted_ca_is_refused").await else {
        return;
    };
    let stranger = TlsOptions::with_ca_pem(TestPki::generate().ca_pem.as_bytes()).unwrap();
    let options = ConnectOptions {
        tls: Some(stranger.clone()),
        ..server.connect_options()
    };
    let result = Connection::connect(&server.addr(), &options).await;
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::Connect { .. })),
        "{result:?}"
    );
    let client = dflockd_client::Client::builder()
        .server(server.addr())
        .tls(stranger)
        .build()
        .unwrap();
    let result = client.lock("k").unwrap().try_acquire().await;
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::Connect { .. })),
        "{result:?}"
    );
}
}

both_modes! {
/// Plain text to a TLS server fails cleanly and promptly.
#[tokio::test]
async fn plaintext_to_tls_server_fails() {
    let Some(server) = TestServer::with_tls("plaintext_to_tls_server_fails").await else {
        return;
    };
    let options = ConnectOptions {
        tls: None,
        ..server.connect_options()
    };
    let outcome = tokio::time::timeout(BOUND, async {
        let mut conn = Connection::connect(&server.addr(), &options).await?;
        conn.ping().await
    })
    .await
    .expect("fails within the bound");
    assert!(outcome.is_err(), "{outcome:?}");
}
}

both_modes! {
#[test]
fn bad_ca_material_is_rejected() {
    assert!(matches!(
        TlsOptions::with_ca_pem(b"not a certificate"),
        Err(ref e) if matches!(e.kind(), ErrorKind::InvalidArgument(_))
    ));
    assert!(matches!(
        TlsOptions::with_ca_file("/nonexistent/ca.pem"),
        Err(ref e) if matches!(e.kind(), ErrorKind::InvalidArgument(_))
    ));
}
}

both_modes! {
#[tokio::test]
async fn auth_round_trip() {
    let Some(server) = TestServer::with_auth("auth_round_trip").await else {
        return;
    };
    round_trip(&server, "auth").await;
}
}

both_modes! {
/// A wrong token, or none, is `Error::Auth` — for the client and for a
/// low-level connection.
#[tokio::test]
async fn wrong_or_missing_token_is_auth_error() {
    let Some(server) = TestServer::with_auth("wrong_or_missing_token_is_auth_error").await else {
        return;
    };
    let right = server.auth_token().unwrap().to_owned();
    let wrong = format!("{right}-wrong");

    let options = ConnectOptions {
        auth_token: Some(AuthToken::new(wrong.as_str()).unwrap()),
        ..server.connect_options()
    };
    let result = Connection::connect(&server.addr(), &options).await;
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::Auth)),
        "{result:?}"
    );

    let client = dflockd_client::Client::builder()
        .server(server.addr())
        .auth_token(&wrong)
        .unwrap()
        .build()
        .unwrap();
    let result = client.lock("k").unwrap().try_acquire().await;
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::Auth)),
        "{result:?}"
    );
    let result = client.stats(0).await;
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::Auth)),
        "{result:?}"
    );

    // No token at all: the first request is answered `error_auth`.
    let options = ConnectOptions {
        auth_token: None,
        ..server.connect_options()
    };
    let mut conn = Connection::connect(&server.addr(), &options).await.unwrap();
    let result = conn.ping().await;
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::Auth)),
        "{result:?}"
    );
    let client = dflockd_client::Client::builder()
        .server(server.addr())
        .build()
        .unwrap();
    let result = client.lock("k").unwrap().try_acquire().await;
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::Auth)),
        "{result:?}"
    );
}
}

both_modes! {
/// Embedded-only: TLS and auth together, on one server.
#[tokio::test]
async fn tls_and_auth_together() {
    support::embedded_only("tls_and_auth_together", "needs a TLS server with auth");
    let pki = TestPki::generate();
    let mut config = ServerConfig::ephemeral();
    config.tls = Some(pki.server_config());
    config.auth_token = Some(Secret::new("tls+auth"));
    let server = TestServer::embedded(config).await;
    let tls = TlsOptions::with_ca_pem(pki.ca_pem.as_bytes()).unwrap();
    let client = server.builder().tls(tls.clone()).build().unwrap();
    let keys = Keys::new("tls-auth");
    let lease = client
        .lock(&keys.key("k"))
        .unwrap()
        .acquire()
        .await
        .unwrap();
    assert_eq!(lease.release().await.unwrap(), Released::Released);
    let wrong = dflockd_client::Client::builder()
        .server(server.addr())
        .tls(tls)
        .auth_token("nope")
        .unwrap()
        .build()
        .unwrap();
    let result = wrong.lock("k").unwrap().try_acquire().await;
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::Auth)),
        "{result:?}"
    );
}
}
