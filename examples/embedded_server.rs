//! Start a dflockd server inside this process, talk to it over TCP with the
//! raw three-line protocol, and shut it down.
//!
//! `cargo run --example embedded_server`

use dflockd::proto::{Reply, fence_from_token};
use dflockd::server::{Server, ServerConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = Server::start(ServerConfig::ephemeral()).await?;
    println!("embedded dflockd listening on {}", server.local_addr());

    let stream = tokio::net::TcpStream::connect(server.local_addr()).await?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();

    // Acquire: command, key, "<timeout> [<lease>]".
    write.write_all(b"l\nnightly-report\n5 30\n").await?;
    let reply = lines.next_line().await?.ok_or("server closed")?;
    println!("l nightly-report 5 30  ->  {reply}");
    let Reply::Granted { token, lease } = Reply::parse(reply.as_bytes())? else {
        return Err(format!("unexpected reply {reply}").into());
    };
    println!(
        "holding the lock: fence {} lease {lease}s",
        fence_from_token(&token.to_string())?
    );

    write
        .write_all(format!("r\nnightly-report\n{token}\n").as_bytes())
        .await?;
    println!(
        "r nightly-report <token>  ->  {}",
        lines.next_line().await?.ok_or("server closed")?
    );

    server.shutdown().await;
    println!("server drained and stopped");
    Ok(())
}
