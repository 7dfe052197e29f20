use thiserror::Error;

/// Why [`shard`] could not pick a server.
///
/// ```
/// use dflockd_proto::{ShardError, shard};
/// assert_eq!(shard("jobs", 0), Err(ShardError::NoServers));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ShardError {
    /// There are no servers to choose from.
    #[error("no servers to shard across")]
    NoServers,
}

/// Picks the server index for `key` among `servers` servers:
/// CRC-32/IEEE of the key's UTF-8 bytes modulo the server count, exactly like
/// the Go, Python and TypeScript clients.
///
/// ```
/// use dflockd_proto::shard;
/// assert_eq!(shard("my-key", 3), Ok(2));
/// assert_eq!(shard("a", 3), Ok(0));
/// assert_eq!(shard("lock-0", 3), Ok(1));
/// assert!(shard("a", 0).is_err());
/// ```
pub fn shard(key: &str, servers: usize) -> Result<usize, ShardError> {
    if servers == 0 {
        return Err(ShardError::NoServers);
    }
    let crc = crc32fast::hash(key.as_bytes());
    Ok((u64::from(crc) % servers as u64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_other_clients_for_three_servers() {
        for (key, expected) in [
            ("my-key", 2),
            ("row:42", 2),
            ("a", 0),
            ("lock-0", 1),
            ("日本", 2),
        ] {
            assert_eq!(shard(key, 3), Ok(expected), "{key}");
        }
    }

    #[test]
    fn matches_the_other_clients_for_five_servers() {
        for (key, expected) in [
            ("my-key", 2),
            ("row:42", 0),
            ("a", 2),
            ("lock-0", 1),
            ("日本", 1),
        ] {
            assert_eq!(shard(key, 5), Ok(expected), "{key}");
        }
    }

    #[test]
    fn crc_values_are_ieee() {
        assert_eq!(crc32fast::hash(b"my-key"), 3_605_215_937);
        assert_eq!(crc32fast::hash("日本".as_bytes()), 3_350_711_756);
    }
}
