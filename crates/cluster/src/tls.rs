//! Mutual TLS on Raft links (optional, under the secret's handshake): every
//! node presents its certificate both ways and accepts only peers whose
//! certificate chains to the cluster's CA. A caller also checks that the
//! callee's certificate names the address it dialled (an IP address
//! subjectAltName for the Raft address), as HTTPS does.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use thiserror::Error;
use tokio::net::TcpStream;

/// Why the Raft TLS files could not be used.
///
/// ```
/// let error = dflockd_cluster::RaftTls::from_pem(b"", b"", b"").unwrap_err();
/// assert!(error.to_string().contains("certificate"));
/// ```
#[derive(Debug, Error)]
pub enum RaftTlsError {
    /// A PEM input could not be read or parsed.
    #[error("Raft TLS {what} {origin}: {source}")]
    Pem {
        /// `certificate`, `private key` or `CA`.
        what: &'static str,
        /// The file, or `(in memory)`.
        origin: String,
        /// What went wrong.
        source: rustls::pki_types::pem::Error,
    },
    /// An input holds no certificate.
    #[error("Raft TLS {what} {origin}: no certificate in it")]
    Empty {
        /// `certificate` or `CA`.
        what: &'static str,
        /// The file, or `(in memory)`.
        origin: String,
    },
    /// rustls refused the combination (a key that does not match the
    /// certificate, a CA it cannot use).
    #[error("Raft TLS: {0}")]
    Rustls(String),
}

/// A node's TLS identity on Raft links and the CA it trusts for peers.
/// Each node's certificate must name its Raft address's IP address
/// (`subjectAltName = IP:…`) and be usable for both server and client
/// authentication.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use rcgen::{CertificateParams, IsCa, BasicConstraints, KeyPair, Issuer};
/// let ca_key = KeyPair::generate()?;
/// let mut ca = CertificateParams::new(Vec::<String>::new())?;
/// ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
/// let ca_cert = ca.self_signed(&ca_key)?;
/// let node_key = KeyPair::generate()?;
/// let node = CertificateParams::new(vec!["127.0.0.1".to_string()])?
///     .signed_by(&node_key, &Issuer::new(ca, &ca_key))?;
/// let tls = dflockd_cluster::RaftTls::from_pem(
///     node.pem().as_bytes(), node_key.serialize_pem().as_bytes(), ca_cert.pem().as_bytes())?;
/// let network = dflockd_cluster::Network::default().with_tls(tls);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RaftTls {
    server: tokio_rustls::TlsAcceptor,
    client: tokio_rustls::TlsConnector,
}

fn certificates(
    what: &'static str,
    origin: &str,
    found: Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error>,
) -> Result<Vec<CertificateDer<'static>>, RaftTlsError> {
    let certs = found.map_err(|source| RaftTlsError::Pem {
        what,
        origin: origin.to_string(),
        source,
    })?;
    if certs.is_empty() {
        return Err(RaftTlsError::Empty {
            what,
            origin: origin.to_string(),
        });
    }
    Ok(certs)
}

impl RaftTls {
    /// Loads the node's certificate chain, its private key and the CA
    /// certificate(s) from PEM files (`--raft-tls-cert`, `--raft-tls-key`,
    /// `--raft-tls-ca`).
    ///
    /// ```
    /// let error = dflockd_cluster::RaftTls::from_pem_files("/nonexistent/c", "k", "ca").unwrap_err();
    /// assert!(error.to_string().contains("/nonexistent/c"));
    /// ```
    pub fn from_pem_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        ca: impl AsRef<Path>,
    ) -> Result<RaftTls, RaftTlsError> {
        let (cert, key, ca) = (cert.as_ref(), key.as_ref(), ca.as_ref());
        let shown = |p: &Path| p.display().to_string();
        let chain = certificates(
            "certificate",
            &shown(cert),
            CertificateDer::pem_file_iter(cert).and_then(std::iter::Iterator::collect),
        )?;
        let private = PrivateKeyDer::from_pem_file(key).map_err(|source| RaftTlsError::Pem {
            what: "private key",
            origin: shown(key),
            source,
        })?;
        let roots = certificates(
            "CA",
            &shown(ca),
            CertificateDer::pem_file_iter(ca).and_then(std::iter::Iterator::collect),
        )?;
        RaftTls::from_parts(chain, private, roots)
    }

    /// [`from_pem_files`](Self::from_pem_files) from PEM text in memory.
    ///
    /// ```
    /// assert!(dflockd_cluster::RaftTls::from_pem(b"", b"", b"").is_err());
    /// ```
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<RaftTls, RaftTlsError> {
        let origin = "(in memory)";
        let chain = certificates(
            "certificate",
            origin,
            CertificateDer::pem_slice_iter(cert).collect(),
        )?;
        let private = PrivateKeyDer::from_pem_slice(key).map_err(|source| RaftTlsError::Pem {
            what: "private key",
            origin: origin.to_string(),
            source,
        })?;
        let roots = certificates("CA", origin, CertificateDer::pem_slice_iter(ca).collect())?;
        RaftTls::from_parts(chain, private, roots)
    }

    fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: Vec<CertificateDer<'static>>,
    ) -> Result<RaftTls, RaftTlsError> {
        let rustls_error = |e: rustls::Error| RaftTlsError::Rustls(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        for cert in ca {
            roots.add(cert).map_err(rustls_error)?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|e| RaftTlsError::Rustls(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)
            .map_err(rustls_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(rustls_error)?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(rustls_error)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(rustls_error)?;
        Ok(RaftTls {
            server: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            client: tokio_rustls::TlsConnector::from(Arc::new(client)),
        })
    }

    /// The called side of a link: requires a client certificate.
    pub(crate) async fn accept(
        &self,
        stream: TcpStream,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        self.server.accept(stream).await
    }

    /// The calling side of a link to `addr`: the callee's certificate must
    /// name `addr`'s IP address.
    pub(crate) async fn connect(
        &self,
        addr: SocketAddr,
        stream: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::IpAddress(addr.ip().into());
        self.client.connect(name, stream).await
    }
}

impl std::fmt::Debug for RaftTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RaftTls { .. }")
    }
}
