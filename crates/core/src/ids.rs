//! The names the table uses: connections, queue places, resources.

use std::sync::Arc;

use dflockd_proto::{Key, Namespace};

/// A connection identity, unique per server (0 is reserved for "nobody").
///
/// ```
/// # use std::time::Duration;
/// # use dflockd_core::*;
/// # use dflockd_proto::{Key, Lease, Limit, Namespace};
/// # let mut table = LockTable::new(TableConfig::default());
/// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
/// # let mut run = |op| table.apply(&Command::new(Duration::ZERO, Salt::new(0, 0), op));
/// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
/// // The server numbers its connections; a connection's holds and waits are tied to it.
/// let first = run(acquire(1, &rid, None)).outcome;
/// assert!(matches!(first, Ok(Outcome::Acquire(AcquireOutcome::Granted(_)))));
/// let second = run(acquire(2, &rid, None)).outcome;
/// assert_eq!(second, Ok(Outcome::Acquire(AcquireOutcome::Timeout)));
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ConnId(pub u64);

/// A queued waiter. Ids grow with arrival, so ordering ids is FIFO order.
///
/// ```
/// # use std::time::Duration;
/// # use dflockd_core::*;
/// # use dflockd_proto::{Key, Lease, Limit, Namespace};
/// # let mut table = LockTable::new(TableConfig::default());
/// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
/// # let mut run = |op| table.apply(&Command::new(Duration::ZERO, Salt::new(0, 0), op));
/// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
/// let _ = run(acquire(1, &rid, None));
/// let Ok(Outcome::Acquire(AcquireOutcome::Queued(a))) = run(acquire(2, &rid, Some(0))).outcome else { panic!() };
/// let Ok(Outcome::Acquire(AcquireOutcome::Queued(b))) = run(acquire(3, &rid, Some(0))).outcome else { panic!() };
/// assert!(a < b); // `a` arrived first and is granted first
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct WaiterId(pub(crate) u64);

/// One resource: a key in a namespace.
///
/// It carries its key's hash, computed once when it is named (with a keyed
/// SipHash whose key is random per process, so clients cannot choose
/// colliding keys); the table's maps then hash only that number, however
/// many of them one request looks up, and the hashing happens outside the
/// server's table lock.
///
/// ```
/// use dflockd_core::ResourceId;
/// use dflockd_proto::{Key, Namespace};
/// let a = ResourceId::new(Namespace::Lock, Key::new("x").unwrap());
/// let b = ResourceId::new(Namespace::Semaphore, Key::new("x").unwrap());
/// assert_ne!(a, b);
/// assert_eq!(a, ResourceId::new(Namespace::Lock, Key::new("x").unwrap()));
/// ```
#[derive(Clone)]
pub struct ResourceId(Arc<Named>);

/// What a [`ResourceId`] shares between its clones: a request's id, the
/// table's own copy and the queues' entries are each a pointer to it.
#[derive(Debug)]
struct Named {
    namespace: Namespace,
    key: Key,
    hash: u64,
}

impl std::fmt::Debug for ResourceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceId")
            .field("namespace", &self.0.namespace)
            .field("key", &self.0.key)
            .finish()
    }
}

impl Ord for ResourceId {
    /// Namespace, then key.
    fn cmp(&self, other: &ResourceId) -> std::cmp::Ordering {
        (self.0.namespace, &self.0.key).cmp(&(other.0.namespace, &other.0.key))
    }
}

impl PartialOrd for ResourceId {
    fn partial_cmp(&self, other: &ResourceId) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for ResourceId {
    fn eq(&self, other: &ResourceId) -> bool {
        // The cached hash first: different resources almost always differ
        // there, and equal ones usually share their key's bytes.
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.hash == other.0.hash
                && self.0.namespace == other.0.namespace
                && self.0.key == other.0.key)
    }
}

impl Eq for ResourceId {}

impl std::hash::Hash for ResourceId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash);
    }
}

/// Written as (namespace, key); the hash is made again when read back.
impl serde::Serialize for ResourceId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut tuple = serializer.serialize_tuple(2)?;
        tuple.serialize_element(&self.0.namespace)?;
        tuple.serialize_element(&self.0.key)?;
        tuple.end()
    }
}

impl<'de> serde::Deserialize<'de> for ResourceId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<ResourceId, D::Error> {
        let (namespace, key) = <(Namespace, Key)>::deserialize(deserializer)?;
        Ok(ResourceId::new(namespace, key))
    }
}

impl ResourceId {
    /// The cached keyed hash (the table's maps hash only this).
    pub(crate) fn hash(&self) -> u64 {
        self.0.hash
    }

    /// A resource whose hash is `hash`, to force collisions in tests.
    #[cfg(test)]
    pub(crate) fn with_hash(namespace: Namespace, key: Key, hash: u64) -> ResourceId {
        ResourceId(Arc::new(Named {
            namespace,
            key,
            hash,
        }))
    }

    /// Names a resource.
    ///
    /// ```
    /// use dflockd_proto::{Key, Namespace};
    /// let r = dflockd_core::ResourceId::new(Namespace::Lock, Key::new("k").unwrap());
    /// assert_eq!(r.key().as_bytes(), b"k");
    /// ```
    pub fn new(namespace: Namespace, key: Key) -> ResourceId {
        use std::hash::BuildHasher;
        static KEYED: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
        let hash = KEYED
            .get_or_init(std::hash::RandomState::new)
            .hash_one((namespace, key.as_bytes()));
        ResourceId(Arc::new(Named {
            namespace,
            key,
            hash,
        }))
    }

    /// The namespace (lock or semaphore).
    ///
    /// ```
    /// use dflockd_proto::{Key, Namespace};
    /// let r = dflockd_core::ResourceId::new(Namespace::Semaphore, Key::new("pool").unwrap());
    /// assert_eq!(r.namespace(), Namespace::Semaphore);
    /// ```
    pub fn namespace(&self) -> Namespace {
        self.0.namespace
    }

    /// The key.
    ///
    /// ```
    /// use dflockd_proto::{Key, Namespace};
    /// let r = dflockd_core::ResourceId::new(Namespace::Lock, Key::new("jobs/7").unwrap());
    /// assert_eq!(r.key().as_bytes(), b"jobs/7");
    /// ```
    pub fn key(&self) -> &Key {
        &self.0.key
    }

    /// Which of `shards` tables holds this resource, for a server that
    /// splits its keys over several tables: a function of the resource's
    /// cached hash, so the same in every call of one process (and spread
    /// unpredictably from outside, as the hash is keyed). `shards` must not
    /// be zero.
    ///
    /// ```
    /// use dflockd_proto::{Key, Namespace};
    /// let r = dflockd_core::ResourceId::new(Namespace::Lock, Key::new("k").unwrap());
    /// assert!(r.shard(16) < 16);
    /// assert_eq!(r.shard(16), r.clone().shard(16));
    /// assert_eq!(r.shard(1), 0);
    /// ```
    pub fn shard(&self, shards: usize) -> usize {
        // The high half: the tables' own hash maps see the whole hash, and
        // foldhash mixes it again, so their buckets stay spread.
        ((self.0.hash >> 32) % shards.max(1) as u64) as usize
    }
}
