//! Self-signed server certificates: the usual `openssl req -x509` one is
//! a CA certificate, which WebPKI refuses as a server's own — the error
//! says so and what to do — and `TlsOptions::pinned_cert` trusts exactly
//! the pinned certificate, CA flag or not.

use std::time::Duration;

use dflockd_client::{Client, TlsOptions};
use dflockd_server::{Server, ServerConfig, ServerHandle, TlsConfig};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A certificate and its key, as PEM.
struct Identity {
    cert: String,
    key: String,
}

/// What `openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost
/// -addext "subjectAltName=IP:127.0.0.1"` makes: self-signed, CA:TRUE.
fn ca_flagged_self_signed() -> Identity {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Identity {
        cert: params.self_signed(&key).unwrap().pem(),
        key: key.serialize_pem(),
    }
}

/// A leaf certificate for 127.0.0.1 issued by a fresh CA.
fn leaf() -> Identity {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &Issuer::new(ca, &ca_key))
        .unwrap();
    Identity {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

async fn tls_server(identity: &Identity) -> ServerHandle {
    let mut config = ServerConfig::ephemeral();
    config.tls =
        Some(TlsConfig::from_pem(identity.cert.as_bytes(), identity.key.as_bytes()).unwrap());
    Server::start(config).await.unwrap()
}

/// Takes and releases a lock over `tls`, or says why not.
async fn lock_over(server: &ServerHandle, tls: TlsOptions) -> Result<(), String> {
    let client = Client::builder()
        .server(server.local_addr().into())
        .tls(tls)
        .build()
        .map_err(|e| e.to_string())?;
    let attempt = async {
        let lease = client.lock("pinned")?.acquire().await?;
        lease.release().await?;
        Ok::<(), dflockd_client::Error>(())
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string());
    drop(client);
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_flagged_server_certificate_is_refused_with_advice() {
    let identity = ca_flagged_self_signed();
    let server = tls_server(&identity).await;
    let trusted_as_ca = TlsOptions::with_ca_pem(identity.cert.as_bytes()).unwrap();
    let error = lock_over(&server, trusted_as_ca).await.unwrap_err();
    assert!(error.contains(&server.local_addr().to_string()), "{error}");
    assert!(error.contains("is a CA certificate"), "{error}");
    assert!(error.contains("CA:FALSE"), "{error}");
    assert!(error.contains("TlsOptions::pinned_cert"), "{error}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_certificate_is_trusted_whatever_its_ca_flag() {
    for identity in [ca_flagged_self_signed(), leaf()] {
        let server = tls_server(&identity).await;
        let pinned = TlsOptions::pinned_cert(identity.cert.as_bytes()).unwrap();
        lock_over(&server, pinned).await.unwrap();
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_certificate_than_the_pinned_one_is_refused() {
    let server = tls_server(&leaf()).await;
    let other = ca_flagged_self_signed();
    let pinned = TlsOptions::pinned_cert(other.cert.as_bytes()).unwrap();
    let error = lock_over(&server, pinned).await.unwrap_err();
    assert!(error.contains("not the pinned one"), "{error}");
    server.shutdown().await;
}
