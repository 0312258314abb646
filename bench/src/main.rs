//! `edge-bench`: the project's benchmarks, run by hand (never part of the tests'
//! pass/fail), each printing its figures beside what they are compared to.
//!
//! - [`e2e`]: calls end to end through Mosquitto and through edge-host's embedded
//!   broker, edge-host (fresh instance, instance reuse) beside the floor, a raw MQTT
//!   responder: latency, throughput, CPU, RSS. [`load`] is its load generator,
//!   [`floor`] the responder, [`broker`] the embedded broker on its own.
//! - [`startup`]: start-up to ready with 20 handlers (compiled-code cache cold and
//!   warm), and the idle host's RSS.
//! - [`reload`]: hot swap under steady load: rename → first call served by the new
//!   version, and failed calls.
//! - [`land`]: a new large (Python) handler landing, cache cold: rename → first
//!   answer with the baseline compiler first and with Cranelift alone, the calls on
//!   each build, and the host's memory.
//! - [`sandbox`]: the sandbox cost of one call (fresh Store, instantiate, call,
//!   teardown), without MQTT.
//! - [`lang`]: the same for handlers in Python and JavaScript beside Rust's, with
//!   their sizes and load times.
//! - [`hub`]: edge-hub beside the direct paths: a REST call through the hub to an
//!   edge-host against edge-invoker's Caller on the broker, and a device connected
//!   through the hub against the same device on the broker.
//! - [`process`]: the processes under test (the release edge-host, the responder),
//!   their CPU time and RSS from `/proc`; [`stats`]: percentiles and units.
//!
//! `e2e`, `startup`, `land` and `hub` run the release `edge-host` (and `edge-hub`) binaries
//! beside this one, so build them first: `cargo build --release -p edge-bench -p
//! edge-host -p edge-hub`, then `target/release/edge-bench <benchmark>`. The others run in this process:
//! `cargo run --release -p edge-bench -- <benchmark>`.

mod broker;
mod e2e;
mod floor;
mod hub;
mod land;
mod lang;
mod load;
mod process;
mod reload;
mod sandbox;
mod startup;
mod stats;

use clap::{Parser, Subcommand};

/// Benchmarks of edge-methods. Build with `cargo build --release -p edge-bench -p
/// edge-host -p edge-hub`, run `target/release/edge-bench <benchmark>`.
#[derive(Debug, Parser)]
#[command(name = "edge-bench")]
struct Args {
    #[command(subcommand)]
    benchmark: Benchmark,
}

#[derive(Debug, Subcommand)]
enum Benchmark {
    /// End to end through Mosquitto and the embedded broker: edge-host (fresh, reuse)
    /// beside a raw responder.
    E2e(e2e::Options),
    /// Start-up to ready with 20 handlers (cache cold and warm), and idle RSS.
    Startup(startup::Options),
    /// Hot reload under load: swaps a handler by atomic rename, again and again.
    Reload(reload::Options),
    /// A new large (Python) handler landing, cache cold: rename → first answer, with
    /// the baseline compiler first and with Cranelift alone.
    Land(land::Options),
    /// The sandbox cost of one call, echo handler, without MQTT.
    Sandbox(sandbox::Options),
    /// The sandbox cost of one call for Python and JavaScript handlers beside Rust's.
    Lang(lang::Options),
    /// edge-hub beside the direct paths: REST through the hub vs edge-invoker on the
    /// broker, to an edge-host; a device through the hub vs on the broker.
    Hub(hub::Options),
    /// The floor of `e2e`: answers every request with its payload (started by `e2e`).
    #[command(hide = true)]
    FloorResponder(floor::Options),
    /// The floor responder as a device connected through edge-hub (started by `hub`).
    #[command(hide = true)]
    HubDevice(floor::HubDeviceOptions),
    /// The embedded broker on its own, for `e2e`'s floor through it (started by `e2e`).
    #[command(hide = true)]
    EmbeddedBroker(broker::Options),
}

fn main() -> anyhow::Result<()> {
    let benchmark = Args::parse().benchmark;
    // The load generator and the responder each run on the thread that polls their
    // socket (a current-thread runtime): under a multi-thread runtime's `block_on`,
    // every message would first wake a worker thread, which then wakes this one.
    let runtime = match benchmark {
        Benchmark::E2e(_)
        | Benchmark::Startup(_)
        | Benchmark::Land(_)
        | Benchmark::Hub(_)
        | Benchmark::FloorResponder(_)
        | Benchmark::HubDevice(_)
        | Benchmark::EmbeddedBroker(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        Benchmark::Reload(_) => tokio::runtime::Runtime::new()?,
        // These drive the sandbox directly, which runs calls (and loads) on runtimes
        // of their own: not from within another runtime.
        Benchmark::Sandbox(options) => return sandbox::run(&options),
        Benchmark::Lang(options) => return lang::run(&options),
    };
    runtime.block_on(async {
        match benchmark {
            Benchmark::E2e(options) => e2e::run(options).await,
            Benchmark::Startup(options) => startup::run(options).await,
            Benchmark::Reload(options) => reload::run(options).await,
            Benchmark::Land(options) => land::run(options).await,
            Benchmark::Sandbox(_) | Benchmark::Lang(_) => unreachable!("run above"),
            Benchmark::Hub(options) => hub::run(options).await,
            Benchmark::FloorResponder(options) => floor::run(options).await,
            Benchmark::HubDevice(options) => floor::run_through_hub(options).await,
            Benchmark::EmbeddedBroker(options) => broker::run(options).await,
        }
    })
}
