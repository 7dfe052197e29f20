//! The multiplexed extension (docs/protocol-mux.md) as raw bytes over TCP
//! against an embedded server: negotiation, ids, waits that interleave,
//! tickets, cancel, timeouts, errors, drain, disconnect and caps — and that
//! plain and mux connections share one FIFO queue.

use dflockd_testkit::wire as support;

use std::time::Duration;

use dflockd_server::ServerHandle;
use support::*;

/// A connection switched to mux mode.
async fn mux(server: &ServerHandle) -> Client {
    let mut c = Client::connect(server.local_addr()).await;
    c.expect(b"hello\n_\nmux\n", "ok mux 1").await;
    c
}

async fn plain(server: &ServerHandle) -> Client {
    Client::connect(server.local_addr()).await
}

/// Splits `"<id> <reply>"`.
fn split(line: &str) -> (u64, &str) {
    let (id, rest) = line.split_once(' ').expect("id and reply");
    (id.parse().expect("numeric id"), rest)
}

/// Reads a mux reply and checks its id; returns the reply part.
async fn reply_to(c: &mut Client, id: u64) -> String {
    let line = c.line().await;
    let (got, rest) = split(&line);
    assert_eq!(got, id, "reply {line:?}");
    rest.to_owned()
}

fn token_of(reply: &str) -> String {
    let grant = parse_grant(reply, "ok")
        .or_else(|| parse_grant(reply, "acquired"))
        .unwrap_or_else(|| panic!("expected a grant, got {reply:?}"));
    grant.token
}

#[tokio::test]
async fn ids_are_echoed_and_pipelined_replies_keep_request_order() {
    let server = start().await;
    let mut c = mux(&server).await;
    c.send(b"5 ping\n_\n_\n9 l\nk\n0\n2 stats\n_\n_\n").await;
    assert_eq!(reply_to(&mut c, 5).await, "ok");
    let grant = reply_to(&mut c, 9).await;
    assert!(parse_grant(&grant, "ok").is_some(), "{grant}");
    let stats = reply_to(&mut c, 2).await;
    assert!(stats.starts_with("ok {"), "{stats}");
    // CRLF framing works in mux mode too.
    c.send(b"6 ping\r\n_\r\n_\r\n").await;
    assert_eq!(reply_to(&mut c, 6).await, "ok");
}

#[tokio::test]
async fn a_waiting_request_does_not_block_the_connection() {
    let server = start().await;
    let mut holder = plain(&server).await;
    let held = holder.grant(b"l\nbusy\n0\n").await;
    let mut c = mux(&server).await;
    c.send(b"1 l\nbusy\n10\n").await;
    // Other requests on the same connection are served meanwhile,
    // including a second wait and a renew of something else.
    c.send(b"2 l\nfree\n10\n3 ping\n_\n_\n").await;
    let free = reply_to(&mut c, 2).await;
    assert!(parse_grant(&free, "ok").is_some(), "{free}");
    assert_eq!(reply_to(&mut c, 3).await, "ok");
    holder
        .expect(format!("r\nbusy\n{}\n", held.token), "ok")
        .await;
    let granted = reply_to(&mut c, 1).await;
    assert!(parse_grant(&granted, "ok").unwrap().fence() > held.fence());
}

#[tokio::test]
async fn tickets_on_one_connection_and_a_plain_client_share_one_fifo() {
    let server = start().await;
    let mut holder = plain(&server).await;
    let first = holder.grant(b"l\nq\n0\n").await;
    let mut c = mux(&server).await;
    // Three handles of one process enqueue on the same key, then a plain
    // client, then a fourth handle.
    for ticket in 1..=3u64 {
        c.send(format!("{ticket} e {ticket}\nq\n\n")).await;
        assert_eq!(reply_to(&mut c, ticket).await, "queued");
    }
    let mut other = plain(&server).await;
    other.expect(b"e\nq\n\n", "queued").await;
    c.send(b"4 e 4\nq\n\n").await;
    assert_eq!(reply_to(&mut c, 4).await, "queued");
    // Wait in reverse order: the grants still come in queue order.
    for ticket in (1..=4u64).rev() {
        c.send(format!("{} w {ticket}\nq\n10\n", 10 + ticket)).await;
    }
    other.send(b"w\nq\n10\n").await;
    let mut last_fence = first.fence();
    holder
        .expect(format!("r\nq\n{}\n", first.token), "ok")
        .await;
    let mut order = Vec::new();
    for step in 0..5 {
        let (who, token) = if step == 3 {
            // The plain client is fourth in line.
            let line = other.line().await;
            ("plain".to_string(), token_of(&line))
        } else {
            let line = c.line().await;
            let (id, rest) = split(&line);
            (format!("ticket {}", id - 10), token_of(rest))
        };
        let fence = support::fence(&token);
        assert!(fence > last_fence, "fences grow with each grant");
        last_fence = fence;
        order.push(who.clone());
        let release = format!("r\nq\n{token}\n");
        if who == "plain" {
            other.expect(release, "ok").await;
        } else {
            c.send(format!("{} {release}", 100 + step)).await;
            assert_eq!(reply_to(&mut c, 100 + step).await, "ok");
        }
    }
    assert_eq!(
        order,
        ["ticket 1", "ticket 2", "ticket 3", "plain", "ticket 4"]
    );
}

#[tokio::test]
async fn one_ticket_per_key_and_ticket_pair() {
    let server = start().await;
    let mut c = mux(&server).await;
    c.send(b"1 e 7\nt\n\n").await;
    assert!(reply_to(&mut c, 1).await.starts_with("acquired "));
    c.send(b"2 e 7\nt\n\n").await;
    assert_eq!(reply_to(&mut c, 2).await, "error_already_enqueued");
    c.send(b"3 w 8\nt\n0\n").await;
    assert_eq!(reply_to(&mut c, 3).await, "error_not_enqueued");
    // No ticket is ticket 0, a state of its own.
    c.send(b"4 w\nt\n0\n").await;
    assert_eq!(reply_to(&mut c, 4).await, "error_not_enqueued");
    c.send(b"5 w 7\nt\n0\n").await;
    assert!(reply_to(&mut c, 5).await.starts_with("ok "));
}

#[tokio::test]
async fn cancel_withdraws_a_waiting_request() {
    let server = start().await;
    let mut holder = plain(&server).await;
    let held = holder.grant(b"l\nc\n0\n").await;
    let mut c = mux(&server).await;
    c.send(b"1 l\nc\n30\n").await;
    holder.wait_lock_waiters("c", 1).await;
    c.send(b"2 cancel\n_\n1\n").await;
    assert_eq!(reply_to(&mut c, 1).await, "timeout");
    assert_eq!(reply_to(&mut c, 2).await, "ok");
    holder.wait_lock_waiters("c", 0).await;
    // Cancelling something unknown or finished is harmless.
    c.send(b"3 cancel\n_\n1\n4 cancel\n_\n999\n").await;
    assert_eq!(reply_to(&mut c, 3).await, "ok");
    assert_eq!(reply_to(&mut c, 4).await, "ok");
    // A cancelled two-phase wait gives up the queue place.
    c.send(b"5 e 1\nc\n\n6 w 1\nc\n30\n").await;
    assert_eq!(reply_to(&mut c, 5).await, "queued");
    holder.wait_lock_waiters("c", 1).await;
    c.send(b"7 cancel\n_\n6\n").await;
    assert_eq!(reply_to(&mut c, 6).await, "timeout");
    assert_eq!(reply_to(&mut c, 7).await, "ok");
    holder.wait_lock_waiters("c", 0).await;
    holder.expect(format!("r\nc\n{}\n", held.token), "ok").await;
}

#[tokio::test]
async fn waits_time_out_independently() {
    let server = start().await;
    let mut holder = plain(&server).await;
    holder.grant(b"l\nslow\n0\n").await;
    let mut c = mux(&server).await;
    c.send(b"1 l\nslow\n2\n2 l\nslow\n1\n").await;
    // The shorter timeout answers first.
    assert_eq!(reply_to(&mut c, 2).await, "timeout");
    assert_eq!(reply_to(&mut c, 1).await, "timeout");
    holder.wait_lock_waiters("slow", 0).await;
}

#[tokio::test]
async fn malformed_frames() {
    let server = start().await;
    // An invalid request with an id is answered and the connection stays open.
    let mut c = mux(&server).await;
    for (frame, id) in [
        (&b"1 foo\nk\nx\n"[..], 1),
        (b"2 l 5\nk\n0\n", 2),
        (b"3 l\nk\n-1\n", 3),
        (b"4 hello\n_\nmux\n", 4),
        (b"5 auth\n_\nsecret\n", 5),
        (b"6 cancel 1\n_\n1\n", 6),
        (b"7 cancel\n_\nx\n", 7),
    ] {
        c.send(frame).await;
        assert_eq!(reply_to(&mut c, id).await, "error", "{frame:?}");
    }
    c.send(b"8 ping\n_\n_\n").await;
    assert_eq!(reply_to(&mut c, 8).await, "ok");
    // A frame without an id cannot be answered by id: bare error, closed.
    c.expect(b"ping\n_\n_\n", "error").await;
    c.assert_closed().await;
    // A second request with the id of a waiting one: answered, then closed.
    let mut holder = plain(&server).await;
    holder.grant(b"l\ndup\n0\n").await;
    let mut c = mux(&server).await;
    c.send(b"1 l\ndup\n30\n").await;
    holder.wait_lock_waiters("dup", 1).await;
    c.expect(b"1 ping\n_\n_\n", "1 error").await;
    c.assert_closed().await;
    holder.wait_lock_waiters("dup", 0).await;
    // Oversize lines close the connection as on a plain one.
    let mut c = mux(&server).await;
    let long = format!("1 l\n{}\n0\n", "a".repeat(300));
    c.expect(long, "error").await;
    c.assert_closed().await;
}

#[tokio::test]
async fn closing_a_mux_connection_releases_and_withdraws_everything() {
    let server = start().await;
    let mut watcher = plain(&server).await;
    let mut c = mux(&server).await;
    c.send(b"1 l\na\n0\n2 e 1\nb\n\n3 e 2\nb\n\n4 l\na\n30\n")
        .await;
    assert!(reply_to(&mut c, 1).await.starts_with("ok "));
    assert!(reply_to(&mut c, 2).await.starts_with("acquired "));
    assert_eq!(reply_to(&mut c, 3).await, "queued");
    watcher.wait_lock_waiters("a", 1).await;
    drop(c);
    watcher
        .wait_stats("everything released", |s| {
            s["locks"].as_array().is_some_and(std::vec::Vec::is_empty)
        })
        .await;
    watcher.grant(b"l\na\n0\n").await;
    watcher.grant(b"l\nb\n0\n").await;
}

#[tokio::test]
async fn drain_answers_waiting_requests_then_refuses_new_ones() {
    let server = start().await;
    let mut holder = plain(&server).await;
    holder.grant(b"l\nd\n0\n").await;
    let mut c = mux(&server).await;
    c.send(b"1 l\nd\n30\n2 w 5\nnone\n30\n").await;
    assert_eq!(reply_to(&mut c, 2).await, "error_not_enqueued");
    holder.wait_lock_waiters("d", 1).await;
    server.begin_drain();
    assert_eq!(reply_to(&mut c, 1).await, "error");
    c.expect(b"3 ping\n_\n_\n", "3 error_draining").await;
    c.assert_closed().await;
}

#[tokio::test]
async fn the_waiting_cap_applies_per_connection() {
    let server = start_with(|c| c.mux_max_waiting = 2).await;
    let mut holder = plain(&server).await;
    holder.grant(b"l\ncap\n0\n").await;
    let mut c = mux(&server).await;
    c.send(b"1 l\ncap\n30\n2 l\ncap\n30\n3 l\ncap\n30\n4 l\ncap\n0\n")
        .await;
    assert_eq!(reply_to(&mut c, 3).await, "error_max_waiters");
    // Non-blocking requests are not capped.
    assert_eq!(reply_to(&mut c, 4).await, "timeout");
    holder.wait_lock_waiters("cap", 2).await;
}

#[tokio::test]
async fn idle_deadline_is_off_while_a_request_waits() {
    let read_timeout = Duration::from_secs(1);
    // The holder's own connection goes idle too; its hold must outlive it.
    let server = start_with(|c| {
        c.read_timeout = read_timeout;
        c.auto_release_on_disconnect = false;
    })
    .await;
    let mut holder = plain(&server).await;
    holder.grant(b"l\nidle\n0\n").await;
    let mut c = mux(&server).await;
    c.send(b"1 l\nidle\n30\n").await;
    // Silent for twice the read timeout, but a request waits: still open.
    c.assert_silent(read_timeout * 2).await;
    c.send(b"2 cancel\n_\n1\n").await;
    assert_eq!(reply_to(&mut c, 1).await, "timeout");
    assert_eq!(reply_to(&mut c, 2).await, "ok");
    // Nothing waits any more: the idle deadline applies again.
    let line = c.line_within(read_timeout * 3).await;
    assert_eq!(line, "error");
    c.assert_closed().await;
}

#[tokio::test]
async fn auth_comes_before_the_hello() {
    let server = start_with(|c| c.auth_token = Some(dflockd_server::Secret::new("pw"))).await;
    let mut c = plain(&server).await;
    c.expect(b"auth\n_\npw\n", "ok").await;
    c.expect(b"hello\n_\nmux\n", "ok mux 1").await;
    c.send(b"1 ping\n_\n_\n").await;
    assert_eq!(reply_to(&mut c, 1).await, "ok");
}

#[tokio::test]
async fn the_largest_timeout_waits_and_can_be_cancelled() {
    let server = start().await;
    let mut holder = plain(&server).await;
    holder.grant(b"l\nhuge\n0\n").await;
    let mut c = mux(&server).await;
    c.send(b"1 l\nhuge\n9223372036\n2 e 3\nhuge\n\n3 w 3\nhuge\n9223372036\n")
        .await;
    assert_eq!(reply_to(&mut c, 2).await, "queued");
    holder.wait_lock_waiters("huge", 2).await;
    c.send(b"4 cancel\n_\n1\n5 cancel\n_\n3\n").await;
    assert_eq!(reply_to(&mut c, 1).await, "timeout");
    assert_eq!(reply_to(&mut c, 4).await, "ok");
    assert_eq!(reply_to(&mut c, 3).await, "timeout");
    assert_eq!(reply_to(&mut c, 5).await, "ok");
    holder.wait_lock_waiters("huge", 0).await;
}

/// A ticket whose `w` was granted is enqueued again before a `cancel` of
/// the old `w` arrives: the cancel must not withdraw the new place, and the
/// old `w` is answered with its grant — before the cancel's `ok`.
#[tokio::test]
async fn cancel_of_a_granted_wait_leaves_the_tickets_new_place_alone() {
    let server = start().await;
    let mut c = mux(&server).await;
    c.send(b"1 l\nk\n0\n").await;
    let first = token_of(&reply_to(&mut c, 1).await);
    c.send(b"2 e 1\nk\n\n3 w 1\nk\n30\n").await;
    assert_eq!(reply_to(&mut c, 2).await, "queued");
    let mut watcher = plain(&server).await;
    watcher.wait_lock_waiters("k", 1).await;
    // One batch: release (grants w 3), a new place on ticket 1, cancel w 3.
    c.send(format!("4 r\nk\n{first}\n5 e 1\nk\n\n6 cancel\n_\n3\n"))
        .await;
    assert_eq!(reply_to(&mut c, 4).await, "ok");
    assert_eq!(reply_to(&mut c, 5).await, "queued");
    let granted = token_of(&reply_to(&mut c, 3).await);
    assert_eq!(reply_to(&mut c, 6).await, "ok");
    // The new place is still queued behind the grant.
    watcher.wait_lock_waiters("k", 1).await;
    c.send(format!("7 r\nk\n{granted}\n8 w 1\nk\n5\n")).await;
    assert_eq!(reply_to(&mut c, 7).await, "ok");
    assert!(reply_to(&mut c, 8).await.starts_with("ok "));
}

/// Two-phase places count towards the per-connection cap too.
#[tokio::test]
async fn queued_tickets_count_towards_the_waiting_cap() {
    let server = start_with(|c| c.mux_max_waiting = 3).await;
    let mut holder = plain(&server).await;
    holder.grant(b"l\ncapped\n0\n").await;
    let mut c = mux(&server).await;
    for ticket in 1..=3u64 {
        c.send(format!("{ticket} e {ticket}\ncapped\n\n")).await;
        assert_eq!(reply_to(&mut c, ticket).await, "queued");
    }
    c.send(b"4 e 4\ncapped\n\n5 l\ncapped\n30\n").await;
    assert_eq!(reply_to(&mut c, 4).await, "error_max_waiters");
    assert_eq!(reply_to(&mut c, 5).await, "error_max_waiters");
    holder.wait_lock_waiters("capped", 3).await;
}
