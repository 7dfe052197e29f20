//! The blocking facade, used from plain threads, in both transport modes.

use dflockd_testkit::client as support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dflockd_client::blocking::{Client, Enqueue, Interrupt};
use dflockd_client::{ErrorKind, Released};
use dflockd_server::{Server, ServerConfig, ServerHandle};
use support::{Mode, both_modes};

/// An embedded server on a runtime of its own, as a blocking program would
/// talk to an external one.
struct Background {
    runtime: tokio::runtime::Runtime,
    server: Option<ServerHandle>,
    addr: SocketAddr,
}

impl Background {
    fn start() -> Background {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = runtime
            .block_on(Server::start(ServerConfig::ephemeral()))
            .unwrap();
        let addr = server.local_addr();
        Background {
            runtime,
            server: Some(server),
            addr,
        }
    }

    fn client(&self) -> Client {
        let multiplex = Mode::current() == Mode::Mux;
        Client::builder()
            .server(self.addr.into())
            .configure(move |builder| builder.multiplex(multiplex))
            .build()
            .unwrap()
    }
}

/// Blocks until lock `key` has `n` waiters (bounded).
fn wait_for_waiters(client: &Client, key: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = client.stats(0).unwrap();
        let waiting = stats
            .locks
            .iter()
            .find(|l| l.key == key)
            .map_or(0, |l| l.waiters);
        if waiting == n {
            return;
        }
        assert!(Instant::now() < deadline, "{key}: never {n} waiters");
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(async move { server.force_close() });
        }
    }
}

both_modes! {
#[test]
fn acquire_contend_release_from_threads() {
    let bg = Background::start();
    let client = bg.client();
    let lock = client.lock("blocking-basic").unwrap();
    let lease = lock.acquire().unwrap();
    assert!(lock.try_acquire().unwrap().is_none());
    let other = {
        let lock = lock.clone();
        std::thread::spawn(move || {
            lock.acquire_within(Duration::from_secs(5))
                .unwrap()
                .map(|l| l.fence())
        })
    };
    wait_for_waiters(&client, "blocking-basic", 1);
    let first = lease.fence();
    assert_eq!(lease.release().unwrap(), Released::Released);
    let second = other.join().unwrap().expect("granted after release");
    assert!(second > first);
}
}

both_modes! {
#[test]
fn interrupt_stops_a_blocked_acquire_without_leaking() {
    let bg = Background::start();
    let client = bg.client();
    let lock = client.lock("blocking-interrupt").unwrap();
    let held = lock.acquire().unwrap();
    let stop = Interrupt::new();
    let waiter = {
        let lock = lock.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let result = lock.acquire_interruptible(Duration::from_secs(30), &stop);
            (result.map(|l| l.is_some()), started.elapsed())
        })
    };
    wait_for_waiters(&client, "blocking-interrupt", 1);
    stop.interrupt();
    let (result, took) = waiter.join().unwrap();
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::Interrupted)),
        "{result:?}"
    );
    assert!(took < Duration::from_secs(5));
    // The interrupted waiter left the queue: after release the key is free.
    held.release().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(lease) = lock.try_acquire().unwrap() {
            lease.release().unwrap();
            break;
        }
        assert!(Instant::now() < deadline, "key never became free");
        std::thread::sleep(Duration::from_millis(20));
    }
}
}

both_modes! {
#[test]
fn two_phase_and_drop_releases() {
    let bg = Background::start();
    let client = bg.client();
    let sem = client.semaphore("blocking-sem", 1).unwrap();
    let held = sem.acquire().unwrap();
    let Enqueue::Queued(ticket) = sem.enqueue().unwrap() else {
        panic!("expected queued")
    };
    drop(held); // released in the background
    let lease = ticket.wait(Duration::from_secs(5)).unwrap();
    assert!(!lease.is_lost());
    assert!(!lease.wait_lost(Duration::from_millis(50)));
    drop(lease);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sem.try_acquire().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "dropped lease was never released"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
}
