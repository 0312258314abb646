//! Start-up and idle memory with many handlers. The release edge-host starts with 20
//! handlers, each serving a method of its own; the time from spawning it to its
//! retained presence `online` reaching a subscriber (it publishes presence after it has
//! loaded every handler, connected and subscribed) is its time to ready, with the
//! compiled-code cache cold (an empty folder) and warm (the same folder, next start).
//! Then its resident memory once it has idled a second, and how often it wakes up and
//! how much CPU it uses while it idles on (an edge device's CPU sleeps deeper the
//! fewer wake-ups it is given).
//!
//! The handlers are copies of the `named` fixture, each told its method name by its
//! sidecar, and each made distinct by a custom section holding its number: with
//! identical bytes they would share one digest, so a cold start would compile one and
//! take the other 19 from the cache it had just written.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use edge_proto::{Namespace, Presence};
use testkit::{Mosquitto, RawClient, guest};

use crate::process::{self, DEVICE, Process};
use crate::stats::{Samples, median, mib, ms};

/// How long a host may take to come online.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of the start-up benchmark.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Handlers in the folder.
    #[arg(long, default_value_t = 20)]
    handlers: usize,
    /// Starts of each kind (cold, warm); the figures are their median.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// How long the host idles after ready before its RSS is read, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    idle_ms: u64,
    /// Over how long, after that, its wake-ups and CPU time idling are counted, in
    /// milliseconds.
    #[arg(long, default_value_t = 3000)]
    idle_window_ms: u64,
}

/// What the starts of one kind measured.
#[derive(Default)]
struct Starts {
    ready: Vec<Duration>,
    rss: Vec<u64>,
    idle: Vec<Idle>,
}

/// What a host did while it idled for `--idle-window-ms`.
#[derive(Debug, Clone, Copy)]
struct Idle {
    /// Its threads' context switches: each a wake-up.
    switches: u64,
    /// Its CPU time.
    cpu: Duration,
}

/// Runs the benchmark and prints its figures.
///
/// # Errors
/// When edge-host is not built, Mosquitto does not start, or a host does not come
/// online with every handler loaded.
pub async fn run(options: Options) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build of edge-bench measures a debug edge-host; use --release");
    }
    process::host_binary()?;
    let busy = process::check_quiet()?;
    let broker = Mosquitto::start()?;
    let handlers = tempfile::tempdir().context("creating a handlers folder")?;
    let size = write_handlers(handlers.path(), options.handlers)?;
    let topic = Namespace::for_device(DEVICE)?.presence_topic();
    let mut presence = RawClient::connect(&broker.url(), &[topic]).await?;

    let (mut cold, mut warm) = (Starts::default(), Starts::default());
    for run in 1..=options.runs {
        eprintln!("start {run} of {}: cold, then warm...", options.runs);
        // A cache folder of its own for each pair: empty for the first start, filled
        // by it for the second.
        let cache = tempfile::tempdir().context("creating a cache folder")?;
        for starts in [&mut cold, &mut warm] {
            let (ready, rss, idle) = start_once(
                &broker,
                handlers.path(),
                cache.path(),
                &mut presence,
                &options,
            )
            .await?;
            starts.ready.push(ready);
            starts.rss.push(rss);
            starts.idle.push(idle);
        }
    }

    println!(
        "start-up to ready (subscribed, presence online seen by a subscriber), {} handlers of {:.1} KiB, {} starts each",
        options.handlers,
        size as f64 / 1024.0,
        options.runs
    );
    println!(
        "  CPUs busy with other work in the second before the run: {:.0}%",
        busy * 100.0
    );
    for (label, starts, target) in [
        ("compiled-code cache cold", &cold, None),
        ("compiled-code cache warm", &warm, Some("target <= 300 ms")),
    ] {
        let samples = Samples::new(starts.ready.clone());
        println!(
            "  {label:<26} median {:>9}  min {:>9}  max {:>9}{}",
            ms(samples.percentile(50.0)),
            ms(samples.percentile(0.0)),
            ms(samples.percentile(100.0)),
            target.map(|t| format!("  {t}")).unwrap_or_default()
        );
    }
    println!(
        "host RSS with {} handlers loaded, idle {} ms after ready",
        options.handlers, options.idle_ms
    );
    for (label, starts) in [("started cold", &cold), ("started warm", &warm)] {
        let samples = Samples::new(starts.rss.clone());
        println!(
            "  {label:<26} median {:>9}  min {:>9}  max {:>9}  target <= 64 MiB",
            mib(samples.percentile(50.0)),
            mib(samples.percentile(0.0)),
            mib(samples.percentile(100.0))
        );
    }
    println!(
        "host idling for {} ms after that: wake-ups (context switches, all threads) and CPU per second",
        options.idle_window_ms
    );
    let window_s = Duration::from_millis(options.idle_window_ms.max(1)).as_secs_f64();
    for (label, starts) in [("started cold", &cold), ("started warm", &warm)] {
        let switches: Vec<u64> = starts.idle.iter().map(|idle| idle.switches).collect();
        let cpu: Vec<Duration> = starts.idle.iter().map(|idle| idle.cpu).collect();
        println!(
            "  {label:<26} median {:>7.1} wake-ups/s  {:>6.2} ms CPU/s",
            median(&switches) as f64 / window_s,
            median(&cpu).as_secs_f64() * 1e3 / window_s
        );
    }
    Ok(())
}

/// Writes `count` handlers `named-NN.wasm`, each with a sidecar naming its method
/// `mNN`, and returns the size of one.
fn write_handlers(dir: &Path, count: usize) -> anyhow::Result<usize> {
    let named = guest("named");
    let wasm = std::fs::read(&named)
        .with_context(|| format!("reading the named fixture {}", named.display()))?;
    for n in 1..=count {
        let copy = with_custom_section(&wasm, "edge-bench-copy", n.to_string().as_bytes());
        let path = dir.join(format!("named-{n:02}.wasm"));
        std::fs::write(&path, &copy).with_context(|| format!("writing {}", path.display()))?;
        let sidecar = dir.join(format!("named-{n:02}.toml"));
        std::fs::write(&sidecar, format!("[config]\nmethod = \"m{n:02}\"\n"))
            .with_context(|| format!("writing {}", sidecar.display()))?;
    }
    Ok(wasm.len())
}

/// `wasm` with a custom section `name` holding `content` appended: the same component
/// to wasmtime, other bytes (so another digest) to the host.
fn with_custom_section(wasm: &[u8], name: &str, content: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    leb128(&mut body, name.len());
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(content);
    let mut out = wasm.to_vec();
    out.push(0); // custom section id
    leb128(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// Appends `n` as an unsigned LEB128 number.
fn leb128(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Starts a host, times it to ready, checks that it serves every handler, lets it
/// idle, reads its RSS, counts its wake-ups and CPU time idling on, and stops it.
async fn start_once(
    broker: &Mosquitto,
    handlers: &Path,
    cache: &Path,
    presence: &mut RawClient,
    options: &Options,
) -> anyhow::Result<(Duration, u64, Idle)> {
    let topic = Namespace::for_device(DEVICE)?.presence_topic();
    let is_presence = |t: &str| t == topic;
    // Clear the retained presence, and read up to our own empty message, so that what
    // comes next is from the host about to start, not from the last one.
    presence.publish_retained(&topic, Vec::new()).await?;
    loop {
        let (_, payload) = presence
            .next_where(Duration::from_secs(10), is_presence)
            .await
            .context("clearing the retained presence")?;
        if payload.is_empty() {
            break;
        }
    }

    let started = Instant::now();
    let mut host = Process::host(&broker.url(), handlers, cache)?;
    let ready = loop {
        let (_, payload) = presence
            .next_where(READY_TIMEOUT, is_presence)
            .await
            .context("the host did not come online")?;
        if serde_json::from_slice::<Presence>(&payload).is_ok_and(|p| p.online) {
            break started.elapsed();
        }
    };

    let catalog = testkit::catalog(&broker.url(), DEVICE).await?;
    anyhow::ensure!(
        catalog.methods.len() == options.handlers && catalog.failures.is_empty(),
        "the host serves {} methods, not {}; failures: {:?}",
        catalog.methods.len(),
        options.handlers,
        catalog.failures
    );
    tokio::time::sleep(Duration::from_millis(options.idle_ms)).await;
    host.check_running()?;
    let rss = host.rss()?;
    let (switches, cpu) = (host.context_switches()?, host.cpu_time()?);
    tokio::time::sleep(Duration::from_millis(options.idle_window_ms.max(1))).await;
    let idle = Idle {
        switches: host.context_switches()?.saturating_sub(switches),
        cpu: host.cpu_time()?.saturating_sub(cpu),
    };
    host.check_running()?;
    host.stop()?;
    Ok((ready, rss, idle))
}
