//! Each fault of the proxy, observed from both peers over real TCP on
//! 127.0.0.1. Every wait is bounded; absence of bytes is the only thing
//! checked with a short timeout (there is no event to await for "nothing").

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use dflockd_testkit::faultproxy::{Blackhole, Direction, FaultProxy, Faults, Side};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

const STEP: Duration = Duration::from_secs(5);

/// An upstream that hands every accepted connection to the test.
struct Upstream {
    addr: SocketAddr,
    accepted: mpsc::UnboundedReceiver<TcpStream>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, accepted) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if tx.send(stream).is_err() {
                    return;
                }
            }
        });
        Upstream { addr, accepted }
    }

    async fn next(&mut self) -> TcpStream {
        timeout(STEP, self.accepted.recv())
            .await
            .expect("upstream accepted in time")
            .expect("listener alive")
    }
}

/// A proxy, one client connection through it, and the upstream's end.
async fn pair() -> (FaultProxy, TcpStream, TcpStream) {
    let mut upstream = Upstream::start().await;
    let proxy = FaultProxy::start(upstream.addr).await.expect("proxy");
    let client = TcpStream::connect(proxy.addr()).await.expect("connect");
    let server = upstream.next().await;
    // Keep the upstream's listener task alive as long as the test by leaking
    // the receiver into a task that ends with the runtime.
    tokio::spawn(async move {
        let _keep = upstream;
        std::future::pending::<()>().await;
    });
    (proxy, client, server)
}

async fn read_exactly(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    timeout(STEP, stream.read_exact(&mut buf))
        .await
        .expect("bytes in time")
        .expect("read");
    buf
}

/// Reads until the peer ends the stream; returns what came and how it ended.
async fn read_to_end(stream: &mut TcpStream) -> (Vec<u8>, Result<(), ErrorKind>) {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match timeout(STEP, stream.read(&mut buf))
            .await
            .expect("end in time")
        {
            Ok(0) => return (all, Ok(())),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) => return (all, Err(e.kind())),
        }
    }
}

#[tokio::test]
async fn forwards_both_ways_and_propagates_a_clean_close() {
    let (proxy, mut client, mut server) = pair().await;
    client.write_all(b"hello").await.unwrap();
    assert_eq!(read_exactly(&mut server, 5).await, b"hello");
    server.write_all(b"world!").await.unwrap();
    assert_eq!(read_exactly(&mut client, 6).await, b"world!");
    let link = proxy.link(0).await;
    assert_eq!(link.forwarded(Direction::ToServer), 5);
    assert_eq!(link.forwarded(Direction::ToClient), 6);
    // The client's FIN reaches the server; the server's reply still flows.
    client.shutdown().await.unwrap();
    let (rest, end) = read_to_end(&mut server).await;
    assert!(rest.is_empty());
    assert_eq!(end, Ok(()));
    server.write_all(b"bye").await.unwrap();
    drop(server);
    let (rest, end) = read_to_end(&mut client).await;
    assert_eq!((rest.as_slice(), end), (&b"bye"[..], Ok(())));
    timeout(STEP, link.closed()).await.expect("link closes");
}

#[tokio::test]
async fn latency_delays_each_direction_and_jitter_keeps_order() {
    let (proxy, mut client, mut server) = pair().await;
    let link = proxy.link(0).await;
    let latency = Duration::from_millis(150);
    link.set_latency(Direction::ToServer, latency, Duration::ZERO);
    let sent = Instant::now();
    client.write_all(b"x").await.unwrap();
    read_exactly(&mut server, 1).await;
    let took = sent.elapsed();
    assert!(took >= latency, "arrived after {took:?}");
    assert!(
        took < latency + Duration::from_secs(1),
        "arrived after {took:?}"
    );
    // The other direction is unaffected.
    let sent = Instant::now();
    server.write_all(b"y").await.unwrap();
    read_exactly(&mut client, 1).await;
    assert!(sent.elapsed() < latency, "replies were delayed too");

    // Large jitter on many small chunks: order must survive.
    link.set_latency(
        Direction::ToClient,
        Duration::ZERO,
        Duration::from_millis(30),
    );
    let mut expected = Vec::new();
    for i in 0..200u32 {
        let bytes = i.to_be_bytes();
        expected.extend_from_slice(&bytes);
        server.write_all(&bytes).await.unwrap();
        if i % 10 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(read_exactly(&mut client, expected.len()).await, expected);
}

#[tokio::test]
async fn throttle_limits_the_byte_rate() {
    let (proxy, mut client, mut server) = pair().await;
    let link = proxy.link(0).await;
    link.set_throttle(Direction::ToServer, Some(40_000));
    let payload = vec![7u8; 20_000];
    let sent = Instant::now();
    client.write_all(&payload).await.unwrap();
    assert_eq!(read_exactly(&mut server, payload.len()).await, payload);
    let took = sent.elapsed();
    // 20 kB at 40 kB/s: about 0.5 s (the first slice goes out at once).
    assert!(took >= Duration::from_millis(450), "took {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // Lifting it takes effect at once.
    link.set_throttle(Direction::ToServer, None);
    let sent = Instant::now();
    client.write_all(&payload).await.unwrap();
    read_exactly(&mut server, payload.len()).await;
    assert!(sent.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn blackhole_drop_discards_bytes_without_closing() {
    let (proxy, mut client, mut server) = pair().await;
    let link = proxy.link(0).await;
    link.blackhole(Blackhole::Drop);
    client.write_all(b"lost").await.unwrap();
    server.write_all(b"gone").await.unwrap();
    // Nothing arrives on either side, and neither side sees a close.
    let mut buf = [0u8; 8];
    assert!(
        timeout(Duration::from_millis(300), client.read(&mut buf))
            .await
            .is_err()
    );
    assert!(
        timeout(Duration::from_millis(300), server.read(&mut buf))
            .await
            .is_err()
    );
    assert!(!link.is_closed());
    // Lifted: new bytes flow; the dropped ones never show up.
    link.clear_faults();
    client.write_all(b"next").await.unwrap();
    assert_eq!(read_exactly(&mut server, 4).await, b"next");
    server.write_all(b"back").await.unwrap();
    assert_eq!(read_exactly(&mut client, 4).await, b"back");
    assert_eq!(link.forwarded(Direction::ToServer), 4);
}

#[tokio::test]
async fn blackhole_hold_delivers_in_order_once_lifted() {
    let (proxy, mut client, mut server) = pair().await;
    let link = proxy.link(0).await;
    link.set_blackhole(Direction::ToServer, Some(Blackhole::Hold));
    client.write_all(b"first").await.unwrap();
    let mut buf = [0u8; 8];
    assert!(
        timeout(Duration::from_millis(300), server.read(&mut buf))
            .await
            .is_err()
    );
    assert_eq!(link.forwarded(Direction::ToServer), 0);
    client.write_all(b"second").await.unwrap();
    link.set_blackhole(Direction::ToServer, None);
    assert_eq!(read_exactly(&mut server, 11).await, b"firstsecond");
}

#[tokio::test]
async fn half_close_toward_the_server_sends_it_eof_while_replies_flow() {
    let (proxy, mut client, mut server) = pair().await;
    let link = proxy.link(0).await;
    link.half_close(Side::Server);
    // The server reads a clean end of stream, though the client never closed.
    let (got, end) = read_to_end(&mut server).await;
    assert!(got.is_empty());
    assert_eq!(end, Ok(()));
    // Its replies still reach the client.
    server.write_all(b"still here").await.unwrap();
    assert_eq!(read_exactly(&mut client, 10).await, b"still here");
    // Client bytes are discarded now.
    client.write_all(b"ignored").await.unwrap();
    drop(server);
    let (got, end) = read_to_end(&mut client).await;
    assert!(got.is_empty());
    assert_eq!(end, Ok(()));
}

#[tokio::test]
async fn half_close_toward_the_client() {
    let (proxy, mut client, mut server) = pair().await;
    proxy.link(0).await.half_close(Side::Client);
    let (got, end) = read_to_end(&mut client).await;
    assert!(got.is_empty());
    assert_eq!(end, Ok(()));
    client.write_all(b"req").await.unwrap();
    assert_eq!(read_exactly(&mut server, 3).await, b"req");
}

#[tokio::test]
async fn reset_sends_rst_to_both_peers() {
    let (proxy, mut client, mut server) = pair().await;
    let link = proxy.link(0).await;
    timeout(STEP, link.reset()).await.expect("reset completes");
    assert!(link.is_closed());
    let (_, client_end) = read_to_end(&mut client).await;
    let (_, server_end) = read_to_end(&mut server).await;
    assert_eq!(client_end, Err(ErrorKind::ConnectionReset));
    assert_eq!(server_end, Err(ErrorKind::ConnectionReset));
    assert!(proxy.links().is_empty());
}

#[tokio::test]
async fn asymmetric_reset_tells_one_side_first() {
    let (proxy, mut client, mut server) = pair().await;
    let link = proxy.link(0).await;
    let delay = Duration::from_millis(300);
    let started = Instant::now();
    let resetting = {
        let link = link.clone();
        tokio::spawn(async move { link.reset_asymmetric(Side::Server, delay).await })
    };
    let (_, server_end) = read_to_end(&mut server).await;
    let server_knew = started.elapsed();
    // Meanwhile the client's socket is open and silent; its bytes vanish.
    let _ = client.write_all(b"into the void").await;
    let (_, client_end) = read_to_end(&mut client).await;
    let client_knew = started.elapsed();
    assert_eq!(server_end, Err(ErrorKind::ConnectionReset));
    assert_eq!(client_end, Err(ErrorKind::ConnectionReset));
    assert!(server_knew < delay, "server learnt after {server_knew:?}");
    assert!(
        client_knew >= delay,
        "client learnt after {client_knew:?}, before the {delay:?} delay"
    );
    timeout(STEP, resetting).await.expect("done").expect("task");
    assert!(link.is_closed());

    // And the other way round: the client first.
    let client2 = TcpStream::connect(proxy.addr()).await.unwrap();
    let link2 = proxy.link(1).await;
    let started = Instant::now();
    link2.reset_side(Side::Client).await;
    let mut client2 = client2;
    let (_, end) = read_to_end(&mut client2).await;
    assert_eq!(end, Err(ErrorKind::ConnectionReset));
    assert!(started.elapsed() < delay);
    assert!(!link2.is_closed(), "the server side must stay open");
    link2.reset_side(Side::Server).await;
    assert!(link2.is_closed());
}

#[tokio::test]
async fn a_peer_reset_is_passed_on() {
    let (proxy, mut client, server) = pair().await;
    socket2::SockRef::from(&server)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(server);
    let (_, end) = read_to_end(&mut client).await;
    assert_eq!(end, Err(ErrorKind::ConnectionReset));
    timeout(STEP, proxy.link(0).await.closed())
        .await
        .expect("link closes");
}

#[tokio::test]
async fn cut_all_resets_every_link_and_new_links_get_the_defaults() {
    let mut upstream = Upstream::start().await;
    let proxy = FaultProxy::start(upstream.addr).await.expect("proxy");
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..3 {
        clients.push(TcpStream::connect(proxy.addr()).await.unwrap());
        servers.push(upstream.next().await);
    }
    proxy.link(2).await;
    assert_eq!(proxy.links().len(), 3);
    let latency = Duration::from_millis(200);
    proxy.set_default_faults(
        Direction::ToServer,
        Faults::none().with_latency(latency, Duration::ZERO),
    );
    // Existing links keep their faults.
    let sent = Instant::now();
    clients[0].write_all(b"a").await.unwrap();
    read_exactly(&mut servers[0], 1).await;
    assert!(sent.elapsed() < latency);

    timeout(STEP, proxy.cut_all()).await.expect("cut in time");
    assert!(proxy.links().is_empty());
    for client in &mut clients {
        assert_eq!(read_to_end(client).await.1, Err(ErrorKind::ConnectionReset));
    }
    // New links are accepted and start with the defaults.
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut server = upstream.next().await;
    let link = proxy.link(3).await;
    assert_eq!(link.faults(Direction::ToServer).latency, latency);
    let sent = Instant::now();
    client.write_all(b"b").await.unwrap();
    read_exactly(&mut server, 1).await;
    assert!(sent.elapsed() >= latency);
    assert_eq!(proxy.accepted(), 4);
}

#[tokio::test]
async fn refused_upstream_resets_the_client() {
    // A port that was free a moment ago: connecting to it is refused.
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    drop(upstream);
    let proxy = FaultProxy::start(addr).await.expect("proxy");
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    let (_, end) = read_to_end(&mut client).await;
    assert_eq!(end, Err(ErrorKind::ConnectionReset));
    assert_eq!(proxy.accepted(), 0);
}

#[tokio::test]
async fn a_fin_waits_out_a_blackhole() {
    let (proxy, mut client, mut server) = pair().await;
    let link = proxy.link(0).await;
    link.blackhole(Blackhole::Drop);
    client.shutdown().await.unwrap();
    let mut buf = [0u8; 8];
    assert!(
        timeout(Duration::from_millis(300), server.read(&mut buf))
            .await
            .is_err(),
        "the FIN crossed a blackhole"
    );
    link.clear_faults();
    let (got, end) = read_to_end(&mut server).await;
    assert!(got.is_empty());
    assert_eq!(end, Ok(()));
}

#[tokio::test]
async fn after_a_one_sided_reset_the_other_peer_closing_ends_the_link() {
    let (proxy, client, mut server) = pair().await;
    let link = proxy.link(0).await;
    link.reset_side(Side::Client).await;
    // The server hears nothing yet …
    let mut buf = [0u8; 8];
    assert!(
        timeout(Duration::from_millis(200), server.read(&mut buf))
            .await
            .is_err()
    );
    assert!(!link.is_closed());
    // … and when it closes on its own, the link is gone.
    drop(server);
    timeout(STEP, link.closed()).await.expect("link closes");
    drop(client);
}
