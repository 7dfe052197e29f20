use thiserror::Error;

/// Why a frame was rejected. Every variant is answered `error` on the wire and
/// keeps the connection open; [`ProtoError::code`] gives the numeric code the
/// Go server logs for it.
///
/// ```
/// use dflockd_proto::{FrameDecoder, ProtoError, Request};
/// let mut d = FrameDecoder::new();
/// d.feed(b"l\na b\n0\n");
/// assert_eq!(Request::parse(&d.frame()), Err(ProtoError::InvalidKey));
/// assert_eq!(ProtoError::InvalidKey.code(), 5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ProtoError {
    /// The command word is not a dflockd v2 command.
    #[error("unknown command")]
    UnknownCommand,
    /// A numeric field is not a base-10 64-bit integer.
    #[error("invalid integer")]
    InvalidInteger,
    /// The key is empty or contains space, tab, CR or LF.
    #[error("invalid key")]
    InvalidKey,
    /// A timeout is negative or above the maximum.
    #[error("invalid timeout")]
    InvalidTimeout,
    /// A release or renew carries no token.
    #[error("empty token")]
    EmptyToken,
    /// The argument has the wrong number of fields.
    #[error("wrong number of arguments")]
    BadArity,
    /// A lease is below 1 s or above the maximum.
    #[error("invalid lease")]
    InvalidLease,
    /// A semaphore limit is below 1 or above 1,048,576.
    #[error("invalid semaphore limit")]
    InvalidLimit,
}

impl ProtoError {
    /// The Go server's internal error code for this failure (spec §1.12).
    ///
    /// ```
    /// assert_eq!(dflockd_proto::ProtoError::UnknownCommand.code(), 3);
    /// ```
    pub fn code(self) -> u8 {
        match self {
            ProtoError::UnknownCommand => 3,
            ProtoError::InvalidInteger => 4,
            ProtoError::InvalidKey => 5,
            ProtoError::InvalidTimeout => 6,
            ProtoError::EmptyToken => 7,
            ProtoError::BadArity => 8,
            ProtoError::InvalidLease => 9,
            ProtoError::InvalidLimit => 13,
        }
    }
}
