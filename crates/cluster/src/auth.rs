//! Mutual challenge-response over the shared cluster secret, before any
//! Raft message on a connection: each side sends a fresh 32-byte nonce and
//! proves it knows the secret with an HMAC-SHA256 of both nonces, so the
//! secret never crosses the wire and a recorded exchange cannot be replayed.
//!
//! ```text
//! caller → callee   nonce_c
//! callee → caller   nonce_s, HMAC(secret, "dflockd raft callee" ‖ nonce_c ‖ nonce_s)
//! caller → callee   HMAC(secret, "dflockd raft caller" ‖ nonce_s ‖ nonce_c)
//! ```

use std::io;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The cluster's shared secret for Raft links: at least
/// [`MIN_SECRET_BYTES`] bytes. Never printed.
///
/// ```
/// use dflockd_cluster::RaftSecret;
/// assert!(RaftSecret::new(vec![7; 32]).is_ok());
/// assert!(RaftSecret::new(b"short".to_vec()).is_err());
/// assert_eq!(format!("{:?}", RaftSecret::new(vec![7; 32]).unwrap()), "RaftSecret(***)");
/// ```
#[derive(Clone)]
pub struct RaftSecret(Vec<u8>);

/// The shortest secret a cluster takes.
///
/// ```
/// assert_eq!(dflockd_cluster::MIN_SECRET_BYTES, 32);
/// ```
pub const MIN_SECRET_BYTES: usize = 32;

/// A secret shorter than [`MIN_SECRET_BYTES`].
///
/// ```
/// let error = dflockd_cluster::RaftSecret::new(vec![1; 3]).unwrap_err();
/// assert!(error.to_string().contains("3 bytes"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("the Raft secret has {0} bytes; at least {MIN_SECRET_BYTES} are needed")]
pub struct ShortSecret(pub usize);

impl RaftSecret {
    /// A secret of at least [`MIN_SECRET_BYTES`] bytes.
    ///
    /// ```
    /// let secret = dflockd_cluster::RaftSecret::new(b"0123456789abcdef0123456789abcdef".to_vec());
    /// assert!(secret.is_ok());
    /// ```
    pub fn new(secret: Vec<u8>) -> Result<RaftSecret, ShortSecret> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(ShortSecret(secret.len()));
        }
        Ok(RaftSecret(secret))
    }

    fn proof(&self, role: &[u8], first: &[u8; 32], second: &[u8; 32]) -> Hmac<Sha256> {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(error) => unreachable!("HMAC takes keys of any length: {error}"),
        };
        mac.update(role);
        mac.update(first);
        mac.update(second);
        mac
    }
}

impl std::fmt::Debug for RaftSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RaftSecret(***)")
    }
}

const CALLEE: &[u8] = b"dflockd raft callee";
const CALLER: &[u8] = b"dflockd raft caller";

/// A fresh nonce from the OS (one per connection: the syscall is cheap
/// beside a TCP handshake).
fn nonce() -> io::Result<[u8; 32]> {
    use rand::TryRng;
    let mut nonce = [0u8; 32];
    rand::rngs::SysRng
        .try_fill_bytes(&mut nonce)
        .map_err(|e| io::Error::other(e.to_string()))?;
    Ok(nonce)
}

fn refused(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, what.to_string())
}

/// The calling side: proves itself and checks the callee.
pub(crate) async fn as_caller<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    stream: &mut S,
    secret: &RaftSecret,
) -> io::Result<()> {
    let mine = nonce()?;
    stream.write_all(&mine).await?;
    stream.flush().await?;
    let mut theirs = [0u8; 32];
    stream.read_exact(&mut theirs).await?;
    let mut proof = [0u8; 32];
    stream.read_exact(&mut proof).await?;
    secret
        .proof(CALLEE, &mine, &theirs)
        .verify_slice(&proof)
        .map_err(|_| refused("the peer does not know the cluster secret"))?;
    let answer = secret.proof(CALLER, &theirs, &mine).finalize().into_bytes();
    stream.write_all(&answer).await?;
    stream.flush().await
}

/// The called side: checks the caller and proves itself.
pub(crate) async fn as_callee<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    stream: &mut S,
    secret: &RaftSecret,
) -> io::Result<()> {
    let mut theirs = [0u8; 32];
    stream.read_exact(&mut theirs).await?;
    let mine = nonce()?;
    let proof = secret.proof(CALLEE, &theirs, &mine).finalize().into_bytes();
    let mut hello = Vec::with_capacity(64);
    hello.extend_from_slice(&mine);
    hello.extend_from_slice(&proof);
    stream.write_all(&hello).await?;
    stream.flush().await?;
    let mut answer = [0u8; 32];
    stream.read_exact(&mut answer).await?;
    secret
        .proof(CALLER, &mine, &theirs)
        .verify_slice(&answer)
        .map_err(|_| refused("the peer does not know the cluster secret"))
}
