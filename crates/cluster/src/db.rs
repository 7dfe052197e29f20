//! The open storage file, and a signal that it has been released.

use redb::Database;

/// The open file, and a signal that the file has been released: the
/// sender drops (and its receivers wake) after the database itself, as
/// fields drop in order — unlike a count of handles, which reaches zero
/// before the file is closed.
pub(crate) struct Db {
    database: Database,
    closed: tokio::sync::watch::Sender<()>,
}

impl std::ops::Deref for Db {
    type Target = Database;
    fn deref(&self) -> &Database {
        &self.database
    }
}

/// Resolves once a storage file has been closed (see `Storage::closed`).
pub(crate) type Closed = tokio::sync::watch::Receiver<()>;

impl Db {
    /// Wraps an open database.
    pub(crate) fn new(database: Database) -> Db {
        Db {
            database,
            closed: tokio::sync::watch::Sender::new(()),
        }
    }

    /// A handle that sees the file closed: `changed()` fails once every
    /// `Db` handle is dropped and the file released.
    pub(crate) fn closed(&self) -> Closed {
        self.closed.subscribe()
    }
}
