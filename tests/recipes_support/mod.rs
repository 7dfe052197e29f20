//! A controllable TCP link between a client and the server, for recipe tests:
//! forward, blackhole (stop forwarding without closing), or cut (close every
//! connection; new ones are accepted again).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Forward,
    Blackhole,
}

pub struct Link {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    generation: Arc<Mutex<CancellationToken>>,
    closed: CancellationToken,
}

impl Link {
    pub async fn start(server: SocketAddr) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind link");
        let addr = listener.local_addr().expect("link addr");
        let (mode, _) = watch::channel(Mode::Forward);
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let closed = CancellationToken::new();
        let link = Link {
            addr,
            mode,
            generation: Arc::clone(&generation),
            closed: closed.clone(),
        };
        let mode_rx = link.mode.subscribe();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = closed.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((inbound, _)) = accepted else { continue };
                let kill = generation.lock().unwrap().clone();
                let mode = mode_rx.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(server).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::select! {
                        _ = pump(ri, wo, mode.clone()) => {}
                        _ = pump(ro, wi, mode) => {}
                        _ = kill.cancelled() => {}
                    }
                });
            }
        });
        link
    }

    /// Stop forwarding bytes on every connection, without closing any.
    pub fn blackhole(&self) {
        self.mode.send_replace(Mode::Blackhole);
    }

    /// Close every current connection (both sides see EOF); forward again.
    pub fn cut(&self) {
        let mut generation = self.generation.lock().unwrap();
        generation.cancel();
        *generation = CancellationToken::new();
        self.mode.send_replace(Mode::Forward);
    }

    /// After a blackhole: drop the dead connections and forward again.
    pub fn heal(&self) {
        self.cut();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.closed.cancel();
        self.generation.lock().unwrap().cancel();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if *mode.borrow() == Mode::Blackhole {
            continue; // swallowed
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
