//! Property tests for the wire codec: request and reply round trips, framing
//! under arbitrary splits and CRLF, robustness against arbitrary bytes, a
//! reference model of the line rules (spec §1.3), tokens and sharding.

use dflockd_proto::{
    Decoded, FrameDecoder, Key, Kind, Lease, Limit, MAX_AUTH_LINE, MAX_LIMIT, MAX_LINE,
    MAX_SECONDS, Namespace, Progress, ProtoError, RawFrame, Reply, Request, Seconds, Status, Token,
    TokenError, fence_from_token, shard,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

/// Modest case count so the whole file runs in a few seconds in debug
/// builds; raise with `PROPTEST_CASES=10000` for a longer soak.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Decoding helpers
// ---------------------------------------------------------------------------

/// What the decoder reported, with the frame's lines copied out.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Frame([Vec<u8>; 3]),
    Oversize,
}

/// Everything a run over a whole input produced.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    /// Events up to and including the first `Oversize` (the server closes
    /// the connection there, so nothing after it is specified).
    events: Vec<Event>,
    /// Bytes consumed.
    consumed: usize,
    /// Whether a partial frame is pending at the end (`None` after an
    /// oversize line, where the connection is closed).
    in_frame: Option<bool>,
    /// Lines completed, as reported by the decoder.
    lines_completed: u64,
}

/// The largest a stored line may be at this point, given the command line.
fn arg_cap(command: &[u8]) -> usize {
    if command == b"auth" {
        MAX_AUTH_LINE
    } else {
        MAX_LINE
    }
}

/// Feeds `input` cut at `cuts` (offsets, any order, duplicates allowed) and
/// checks the `feed` contract on every call:
/// * a call on non-empty input consumes at least one byte and at most all;
/// * `NeedMore` means everything offered was consumed;
/// * `Frame`/`Oversize` end exactly after an LF;
/// * the decoder never exposes (so never stores) a line above its cap.
///
/// It runs twice, through `feed` + `frame` and through `decode` (which
/// borrows whole frames from the input instead of copying them), and the
/// two runs must agree exactly.
fn run(input: &[u8], cuts: &[usize]) -> Run {
    let fed = run_with(input, cuts, false);
    let decoded = run_with(input, cuts, true);
    assert_eq!(fed, decoded, "decode disagrees with feed");
    fed
}

fn run_with(input: &[u8], cuts: &[usize], use_decode: bool) -> Run {
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    bounds.push(0);
    bounds.push(input.len());
    bounds.sort_unstable();
    bounds.dedup();

    let mut d = FrameDecoder::new();
    let mut events = Vec::new();
    let mut consumed = 0;
    'chunks: for w in bounds.windows(2) {
        let chunk = &input[w[0]..w[1]];
        let mut pos = 0;
        while pos < chunk.len() {
            let rest = &chunk[pos..];
            let (used, progress, f) = if use_decode {
                let (used, decoded) = d.decode(rest);
                let (progress, f) = match decoded {
                    Decoded::NeedMore => (Progress::NeedMore, None),
                    Decoded::Oversize => (Progress::Oversize, None),
                    Decoded::Frame(f) => (
                        Progress::Frame,
                        Some([f.command.to_vec(), f.key.to_vec(), f.argument.to_vec()]),
                    ),
                };
                (used, progress, f)
            } else {
                let (used, progress) = d.feed(rest);
                (used, progress, None)
            };
            assert!(
                used >= 1 && used <= rest.len(),
                "feed consumed {used} of {}",
                rest.len()
            );
            match progress {
                Progress::NeedMore => {
                    assert_eq!(used, rest.len(), "NeedMore must consume everything");
                }
                Progress::Frame | Progress::Oversize => {
                    assert_eq!(rest[used - 1], b'\n', "must stop after an LF");
                }
            }
            pos += used;
            consumed += used;
            let stored = d.frame();
            let f = match &f {
                Some([command, key, argument]) => RawFrame {
                    command,
                    key,
                    argument,
                },
                None => stored,
            };
            assert!(
                f.command.len() <= MAX_LINE,
                "command line of {} bytes stored",
                f.command.len()
            );
            assert!(
                f.key.len() <= MAX_LINE,
                "key line of {} bytes stored",
                f.key.len()
            );
            assert!(
                f.argument.len() <= arg_cap(f.command),
                "argument line of {} bytes stored",
                f.argument.len()
            );
            match progress {
                Progress::NeedMore => {}
                Progress::Frame => {
                    assert!(!d.in_frame());
                    events.push(Event::Frame([
                        f.command.to_vec(),
                        f.key.to_vec(),
                        f.argument.to_vec(),
                    ]));
                }
                Progress::Oversize => {
                    events.push(Event::Oversize);
                    break 'chunks;
                }
            }
        }
    }
    if events.last() != Some(&Event::Oversize) {
        assert_eq!(
            consumed,
            input.len(),
            "consumed counts must add up to the input length"
        );
    }
    let in_frame = (events.last() != Some(&Event::Oversize)).then(|| d.in_frame());
    Run {
        events,
        consumed,
        in_frame,
        lines_completed: d.lines_completed(),
    }
}

/// Reference model of spec §1.3, written as plainly as possible: split at
/// LF, check the cap on the raw line (trailing CRs included), strip trailing
/// CRs, group lines in threes. Stops at the first oversize line.
fn model(input: &[u8]) -> Run {
    let mut events = Vec::new();
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut consumed = 0;
    let mut lines_completed = 0;
    let mut rest = input;
    while let Some(lf) = rest.iter().position(|&b| b == b'\n') {
        let raw = &rest[..lf];
        rest = &rest[lf + 1..];
        consumed += lf + 1;
        lines_completed += 1;
        let cap = if lines.len() == 2 {
            arg_cap(&lines[0])
        } else {
            MAX_LINE
        };
        if raw.len() > cap {
            events.push(Event::Oversize);
            return Run {
                events,
                consumed,
                in_frame: None,
                lines_completed,
            };
        }
        let mut line = raw.to_vec();
        while line.last() == Some(&b'\r') {
            line.pop();
        }
        lines.push(line);
        if lines.len() == 3 {
            let [c, k, a]: [Vec<u8>; 3] = std::mem::take(&mut lines).try_into().unwrap();
            events.push(Event::Frame([c, k, a]));
        }
    }
    consumed += rest.len();
    Run {
        events,
        consumed,
        in_frame: Some(!lines.is_empty() || !rest.is_empty()),
        lines_completed,
    }
}

fn frames(run: &Run) -> Vec<[Vec<u8>; 3]> {
    run.events
        .iter()
        .map(|e| match e {
            Event::Frame(lines) => lines.clone(),
            Event::Oversize => panic!("unexpected oversize line in {:?}", run.events),
        })
        .collect()
}

fn parse_lines(lines: &[Vec<u8>; 3]) -> Result<Request, ProtoError> {
    let mut d = FrameDecoder::new();
    let input = [&lines[0][..], b"\n", &lines[1], b"\n", &lines[2], b"\n"].concat();
    assert_eq!(d.feed(&input), (input.len(), Progress::Frame));
    Request::parse(&d.frame())
}

/// Encodes, decodes and parses `request`, which must come back unchanged
/// from a single frame that uses up every byte.
fn assert_reencodes(request: &Request) {
    let bytes = request.encode_to_vec();
    let r = run(&bytes, &[]);
    let fs = frames(&r);
    assert_eq!(
        fs.len(),
        1,
        "{request:?} encoded to {:?}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(r.consumed, bytes.len());
    assert_eq!(
        parse_lines(&fs[0]).as_ref(),
        Ok(request),
        "{:?}",
        String::from_utf8_lossy(&bytes)
    );
}

fn request_key(request: &Request) -> Option<&Key> {
    match request {
        Request::Acquire { key, .. }
        | Request::Release { key, .. }
        | Request::Renew { key, .. }
        | Request::Enqueue { key, .. }
        | Request::Wait { key, .. }
        | Request::Label { key, .. } => Some(key),
        Request::Auth { .. }
        | Request::Ping
        | Request::Stats
        | Request::Barrier
        | Request::StableRef(_) => None,
    }
}

fn crlf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 3);
    for &b in bytes {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

fn cuts(len: usize, idx: &[Index]) -> Vec<usize> {
    idx.iter().map(|i| i.index(len + 1)).collect()
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

const FORBIDDEN_IN_KEY: [u8; 4] = [b' ', b'\t', b'\r', b'\n'];

/// Keys of 1..=256 bytes without space/tab/CR/LF: ASCII, raw non-UTF-8 bytes
/// and multibyte characters (including non-ASCII white space such as U+00A0
/// and U+3000, which keys may contain), truncated at 256 bytes, which may cut
/// a character in half.
fn key_bytes() -> impl Strategy<Value = Vec<u8>> {
    let unit = prop_oneof![
        4 => any::<u8>().prop_map(|b| vec![if FORBIDDEN_IN_KEY.contains(&b) { b'_' } else { b }]),
        2 => any::<char>().prop_map(|c| {
            let c = if c.is_ascii_whitespace() { '\u{e9}' } else { c };
            c.to_string().into_bytes()
        }),
        1 => prop::sample::select(vec!["\u{a0}", "\u{3000}", "\u{85}", "日本", "\u{1f512}", "\u{fffd}"])
            .prop_map(|s| s.as_bytes().to_vec()),
    ];
    prop_oneof![vec(unit.clone(), 1..=8), vec(unit, 1..=256)].prop_map(|units| {
        let mut key = units.concat();
        key.truncate(MAX_LINE);
        key
    })
}

fn key() -> impl Strategy<Value = Key> {
    key_bytes().prop_map(|k| Key::from_bytes(&k).expect("generated key is valid"))
}

fn seconds() -> impl Strategy<Value = Seconds> {
    prop_oneof![Just(0), Just(MAX_SECONDS), 0..=100u64, 0..=MAX_SECONDS]
        .prop_map(|s| Seconds::new(s).unwrap())
}

fn lease() -> impl Strategy<Value = Lease> {
    prop_oneof![Just(1), Just(MAX_SECONDS), 1..=100u64, 1..=MAX_SECONDS]
        .prop_map(|s| Lease::new(s).unwrap())
}

fn limit() -> impl Strategy<Value = Limit> {
    prop_oneof![
        Just(1),
        Just(u64::from(MAX_LIMIT)),
        1..=16u64,
        1..=u64::from(MAX_LIMIT)
    ]
    .prop_map(|n| Limit::new(n).unwrap())
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Lock), limit().prop_map(Kind::Semaphore)]
}

fn namespace() -> impl Strategy<Value = Namespace> {
    prop_oneof![Just(Namespace::Lock), Just(Namespace::Semaphore)]
}

/// Tokens as the server mints them: 32 lowercase hex characters.
fn token_hex() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[0-9a-f]{32}".prop_map(String::into_bytes),
        (any::<u64>(), any::<u64>()).prop_map(|(f, s)| Token::new(f, s).to_string().into_bytes()),
    ]
}

/// Auth secrets that survive the server's trim: no LF, no white space at
/// either end; anything (CR, spaces, non-UTF-8) in between, up to 600 bytes
/// so the 64 KiB allowance of the `auth` argument line is exercised.
fn auth_secret() -> impl Strategy<Value = Vec<u8>> {
    let edge = prop_oneof![0x21..=0x7eu8, Just(0xffu8)];
    let middle = vec(
        any::<u8>().prop_map(|b| if b == b'\n' { b'\r' } else { b }),
        0..600,
    );
    prop_oneof![
        Just(Vec::new()),
        edge.clone().prop_map(|b| vec![b]),
        (edge.clone(), middle, edge).prop_map(|(a, m, z)| [vec![a], m, vec![z]].concat()),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        auth_secret().prop_map(|token| Request::Auth { token }),
        (key(), kind(), seconds(), prop::option::of(lease())).prop_map(
            |(key, kind, timeout, lease)| Request::Acquire {
                key,
                kind,
                timeout,
                lease
            }
        ),
        (key(), namespace(), token_hex()).prop_map(|(key, namespace, token)| Request::Release {
            key,
            namespace,
            token: token.into()
        }),
        (key(), namespace(), token_hex(), prop::option::of(lease())).prop_map(
            |(key, namespace, token, lease)| Request::Renew {
                key,
                namespace,
                token: token.into(),
                lease
            }
        ),
        (key(), kind(), prop::option::of(lease()))
            .prop_map(|(key, kind, lease)| Request::Enqueue { key, kind, lease }),
        (key(), namespace(), seconds()).prop_map(|(key, namespace, timeout)| Request::Wait {
            key,
            namespace,
            timeout
        }),
        Just(Request::Ping),
        Just(Request::Stats),
        Just(Request::Barrier),
        "[ -~]{1,64}".prop_filter_map("a stable ref", |name| {
            dflockd_proto::StableRef::new(name.trim()).map(Request::StableRef)
        }),
        (key(), token_hex(), "[!-~]{1,64}").prop_map(|(key, token, label)| Request::Label {
            key,
            token: token.into(),
            label: dflockd_proto::Label::new(&label).expect("printable, no spaces"),
        }),
    ]
}

fn status() -> impl Strategy<Value = Status> {
    // `error_not_leader` is carried by `Reply::NotLeader`; see
    // `failure_not_leader_is_the_bare_not_leader_reply`.
    prop::sample::select(vec![
        Status::Timeout,
        Status::Error,
        Status::ErrorAuth,
        Status::ErrorMaxLocks,
        Status::ErrorMaxWaiters,
        Status::ErrorLimitMismatch,
        Status::ErrorNotEnqueued,
        Status::ErrorAlreadyEnqueued,
        Status::ErrorLeaseExpired,
        Status::ErrorDraining,
    ])
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A one-line JSON object, as `serde_json` (and Go's encoder) writes it:
/// control characters inside strings are escaped, so no raw newline.
fn stats_json() -> impl Strategy<Value = String> {
    prop::collection::btree_map(any::<String>(), json_value(), 0..6).prop_map(|m| {
        serde_json::to_string(&serde_json::Value::Object(m.into_iter().collect())).unwrap()
    })
}

fn reply() -> impl Strategy<Value = Reply> {
    let token = (any::<u64>(), any::<u64>()).prop_map(|(f, s)| Token::new(f, s));
    prop_oneof![
        Just(Reply::Ok),
        (token.clone(), lease()).prop_map(|(token, lease)| Reply::Granted { token, lease }),
        (token, lease()).prop_map(|(token, lease)| Reply::Acquired { token, lease }),
        Just(Reply::Queued),
        seconds().prop_map(Reply::Renewed),
        stats_json().prop_map(Reply::Stats),
        status().prop_map(Reply::Failure),
        prop::option::of(prop_oneof![
            "[a-z0-9.-]{1,30}:[0-9]{1,5}",
            "\\[[0-9a-f:]{2,39}\\]:[0-9]{1,5}",
        ])
        .prop_map(Reply::NotLeader),
    ]
}

/// Byte soup biased towards the protocol: LFs, CRs, command words, numbers,
/// Unicode white space, runs around the 256-byte cap.
fn protocol_soup() -> impl Strategy<Value = Vec<u8>> {
    let words = vec![
        "auth",
        "l",
        "r",
        "n",
        "e",
        "w",
        "sl",
        "sr",
        "sn",
        "se",
        "sw",
        "ping",
        "stats",
        "_",
        "k",
        "0",
        "33",
        "-1",
        "+7",
        "9223372036",
        "9223372037",
        "1048576",
        "1048577",
        " ",
        "\t",
        "\u{a0}",
        "\u{85}",
        "\x0b",
        "0123456789abcdef0123456789abcdef",
    ];
    let segment = prop_oneof![
        4 => any::<u8>().prop_map(|b| vec![b]),
        4 => Just(b"\n".to_vec()),
        1 => Just(b"\r".to_vec()),
        1 => Just(b"\r\n".to_vec()),
        4 => prop::sample::select(words).prop_map(|w| w.as_bytes().to_vec()),
        1 => (any::<u8>(), 250..=262usize).prop_map(|(b, n)| vec![b; n]),
    ];
    vec(segment, 0..64).prop_map(|s| s.concat())
}

/// A line without LF of at most 256 bytes (CRs and anything else allowed).
fn lf_free_line() -> impl Strategy<Value = Vec<u8>> {
    let byte = any::<u8>().prop_map(|b| if b == b'\n' { b'x' } else { b });
    prop_oneof![vec(byte.clone(), 0..=8), vec(byte, 0..=MAX_LINE)]
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Every valid request survives encode -> FrameDecoder -> parse, also
    /// pipelined behind other requests and fed in arbitrary pieces.
    #[test]
    fn requests_round_trip(requests in vec(request(), 1..4), idx in vec(any::<Index>(), 0..8)) {
        let bytes: Vec<u8> = requests.iter().flat_map(Request::encode_to_vec).collect();
        for cut in [Vec::new(), cuts(bytes.len(), &idx)] {
            let r = run(&bytes, &cut);
            prop_assert_eq!(r.in_frame, Some(false));
            let parsed: Vec<_> = frames(&r).iter().map(parse_lines).collect();
            let expected: Vec<_> = requests.iter().cloned().map(Ok).collect();
            prop_assert_eq!(parsed, expected);
        }
    }

    /// The same with CRLF line endings. The CR counts towards the cap, so a
    /// 256-byte key is oversize with CRLF (spec §1.3: the effective maximum
    /// is 255 bytes); everything shorter parses to the same request.
    #[test]
    fn requests_round_trip_with_crlf(requests in vec(request(), 1..4), idx in vec(any::<Index>(), 0..8)) {
        let bytes: Vec<u8> = requests.iter().flat_map(|r| crlf(&r.encode_to_vec())).collect();
        let mut expected = Vec::new();
        for request in &requests {
            let too_long = request.encode_to_vec().split(|&b| b == b'\n').any(|line| line.len() + 1 > MAX_LINE)
                && !matches!(request, Request::Auth { .. });
            if too_long {
                expected.push(Event::Oversize);
                break;
            }
            expected.push(Event::Frame(Default::default()));
        }
        let r = run(&bytes, &cuts(bytes.len(), &idx));
        prop_assert_eq!(r.events.len(), expected.len());
        for ((event, expected), request) in r.events.iter().zip(&expected).zip(&requests) {
            match (event, expected) {
                (Event::Frame(lines), Event::Frame(_)) => prop_assert_eq!(parse_lines(lines), Ok(request.clone())),
                (Event::Oversize, Event::Oversize) => {
                    let key_len = request_key(request).map(|k| k.as_bytes().len());
                    prop_assert_eq!(key_len, Some(MAX_LINE));
                }
                (got, want) => prop_assert!(false, "got {:?}, expected {:?}", got, want),
            }
        }
    }

    /// Never desyncs: whatever complete frames came before (three arbitrary
    /// LF-free lines of at most 256 bytes each, so never oversize), a valid
    /// request that follows decodes to exactly that request.
    #[test]
    fn garbage_frames_never_desync(
        prefix in vec([lf_free_line(), lf_free_line(), lf_free_line()], 0..4),
        request in request(),
        idx in vec(any::<Index>(), 0..8),
    ) {
        let mut bytes = Vec::new();
        for [c, k, a] in &prefix {
            for line in [c, k, a] {
                bytes.extend_from_slice(line);
                bytes.push(b'\n');
            }
        }
        bytes.extend_from_slice(&request.encode_to_vec());
        let r = run(&bytes, &cuts(bytes.len(), &idx));
        let fs = frames(&r);
        prop_assert_eq!(fs.len(), prefix.len() + 1);
        prop_assert_eq!(r.in_frame, Some(false));
        for (got, [c, k, a]) in fs.iter().zip(&prefix) {
            let strip = |l: &Vec<u8>| {
                let n = l.iter().rposition(|&b| b != b'\r').map_or(0, |i| i + 1);
                l[..n].to_vec()
            };
            prop_assert_eq!(got, &[strip(c), strip(k), strip(a)]);
        }
        prop_assert_eq!(parse_lines(fs.last().unwrap()), Ok(request));
    }

    /// Arbitrary bytes, fed whole or in pieces: the decoder never panics,
    /// always agrees with the reference model, never stores more than a cap
    /// (checked inside `run`), and the parser never panics; whatever parses
    /// re-encodes to a frame that parses back to the same request.
    #[test]
    fn arbitrary_bytes_match_the_model(
        input in prop_oneof![protocol_soup(), vec(any::<u8>(), 0..1024)],
        idx in vec(any::<Index>(), 0..16),
    ) {
        let expected = model(&input);
        let every_byte = if input.len() <= 4096 { (0..input.len()).collect() } else { Vec::new() };
        for cut in [Vec::new(), cuts(input.len(), &idx), every_byte] {
            let got = run(&input, &cut);
            prop_assert_eq!(&got, &expected);
        }
        for event in &expected.events {
            if let Event::Frame(lines) = event
                && let Ok(request) = parse_lines(lines)
            {
                assert_reencodes(&request);
            }
        }
    }

    /// Every line length around the caps: exactly the cap is a line, one
    /// more byte is oversize, trailing CRs count, and the 64 KiB allowance
    /// applies to the argument of `auth` only.
    #[test]
    fn line_caps_are_exact(
        slot in 0..3usize,
        len in (MAX_LINE - 3)..=(MAX_LINE + 3),
        crs in 0..3usize,
        command in prop::sample::select(vec!["l", "auth", "ping", "stats"]),
    ) {
        let mut lines = [command.as_bytes().to_vec(), b"k".to_vec(), b"0".to_vec()];
        lines[slot] = [vec![b'a'; len.saturating_sub(crs)], vec![b'\r'; crs.min(len)]].concat();
        let bytes: Vec<u8> = lines.iter().flat_map(|l| [&l[..], b"\n"].concat()).collect();
        let r = run(&bytes, &[]);
        let allowed = if slot == 2 && lines[0] == b"auth" { MAX_AUTH_LINE } else { MAX_LINE };
        if len > allowed {
            prop_assert_eq!(r.events, vec![Event::Oversize]);
        } else {
            prop_assert_eq!(r.events.len(), 1);
            prop_assert!(matches!(&r.events[0], Event::Frame(f) if f[slot].len() == len - crs.min(len)));
        }
    }

    /// Go `strings.Fields` / `strconv` semantics: any run of Unicode white
    /// space separates fields, leading zeros and `+` are fine.
    #[test]
    fn argument_spelling_does_not_matter(
        key in key(),
        kind in kind(),
        timeout in seconds(),
        lease in prop::option::of(lease()),
        seps in vec(vec(prop::sample::select(vec![" ", "\t", "\x0b", "\x0c", "\r", "\u{85}", "\u{a0}", "\u{3000}", "\u{2003}"]), 1..3), 4),
        zeros in vec(0..3usize, 3),
        plus in vec(any::<bool>(), 3),
    ) {
        let spell = |i: usize, n: u64| format!("{}{}{n}", if plus[i] { "+" } else { "" }, "0".repeat(zeros[i]));
        let mut fields = vec![spell(0, timeout.get())];
        if let Kind::Semaphore(limit) = kind {
            fields.push(spell(1, u64::from(limit.get())));
        }
        if let Some(lease) = lease {
            fields.push(spell(2, lease.get()));
        }
        // Leading separator, separators between fields; a trailing CR would be
        // stripped by the decoder anyway, so end with a non-CR separator.
        let mut arg = seps[0].concat();
        for (i, f) in fields.iter().enumerate() {
            arg.push_str(f);
            arg.push_str(&seps[i + 1].concat());
        }
        arg.push(' ');
        let command = if matches!(kind, Kind::Lock) { "l" } else { "sl" };
        let lines = [command.as_bytes().to_vec(), key.as_bytes().to_vec(), arg.into_bytes()];
        prop_assume!(lines[2].len() <= MAX_LINE);
        prop_assert_eq!(parse_lines(&lines), Ok(Request::Acquire { key, kind, timeout, lease }));
    }

    /// Release and renew carry the token exactly as sent (after trimming),
    /// whatever the bytes: the server compares tokens byte for byte.
    #[test]
    fn tokens_are_kept_as_sent(
        key in key(),
        namespace in namespace(),
        token in vec(any::<u8>().prop_map(|b| if b.is_ascii_whitespace() || b == 0x0b { b'.' } else { b }), 1..80),
        lease in prop::option::of(lease()),
    ) {
        // No Unicode white space (e.g. U+0085 as C2 85) among the random bytes.
        prop_assume!(!token.utf8_chunks().any(|c| c.valid().contains(char::is_whitespace)));
        let release = Request::Release { key: key.clone(), namespace, token: token.clone().into() };
        let renew = Request::Renew { key, namespace, token: token.into(), lease };
        assert_reencodes(&release);
        assert_reencodes(&renew);
    }
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Every reply shape survives encode -> parse, with LF or CRLF.
    #[test]
    fn replies_round_trip(reply in reply()) {
        let line = reply.encode_to_vec();
        prop_assert_eq!(line.last(), Some(&b'\n'));
        prop_assert!(!line[..line.len() - 1].contains(&b'\n'), "one line only");
        prop_assert!(!line.contains(&b'\r'), "never CRLF");
        prop_assert_eq!(Reply::parse(&line), Ok(reply.clone()));
        prop_assert_eq!(Reply::parse(&crlf(&line)), Ok(reply.clone()));
        prop_assert_eq!(Reply::parse(&line[..line.len() - 1]), Ok(reply));
    }

    /// Reply parsing never panics, and whatever parses is stable under
    /// encode -> parse.
    #[test]
    fn arbitrary_reply_lines(
        line in prop_oneof![
            vec(any::<u8>(), 0..200),
            protocol_soup(),
            "(ok|acquired|queued|timeout|error[a-z_]*)( [ -~]{0,40}){0,3}\r?\n?".prop_map(String::into_bytes),
        ],
    ) {
        if let Ok(reply) = Reply::parse(&line) {
            prop_assert_eq!(Reply::parse(&reply.encode_to_vec()), Ok(reply));
        }
    }
}

#[test]
fn failure_not_leader_is_the_bare_not_leader_reply() {
    // Two values encode to the same line; parsing picks the canonical one.
    let line = Reply::Failure(Status::ErrorNotLeader).encode_to_vec();
    assert_eq!(line, Reply::NotLeader(None).encode_to_vec());
    assert_eq!(Reply::parse(&line), Ok(Reply::NotLeader(None)));
}

// ---------------------------------------------------------------------------
// Tokens, fences, keys, sharding
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fence_round_trips(fence in any::<u64>(), salt in any::<u64>(), flips in vec(any::<bool>(), 32)) {
        let token = Token::new(fence, salt);
        let text = token.to_string();
        prop_assert_eq!(text.len(), 32);
        prop_assert!(text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        prop_assert_eq!(fence_from_token(&text), Ok(fence));
        prop_assert_eq!(text.parse::<Token>(), Ok(token));
        prop_assert_eq!(Token::parse_wire(text.as_bytes()), Some(token));
        let mut bytes = Vec::new();
        token.write_hex(&mut bytes);
        prop_assert_eq!(bytes, text.as_bytes());

        // Upper and mixed case: accepted for the fence, never on the wire.
        let upper = text.to_ascii_uppercase();
        prop_assert_eq!(fence_from_token(&upper), Ok(fence));
        prop_assert_eq!(upper.parse::<Token>(), Ok(token));
        let mixed: String = text
            .chars()
            .zip(&flips)
            .map(|(c, &f)| if f { c.to_ascii_uppercase() } else { c })
            .collect();
        prop_assert_eq!(fence_from_token(&mixed), Ok(fence));
        prop_assert_eq!(Token::parse_wire(mixed.as_bytes()).is_some(), mixed == text);
    }

    #[test]
    fn tokens_of_other_lengths_are_rejected(text in prop_oneof!["[0-9a-fA-F]{0,64}", ".{0,40}"]) {
        prop_assume!(text.len() != 32);
        prop_assert_eq!(fence_from_token(&text), Err(TokenError::Length(text.len())));
        prop_assert!(text.parse::<Token>().is_err());
        prop_assert_eq!(Token::parse_wire(text.as_bytes()), None);
    }

    #[test]
    fn thirty_two_bytes_are_a_token_iff_all_hex(
        text in prop_oneof![
            "[0-9a-fA-F]{32}",
            "[0-9a-fA-Fg-z +x-]{32}",
            // Multibyte characters, padded to exactly 32 bytes.
            "[0-9a-f\u{e9}\u{3000}]{0,32}".prop_map(|t| {
                let mut t: String = t.chars().scan(0, |n, c| { *n += c.len_utf8(); (*n <= 32).then_some(c) }).collect();
                while t.len() < 32 {
                    t.push('0');
                }
                t
            }),
        ],
    ) {
        let hex = text.bytes().all(|b| b.is_ascii_hexdigit());
        prop_assert_eq!(fence_from_token(&text).is_ok(), hex);
        prop_assert_eq!(text.parse::<Token>().is_ok(), hex);
        if !hex {
            prop_assert_eq!(fence_from_token(&text), Err(TokenError::NotHex));
        }
    }

    #[test]
    fn shard_is_crc32_modulo(key in prop_oneof![any::<String>(), "[a-z0-9:/-]{1,40}"], n in 1..1000usize) {
        let got = shard(&key, n).unwrap();
        prop_assert!(got < n);
        prop_assert_eq!(got, crc32fast::hash(key.as_bytes()) as usize % n);
        prop_assert!(shard(&key, 0).is_err());
    }

    #[test]
    fn keys_are_validated_by_bytes(bytes in prop_oneof![key_bytes(), vec(any::<u8>(), 0..300), vec(prop::sample::select(vec![b'a', b' ', b'\t', b'\r', b'\n', 0xff]), 0..8)]) {
        let valid = !bytes.is_empty() && bytes.len() <= MAX_LINE && !bytes.iter().any(|b| FORBIDDEN_IN_KEY.contains(b));
        match Key::from_bytes(&bytes) {
            Ok(key) => {
                prop_assert!(valid);
                prop_assert_eq!(key.as_bytes(), &bytes[..]);
            }
            Err(e) => {
                prop_assert!(!valid);
                prop_assert_eq!(e, ProtoError::InvalidKey);
            }
        }
    }

    #[test]
    fn keys_compare_order_and_hash_as_their_bytes(
        // Around the in-place limit (22 bytes), so short and long keys meet.
        a in prop_oneof![key_bytes(), "[ab]{20,25}".prop_map(String::into_bytes)],
        b in prop_oneof![key_bytes(), "[ab]{20,25}".prop_map(String::into_bytes)],
    ) {
        use std::hash::BuildHasher;
        let hasher = std::hash::RandomState::new();
        let (ka, kb) = (Key::from_bytes(&a).unwrap(), Key::from_bytes(&b).unwrap());
        prop_assert_eq!(ka.as_bytes(), &a[..]);
        prop_assert_eq!(ka == kb, a == b);
        prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        let copy = ka.clone();
        prop_assert!(copy == ka);
        prop_assert_eq!(hasher.hash_one(&copy), hasher.hash_one(&ka));
        if a == b {
            prop_assert_eq!(hasher.hash_one(&ka), hasher.hash_one(&kb));
        }
    }

    #[test]
    fn value_ranges(n in prop_oneof![0..=3u64, (MAX_SECONDS - 2)..=(MAX_SECONDS + 2), 1_048_574..=1_048_578u64, any::<u64>()]) {
        prop_assert_eq!(Seconds::new(n).is_ok(), n <= MAX_SECONDS);
        prop_assert_eq!(Lease::new(n).is_ok(), (1..=MAX_SECONDS).contains(&n));
        prop_assert_eq!(Limit::new(n).is_ok(), (1..=u64::from(MAX_LIMIT)).contains(&n));
    }
}

// ---------------------------------------------------------------------------
// The fast path for common requests (`FrameDecoder::decode_common`)
// ---------------------------------------------------------------------------

/// Runs the fast path on `input` and checks it against the general one:
/// a request it returns is what `decode` + `parse_reusing` make of the
/// same bytes, with the same bytes used and the decoder left the same; a
/// `None` leaves the decoder untouched. Returns whether it took the frame.
fn check_common(input: &[u8], recent: Option<&Key>) -> bool {
    let mut fast = FrameDecoder::new();
    let Some((used, request)) = fast.decode_common(input, recent) else {
        assert_eq!(fast.lines_completed(), 0);
        assert!(!fast.in_frame());
        return false;
    };
    let mut general = FrameDecoder::new();
    let (general_used, decoded) = general.decode(input);
    let Decoded::Frame(frame) = decoded else {
        panic!("fast path took {input:?}, the general path found {decoded:?}");
    };
    assert_eq!(used, general_used, "{input:?}");
    assert_eq!(
        Ok(&request),
        Request::parse_reusing(&frame, recent).as_ref(),
        "{input:?}"
    );
    assert_eq!(fast.lines_completed(), general.lines_completed());
    assert_eq!(fast.in_frame(), general.in_frame());
    true
}

/// The usual spellings of `l`, `r` and `n` in the lock namespace, with
/// minted tokens.
fn common_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (key(), seconds(), prop::option::of(lease())).prop_map(|(key, timeout, lease)| {
            Request::Acquire {
                key,
                kind: Kind::Lock,
                timeout,
                lease,
            }
        }),
        (key(), token_hex()).prop_map(|(key, token)| Request::Release {
            key,
            namespace: Namespace::Lock,
            token: token.into()
        }),
        (key(), token_hex(), prop::option::of(lease())).prop_map(|(key, token, lease)| {
            Request::Renew {
                key,
                namespace: Namespace::Lock,
                token: token.into(),
                lease,
            }
        }),
    ]
}

/// Bytes that make a near miss of a common request when put in one.
fn spoiler() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(vec![
            &b"\n"[..],
            b"\r",
            b" ",
            b"  ",
            b"\t",
            b"+",
            b"-",
            b"0",
            b"9",
            b"x",
            b"\x0b",
            b"\xc2\xa0",
            b"\xc2\x85",
            b"\xa0",
            b"\xff",
            b"\x7f",
            b"\x00",
            b"s",
            b"l",
        ])
        .prop_map(<[u8]>::to_vec),
        vec(any::<u8>(), 1..4),
        (any::<u8>(), 1..300usize).prop_map(|(b, n)| vec![b; n]),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Every usual `l`, `r` and `n` takes the fast path, with or without a
    /// recent key (equal to its own or not), also with bytes behind it,
    /// and reads as on the general path.
    #[test]
    fn common_requests_take_the_fast_path(
        request in common_request(),
        other in key(),
        which in 0..3u8,
        tail in protocol_soup(),
    ) {
        let mut input = request.encode_to_vec();
        input.extend_from_slice(&tail);
        let own = request_key(&request).cloned();
        let recent = match which {
            0 => None,
            1 => own.as_ref(),
            _ => Some(&other),
        };
        prop_assert!(check_common(&input, recent), "{:?} not taken", request);
    }

    /// A common request with bytes replaced, inserted or removed anywhere
    /// (CRs, spaces, signs, digits, Unicode white space, long runs…): the
    /// fast path returns what the general path does, or leaves it alone.
    #[test]
    fn near_misses_read_as_on_the_general_path(
        request in common_request(),
        edits in vec((any::<Index>(), 0..3u8, spoiler()), 1..4),
        other in key(),
        which in 0..3u8,
    ) {
        let mut input = request.encode_to_vec();
        for (at, how, bytes) in &edits {
            let i = at.index(input.len() + 1);
            match how {
                0 => { input.splice(i..i, bytes.iter().copied()); }
                1 => { input.splice(i..(i + bytes.len()).min(input.len()), bytes.iter().copied()); }
                _ => { input.drain(i..(i + bytes.len()).min(input.len())); }
            }
        }
        let own = request_key(&request).cloned();
        let recent = match which {
            0 => None,
            1 => own.as_ref(),
            _ => Some(&other),
        };
        check_common(&input, recent);
    }

    /// Byte soup: never a disagreement.
    #[test]
    fn soup_reads_as_on_the_general_path(input in protocol_soup(), other in key()) {
        check_common(&input, None);
        check_common(&input, Some(&other));
    }
}

/// Between frames only: with part of a frame buffered, the bytes belong
/// to that frame.
#[test]
fn common_requests_wait_for_a_partial_frame() {
    let mut d = FrameDecoder::new();
    assert_eq!(d.decode(b"l\n"), (2, Decoded::NeedMore));
    assert_eq!(d.decode_common(b"l\nk\n5\n", None), None);
    assert_eq!(d.lines_completed(), 1);
}

// ---------------------------------------------------------------------------
// Regressions (bugs found while writing the properties above)
// ---------------------------------------------------------------------------

fn parse(input: &[u8]) -> Result<Request, ProtoError> {
    let mut d = FrameDecoder::new();
    assert_eq!(d.feed(input), (input.len(), Progress::Frame));
    Request::parse(&d.frame())
}

/// A renew token was decoded lossily: each non-UTF-8 byte became U+FFFD
/// (3 bytes), so the token was not the bytes the peer sent, and 200 such
/// bytes re-encoded to a 600-byte, oversize argument line.
#[test]
fn renew_token_keeps_non_utf8_bytes() {
    let token = [0xff; 200];
    let input = [b"n\nk\n".as_slice(), &token, b" 30\n"].concat();
    let request = parse(&input).unwrap();
    assert!(matches!(&request, Request::Renew { token: t, .. } if t[..] == token[..]));
    assert_eq!(request.encode_to_vec(), input);
    let input = [b"sn\nk\n\t".as_slice(), b"\xc3tok\xa0", b"\n"].concat();
    assert!(
        matches!(parse(&input).unwrap(), Request::Renew { token, .. } if token == b"\xc3tok\xa0")
    );
}

/// Trimming a non-UTF-8 line fell back to ASCII trimming, which keeps VT
/// (0x0B) and U+00A0 / U+3000 at the ends; Go's `strings.TrimSpace` removes
/// every Unicode white-space character and leaves invalid bytes alone.
#[test]
fn trimming_non_utf8_lines_matches_go() {
    let release = parse(b"r\nk\n\x0b\xc2\xa0tok\xff\xe3\x80\x80\x0b\n").unwrap();
    assert!(matches!(release, Request::Release { token, .. } if token == b"tok\xff"));
    let auth = parse(b"auth\n_\n\x0bs3cret\xfe\xc2\xa0\n").unwrap();
    assert_eq!(
        auth,
        Request::Auth {
            token: b"s3cret\xfe".to_vec()
        }
    );
    // A lone continuation byte is not U+00A0 / U+0085: it stays.
    let release = parse(b"r\nk\n\xa0tok\x85\n").unwrap();
    assert!(matches!(release, Request::Release { token, .. } if token == b"\xa0tok\x85"));
}

/// `sl` fields are checked left to right like the Go server (timeout, then
/// limit, then lease); the limit used to be checked first, so the logged
/// error code differed (13 instead of 4 or 6).
#[test]
fn semaphore_acquire_checks_fields_left_to_right() {
    assert_eq!(parse(b"sl\ns\n-1 0\n"), Err(ProtoError::InvalidTimeout));
    assert_eq!(parse(b"sl\ns\nx 0 0\n"), Err(ProtoError::InvalidInteger));
    assert_eq!(
        parse(b"sl\ns\n9223372037 x\n"),
        Err(ProtoError::InvalidTimeout)
    );
    assert_eq!(parse(b"sl\ns\n0 0 x\n"), Err(ProtoError::InvalidLimit));
    assert_eq!(parse(b"sl\ns\n0 1 x\n"), Err(ProtoError::InvalidInteger));
}

// ------------------------------------------------- mux extension (protocol-mux.md)

fn not_auth(request: &Request) -> bool {
    !matches!(request, Request::Auth { .. })
}

fn two_phase(request: &Request) -> bool {
    matches!(request, Request::Enqueue { .. } | Request::Wait { .. })
}

proptest! {
    #![proptest_config(config())]

    /// Every request (but `auth`, which mux mode refuses) survives
    /// id + ticket encoding, framing and mux parsing; the ticket is kept for
    /// two-phase commands only.
    #[test]
    fn mux_requests_round_trip(
        items in vec((any::<u64>(), any::<u64>(), request().prop_filter("no auth", not_auth)), 1..4),
    ) {
        let mut bytes = Vec::new();
        for (id, ticket, request) in &items {
            dflockd_proto::encode_mux_request(*id, *ticket, request, &mut bytes);
        }
        let mut decoder = FrameDecoder::new();
        let mut rest = &bytes[..];
        for (id, ticket, request) in &items {
            let (used, progress) = decoder.feed(rest);
            rest = &rest[used..];
            prop_assert_eq!(progress, Progress::Frame);
            let parsed = dflockd_proto::MuxRequest::parse(&decoder.frame());
            let ticket = if two_phase(request) { *ticket } else { 0 };
            prop_assert_eq!(parsed, Ok(dflockd_proto::MuxRequest {
                id: *id,
                ticket,
                body: dflockd_proto::MuxBody::Request(request.clone()),
            }));
        }
        prop_assert!(rest.is_empty());
    }

    /// Prefixing plain frames with consecutive ids gives exactly the mux
    /// encoding of the same requests.
    #[test]
    fn prefixing_plain_frames_matches_mux_encoding(
        requests in vec(request().prop_filter("no auth", not_auth), 1..6),
        first in 0u64..u64::MAX / 2,
    ) {
        let plain: Vec<u8> = requests.iter().flat_map(Request::encode_to_vec).collect();
        let mut prefixed = Vec::new();
        let n = dflockd_proto::prefix_frames(&plain, first, &mut prefixed);
        prop_assert_eq!(n, requests.len() as u64);
        let mut direct = Vec::new();
        for (i, request) in requests.iter().enumerate() {
            dflockd_proto::encode_mux_request(first + i as u64, 0, request, &mut direct);
        }
        prop_assert_eq!(prefixed, direct);
    }

    /// Every reply survives the id prefix.
    #[test]
    fn mux_replies_round_trip(id in any::<u64>(), reply in reply()) {
        let mut line = Vec::new();
        dflockd_proto::encode_mux_reply(id, &reply, &mut line);
        prop_assert_eq!(dflockd_proto::parse_mux_reply(&line), Ok((id, reply)));
    }

    /// Arbitrary bytes never panic the mux parser.
    #[test]
    fn mux_parser_never_panics(input in protocol_soup()) {
        let mut decoder = FrameDecoder::new();
        let mut rest = &input[..];
        while !rest.is_empty() {
            let (used, progress) = decoder.feed(rest);
            rest = &rest[used..];
            if progress == Progress::Frame {
                let _ = dflockd_proto::MuxRequest::parse(&decoder.frame());
            }
            if used == 0 {
                break;
            }
        }
        let _ = dflockd_proto::parse_mux_reply(&input);
    }
}
