//! The sandbox cost of one call for handlers written in Python (componentize-py) and
//! JavaScript (componentize-js), beside Rust's `echo`, as the host runs calls (no
//! MQTT): each component's size and load time (compile + pre-instantiate, cache off),
//! and per call, fresh and with instance reuse. A fresh call is split into the call
//! itself (instantiate + `handle`) and the teardown the host does after the answer is
//! queued, with the page faults it takes; with reuse, a call is `handle` alone, so
//! fresh minus reuse is what a fresh instance costs. CPU time per call is given too,
//! since on a busy machine wall-clock percentiles measure the others as well.
//!
//! The Python and JavaScript guests are built through `testkit::lang` (their
//! toolchains must be installed: `cargo xtask toolchains`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_host::call::HandlerContext;
use edge_host::config::{DEFAULT_MAX_MEMORY, Grants};
use edge_host::sandbox::{HandlerCode, Request, Sandbox, SandboxConfig};

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
    /// Load as the host loads a new handler with its optimised code not cached: a
    /// component of 1 MiB or more from the baseline compiler (Winch), so that `load`
    /// is Winch's time and the calls run its code. Without it, every load is Cranelift's.
    #[arg(long)]
    baseline: bool,
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
        name: "py echo, 1 KiB (pyEcho)",
        guest: "py-misbehave",
        rust: false,
        method: "pyEcho",
        payload: kib_string,
        config: &[],
    },
    Subject {
        name: "py echo, 16 B (pyEcho)",
        guest: "py-misbehave",
        rust: false,
        method: "pyEcho",
        payload: sixteen_bytes,
        config: &[],
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
        name: "js echo, 1 KiB (jsEcho)",
        guest: "js-misbehave",
        rust: false,
        method: "jsEcho",
        payload: kib_string,
        config: &[],
    },
    Subject {
        name: "js echo, 16 B (jsEcho)",
        guest: "js-misbehave",
        rust: false,
        method: "jsEcho",
        payload: sixteen_bytes,
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

/// A JSON string of 16 bytes, quotes included.
fn sixteen_bytes() -> String {
    format!("\"{}\"", "x".repeat(14))
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
        "  {:<44} {:>7} {:>8} {:>9} | {:>10} {:>10} {:>9} {:>10} {:>6} | {:>9} {:>10} {:>9}",
        "subject",
        "size",
        "load",
        "code",
        "fresh p50",
        "p99",
        "teardown",
        "cpu/call",
        "faults",
        "reuse p50",
        "p99",
        "cpu/call",
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
            baseline: options.baseline,
        })?;
        let request = Request {
            method: subject.method.into(),
            payload: (subject.payload)(),
            request_id: "bench-request-0001".into(),
            time_left_ms: 30_000,
        };
        // The digest keys the compiled-code cache, when one is given.
        let digest = edge_host::loader::digest(&wasm);
        let started = Instant::now();
        let fresh_code = Arc::new(sandbox.load(&wasm, &digest, context(subject, None))?);
        let load = started.elapsed();
        let fresh = match options.mode.as_deref() {
            Some("reuse") => None,
            _ => Some(measure_fresh(&fresh_code, &request, options.calls)?),
        };
        let reuse = match options.mode.as_deref() {
            Some("fresh") => None,
            _ => {
                let code = sandbox.load(&wasm, &digest, context(subject, Some(1_000_000)))?;
                Some(measure_reuse(&code, &request, options.calls)?)
            }
        };
        let show = |figure: Option<Duration>| figure.map_or("-".to_owned(), us);
        println!(
            "  {:<44} {:>5.1}MB {:>7.2}s {:>9} | {:>10} {:>10} {:>9} {:>10} {:>6} | {:>9} {:>10} {:>9}",
            subject.name,
            wasm.len() as f64 / 1e6,
            load.as_secs_f64(),
            fresh_code.tier().to_string(),
            show(fresh.as_ref().map(|f| f.call.percentile(50.0))),
            show(fresh.as_ref().map(|f| f.call.percentile(99.0))),
            show(fresh.as_ref().map(|f| f.teardown.percentile(50.0))),
            show(fresh.as_ref().map(|f| f.cpu)),
            fresh
                .as_ref()
                .map_or("-".to_owned(), |f| format!("{:.0}", f.faults)),
            show(reuse.as_ref().map(|r| r.call.percentile(50.0))),
            show(reuse.as_ref().map(|r| r.call.percentile(99.0))),
            show(reuse.as_ref().map(|r| r.cpu)),
        );
    }
    println!(
        "  load: compile (or, with --cache-dir, the cache) + pre-instantiate + methods(); code: which compiler's code the calls\n  \
         ran (baseline: Winch, with --baseline, for components of 1 MiB or more; optimised: Cranelift). fresh: instantiate + handle, then\n  \
         teardown (p50, after the answer); cpu/call: this thread's CPU time per call, call and teardown (mean; holds on a\n  \
         busy machine, where wall-clock percentiles do not); faults: minor page faults per fresh call.\n  \
         targets: Python fresh p50 <= 1 ms (reuse <= 0.3 ms), JS fresh p50 <= 0.5 ms"
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

/// What fresh calls measured.
struct Fresh {
    /// Instantiate + handle, until the answer.
    call: Samples,
    /// The teardown the host does after the answer.
    teardown: Samples,
    /// Minor page faults per call, call and teardown.
    faults: f64,
    /// CPU time per call, call and teardown.
    cpu: Duration,
}

/// Fresh calls: the call (instantiate + handle) and the teardown timed apart, and the
/// page faults and CPU time of both, per call.
fn measure_fresh(code: &HandlerCode, request: &Request, calls: usize) -> anyhow::Result<Fresh> {
    let deadline = Duration::from_secs(30);
    let runtime = runtime()?;
    for _ in 0..calls / 10 {
        drop(runtime.block_on(code.call(request, deadline))?);
    }
    let mut call = Vec::with_capacity(calls);
    let mut teardown = Vec::with_capacity(calls);
    let faults_before = minor_faults();
    let cpu_before = cpu_time();
    for _ in 0..calls {
        let started = Instant::now();
        let (response, spent) = runtime.block_on(code.call(request, deadline))?;
        let answered = Instant::now();
        drop(spent);
        teardown.push(answered.elapsed());
        call.push(answered - started);
        anyhow::ensure!(
            response.status == 200,
            "{}: {}",
            request.method,
            response.payload
        );
    }
    Ok(Fresh {
        call: Samples::new(call),
        teardown: Samples::new(teardown),
        faults: (minor_faults() - faults_before) as f64 / calls as f64,
        cpu: per_call(cpu_time() - cpu_before, calls),
    })
}

/// What calls served by a warm instance measured.
struct Reuse {
    /// `handle` alone.
    call: Samples,
    /// CPU time per call.
    cpu: Duration,
}

/// Calls served by a warm instance: `handle` alone.
fn measure_reuse(code: &HandlerCode, request: &Request, calls: usize) -> anyhow::Result<Reuse> {
    let deadline = Duration::from_secs(30);
    let runtime = runtime()?;
    for _ in 0..calls / 10 {
        drop(runtime.block_on(code.call(request, deadline))?);
    }
    let mut samples = Vec::with_capacity(calls);
    let cpu_before = cpu_time();
    for _ in 0..calls {
        let started = Instant::now();
        let (response, _) = runtime.block_on(code.call(request, deadline))?;
        samples.push(started.elapsed());
        anyhow::ensure!(
            response.status == 200,
            "{}: {}",
            request.method,
            response.payload
        );
    }
    Ok(Reuse {
        call: Samples::new(samples),
        cpu: per_call(cpu_time() - cpu_before, calls),
    })
}

/// A runtime to await calls on, as the host does; a current-thread one adds the least
/// of its own to the figures.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?)
}

fn per_call(total: Duration, calls: usize) -> Duration {
    total / u32::try_from(calls.max(1)).unwrap_or(u32::MAX)
}

/// Minor page faults this thread has taken (`/proc/thread-self/stat`, field 10).
fn minor_faults() -> u64 {
    thread_stat(10)
}

/// CPU time this thread has used, user and system (fields 14 and 15, in clock ticks
/// of 10 ms: meaningful over many calls, not one).
fn cpu_time() -> Duration {
    Duration::from_millis((thread_stat(14) + thread_stat(15)) * 10)
}

/// Field `field` (numbered from 1, as in proc(5)) of `/proc/thread-self/stat`.
fn thread_stat(field: usize) -> u64 {
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|stat| {
            // The command name (field 2) may hold spaces: count from its closing `)`.
            let after = stat.rsplit_once(')')?.1;
            after
                .split_whitespace()
                .nth(field.checked_sub(3)?)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}
