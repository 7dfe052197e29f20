//! Sessions in memory on a virtual clock (see `memory.rs`): scripted
//! races, and property tests over random scripts and random bytes.

use std::collections::HashMap;
use std::time::Duration;

use dflockd_core::TableConfig;
use proptest::prelude::*;

use super::Close;
use super::memory::{Peer, deferred_world, serve_bytes, world};
use crate::config::ServerConfig;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn token_of(reply: &str) -> String {
    reply.split_whitespace().nth(1).unwrap().to_string()
}

#[test]
fn a_plain_blocking_acquire_is_granted_on_release_in_virtual_time() {
    let config = ServerConfig::ephemeral();
    let w = world(TableConfig::default());
    let mut a = Peer::new(&w, 1, &config);
    let mut b = Peer::new(&w, 2, &config);
    let granted = a.send(b"l\nk\n0\n", secs(0));
    assert!(granted.starts_with("ok "), "{granted}");
    // b waits (timeout 60 s) and its pipelined ping stays unread meanwhile.
    assert_eq!(b.send(b"l\nk\n60\nping\n_\n\n", secs(1)), "");
    assert!(b.session.is_blocked());
    assert_eq!(b.poll(secs(30)), "");
    let release = format!("r\nk\n{}\n", token_of(&granted));
    assert_eq!(a.send(release.as_bytes(), secs(31)), "ok\n");
    let reply = b.poll(secs(31));
    assert!(reply.starts_with("ok "), "{reply}");
    assert!(!b.session.is_blocked());
}

#[test]
fn a_plain_wait_times_out_on_the_virtual_clock() {
    let config = ServerConfig::ephemeral();
    let w = world(TableConfig::default());
    let mut a = Peer::new(&w, 1, &config);
    let mut b = Peer::new(&w, 2, &config);
    a.send(b"l\nk\n0\n", secs(0));
    assert_eq!(b.send(b"l\nk\n5\n", secs(0)), "");
    assert_eq!(b.poll(secs(4)), "");
    assert_eq!(b.poll(secs(5)), "timeout\n");
    assert_eq!(w.borrow().shard.table().waiter_count(), 0);
}

#[test]
fn a_mux_cancel_that_races_a_grant_answers_the_grant_before_ok() {
    let config = ServerConfig::ephemeral();
    let w = world(TableConfig::default());
    let mut a = Peer::new(&w, 1, &config);
    let mut b = Peer::new(&w, 2, &config);
    let granted = a.send(b"l\nk\n0\n", secs(0));
    assert_eq!(b.send(b"hello\n_\nmux\n", secs(0)), "ok mux 1\n");
    assert_eq!(b.send(b"7 l\nk\n60\n", secs(0)), "");
    // The release grants b's request 7; before b reads its inbox, b's own
    // `cancel` of 7 arrives.
    a.send(
        format!("r\nk\n{}\n", token_of(&granted)).as_bytes(),
        secs(1),
    );
    let out = b.send(b"8 cancel\n_\n7\n", secs(1));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("7 ok "), "{out}");
    assert_eq!(lines[1], "8 ok");
}

#[test]
fn a_failed_handshake_is_answered_error_auth() {
    let mut config = ServerConfig::ephemeral();
    config.auth_token = Some(crate::Secret::new("s3cret"));
    let w = world(TableConfig::default());
    let mut good = Peer::new(&w, 1, &config);
    assert_eq!(
        good.send(b"auth\n_\ns3cret\nping\n_\n\n", secs(0)),
        "ok\nok\n"
    );
    let mut bad = Peer::new(&w, 2, &config);
    assert_eq!(bad.send(b"auth\n_\nwrong\n", secs(0)), "error_auth\n");
    assert_eq!(bad.closed, Some(Close::AuthFailed));
}

/// Two mux peers on a log that applies only when committed, as a
/// replicated one does; `a` holds `k`.
fn deferred_pair() -> (super::memory::SharedWorld, Peer, Peer, String) {
    let config = ServerConfig::ephemeral();
    let w = deferred_world(TableConfig::default());
    let mut a = Peer::new(&w, 1, &config);
    let mut b = Peer::new(&w, 2, &config);
    assert_eq!(a.send(b"hello\n_\nmux\n", secs(0)), "ok mux 1\n");
    assert_eq!(b.send(b"hello\n_\nmux\n", secs(0)), "ok mux 1\n");
    assert_eq!(a.send(b"1 l\nk\n0\n", secs(0)), "");
    w.borrow_mut().commit_all();
    let granted = a.poll(secs(0));
    assert!(granted.starts_with("1 ok "), "{granted}");
    let token = granted.split_whitespace().nth(2).unwrap().to_string();
    (w, a, b, token)
}

#[test]
fn a_proposed_request_is_answered_only_after_its_commit() {
    let (w, _a, mut b, _) = deferred_pair();
    assert_eq!(b.send(b"5 barrier\n_\n\n6 l\nfree\n0\n", secs(0)), "");
    assert_eq!(b.poll(secs(0)), "");
    w.borrow_mut().commit(1);
    assert_eq!(b.poll(secs(0)), "5 ok\n");
    w.borrow_mut().commit(1);
    assert!(b.poll(secs(0)).starts_with("6 ok "));
}

#[test]
fn a_grant_applied_before_its_queued_answer_arrives_is_kept() {
    let (w, mut a, mut b, token) = deferred_pair();
    assert_eq!(b.send(b"7 l\nk\n60\n", secs(0)), "");
    a.send(format!("2 r\nk\n{token}\n").as_bytes(), secs(1));
    // Both commit: b queues, then a's release grants b. The grant reaches
    // b's inbox before the answer that says 7 queued.
    w.borrow_mut().commit_all();
    let out = b.poll(secs(1));
    assert!(out.starts_with("7 ok "), "{out}");
    assert_eq!(w.borrow().shard.table().holder_count(), 1);
}

#[test]
fn a_cancel_that_overtakes_its_request_withdraws_it_once_queued() {
    let (w, _a, mut b, _) = deferred_pair();
    assert_eq!(b.send(b"7 l\nk\n60\n", secs(0)), "");
    // The cancel comes before 7 is committed: answered at once, and 7 is
    // withdrawn as soon as its answer says it queued.
    assert_eq!(b.send(b"8 cancel\n_\n7\n", secs(0)), "8 ok\n");
    w.borrow_mut().commit_all();
    assert_eq!(b.poll(secs(0)), "");
    w.borrow_mut().commit_all();
    assert_eq!(b.poll(secs(0)), "7 timeout\n");
    assert_eq!(w.borrow().shard.table().waiter_count(), 0);
}

#[test]
fn a_withdraw_answer_that_lost_to_a_grant_does_not_answer_the_next_request() {
    let config = ServerConfig::ephemeral();
    let w = deferred_world(TableConfig::default());
    let mut a = Peer::new(&w, 1, &config);
    let mut b = Peer::new(&w, 2, &config);
    a.send(b"l\nk\n0\n", secs(0));
    w.borrow_mut().commit_all();
    let granted = a.poll(secs(0));
    // b (plain: every request is id 0) waits 1 s; a releases; b's timeout
    // proposes a withdraw behind the release.
    assert_eq!(b.send(b"l\nk\n1\n", secs(0)), "");
    w.borrow_mut().commit_all();
    assert_eq!(b.poll(secs(0)), "");
    a.send(
        format!("r\nk\n{}\n", token_of(&granted)).as_bytes(),
        secs(1),
    );
    assert_eq!(b.poll(secs(1)), "");
    // The release commits (b is granted); the withdraw only later.
    w.borrow_mut().commit(1);
    let out = b.poll(secs(1));
    assert!(out.starts_with("ok "), "{out}");
    // b renews at once, as id 0 again: the withdraw's late answer
    // ("granted meanwhile") must not answer it.
    assert_eq!(
        b.send(format!("n\nk\n{}\n", token_of(&out)).as_bytes(), secs(1)),
        ""
    );
    w.borrow_mut().commit(1);
    assert_eq!(b.poll(secs(1)), "");
    w.borrow_mut().commit(1);
    assert_eq!(b.poll(secs(1)), "ok 33\n");
}

/// One step of a random script against three sessions.
#[derive(Debug, Clone)]
enum Step {
    /// Bytes from peer `peer` (a request built from the parts).
    Request {
        peer: usize,
        kind: u8,
        key: u8,
        timeout: u8,
        id: u8,
    },
    /// A release of a token that peer once got.
    Release {
        peer: usize,
        nth: u8,
    },
    Advance {
        secs: u8,
    },
    Drain,
    Close {
        peer: usize,
    },
    Mux {
        peer: usize,
    },
    /// A mux cancel of request `target` (under a fresh id).
    Cancel {
        peer: usize,
        target: u8,
    },
    /// A replicated log commits the next `n` proposed commands.
    Commit {
        n: u8,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..3usize, 0..6u8, 0..2u8, 0..4u8, 0..6u8)
            .prop_map(|(peer, kind, key, timeout, id)| Step::Request { peer, kind, key, timeout, id }),
        3 => (0..3usize, any::<u8>()).prop_map(|(peer, nth)| Step::Release { peer, nth }),
        3 => (0..4u8).prop_map(|secs| Step::Advance { secs }),
        1 => Just(Step::Drain),
        1 => (0..3usize).prop_map(|peer| Step::Close { peer }),
        2 => (0..3usize).prop_map(|peer| Step::Mux { peer }),
        4 => (1..4u8).prop_map(|n| Step::Commit { n }),
        2 => (0..3usize, 0..6u8).prop_map(|(peer, target)| Step::Cancel { peer, target }),
    ]
}

/// Checks the replies of one peer: every line is a well-formed reply, a
/// mux reply names an id that was asked and not answered yet, and a plain
/// connection gets no more replies than requests.
#[derive(Default)]
struct Ledger {
    asked: HashMap<u64, usize>,
    plain_asked: usize,
    plain_answered: usize,
    tokens: Vec<(String, String)>,
    /// The resource each mux id named, and the one the last plain request
    /// named ("l" or "s" and the key).
    keys: HashMap<u64, String>,
    last_key: String,
    cancels: u8,
    /// Asked ids a cancel named while they were unanswered.
    cancelled: std::collections::HashSet<u64>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Random requests, releases, time, drains, closes and mux upgrades on
    /// three sessions: nothing panics, every reply is a reply to something
    /// asked (once), and when every session is gone the table holds nothing.
    ///
    /// With `deferred`, commands wait for a `Commit` step, as a replicated
    /// log's do: answers come after grants, cancels reach requests not yet
    /// queued, and withdraws race grants across commits.
    #[test]
    fn sessions_answer_each_request_once_and_leave_nothing(
        script in proptest::collection::vec(step(), 1..60),
        deferred in any::<bool>(),
    ) {
        let config = ServerConfig::ephemeral();
        let w = if deferred { deferred_world(TableConfig::default()) } else { world(TableConfig::default()) };
        let mut peers: Vec<Option<Peer>> = (1..=3).map(|id| Some(Peer::new(&w, id, &config))).collect();
        let mut ledgers: Vec<Ledger> = (0..3).map(|_| Ledger::default()).collect();
        let mut now = Duration::ZERO;
        for step in script {
            let mut sent: Option<(usize, Vec<u8>, Option<u64>)> = None;
            match step {
                Step::Request { peer, kind, key, timeout, id } => {
                    let key = ["a", "b"][key as usize];
                    let body = match kind {
                        0 => format!("l\n{key}\n{timeout}\n"),
                        1 => format!("sl\n{key}\n{timeout} 2\n"),
                        2 => format!("e\n{key}\n\n"),
                        3 => format!("w\n{key}\n{timeout}\n"),
                        4 => format!("n\n{key}\nnot-a-token\n"),
                        _ => "ping\n_\n\n".to_string(),
                    };
                    sent = Some((peer, body.into_bytes(), Some(u64::from(id))));
                }
                Step::Release { peer, nth } => {
                    let tokens = &ledgers[peer].tokens;
                    if !tokens.is_empty() {
                        let (key, token) = tokens[nth as usize % tokens.len()].clone();
                        let command = if key.starts_with('s') { "sr" } else { "r" };
                        let key = &key[1..];
                        sent = Some((peer, format!("{command}\n{key}\n{token}\n").into_bytes(), Some(100 + u64::from(nth))));
                    }
                }
                Step::Advance { secs } => now += Duration::from_secs(u64::from(secs)),
                Step::Drain => w.borrow_mut().draining = true,
                Step::Close { peer } => {
                    if let Some(p) = peers[peer].take() {
                        p.close();
                    }
                }
                Step::Mux { peer } => sent = Some((peer, b"hello\n_\nmux\n".to_vec(), None)),
                Step::Commit { n } => {
                    w.borrow_mut().commit(usize::from(n));
                }
                Step::Cancel { peer, target } => {
                    if ledgers[peer].asked.contains_key(&u64::from(target)) {
                        ledgers[peer].cancelled.insert(u64::from(target));
                    }
                    let id = 200 + u64::from(ledgers[peer].cancels);
                    ledgers[peer].cancels += 1;
                    sent = Some((peer, format!("cancel\n_\n{target}\n").into_bytes(), Some(id)));
                }
            }
            if let Some((peer, bytes, id)) = sent
                && let Some(p) = peers[peer].as_mut()
                && p.closed.is_none()
                && !p.session.is_blocked()
            {
                let mux = p.session.is_mux();
                let ledger = &mut ledgers[peer];
                let bytes = match (mux, id) {
                    (true, Some(id)) if !ledger.asked.contains_key(&id) => {
                        ledger.asked.insert(id, 0);
                        ledger.cancelled.remove(&id);
                        let mut framed = format!("{id} ").into_bytes();
                        framed.extend_from_slice(&bytes);
                        Some(framed)
                    }
                    (true, _) => None,
                    (false, _) => {
                        ledger.plain_asked += 1;
                        Some(bytes)
                    }
                };
                if let Some(bytes) = bytes {
                    let out = p.send(&bytes, now);
                    check(&mut ledgers[peer], &out, &bytes)?;
                }
            }
            // Every open session gets its grants and timeouts.
            for (i, p) in peers.iter_mut().enumerate() {
                if let Some(p) = p.as_mut() {
                    let out = p.poll(now);
                    check(&mut ledgers[i], &out, b"")?;
                }
            }
        }
        // Once everything proposed has committed, a cancelled request is
        // answered, without waiting for its timeout.
        for _ in 0..2 {
            w.borrow_mut().commit_all();
            for (i, p) in peers.iter_mut().enumerate() {
                if let Some(p) = p.as_mut() {
                    let out = p.poll(now);
                    check(&mut ledgers[i], &out, b"")?;
                }
            }
        }
        for (i, p) in peers.iter().enumerate() {
            if p.as_ref().is_some_and(|p| p.closed.is_none() && p.session.is_mux()) {
                let ledger = &ledgers[i];
                let open: Vec<_> = ledger.cancelled.iter().filter(|id| ledger.asked.contains_key(id)).collect();
                prop_assert!(open.is_empty(), "peer {} cancelled {:?} but they are unanswered", i, open);
            }
        }
        // Every timeout has ended by now: each request an open session
        // took has its answer (a replicated log commits what it holds; a
        // withdraw proposed by a timeout commits in the next round).
        now += Duration::from_secs(10);
        for (i, p) in peers.iter_mut().enumerate() {
            if let Some(p) = p.as_mut() {
                w.borrow_mut().commit_all();
                let mut out = p.poll(now);
                w.borrow_mut().commit_all();
                out.push_str(&p.poll(now));
                check(&mut ledgers[i], &out, b"")?;
                if p.closed.is_none() {
                    prop_assert!(!p.session.has_waiting(), "peer {} still waits after every timeout", i);
                    prop_assert!(ledgers[i].asked.is_empty(), "peer {} has unanswered ids {:?}", i, ledgers[i].asked);
                    prop_assert_eq!(ledgers[i].plain_asked, ledgers[i].plain_answered, "peer {} has an unanswered request", i);
                }
            }
        }
        for p in peers.into_iter().flatten() {
            p.close();
        }
        let world = w.borrow();
        prop_assert_eq!(world.shard.table().holder_count(), 0, "a hold outlived its connection");
        prop_assert_eq!(world.shard.table().waiter_count(), 0, "a waiter outlived its connection");
    }
}

/// Records `out`'s replies in the peer's ledger.
fn check(ledger: &mut Ledger, out: &str, sent: &[u8]) -> Result<(), TestCaseError> {
    if !sent.is_empty() {
        let text = String::from_utf8_lossy(sent);
        let mut lines = text.lines();
        let first: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
        let command = first.last().copied().unwrap_or("");
        let key = lines.next().unwrap_or("");
        let named = format!(
            "{}{}",
            if command.starts_with('s') { "s" } else { "l" },
            key
        );
        match first.first().and_then(|w| w.parse::<u64>().ok()) {
            Some(id) if first.len() > 1 => {
                ledger.keys.insert(id, named);
            }
            _ => ledger.last_key = named,
        }
    }
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        prop_assert!(!words.is_empty(), "an empty reply line");
        let (id, rest) = match words[0].parse::<u64>() {
            Ok(id) if words.len() > 1 => (Some(id), &words[1..]),
            _ => (None, &words[..]),
        };
        let key = match id {
            Some(id) => ledger.keys.get(&id).cloned().unwrap_or_default(),
            None => ledger.last_key.clone(),
        };
        match id {
            Some(id) => {
                let answered = ledger.asked.get_mut(&id);
                prop_assert!(
                    answered.is_some(),
                    "a reply to id {} never asked: {}",
                    id,
                    line
                );
                let answered = answered.unwrap();
                prop_assert_eq!(*answered, 0, "id {} answered twice: {}", id, line);
                *answered += 1;
                ledger.asked.remove(&id);
            }
            None => {
                ledger.plain_answered += 1;
                prop_assert!(
                    ledger.plain_answered <= ledger.plain_asked,
                    "more replies than requests: {}",
                    line
                );
            }
        }
        // A grant's token, for a later release (grants that came from the
        // inbox name no key; they release through the last key sent).
        if rest[0] == "ok" && rest.len() >= 2 && rest[1].len() == 32 {
            ledger.tokens.push((key.clone(), rest[1].to_string()));
        }
    }
    Ok(())
}

/// A frame from the protocol's vocabulary, or junk.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    let word = prop_oneof![
        Just("l"),
        Just("r"),
        Just("n"),
        Just("e"),
        Just("w"),
        Just("sl"),
        Just("sr"),
        Just("se"),
        Just("sw"),
        Just("ping"),
        Just("stats"),
        Just("auth"),
        Just("hello"),
        Just("cancel"),
        Just("x"),
    ];
    let key = prop_oneof![Just("k"), Just("j"), Just("_"), Just("")];
    let arg = prop_oneof![
        Just("0".to_string()),
        Just("1".to_string()),
        Just("2 3".to_string()),
        Just("mux".to_string()),
        Just("-1".to_string()),
        Just("99999999999".to_string()),
        "[0-9a-f]{32}".prop_map(|s| s),
    ];
    prop_oneof![
        4 => (word.clone(), key.clone(), arg.clone()).prop_map(|(w, k, a)| format!("{w}\n{k}\n{a}\n").into_bytes()),
        3 => (0..8u64, word, key, arg).prop_map(|(id, w, k, a)| format!("{id} {w}\n{k}\n{a}\n").into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The fuzz target's check (`memory::serve_bytes`) on random frames and
    /// junk: no panic, every line a reply, no more replies than frames, no
    /// request left waiting after its timeout, nothing left in the table.
    #[test]
    fn session_bytes_never_panic_or_desync(frames in proptest::collection::vec(frame(), 0..30)) {
        let mut data = Vec::new();
        for f in &frames {
            data.extend_from_slice(f);
        }
        serve_bytes(&data);
    }

    #[test]
    fn mux_session_bytes_never_panic_or_desync(frames in proptest::collection::vec(frame(), 0..30)) {
        let mut data = b"hello\n_\nmux\n".to_vec();
        for f in &frames {
            data.extend_from_slice(f);
        }
        serve_bytes(&data);
    }
}
