//! A blocking facade for programs without an async runtime: the same
//! handles and guards, each call running on a runtime the client owns.
//!
//! Do not call these methods from inside an async task (they block the
//! thread); use the async API there.
//!
//! ```no_run
//! use std::time::Duration;
//! use dflockd_client::blocking::{Client, Interrupt};
//!
//! let client = Client::builder().server("127.0.0.1:6388".parse()?).build()?;
//! let lock = client.lock("cron/backup")?;
//! let stop = Interrupt::new(); // call stop.interrupt() from another thread to give up
//! if let Some(lease) = lock.acquire_interruptible(Duration::from_secs(30), &stop)? {
//!     // … work, checking lease.is_lost() …
//!     lease.release()?;
//! }
//! # Ok::<(), dflockd_client::Error>(())
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use crate::{
    ClientBuilder as AsyncBuilder, Error, ErrorKind, Key, Released, Result, ServerAddr, Stats,
    TlsOptions, Token,
};

/// Builds a blocking [`Client`]; the same settings as the async builder.
///
/// ```no_run
/// use std::time::Duration;
/// let client = dflockd_client::blocking::Client::builder()
///     .server("10.0.0.1:6388".parse()?)
///     .auth_token("s3cret")?
///     .default_lease(Duration::from_secs(30))
///     .build()?;
/// # Ok::<(), dflockd_client::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ClientBuilder(AsyncBuilder);

impl ClientBuilder {
    /// Adds a server.
    ///
    /// ```
    /// let client = dflockd_client::blocking::Client::builder()
    ///     .server("10.0.0.1:6388".parse()?)
    ///     .server("10.0.0.2:6388".parse()?)
    ///     .build()?; // connects lazily, on first use
    /// assert_eq!(client.as_async().servers().len(), 2);
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn server(self, addr: ServerAddr) -> Self {
        ClientBuilder(self.0.server(addr))
    }

    /// Connect with TLS.
    ///
    /// ```no_run
    /// use dflockd_client::{TlsOptions, blocking::Client};
    /// let client = Client::builder()
    ///     .server("locks.internal:6388".parse()?)
    ///     .tls(TlsOptions::with_ca_file("/etc/dflockd/ca.pem")?)
    ///     .build()?;
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn tls(self, tls: TlsOptions) -> Self {
        ClientBuilder(self.0.tls(tls))
    }

    /// Send this shared secret first on every connection.
    ///
    /// ```
    /// use dflockd_client::blocking::Client;
    /// assert!(Client::builder().auth_token("s3cret").is_ok());
    /// assert!(Client::builder().auth_token("line\nbreak").is_err());
    /// ```
    pub fn auth_token(self, token: &str) -> Result<Self> {
        Ok(ClientBuilder(self.0.auth_token(token)?))
    }

    /// Lease to request when a handle names none.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// let client = dflockd_client::blocking::Client::builder().default_lease(Duration::from_secs(120)).build()?;
    /// let lease = client.lock("backup")?.acquire()?; // a 120 s lease, renewed in the background
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn default_lease(self, lease: Duration) -> Self {
        ClientBuilder(self.0.default_lease(lease))
    }

    /// How long `acquire()` waits by default.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// let client = dflockd_client::blocking::Client::builder().acquire_timeout(Duration::from_secs(2)).build()?;
    /// if let Err(error) = client.lock("backup")?.acquire() && matches!(error.kind(), dflockd_client::ErrorKind::Timeout) {
    ///     eprintln!("a backup is already running");
    /// }
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn acquire_timeout(self, timeout: Duration) -> Self {
        ClientBuilder(self.0.acquire_timeout(timeout))
    }

    /// Any other setting, on the async builder.
    ///
    /// ```
    /// use std::time::Duration;
    /// let client = dflockd_client::blocking::Client::builder()
    ///     .configure(|b| b.keepalive(Duration::from_secs(5)).multiplex(false))
    ///     .build()?;
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn configure(self, f: impl FnOnce(AsyncBuilder) -> AsyncBuilder) -> Self {
        ClientBuilder(f(self.0))
    }

    /// Starts a small runtime (two worker threads) and the client on it.
    ///
    /// ```
    /// // No runtime needed: the blocking client starts its own.
    /// let client = dflockd_client::blocking::Client::builder().build()?;
    /// assert_eq!(client.as_async().servers()[0].port(), 6388);
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn build(self) -> Result<Client> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dflockd-client")
            .enable_all()
            .build()
            .map_err(Error::from)?;
        let inner = {
            let _guard = runtime.enter();
            self.0.build()?
        };
        Ok(Client {
            runtime: Arc::new(runtime),
            inner,
        })
    }
}

/// Lets another thread stop a blocking acquire or wait.
///
/// ```
/// let stop = dflockd_client::blocking::Interrupt::new();
/// let other = stop.clone();
/// other.interrupt();
/// assert!(stop.is_interrupted());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Interrupt(CancellationToken);

impl Interrupt {
    /// A fresh, un-fired interrupt.
    ///
    /// ```
    /// let stop = dflockd_client::blocking::Interrupt::new();
    /// assert!(!stop.is_interrupted());
    /// ```
    pub fn new() -> Interrupt {
        Interrupt::default()
    }

    /// Fires it: pending and future interruptible calls fail with `ErrorKind::Interrupted`.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use dflockd_client::blocking::{Client, Interrupt};
    /// let client = Client::builder().build()?;
    /// let stop = Interrupt::new();
    /// let ctrl_c = stop.clone(); // e.g. moved into a signal-handling thread
    /// std::thread::spawn(move || { std::thread::sleep(Duration::from_secs(5)); ctrl_c.interrupt() });
    /// match client.lock("migrate")?.acquire_interruptible(Duration::from_secs(60), &stop) {
    ///     Err(error) if matches!(error.kind(), dflockd_client::ErrorKind::Interrupted) => eprintln!("gave up waiting"),
    ///     other => { other?; }
    /// }
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn interrupt(&self) {
        self.0.cancel();
    }

    /// Whether it has fired.
    ///
    /// ```
    /// let stop = dflockd_client::blocking::Interrupt::new();
    /// stop.interrupt();
    /// stop.interrupt(); // firing twice is harmless
    /// assert!(stop.is_interrupted());
    /// ```
    pub fn is_interrupted(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// The blocking client. Clone freely.
///
/// ```no_run
/// let client = dflockd_client::blocking::Client::builder().server("127.0.0.1:6388".parse()?).build()?;
/// let lease = client.lock("cron/backup")?.acquire()?;
/// // … the backup …
/// lease.release()?;
/// # Ok::<(), dflockd_client::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    runtime: Arc<Runtime>,
    inner: crate::Client,
}

impl Client {
    /// A builder with the defaults.
    ///
    /// ```no_run
    /// let client = dflockd_client::blocking::Client::builder().server("127.0.0.1:6388".parse()?).build()?;
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The async client underneath.
    ///
    /// ```
    /// let client = dflockd_client::blocking::Client::builder().build()?;
    /// // Settings and helpers of the async client are there too.
    /// assert_eq!(client.as_async().server_for("jobs/nightly")?, 0);
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    /// A lock handle.
    ///
    /// ```
    /// use dflockd_client::blocking::Client;
    /// # let runtime = tokio::runtime::Runtime::new()?;
    /// # let server = runtime.block_on(dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()))?;
    /// let client = Client::builder().server(server.local_addr().into()).build()?;
    /// let lock = client.lock("cron/backup")?;
    /// let lease = lock.acquire()?;
    /// assert!(lock.try_acquire()?.is_none()); // held
    /// lease.release()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn lock(&self, key: &str) -> Result<Lock> {
        Ok(Lock {
            runtime: Arc::clone(&self.runtime),
            inner: self.inner.lock(key)?,
        })
    }

    /// A semaphore handle.
    ///
    /// ```no_run
    /// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
    /// // At most 3 concurrent exports across every host.
    /// let exports = client.semaphore("exports", 3)?;
    /// let slot = exports.acquire()?;
    /// slot.release()?;
    /// # Ok(()) }
    /// ```
    pub fn semaphore(&self, key: &str, limit: u32) -> Result<Semaphore> {
        Ok(Semaphore {
            runtime: Arc::clone(&self.runtime),
            inner: self.inner.semaphore(key, limit)?,
        })
    }

    /// The `stats` document of server `index`.
    ///
    /// ```no_run
    /// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
    /// let stats = client.stats(0)?;
    /// println!("{} connections, {} busy locks", stats.connections, stats.locks.len());
    /// # Ok(()) }
    /// ```
    pub fn stats(&self, index: usize) -> Result<Stats> {
        self.runtime.block_on(self.inner.stats(index))
    }
}

fn interruptible<T>(
    runtime: &Runtime,
    interrupt: &Interrupt,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    runtime.block_on(async {
        tokio::select! {
            result = fut => result,
            // Dropping the acquire future withdraws it without leaking a grant.
            _ = interrupt.0.cancelled() => Err(ErrorKind::Interrupted.into()),
        }
    })
}

/// Result of a blocking two-phase enqueue.
///
/// ```no_run
/// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
/// use std::time::Duration;
/// use dflockd_client::blocking::Enqueue;
/// let lease = match client.lock("jobs/compact")?.enqueue()? {
///     Enqueue::Acquired(lease) => lease,
///     Enqueue::Queued(ticket) => ticket.wait(Duration::from_secs(30))?,
/// };
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub enum Enqueue {
    /// Granted at once.
    Acquired(Lease),
    /// Queued; wait with [`Ticket::wait`].
    Queued(Ticket),
}

/// A place in a key's queue.
///
/// ```no_run
/// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
/// use std::time::Duration;
/// if let dflockd_client::blocking::Enqueue::Queued(ticket) = client.lock("jobs/compact")?.enqueue()? {
///     // Hold the place in line while preparing; then collect the grant.
///     let lease = ticket.wait(Duration::from_secs(60))?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Ticket {
    runtime: Arc<Runtime>,
    inner: crate::Ticket,
}

impl Ticket {
    /// Waits for the grant; an `ErrorKind::Timeout` error when it does not come in time.
    ///
    /// ```no_run
    /// # fn demo(ticket: dflockd_client::blocking::Ticket) -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// match ticket.wait(Duration::from_secs(10)) {
    ///     Ok(lease) => { lease.release()?; }
    ///     Err(error) if matches!(error.kind(), dflockd_client::ErrorKind::Timeout) => eprintln!("not granted in 10 s; the place is gone"),
    ///     Err(other) => return Err(other),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn wait(self, timeout: Duration) -> Result<Lease> {
        let lease = self.runtime.block_on(self.inner.wait(timeout))?;
        Ok(Lease {
            runtime: self.runtime,
            inner: Some(lease),
        })
    }

    /// Like [`wait`](Self::wait), stoppable from another thread.
    ///
    /// ```no_run
    /// # fn demo(ticket: dflockd_client::blocking::Ticket) -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// let stop = dflockd_client::blocking::Interrupt::new(); // fired by a shutdown hook elsewhere
    /// let lease = ticket.wait_interruptible(Duration::from_secs(300), &stop)?;
    /// # Ok(()) }
    /// ```
    pub fn wait_interruptible(self, timeout: Duration, interrupt: &Interrupt) -> Result<Lease> {
        let lease = interruptible(&self.runtime, interrupt, self.inner.wait(timeout))?;
        Ok(Lease {
            runtime: self.runtime,
            inner: Some(lease),
        })
    }
}

macro_rules! blocking_handle {
    ($name:ident, $what:literal) => {
        #[doc = concat!("A blocking ", $what, " handle.")]
        ///
        /// ```no_run
        /// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
        /// let lock: dflockd_client::blocking::Lock = client.lock("cron/backup")?;
        /// let pool: dflockd_client::blocking::Semaphore = client.semaphore("db/pool", 10)?;
        /// let (a, b) = (lock.acquire()?, pool.acquire()?);
        /// # Ok(()) }
        /// ```
        #[derive(Debug, Clone)]
        pub struct $name {
            runtime: Arc<Runtime>,
            inner: crate::$name,
        }

        impl $name {
            /// The key.
            ///
            /// ```no_run
            /// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
            /// let lock = client.lock("cron/backup")?;
            /// assert_eq!(lock.key().as_bytes(), b"cron/backup");
            /// # Ok(()) }
            /// ```
            pub fn key(&self) -> &Key {
                self.inner.key()
            }

            /// Requests this lease length instead of the default.
            ///
            /// ```no_run
            /// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
            /// use std::time::Duration;
            /// let lease = client.lock("cron/backup")?.with_lease(Duration::from_secs(300)).acquire()?;
            /// # Ok(()) }
            /// ```
            pub fn with_lease(self, lease: Duration) -> Self {
                $name {
                    runtime: self.runtime,
                    inner: self.inner.with_lease(lease),
                }
            }

            /// Waits this long in `acquire` instead of the client default.
            ///
            /// ```no_run
            /// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
            /// use std::time::Duration;
            /// let pool = client.semaphore("db/pool", 10)?.with_timeout(Duration::from_secs(2));
            /// let slot = pool.acquire()?; // an `ErrorKind::Timeout` error after 2 s if all 10 stay busy
            /// # Ok(()) }
            /// ```
            pub fn with_timeout(self, timeout: Duration) -> Self {
                $name {
                    runtime: self.runtime,
                    inner: self.inner.with_timeout(timeout),
                }
            }

            /// Acquires, waiting up to the handle's timeout; an `ErrorKind::Timeout` error if busy.
            ///
            /// ```no_run
            /// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
            /// let lease = client.lock("cron/backup")?.acquire()?;
            /// println!("holding with fence {}", lease.fence());
            /// lease.release()?;
            /// # Ok(()) }
            /// ```
            pub fn acquire(&self) -> Result<Lease> {
                let lease = self.runtime.block_on(self.inner.acquire())?;
                Ok(self.wrap(lease))
            }

            /// Acquires if free right now.
            ///
            /// ```no_run
            /// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
            /// match client.lock("cron/backup")?.try_acquire()? {
            ///     Some(lease) => { /* run the backup */ lease.release()?; }
            ///     None => println!("another host is running it"),
            /// }
            /// # Ok(()) }
            /// ```
            pub fn try_acquire(&self) -> Result<Option<Lease>> {
                Ok(self
                    .runtime
                    .block_on(self.inner.try_acquire())?
                    .map(|l| self.wrap(l)))
            }

            /// Acquires, waiting up to `timeout`; `None` if it stayed busy.
            ///
            /// ```no_run
            /// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
            /// use std::time::Duration;
            /// if let Some(slot) = client.semaphore("exports", 3)?.acquire_within(Duration::from_secs(5))? {
            ///     slot.release()?;
            /// }
            /// # Ok(()) }
            /// ```
            pub fn acquire_within(&self, timeout: Duration) -> Result<Option<Lease>> {
                Ok(self
                    .runtime
                    .block_on(self.inner.acquire_within(timeout))?
                    .map(|l| self.wrap(l)))
            }

            /// Like [`acquire_within`](Self::acquire_within), stoppable from another thread.
            ///
            /// ```no_run
            /// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
            /// use std::time::Duration;
            /// use dflockd_client::blocking::Interrupt;
            /// let stop = Interrupt::new();
            /// let ui = stop.clone(); // a "Cancel" button calls ui.interrupt()
            /// let lease = client.lock("migrate")?.acquire_interruptible(Duration::from_secs(600), &stop)?;
            /// # Ok(()) }
            /// ```
            pub fn acquire_interruptible(
                &self,
                timeout: Duration,
                interrupt: &Interrupt,
            ) -> Result<Option<Lease>> {
                Ok(
                    interruptible(&self.runtime, interrupt, self.inner.acquire_within(timeout))?
                        .map(|l| self.wrap(l)),
                )
            }

            /// Two-phase acquire, phase 1.
            ///
            /// ```no_run
            /// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
            /// use std::time::Duration;
            /// use dflockd_client::blocking::Enqueue;
            /// let lease = match client.semaphore("encoders", 2)?.enqueue()? {
            ///     Enqueue::Acquired(lease) => lease,
            ///     Enqueue::Queued(ticket) => ticket.wait(Duration::from_secs(30))?,
            /// };
            /// # Ok(()) }
            /// ```
            pub fn enqueue(&self) -> Result<Enqueue> {
                Ok(match self.runtime.block_on(self.inner.enqueue())? {
                    crate::Enqueue::Acquired(lease) => Enqueue::Acquired(self.wrap(lease)),
                    crate::Enqueue::Queued(ticket) => Enqueue::Queued(Ticket {
                        runtime: Arc::clone(&self.runtime),
                        inner: ticket,
                    }),
                })
            }

            fn wrap(&self, lease: crate::Lease) -> Lease {
                Lease {
                    runtime: Arc::clone(&self.runtime),
                    inner: Some(lease),
                }
            }
        }
    };
}

blocking_handle!(Lock, "lock");
blocking_handle!(Semaphore, "semaphore");

/// A held lease (blocking API). Renewed in the background; dropping it
/// releases it in the background.
///
/// ```no_run
/// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
/// let lease = client.lock("cron/backup")?.acquire()?;
/// for chunk in 0..100 {
///     if lease.is_lost() { break; }
///     // back up chunk `chunk`, tagging writes with lease.fence() …
/// }
/// lease.release()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Lease {
    runtime: Arc<Runtime>,
    inner: Option<crate::Lease>,
}

impl Lease {
    fn inner(&self) -> &crate::Lease {
        self.inner
            .as_ref()
            .expect("a live Lease always has its state")
    }

    /// The key.
    ///
    /// ```no_run
    /// # fn demo(lease: dflockd_client::blocking::Lease) {
    /// println!("holding {}", lease.key().to_string_lossy());
    /// # }
    /// ```
    pub fn key(&self) -> &Key {
        self.inner().key()
    }

    /// The token.
    ///
    /// ```no_run
    /// # fn demo(lease: dflockd_client::blocking::Lease) {
    /// let token = lease.token().to_string(); // send along with writes to fenced storage
    /// assert_eq!(dflockd_client::fence_from_token(&token).unwrap(), lease.fence());
    /// # }
    /// ```
    pub fn token(&self) -> Token {
        self.inner().token()
    }

    /// The fence.
    ///
    /// ```no_run
    /// # fn demo(client: dflockd_client::blocking::Client) -> dflockd_client::Result<()> {
    /// let lock = client.lock("ledger")?;
    /// let first = lock.acquire()?.fence();
    /// let second = lock.acquire()?; // the first guard was dropped: released in the background
    /// assert!(second.fence() > first);
    /// # Ok(()) }
    /// ```
    pub fn fence(&self) -> u64 {
        self.inner().fence()
    }

    /// The latest instant the lease is known valid.
    ///
    /// ```no_run
    /// # fn demo(lease: dflockd_client::blocking::Lease) {
    /// let left = lease.deadline().saturating_duration_since(std::time::Instant::now());
    /// println!("valid for at least {left:?}");
    /// # }
    /// ```
    pub fn deadline(&self) -> std::time::Instant {
        self.inner().deadline().into_std()
    }

    /// Whether the lease is known lost.
    ///
    /// ```no_run
    /// # fn demo(lease: dflockd_client::blocking::Lease, rows: Vec<u64>) {
    /// for row in rows {
    ///     if lease.is_lost() { break; } // someone else may hold it now
    ///     // update `row` …
    /// }
    /// # }
    /// ```
    pub fn is_lost(&self) -> bool {
        self.inner().is_lost()
    }

    /// Why it was lost, once it is.
    ///
    /// ```no_run
    /// # fn demo(lease: dflockd_client::blocking::Lease) {
    /// use std::time::Duration;
    /// if lease.wait_lost(Duration::from_secs(60)) {
    ///     eprintln!("lost: {:?}", lease.loss_reason());
    /// }
    /// # }
    /// ```
    pub fn loss_reason(&self) -> Option<crate::LossReason> {
        self.inner().loss_reason()
    }

    /// A token cancelled when the lease is lost (usable from any thread).
    ///
    /// ```no_run
    /// # fn demo(lease: dflockd_client::blocking::Lease) {
    /// let stop = lease.cancellation_token();
    /// let worker = std::thread::spawn(move || {
    ///     while !stop.is_cancelled() { /* one unit of protected work */ }
    /// });
    /// # }
    /// ```
    pub fn cancellation_token(&self) -> CancellationToken {
        self.inner().cancellation_token()
    }

    /// Blocks until the lease is lost or `timeout` passes; `true` if lost.
    ///
    /// ```no_run
    /// # fn demo(lease: dflockd_client::blocking::Lease) -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// // Hold the lock for a minute unless it is lost earlier.
    /// if !lease.wait_lost(Duration::from_secs(60)) {
    ///     lease.release()?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn wait_lost(&self, timeout: Duration) -> bool {
        let token = self.cancellation_token();
        self.runtime.block_on(async {
            tokio::time::timeout(timeout, token.cancelled())
                .await
                .is_ok()
        })
    }

    /// Releases the lease.
    ///
    /// ```no_run
    /// # fn demo(lease: dflockd_client::blocking::Lease) -> dflockd_client::Result<()> {
    /// use dflockd_client::Released;
    /// if lease.release()? == Released::AlreadyLost {
    ///     eprintln!("the lease had lapsed before the release");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn release(mut self) -> Result<Released> {
        let lease = self
            .inner
            .take()
            .expect("a live Lease always has its state");
        self.runtime.block_on(lease.release())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The async guard's Drop spawns the release on the client's runtime.
        drop(self.inner.take());
    }
}
