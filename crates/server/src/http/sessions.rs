//! HTTP sessions: the identity two-phase requests and holds belong to.
//! Each is one in-process connection ([`Pipe`]); a session idle for twice
//! its idle timeout is closed (never while a request of it is in flight),
//! and closing it releases what it held, as a closed TCP connection does.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::pipe::Pipe;

/// One open session.
pub(crate) struct HttpSession {
    pub(crate) id: String,
    pub(crate) pipe: Arc<Pipe>,
    /// The connection id the server gave the session's connection.
    pub(crate) conn: u64,
    ip: IpAddr,
    last_used: Mutex<Instant>,
    in_flight: AtomicUsize,
}

/// A request of a session in flight: the session is not reaped meanwhile,
/// and its idle time starts again when the request ends.
pub(crate) struct InFlight(Arc<HttpSession>);

impl std::ops::Deref for InFlight {
    type Target = HttpSession;
    fn deref(&self) -> &HttpSession {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self
            .0
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a session could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `--http-max-sessions` open already.
    MaxSessions,
    /// `--http-max-sessions-per-ip` open from this address already.
    MaxSessionsPerIp,
}

#[derive(Default)]
struct Book {
    sessions: HashMap<String, Arc<HttpSession>>,
    /// Session ids by their connection's id (for events).
    by_conn: HashMap<u64, String>,
    per_ip: HashMap<IpAddr, usize>,
    /// Places taken by sessions being opened.
    opening: usize,
}

/// The open sessions.
pub(crate) struct Sessions {
    book: Mutex<Book>,
    max: usize,
    max_per_ip: usize,
}

/// A place for a session being opened; given back if it is dropped
/// before [`Sessions::insert`].
pub(crate) struct Reservation<'a> {
    sessions: &'a Sessions,
    ip: IpAddr,
    done: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut book = self.sessions.lock();
            book.opening -= 1;
            release_ip(&mut book.per_ip, self.ip);
        }
    }
}

fn release_ip(per_ip: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
    if let Some(count) = per_ip.get_mut(&ip) {
        *count -= 1;
        if *count == 0 {
            per_ip.remove(&ip);
        }
    }
}

impl Sessions {
    pub(crate) fn new(max: usize, max_per_ip: usize) -> Sessions {
        Sessions {
            book: Mutex::new(Book::default()),
            max,
            max_per_ip,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place for a new session from `ip`, if the caps allow.
    pub(crate) fn reserve(&self, ip: IpAddr) -> Result<Reservation<'_>, Refused> {
        let mut book = self.lock();
        if self.max > 0 && book.sessions.len() + book.opening >= self.max {
            return Err(Refused::MaxSessions);
        }
        let count = book.per_ip.get(&ip).copied().unwrap_or(0);
        if self.max_per_ip > 0 && count >= self.max_per_ip {
            return Err(Refused::MaxSessionsPerIp);
        }
        book.per_ip.insert(ip, count + 1);
        book.opening += 1;
        Ok(Reservation {
            sessions: self,
            ip,
            done: false,
        })
    }

    /// Registers an opened session in its reserved place, with the request
    /// that opened it in flight.
    pub(crate) fn insert(
        &self,
        mut place: Reservation<'_>,
        id: String,
        pipe: Arc<Pipe>,
        conn: u64,
    ) -> InFlight {
        let session = Arc::new(HttpSession {
            id: id.clone(),
            pipe,
            conn,
            ip: place.ip,
            last_used: Mutex::new(Instant::now()),
            in_flight: AtomicUsize::new(1),
        });
        let mut book = self.lock();
        book.opening -= 1;
        book.by_conn.insert(conn, id.clone());
        book.sessions.insert(id, Arc::clone(&session));
        place.done = true;
        InFlight(session)
    }

    /// The session `id` for a request, marked in flight; `None` if there
    /// is none (never opened, closed, reaped, or its connection closed).
    pub(crate) fn begin(&self, id: &str) -> Option<InFlight> {
        let book = self.lock();
        let session = book.sessions.get(id)?;
        if session.pipe.is_closed() {
            return None;
        }
        session.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(InFlight(Arc::clone(session)))
    }

    /// Removes session `id`; the caller closes its connection.
    pub(crate) fn remove(&self, id: &str) -> Option<Arc<HttpSession>> {
        let mut book = self.lock();
        let session = book.sessions.remove(id)?;
        book.by_conn.remove(&session.conn);
        release_ip(&mut book.per_ip, session.ip);
        Some(session)
    }

    /// Removes every session idle (no request in flight) since before
    /// `now - idle`, and every session whose connection closed.
    pub(crate) fn take_idle(&self, now: Instant, idle: Duration) -> Vec<Arc<HttpSession>> {
        let mut book = self.lock();
        let stale: Vec<String> = book
            .sessions
            .values()
            .filter(|s| {
                s.pipe.is_closed()
                    || (s.in_flight.load(Ordering::Acquire) == 0
                        && now.saturating_duration_since(
                            *s.last_used.lock().unwrap_or_else(PoisonError::into_inner),
                        ) >= idle)
            })
            .map(|s| s.id.clone())
            .collect();
        let mut taken = Vec::with_capacity(stale.len());
        for id in stale {
            if let Some(session) = book.sessions.remove(&id) {
                book.by_conn.remove(&session.conn);
                release_ip(&mut book.per_ip, session.ip);
                taken.push(session);
            }
        }
        taken
    }

    /// Removes every session (the server stops).
    pub(crate) fn take_all(&self) -> Vec<Arc<HttpSession>> {
        let mut book = self.lock();
        book.per_ip.clear();
        book.by_conn.clear();
        book.sessions.drain().map(|(_, s)| s).collect()
    }

    /// How many sessions are open.
    pub(crate) fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    /// The session id of connection `conn`, if it is an HTTP session's.
    pub(crate) fn id_of_conn(&self, conn: u64) -> Option<String> {
        self.lock().by_conn.get(&conn).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_sessions_being_opened_and_give_places_back() {
        let sessions = Sessions::new(2, 1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let first = sessions.reserve(a).unwrap();
        assert_eq!(sessions.reserve(a).err(), Some(Refused::MaxSessionsPerIp));
        let second = sessions.reserve(b).unwrap();
        assert_eq!(sessions.reserve(c).err(), Some(Refused::MaxSessions));
        drop(first);
        drop(second);
        assert!(sessions.reserve(a).is_ok());
    }
}
