//! Hot reload under steady load. A host serves `version` from `version.wasm`; callers
//! keep calls in flight; the benchmark renames version B (then A, then B...) into
//! place and measures the time from the rename to the first answer from the new
//! version, and counts every call that did not answer 200 from one version or the other.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edge_invoker::{CallRequest, Caller, ConnectOptions};
use testkit::{HandlerDir, Mosquitto, TestHost, guest, host_config};
use tokio::sync::mpsc;

use crate::stats::{Samples, ms};

const DEVICE: &str = "bench-reload";

/// Options of the reload benchmark.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Swaps to make.
    #[arg(long, default_value_t = 50)]
    swaps: usize,
    /// Callers keeping calls in flight.
    #[arg(long, default_value_t = 4)]
    callers: usize,
    /// Keep the compiled-code cache on, so that swapping back to a version seen before
    /// compiles nothing (off: every swap compiles).
    #[arg(long)]
    cache: bool,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let broker = Mosquitto::start()?;
    let handlers = HandlerDir::with(&[])?;
    let target = handlers.path().join("version.wasm");
    std::fs::copy(guest("version-a"), &target)?;
    let cache = tempfile::tempdir()?;
    let mut config = host_config(DEVICE, handlers.path(), broker.url());
    config.cache = options.cache;
    config.cache_dir = Some(cache.path().to_owned());
    let host = TestHost::start(config).await?;
    let caller = Caller::connect(ConnectOptions::new(broker.url())).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let (answers, mut answered) = mpsc::unbounded_channel::<(String, Instant)>();
    let mut load = Vec::new();
    for _ in 0..options.callers {
        let (caller, stop, failed, calls, answers) = (
            caller.clone(),
            Arc::clone(&stop),
            Arc::clone(&failed),
            Arc::clone(&calls),
            answers.clone(),
        );
        load.push(tokio::spawn(async move {
            let request = CallRequest::new(DEVICE, "version", "null");
            while !stop.load(Ordering::Relaxed) {
                calls.fetch_add(1, Ordering::Relaxed);
                match caller.call(&request).await {
                    Ok(response) if response.status == 200 => {
                        let version = response.payload.to_value()["version"]
                            .as_str()
                            .unwrap_or("?")
                            .to_owned();
                        answers.send((version, Instant::now())).ok();
                    }
                    Ok(response) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed call: status {}", response.status);
                    }
                    Err(error) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed call: {error}");
                    }
                }
            }
        }));
    }

    let mut latencies = Vec::with_capacity(options.swaps);
    for swap in 0..options.swaps {
        let (package, version) = if swap % 2 == 0 {
            ("version-b", "b")
        } else {
            ("version-a", "a")
        };
        let staged = handlers.path().join(".version.wasm.staged");
        std::fs::copy(guest(package), &staged)?;
        while answered.try_recv().is_ok() {}
        let renamed = Instant::now();
        std::fs::rename(&staged, &target)?;
        let latency = loop {
            let (answer, at) = tokio::time::timeout(Duration::from_secs(30), answered.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("the callers stopped"))?;
            if answer == version && at > renamed {
                break at - renamed;
            }
        };
        latencies.push(latency);
        // Steady load between swaps.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await?;
    }
    host.stop().await?;

    let samples = Samples::new(latencies);
    println!(
        "reload under load: {} swaps, {} callers, compiled-code cache {}",
        samples.len(),
        options.callers,
        if options.cache { "on" } else { "off" }
    );
    println!(
        "  rename -> first call served by the new version: p50 {}  p99 {}  max {}",
        ms(samples.percentile(50.0)),
        ms(samples.percentile(99.0)),
        ms(samples.percentile(100.0))
    );
    println!(
        "  calls: {} made, {} failed",
        calls.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    println!("  target: p50 <= 250 ms, 0 failed calls");
    Ok(())
}
