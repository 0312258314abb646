//! A new large handler landing in a running host's folder, compiled-code cache cold:
//! the time from its rename into place to the first answer from it, with the baseline
//! compiler (the host's default: Winch first, Cranelift in the background) beside
//! Cranelift alone (`--no-baseline-compiler`, as the host was before). With the
//! baseline compiler, also how long until the optimised build is ready, and the
//! latency of calls on either build; and for both, the release edge-host's memory
//! once the optimised code serves (RSS now, and its peak over the round).
//!
//! The optimised build's end is seen from outside the host as its entry appearing in
//! the compiled-code cache: the host writes it as soon as Cranelift is done, then
//! pre-instantiates the build and swaps it in (well under a second). Calls "on the
//! optimised build" are timed from a second after that.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use testkit::{Mosquitto, WireCaller};

use crate::process::{self, DEVICE, Process};
use crate::stats::{Samples, median, mib, ms, us};

/// The longest a round may wait for the handler to answer, or for its optimised build.
const ROUND_TIMEOUT: Duration = Duration::from_secs(300);

/// Options of the landing benchmark.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Rounds per mode, each with a fresh host and an empty cache; figures are medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The Python or JavaScript guest that lands (testkit::lang), and its method.
    #[arg(long, default_value = "greeter-py")]
    guest: String,
    /// The method called.
    #[arg(long, default_value = "greet")]
    method: String,
    /// Calls timed on the optimised build (and at most on the baseline one).
    #[arg(long, default_value_t = 200)]
    calls: usize,
}

/// What one round measured.
struct Round {
    /// Rename → first answer from the new handler.
    first_answer: Duration,
    /// Rename → its optimised code in the cache.
    optimised: Duration,
    /// Calls answered by baseline code (before the optimised build was ready).
    on_baseline: Vec<Duration>,
    /// Calls on the optimised build.
    on_optimised: Vec<Duration>,
    /// RSS after the calls on the optimised build, and the round's peak.
    rss: u64,
    peak_rss: u64,
}

/// Runs the benchmark and prints its figures.
///
/// # Errors
/// When edge-host is not built, the guest's toolchain is missing, Mosquitto does not
/// start, or the handler does not serve in time.
pub async fn run(options: Options) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build of edge-bench measures a debug edge-host; use --release");
    }
    process::host_binary()?;
    let wasm = testkit::lang::guest(&options.guest)?;
    let size = std::fs::metadata(&wasm)?.len();
    let busy = process::check_quiet()?;
    let broker = Mosquitto::start()?;

    let mut results = Vec::new();
    for baseline in [true, false] {
        let label = if baseline {
            "baseline first (default)"
        } else {
            "Cranelift only"
        };
        let mut rounds = Vec::new();
        for round in 1..=options.rounds {
            eprintln!("{label}: round {round} of {}...", options.rounds);
            rounds.push(land_once(&broker, &wasm, baseline, &options).await?);
        }
        results.push((label, baseline, rounds));
    }

    println!(
        "a new {} ({:.1} MB) renamed into a running host's folder, compiled-code cache cold, {} rounds each",
        options.guest,
        size as f64 / 1e6,
        options.rounds
    );
    println!(
        "  CPUs busy with other work in the second before the run: {:.0}%",
        busy * 100.0
    );
    println!(
        "  {:<26} {:>13} {:>13} {:>14} {:>15} {:>10} {:>10}",
        "", "first answer", "optimised", "p50 baseline", "p50 optimised", "RSS", "peak RSS"
    );
    for (label, baseline, rounds) in &results {
        let each =
            |f: &dyn Fn(&Round) -> Duration| median(&rounds.iter().map(f).collect::<Vec<_>>());
        let p50 = |f: &dyn Fn(&Round) -> &Vec<Duration>| {
            let all: Vec<Duration> = rounds.iter().flat_map(|r| f(r).iter().copied()).collect();
            (!all.is_empty()).then(|| us(Samples::new(all).percentile(50.0)))
        };
        println!(
            "  {label:<26} {:>13} {:>13} {:>14} {:>15} {:>10} {:>10}",
            ms(each(&|r| r.first_answer)),
            if *baseline {
                ms(each(&|r| r.optimised))
            } else {
                "(= first)".to_owned()
            },
            p50(&|r| &r.on_baseline).unwrap_or_else(|| "-".to_owned()),
            p50(&|r| &r.on_optimised).unwrap_or_else(|| "-".to_owned()),
            mib(median(&rounds.iter().map(|r| r.rss).collect::<Vec<_>>())),
            mib(median(
                &rounds.iter().map(|r| r.peak_rss).collect::<Vec<_>>()
            )),
        );
    }
    println!(
        "  first answer: rename -> first 200 from the handler (medians); optimised: rename -> its optimised code\n  \
         cached (the swap follows); p50: one call at a time through Mosquitto, on each build; RSS: the host's, after\n  \
         the calls on the optimised build, and its peak over the round. target: first answer <= 1 s"
    );
    Ok(())
}

/// One round: a fresh host (with the baseline compiler or without) with an empty
/// folder and cache, the guest renamed in, the calls timed.
async fn land_once(
    broker: &Mosquitto,
    wasm: &Path,
    baseline: bool,
    options: &Options,
) -> anyhow::Result<Round> {
    let handlers = tempfile::tempdir().context("creating a handlers folder")?;
    let cache = tempfile::tempdir().context("creating a cache folder")?;
    let flags: &[&str] = if baseline {
        &[]
    } else {
        &["--no-baseline-compiler"]
    };
    let mut host = Process::host_flags(&broker.url(), handlers.path(), cache.path(), flags)?;
    testkit::presence(&broker.url(), DEVICE, true, Duration::from_secs(30)).await?;
    let mut client = WireCaller::connect(&broker.url(), DEVICE).await?;
    let payload = br#"{"name":"Ada"}"#;

    let staged = handlers.path().join(".landing.wasm.staged");
    std::fs::copy(wasm, &staged).context("staging the handler")?;
    let target = handlers.path().join(format!("{}.wasm", options.guest));
    let renamed = Instant::now();
    std::fs::rename(&staged, &target)?;
    let first_answer = loop {
        let (status, body) = client.call(&options.method, payload).await?;
        match status {
            200 => break renamed.elapsed(),
            404 => {}
            _ => anyhow::bail!("{} answered {status}: {body}", options.method),
        }
        anyhow::ensure!(
            renamed.elapsed() < ROUND_TIMEOUT,
            "the handler never served"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };

    // Calls on the baseline build, while the optimised one compiles.
    let mut on_baseline = Vec::new();
    let optimised = loop {
        if cached(cache.path())? {
            break renamed.elapsed();
        }
        anyhow::ensure!(renamed.elapsed() < ROUND_TIMEOUT, "no optimised build");
        if on_baseline.len() < options.calls {
            on_baseline.push(timed_call(&mut client, &options.method, payload).await?);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // With Cranelift alone, the first answer came from optimised code already.
    if !baseline {
        on_baseline.clear();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut on_optimised = Vec::with_capacity(options.calls);
    for _ in 0..options.calls {
        on_optimised.push(timed_call(&mut client, &options.method, payload).await?);
    }
    host.check_running()?;
    let (rss, peak_rss) = (host.rss()?, host.peak_rss()?);
    host.stop()?;
    Ok(Round {
        first_answer,
        optimised,
        on_baseline,
        on_optimised,
        rss,
        peak_rss,
    })
}

/// One call, timed; it must answer 200.
async fn timed_call(
    client: &mut WireCaller,
    method: &str,
    payload: &[u8],
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let (status, body) = client.call(method, payload).await?;
    anyhow::ensure!(status == 200, "{method} answered {status}: {body}");
    Ok(started.elapsed())
}

/// Whether the cache folder holds a compiled entry (the landed handler's: the folder
/// starts empty).
fn cached(dir: &Path) -> anyhow::Result<bool> {
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if name.to_string_lossy().ends_with(".cwasm") {
            return Ok(true);
        }
    }
    Ok(false)
}
