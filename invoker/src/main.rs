//! The `edge-invoker` binary: parses the command line, sets up logging, runs the
//! command (see the library) and exits with its code.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use edge_invoker::{Cli, Exit};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime");
    match runtime {
        Ok(runtime) => runtime.block_on(edge_invoker::run(cli)).into(),
        Err(e) => {
            eprintln!("error: {e:#}");
            Exit::Failure.into()
        }
    }
}
