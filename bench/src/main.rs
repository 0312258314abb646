//! `edge-bench`: the project's benchmarks, run by hand (never part of the tests'
//! pass/fail), each printing its figures beside what they are compared to.
//!
//! - [`reload`]: hot swap under steady load: rename → first call served by the new
//!   version, and failed calls.
//! - [`sandbox`]: the sandbox cost of one call (fresh Store, instantiate, call,
//!   teardown), without MQTT.
//!
//! Run in release: `cargo run --release -p edge-bench -- <benchmark>`.

mod reload;
mod sandbox;
mod stats;

use clap::{Parser, Subcommand};

/// Benchmarks of edge-methods. Run with `cargo run --release -p edge-bench -- ...`.
#[derive(Debug, Parser)]
#[command(name = "edge-bench")]
struct Args {
    #[command(subcommand)]
    benchmark: Benchmark,
}

#[derive(Debug, Subcommand)]
enum Benchmark {
    /// Hot reload under load: swaps a handler by atomic rename, again and again.
    Reload(reload::Options),
    /// The sandbox cost of one call, echo handler, without MQTT.
    Sandbox(sandbox::Options),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().benchmark {
        Benchmark::Reload(options) => reload::run(options).await,
        Benchmark::Sandbox(options) => sandbox::run(&options),
    }
}
