//! The server's Prometheus metrics: counters bumped where things happen
//! (a relaxed atomic add each), gauges read from the lock table when
//! scraped, encoded in the Prometheus text format by `prometheus-client`.
//! The families are listed in docs/OPERATIONS.md.

use std::sync::OnceLock;
use std::time::Duration;

use dflockd_proto::{Reply, Request, Status};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Which listener a request or connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Transport {
    /// The line protocol (TCP, TLS or in-process).
    Tcp,
    /// The HTTP API.
    Http,
}

/// A request's command, as a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Command {
    Acquire,
    Release,
    Renew,
    Enqueue,
    Wait,
    Ping,
    Stats,
    Barrier,
    StableRef,
    Label,
    Cancel,
    /// A frame that is no valid request.
    Invalid,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Http => "http",
        }
    }
}

impl Command {
    const ALL: usize = 12;

    fn label(self) -> &'static str {
        match self {
            Command::Acquire => "acquire",
            Command::Release => "release",
            Command::Renew => "renew",
            Command::Enqueue => "enqueue",
            Command::Wait => "wait",
            Command::Ping => "ping",
            Command::Stats => "stats",
            Command::Barrier => "barrier",
            Command::StableRef => "stable_ref",
            Command::Label => "label",
            Command::Cancel => "cancel",
            Command::Invalid => "invalid",
        }
    }

    /// The command of a parsed request.
    pub(crate) fn of(request: &Request) -> Command {
        match request {
            Request::Auth { .. } => Command::Invalid,
            Request::Acquire { .. } => Command::Acquire,
            Request::Release { .. } => Command::Release,
            Request::Renew { .. } => Command::Renew,
            Request::Enqueue { .. } => Command::Enqueue,
            Request::Wait { .. } => Command::Wait,
            Request::Ping => Command::Ping,
            Request::Stats => Command::Stats,
            Request::Barrier => Command::Barrier,
            Request::StableRef(_) => Command::StableRef,
            Request::Label { .. } => Command::Label,
        }
    }
}

/// How a request was answered, as a label: the reply's status word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(clippy::enum_variant_names)]
pub(crate) enum Outcome {
    Ok,
    Acquired,
    Queued,
    Timeout,
    Error,
    ErrorAuth,
    ErrorMaxLocks,
    ErrorMaxWaiters,
    ErrorLimitMismatch,
    ErrorNotEnqueued,
    ErrorAlreadyEnqueued,
    ErrorLeaseExpired,
    ErrorDraining,
    ErrorNotLeader,
}

impl Outcome {
    const ALL: usize = 14;

    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Acquired => "acquired",
            Outcome::Queued => "queued",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
            Outcome::ErrorAuth => "error_auth",
            Outcome::ErrorMaxLocks => "error_max_locks",
            Outcome::ErrorMaxWaiters => "error_max_waiters",
            Outcome::ErrorLimitMismatch => "error_limit_mismatch",
            Outcome::ErrorNotEnqueued => "error_not_enqueued",
            Outcome::ErrorAlreadyEnqueued => "error_already_enqueued",
            Outcome::ErrorLeaseExpired => "error_lease_expired",
            Outcome::ErrorDraining => "error_draining",
            Outcome::ErrorNotLeader => "error_not_leader",
        }
    }

    /// The outcome a reply reports.
    pub(crate) fn of(reply: &Reply) -> Outcome {
        match reply {
            Reply::Ok | Reply::Granted { .. } | Reply::Renewed(_) | Reply::Stats(_) => Outcome::Ok,
            Reply::Acquired { .. } => Outcome::Acquired,
            Reply::Queued => Outcome::Queued,
            Reply::NotLeader(_) => Outcome::ErrorNotLeader,
            Reply::Failure(status) => match status {
                Status::Timeout => Outcome::Timeout,
                Status::Error => Outcome::Error,
                Status::ErrorAuth => Outcome::ErrorAuth,
                Status::ErrorMaxLocks => Outcome::ErrorMaxLocks,
                Status::ErrorMaxWaiters => Outcome::ErrorMaxWaiters,
                Status::ErrorLimitMismatch => Outcome::ErrorLimitMismatch,
                Status::ErrorNotEnqueued => Outcome::ErrorNotEnqueued,
                Status::ErrorAlreadyEnqueued => Outcome::ErrorAlreadyEnqueued,
                Status::ErrorLeaseExpired => Outcome::ErrorLeaseExpired,
                Status::ErrorDraining => Outcome::ErrorDraining,
                Status::ErrorNotLeader => Outcome::ErrorNotLeader,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    transport: &'static str,
    command: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TransportLabels {
    transport: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

type Cells = [[OnceLock<Counter>; Outcome::ALL]; Command::ALL];

/// The counters. Gauges of the table (leases, waiters, resources) and of
/// connections are read when the metrics are scraped (see
/// [`Metrics::encode`]).
pub(crate) struct Metrics {
    requests: Family<RequestLabels, Counter>,
    /// The `requests` counters by index, resolved once each, so counting
    /// a request takes no lock.
    tcp_cells: Box<Cells>,
    http_cells: Box<Cells>,
    pub(crate) grants: Counter,
    pub(crate) releases: Counter,
    pub(crate) expirations: Counter,
    pub(crate) lock_delay_hits: Counter,
    auth_failures: Family<TransportLabels, Counter>,
    pub(crate) sessions_reaped: Counter,
    pub(crate) events_dropped_subscribers: Counter,
    http_latency: Family<RouteLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            tcp_cells: Box::new(std::array::from_fn(|_| {
                std::array::from_fn(|_| OnceLock::new())
            })),
            http_cells: Box::new(std::array::from_fn(|_| {
                std::array::from_fn(|_| OnceLock::new())
            })),
            grants: Counter::default(),
            releases: Counter::default(),
            expirations: Counter::default(),
            lock_delay_hits: Counter::default(),
            auth_failures: Family::default(),
            sessions_reaped: Counter::default(),
            events_dropped_subscribers: Counter::default(),
            http_latency: Family::new_with_constructor(|| {
                // 100 µs … ~50 s: from a try-lock to a long wait.
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.0001, 4.0, 10,
                ))
            }),
        }
    }
}

/// The table and connection figures a scrape reports as gauges.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Gauges {
    pub(crate) tcp_connections: u64,
    pub(crate) http_sessions: u64,
    pub(crate) live_leases: u64,
    pub(crate) waiters: u64,
    pub(crate) resources: u64,
    pub(crate) draining: bool,
}

impl Metrics {
    /// Counts a request answered with `outcome`.
    pub(crate) fn request(&self, transport: Transport, command: Command, outcome: Outcome) {
        let cells = match transport {
            Transport::Tcp => &self.tcp_cells,
            Transport::Http => &self.http_cells,
        };
        cells[command as usize][outcome as usize]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels {
                        transport: transport.label(),
                        command: command.label(),
                        outcome: outcome.label(),
                    })
                    .clone()
            })
            .inc();
    }

    /// Counts a failed authentication.
    pub(crate) fn auth_failure(&self, transport: Transport) {
        self.auth_failures
            .get_or_create(&TransportLabels {
                transport: transport.label(),
            })
            .inc();
    }

    /// Records how long an HTTP request took.
    pub(crate) fn http_request(&self, method: &str, route: &str, took: Duration) {
        self.http_latency
            .get_or_create(&RouteLabels {
                method: method.to_owned(),
                route: route.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// The `Content-Type` of [`Self::encode`]'s text.
    pub(crate) const CONTENT_TYPE: &'static str =
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

    /// The metrics in the Prometheus text format (version 0.0.4), with
    /// `gauges` as read now.
    pub(crate) fn encode(&self, gauges: Gauges) -> String {
        let mut registry = Registry::with_prefix("dflockd");
        registry.register(
            "requests",
            "Requests answered, by transport, command and outcome (the reply's status)",
            self.requests.clone(),
        );
        registry.register(
            "grants",
            "Grants made (locks and semaphore slots)",
            self.grants.clone(),
        );
        registry.register(
            "releases",
            "Holds released by their holder (`r`, `sr`, HTTP release)",
            self.releases.clone(),
        );
        registry.register(
            "expirations",
            "Leases that ran out and were evicted",
            self.expirations.clone(),
        );
        registry.register(
            "lock_delay_hits",
            "Acquires not granted at once because the key was in its disconnect lock-delay",
            self.lock_delay_hits.clone(),
        );
        registry.register(
            "auth_failures",
            "Failed authentications, by transport",
            self.auth_failures.clone(),
        );
        registry.register(
            "http_sessions_reaped",
            "HTTP sessions closed because they were idle too long",
            self.sessions_reaped.clone(),
        );
        registry.register(
            "event_subscribers_dropped",
            "Event-stream subscribers dropped because they fell behind",
            self.events_dropped_subscribers.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency, by method and route",
            self.http_latency.clone(),
        );
        let connections = Family::<TransportLabels, Gauge>::default();
        connections
            .get_or_create(&TransportLabels {
                transport: Transport::Tcp.label(),
            })
            .set(saturate(gauges.tcp_connections));
        connections
            .get_or_create(&TransportLabels {
                transport: Transport::Http.label(),
            })
            .set(saturate(gauges.http_sessions));
        registry.register(
            "connections",
            "Open client connections (tcp) and HTTP sessions (http)",
            connections,
        );
        for (name, help, value) in [
            (
                "live_leases",
                "Holds with a running lease",
                gauges.live_leases,
            ),
            (
                "queue_depth",
                "Waiters queued, over all keys",
                gauges.waiters,
            ),
            ("resources", "Keys the table knows", gauges.resources),
            (
                "draining",
                "1 while the server drains",
                u64::from(gauges.draining),
            ),
        ] {
            let gauge = Gauge::<i64>::default();
            gauge.set(saturate(value));
            registry.register(name, help, gauge);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

fn saturate(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_by_transport_command_and_outcome() {
        let metrics = Metrics::default();
        metrics.request(Transport::Tcp, Command::Acquire, Outcome::Ok);
        metrics.request(Transport::Tcp, Command::Acquire, Outcome::Ok);
        metrics.request(Transport::Http, Command::Release, Outcome::Error);
        let text = metrics.encode(Gauges {
            live_leases: 3,
            ..Gauges::default()
        });
        assert!(
            text.contains(
                r#"dflockd_requests_total{transport="tcp",command="acquire",outcome="ok"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains("dflockd_live_leases 3"), "{text}");
    }
}
