//! `dflockd`: the standalone server. A thin shell over the library: parse
//! flags and environment, start logging, serve until SIGINT/SIGTERM, drain.

use std::process::ExitCode;

use std::io::IsTerminal;

use dflockd_server::Server;

mod cli;
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
    // DFLOCKD_LOG (a `tracing` filter) overrides the level.
    let filter = EnvFilter::try_from_env("DFLOCKD_LOG")
        .unwrap_or_else(|_| EnvFilter::new(settings.log_level.as_str()));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match settings.log_format {
        cli::LogFormat::Json => logs.json().init(),
        // Colours only on a terminal: piped into a file they are noise.
        cli::LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
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
