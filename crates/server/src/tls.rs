//! TLS for the listener: rustls with the ring provider, TLS 1.2 minimum.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

/// Why a certificate or key could not be loaded.
///
/// ```
/// use dflockd_server::{TlsConfig, TlsError};
/// let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
/// assert!(matches!(TlsConfig::from_pem(b"", key.as_bytes()), Err(TlsError::NoCertificate { .. })));
/// assert!(matches!(TlsConfig::from_pem(b"", b""), Err(TlsError::Pem { what: "private key", .. })));
/// ```
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read the {what} {origin}: {source}")]
    Pem {
        /// Which input (`certificate` or `private key`).
        what: &'static str,
        /// The file, or `(in memory)`.
        origin: String,
        /// The underlying error.
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("no certificate in {origin}")]
    NoCertificate {
        /// The file, or `(in memory)`.
        origin: String,
    },
    /// rustls rejected the configuration (e.g. key does not match).
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A server TLS configuration (certificate chain and private key).
///
/// ```no_run
/// let tls = dflockd_server::TlsConfig::from_pem_files("cert.pem", "key.pem")?;
/// let mut config = dflockd_server::ServerConfig::ephemeral();
/// config.tls = Some(tls);
/// # Ok::<(), dflockd_server::TlsError>(())
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    pub(crate) server: Arc<rustls::ServerConfig>,
}

impl TlsConfig {
    /// Loads a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1
    /// or SEC1) from files.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// # let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    /// # std::fs::write(dir.path().join("cert.pem"), ck.cert.pem())?;
    /// # std::fs::write(dir.path().join("key.pem"), ck.signing_key.serialize_pem())?;
    /// let tls = dflockd_server::TlsConfig::from_pem_files(dir.path().join("cert.pem"), dir.path().join("key.pem"))?;
    /// let mut config = dflockd_server::ServerConfig::ephemeral();
    /// config.tls = Some(tls);
    /// # Ok(()) }
    /// ```
    pub fn from_pem_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<TlsConfig, TlsError> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(std::iter::Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|source| TlsError::Pem {
                what: "certificate",
                origin: cert.display().to_string(),
                source,
            })?;
        let private = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem {
            what: "private key",
            origin: key.display().to_string(),
            source,
        })?;
        TlsConfig::from_parts(certs, private, &cert.display().to_string())
    }

    /// Builds a configuration from PEM text in memory.
    ///
    /// ```
    /// use dflockd_server::TlsConfig;
    /// let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    /// let tls = TlsConfig::from_pem(ck.cert.pem().as_bytes(), ck.signing_key.serialize_pem().as_bytes());
    /// assert!(tls.is_ok());
    /// // A key that does not belong to the certificate is refused.
    /// let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
    /// assert!(TlsConfig::from_pem(ck.cert.pem().as_bytes(), other.as_bytes()).is_err());
    /// ```
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Result<TlsConfig, TlsError> {
        let origin = "(in memory)";
        let certs = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem {
                what: "certificate",
                origin: origin.to_string(),
                source,
            })?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|source| TlsError::Pem {
            what: "private key",
            origin: origin.to_string(),
            source,
        })?;
        TlsConfig::from_parts(certs, key, origin)
    }

    fn from_parts(
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        origin: &str,
    ) -> Result<TlsConfig, TlsError> {
        if certs.is_empty() {
            return Err(TlsError::NoCertificate {
                origin: origin.to_string(),
            });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(TlsConfig {
            server: Arc::new(server),
        })
    }
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig { .. }")
    }
}
