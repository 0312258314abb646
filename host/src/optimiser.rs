//! The optimiser: a version first served from baseline code ([`Tier::Baseline`]) gets
//! its optimised build here, compiled in the background and swapped in through
//! [`Registry::upgrade`], atomically, as a reload swaps a version.
//!
//! Builds run one at a time on a thread of their own (Cranelift already compiles a
//! component's functions in parallel), in the order their versions were loaded. A
//! version that no longer serves when its turn comes (its file changed or went) is
//! skipped; one replaced while it compiled is dropped at the swap. The optimised code
//! goes into the compiled-code cache as any compiled code does, so a restart serves it
//! at once and never serves baseline code.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::Instant;

use crate::registry::{HandlerVersion, Registry};
use crate::sandbox::{Sandbox, Tier};

/// A version to build optimised code for.
pub struct Job {
    /// Its file name.
    file: String,
    /// The `.wasm` it was loaded from.
    wasm: Vec<u8>,
    /// The version as it serves from baseline code; gone once nothing holds it.
    baseline: Weak<HandlerVersion>,
}

impl Job {
    /// The optimised build of `baseline`, loaded from `wasm` for `file`.
    pub fn new(file: String, wasm: Vec<u8>, baseline: &Arc<HandlerVersion>) -> Self {
        Self {
            file,
            wasm,
            baseline: Arc::downgrade(baseline),
        }
    }
}

/// Takes jobs while it lives; dropping it ends the thread once the build under way
/// (if any) is done, and the jobs still queued are dropped.
pub struct Optimiser {
    jobs: mpsc::Sender<Job>,
    stopped: Arc<AtomicBool>,
}

impl Optimiser {
    /// Starts the optimiser's thread. Should the thread not start, versions keep
    /// serving from their baseline code (an error in the log says so).
    pub fn start(sandbox: Arc<Sandbox>, registry: Arc<Registry>) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let stopped = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&stopped);
        let spawned = std::thread::Builder::new()
            .name("optimiser".into())
            .spawn(move || {
                for job in queue {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    optimise(&sandbox, &registry, job);
                }
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "could not start the optimiser; handlers loaded from baseline code serve from it until reloaded");
        }
        Self { jobs, stopped }
    }

    /// Queues `job`.
    pub fn submit(&self, job: Job) {
        // The thread ends only with this handle, or if it could not start (logged).
        self.jobs.send(job).ok();
    }
}

impl Drop for Optimiser {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}

/// Builds one job's optimised code and swaps it in, if its version still serves.
fn optimise(sandbox: &Sandbox, registry: &Registry, job: Job) {
    let Some(baseline) = job
        .baseline
        .upgrade()
        .filter(|baseline| registry.holds(&job.file, baseline))
    else {
        tracing::debug!(handler = %job.file, "not optimised: the version changed or went before its turn");
        return;
    };
    let started = Instant::now();
    let code = match sandbox.optimise(&job.wasm, &baseline.digest, &baseline.code) {
        Ok(code) => code,
        Err(error) => {
            tracing::error!(
                handler = %baseline.label(), error = %format!("{error:#}"),
                "the optimised build failed; the baseline build goes on serving"
            );
            return;
        }
    };
    let compile_ms = started.elapsed().as_millis();
    let optimised = HandlerVersion {
        file: baseline.file.clone(),
        digest: baseline.digest.clone(),
        code,
        timeout: baseline.timeout,
        // The same version: its bound on calls in flight holds across the swap.
        in_flight: baseline.in_flight.clone(),
        max_in_flight: baseline.max_in_flight,
    };
    debug_assert_eq!(optimised.code.tier(), Tier::Optimised);
    if registry.upgrade(&job.file, &baseline, optimised) {
        tracing::info!(handler = %baseline.label(), compile_ms, "handler swapped to its optimised build");
    } else {
        tracing::info!(
            handler = %baseline.label(), compile_ms,
            "optimised build not swapped in: the version changed or went meanwhile, or its methods differ"
        );
    }
}
