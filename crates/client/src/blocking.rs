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
    ClientBuilder as AsyncBuilder, Error, Key, Released, Result, ServerAddr, Stats, TlsOptions,
    Token,
};

/// Builds a blocking [`Client`]; the same settings as the async builder.
#[derive(Debug, Clone, Default)]
pub struct ClientBuilder(AsyncBuilder);

impl ClientBuilder {
    /// Adds a server.
    pub fn server(self, addr: ServerAddr) -> Self {
        ClientBuilder(self.0.server(addr))
    }

    /// Connect with TLS.
    pub fn tls(self, tls: TlsOptions) -> Self {
        ClientBuilder(self.0.tls(tls))
    }

    /// Send this shared secret first on every connection.
    pub fn auth_token(self, token: &str) -> Result<Self> {
        Ok(ClientBuilder(self.0.auth_token(token)?))
    }

    /// Lease to request when a handle names none.
    pub fn default_lease(self, lease: Duration) -> Self {
        ClientBuilder(self.0.default_lease(lease))
    }

    /// How long `acquire()` waits by default.
    pub fn acquire_timeout(self, timeout: Duration) -> Self {
        ClientBuilder(self.0.acquire_timeout(timeout))
    }

    /// Any other setting, on the async builder.
    pub fn configure(self, f: impl FnOnce(AsyncBuilder) -> AsyncBuilder) -> Self {
        ClientBuilder(f(self.0))
    }

    /// Starts a small runtime (two worker threads) and the client on it.
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
    pub fn new() -> Interrupt {
        Interrupt::default()
    }

    /// Fires it: pending and future interruptible calls return `Error::Interrupted`.
    pub fn interrupt(&self) {
        self.0.cancel();
    }

    /// Whether it has fired.
    pub fn is_interrupted(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// The blocking client. Clone freely.
#[derive(Debug, Clone)]
pub struct Client {
    runtime: Arc<Runtime>,
    inner: crate::Client,
}

impl Client {
    /// A builder with the defaults.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The async client underneath.
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    /// A lock handle.
    pub fn lock(&self, key: &str) -> Result<Lock> {
        Ok(Lock {
            runtime: Arc::clone(&self.runtime),
            inner: self.inner.lock(key)?,
        })
    }

    /// A semaphore handle.
    pub fn semaphore(&self, key: &str, limit: u32) -> Result<Semaphore> {
        Ok(Semaphore {
            runtime: Arc::clone(&self.runtime),
            inner: self.inner.semaphore(key, limit)?,
        })
    }

    /// The `stats` document of server `index`.
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
            _ = interrupt.0.cancelled() => Err(Error::Interrupted),
        }
    })
}

/// Result of a blocking two-phase enqueue.
#[derive(Debug)]
pub enum Enqueue {
    /// Granted at once.
    Acquired(Lease),
    /// Queued; wait with [`Ticket::wait`].
    Queued(Ticket),
}

/// A place in a key's queue.
#[derive(Debug)]
pub struct Ticket {
    runtime: Arc<Runtime>,
    inner: crate::Ticket,
}

impl Ticket {
    /// Waits for the grant; `Err(Error::Timeout)` when it does not come in time.
    pub fn wait(self, timeout: Duration) -> Result<Lease> {
        let lease = self.runtime.block_on(self.inner.wait(timeout))?;
        Ok(Lease {
            runtime: self.runtime,
            inner: Some(lease),
        })
    }

    /// Like [`wait`](Self::wait), stoppable from another thread.
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
        #[derive(Debug, Clone)]
        pub struct $name {
            runtime: Arc<Runtime>,
            inner: crate::$name,
        }

        impl $name {
            /// The key.
            pub fn key(&self) -> &Key {
                self.inner.key()
            }

            /// Requests this lease length instead of the default.
            pub fn with_lease(self, lease: Duration) -> Self {
                $name {
                    runtime: self.runtime,
                    inner: self.inner.with_lease(lease),
                }
            }

            /// Waits this long in `acquire` instead of the client default.
            pub fn with_timeout(self, timeout: Duration) -> Self {
                $name {
                    runtime: self.runtime,
                    inner: self.inner.with_timeout(timeout),
                }
            }

            /// Acquires, waiting up to the handle's timeout; `Err(Error::Timeout)` if busy.
            pub fn acquire(&self) -> Result<Lease> {
                let lease = self.runtime.block_on(self.inner.acquire())?;
                Ok(self.wrap(lease))
            }

            /// Acquires if free right now.
            pub fn try_acquire(&self) -> Result<Option<Lease>> {
                Ok(self
                    .runtime
                    .block_on(self.inner.try_acquire())?
                    .map(|l| self.wrap(l)))
            }

            /// Acquires, waiting up to `timeout`; `None` if it stayed busy.
            pub fn acquire_within(&self, timeout: Duration) -> Result<Option<Lease>> {
                Ok(self
                    .runtime
                    .block_on(self.inner.acquire_within(timeout))?
                    .map(|l| self.wrap(l)))
            }

            /// Like [`acquire_within`](Self::acquire_within), stoppable from another thread.
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
    pub fn key(&self) -> &Key {
        self.inner().key()
    }

    /// The token.
    pub fn token(&self) -> Token {
        self.inner().token()
    }

    /// The fence.
    pub fn fence(&self) -> u64 {
        self.inner().fence()
    }

    /// The latest instant the lease is known valid.
    pub fn deadline(&self) -> std::time::Instant {
        self.inner().deadline().into_std()
    }

    /// Whether the lease is known lost.
    pub fn is_lost(&self) -> bool {
        self.inner().is_lost()
    }

    /// Why it was lost, once it is.
    pub fn loss_reason(&self) -> Option<crate::LossReason> {
        self.inner().loss_reason()
    }

    /// A token cancelled when the lease is lost (usable from any thread).
    pub fn cancellation_token(&self) -> CancellationToken {
        self.inner().cancellation_token()
    }

    /// Blocks until the lease is lost or `timeout` passes; `true` if lost.
    pub fn wait_lost(&self, timeout: Duration) -> bool {
        let token = self.cancellation_token();
        self.runtime.block_on(async {
            tokio::time::timeout(timeout, token.cancelled())
                .await
                .is_ok()
        })
    }

    /// Releases the lease.
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
