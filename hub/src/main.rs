//! The `edge-hub` binary: parses the command line, sets up logging, runs a registry
//! command or the hub (until SIGINT or SIGTERM), and maps failure to a non-zero exit
//! code.

use std::process::ExitCode;

use clap::Parser;
use edge_hub::cli::{Cli, execute};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = cli.config();
    let result = match &cli.command {
        Some(command) => execute(&config, command, &mut std::io::stdout().lock()),
        None => runtime(cli.threads())
            .map_err(anyhow::Error::from)
            .and_then(|runtime| {
                // The embedded broker's connections are local tasks when it runs on the
                // hub's thread (Config::broker_on_hub_thread); otherwise the set holds none.
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, edge_hub::run(config, shutdown_signal()))
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("edge-hub: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime the hub runs on: one thread, or a pool of `threads` workers (one per
/// CPU when `None`).
fn runtime(threads: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(threads) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(usize::from(threads));
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the hub");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    /// The thread a task spawned on `runtime` runs on.
    fn spawned_on(runtime: &tokio::runtime::Runtime) -> std::thread::ThreadId {
        runtime.block_on(async {
            tokio::spawn(async { std::thread::current().id() })
                .await
                .expect("the task finishes")
        })
    }

    #[test]
    fn one_thread_runs_tasks_on_the_hubs_own_thread_and_otherwise_a_pool_does() {
        let own = std::thread::current().id();
        assert_eq!(spawned_on(&super::runtime(Some(1)).expect("builds")), own);
        assert_ne!(spawned_on(&super::runtime(Some(2)).expect("builds")), own);
        assert_ne!(spawned_on(&super::runtime(None).expect("builds")), own);
    }
}
