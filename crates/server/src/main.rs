//! `dflockd`: the standalone server. A thin shell over the library: parse
//! flags and environment, start logging, serve until SIGINT/SIGTERM, drain.

use std::process::ExitCode;

use dflockd_server::{Server, cli};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let settings = match cli::load(std::env::args(), |name| std::env::var(name).ok()) {
        Ok(settings) => settings,
        Err(cli::LoadError::Usage(usage)) => usage.exit(),
        Err(cli::LoadError::Config(error)) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let level = if settings.debug { "debug" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("DFLOCKD_LOG").unwrap_or_else(|_| EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let server = match Server::start(settings.config).await {
            Ok(server) => server,
            Err(error) => {
                tracing::error!(%error, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        shutdown_signal().await;
        tracing::info!("signal received, draining");
        server.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
