//! What the node's redb file holds and how its values are written: the
//! tables, and postcard for every value.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Log entries by index (postcard-encoded [`Entry`](crate::Entry)).
pub(crate) const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
/// Single values by name: [`VOTE`], [`COMMITTED`], [`LAST_PURGED`],
/// [`SNAPSHOT`].
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub(crate) const VOTE: &str = "vote";
pub(crate) const COMMITTED: &str = "committed";
pub(crate) const LAST_PURGED: &str = "last_purged";
pub(crate) const SNAPSHOT: &str = "snapshot";
/// How many times a node has started on this file.
pub(crate) const INCARNATION: &str = "incarnation";

/// Reads one META value.
pub(crate) fn read_meta(db: &Database, name: &str) -> Result<Option<Vec<u8>>, redb::Error> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    Ok(meta.get(name)?.map(|value| value.value().to_vec()))
}

/// Writes one META value, durably.
pub(crate) fn write_meta(db: &Database, name: &str, value: &[u8]) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert(name, value)?;
    }
    txn.commit()?;
    Ok(())
}

/// Postcard bytes of a value the node wrote itself.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Writing to a Vec cannot fail for these types (no maps with non-string
    // keys, no unsized sequences): postcard fails only when its output is
    // full, and a Vec grows.
    match postcard::to_allocvec(value) {
        Ok(bytes) => bytes,
        Err(error) => unreachable!("postcard refused an in-memory value: {error}"),
    }
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}
