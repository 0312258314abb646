//! The sandbox cost of one call for handlers written in Python (componentize-py) and
//! JavaScript (componentize-js), beside Rust's `echo`, as the host runs calls (no
//! MQTT): each component's size and load time (compile + pre-instantiate, cache off),
//! and per call, fresh and with instance reuse. A fresh call is split into the call
//! itself (instantiate + `handle`) and the teardown the host does after the answer is
//! queued, with the page faults it takes; with reuse, a call is `handle` alone, so
//! fresh minus reuse is what a fresh instance costs.
//!
//! The Python and JavaScript guests are built through `testkit::lang` (their
//! toolchains must be installed: `cargo xtask toolchains`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_host::config::{DEFAULT_MAX_MEMORY, Grants};
use edge_host::sandbox::{HandlerCode, HandlerContext, Request, Sandbox, SandboxConfig};
use sha2::{Digest as _, Sha256};

use crate::stats::{Samples, us};

/// Options of the per-language sandbox benchmark.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Calls to time per subject and mode (after a tenth as many to warm up).
    #[arg(long, default_value_t = 2_000)]
    calls: usize,
    /// Only the subjects whose name contains this (for example `py` or `js-count`).
    #[arg(long)]
    only: Option<String>,
    /// Skip the fresh or the reuse rows: `fresh` or `reuse` (to profile one).
    #[arg(long)]
    mode: Option<String>,
    /// Take compiled code from (and put it in) this compiled-code cache, so that
    /// `load` is a cache hit after the first run (for profiling the calls alone).
    #[arg(long)]
    cache_dir: Option<std::path::PathBuf>,
}

/// One handler and the call it is measured with.
struct Subject {
    /// The row's name.
    name: &'static str,
    /// The guest: a Rust package (testkit::guest) or a Python/JS guest (testkit::lang).
    guest: &'static str,
    rust: bool,
    method: &'static str,
    payload: fn() -> String,
    config: &'static [(&'static str, &'static str)],
}

const SUBJECTS: &[Subject] = &[
    Subject {
        name: "rust echo, 1 KiB",
        guest: "echo",
        rust: true,
        method: "echo",
        payload: kib_string,
        config: &[],
    },
    Subject {
        name: "py-count (pyCount: a global += 1)",
        guest: "py-misbehave",
        rust: false,
        method: "pyCount",
        payload: null,
        config: &[],
    },
    Subject {
        name: "py greet (example: json, log, config)",
        guest: "greeter-py",
        rust: false,
        method: "greet",
        payload: ada,
        config: &[("greeting", "Hello")],
    },
    Subject {
        name: "js-count (jsCount: a global += 1)",
        guest: "js-misbehave",
        rust: false,
        method: "jsCount",
        payload: null,
        config: &[],
    },
    Subject {
        name: "js readSensor (example: json, log, config)",
        guest: "sensor-js",
        rust: false,
        method: "readSensor",
        payload: null,
        config: &[("sensor", "boiler"), ("unit", "C")],
    },
];

fn kib_string() -> String {
    format!("\"{}\"", "x".repeat(1022))
}

fn null() -> String {
    "null".to_owned()
}

fn ada() -> String {
    r#"{"name":"Ada"}"#.to_owned()
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    println!(
        "sandbox cost of one call, per language: epoch + limits on, pages kept resident (as the host runs), {} calls",
        options.calls
    );
    println!(
        "  {:<44} {:>8} {:>9} | {:>9} {:>9} {:>9} {:>8} | {:>9} {:>9} | {:>9}",
        "subject",
        "size",
        "load",
        "fresh p50",
        "p99",
        "teardown",
        "faults",
        "reuse p50",
        "p99",
        "fresh-reuse"
    );
    for subject in SUBJECTS {
        if options
            .only
            .as_deref()
            .is_some_and(|only| !subject.name.contains(only) && !subject.guest.contains(only))
        {
            continue;
        }
        let wasm_path = if subject.rust {
            testkit::guest(subject.guest)
        } else {
            testkit::lang::guest(subject.guest)?
        };
        let wasm = std::fs::read(&wasm_path)?;
        let sandbox = Sandbox::new(&SandboxConfig {
            max_instances: 80,
            max_memory: DEFAULT_MAX_MEMORY,
            cache_dir: options.cache_dir.clone(),
            keep_resident: true,
        })?;
        let request = Request {
            method: subject.method.into(),
            payload: (subject.payload)(),
            request_id: "bench-request-0001".into(),
            time_left_ms: 30_000,
        };
        let started = Instant::now();
        // The digest keys the compiled-code cache, when one is given.
        let digest = format!("sha256:{:x}", Sha256::digest(&wasm));
        let fresh_code = Arc::new(sandbox.load(&wasm, &digest, context(subject, None))?);
        let load = started.elapsed();
        // Calls take milliseconds here, not microseconds: fewer for the slow ones.
        let calls = options.calls;
        let (fresh, teardown, faults) = if options.mode.as_deref() == Some("reuse") {
            (None, None, None)
        } else {
            let (fresh, teardown, faults) = measure_fresh(&fresh_code, &request, calls)?;
            (Some(fresh), Some(teardown), Some(faults))
        };
        let reuse = if options.mode.as_deref() == Some("fresh") {
            None
        } else {
            let reuse_code = sandbox.load(&wasm, &digest, context(subject, Some(1_000_000)))?;
            Some(measure_reuse(&reuse_code, &request, calls)?)
        };
        let p = |s: &Option<Samples>, q: f64| {
            s.as_ref().map_or("-".to_owned(), |s| us(s.percentile(q)))
        };
        let diff = match (&fresh, &reuse) {
            (Some(f), Some(r)) => us(f.percentile(50.0).saturating_sub(r.percentile(50.0))),
            _ => "-".to_owned(),
        };
        println!(
            "  {:<44} {:>6.1}MB {:>8.2}s | {:>9} {:>9} {:>9} {:>8} | {:>9} {:>9} | {:>9}",
            subject.name,
            wasm.len() as f64 / 1e6,
            load.as_secs_f64(),
            p(&fresh, 50.0),
            p(&fresh, 99.0),
            p(&teardown, 50.0),
            faults.map_or("-".to_owned(), |f: f64| format!("{f:.0}")),
            p(&reuse, 50.0),
            p(&reuse, 99.0),
            diff,
        );
    }
    println!(
        "  load: compile (or, with --cache-dir, the cache) + pre-instantiate + methods(). fresh: instantiate + handle; teardown: after the answer (p50);\n  \
         faults: minor page faults per fresh call (call + teardown). targets: Python fresh p50 <= 1 ms (reuse <= 0.3 ms), JS fresh p50 <= 0.5 ms"
    );
    Ok(())
}

fn context(subject: &Subject, reuse: Option<u32>) -> HandlerContext {
    HandlerContext {
        file: format!("{}.wasm", subject.guest),
        device_id: "bench".into(),
        config: subject
            .config
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        max_memory: DEFAULT_MAX_MEMORY,
        grants: Grants::default(),
        reuse,
    }
}

/// Fresh calls: the call (instantiate + handle) and the teardown timed apart, and the
/// minor page faults of both, per call.
fn measure_fresh(
    code: &HandlerCode,
    request: &Request,
    calls: usize,
) -> anyhow::Result<(Samples, Samples, f64)> {
    let deadline = Duration::from_secs(30);
    for _ in 0..calls / 10 {
        code.call(request, deadline)?;
        code.recycle();
    }
    let mut call = Vec::with_capacity(calls);
    let mut teardown = Vec::with_capacity(calls);
    let faults_before = minor_faults();
    for _ in 0..calls {
        let started = Instant::now();
        let response = code.call(request, deadline)?;
        let answered = Instant::now();
        code.recycle();
        teardown.push(answered.elapsed());
        call.push(answered - started);
        anyhow::ensure!(
            response.status == 200,
            "{}: {}",
            request.method,
            response.payload
        );
    }
    let faults = (minor_faults() - faults_before) as f64 / calls as f64;
    Ok((Samples::new(call), Samples::new(teardown), faults))
}

/// Calls served by a warm instance: `handle` alone.
fn measure_reuse(code: &HandlerCode, request: &Request, calls: usize) -> anyhow::Result<Samples> {
    let deadline = Duration::from_secs(30);
    for _ in 0..calls / 10 {
        code.call(request, deadline)?;
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        let response = code.call(request, deadline)?;
        samples.push(started.elapsed());
        anyhow::ensure!(
            response.status == 200,
            "{}: {}",
            request.method,
            response.payload
        );
    }
    Ok(Samples::new(samples))
}

/// Minor page faults this thread has taken (`/proc/thread-self/stat`, field 10).
fn minor_faults() -> u64 {
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|stat| {
            // The command name may hold spaces: count fields after its closing `)`.
            let after = stat.rsplit_once(')')?.1;
            after.split_whitespace().nth(7)?.parse().ok()
        })
        .unwrap_or(0)
}
