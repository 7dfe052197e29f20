use crate::values::{fields, leading_number, parse_i64, push_decimal, trim_space};
use crate::{Key, Label, Lease, Limit, ProtoError, RawFrame, Seconds, StableRef, Token, TokenText};

/// The two independent key spaces: `l foo` and `sl foo …` are different
/// resources.
///
/// ```
/// use dflockd_proto::{Command, Kind, Limit, Namespace};
/// assert_eq!(Command::parse(b"sr"), Some(Command::Release(Namespace::Semaphore)));
/// assert_eq!(Kind::Lock.namespace(), Namespace::Lock);
/// assert_ne!(Kind::Semaphore(Limit::ONE).namespace(), Namespace::Lock);
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Namespace {
    /// Lock commands (`l r n e w`).
    Lock,
    /// Semaphore commands (`sl sr sn se sw`).
    Semaphore,
}

/// What an acquire or enqueue asks for: a lock, or a semaphore slot with the
/// limit the caller expects the semaphore to have.
///
/// ```
/// use dflockd_proto::{Kind, Limit};
/// let pool = Kind::Semaphore(Limit::new(4).unwrap());
/// assert_eq!(pool.limit().get(), 4);
/// assert_eq!(Kind::Lock.limit(), Limit::ONE);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A lock (limit 1, lock namespace).
    Lock,
    /// A semaphore slot.
    Semaphore(Limit),
}

impl Kind {
    /// The namespace this kind lives in.
    ///
    /// ```
    /// use dflockd_proto::{Kind, Limit, Namespace};
    /// assert_eq!(Kind::Semaphore(Limit::ONE).namespace(), Namespace::Semaphore);
    /// ```
    pub fn namespace(self) -> Namespace {
        match self {
            Kind::Lock => Namespace::Lock,
            Kind::Semaphore(_) => Namespace::Semaphore,
        }
    }

    /// The resource limit (1 for a lock).
    ///
    /// ```
    /// use dflockd_proto::{Kind, Limit};
    /// assert_eq!(Kind::Lock.limit(), Limit::ONE);
    /// ```
    pub fn limit(self) -> Limit {
        match self {
            Kind::Lock => Limit::ONE,
            Kind::Semaphore(limit) => limit,
        }
    }
}

/// The command word of a request.
///
/// ```
/// use dflockd_proto::{Command, Namespace, Request};
/// assert_eq!(Request::Ping.command(), Command::Ping);
/// assert_eq!(Command::parse(Command::Enqueue(Namespace::Lock).word().as_bytes()), Some(Command::Enqueue(Namespace::Lock)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `auth`
    Auth,
    /// `l` / `sl`
    Acquire(Namespace),
    /// `r` / `sr`
    Release(Namespace),
    /// `n` / `sn`
    Renew(Namespace),
    /// `e` / `se`
    Enqueue(Namespace),
    /// `w` / `sw`
    Wait(Namespace),
    /// `ping`
    Ping,
    /// `stats`
    Stats,
    /// `barrier` (cluster mode)
    Barrier,
    /// `stable-ref` (cluster mode)
    StableRef,
    /// `label` (multiplexed connections only: docs/protocol-mux.md)
    Label,
}

impl Command {
    /// Recognises a command word.
    ///
    /// ```
    /// use dflockd_proto::{Command, Namespace};
    /// assert_eq!(Command::parse(b"sl"), Some(Command::Acquire(Namespace::Semaphore)));
    /// assert_eq!(Command::parse(b"listen"), None);
    /// ```
    pub fn parse(word: &[u8]) -> Option<Command> {
        use Namespace::{Lock, Semaphore};
        Some(match word {
            b"auth" => Command::Auth,
            b"l" => Command::Acquire(Lock),
            b"r" => Command::Release(Lock),
            b"n" => Command::Renew(Lock),
            b"e" => Command::Enqueue(Lock),
            b"w" => Command::Wait(Lock),
            b"sl" => Command::Acquire(Semaphore),
            b"sr" => Command::Release(Semaphore),
            b"sn" => Command::Renew(Semaphore),
            b"se" => Command::Enqueue(Semaphore),
            b"sw" => Command::Wait(Semaphore),
            b"ping" => Command::Ping,
            b"stats" => Command::Stats,
            b"barrier" => Command::Barrier,
            b"stable-ref" => Command::StableRef,
            b"label" => Command::Label,
            _ => return None,
        })
    }

    /// The command word as sent on the wire.
    ///
    /// ```
    /// use dflockd_proto::{Command, Namespace};
    /// assert_eq!(Command::Wait(Namespace::Semaphore).word(), "sw");
    /// ```
    pub fn word(self) -> &'static str {
        use Namespace::{Lock, Semaphore};
        match self {
            Command::Auth => "auth",
            Command::Acquire(Lock) => "l",
            Command::Release(Lock) => "r",
            Command::Renew(Lock) => "n",
            Command::Enqueue(Lock) => "e",
            Command::Wait(Lock) => "w",
            Command::Acquire(Semaphore) => "sl",
            Command::Release(Semaphore) => "sr",
            Command::Renew(Semaphore) => "sn",
            Command::Enqueue(Semaphore) => "se",
            Command::Wait(Semaphore) => "sw",
            Command::Ping => "ping",
            Command::Stats => "stats",
            Command::Barrier => "barrier",
            Command::StableRef => "stable-ref",
            Command::Label => "label",
        }
    }
}

/// A validated dflockd v2 request.
///
/// Release and renew carry the token as the bytes the peer sent (trimmed):
/// the server never validates token syntax, it only looks for a holder with
/// that token. [`Token::parse_wire`] turns them into a [`Token`].
///
/// ```
/// use dflockd_proto::{FrameDecoder, Key, Kind, Lease, Request, Seconds};
/// let acquire = Request::Acquire {
///     key: Key::new("jobs").unwrap(),
///     kind: Kind::Lock,
///     timeout: Seconds::new(10).unwrap(),
///     lease: Some(Lease::new(30).unwrap()),
/// };
/// let wire = acquire.encode_to_vec();
/// assert_eq!(wire, b"l\njobs\n10 30\n");
/// let mut d = FrameDecoder::new();
/// d.feed(&wire);
/// assert_eq!(Request::parse(&d.frame()).unwrap(), acquire);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `auth _ <token>`: the shared-secret handshake.
    Auth {
        /// The secret, trimmed of surrounding white space.
        token: Vec<u8>,
    },
    /// `l key <timeout> [<lease>]` or `sl key <timeout> <limit> [<lease>]`.
    Acquire {
        /// The resource.
        key: Key,
        /// Lock or semaphore (with limit).
        kind: Kind,
        /// How long to wait; zero is a try-lock.
        timeout: Seconds,
        /// Lease length; `None` uses the server default.
        lease: Option<Lease>,
    },
    /// `r key <token>` / `sr key <token>`.
    Release {
        /// The resource.
        key: Key,
        /// Which namespace.
        namespace: Namespace,
        /// The token as sent.
        token: TokenText,
    },
    /// `n key <token> [<lease>]` / `sn …`.
    Renew {
        /// The resource.
        key: Key,
        /// Which namespace.
        namespace: Namespace,
        /// The token as sent.
        token: TokenText,
        /// New lease length; `None` uses the server default.
        lease: Option<Lease>,
    },
    /// `e key [<lease>]` / `se key <limit> [<lease>]`: two-phase, phase 1.
    Enqueue {
        /// The resource.
        key: Key,
        /// Lock or semaphore (with limit).
        kind: Kind,
        /// Lease length; `None` uses the server default.
        lease: Option<Lease>,
    },
    /// `w key <timeout>` / `sw key <timeout>`: two-phase, phase 2.
    Wait {
        /// The resource.
        key: Key,
        /// Which namespace.
        namespace: Namespace,
        /// How long to wait; zero polls.
        timeout: Seconds,
    },
    /// `ping`: keep-alive.
    Ping,
    /// `stats`: server state as JSON.
    Stats,
    /// `barrier`: answered once everything committed before it has been
    /// applied (a linearizable-read barrier in cluster mode; `ok` at once
    /// on a single node).
    Barrier,
    /// `stable-ref <ref> _`: names the connection's client session, so a
    /// client that reconnects (to a new leader) can be recognised.
    StableRef(StableRef),
    /// `label key <token> <label>`: the holder of lock `key` with `token`
    /// proclaims `label` (shown in `stats`; an extension of the
    /// multiplexed protocol).
    Label {
        /// The lock.
        key: Key,
        /// The holder's token as sent.
        token: TokenText,
        /// What it proclaims.
        label: Label,
    },
}

impl Request {
    /// Validates a frame: command first, then key, then argument, exactly in
    /// the server's order.
    ///
    /// ```
    /// use dflockd_proto::{FrameDecoder, Kind, Request, Seconds};
    /// let mut d = FrameDecoder::new();
    /// d.feed(b"l\nk\n  0   45  \n");
    /// match Request::parse(&d.frame()).unwrap() {
    ///     Request::Acquire { kind: Kind::Lock, timeout, lease, .. } => {
    ///         assert_eq!(timeout, Seconds::ZERO);
    ///         assert_eq!(lease.unwrap().get(), 45);
    ///     }
    ///     other => panic!("{other:?}"),
    /// }
    /// ```
    pub fn parse(frame: &RawFrame<'_>) -> Result<Request, ProtoError> {
        Request::parse_reusing(frame, None)
    }

    /// [`parse`](Self::parse), sharing `recent`'s bytes when the frame names
    /// the same key (a server keeps the last key of each connection: a
    /// client's release or renew almost always names the key it just
    /// locked, and then no new key is allocated).
    ///
    /// ```
    /// use dflockd_proto::{FrameDecoder, Key, Request};
    /// let recent = Key::new("jobs/7").unwrap();
    /// let mut d = FrameDecoder::new();
    /// d.feed(b"r\njobs/7\n0123\n");
    /// let Request::Release { key, .. } = Request::parse_reusing(&d.frame(), Some(&recent)).unwrap() else {
    ///     panic!()
    /// };
    /// assert_eq!(key, recent);
    /// ```
    pub fn parse_reusing(
        frame: &RawFrame<'_>,
        recent: Option<&Key>,
    ) -> Result<Request, ProtoError> {
        let command = Command::parse(frame.command).ok_or(ProtoError::UnknownCommand)?;
        let key = || match recent {
            // Equal bytes are a valid key already.
            Some(recent) if recent.as_bytes() == frame.key => Ok(recent.clone()),
            _ => Key::from_bytes(frame.key),
        };
        // Lines are raw bytes (spec §1.6): split and trim them without
        // replacing non-UTF-8 bytes, as Go's `strings` functions do. Split
        // only for the commands whose argument has several fields.
        Ok(match command {
            Command::Auth => Request::Auth {
                token: trim_space(frame.argument).to_vec(),
            },
            Command::Ping => Request::Ping,
            Command::Stats => Request::Stats,
            Command::Barrier => Request::Barrier,
            Command::StableRef => Request::StableRef(
                StableRef::from_bytes(trim_space(frame.key)).ok_or(ProtoError::BadArity)?,
            ),
            Command::Acquire(namespace) => {
                let key = key()?;
                let arg = fields(frame.argument);
                let (timeout, limit_field, lease) = match (namespace, arg.as_slice()) {
                    (Namespace::Lock, [t]) => (t, None, None),
                    (Namespace::Lock, [t, l]) => (t, None, Some(l)),
                    (Namespace::Semaphore, [t, n]) => (t, Some(n), None),
                    (Namespace::Semaphore, [t, n, l]) => (t, Some(n), Some(l)),
                    _ => return Err(ProtoError::BadArity),
                };
                // Go parses fields left to right: timeout, then limit, then lease.
                let timeout = seconds(timeout)?;
                let kind = match limit_field {
                    Some(n) => Kind::Semaphore(limit(n)?),
                    None => Kind::Lock,
                };
                let lease = lease.map(|l| lease_of(l)).transpose()?;
                Request::Acquire {
                    key,
                    kind,
                    timeout,
                    lease,
                }
            }
            Command::Release(namespace) => {
                let key = key()?;
                let token = trim_space(frame.argument);
                if token.is_empty() {
                    return Err(ProtoError::EmptyToken);
                }
                Request::Release {
                    key,
                    namespace,
                    token: token.into(),
                }
            }
            Command::Renew(namespace) => {
                let key = key()?;
                let arg = fields(frame.argument);
                let (token, lease) = match arg.as_slice() {
                    [] => return Err(ProtoError::EmptyToken),
                    [t] => (t, None),
                    [t, l] => (t, Some(lease_of(l)?)),
                    _ => return Err(ProtoError::BadArity),
                };
                Request::Renew {
                    key,
                    namespace,
                    token: (*token).into(),
                    lease,
                }
            }
            Command::Enqueue(namespace) => {
                let key = key()?;
                let arg = fields(frame.argument);
                let (kind, lease) = match (namespace, arg.as_slice()) {
                    (Namespace::Lock, []) => (Kind::Lock, None),
                    (Namespace::Lock, [l]) => (Kind::Lock, Some(l)),
                    (Namespace::Semaphore, [n]) => (Kind::Semaphore(limit(n)?), None),
                    (Namespace::Semaphore, [n, l]) => (Kind::Semaphore(limit(n)?), Some(l)),
                    _ => return Err(ProtoError::BadArity),
                };
                let lease = lease.map(|l| lease_of(l)).transpose()?;
                Request::Enqueue { key, kind, lease }
            }
            Command::Label => {
                let key = key()?;
                let (token, label) = match fields(frame.argument).as_slice() {
                    [] => return Err(ProtoError::EmptyToken),
                    [token, label] => (token.to_vec(), *label),
                    _ => return Err(ProtoError::BadArity),
                };
                Request::Label {
                    key,
                    token: token.as_slice().into(),
                    label: Label::from_bytes(label).ok_or(ProtoError::BadArity)?,
                }
            }
            Command::Wait(namespace) => {
                let key = key()?;
                let timeout = seconds(trim_space(frame.argument))?;
                Request::Wait {
                    key,
                    namespace,
                    timeout,
                }
            }
        })
    }

    /// The command word of this request.
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Request::Ping.command().word(), "ping");
    /// ```
    pub fn command(&self) -> Command {
        match self {
            Request::Auth { .. } => Command::Auth,
            Request::Acquire { kind, .. } => Command::Acquire(kind.namespace()),
            Request::Release { namespace, .. } => Command::Release(*namespace),
            Request::Renew { namespace, .. } => Command::Renew(*namespace),
            Request::Enqueue { kind, .. } => Command::Enqueue(kind.namespace()),
            Request::Wait { namespace, .. } => Command::Wait(*namespace),
            Request::Ping => Command::Ping,
            Request::Stats => Command::Stats,
            Request::Barrier => Command::Barrier,
            Request::StableRef(_) => Command::StableRef,
            Request::Label { .. } => Command::Label,
        }
    }

    /// Whether the server may hold this request until a grant or timeout
    /// (`l`, `sl`, `w`, `sw` with a non-zero timeout). Clients must not
    /// pipeline other requests behind such a request.
    ///
    /// ```
    /// use dflockd_proto::{Key, Kind, Request, Seconds};
    /// let try_lock = Request::Acquire { key: Key::new("k").unwrap(), kind: Kind::Lock, timeout: Seconds::ZERO, lease: None };
    /// assert!(!try_lock.may_block());
    /// ```
    pub fn may_block(&self) -> bool {
        match self {
            Request::Acquire { timeout, .. } | Request::Wait { timeout, .. } => timeout.get() > 0,
            _ => false,
        }
    }

    /// Appends the three-line frame to `out`. Unused fields are sent as `_`,
    /// and an enqueue without lease sends a blank argument, as the reference
    /// clients do.
    ///
    /// ```
    /// use dflockd_proto::{Key, Kind, Limit, Request};
    /// let e = Request::Enqueue { key: Key::new("k").unwrap(), kind: Kind::Semaphore(Limit::new(3).unwrap()), lease: None };
    /// let mut out = Vec::new();
    /// e.encode(&mut out);
    /// assert_eq!(out, b"se\nk\n3\n");
    /// ```
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.command().word().as_bytes());
        out.push(b'\n');
        match self {
            Request::Auth { .. } | Request::Ping | Request::Stats | Request::Barrier => {
                out.push(b'_');
            }
            Request::StableRef(name) => out.extend_from_slice(name.as_str().as_bytes()),
            Request::Acquire { key, .. }
            | Request::Release { key, .. }
            | Request::Renew { key, .. }
            | Request::Enqueue { key, .. }
            | Request::Wait { key, .. }
            | Request::Label { key, .. } => out.extend_from_slice(key.as_bytes()),
        }
        out.push(b'\n');
        let mut push = |s: &str| out.extend_from_slice(s.as_bytes());
        match self {
            Request::Auth { token } => out.extend_from_slice(token),
            Request::Ping | Request::Stats | Request::Barrier | Request::StableRef(_) => push("_"),
            Request::Acquire {
                kind,
                timeout,
                lease,
                ..
            } => {
                push(&timeout.to_string());
                if let Kind::Semaphore(limit) = kind {
                    push(&format!(" {limit}"));
                }
                if let Some(lease) = lease {
                    push(&format!(" {lease}"));
                }
            }
            Request::Release { token, .. } => out.extend_from_slice(token),
            Request::Label { token, label, .. } => {
                out.extend_from_slice(token);
                out.push(b' ');
                out.extend_from_slice(label.as_str().as_bytes());
            }
            Request::Renew { token, lease, .. } => {
                out.extend_from_slice(token);
                if let Some(lease) = lease {
                    out.extend_from_slice(format!(" {lease}").as_bytes());
                }
            }
            Request::Enqueue { kind, lease, .. } => {
                let mut parts = Vec::new();
                if let Kind::Semaphore(limit) = kind {
                    parts.push(limit.to_string());
                }
                if let Some(lease) = lease {
                    parts.push(lease.to_string());
                }
                push(&parts.join(" "));
            }
            Request::Wait { timeout, .. } => push(&timeout.to_string()),
        }
        out.push(b'\n');
    }

    /// [`encode`](Self::encode) into a fresh vector.
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Request::Stats.encode_to_vec(), b"stats\n_\n_\n");
    /// ```
    pub fn encode_to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        self.encode(&mut out);
        out
    }

    /// Appends a renew request built from its parts: the same bytes as
    /// [`Request::Renew`] carrying `token`'s wire form, without allocating
    /// (a client renewing many leases encodes them in bulk).
    ///
    /// ```
    /// use dflockd_proto::{Key, Lease, Namespace, Request, Token};
    /// let (key, token) = (Key::new("k").unwrap(), Token::new(1, 2));
    /// let mut out = Vec::new();
    /// Request::encode_renew(&mut out, &key, Namespace::Semaphore, token, Lease::new(10).ok());
    /// let request = Request::Renew {
    ///     key,
    ///     namespace: Namespace::Semaphore,
    ///     token: token.into(),
    ///     lease: Lease::new(10).ok(),
    /// };
    /// assert_eq!(out, request.encode_to_vec());
    /// ```
    pub fn encode_renew(
        out: &mut Vec<u8>,
        key: &Key,
        namespace: Namespace,
        token: Token,
        lease: Option<Lease>,
    ) {
        out.extend_from_slice(Command::Renew(namespace).word().as_bytes());
        out.push(b'\n');
        out.extend_from_slice(key.as_bytes());
        out.push(b'\n');
        token.write_hex(out);
        if let Some(lease) = lease {
            out.push(b' ');
            push_decimal(out, lease.get());
        }
        out.push(b'\n');
    }

    /// The token of a release or renew, if it is one this protocol could
    /// have minted.
    ///
    /// ```
    /// use dflockd_proto::{Key, Namespace, Request};
    /// let r = Request::Release { key: Key::new("k").unwrap(), namespace: Namespace::Lock, token: b"junk"[..].into() };
    /// assert_eq!(r.token(), None);
    /// ```
    pub fn token(&self) -> Option<Token> {
        match self {
            Request::Release { token, .. } | Request::Renew { token, .. } => {
                Token::parse_wire(token)
            }
            _ => None,
        }
    }
}

fn int(field: &[u8]) -> Result<i64, ProtoError> {
    // Go's `strconv.Atoi`: an optional sign, then ASCII digits. Up to 18
    // digits cannot overflow, so the usual short field needs no checks
    // beyond the digits; longer ones go through the standard parser.
    let (negative, digits) = match field {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, field),
    };
    if digits.len() <= 18 {
        let n = match leading_number(digits) {
            Some((n, [])) => i64::try_from(n).map_err(|_| ProtoError::InvalidInteger)?,
            _ => return Err(ProtoError::InvalidInteger),
        };
        return Ok(if negative { -n } else { n });
    }
    std::str::from_utf8(field)
        .ok()
        .and_then(parse_i64)
        .ok_or(ProtoError::InvalidInteger)
}

fn seconds(field: &[u8]) -> Result<Seconds, ProtoError> {
    let n = int(field)?;
    u64::try_from(n)
        .ok()
        .and_then(|n| Seconds::new(n).ok())
        .ok_or(ProtoError::InvalidTimeout)
}

fn lease_of(field: &[u8]) -> Result<Lease, ProtoError> {
    let n = int(field)?;
    u64::try_from(n)
        .ok()
        .and_then(|n| Lease::new(n).ok())
        .ok_or(ProtoError::InvalidLease)
}

fn limit(field: &[u8]) -> Result<Limit, ProtoError> {
    let n = int(field)?;
    u64::try_from(n)
        .ok()
        .and_then(|n| Limit::new(n).ok())
        .ok_or(ProtoError::InvalidLimit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FrameDecoder;

    fn parse(input: &[u8]) -> Result<Request, ProtoError> {
        let mut d = FrameDecoder::new();
        assert_eq!(d.feed(input).1, crate::Progress::Frame);
        Request::parse(&d.frame())
    }

    #[test]
    fn int_agrees_with_the_standard_parser() {
        let mut cases: Vec<String> = [
            "",
            "+",
            "-",
            "0",
            "-0",
            "+0",
            "007",
            "10",
            "-10",
            "+33",
            "1 ",
            " 1",
            "1a",
            "a1",
            "--1",
            "+-1",
            "١",
            "999999999999999999",
            "-999999999999999999",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "00000000000000000000000042",
        ]
        .map(String::from)
        .to_vec();
        for digits in 1..=20 {
            cases.push("9".repeat(digits));
            cases.push(format!("-{}", "9".repeat(digits)));
            cases.push(format!("{}/", "1".repeat(digits)));
            cases.push(format!("{}:", "1".repeat(digits)));
        }
        for case in cases {
            let expected = case.parse::<i64>().map_err(|_| ProtoError::InvalidInteger);
            assert_eq!(int(case.as_bytes()), expected, "{case:?}");
        }
    }

    #[test]
    fn a_label_round_trips_and_bad_ones_are_refused() {
        let label = Request::Label {
            key: Key::new("svc/leader").unwrap(),
            token: b"00000000000000070123456789abcdef".as_slice().into(),
            label: Label::new("node-a:8080").unwrap(),
        };
        let wire = label.encode_to_vec();
        assert_eq!(
            wire,
            b"label\nsvc/leader\n00000000000000070123456789abcdef node-a:8080\n"
        );
        assert_eq!(parse(&wire).unwrap(), label);
        assert_eq!(parse(b"label\nk\n\n"), Err(ProtoError::EmptyToken));
        assert_eq!(parse(b"label\nk\ntok\n"), Err(ProtoError::BadArity));
        assert_eq!(parse(b"label\nk\ntok a b\n"), Err(ProtoError::BadArity));
    }

    #[test]
    fn encode_renew_matches_encode() {
        let leases = [
            None,
            Lease::new(1).ok(),
            Lease::new(10).ok(),
            Lease::new(33).ok(),
            Lease::new(crate::MAX_SECONDS).ok(),
        ];
        for namespace in [Namespace::Lock, Namespace::Semaphore] {
            for lease in leases {
                let key = Key::new("a/b:c").unwrap();
                let token = Token::new(0xdead_beef, u64::MAX);
                let mut bulk = b"prefix".to_vec();
                Request::encode_renew(&mut bulk, &key, namespace, token, lease);
                let request = Request::Renew {
                    key,
                    namespace,
                    token: token.into(),
                    lease,
                };
                let mut one = b"prefix".to_vec();
                request.encode(&mut one);
                assert_eq!(bulk, one, "{namespace:?} {lease:?}");
            }
        }
    }

    #[test]
    fn validation_errors_match_the_spec() {
        use ProtoError::*;
        let cases: &[(&[u8], ProtoError)] = &[
            (b"\nk\n0\n", UnknownCommand),
            (b"foo\nk\nx\n", UnknownCommand),
            (b"signal\nch\nhello\n", UnknownCommand),
            (b"incr\nc\n1\n", UnknownCommand),
            (b"l\n\n0\n", InvalidKey),
            (b"l\na b\n0\n", InvalidKey),
            (b"l\na\tb\n0\n", InvalidKey),
            (b"l\na\rb\n0\n", InvalidKey),
            (b"l\nk\nabc\n", InvalidInteger),
            (b"l\nk\n1.5\n", InvalidInteger),
            (b"l\nk\n-1\n", InvalidTimeout),
            (b"l\nk\n\n", BadArity),
            (b"l\nk\n1 2 3\n", BadArity),
            (b"sl\ns\n0\n", BadArity),
            (b"sl\ns\n0 1 2 3\n", BadArity),
            (b"l\nk\n0 0\n", InvalidLease),
            (b"l\nk\n0 -5\n", InvalidLease),
            (b"l\nk\n9223372037\n", InvalidTimeout),
            (b"l\nk\n99999999999999999999\n", InvalidInteger),
            (b"l\nk\n0 9223372037\n", InvalidLease),
            (b"sl\ns\n0 0\n", InvalidLimit),
            (b"sl\ns\n0 -1\n", InvalidLimit),
            (b"se\ns\n0\n", InvalidLimit),
            (b"sl\ns\n0 1048577\n", InvalidLimit),
            (b"r\nk\n\n", EmptyToken),
            (b"sr\ns\n   \n", EmptyToken),
            (b"n\nk\n\n", EmptyToken),
            (b"n\nk\ntok 1 2\n", BadArity),
            (b"n\nk\ntok 0\n", InvalidLease),
            (b"n\nk\ntok x\n", InvalidInteger),
            (b"e\nk\n30 junk\n", BadArity),
            (b"e\nk\nabc\n", InvalidInteger),
            (b"e\nk\n0\n", InvalidLease),
            (b"se\nk\n\n", BadArity),
            (b"se\nk\n2 3 4\n", BadArity),
            (b"w\nk\n\n", InvalidInteger),
            (b"w\nk\n5 5\n", InvalidInteger),
            (b"w\nk\n-1\n", InvalidTimeout),
        ];
        for (input, expected) in cases {
            assert_eq!(
                parse(input),
                Err(*expected),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn accepted_shapes() {
        assert!(
            matches!(parse(b"l\nk3\n+0 +7\n"), Ok(Request::Acquire { lease: Some(l), .. }) if l.get() == 7)
        );
        assert!(matches!(
            parse(b"l\nk4\n0 9223372036\n"),
            Ok(Request::Acquire { .. })
        ));
        assert!(matches!(
            parse(b"sl\ns2\n0 1048576\n"),
            Ok(Request::Acquire { .. })
        ));
        assert!(matches!(parse(b"ping\n\n\n"), Ok(Request::Ping)));
        assert!(matches!(
            parse(b"e\nt1\n\n"),
            Ok(Request::Enqueue { lease: None, .. })
        ));
        assert!(matches!(
            parse(b"l\nk\n-0\n"),
            Ok(Request::Acquire {
                timeout: Seconds::ZERO,
                ..
            })
        ));
        let r = parse(b"r\nk\n \t0123 \n").unwrap();
        assert!(matches!(r, Request::Release { ref token, .. } if token == b"0123"));
        let r = parse(b"r\nk\ntok 60\n").unwrap();
        assert!(matches!(r, Request::Release { ref token, .. } if token == b"tok 60"));
        let a = parse(b"auth\nwhatever\n  s3cret \t\n").unwrap();
        assert_eq!(
            a,
            Request::Auth {
                token: b"s3cret".to_vec()
            }
        );
    }
}
