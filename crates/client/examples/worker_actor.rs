//! A kameo worker actor that gets its lock by message and stops when it
//! hears `LeaseLost`.
//!
//! `cargo run -p dflockd-client --example worker_actor`
//!
//! The story: an embedded server starts; a worker asks the `GrantService`
//! for the lock `jobs/compact` with a 3 s lease; while it works, an operator
//! force-releases the token from another connection (any token bearer may);
//! the next renewal is refused, the worker receives `LeaseLost` and stops.

use std::time::Duration;

use dflockd_client::{
    Client, ConnectOptions, Connection, GrantService, Lease, LeaseLost, RequestGrant,
};
use dflockd_server::{Server, ServerConfig};
use kameo::actor::Spawn;
use kameo::error::Infallible;
use kameo::prelude::*;

struct Worker {
    lease: Option<Lease>,
}

impl Actor for Worker {
    type Args = ActorRef<GrantService>;
    type Error = Infallible;

    async fn on_start(
        grants: ActorRef<GrantService>,
        me: ActorRef<Self>,
    ) -> Result<Self, Infallible> {
        let request = RequestGrant::lock("jobs/compact")
            .lease(Duration::from_secs(3))
            .notify(me.clone().recipient());
        match grants.ask(request).await {
            Ok(lease) => {
                println!("worker: holding jobs/compact with fence {}", lease.fence());
                Ok(Worker { lease: Some(lease) })
            }
            Err(error) => {
                println!("worker: could not get the lock: {error}");
                Ok(Worker { lease: None })
            }
        }
    }
}

impl Message<LeaseLost> for Worker {
    type Reply = ();

    async fn handle(&mut self, lost: LeaseLost, ctx: &mut Context<Self, ()>) {
        println!(
            "worker: lease on {} (fence {}) lost: {:?} — stopping",
            lost.key, lost.fence, lost.reason
        );
        self.lease = None;
        ctx.stop();
    }
}

/// Which token the worker holds (for the operator in this demo).
struct WhichToken;

impl Message<WhichToken> for Worker {
    type Reply = Option<String>;

    async fn handle(
        &mut self,
        _: WhichToken,
        _: &mut Context<Self, Option<String>>,
    ) -> Option<String> {
        self.lease.as_ref().map(|l| l.token().to_string())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = Server::start(ServerConfig::ephemeral()).await?;
    let client = Client::builder()
        .server(server.local_addr().into())
        .build()?;
    let grants = GrantService::spawn(client);
    let worker = Worker::spawn(grants);
    worker.wait_for_startup().await;

    let token = worker
        .ask(WhichToken)
        .await?
        .ok_or("worker holds nothing")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("operator: force-releasing the worker's token");
    let mut admin =
        Connection::connect(&server.local_addr().into(), &ConnectOptions::default()).await?;
    admin
        .release(
            &dflockd_client::Key::new("jobs/compact")?,
            dflockd_proto::Namespace::Lock,
            token.parse()?,
        )
        .await?;

    tokio::time::timeout(Duration::from_secs(10), worker.wait_for_shutdown()).await?;
    println!("worker stopped; done");
    Ok(())
}
