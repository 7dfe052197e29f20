//! TLS and a shared secret: an embedded server with a test certificate
//! (generated here with rcgen) and an auth token; a client that trusts the
//! test CA and presents the token.
//!
//! `cargo run --example tls_auth`

use dflockd::client::{Client, ErrorKind, TlsOptions};
use dflockd::server::{Secret, Server, ServerConfig, TlsConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A throwaway CA and a certificate for localhost / 127.0.0.1.
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "dflockd example CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer)?;

    let config = ServerConfig {
        tls: Some(TlsConfig::from_pem(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
        )?),
        auth_token: Some(Secret::new("correct horse battery staple")),
        ..ServerConfig::ephemeral()
    };
    let server = Server::start(config).await?;
    let tls = TlsOptions::with_ca_pem(ca.pem().as_bytes())?;

    let client = Client::builder()
        .server(server.local_addr().into())
        .tls(tls.clone())
        .auth_token("correct horse battery staple")?
        .build()?;
    let lease = client.lock("secure")?.acquire().await?;
    println!("over TLS with auth: fence {}", lease.fence());
    lease.release().await?;

    let intruder = Client::builder()
        .server(server.local_addr().into())
        .tls(tls)
        .auth_token("guess")?
        .build()?;
    match intruder.lock("secure")?.try_acquire().await {
        Err(error) if matches!(error.kind(), ErrorKind::Auth) => {
            println!("wrong token rejected: {error}");
        }
        other => return Err(format!("expected ErrorKind::Auth, got {other:?}").into()),
    }
    Ok(())
}
