//! Per-address limits of the HTTP listener: a cap on open connections
//! (checked as each is accepted) and a request rate limit (a token bucket
//! per address, by `tower_governor`).

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::IntoResponse;
use governor::middleware::NoOpMiddleware;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower_governor::GovernorLayer;
use tower_governor::governor::{GovernorConfig, GovernorConfigBuilder};
use tower_governor::key_extractor::PeerIpKeyExtractor;

use super::error::ApiError;

type Config = GovernorConfig<PeerIpKeyExtractor, NoOpMiddleware>;

/// The rate limiter's state, to forget idle addresses now and then.
pub(crate) struct Limiter(Arc<Config>);

impl Limiter {
    /// Drops the buckets of addresses that are full again (idle).
    pub(crate) fn forget_idle(&self) {
        self.0.limiter().retain_recent();
    }
}

/// A layer allowing `rate` requests per second per address with bursts of
/// `burst` (0 = `rate`); over it, `429 rate_limited`.
pub(crate) fn rate_limit(
    rate: u32,
    burst: u32,
) -> (
    GovernorLayer<PeerIpKeyExtractor, NoOpMiddleware, Body>,
    Limiter,
) {
    let burst = if burst == 0 { rate } else { burst };
    let period = Duration::from_secs(1) / rate.max(1);
    let config = GovernorConfigBuilder::default()
        .period(period.max(Duration::from_nanos(1)))
        .burst_size(burst.max(1))
        .finish()
        .map(Arc::new);
    // `finish` refuses only a zero period or burst, excluded above.
    let config = config.unwrap_or_else(|| Arc::new(GovernorConfig::default()));
    let layer = GovernorLayer::new(Arc::clone(&config)).error_handler(|error| {
        let detail = match error {
            tower_governor::GovernorError::TooManyRequests { wait_time, .. } => {
                format!("too many requests from this address; retry in {wait_time} s")
            }
            other => other.to_string(),
        };
        ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            detail,
        )
        .into_response()
    });
    (layer, Limiter(config))
}

/// Counts open connections per address; refuses one over `max` (0 = no
/// cap) by closing it before any byte is read.
/// Open connections per address.
type OpenCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

#[derive(Clone)]
pub(crate) struct PerIpAcceptor {
    max: usize,
    open: OpenCounts,
}

impl PerIpAcceptor {
    pub(crate) fn new(max: usize) -> Self {
        PerIpAcceptor {
            max,
            open: Arc::default(),
        }
    }
}

impl<S: Send + 'static> axum_server::accept::Accept<TcpStream, S> for PerIpAcceptor {
    type Stream = Counted;
    type Service = S;
    type Future = std::future::Ready<io::Result<(Counted, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let _ = stream.set_nodelay(true);
        let ip = match stream.peer_addr() {
            Ok(peer) => peer.ip(),
            Err(error) => return std::future::ready(Err(error)),
        };
        if self.max > 0 {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            let count = open.entry(ip).or_insert(0);
            if *count >= self.max {
                tracing::info!(%ip, "HTTP connection refused by --http-max-connections-per-ip");
                return std::future::ready(Err(io::Error::other("per-address connection cap")));
            }
            *count += 1;
        }
        let counted = Counted {
            stream,
            slot: (self.max > 0).then(|| (Arc::clone(&self.open), ip)),
        };
        std::future::ready(Ok((counted, service)))
    }
}

/// An accepted connection holding its place under the per-address cap.
pub(crate) struct Counted {
    stream: TcpStream,
    slot: Option<(OpenCounts, IpAddr)>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some((open, ip)) = self.slot.take() {
            let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(count) = open.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    open.remove(&ip);
                }
            }
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
