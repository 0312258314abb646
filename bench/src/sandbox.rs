//! The sandbox cost of one call: fresh Store + instantiate + `handle` + teardown, for
//! the `echo` handler with a 1 KiB payload, with epoch interruption and the memory
//! limiter on, exactly as the host runs calls (no MQTT, no dispatch); and the same
//! with instance reuse.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_host::call::HandlerContext;
use edge_host::config::{DEFAULT_MAX_MEMORY, Grants};
use edge_host::sandbox::{Request, Sandbox, SandboxConfig};

use crate::stats::{Samples, us};

/// Options of the sandbox benchmark.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Calls to time (after as many again to warm up).
    #[arg(long, default_value_t = 20_000)]
    calls: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    payload: usize,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    println!(
        "sandbox cost of one call: echo, {} B payload, epoch + limits on, {} calls",
        options.payload, options.calls
    );
    for (keep_resident, reuse, label) in [
        (
            false,
            false,
            "fresh, pages faulted in per call (slots decommitted)",
        ),
        (
            true,
            false,
            "fresh, pages kept resident, dirty ones reset (the host)",
        ),
        (true, true, "instance reuse (a handler that opted in)"),
    ] {
        let samples = measure(options, keep_resident, reuse)?;
        println!(
            "  {label:<58} p50 {:>8}  p99 {:>8}",
            us(samples.percentile(50.0)),
            us(samples.percentile(99.0))
        );
    }
    println!("  targets: fresh p50 <= 30 us, reuse p50 <= 6 us");
    Ok(())
}

fn measure(options: &Options, keep_resident: bool, reuse: bool) -> anyhow::Result<Samples> {
    let sandbox = Sandbox::new(&SandboxConfig {
        max_instances: 80,
        max_memory: DEFAULT_MAX_MEMORY,
        cache_dir: None,
        keep_resident,
        baseline: false,
    })?;
    let wasm = std::fs::read(testkit::guest("echo"))?;
    let context = HandlerContext {
        file: "echo.wasm".into(),
        device_id: "bench".into(),
        config: Default::default(),
        max_memory: DEFAULT_MAX_MEMORY,
        grants: Grants::default(),
        reuse: reuse.then_some(1000),
    };
    let code = Arc::new(sandbox.load(&wasm, "sha256:bench", context)?);
    let payload = format!("\"{}\"", "x".repeat(options.payload.saturating_sub(2)));
    let request = Request {
        method: "echo".into(),
        payload,
        request_id: "bench-request-0001".into(),
        time_left_ms: 30_000,
    };
    let deadline = Duration::from_secs(30);
    // Calls are futures, as the host awaits them; a current-thread runtime adds the
    // least of its own to the figure.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    for _ in 0..options.calls {
        drop(runtime.block_on(code.call(&request, deadline))?);
    }
    let mut samples = Vec::with_capacity(options.calls);
    for _ in 0..options.calls {
        let started = Instant::now();
        let (response, spent) = runtime.block_on(code.call(&request, deadline))?;
        drop(spent);
        samples.push(started.elapsed());
        anyhow::ensure!(
            response.payload.len() == request.payload.len(),
            "echo answered something else"
        );
    }
    Ok(Samples::new(samples))
}
