//! End-to-end calls through Mosquitto and through edge-host's embedded broker, beside
//! their floor. In one run the same load generator drives in turn, through one
//! Mosquitto (TCP_NODELAY on):
//! - the floor: a raw MQTT responder answering each request with its payload
//!   ([`crate::floor`]), no dispatch, no sandbox;
//! - edge-host serving the `echo` handler with a fresh instance per call;
//! - edge-host serving it with instance reuse (a sidecar `echo.toml` saying
//!   `reuse = true`), or a note that this build does not have it;
//!
//! and through the embedded broker (edge-broker, `broker/`):
//! - the same responder, through the embedded broker run on its own
//!   ([`crate::broker`]), as Mosquitto runs: the embedded broker's own floor;
//! - edge-host, fresh and reuse, on its own embedded broker: the default path, where
//!   the broker runs inside the host;
//!
//! and with `--lang`, edge-host serving the same echo written in Python
//! (componentize-py) and in JavaScript (componentize-js), a fresh instance per call,
//! their optimised code taken from a compiled-code cache warmed before the rounds: each
//! on its own embedded broker (the default path) and through Mosquitto.
//!
//! Each is a process of its own, started afresh for each round (5 by default, so that a
//! slow spell of the machine weighs on all of them and is outvoted); for each: latency
//! with 1 call in flight, calls per second with 64 in flight, the CPU time it used per
//! call in that phase and its RSS afterwards, each the median of the rounds'. Then each
//! row's ratios to the floor, beside DESIGN.md's targets for edge-host through
//! Mosquitto and issue 10's for the responder through the embedded broker.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use edge_proto::BrokerUrl;
use testkit::{Mosquitto, free_port, guest};

use crate::load::{Errors, Generator, LatencyRun, Load, ThroughputRun};
use crate::process::{self, DEVICE, Process};
use crate::stats::{Samples, median, mib, us};

/// The method called: the `echo` handler's, which the floor answers as well.
const METHOD: &str = "echo";

/// How long calls are kept in flight before the throughput window opens.
const THROUGHPUT_WARMUP: Duration = Duration::from_secs(1);

/// How long a process under test may take to answer its first call.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of the end-to-end benchmark.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// The calls made.
    #[command(flatten)]
    load: Load,
    /// Rounds, each starting every subject afresh and measuring it in turn, so that a
    /// slow spell of the machine weighs on all of them; each figure printed is the
    /// median of the rounds'.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Also measure edge-host with an echo handler in Python and one in JavaScript
    /// (fresh instances, on edge-host's own broker and through Mosquitto), beside
    /// Rust's. Builds them with the pinned toolchains first (`cargo xtask toolchains`).
    #[arg(long)]
    lang: bool,
}

/// What answers the calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answerer {
    /// The raw MQTT responder.
    Floor,
    /// edge-host, a fresh instance per call (the default).
    Fresh,
    /// edge-host, warm instances reused (the handler's sidecar opts in).
    Reuse,
    /// edge-host, a fresh instance per call of an echo written in Python.
    Python,
    /// edge-host, a fresh instance per call of an echo written in JavaScript.
    JavaScript,
}

impl Answerer {
    /// For the Python and JavaScript rows: testkit's guest they serve
    /// ([`testkit::lang::guest`]) and its echo method.
    fn lang_guest(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::Python => Some(("py-misbehave", "pyEcho")),
            Self::JavaScript => Some(("js-misbehave", "jsEcho")),
            Self::Floor | Self::Fresh | Self::Reuse => None,
        }
    }
}

/// What the calls go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broker {
    /// The run's Mosquitto.
    Mosquitto,
    /// edge-host's embedded broker: on its own for the responder, inside edge-host for
    /// edge-host (its default path).
    Embedded,
}

/// One row of the table: what answers, through what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Subject {
    answerer: Answerer,
    broker: Broker,
}

/// Every row, in the order measured and printed; the first is the floor.
const SUBJECTS: [Subject; 6] = [
    Subject::new(Answerer::Floor, Broker::Mosquitto),
    Subject::new(Answerer::Fresh, Broker::Mosquitto),
    Subject::new(Answerer::Reuse, Broker::Mosquitto),
    Subject::new(Answerer::Floor, Broker::Embedded),
    Subject::new(Answerer::Fresh, Broker::Embedded),
    Subject::new(Answerer::Reuse, Broker::Embedded),
];

/// The rows `--lang` adds: each language on the default path first.
const LANG_SUBJECTS: [Subject; 4] = [
    Subject::new(Answerer::Python, Broker::Embedded),
    Subject::new(Answerer::Python, Broker::Mosquitto),
    Subject::new(Answerer::JavaScript, Broker::Embedded),
    Subject::new(Answerer::JavaScript, Broker::Mosquitto),
];

/// Issue 14's targets for a fresh call, one at a time, by language: p50 at most this.
fn lang_target(answerer: Answerer) -> Option<Duration> {
    match answerer {
        Answerer::Python => Some(Duration::from_millis(1)),
        Answerer::JavaScript => Some(Duration::from_micros(500)),
        _ => None,
    }
}

impl Subject {
    const fn new(answerer: Answerer, broker: Broker) -> Self {
        Self { answerer, broker }
    }

    fn label(self) -> &'static str {
        match (self.answerer, self.broker) {
            (Answerer::Floor, Broker::Mosquitto) => "floor: responder, Mosquitto",
            (Answerer::Fresh, Broker::Mosquitto) => "edge-host fresh, Mosquitto",
            (Answerer::Reuse, Broker::Mosquitto) => "edge-host reuse, Mosquitto",
            (Answerer::Floor, Broker::Embedded) => "responder, embedded broker",
            (Answerer::Fresh, Broker::Embedded) => "edge-host fresh, own broker",
            (Answerer::Reuse, Broker::Embedded) => "edge-host reuse, own broker",
            (Answerer::Python, Broker::Mosquitto) => "Python fresh, Mosquitto",
            (Answerer::Python, Broker::Embedded) => "Python fresh, own broker",
            (Answerer::JavaScript, Broker::Mosquitto) => "JS fresh, Mosquitto",
            (Answerer::JavaScript, Broker::Embedded) => "JS fresh, own broker",
        }
    }

    /// The targets for (p50, p99, calls/s) as ratios to the floor: DESIGN.md's for
    /// edge-host through Mosquitto, issue 10's for the responder through the embedded
    /// broker. edge-host on its own broker has none of its own: its ratios show what
    /// the default path costs beside the floor, and the table beside the Mosquitto rows.
    fn targets(self) -> [Option<Target>; 3] {
        match (self.answerer, self.broker) {
            (Answerer::Floor, Broker::Mosquitto)
            | (Answerer::Fresh | Answerer::Reuse, Broker::Embedded)
            | (Answerer::Python | Answerer::JavaScript, _) => [None; 3],
            (Answerer::Floor, Broker::Embedded) => {
                [Some(Target::AtMost(1.3)), None, Some(Target::AtLeast(0.8))]
            }
            (Answerer::Fresh, Broker::Mosquitto) => [
                Some(Target::AtMost(1.6)),
                Some(Target::AtMost(2.5)),
                Some(Target::AtLeast(0.6)),
            ],
            (Answerer::Reuse, Broker::Mosquitto) => [
                Some(Target::AtMost(1.2)),
                Some(Target::AtMost(2.0)),
                Some(Target::AtLeast(0.8)),
            ],
        }
    }
}

/// A target on a ratio to the floor, from DESIGN.md.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// The ratio must be this or less.
    AtMost(f64),
    /// The ratio must be this or more.
    AtLeast(f64),
}

/// What one round measured of one subject.
struct Round {
    latency: LatencyRun,
    throughput: ThroughputRun,
    /// Resident memory of the process after the round, in bytes.
    rss: u64,
}

/// One subject measured in one round, or why it cannot be.
enum Attempt {
    Measured(Round),
    Unavailable(String),
}

/// What all the rounds measured of one subject.
#[derive(Default)]
struct Figures {
    /// Each round's median latency.
    p50: Vec<Duration>,
    /// Each round's 99th-percentile latency.
    p99: Vec<Duration>,
    /// Each round's calls per second.
    calls_per_second: Vec<u64>,
    /// Each round's CPU time per call.
    cpu_per_call: Vec<Duration>,
    /// Each round's RSS after the run.
    rss: Vec<u64>,
    /// Failed calls, all rounds.
    errors: Errors,
}

impl Figures {
    fn add(&mut self, round: Round) {
        let latency = Samples::new(round.latency.latencies);
        self.p50.push(latency.percentile(50.0));
        self.p99.push(latency.percentile(99.0));
        self.calls_per_second
            .push(round.throughput.per_second().round() as u64);
        self.cpu_per_call.push(round.throughput.cpu_per_call());
        self.rss.push(round.rss);
        self.errors.add(&round.latency.errors);
        self.errors.add(&round.throughput.errors);
    }

    /// The last round's figures in a few words, to show progress and spread.
    fn last_round(&self) -> String {
        let last = |values: &[Duration]| us(values.last().copied().unwrap_or_default());
        format!(
            "p50 {:>9}  p99 {:>9}  calls/s {:>6}",
            last(&self.p50),
            last(&self.p99),
            self.calls_per_second.last().copied().unwrap_or_default()
        )
    }

    fn summary(&self) -> Summary {
        Summary {
            p50: median(&self.p50),
            p99: median(&self.p99),
            calls_per_second: median(&self.calls_per_second),
            cpu_per_call: median(&self.cpu_per_call),
            rss: median(&self.rss),
        }
    }
}

/// The figures printed for one subject: each the median of the rounds'.
struct Summary {
    p50: Duration,
    p99: Duration,
    calls_per_second: u64,
    cpu_per_call: Duration,
    rss: u64,
}

/// A subject's figures so far, or why it cannot be measured.
enum Outcome {
    Measured(Figures),
    Unavailable(String),
}

/// The brokers of a run, each with a load generator connected for the whole run.
struct Brokers {
    mosquitto: Mosquitto,
    on_mosquitto: Generator,
    /// The embedded broker on its own, for the responder through it.
    embedded: Process,
    embedded_url: BrokerUrl,
    on_embedded: Generator,
    /// The payload every call sends.
    payload: Vec<u8>,
    /// The compiled-code cache of the Python and JavaScript subjects, warmed before the
    /// rounds so that each round's edge-host serves their optimised code from its start.
    lang_cache: Option<tempfile::TempDir>,
}

impl Brokers {
    async fn start(options: &Options) -> anyhow::Result<Self> {
        let payload = options.load.payload_bytes();
        let mosquitto = Mosquitto::start()?;
        let on_mosquitto =
            Generator::connect(&mosquitto.url(), DEVICE, METHOD, payload.clone()).await?;
        let listen = loopback_port()?;
        let mut embedded = Process::embedded_broker(listen)?;
        let embedded_url = BrokerUrl::tcp("127.0.0.1", listen.port());
        let on_embedded = connect_load(&embedded_url, &payload, &mut embedded).await?;
        Ok(Self {
            mosquitto,
            on_mosquitto,
            embedded,
            embedded_url,
            on_embedded,
            payload,
            lang_cache: None,
        })
    }
}

/// A compiled-code cache holding the optimised (Cranelift) code of the Python and
/// JavaScript guests, as edge-host writes it, so that edge-host does not serve them
/// from baseline code while it compiles.
fn warm_lang_cache() -> anyhow::Result<tempfile::TempDir> {
    use edge_host::call::HandlerContext;
    use edge_host::config::{DEFAULT_MAX_MEMORY, Grants};
    use edge_host::sandbox::{Sandbox, SandboxConfig};
    let cache = tempfile::tempdir().context("creating a cache folder")?;
    let sandbox = Sandbox::new(&SandboxConfig {
        max_instances: 80,
        max_memory: DEFAULT_MAX_MEMORY,
        cache_dir: Some(cache.path().to_owned()),
        keep_resident: true,
        baseline: false,
    })?;
    for answerer in [Answerer::Python, Answerer::JavaScript] {
        let Some((name, _)) = answerer.lang_guest() else {
            continue;
        };
        let wasm = std::fs::read(testkit::lang::guest(name)?)?;
        let digest = edge_host::loader::digest(&wasm);
        eprintln!("compiling {name} into the compiled-code cache (Cranelift)");
        let context = HandlerContext {
            file: format!("{name}.wasm"),
            device_id: DEVICE.into(),
            config: Default::default(),
            max_memory: DEFAULT_MAX_MEMORY,
            grants: Grants::default(),
            reuse: None,
        };
        // Loading compiles the optimised build (baseline off) and caches it.
        sandbox
            .load(&wasm, &digest, context)
            .map_err(|e| anyhow::anyhow!("compiling {name}: {e:#}"))?;
    }
    Ok(cache)
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// When edge-host is not built, a broker does not start, or a process under test
/// fails to start or to answer.
pub async fn run(options: Options) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build of edge-bench measures a debug edge-host; use --release");
    }
    process::host_binary()?;
    let busy = process::check_quiet()?;
    // Before the brokers and their load generators start: compiling blocks for a while
    // (on a thread of its own, as the sandbox runs calls on runtimes of its own).
    let lang_cache = if options.lang {
        let warmed = std::thread::spawn(warm_lang_cache).join().map_err(|_| {
            anyhow::anyhow!("compiling the Python and JavaScript guests panicked")
        })??;
        Some(warmed)
    } else {
        None
    };
    let mut brokers = Brokers::start(&options).await?;
    let mut subjects = SUBJECTS.to_vec();
    if lang_cache.is_some() {
        brokers.lang_cache = lang_cache;
        subjects.extend(LANG_SUBJECTS);
    }
    let mut results: Vec<(Subject, Outcome)> = subjects
        .into_iter()
        .map(|subject| (subject, Outcome::Measured(Figures::default())))
        .collect();
    for round in 1..=options.rounds {
        for (subject, outcome) in &mut results {
            let Outcome::Measured(figures) = outcome else {
                continue;
            };
            let attempt = measure(*subject, &mut brokers, &options)
                .await
                .with_context(|| format!("measuring {}", subject.label()))?;
            match attempt {
                Attempt::Measured(measured) => {
                    figures.add(measured);
                    eprintln!(
                        "round {round}/{}: {:<27} {}",
                        options.rounds,
                        subject.label(),
                        figures.last_round()
                    );
                }
                Attempt::Unavailable(why) => {
                    eprintln!(
                        "round {round}/{}: {:<27} {why}",
                        options.rounds,
                        subject.label()
                    );
                    *outcome = Outcome::Unavailable(why);
                }
            }
        }
    }
    report(&options, &results, busy);
    Ok(())
}

/// Starts `subject`, waits until it answers, measures one round and stops it.
async fn measure(
    subject: Subject,
    brokers: &mut Brokers,
    options: &Options,
) -> anyhow::Result<Attempt> {
    let handlers = tempfile::tempdir().context("creating a handlers folder")?;
    let own_cache = tempfile::tempdir().context("creating a cache folder")?;
    let mut cache = own_cache.path();
    let method = match (subject.answerer, subject.answerer.lang_guest()) {
        (Answerer::Floor, _) => METHOD,
        (_, None) => {
            deploy_echo(handlers.path(), subject.answerer == Answerer::Reuse)?;
            METHOD
        }
        (_, Some((name, method))) => {
            let wasm = handlers.path().join(format!("{name}.wasm"));
            std::fs::copy(testkit::lang::guest(name)?, &wasm)
                .with_context(|| format!("copying {name} to {}", wasm.display()))?;
            if let Some(warm) = &brokers.lang_cache {
                cache = warm.path();
            }
            method
        }
    };
    // edge-host on its own embedded broker brings the broker with it: a load generator
    // connects to it afresh each round.
    let mut own_load = None;
    let (mut process, broker, load) = match (subject.answerer, subject.broker) {
        (Answerer::Floor, Broker::Mosquitto) => {
            let url = brokers.mosquitto.url();
            (Process::floor(&url)?, url, &mut brokers.on_mosquitto)
        }
        (Answerer::Floor, Broker::Embedded) => {
            brokers.embedded.check_running()?;
            let url = brokers.embedded_url.clone();
            (Process::floor(&url)?, url, &mut brokers.on_embedded)
        }
        (_, Broker::Mosquitto) => {
            let url = brokers.mosquitto.url();
            let process = Process::host(&url, handlers.path(), cache)?;
            (process, url, &mut brokers.on_mosquitto)
        }
        (_, Broker::Embedded) => {
            let listen = loopback_port()?;
            let url = BrokerUrl::tcp("127.0.0.1", listen.port());
            let mut process = Process::host_on_embedded(listen, handlers.path(), cache)?;
            let load = connect_load(&url, &brokers.payload, &mut process).await?;
            (process, url, own_load.insert(load))
        }
    };
    load.set_method(method);
    let status = ready(load, &mut process).await?;
    if status == 404 && subject.answerer == Answerer::Reuse {
        let why = refusal(&broker).await;
        process.stop()?;
        return Ok(Attempt::Unavailable(why));
    }
    anyhow::ensure!(
        status == 200,
        "{} answers status {status} to a call of {method}",
        process.name()
    );
    let latency = load
        .latency(options.load.warmup, options.load.calls)
        .await?;
    let throughput = load
        .throughput(
            options.load.in_flight,
            THROUGHPUT_WARMUP,
            Duration::from_secs(options.load.seconds),
            || process.cpu_time(),
        )
        .await?;
    process.check_running()?;
    let rss = process.rss()?;
    process.stop()?;
    load.set_method(METHOD);
    Ok(Attempt::Measured(Round {
        latency,
        throughput,
        rss,
    }))
}

/// A free address on loopback for a broker to listen on.
pub fn loopback_port() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// Connects a load generator to `broker` as soon as it listens: the broker comes
/// with `process`, which may take a while to start it.
async fn connect_load(
    broker: &BrokerUrl,
    payload: &[u8],
    process: &mut Process,
) -> anyhow::Result<Generator> {
    let started = std::time::Instant::now();
    loop {
        process.check_running()?;
        match Generator::connect(broker, DEVICE, METHOD, payload.to_vec()).await {
            Ok(load) => return Ok(load),
            Err(error) if started.elapsed() > READY_TIMEOUT => {
                return Err(error).with_context(|| {
                    format!(
                        "{} did not let a client in within {READY_TIMEOUT:?}",
                        process.name()
                    )
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Copies the echo handler into `handlers`, with a sidecar opting in to instance
/// reuse when `reuse`.
pub fn deploy_echo(handlers: &Path, reuse: bool) -> anyhow::Result<()> {
    let wasm = handlers.join("echo.wasm");
    std::fs::copy(guest("echo"), &wasm)
        .with_context(|| format!("copying the echo handler to {}", wasm.display()))?;
    if reuse {
        let sidecar = handlers.join("echo.toml");
        std::fs::write(&sidecar, "reuse = true\n")
            .with_context(|| format!("writing {}", sidecar.display()))?;
    }
    Ok(())
}

/// Calls until the first answer comes, and returns its status.
pub async fn ready(load: &mut Generator, process: &mut Process) -> anyhow::Result<u16> {
    process
        .wait_for("answer a call", READY_TIMEOUT, async || {
            let answer = load.call_once(Duration::from_millis(250)).await?;
            Ok(answer.map(|answer| answer.status))
        })
        .await
}

/// Why the host does not serve echo with `reuse = true`, from its catalog's failures.
async fn refusal(broker: &BrokerUrl) -> String {
    let failure = testkit::catalog(broker, DEVICE)
        .await
        .ok()
        .and_then(|catalog| {
            catalog
                .failures
                .into_iter()
                .find(|failure| failure.handler == "echo.wasm")
        });
    match failure {
        Some(failure) => {
            // A TOML error spans lines (the source, a caret); its last line says why.
            let error = failure.error.trim();
            format!(
                "the host refused echo.toml: {}",
                error.lines().last().unwrap_or(error)
            )
        }
        None => "echo answers 404 with `reuse = true` in its sidecar".to_owned(),
    }
}

/// Prints the figures side by side, then each edge-host row's ratios to the floor.
fn report(options: &Options, results: &[(Subject, Outcome)], busy: f64) {
    println!(
        "end-to-end through Mosquitto (set_tcp_nodelay true) and edge-host's embedded broker, \
         method echo, {} B payload, {} rounds",
        options.load.payload, options.rounds
    );
    println!(
        "  @1: {} calls one at a time per round after {} to warm up",
        options.load.calls, options.load.warmup
    );
    println!(
        "  @{}: {} calls in flight for {} s per round after {} s to warm up",
        options.load.in_flight,
        options.load.in_flight,
        options.load.seconds,
        THROUGHPUT_WARMUP.as_secs()
    );
    println!(
        "  CPU/call (in the @{} window) and RSS (after it) are those of the process that answers",
        options.load.in_flight
    );
    println!(
        "  the responder reaches the embedded broker run on its own; edge-host runs its own, \
         so its CPU and RSS include the broker's"
    );
    println!("  each figure is the median of the rounds'; errors are all rounds'");
    println!(
        "  CPUs busy with other work in the second before the run: {:.0}%",
        busy * 100.0
    );
    println!();
    println!(
        "  {:<27} {:>10} {:>10} {:>11} {:>10} {:>10}  errors",
        "",
        "p50 @1",
        "p99 @1",
        format!("calls/s @{}", options.load.in_flight),
        "CPU/call",
        "RSS"
    );
    let mut summaries = Vec::new();
    for (subject, outcome) in results {
        match outcome {
            Outcome::Measured(figures) => {
                let summary = figures.summary();
                println!(
                    "  {:<27} {:>10} {:>10} {:>11} {:>10} {:>10}  {}",
                    subject.label(),
                    us(summary.p50),
                    us(summary.p99),
                    summary.calls_per_second,
                    us(summary.cpu_per_call),
                    mib(summary.rss),
                    figures.errors
                );
                summaries.push((*subject, summary));
            }
            Outcome::Unavailable(why) => println!(
                "  {:<27} not available in this build ({why})",
                subject.label()
            ),
        }
    }

    let Some((first, floor)) = summaries.first() else {
        return;
    };
    if *first != SUBJECTS[0] {
        return;
    }
    for (subject, this) in &summaries[1..] {
        let [p50, p99, throughput] = subject.targets();
        let ratio = |of: Duration, to: Duration| of.as_secs_f64() / to.as_secs_f64();
        println!();
        println!("  {} vs the floor:", subject.label());
        print_ratio("p50, 1 in flight", ratio(this.p50, floor.p50), p50);
        print_ratio("p99, 1 in flight", ratio(this.p99, floor.p99), p99);
        print_ratio(
            &format!("calls/s, {} in flight", options.load.in_flight),
            this.calls_per_second as f64 / floor.calls_per_second as f64,
            throughput,
        );
        print_ratio(
            "CPU per call",
            ratio(this.cpu_per_call, floor.cpu_per_call),
            None,
        );
        print_ratio("RSS", this.rss as f64 / floor.rss as f64, None);
        if let Some(target) = lang_target(subject.answerer) {
            let verdict = if this.p50 <= target { "met" } else { "MISSED" };
            println!(
                "    {:<24} {:>9}   target <= {} (issue 14)   {verdict}",
                "p50, 1 in flight",
                us(this.p50),
                us(target)
            );
        }
    }
    if results.iter().any(|(subject, outcome)| {
        subject.answerer == Answerer::Reuse && matches!(outcome, Outcome::Unavailable(_))
    }) {
        println!();
        println!("  reuse: not available in this build");
    }
}

/// One line of ratios: the ratio, and its target with whether it is met.
pub fn print_ratio(what: &str, ratio: f64, target: Option<Target>) {
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    match target {
        Some(Target::AtMost(bound)) => println!(
            "    {what:<24} {ratio:>6.3}x   target <= {bound}x   {}",
            verdict(ratio <= bound)
        ),
        Some(Target::AtLeast(bound)) => println!(
            "    {what:<24} {ratio:>6.3}x   target >= {bound}x   {}",
            verdict(ratio >= bound)
        ),
        None => println!("    {what:<24} {ratio:>6.3}x"),
    }
}
