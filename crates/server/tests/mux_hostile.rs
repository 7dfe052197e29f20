//! Random traffic on a multiplexed connection (docs/protocol-mux.md): valid
//! and invalid requests with ids, waits with short timeouts, tickets,
//! cancels of random ids, pipelined in random chunks. Every request must be
//! answered exactly once, by id, and nothing may stay behind once the
//! connection closes. Seeded (printed) so a failure can be replayed with
//! `DFLOCKD_MUX_FUZZ_SEED`.

use std::collections::HashMap;
use std::time::Duration;

use dflockd_server::{Server, ServerConfig};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

const FRAMES: u64 = 3_000;
const KEYS: &[&str] = &["a", "b", "c"];

/// One random mux frame with id `id`; `max_id` bounds cancel targets.
fn frame(rng: &mut fastrand::Rng, id: u64) -> String {
    let key = KEYS[rng.usize(..KEYS.len())];
    let ticket = rng.u64(0..4);
    let timeout = rng.u64(0..=1);
    let token = if rng.bool() {
        format!("{:032x}", rng.u128(..))
    } else {
        "bogus".to_string()
    };
    match rng.u8(0..16) {
        0 => format!("{id} l\n{key}\n{timeout}\n"),
        1 => format!("{id} sl\n{key}\n{timeout} 2\n"),
        2 => format!("{id} r\n{key}\n{token}\n"),
        3 => format!("{id} sr\n{key}\n{token}\n"),
        4 => format!("{id} n\n{key}\n{token} 5\n"),
        5 => format!("{id} e {ticket}\n{key}\n\n"),
        6 => format!("{id} se {ticket}\n{key}\n2\n"),
        7 => format!("{id} w {ticket}\n{key}\n{timeout}\n"),
        8 => format!("{id} sw {ticket}\n{key}\n{timeout}\n"),
        9 => format!("{id} cancel\n_\n{}\n", rng.u64(0..=id)),
        10 => format!("{id} ping\n_\n_\n"),
        11 => format!("{id} stats\n_\n_\n"),
        // Invalid, but with an id: answered `<id> error`, connection open.
        12 => format!("{id} l 3\n{key}\n0\n"),
        13 => format!("{id} sl\n{key}\n0 0\n"),
        14 => format!("{id} frob\n{key}\nx\n"),
        _ => format!("{id} w\n{key}\n-1\n"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_mux_traffic_is_answered_once_per_id_and_leaves_nothing() {
    let seed = std::env::var("DFLOCKD_MUX_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let server = Server::start(ServerConfig {
        max_locks: 16,
        ..ServerConfig::ephemeral()
    })
    .await
    .expect("server starts");
    let stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    write.write_all(b"hello\n_\nmux\n").await.unwrap();
    let mut line = String::new();
    read.read_line(&mut line).await.unwrap();
    assert_eq!(line, "ok mux 1\n");

    let reader = tokio::spawn(async move {
        let mut replies: HashMap<u64, Vec<String>> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut answered = 0;
        while answered < FRAMES {
            let mut line = String::new();
            let n = timeout(deadline - Instant::now(), read.read_line(&mut line))
                .await
                .expect("all replies within the bound")
                .expect("read");
            assert!(
                n > 0,
                "server closed the connection after {answered} replies"
            );
            let (id, reply) = line.trim_end().split_once(' ').expect("id and reply");
            let id: u64 = id.parse().expect("numeric id");
            replies.entry(id).or_default().push(reply.to_owned());
            answered += 1;
        }
        replies
    });
    let mut pending = Vec::new();
    for id in 1..=FRAMES {
        pending.extend_from_slice(frame(&mut rng, id).as_bytes());
        if rng.u8(0..8) == 0 || id == FRAMES {
            write.write_all(&pending).await.unwrap();
            pending.clear();
        }
    }
    let replies = reader.await.expect("reader");
    for id in 1..=FRAMES {
        let got = replies.get(&id).map_or(0, Vec::len);
        assert_eq!(
            got,
            1,
            "request {id} answered {got} times: {:?}",
            replies.get(&id)
        );
    }
    assert_eq!(replies.len() as u64, FRAMES, "replies to unknown ids");
    drop(write);

    // Once the connection is gone, nothing of it remains on the server.
    let mut check = BufReader::new(TcpStream::connect(server.local_addr()).await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        check.get_mut().write_all(b"stats\n_\n_\n").await.unwrap();
        let mut line = String::new();
        check.read_line(&mut line).await.unwrap();
        let stats: Value =
            serde_json::from_str(line.trim_end().strip_prefix("ok ").unwrap()).unwrap();
        let empty = |section: &str| {
            stats[section]
                .as_array()
                .is_some_and(std::vec::Vec::is_empty)
        };
        if empty("locks") && empty("semaphores") {
            break;
        }
        assert!(Instant::now() < deadline, "state left behind: {stats}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
