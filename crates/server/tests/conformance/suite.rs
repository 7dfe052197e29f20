// The conformance items, shared by `conformance.rs` (over TCP) and
// `conformance_in_process.rs` (over in-process pipes): each includes this
// file after naming its `TRANSPORT`. See those files for what is covered.

use std::time::Duration;

use tokio::time::Instant;

use dflockd_server::{FENCE_RANGE, FenceFile, Secret, ServerHandle};
use serde_json::json;
use support::*;

/// Read timeout standing in for the spec's `--read-timeout 2`.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound for replies the spec calls prompt / "at once" / "within 100 ms".
/// Generous so a loaded machine does not make the suite flaky; a request
/// that blocks would take whole seconds instead.
const PROMPT: Duration = Duration::from_millis(300);

/// A connection to `server` over this run's transport.
async fn conn(server: &ServerHandle) -> Client {
    Client::open(server, TRANSPORT).await
}

/// Sends each request on one connection; each must be answered `error` and
/// leave the connection open.
async fn expect_errors_open(requests: &[&[u8]]) {
    let server = start().await;
    let mut c = conn(&server).await;
    for request in requests {
        c.expect(request, "error").await;
        c.assert_open().await;
    }
}

/// Sends `request` on a fresh connection; it must be answered `reply` and
/// the connection must then be closed.
async fn expect_reply_then_closed(server: &ServerHandle, request: &[u8], reply: &str) {
    let mut c = conn(server).await;
    c.expect(request, reply).await;
    c.assert_closed().await;
}

fn auth_server() -> impl FnOnce(&mut dflockd_server::ServerConfig) {
    |c| c.auth_token = Some(Secret::new("s3cret"))
}

// ---------------------------------------------------------------------------
// Framing (1–19)

conformance_test! {
async fn item_001_ping() {
    let server = start().await;
    conn(&server).await.expect(PING, "ok").await;
}
}

conformance_test! {
async fn item_002_crlf_ping_reply_is_lf_only() {
    let server = start().await;
    // `line()` rejects a CR in the reply.
    conn(&server)
        .await
        .expect(b"ping\r\n_\r\n_\r\n", "ok")
        .await;
}
}

conformance_test! {
async fn item_003_crlf_acquire() {
    let server = start().await;
    let grant = conn(&server).await.grant(b"l\r\nk\r\n0\r\n").await;
    assert_eq!(grant.lease, 33);
}
}

conformance_test! {
async fn item_004_pipelined_replies_in_order() {
    let server = start().await;
    let mut c = conn(&server).await;
    c.send(b"ping\n_\n_\nl\nk\n0\nstats\n_\n_\n").await;
    assert_eq!(c.line().await, "ok");
    let grant = parse_grant(&c.line().await, "ok").expect("grant second");
    assert_eq!(grant.lease, 33);
    let stats = parse_stats(&c.line().await);
    let k = find(&stats, "locks", "k").expect("k listed as held");
    assert!(k["owner_conn_id"].as_u64().unwrap() >= 1, "{stats}");
}
}

conformance_test! {
async fn item_005_key_of_256_bytes() {
    let server = start().await;
    let key = "a".repeat(256);
    let grant = conn(&server).await.grant(format!("l\n{key}\n0\n")).await;
    assert_eq!(grant.lease, 33);
}
}

conformance_test! {
async fn item_006_key_of_257_bytes_closes() {
    let server = start().await;
    let key = "a".repeat(257);
    expect_reply_then_closed(&server, format!("l\n{key}\n0\n").as_bytes(), "error").await;
}
}

conformance_test! {
async fn item_007_key_of_256_bytes_with_crlf_closes() {
    let server = start().await;
    let key = "a".repeat(256);
    expect_reply_then_closed(&server, format!("l\n{key}\r\n0\n").as_bytes(), "error").await;
}
}

conformance_test! {
async fn item_008_command_line_of_300_bytes_closes() {
    let server = start().await;
    let command = "c".repeat(300);
    expect_reply_then_closed(&server, format!("{command}\n").as_bytes(), "error").await;
}
}

conformance_test! {
async fn item_009_argument_line_of_300_bytes_closes() {
    let server = start().await;
    let arg = "1".repeat(300);
    expect_reply_then_closed(&server, format!("l\nk\n{arg}\n").as_bytes(), "error").await;
}
}

conformance_test! {
async fn item_010_empty_command_line() {
    expect_errors_open(&[b"\nk\n0\n"]).await;
}
}

conformance_test! {
async fn item_011_unknown_commands() {
    expect_errors_open(&[b"foo\nk\nx\n", b"hello\n_\nhttp2\n"]).await;
    // With the multiplexed extension switched off (`--no-mux`), the server
    // answers its probe exactly like a plain dflockd v2 server.
    let server = start_with(|c| c.mux = false).await;
    let mut c = conn(&server).await;
    c.expect(b"hello\n_\nmux\n", "error").await;
    c.assert_open().await;
    // With it on (the default) the probe is accepted; see tests/mux_protocol.rs.
    let server = start().await;
    let mut c = conn(&server).await;
    c.expect(b"hello\n_\nmux\n", "ok mux 1").await;
}
}

conformance_test! {
async fn item_012_removed_v1_commands() {
    expect_errors_open(&[b"signal\nch\nhello\n", b"listen\nch\n\n"]).await;
}
}

conformance_test! {
async fn item_013_experimental_branch_command() {
    expect_errors_open(&[b"incr\nc\n1\n"]).await;
}
}

conformance_test! {
async fn item_014_blank_fields_on_keyless_commands() {
    let server = start().await;
    let mut c = conn(&server).await;
    c.expect(b"ping\n\n\n", "ok").await;
    let line = c.req(b"stats\n\n\n").await;
    parse_stats(&line);
}
}

conformance_test! {
async fn item_015_whitespace_tolerant_fields() {
    let server = start().await;
    let mut c = conn(&server).await;
    assert_eq!(c.grant(b"l\nk\n  0   45  \n").await.lease, 45);
    assert_eq!(c.grant(b"l\nk2\n0\t45\n").await.lease, 45);
}
}

conformance_test! {
async fn item_016_signed_integers() {
    let server = start().await;
    assert_eq!(conn(&server).await.grant(b"l\nk3\n+0 +7\n").await.lease, 7);
}
}

conformance_test! {
async fn item_017_mid_frame_timeout_closes() {
    let server = start_with(|c| c.read_timeout = READ_TIMEOUT).await;
    let mut c1 = conn(&server).await;
    c1.grant(b"l\nk17\n0\n").await;
    c1.send(b"l\n").await;
    let sent = Instant::now();
    assert_eq!(c1.line_within(READ_TIMEOUT * 3).await, "error");
    let elapsed = sent.elapsed();
    assert!(
        elapsed >= READ_TIMEOUT - Duration::from_millis(100),
        "error after {elapsed:?}, before the read timeout"
    );
    c1.assert_closed().await;
    // C1's lock was released by the close.
    let mut c2 = conn(&server).await;
    c2.grant(b"l\nk17\n0\n").await;
}
}

conformance_test! {
async fn item_018_idle_timeout_closes_and_releases() {
    let server = start_with(|c| c.read_timeout = READ_TIMEOUT).await;
    let mut c1 = conn(&server).await;
    c1.grant(b"l\nk18\n0\n").await;
    let idle_since = Instant::now();
    assert_eq!(c1.line_within(READ_TIMEOUT * 3).await, "error");
    let elapsed = idle_since.elapsed();
    assert!(
        elapsed >= READ_TIMEOUT - Duration::from_millis(100),
        "error after {elapsed:?}, before the read timeout"
    );
    c1.assert_closed().await;
    let mut c2 = conn(&server).await;
    c2.grant(b"l\nk18\n0\n").await;
}
}

conformance_test! {
async fn item_019_partial_frame_then_half_close() {
    let server = start().await;
    let mut c = conn(&server).await;
    c.send(b"l\nk\n").await;
    c.shutdown_write().await;
    c.assert_closed().await;
}
}

// ---------------------------------------------------------------------------
// Validation (20–35): `error`, connection open

conformance_test! {
async fn item_020_empty_key() {
    expect_errors_open(&[b"l\n\n0\n"]).await;
}
}

conformance_test! {
async fn item_021_key_with_space_or_tab() {
    expect_errors_open(&[b"l\na b\n0\n", b"l\na\tb\n0\n"]).await;
}
}

conformance_test! {
async fn item_022_key_with_embedded_cr() {
    expect_errors_open(&[b"l\na\rb\n0\n"]).await;
}
}

conformance_test! {
async fn item_023_bad_integer() {
    expect_errors_open(&[b"l\nk\nabc\n", b"l\nk\n1.5\n"]).await;
}
}

conformance_test! {
async fn item_024_negative_timeout() {
    expect_errors_open(&[b"l\nk\n-1\n"]).await;
}
}

conformance_test! {
async fn item_025_blank_argument_on_l() {
    expect_errors_open(&[b"l\nk\n\n"]).await;
}
}

conformance_test! {
async fn item_026_wrong_argument_count() {
    expect_errors_open(&[b"l\nk\n1 2 3\n", b"sl\ns\n0\n", b"sl\ns\n0 1 2 3\n"]).await;
}
}

conformance_test! {
async fn item_027_zero_or_negative_lease() {
    expect_errors_open(&[b"l\nk\n0 0\n", b"l\nk\n0 -5\n"]).await;
}
}

conformance_test! {
async fn item_028_timeout_above_maximum_and_overflow() {
    expect_errors_open(&[b"l\nk\n9223372037\n", b"l\nk\n99999999999999999999\n"]).await;
}
}

conformance_test! {
async fn item_029_lease_above_maximum() {
    expect_errors_open(&[b"l\nk\n0 9223372037\n"]).await;
    let server = start().await;
    let grant = conn(&server).await.grant(b"l\nk4\n0 9223372036\n").await;
    assert_eq!(grant.lease, 9_223_372_036);
}
}

conformance_test! {
async fn item_030_zero_or_negative_limit() {
    expect_errors_open(&[b"sl\ns\n0 0\n", b"sl\ns\n0 -1\n", b"se\ns\n0\n"]).await;
}
}

conformance_test! {
async fn item_031_limit_above_cap() {
    let server = start().await;
    let mut c = conn(&server).await;
    c.expect(b"sl\ns\n0 1048577\n", "error").await;
    c.assert_open().await;
    assert_eq!(c.grant(b"sl\ns2\n0 1048576\n").await.lease, 33);
}
}

conformance_test! {
async fn item_032_empty_token() {
    expect_errors_open(&[b"r\nk\n\n", b"sr\ns\n   \n"]).await;
}
}

conformance_test! {
async fn item_033_renew_shape() {
    expect_errors_open(&[
        b"n\nk\n\n",
        b"n\nk\ntok 1 2\n",
        b"n\nk\ntok 0\n",
        b"n\nk\ntok x\n",
    ])
    .await;
}
}

conformance_test! {
async fn item_034_enqueue_shape() {
    expect_errors_open(&[
        b"e\nk\n30 junk\n",
        b"e\nk\nabc\n",
        b"e\nk\n0\n",
        b"se\nk\n\n",
        b"se\nk\n2 3 4\n",
    ])
    .await;
}
}

conformance_test! {
async fn item_035_wait_shape() {
    expect_errors_open(&[b"w\nk\n\n", b"w\nk\n5 5\n", b"w\nk\n-1\n"]).await;
}
}

conformance_test! {
async fn item_100_single_node_barrier_is_ok() {
    let server = start().await;
    let mut c = conn(&server).await;
    c.expect(b"barrier\n_\n\n", "ok").await;
    c.assert_open().await;
}
}

conformance_test! {
async fn item_101_stable_ref_binds_once() {
    let server = start().await;
    let mut c = conn(&server).await;
    c.expect(b"stable-ref\nworker-1\n_\n", "ok").await;
    c.expect(b"stable-ref\nworker-1\n_\n", "error").await;
    c.assert_open().await;
    // Item 36: empty, too long, or not printable ASCII: `error`.
    let long = format!("stable-ref\n{}\n_\n", "r".repeat(65));
    expect_errors_open(&[b"stable-ref\n\n_\n", long.as_bytes(), b"stable-ref\nt\tab\n_\n"]).await;
}
}

// ---------------------------------------------------------------------------
// Authentication (37–44)

conformance_test! {
async fn item_037_auth_then_ping() {
    let server = start_with(auth_server()).await;
    let mut c = conn(&server).await;
    c.expect(b"auth\n_\ns3cret\n", "ok").await;
    c.expect(PING, "ok").await;
}
}

conformance_test! {
async fn item_038_auth_required_first() {
    let server = start_with(auth_server()).await;
    let mut c = conn(&server).await;
    c.expect(PING, "error_auth").await;
    let replied = Instant::now();
    c.assert_closed().await;
    let pause = replied.elapsed();
    // The server pauses ~100 ms between the reply and the close; allow for
    // the reply having been read late.
    assert!(
        pause >= Duration::from_millis(60),
        "closed {pause:?} after error_auth"
    );
}
}

conformance_test! {
async fn item_039_wrong_token() {
    let server = start_with(auth_server()).await;
    expect_reply_then_closed(&server, b"auth\n_\nwrong\n", "error_auth").await;
}
}

conformance_test! {
async fn item_040_blank_token() {
    let server = start_with(auth_server()).await;
    expect_reply_then_closed(&server, b"auth\n_\n\n", "error_auth").await;
}
}

conformance_test! {
async fn item_041_key_ignored_token_trimmed() {
    let server = start_with(auth_server()).await;
    let mut c = conn(&server).await;
    c.expect(b"auth\nwhatever\n  s3cret \t\n", "ok").await;
    c.assert_open().await;
}
}

conformance_test! {
async fn item_042_auth_token_line_of_64_kib_and_one_more() {
    let server = start_with(auth_server()).await;
    for len in [65_536, 65_537] {
        let request = format!("auth\n_\n{}\n", "x".repeat(len));
        expect_reply_then_closed(&server, request.as_bytes(), "error_auth").await;
    }
}
}

conformance_test! {
async fn item_043_second_auth_is_unknown() {
    let server = start_with(auth_server()).await;
    let mut c = conn(&server).await;
    c.expect(b"auth\n_\ns3cret\n", "ok").await;
    c.expect(b"auth\n_\ns3cret\n", "error").await;
    c.assert_open().await;
}
}

conformance_test! {
async fn item_044_auth_without_configured_token() {
    expect_errors_open(&[b"auth\n_\nx\n"]).await;
}
}

// ---------------------------------------------------------------------------
// Locks (45–62)

conformance_test! {
async fn item_045_acquire_free_key() {
    let server = start().await;
    assert_eq!(conn(&server).await.grant(b"l\nk\n0\n").await.lease, 33);
}
}

conformance_test! {
async fn item_046_custom_lease() {
    let server = start().await;
    assert_eq!(conn(&server).await.grant(b"l\nk5\n0 60\n").await.lease, 60);
}
}

conformance_test! {
async fn item_047_try_lock_on_held_key() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    c1.grant(b"l\nk\n0\n").await;
    let sent = Instant::now();
    c2.expect(b"l\nk\n0\n", "timeout").await;
    assert!(
        sent.elapsed() < PROMPT,
        "try-lock took {:?}",
        sent.elapsed()
    );
}
}

conformance_test! {
async fn item_048_bounded_wait() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    c1.grant(b"l\nk\n0\n").await;
    let sent = Instant::now();
    c2.expect(b"l\nk\n1\n", "timeout").await;
    let elapsed = sent.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_millis(1500),
        "timeout after {elapsed:?}"
    );
}
}

conformance_test! {
async fn item_049_release_then_release_again() {
    let server = start().await;
    let mut c = conn(&server).await;
    let t1 = c.grant(b"l\nk\n0\n").await.token;
    c.expect(format!("r\nk\n{t1}\n"), "ok").await;
    c.expect(format!("r\nk\n{t1}\n"), "error").await;
}
}

conformance_test! {
async fn item_050_release_with_wrong_token() {
    let server = start().await;
    let mut c = conn(&server).await;
    c.grant(b"l\nk\n0\n").await;
    c.expect(b"r\nk\n00000000000000000000000000000000\n", "error")
        .await;
    let stats = c.stats().await;
    let k = find(&stats, "locks", "k").expect("k still held");
    assert!(k["owner_conn_id"].as_u64().unwrap() >= 1, "{stats}");
}
}

conformance_test! {
async fn item_051_release_of_unknown_key() {
    let server = start().await;
    conn(&server)
        .await
        .expect(
            b"r\nnever-used\n00000000000000000000000000000000\n",
            "error",
        )
        .await;
}
}

conformance_test! {
async fn item_052_token_bearer_release() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    let t = c1.grant(b"l\nk6\n0\n").await.token;
    c2.expect(format!("r\nk6\n{t}\n"), "ok").await;
}
}

conformance_test! {
async fn item_053_namespace_check() {
    let server = start().await;
    let mut c = conn(&server).await;
    let t = c.grant(b"l\nk7\n0\n").await.token;
    c.expect(format!("sr\nk7\n{t}\n"), "error").await;
    c.expect(format!("n\nk7\n{t}\n"), "ok 33").await;
}
}

conformance_test! {
async fn item_054_renew() {
    let server = start().await;
    let mut c = conn(&server).await;
    let t = c.grant(b"l\nk7\n0\n").await.token;
    c.expect(format!("n\nk7\n{t}\n"), "ok 33").await;
    c.expect(format!("n\nk7\n{t} 90\n"), "ok 90").await;
    let stats = c.stats().await;
    let left = find(&stats, "locks", "k7").expect("k7 held")["lease_expires_in_s"]
        .as_f64()
        .expect("lease_expires_in_s is a number");
    assert!(left > 85.0 && left <= 90.0, "lease_expires_in_s {left}");
}
}

conformance_test! {
async fn item_055_renew_with_wrong_token() {
    let server = start().await;
    let mut c = conn(&server).await;
    c.grant(b"l\nk\n0\n").await;
    c.expect(b"n\nk\n00000000000000000000000000000000\n", "error")
        .await;
}
}

conformance_test! {
async fn item_056_renew_after_expiry_is_not_resurrection() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    let grant = c1.grant(b"l\nk8\n0 1\n").await;
    assert_eq!(grant.lease, 1);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    c1.expect(format!("n\nk8\n{}\n", grant.token), "error")
        .await;
    c1.expect(format!("r\nk8\n{}\n", grant.token), "error")
        .await;
    assert_eq!(c2.grant(b"l\nk8\n0\n").await.lease, 33);
}
}

conformance_test! {
async fn item_057_expiry_hands_over_to_waiter() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    c1.grant(b"l\nk9\n0 1\n").await;
    let granted = Instant::now();
    let grant = c2.grant(b"l\nk9\n5\n").await;
    let elapsed = granted.elapsed();
    assert_eq!(grant.lease, 33);
    assert!(
        elapsed >= Duration::from_millis(950) && elapsed <= Duration::from_millis(2500),
        "waiter granted {elapsed:?} after the 1 s lease began"
    );
}
}

conformance_test! {
async fn item_058_not_reentrant() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    c1.grant(b"l\nk\n0\n").await;
    c1.expect(b"l\nk\n1\n", "timeout").await;
}
}

conformance_test! {
async fn item_059_fifo_of_three_waiters() {
    let server = start().await;
    let mut h = conn(&server).await;
    let mut a = conn(&server).await;
    let mut b = conn(&server).await;
    let mut c = conn(&server).await;
    let th = h.grant(b"l\nq\n0\n").await;
    for (n, waiter) in [&mut a, &mut b, &mut c].into_iter().enumerate() {
        waiter.send(b"l\nq\n30\n").await;
        h.wait_lock_waiters("q", n as u64 + 1).await;
    }
    h.expect(format!("r\nq\n{}\n", th.token), "ok").await;
    let ta = parse_grant(&a.line().await, "ok").expect("A granted first");
    assert_eq!(ta.lease, 33);
    h.wait_lock_waiters("q", 2).await;
    b.assert_silent(Duration::from_millis(50)).await;
    c.assert_silent(Duration::from_millis(50)).await;

    a.expect(format!("r\nq\n{}\n", ta.token), "ok").await;
    let tb = parse_grant(&b.line().await, "ok").expect("B granted second");
    h.wait_lock_waiters("q", 1).await;
    c.assert_silent(Duration::from_millis(50)).await;

    b.expect(format!("r\nq\n{}\n", tb.token), "ok").await;
    let tc = parse_grant(&c.line().await, "ok").expect("C granted third");
    assert!(th.fence() < ta.fence() && ta.fence() < tb.fence() && tb.fence() < tc.fence());
}
}

conformance_test! {
async fn item_060_fences_strictly_increase() {
    let server = start().await;
    let mut c = conn(&server).await;
    let mut fences = Vec::new();
    for request in [
        &b"l\nf-a\n0\n"[..],
        b"sl\nf-b\n0 3\n",
        b"l\nf-c\n0 5\n",
        b"sl\nf-d\n0 1\n",
        b"l\nf-e\n0\n",
        b"sl\nf-b\n0 3\n",
        b"l\nf-a2\n0\n",
    ] {
        fences.push(c.grant(request).await.fence());
    }
    fences.push(c.acquired(b"e\nf-f\n\n").await.fence());
    fences.push(c.acquired(b"se\nf-g\n2\n").await.fence());
    fences.push(c.grant(b"sl\nf-g\n0 2\n").await.fence());
    assert_eq!(fences.len(), 10);
    for pair in fences.windows(2) {
        assert!(pair[0] < pair[1], "fences not increasing: {fences:?}");
        // One counter, +1 per grant (spec §4.1); nothing else grants here.
        assert_eq!(pair[0] + 1, pair[1], "fences not consecutive: {fences:?}");
    }
}
}

conformance_test! {
async fn item_061_fence_seeded_from_wall_clock() {
    let before = unix_nanos();
    let server = start().await;
    let after = unix_nanos();
    let fence = conn(&server).await.grant(b"l\nk\n0\n").await.fence();
    let slack = 3_000_000_000; // "within a few seconds"
    assert!(
        fence >= before - slack && fence <= after + slack,
        "first fence {fence} vs start time {before}..{after} (Unix ns)"
    );
}
}

conformance_test! {
async fn item_062_fence_state_file_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fence.state");
    let with_file = |c: &mut dflockd_server::ServerConfig| {
        c.fence_state_file = Some(path.clone());
    };

    let server = start_with(with_file).await;
    let f1 = conn(&server).await.grant(b"l\nk\n0\n").await.fence();
    // The connection is gone, so the drain finishes at once.
    tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .expect("server drains");
    let first = read_journal(&path);
    assert!(f1 < first.ceiling, "fence {f1} not below ceiling {first:?}");

    let server = start_with(with_file).await;
    let f2 = conn(&server).await.grant(b"l\nk\n0\n").await.fence();
    assert!(f2 > f1, "fence went backwards across restart: {f1} -> {f2}");
    assert!(
        f2 > first.ceiling,
        "restart must start at the persisted ceiling {first:?}, got {f2}"
    );
    let second = read_journal(&path);
    assert!(second.seq > first.seq && f2 < second.ceiling, "{second:?}");
    tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .expect("server drains");
}
}

conformance_test! {
async fn item_062_fence_state_file_clock_set_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fence.state");
    // A journal whose ceiling is one hour ahead of the wall clock: the
    // situation after the clock has been set back by an hour.
    let ceiling = unix_nanos() + 3_600_000_000_000;
    let (file, _) = FenceFile::open(&path, ceiling - FENCE_RANGE).expect("create journal");
    assert_eq!(file.ceiling(), ceiling);
    drop(file);
    assert_eq!(read_journal(&path).ceiling, ceiling);

    let server = start_with(|c| c.fence_state_file = Some(path.clone())).await;
    let fence = conn(&server).await.grant(b"l\nk\n0\n").await.fence();
    assert_eq!(fence, ceiling + 1, "first fence after start");
    let record = read_journal(&path);
    assert_eq!(record.ceiling, ceiling + FENCE_RANGE, "{record:?}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 64);
}
}

// ---------------------------------------------------------------------------
// Semaphores (63–67)

conformance_test! {
async fn item_063_limit_two_three_contenders() {
    let server = start().await;
    let mut a = conn(&server).await;
    let mut b = conn(&server).await;
    let mut c = conn(&server).await;
    let ta = a.grant(b"sl\ns\n0 2\n").await;
    assert_eq!(ta.lease, 33);
    assert_eq!(b.grant(b"sl\ns\n0 2\n").await.lease, 33);
    c.expect(b"sl\ns\n0 2\n", "timeout").await;
    c.send(b"sl\ns\n10 2\n").await;
    a.wait_sem_waiters("s", 1).await;
    a.expect(format!("sr\ns\n{}\n", ta.token), "ok").await;
    let tc = parse_grant(&c.line_within(PROMPT).await, "ok").expect("C granted");
    assert_eq!(tc.lease, 33);
}
}

conformance_test! {
async fn item_064_limit_mismatch() {
    let server = start().await;
    let mut a = conn(&server).await;
    let mut d = conn(&server).await;
    a.grant(b"sl\ns\n0 2\n").await;
    d.expect(b"sl\ns\n0 3\n", "error_limit_mismatch").await;
    d.expect(b"se\ns\n3\n", "error_limit_mismatch").await;
}
}

conformance_test! {
async fn item_065_mismatch_persists_while_idle_until_gc() {
    let server = start_with(|c| {
        c.gc_interval = Duration::from_millis(200);
        c.gc_max_idle = Duration::from_secs(1);
    })
    .await;
    let mut a = conn(&server).await;
    let t = a.grant(b"sl\ns\n0 2\n").await;
    a.expect(format!("sr\ns\n{}\n", t.token), "ok").await;
    a.expect(b"sl\ns\n0 3\n", "error_limit_mismatch").await;
    a.wait_stats("s to be collected", |s| {
        find(s, "idle_semaphores", "s").is_none() && find(s, "semaphores", "s").is_none()
    })
    .await;
    assert_eq!(a.grant(b"sl\ns\n0 3\n").await.lease, 33);
}
}

conformance_test! {
async fn item_066_namespaces_independent() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    c1.grant(b"l\nsame\n0\n").await;
    c1.grant(b"sl\nsame\n0 5\n").await;
    c2.grant(b"sl\nsame\n0 5\n").await;
}
}

conformance_test! {
async fn item_067_semaphore_renew() {
    let server = start().await;
    let mut a = conn(&server).await;
    a.grant(b"sl\ns\n0 2\n").await;
    let tb = a.grant(b"sl\ns\n0 2\n").await;
    a.expect(format!("sn\ns\n{} 40\n", tb.token), "ok 40").await;
}
}

// ---------------------------------------------------------------------------
// Two-phase (68–79)

conformance_test! {
async fn item_068_fast_path_enqueue_then_wait() {
    let server = start().await;
    let mut c = conn(&server).await;
    let acquired = c.acquired(b"e\nt1\n\n").await;
    assert_eq!(acquired.lease, 33);
    let waited = c.grant(b"w\nt1\n5\n").await;
    assert_eq!(waited, acquired);
}
}

conformance_test! {
async fn item_069_enqueue_twice() {
    let server = start().await;
    let mut c = conn(&server).await;
    c.acquired(b"e\nt2\n\n").await;
    c.expect(b"e\nt2\n\n", "error_already_enqueued").await;
}
}

conformance_test! {
async fn item_070_wait_without_enqueue() {
    let server = start().await;
    conn(&server)
        .await
        .expect(b"w\nt3\n5\n", "error_not_enqueued")
        .await;
}
}

conformance_test! {
async fn item_071_wait_on_another_connection() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    c1.acquired(b"e\nt4\n\n").await;
    c2.expect(b"w\nt4\n1\n", "error_not_enqueued").await;
}
}

conformance_test! {
async fn item_072_queued_then_granted_before_wait() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    let t1 = c1.grant(b"l\nt5\n0\n").await;
    c2.expect(b"e\nt5\n\n", "queued").await;
    c1.expect(format!("r\nt5\n{}\n", t1.token), "ok").await;
    let sent = Instant::now();
    let t2 = c2.grant(b"w\nt5\n5\n").await;
    assert!(sent.elapsed() < PROMPT, "wait took {:?}", sent.elapsed());
    assert_eq!(t2.lease, 33);
    assert!(t2.fence() > t1.fence());
}
}

conformance_test! {
async fn item_073_queued_blocked_wait() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    let t1 = c1.grant(b"l\nt6\n0\n").await;
    c2.expect(b"e\nt6\n\n", "queued").await;
    c2.send(b"w\nt6\n10\n").await;
    c2.assert_silent(Duration::from_millis(200)).await;
    c1.expect(format!("r\nt6\n{}\n", t1.token), "ok").await;
    let t2 = parse_grant(&c2.line_within(PROMPT).await, "ok").expect("C2 granted");
    assert_eq!(t2.lease, 33);
}
}

conformance_test! {
async fn item_074_wait_timeout_forfeits_position() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    c1.grant(b"l\nt7\n0\n").await;
    c2.expect(b"e\nt7\n\n", "queued").await;
    c2.expect(b"w\nt7\n0\n", "timeout").await;
    c2.expect(b"w\nt7\n1\n", "error_not_enqueued").await;
    assert_eq!(lock_waiters(&c1.stats().await, "t7"), 0);
}
}

conformance_test! {
async fn item_075_enqueue_lease_carried_to_wait() {
    let server = start().await;
    let mut c = conn(&server).await;
    let acquired = c.acquired(b"e\nt8\n10\n").await;
    assert_eq!(acquired.lease, 10);
    let waited = c.grant(b"w\nt8\n1\n").await;
    assert_eq!(waited, acquired);
}
}

conformance_test! {
async fn item_076_release_clears_phase1_state() {
    let server = start().await;
    let mut c = conn(&server).await;
    let t = c.acquired(b"e\nt9\n\n").await;
    c.expect(format!("r\nt9\n{}\n", t.token), "ok").await;
    c.expect(b"w\nt9\n1\n", "error_not_enqueued").await;
    c.acquired(b"e\nt9\n\n").await;
}
}

conformance_test! {
async fn item_077_cross_namespace_wait() {
    let server = start().await;
    let mut c = conn(&server).await;
    c.acquired(b"e\nt10\n\n").await;
    c.expect(b"sw\nt10\n1\n", "error_not_enqueued").await;
}
}

conformance_test! {
async fn item_078_lease_expired_before_wait_default_sweep() {
    let server = start().await;
    let mut c = conn(&server).await;
    assert_eq!(c.acquired(b"e\nt11\n1\n").await.lease, 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let reply = c.req(b"w\nt11\n1\n").await;
    assert!(
        reply == "error_lease_expired" || reply == "error_not_enqueued",
        "got {reply:?}"
    );
}
}

conformance_test! {
async fn item_078_lease_expired_before_wait_no_sweep() {
    let server = start_with(|c| c.lease_sweep_interval = Duration::from_secs(3600)).await;
    let mut c = conn(&server).await;
    assert_eq!(c.acquired(b"e\nt11\n1\n").await.lease, 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.expect(b"w\nt11\n1\n", "error_lease_expired").await;
}
}

conformance_test! {
async fn item_079_semaphore_two_phase() {
    let server = start().await;
    let mut c = conn(&server).await;
    let acquired = c.acquired(b"se\nst\n2\n").await;
    let waited = c.grant(b"sw\nst\n1\n").await;
    assert_eq!(waited.token, acquired.token);
}
}

// ---------------------------------------------------------------------------
// Caps (80–84)

conformance_test! {
async fn item_080_081_max_locks_until_gc() {
    let server = start_with(|c| {
        c.max_locks = 2;
        c.gc_interval = Duration::from_millis(200);
        c.gc_max_idle = Duration::from_secs(1);
    })
    .await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    // 80
    let ta = c1.grant(b"l\na\n0\n").await;
    let tb = c1.grant(b"l\nb\n0\n").await;
    c1.expect(b"l\nc\n0\n", "error_max_locks").await;
    c1.expect(b"sl\nd\n0 1\n", "error_max_locks").await;
    c1.expect(b"e\nc\n\n", "error_max_locks").await;
    c2.expect(b"l\na\n0\n", "timeout").await;
    // 81: released keys still count until GC removes them.
    c1.expect(format!("r\na\n{}\n", ta.token), "ok").await;
    c1.expect(format!("r\nb\n{}\n", tb.token), "ok").await;
    c1.expect(b"l\nc\n0\n", "error_max_locks").await;
    c1.wait_stats("a and b to be collected", |s| {
        s["idle_locks"].as_array().unwrap().is_empty() && s["locks"].as_array().unwrap().is_empty()
    })
    .await;
    c1.grant(b"l\nc\n0\n").await;
}
}

conformance_test! {
async fn item_082_max_waiters() {
    let server = start_with(|c| c.max_waiters = 1).await;
    let mut h = conn(&server).await;
    let mut a = conn(&server).await;
    let mut b = conn(&server).await;
    h.grant(b"l\nw\n0\n").await;
    a.send(b"l\nw\n30\n").await;
    h.wait_lock_waiters("w", 1).await;
    let sent = Instant::now();
    b.expect(b"l\nw\n30\n", "error_max_waiters").await;
    assert!(sent.elapsed() < PROMPT, "took {:?}", sent.elapsed());
    b.expect(b"l\nw\n0\n", "error_max_waiters").await;
    b.expect(b"e\nw\n\n", "error_max_waiters").await;
}
}

conformance_test! {
async fn item_083_max_connections() {
    let server = start_with(|c| c.max_connections = 1).await;
    let mut c1 = conn(&server).await;
    c1.assert_open().await;
    // C2 sends nothing: it must read a clean EOF with zero bytes.
    let mut c2 = conn(&server).await;
    c2.assert_eof().await;
    c1.assert_open().await;
}
}

conformance_test! {
async fn item_084_max_connections_per_ip() {
    let server = start_with(|c| c.max_connections_per_ip = 1).await;
    let mut c1 = conn(&server).await;
    c1.assert_open().await;
    // C2 sends nothing: it must read a clean EOF with zero bytes.
    let mut c2 = conn(&server).await;
    c2.assert_eof().await;
    c1.assert_open().await;
    drop(c1);
    // The slot frees once the server has seen C1 go; poll (bounded).
    let deadline = Instant::now() + POLL_TIMEOUT;
    loop {
        let mut c3 = conn(&server).await;
        let _ = c3.try_send(PING).await;
        match c3.read_line_within(REPLY_TIMEOUT).await {
            Ok(line) => {
                assert_eq!(line, "ok");
                break;
            }
            Err(ReadEnd::Closed { partial }) if partial.is_empty() => {}
            Err(end) => panic!("unexpected {end:?}"),
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(POLL_STEP).await;
    }
}
}

// ---------------------------------------------------------------------------
// Disconnect (85–89)

conformance_test! {
async fn item_085_disconnect_releases() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    c1.grant(b"l\nd1\n0\n").await;
    drop(c1);
    let sent = Instant::now();
    assert_eq!(c2.grant(b"l\nd1\n2\n").await.lease, 33);
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "took {:?}",
        sent.elapsed()
    );
}
}

conformance_test! {
async fn item_086_auto_release_off() {
    // Spec: lease 3 s, free after 3–4.5 s. Scaled: lease 2 s, 2–3.5 s.
    let server = start_with(|c| c.auto_release_on_disconnect = false).await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    c1.grant(b"l\nd2\n0 2\n").await;
    let granted = Instant::now();
    drop(c1);
    c2.wait_stats("C1 to be gone", |s| s["connections"] == 1)
        .await;
    c2.expect(b"l\nd2\n0\n", "timeout").await;
    loop {
        let reply = c2.req(b"l\nd2\n0\n").await;
        if reply != "timeout" {
            assert!(parse_grant(&reply, "ok").is_some(), "got {reply:?}");
            break;
        }
        assert!(
            granted.elapsed() < Duration::from_millis(3500),
            "still held {:?} after a 2 s lease began",
            granted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = granted.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900),
        "released after {elapsed:?}, before the lease ran out"
    );
}
}

conformance_test! {
async fn item_087_disconnect_cancels_blocked_waiter() {
    let server = start().await;
    let mut h = conn(&server).await;
    let mut a = conn(&server).await;
    let mut b = conn(&server).await;
    let th = h.grant(b"l\nd3\n0\n").await;
    a.send(b"l\nd3\n30\n").await;
    h.wait_lock_waiters("d3", 1).await;
    drop(a);
    let closed = Instant::now();
    h.wait_lock_waiters("d3", 0).await;
    assert!(
        closed.elapsed() < Duration::from_millis(500),
        "waiter removed after {:?}",
        closed.elapsed()
    );
    h.expect(format!("r\nd3\n{}\n", th.token), "ok").await;
    b.grant(b"l\nd3\n0\n").await;
}
}

conformance_test! {
async fn item_088_disconnect_cancels_enqueued_waiter() {
    let server = start().await;
    let mut h = conn(&server).await;
    let mut a = conn(&server).await;
    let mut b = conn(&server).await;
    let th = h.grant(b"l\nd4\n0\n").await;
    a.expect(b"e\nd4\n\n", "queued").await;
    assert_eq!(lock_waiters(&h.stats().await, "d4"), 1);
    drop(a);
    h.wait_lock_waiters("d4", 0).await;
    h.expect(format!("r\nd4\n{}\n", th.token), "ok").await;
    b.grant(b"l\nd4\n0\n").await;
}
}

conformance_test! {
async fn item_089_disconnect_releases_enqueue_acquired_slot() {
    let server = start().await;
    let mut a = conn(&server).await;
    let mut b = conn(&server).await;
    a.acquired(b"e\nd5\n\n").await;
    drop(a);
    b.grant(b"l\nd5\n2\n").await;
}
}

// ---------------------------------------------------------------------------
// Pipelining and blocking (90–92)

conformance_test! {
async fn item_090_blocking_request_holds_later_requests() {
    let server = start().await;
    let mut h = conn(&server).await;
    let mut a = conn(&server).await;
    h.grant(b"l\np\n0\n").await;
    a.send(b"l\np\n2\nping\n_\n_\n").await;
    let sent = Instant::now();
    a.assert_silent(Duration::from_millis(1800)).await;
    assert_eq!(a.line().await, "timeout");
    assert!(sent.elapsed() >= Duration::from_secs(2));
    assert_eq!(a.line_within(PROMPT).await, "ok");
}
}

conformance_test! {
async fn item_091_grant_then_pipelined_request() {
    let server = start().await;
    let mut h = conn(&server).await;
    let mut a = conn(&server).await;
    let a_id = a.conn_id().await;
    let th = h.grant(b"l\np2\n0\n").await;
    a.send(b"l\np2\n10\nstats\n_\n_\n").await;
    h.wait_lock_waiters("p2", 1).await;
    h.expect(format!("r\np2\n{}\n", th.token), "ok").await;
    let ta = parse_grant(&a.line().await, "ok").expect("A granted");
    assert_eq!(ta.lease, 33);
    let stats = parse_stats(&a.line().await);
    let p2 = find(&stats, "locks", "p2").expect("p2 held");
    assert_eq!(p2["owner_conn_id"], a_id, "{stats}");
}
}

conformance_test! {
async fn item_092_pipeline_overflow_closes() {
    let server = start().await;
    let mut h = conn(&server).await;
    let mut a = conn(&server).await;
    h.grant(b"l\np3\n0\n").await;
    a.send(b"l\np3\n30\n").await;
    h.wait_lock_waiters("p3", 1).await;
    let flood = PING.repeat(64 * 1024 / PING.len() + 1);
    // The server may close while we are still writing.
    let _ = a.try_send(&flood).await;
    let got = a.read_to_close().await;
    assert!(
        got.is_empty(),
        "no reply expected, got {:?}",
        String::from_utf8_lossy(&got)
    );
    h.wait_lock_waiters("p3", 0).await;
}
}

// ---------------------------------------------------------------------------
// Stats (93–97)

/// The member names of the object for `key` in a raw stats line, in the
/// order they appear (keys here contain no `,`/`}`/`"`).
fn raw_member_order(line: &str, key: &str) -> Vec<String> {
    let start = line
        .find(&format!("{{\"key\":\"{key}\""))
        .unwrap_or_else(|| panic!("{key} not in {line}"));
    let object = &line[start + 1..];
    let object = &object[..object.find('}').expect("object ends")];
    object
        .split(',')
        .map(|member| {
            member
                .split(':')
                .next()
                .unwrap()
                .trim_matches('"')
                .to_owned()
        })
        .collect()
}

conformance_test! {
async fn item_093_stats_of_fresh_server() {
    let server = start().await;
    let stats = conn(&server).await.stats().await;
    assert_eq!(
        stats,
        json!({"connections":1,"locks":[],"semaphores":[],"idle_locks":[],"idle_semaphores":[]})
    );
}
}

conformance_test! {
async fn item_094_stats_held_lock_with_waiter() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    let c1_id = c1.conn_id().await;
    assert!(c1_id >= 1);
    c1.grant(b"l\nk\n0\n").await;
    c2.send(b"l\nk\n30\n").await;
    c1.wait_lock_waiters("k", 1).await;
    let line = c1.req(STATS).await;
    let stats = parse_stats(&line);
    let k = find(&stats, "locks", "k").expect("k listed");
    assert_eq!(
        raw_member_order(&line, "k"),
        ["key", "owner_conn_id", "lease_expires_in_s", "waiters"]
    );
    assert_eq!(k["owner_conn_id"], c1_id);
    let left = k["lease_expires_in_s"].as_f64().expect("a number");
    assert!(left > 28.0 && left <= 33.0, "lease_expires_in_s {left}");
    assert_eq!(k["waiters"], 1);
}
}

conformance_test! {
async fn item_095_released_lock_is_idle_then_collected() {
    let server = start_with(|c| {
        c.gc_interval = Duration::from_millis(200);
        c.gc_max_idle = Duration::from_secs(1);
    })
    .await;
    let mut c = conn(&server).await;
    let t = c.grant(b"l\nk\n0\n").await;
    c.expect(format!("r\nk\n{}\n", t.token), "ok").await;
    let released = Instant::now();
    let line = c.req(STATS).await;
    let stats = parse_stats(&line);
    assert!(find(&stats, "locks", "k").is_none(), "{stats}");
    let idle = find(&stats, "idle_locks", "k").expect("k idle");
    assert_eq!(raw_member_order(&line, "k"), ["key", "idle_s"]);
    assert!(idle["idle_s"].as_f64().expect("a number") >= 0.0);
    c.wait_stats("k to be collected", |s| {
        find(s, "idle_locks", "k").is_none()
    })
    .await;
    let gone = released.elapsed();
    assert!(
        gone >= Duration::from_millis(900) && gone <= Duration::from_millis(2500),
        "collected {gone:?} after release (gc-max-idle 1 s, gc-interval 0.2 s)"
    );
}
}

conformance_test! {
async fn item_096_stats_semaphore() {
    let server = start().await;
    let mut c = conn(&server).await;
    c.grant(b"sl\ns\n0 3\n").await;
    let line = c.req(STATS).await;
    let stats = parse_stats(&line);
    assert_eq!(
        find(&stats, "semaphores", "s").expect("s listed"),
        &json!({"key":"s","limit":3,"holders":1,"waiters":0})
    );
    assert!(
        line.contains(r#"{"key":"s","limit":3,"holders":1,"waiters":0}"#),
        "{line}"
    );
}
}

conformance_test! {
async fn item_097_limit_one_semaphore_listed_under_locks() {
    let server = start().await;
    let mut c = conn(&server).await;
    c.grant(b"sl\none\n0 1\n").await;
    let stats = c.stats().await;
    let entry = find(&stats, "locks", "one").expect("listed under locks by key");
    assert!(entry["owner_conn_id"].as_u64().unwrap() >= 1);
    assert!(
        stats["semaphores"].as_array().unwrap().is_empty(),
        "{stats}"
    );
    assert_eq!(stats["locks"].as_array().unwrap().len(), 1, "{stats}");
}
}

// ---------------------------------------------------------------------------
// Shutdown (98–99, 107)

async fn wait_stopped(server: ServerHandle) {
    tokio::time::timeout(Duration::from_secs(5), server.wait())
        .await
        .expect("server stops once its connections are gone");
}

socket_test! {
async fn item_098_drain() {
    let server = start().await;
    let addr = server.local_addr();
    let mut c1 = conn(&server).await;
    c1.assert_open().await;
    server.begin_drain();
    c1.expect(PING, "error_draining").await;
    c1.assert_closed().await;
    assert_connect_refused_soon(addr).await;
    wait_stopped(server).await;
}
}

conformance_test! {
async fn item_099_blocked_waiter_at_shutdown() {
    let server = start().await;
    let mut h = conn(&server).await;
    let mut a = conn(&server).await;
    h.grant(b"l\nz\n0\n").await;
    a.send(b"l\nz\n60\n").await;
    h.wait_lock_waiters("z", 1).await;
    server.begin_drain();
    assert_eq!(a.line_within(PROMPT).await, "error");
    a.expect(PING, "error_draining").await;
    a.assert_closed().await;
    h.expect(PING, "error_draining").await;
    h.assert_closed().await;
    wait_stopped(server).await;
}
}

conformance_test! {
async fn item_107_auth_during_drain() {
    let server = start_with(auth_server()).await;
    let mut c0 = conn(&server).await;
    c0.expect(b"auth\n_\ns3cret\n", "ok").await;
    let mut c1 = conn(&server).await;
    // C1 must have been accepted (not only queued in the backlog).
    c0.wait_stats("C1 accepted", |s| s["connections"] == 2)
        .await;
    server.begin_drain();
    c1.expect(b"auth\n_\ns3cret\n", "ok").await;
    c1.expect(PING, "error_draining").await;
    c1.assert_closed().await;
    drop(c0);
    wait_stopped(server).await;
}
}

// ---------------------------------------------------------------------------
// Additions (103–106, 108–110)

conformance_test! {
async fn item_103_renew_by_other_connection_keeps_ownership() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    let mut c3 = conn(&server).await;
    let t = c1.grant(b"l\nk\n0\n").await.token;
    let owner = find(&c2.stats().await, "locks", "k").expect("k held")["owner_conn_id"].clone();
    c2.expect(format!("n\nk\n{t} 60\n"), "ok 60").await;
    let stats = c2.stats().await;
    assert_eq!(find(&stats, "locks", "k").unwrap()["owner_conn_id"], owner);
    drop(c1);
    let sent = Instant::now();
    let t3 = c3.grant(b"l\nk\n2\n").await;
    assert_eq!(t3.lease, 33);
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "{:?}",
        sent.elapsed()
    );
    c2.expect(format!("n\nk\n{t}\n"), "error").await;
}
}

conformance_test! {
async fn item_104_enqueue_on_key_held_by_same_connection() {
    let server = start().await;
    let mut c1 = conn(&server).await;
    let t = c1.grant(b"l\nk\n0\n").await.token;
    c1.expect(b"e\nk\n\n", "queued").await;
    let sent = Instant::now();
    c1.expect(b"w\nk\n1\n", "timeout").await;
    let elapsed = sent.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_millis(1500),
        "{elapsed:?}"
    );
    c1.expect(b"w\nk\n1\n", "error_not_enqueued").await;
    c1.expect(format!("r\nk\n{t}\n"), "ok").await;
}
}

conformance_test! {
async fn item_105_blocking_request_outlives_read_timeout() {
    // Spec: read timeout 2 s, `l` timeout 4 s. Scaled: 1 s and 2 s.
    let server = start_with(|c| c.read_timeout = READ_TIMEOUT).await;
    let mut h = conn(&server).await;
    let mut a = conn(&server).await;
    h.grant(b"l\nk\n0\n").await;
    a.send(b"l\nk\n2\nping\n_\n_\n").await;
    let sent = Instant::now();
    // H keeps pinging so its own idle deadline never fires.
    while sent.elapsed() < Duration::from_millis(1800) {
        a.assert_silent(Duration::from_millis(200)).await;
        h.assert_open().await;
    }
    assert_eq!(a.line().await, "timeout");
    assert!(
        sent.elapsed() >= Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(a.line_within(PROMPT).await, "ok");
}
}

conformance_test! {
async fn item_106_per_line_deadline() {
    // Spec: read timeout 2 s, pauses 1.5 s. Scaled: 1 s and 0.75 s.
    let server = start_with(|c| c.read_timeout = READ_TIMEOUT).await;
    let mut c = conn(&server).await;
    let pause = READ_TIMEOUT * 3 / 4;
    c.send(b"ping\n").await;
    tokio::time::sleep(pause).await;
    c.send(b"_\n").await;
    tokio::time::sleep(pause).await;
    c.send(b"_\n").await;
    assert_eq!(c.line().await, "ok");
}
}

socket_test! {
async fn item_108_tls() {
    let pki = test_pki();
    let server = start_with(|c| c.tls = Some(pki.server.clone())).await;
    let mut c = connect_tls(server.local_addr(), &pki.client).await;
    let version = c.stream().get_ref().1.protocol_version();
    assert!(
        matches!(
            version,
            Some(rustls::ProtocolVersion::TLSv1_2 | rustls::ProtocolVersion::TLSv1_3)
        ),
        "{version:?}"
    );
    c.send(b"ping\n_\n_\nl\nk\n0\n").await;
    assert_eq!(c.line().await, "ok");
    let t = parse_grant(&c.line().await, "ok").expect("grant over TLS");
    assert_eq!(t.lease, 33);
    c.expect(format!("r\nk\n{}\n", t.token), "ok").await;

    // Plaintext to the TLS port: no reply line, and the connection closes.
    let mut plain = Client::connect(server.local_addr()).await;
    let _ = plain.try_send(PING).await;
    let got = plain.read_to_close().await;
    assert!(
        !got.starts_with(b"ok") && !got.starts_with(b"error"),
        "plaintext request answered: {:?}",
        String::from_utf8_lossy(&got)
    );
}
}

conformance_test! {
async fn item_109_release_after_deadline_before_eviction() {
    let server = start_with(|c| c.lease_sweep_interval = Duration::from_secs(3600)).await;
    let mut c = conn(&server).await;
    let t = c.grant(b"l\nk\n0 1\n").await;
    assert_eq!(t.lease, 1);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    c.expect(format!("r\nk\n{}\n", t.token), "ok").await;
}
}

conformance_test! {
async fn item_110_renew_after_deadline_evicts_at_once() {
    let server = start_with(|c| c.lease_sweep_interval = Duration::from_secs(3600)).await;
    let mut c1 = conn(&server).await;
    let mut c2 = conn(&server).await;
    let t = c1.grant(b"l\nk\n0 1\n").await;
    let granted = Instant::now();
    c2.send(b"l\nk\n10\n").await;
    c1.wait_lock_waiters("k", 1).await;
    // Past the deadline, nothing evicts the holder: C2 still waits.
    let until = Duration::from_millis(1200).saturating_sub(granted.elapsed());
    c2.assert_silent(until).await;
    c1.expect(format!("n\nk\n{}\n", t.token), "error").await;
    let t2 = parse_grant(&c2.line_within(Duration::from_millis(500)).await, "ok")
        .expect("C2 granted after the rejected renew");
    assert_eq!(t2.lease, 33);
}
}
