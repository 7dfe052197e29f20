use thiserror::Error;

use crate::values::{push_decimal, write_decimal};
use crate::{Lease, MAX_REPLY_LINE, Seconds, Token};

/// Every non-success status word of dflockd v2.
///
/// ```
/// use dflockd_proto::{Reply, Status};
/// assert_eq!(Reply::parse(b"error_max_waiters\n").unwrap(), Reply::Failure(Status::ErrorMaxWaiters));
/// assert_eq!(Status::from_word(Status::ErrorDraining.word()), Some(Status::ErrorDraining));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// `timeout`: no grant within the requested time.
    Timeout,
    /// `error`: malformed request, token not held, renew of an expired lease…
    Error,
    /// `error_auth`: the handshake failed; the server closes the connection.
    ErrorAuth,
    /// `error_max_locks`: the server's key table is full.
    ErrorMaxLocks,
    /// `error_max_waiters`: the key's queue is full.
    ErrorMaxWaiters,
    /// `error_limit_mismatch`: the semaphore exists with another limit.
    ErrorLimitMismatch,
    /// `error_not_enqueued`: `w` without an `e` on this connection.
    ErrorNotEnqueued,
    /// `error_already_enqueued`: a second `e` for the same key.
    ErrorAlreadyEnqueued,
    /// `error_lease_expired`: the grant's lease ran out before it was observed.
    ErrorLeaseExpired,
    /// `error_draining`: the server is shutting down.
    ErrorDraining,
    /// `error_not_leader`: a cluster follower (carries an optional address).
    ErrorNotLeader,
}

impl Status {
    /// The status word on the wire.
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Status::ErrorMaxLocks.word(), "error_max_locks");
    /// ```
    pub fn word(self) -> &'static str {
        match self {
            Status::Timeout => "timeout",
            Status::Error => "error",
            Status::ErrorAuth => "error_auth",
            Status::ErrorMaxLocks => "error_max_locks",
            Status::ErrorMaxWaiters => "error_max_waiters",
            Status::ErrorLimitMismatch => "error_limit_mismatch",
            Status::ErrorNotEnqueued => "error_not_enqueued",
            Status::ErrorAlreadyEnqueued => "error_already_enqueued",
            Status::ErrorLeaseExpired => "error_lease_expired",
            Status::ErrorDraining => "error_draining",
            Status::ErrorNotLeader => "error_not_leader",
        }
    }

    /// Recognises a status word.
    ///
    /// ```
    /// use dflockd_proto::Status;
    /// assert_eq!(Status::from_word("timeout"), Some(Status::Timeout));
    /// assert_eq!(Status::from_word("okay"), None);
    /// ```
    pub fn from_word(word: &str) -> Option<Status> {
        Some(match word {
            "timeout" => Status::Timeout,
            "error" => Status::Error,
            "error_auth" => Status::ErrorAuth,
            "error_max_locks" => Status::ErrorMaxLocks,
            "error_max_waiters" => Status::ErrorMaxWaiters,
            "error_limit_mismatch" => Status::ErrorLimitMismatch,
            "error_not_enqueued" => Status::ErrorNotEnqueued,
            "error_already_enqueued" => Status::ErrorAlreadyEnqueued,
            "error_lease_expired" => Status::ErrorLeaseExpired,
            "error_draining" => Status::ErrorDraining,
            "error_not_leader" => Status::ErrorNotLeader,
            _ => return None,
        })
    }
}

/// One reply line, typed.
///
/// Replies have no request ids, and `ok` is overloaded; the shapes are still
/// unambiguous: `ok`, `ok <token> <lease>`, `ok <seconds>`, `ok {json}`.
///
/// ```
/// use dflockd_proto::{Lease, Reply, Token};
/// let grant = Reply::Granted { token: Token::new(5, 6), lease: Lease::new(33).unwrap() };
/// let line = grant.encode_to_vec();
/// assert_eq!(line, b"ok 00000000000000050000000000000006 33\n");
/// assert_eq!(Reply::parse(&line).unwrap(), grant);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `ok`
    Ok,
    /// `ok <token> <lease>`: granted by `l`, `sl`, `w` or `sw`.
    Granted {
        /// The grant token.
        token: Token,
        /// The lease in seconds.
        lease: Lease,
    },
    /// `acquired <token> <lease>`: `e`/`se` granted at once.
    Acquired {
        /// The grant token.
        token: Token,
        /// The lease in seconds.
        lease: Lease,
    },
    /// `queued`: `e`/`se` joined the queue.
    Queued,
    /// `ok <seconds>`: a renew applied this lease.
    Renewed(Seconds),
    /// `ok <json>`: the `stats` document.
    Stats(String),
    /// Any failure status. `error_not_leader` carries the leader address
    /// separately in [`Reply::NotLeader`].
    Failure(Status),
    /// `error_not_leader [<host:port>]`.
    NotLeader(Option<String>),
}

/// Why a reply line could not be understood. Never trust a server: these
/// are all reasons to poison the connection.
///
/// ```
/// use dflockd_proto::{Reply, ReplyError};
/// assert_eq!(Reply::parse(b"\xff\n"), Err(ReplyError::NotUtf8));
/// assert!(matches!(Reply::parse(b"granted\n"), Err(ReplyError::Malformed(_))));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReplyError {
    /// The line is longer than [`MAX_REPLY_LINE`].
    #[error("reply line too long")]
    TooLong,
    /// The line is not UTF-8.
    #[error("reply is not UTF-8")]
    NotUtf8,
    /// The line has an unknown status or the wrong fields.
    #[error("malformed reply: {0:?}")]
    Malformed(String),
}

impl Reply {
    /// Parses one reply line (with or without its LF / CRLF).
    ///
    /// ```
    /// use dflockd_proto::{Reply, Seconds, Status};
    /// assert_eq!(Reply::parse(b"ok 33\n").unwrap(), Reply::Renewed(Seconds::new(33).unwrap()));
    /// assert_eq!(Reply::parse(b"timeout\n").unwrap(), Reply::Failure(Status::Timeout));
    /// assert!(Reply::parse(b"okay\n").is_err());
    /// assert!(Reply::parse(b"ok 0000000000000001000000000000000a 0\n").is_err());
    /// ```
    pub fn parse(line: &[u8]) -> Result<Reply, ReplyError> {
        if line.len() > MAX_REPLY_LINE + 2 {
            return Err(ReplyError::TooLong);
        }
        let mut line = line;
        while let [rest @ .., b'\n' | b'\r'] = line {
            line = rest;
        }
        if line.len() > MAX_REPLY_LINE {
            return Err(ReplyError::TooLong);
        }
        let text = std::str::from_utf8(line).map_err(|_| ReplyError::NotUtf8)?;
        let malformed = || ReplyError::Malformed(text.chars().take(64).collect());
        let (word, rest) = match text.split_once(' ') {
            Some((w, r)) => (w, Some(r)),
            None => (text, None),
        };
        let grant = |rest: &str| -> Option<(Token, Lease)> {
            let mut parts = rest.split(' ');
            let token = Token::parse_wire(parts.next()?.as_bytes())?;
            let lease = Lease::new(parts.next()?.parse::<u64>().ok()?).ok()?;
            parts.next().is_none().then_some((token, lease))
        };
        match (word, rest) {
            ("ok", None) => Ok(Reply::Ok),
            ("ok", Some(rest)) if rest.starts_with('{') => Ok(Reply::Stats(rest.to_owned())),
            ("ok", Some(rest)) if !rest.contains(' ') => {
                let secs = rest.parse::<u64>().ok().and_then(|s| Seconds::new(s).ok());
                secs.map(Reply::Renewed).ok_or_else(malformed)
            }
            ("ok", Some(rest)) => grant(rest)
                .map(|(token, lease)| Reply::Granted { token, lease })
                .ok_or_else(malformed),
            ("acquired", Some(rest)) => grant(rest)
                .map(|(token, lease)| Reply::Acquired { token, lease })
                .ok_or_else(malformed),
            ("queued", None) => Ok(Reply::Queued),
            ("error_not_leader", addr) => Ok(Reply::NotLeader(
                addr.map(|a| a.trim().to_owned()).filter(|a| !a.is_empty()),
            )),
            (word, None) => Status::from_word(word)
                .map(Reply::Failure)
                .ok_or_else(malformed),
            _ => Err(malformed()),
        }
    }

    /// Appends the reply line (LF-terminated) to `out`.
    ///
    /// ```
    /// let mut out = Vec::new();
    /// dflockd_proto::Reply::Queued.encode(&mut out);
    /// assert_eq!(out, b"queued\n");
    /// ```
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Ok => out.extend_from_slice(b"ok"),
            Reply::Granted { token, lease } | Reply::Acquired { token, lease } => {
                // Every grant's reply: built on the stack, appended once.
                let word: &[u8] = if matches!(self, Reply::Granted { .. }) {
                    b"ok "
                } else {
                    b"acquired "
                };
                let mut line = [0u8; 9 + 32 + 1 + 20];
                let mut len = word.len();
                line[..len].copy_from_slice(word);
                line[len..len + 32].copy_from_slice(&token.hex());
                len += 32;
                line[len] = b' ';
                len += 1;
                len += write_decimal(&mut line[len..], lease.get());
                out.extend_from_slice(&line[..len]);
            }
            Reply::Queued => out.extend_from_slice(b"queued"),
            Reply::Renewed(secs) => {
                out.extend_from_slice(b"ok ");
                push_decimal(out, secs.get());
            }
            Reply::Stats(json) => {
                out.extend_from_slice(b"ok ");
                out.extend_from_slice(json.as_bytes());
            }
            Reply::Failure(status) => out.extend_from_slice(status.word().as_bytes()),
            Reply::NotLeader(addr) => {
                out.extend_from_slice(b"error_not_leader");
                if let Some(addr) = addr {
                    out.push(b' ');
                    out.extend_from_slice(addr.as_bytes());
                }
            }
        }
        out.push(b'\n');
    }

    /// [`encode`](Self::encode) into a fresh vector.
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Reply::Ok.encode_to_vec(), b"ok\n");
    /// ```
    pub fn encode_to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(56);
        self.encode(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(Reply::parse(b"ok\r\n").unwrap(), Reply::Ok);
        assert_eq!(Reply::parse(b"queued\n").unwrap(), Reply::Queued);
        assert_eq!(
            Reply::parse(b"error_not_leader\n").unwrap(),
            Reply::NotLeader(None)
        );
        assert_eq!(
            Reply::parse(b"error_not_leader 10.0.0.2:6389\n").unwrap(),
            Reply::NotLeader(Some("10.0.0.2:6389".into()))
        );
        assert!(matches!(
            Reply::parse(b"ok {\"connections\":1}\n").unwrap(),
            Reply::Stats(_)
        ));
        assert!(Reply::parse(b"ok 00000000000000010000000000000002 33 x\n").is_err());
        assert!(Reply::parse(b"ok 0000000000000001000000000000000 33\n").is_err());
        assert!(Reply::parse(b"ok 9223372037\n").is_err());
        assert!(Reply::parse(b"ok -1\n").is_err());
        assert!(Reply::parse(b"timeout now\n").is_err());
        assert!(Reply::parse(b"\xff\n").is_err());
        assert!(Reply::parse(&vec![b'o'; MAX_REPLY_LINE + 10]).is_err());
    }
}
