//! How to reach a server: address, TLS, auth, connect timeout.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::{Error, ErrorKind, Result};

/// A server address, `host:port`.
///
/// ```
/// use dflockd_client::ServerAddr;
/// let a: ServerAddr = "127.0.0.1:6388".parse().unwrap();
/// assert_eq!(a.port(), 6388);
/// let v6: ServerAddr = "[::1]:7000".parse().unwrap();
/// assert_eq!(v6.host(), "::1");
/// assert!("no-port".parse::<ServerAddr>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    host: String,
    port: u16,
}

impl ServerAddr {
    /// An address from host and port. The host must be non-empty and free of
    /// white space.
    ///
    /// ```
    /// use dflockd_client::ServerAddr;
    /// let addr = ServerAddr::new("locks.internal", 6388)?;
    /// assert_eq!(addr.to_string(), "locks.internal:6388");
    /// assert_eq!(ServerAddr::new("::1", 7000)?.to_string(), "[::1]:7000");
    /// assert!(ServerAddr::new("", 6388).is_err());
    /// assert!(ServerAddr::new("host", 0).is_err());
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn new(host: impl Into<String>, port: u16) -> Result<ServerAddr> {
        let host = host.into();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(ErrorKind::InvalidArgument(format!("invalid server host {host:?}")).into());
        }
        if port == 0 {
            return Err(ErrorKind::InvalidArgument("server port must be 1-65535".into()).into());
        }
        Ok(ServerAddr { host, port })
    }

    /// The host name or IP literal.
    ///
    /// ```
    /// let addr: dflockd_client::ServerAddr = "locks.internal:6388".parse()?;
    /// assert_eq!(addr.host(), "locks.internal");
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    ///
    /// ```
    /// let addr = dflockd_client::ServerAddr::from(std::net::SocketAddr::from(([10, 0, 0, 1], 7000)));
    /// assert_eq!(addr.port(), 7000);
    /// ```
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for ServerAddr {
    type Err = Error;
    fn from_str(s: &str) -> Result<ServerAddr> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| ErrorKind::InvalidArgument(format!("expected host:port, got {s:?}")))?;
        let port = port
            .parse::<u16>()
            .map_err(|_| ErrorKind::InvalidArgument(format!("invalid port in {s:?}")))?;
        ServerAddr::new(host, port)
    }
}

/// Anything that names a dflockd server: a [`ServerAddr`], a
/// `"host:port"` string, or a [`std::net::SocketAddr`].
///
/// ```
/// use dflockd_client::IntoServerAddr;
/// let from_text = "10.0.0.1:6388".into_server_addr().unwrap();
/// let from_socket = std::net::SocketAddr::from(([10, 0, 0, 1], 6388)).into_server_addr().unwrap();
/// assert_eq!(from_text, from_socket);
/// assert!("10.0.0.1".into_server_addr().is_err()); // no port
/// ```
pub trait IntoServerAddr {
    /// The address, or an `ErrorKind::InvalidArgument` naming the input.
    fn into_server_addr(self) -> Result<ServerAddr>;
}

impl IntoServerAddr for ServerAddr {
    fn into_server_addr(self) -> Result<ServerAddr> {
        Ok(self)
    }
}

impl IntoServerAddr for &ServerAddr {
    fn into_server_addr(self) -> Result<ServerAddr> {
        Ok(self.clone())
    }
}

impl IntoServerAddr for &str {
    fn into_server_addr(self) -> Result<ServerAddr> {
        self.parse()
    }
}

impl IntoServerAddr for String {
    fn into_server_addr(self) -> Result<ServerAddr> {
        self.parse()
    }
}

impl IntoServerAddr for std::net::SocketAddr {
    fn into_server_addr(self) -> Result<ServerAddr> {
        Ok(self.into())
    }
}

impl From<std::net::SocketAddr> for ServerAddr {
    fn from(addr: std::net::SocketAddr) -> ServerAddr {
        ServerAddr {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }
}

/// TLS settings for client connections (rustls, ring provider, TLS ≥ 1.2).
///
/// ```no_run
/// let tls = dflockd_client::TlsOptions::with_ca_file("ca.pem")?;
/// # Ok::<(), dflockd_client::Error>(())
/// ```
#[derive(Clone)]
pub struct TlsOptions {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) server_name: Option<ServerName<'static>>,
}

impl TlsOptions {
    /// Trusts the CA certificates in a PEM file.
    ///
    /// ```
    /// use dflockd_client::TlsOptions;
    /// // A missing or unreadable file is an `ErrorKind::InvalidArgument` naming it.
    /// let missing = TlsOptions::with_ca_file("/nonexistent/ca.pem");
    /// assert!(missing.unwrap_err().to_string().contains("/nonexistent/ca.pem"));
    /// ```
    pub fn with_ca_file(path: impl AsRef<Path>) -> Result<TlsOptions> {
        let pem = std::fs::read(path.as_ref()).map_err(|e| {
            ErrorKind::InvalidArgument(format!(
                "cannot read CA file {}: {e}",
                path.as_ref().display()
            ))
        })?;
        TlsOptions::with_ca_pem(&pem)
    }

    /// Trusts the CA certificates in PEM text.
    ///
    /// ```
    /// use dflockd_client::TlsOptions;
    /// let ca = rcgen::generate_simple_self_signed(vec!["locks.internal".into()]).unwrap();
    /// let tls = TlsOptions::with_ca_pem(ca.cert.pem().as_bytes())?;
    /// assert!(TlsOptions::with_ca_pem(b"not a certificate").is_err());
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn with_ca_pem(pem: &[u8]) -> Result<TlsOptions> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| ErrorKind::InvalidArgument(format!("bad CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ErrorKind::InvalidArgument(format!("bad CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ErrorKind::InvalidArgument("no CA certificate in PEM".into()).into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ErrorKind::InvalidArgument(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsOptions {
            config: Arc::new(config),
            server_name: None,
        })
    }

    /// Trusts exactly the server certificate in PEM text (certificate
    /// pinning): the server must present this very certificate — CA flag,
    /// issuer and name are not checked — and sign the handshake with its
    /// key. For a self-signed server certificate, including one made with
    /// `openssl req -x509`, which is a CA certificate that
    /// [`with_ca_pem`](Self::with_ca_pem) cannot accept as a server's own.
    ///
    /// ```
    /// use dflockd_client::TlsOptions;
    /// let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    /// let tls = TlsOptions::pinned_cert(cert.cert.pem().as_bytes())?;
    /// assert!(TlsOptions::pinned_cert(b"not a certificate").is_err());
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn pinned_cert(pem: &[u8]) -> Result<TlsOptions> {
        let cert = CertificateDer::pem_slice_iter(pem)
            .next()
            .ok_or_else(|| ErrorKind::InvalidArgument("no certificate in the pinned PEM".into()))?
            .map_err(|e| ErrorKind::InvalidArgument(format!("bad pinned certificate PEM: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(crate::pinned::PinnedCert::new(cert, &provider));
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ErrorKind::InvalidArgument(format!("TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(TlsOptions {
            config: Arc::new(config),
            server_name: None,
        })
    }

    /// Uses a rustls configuration built by the caller.
    ///
    /// ```
    /// use std::sync::Arc;
    /// let provider = Arc::new(rustls::crypto::ring::default_provider());
    /// let config = rustls::ClientConfig::builder_with_provider(provider)
    ///     .with_safe_default_protocol_versions()
    ///     .unwrap()
    ///     .with_root_certificates(rustls::RootCertStore::empty())
    ///     .with_no_client_auth();
    /// let tls = dflockd_client::TlsOptions::from_config(Arc::new(config));
    /// ```
    pub fn from_config(config: Arc<rustls::ClientConfig>) -> TlsOptions {
        TlsOptions {
            config,
            server_name: None,
        }
    }

    /// Verifies the server certificate against this name instead of the
    /// host of the server address.
    ///
    /// ```no_run
    /// # fn demo() -> dflockd_client::Result<()> {
    /// use dflockd_client::{Client, TlsOptions};
    /// // Connect by IP, verify the certificate issued for the DNS name.
    /// let tls = TlsOptions::with_ca_file("ca.pem")?.server_name("locks.internal")?;
    /// let client = Client::builder().server("10.0.0.5:6388".parse()?).tls(tls).build()?;
    /// # Ok(()) }
    /// ```
    pub fn server_name(mut self, name: &str) -> Result<TlsOptions> {
        let name = ServerName::try_from(name.to_owned())
            .map_err(|e| ErrorKind::InvalidArgument(format!("TLS server name: {e}")))?;
        self.server_name = Some(name);
        Ok(self)
    }
}

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The shared secret sent in the `auth` handshake. Never printed.
///
/// ```
/// let t = dflockd_client::AuthToken::new("s3cret").unwrap();
/// assert_eq!(format!("{t:?}"), "AuthToken(***)");
/// assert!(dflockd_client::AuthToken::new("a\nb").is_err());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken(String);

impl AuthToken {
    /// Validates a token: one line, at most 64 KiB.
    ///
    /// ```
    /// use dflockd_client::AuthToken;
    /// assert!(AuthToken::new("s3cret").is_ok());
    /// assert!(AuthToken::new("x".repeat(70_000)).is_err()); // over 64 KiB
    /// ```
    pub fn new(token: impl Into<String>) -> Result<AuthToken> {
        let token = token.into();
        if token.contains(['\r', '\n']) || token.len() > dflockd_proto::MAX_AUTH_LINE {
            return Err(ErrorKind::InvalidArgument(
                "auth token must be one line of at most 64 KiB".into(),
            )
            .into());
        }
        Ok(AuthToken(token))
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthToken(***)")
    }
}

/// Everything needed to open a connection to one server.
///
/// ```no_run
/// # async fn demo() -> dflockd_client::Result<()> {
/// use std::time::Duration;
/// use dflockd_client::{AuthToken, ConnectOptions, Connection};
/// let options = ConnectOptions {
///     auth_token: Some(AuthToken::new("s3cret")?),
///     connect_timeout: Duration::from_secs(3),
///     ..ConnectOptions::default()
/// };
/// let conn = Connection::connect(&"127.0.0.1:6388".parse()?, &options).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// TLS, if the server uses it.
    pub tls: Option<TlsOptions>,
    /// Shared secret, if the server requires one.
    pub auth_token: Option<AuthToken>,
    /// Bound on TCP connect + TLS handshake + auth.
    pub connect_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            tls: None,
            auth_token: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A custom sharding function: `(key, server_count) -> index`. Its result is
/// range-checked.
///
/// ```
/// use std::sync::Arc;
/// use dflockd_client::{ShardFn, Sharding};
/// let by_prefix: ShardFn = Arc::new(|key: &str, n: usize| if key.starts_with("eu/") { 0 } else { 1 % n });
/// let sharding = Sharding::Custom(by_prefix);
/// ```
pub type ShardFn = Arc<dyn Fn(&str, usize) -> usize + Send + Sync>;

/// How keys are spread over several servers.
///
/// ```no_run
/// # fn demo() -> dflockd_client::Result<()> {
/// use std::sync::Arc;
/// use dflockd_client::{Client, Sharding};
/// // Keep every "tenant-a/…" key on server 0.
/// let sharding = Sharding::Custom(Arc::new(|key: &str, n: usize| if key.starts_with("tenant-a/") { 0 } else { key.len() % n }));
/// let client = Client::builder().server("10.0.0.1:6388".parse()?).server("10.0.0.2:6388".parse()?).sharding(sharding).build()?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub enum Sharding {
    /// CRC-32/IEEE of the key modulo the server count — identical to the Go,
    /// Python and TypeScript clients.
    #[default]
    Crc32,
    /// A caller-supplied function.
    Custom(ShardFn),
}

impl std::fmt::Debug for Sharding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sharding::Crc32 => f.write_str("Crc32"),
            Sharding::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}
