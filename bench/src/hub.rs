//! edge-hub beside the direct paths it relays to, in one run, through one broker
//! (Mosquitto with TCP_NODELAY on, or with `--embedded` the hub's own), with the
//! release edge-hub as a process of its own:
//!
//! - **Service side**: a method call on an edge-host (the `echo` handler) through the
//!   hub's REST API (`POST /twins/{id}/methods`, HTTPS with keep-alive, one connection
//!   per call in flight), beside the same call by edge-invoker's `Caller` straight on
//!   the broker, the path the hub itself takes behind its REST API, each on an
//!   edge-host of its own. Each caller is the only client subscribed to its edge-host's
//!   answers (a fresh pair of devices per round): a caller of a device receives every
//!   answer the device sends, and a second caller's copies would weigh on the row
//!   measured.
//! - **Device side**: the raw responder of [`crate::floor`] connected through the hub
//!   (MQTT over TLS, a SAS token, bare `$iothub/...` topics: `edge-bench hub-device`),
//!   beside the same responder connected to the broker as another device, each called
//!   by a load generator of its own ([`crate::load`]) on the broker.
//!
//! For each: latency with 1 call in flight (p50, p99; a hub row and its direct path
//! timed side by side, in alternating blocks of calls, so that what drifts during a
//! round, such as where the scheduler puts the processes, weighs on both alike), calls
//! per second with 64 in flight, and for the rows through the hub the hub's CPU time
//! per call; each the median of the rounds'. Then each hub row's ratios beside
//! DESIGN.md's targets for the hub: p50 ≤ 1.5× the direct path's, throughput ≥ 0.6×.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use edge_invoker::{CallRequest, Caller, ConnectOptions, ResponsePayload};
use edge_proto::BrokerUrl;
use edge_proto::iothub::{sign, unix_now};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use testkit::Mosquitto;

use crate::e2e::{Target, deploy_echo, loopback_port, print_ratio, ready};
use crate::load::{Errors, Generator, LatencyRun, Load, ThroughputRun};
use crate::process::{self, Backend, DEVICE, Process};
use crate::stats::{Samples, median, us};

/// The device the responder on the broker serves (the one through the hub is
/// [`DEVICE`], registered with the hub).
const BACKEND_DEVICE: &str = "bench-device-backend";

/// The method called: the `echo` handler's, which the responder answers as well.
const METHOD: &str = "echo";

/// How long calls are kept in flight before the throughput window opens.
const THROUGHPUT_WARMUP: Duration = Duration::from_secs(1);

/// How long the hub may take to listen, and a process under test to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a token made for the run stays valid.
const TOKEN_LIFETIME: u64 = 24 * 3600;

/// Options of the hub benchmark.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// The calls made.
    #[command(flatten)]
    load: Load,
    /// Rounds; each figure printed is the median of the rounds'.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Serve echo with instance reuse (a sidecar opting in) instead of a fresh
    /// instance per call.
    #[arg(long)]
    reuse: bool,
    /// Run the hub on its default path, its own embedded broker (no `--broker`), and
    /// connect edge-host, the Caller and the load generator to that, instead of
    /// running the hub, and all of them, on Mosquitto.
    #[arg(long)]
    embedded: bool,
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Row {
    /// edge-host called by edge-invoker's Caller on the broker.
    Direct,
    /// edge-host called through the hub's REST API.
    Rest,
    /// The responder connected to the broker, called on the broker.
    Backend,
    /// The responder connected through the hub, called on the broker.
    ThroughHub,
}

/// Every row, in the order measured and printed.
const ROWS: [Row; 4] = [Row::Direct, Row::Rest, Row::Backend, Row::ThroughHub];

impl Row {
    fn label(self) -> &'static str {
        match self {
            Self::Direct => "edge-host, Caller on MQTT",
            Self::Rest => "edge-host, REST via hub",
            Self::Backend => "device on the broker",
            Self::ThroughHub => "device via hub (MQTT/TLS)",
        }
    }

    /// The row this one is compared to, if it goes through the hub.
    fn direct(self) -> Option<Row> {
        match self {
            Self::Rest => Some(Self::Direct),
            Self::ThroughHub => Some(Self::Backend),
            Self::Direct | Self::Backend => None,
        }
    }
}

/// What all the rounds measured of one row.
#[derive(Default)]
struct Figures {
    p50: Vec<Duration>,
    p99: Vec<Duration>,
    calls_per_second: Vec<u64>,
    /// The hub's CPU time per call in the throughput window (rows through the hub).
    hub_cpu_per_call: Vec<Duration>,
    errors: Errors,
}

impl Figures {
    fn add(&mut self, latency: LatencyRun, throughput: ThroughputRun, through_hub: bool) {
        let samples = Samples::new(latency.latencies);
        self.p50.push(samples.percentile(50.0));
        self.p99.push(samples.percentile(99.0));
        self.calls_per_second
            .push(throughput.per_second().round() as u64);
        if through_hub {
            self.hub_cpu_per_call.push(throughput.cpu_per_call());
        }
        self.errors.add(&latency.errors);
        self.errors.add(&throughput.errors);
    }
}

/// What the run keeps up for all its rounds: the broker, the hub, the credentials and
/// the clients on the broker.
struct Setup {
    /// The run's Mosquitto, unless the hub's embedded broker serves the run.
    _mosquitto: Option<Mosquitto>,
    broker: BrokerUrl,
    /// The hub's data folder (registry, CA).
    data: tempfile::TempDir,
    hub: Process,
    mqtts: SocketAddr,
    https: SocketAddr,
    /// A `service` policy token for the REST API.
    service_token: String,
    /// [`DEVICE`]'s token, for the responder through the hub.
    device_token: String,
    /// The load generator on the broker calling [`DEVICE`], through the hub.
    load: Generator,
    /// The load generator on the broker calling [`BACKEND_DEVICE`], on the broker.
    backend_load: Generator,
    payload: Vec<u8>,
}

impl Setup {
    async fn start(options: &Options) -> anyhow::Result<Self> {
        let payload = options.load.payload_bytes();
        let data = tempfile::tempdir().context("creating the hub's data folder")?;
        let registry = edge_hub::Registry::open(data.path())?;
        let device_key = registry
            .add_device(DEVICE, (None, None), None)
            .context("registering the device")?
            .primary_key;
        let service_key = registry
            .policy("service")?
            .context("the registry has no service policy")?
            .primary_key;
        let (mqtts, https) = (loopback_port()?, loopback_port()?);
        let (mosquitto, broker, mut hub) = if options.embedded {
            let listen = loopback_port()?;
            let hub = Process::hub(Backend::Embedded(listen), data.path(), mqtts, https)?;
            (None, BrokerUrl::tcp("127.0.0.1", listen.port()), hub)
        } else {
            let mosquitto = Mosquitto::start()?;
            let broker = mosquitto.url();
            let hub = Process::hub(Backend::Broker(&broker), data.path(), mqtts, https)?;
            (Some(mosquitto), broker, hub)
        };
        wait_listening(https, &mut hub).await?;
        let expiry = unix_now() + TOKEN_LIFETIME;
        let service_token = sign(
            &format!("localhost:{}", https.port()),
            &service_key,
            expiry,
            Some("service"),
        )?;
        let device_token = sign(
            &format!("localhost/devices/{DEVICE}"),
            &device_key,
            expiry,
            None,
        )?;
        let load = Generator::connect(&broker, DEVICE, METHOD, payload.clone()).await?;
        let backend_load =
            Generator::connect(&broker, BACKEND_DEVICE, METHOD, payload.clone()).await?;
        Ok(Self {
            _mosquitto: mosquitto,
            broker,
            data,
            hub,
            mqtts,
            https,
            service_token,
            device_token,
            load,
            backend_load,
            payload,
        })
    }

    fn ca(&self) -> std::path::PathBuf {
        self.data.path().join("ca.pem")
    }
}

/// Waits until `process` accepts TCP connections on `addr`.
async fn wait_listening(addr: SocketAddr, process: &mut Process) -> anyhow::Result<()> {
    process
        .wait_for(&format!("listen on {addr}"), READY_TIMEOUT, async || {
            Ok(tokio::net::TcpStream::connect(addr).await.ok().map(drop))
        })
        .await
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// When edge-host or edge-hub is not built, Mosquitto does not start, or a process
/// under test fails to start or to answer.
pub async fn run(options: Options) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build of edge-bench measures debug binaries; use --release");
    }
    process::host_binary()?;
    process::hub_binary()?;
    let busy = process::check_quiet()?;
    let mut setup = Setup::start(&options).await?;
    let mut figures: Vec<(Row, Figures)> = ROWS.map(|row| (row, Figures::default())).into();
    for round in 1..=options.rounds {
        let measured = measure_round(&mut setup, &options, round).await?;
        for ((row, figures), (latency, throughput)) in figures.iter_mut().zip(measured) {
            let p50 = Samples::new(latency.latencies.clone()).percentile(50.0);
            eprintln!(
                "round {round}/{}: {:<27} p50 {:>9}  calls/s {:>6.0}",
                options.rounds,
                row.label(),
                us(p50),
                throughput.per_second()
            );
            figures.add(latency, throughput, row.direct().is_some());
        }
    }
    setup.hub.check_running()?;
    report(&options, &figures, busy);
    setup.hub.stop()?;
    Ok(())
}

/// One round of every row, in [`ROWS`]' order.
async fn measure_round(
    setup: &mut Setup,
    options: &Options,
    round: usize,
) -> anyhow::Result<Vec<(LatencyRun, ThroughputRun)>> {
    let window = Duration::from_secs(options.load.seconds);
    let mut rounds = Vec::with_capacity(ROWS.len());

    // The service side: two edge-hosts serving echo, one called directly and the
    // other through the hub, timed side by side. Every client subscribed to a device's
    // answers receives all of them (the topics carry no caller), so each caller is the
    // only one on its device: the direct Caller calls a device of its own, and the
    // hub's Caller a device of this round that it has not called before. The two hosts
    // swap paths from one round to the next.
    let handlers = tempfile::tempdir().context("creating a handlers folder")?;
    deploy_echo(handlers.path(), options.reuse)?;
    let mut devices = [
        format!("{DEVICE}-service-{round}a"),
        format!("{DEVICE}-service-{round}b"),
    ];
    let mut hosts = Vec::with_capacity(devices.len());
    for device in &devices {
        let cache = tempfile::tempdir().context("creating a cache folder")?;
        let host = Process::host_as(device, &setup.broker, handlers.path(), cache.path())?;
        hosts.push((host, cache));
    }
    if round.is_multiple_of(2) {
        devices.swap(0, 1);
        hosts.swap(0, 1);
    }
    let payload = String::from_utf8(setup.payload.clone()).context("the payload is not UTF-8")?;
    // Each host answers before it is timed, to a Caller gone before the timed ones
    // subscribe.
    let probe = Caller::connect(ConnectOptions::new(setup.broker.clone()))
        .await
        .context("connecting edge-invoker's Caller")?;
    for ((host, _), device) in hosts.iter_mut().zip(&devices) {
        let mut client = Direct {
            caller: probe.clone(),
            request: CallRequest::new(device.clone(), METHOD, payload.clone()),
        };
        caller_ready(&mut client, host).await?;
    }
    probe.disconnect().await;
    let [direct_device, rest_device] = &devices;
    let caller = Caller::connect(ConnectOptions::new(setup.broker.clone()))
        .await
        .context("connecting edge-invoker's Caller")?;
    let direct = || Direct {
        caller: caller.clone(),
        request: CallRequest::new(direct_device.clone(), METHOD, payload.clone()),
    };
    let tls = crate::floor::client_tls(&setup.ca())?;
    let connect = || {
        Rest::connect(
            setup.https,
            &tls,
            &setup.service_token,
            rest_device,
            &setup.payload,
        )
    };
    let (mut one_direct, mut one_rest) = (direct(), connect().await?);
    let (direct_latency, rest_latency) = latency_paired(
        async |warmup, calls| Ok(latency_of(&mut one_direct, warmup, calls).await),
        async |warmup, calls| Ok(latency_of(&mut one_rest, warmup, calls).await),
        options.load.warmup,
        options.load.calls,
    )
    .await?;
    let hub = &setup.hub;
    let callers = (0..options.load.in_flight).map(|_| direct()).collect();
    let throughput = throughput_of(callers, window, || hub.cpu_time()).await?;
    rounds.push((direct_latency, throughput));
    caller.disconnect().await;
    let mut clients = Vec::with_capacity(options.load.in_flight);
    for _ in 0..options.load.in_flight {
        clients.push(connect().await?);
    }
    let throughput = throughput_of(clients, window, || hub.cpu_time()).await?;
    rounds.push((rest_latency, throughput));
    for (mut host, _cache) in hosts {
        host.check_running()?;
        host.stop()?;
    }

    // The device side: the responder on the broker and the responder through the hub,
    // each a device of its own called by a load generator of its own, timed side by
    // side.
    let mut on_broker = Process::floor_as(&setup.broker, BACKEND_DEVICE)?;
    let mut through_hub =
        Process::hub_device(setup.mqtts.port(), &setup.ca(), &setup.device_token)?;
    for (load, responder) in [
        (&mut setup.backend_load, &mut on_broker),
        (&mut setup.load, &mut through_hub),
    ] {
        let status = ready(load, responder).await?;
        anyhow::ensure!(status == 200, "{} answers {status}", responder.name());
    }
    let latencies = latency_paired(
        async |warmup, calls| setup.backend_load.latency(warmup, calls).await,
        async |warmup, calls| setup.load.latency(warmup, calls).await,
        options.load.warmup,
        options.load.calls,
    )
    .await?;
    for (load, mut responder, latency) in [
        (&mut setup.backend_load, on_broker, latencies.0),
        (&mut setup.load, through_hub, latencies.1),
    ] {
        let hub = &setup.hub;
        let throughput = load
            .throughput(options.load.in_flight, THROUGHPUT_WARMUP, window, || {
                hub.cpu_time()
            })
            .await?;
        responder.check_running()?;
        responder.stop()?;
        rounds.push((latency, throughput));
    }
    Ok(rounds)
}

/// What a client saw of one call.
enum Reply {
    /// The device's status, and whether its payload was the request's.
    Answered { status: u16, echoed: bool },
    /// No answer: why.
    Failed(String),
}

/// Something that makes one call at a time.
trait Client: Send + 'static {
    fn call(&mut self) -> impl Future<Output = Reply> + Send;
}

/// edge-invoker's Caller on the broker.
struct Direct {
    caller: Caller,
    request: CallRequest,
}

impl Client for Direct {
    async fn call(&mut self) -> Reply {
        match self.caller.call(&self.request).await {
            Ok(response) => Reply::Answered {
                status: response.status,
                echoed: matches!(&response.payload, ResponsePayload::Json(text) if *text == self.request.payload),
            },
            Err(error) => Reply::Failed(error.to_string()),
        }
    }
}

/// One keep-alive HTTPS connection to the hub's service API.
struct Rest {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authorization: String,
    host: String,
    /// `/twins/{device}/methods?api-version=...`.
    path: String,
    /// The request body: `{"methodName","payload","responseTimeoutInSeconds"}`.
    body: Bytes,
    /// The payload the answer must carry, as the body has it: the hub passes the
    /// device's JSON on as text, so it is compared as text, as [`Direct`] does.
    payload: String,
}

impl Rest {
    async fn connect(
        addr: SocketAddr,
        tls: &Arc<rustls::ClientConfig>,
        authorization: &str,
        device: &str,
        payload: &[u8],
    ) -> anyhow::Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the hub's service API on {addr}"))?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(tls))
            .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
            .await
            .context("TLS handshake with the hub")?;
        let (send, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        let payload: serde_json::Value =
            serde_json::from_slice(payload).context("the payload is not JSON")?;
        let body = serde_json::json!({
            "methodName": METHOD,
            "payload": payload,
            "responseTimeoutInSeconds": 30,
        });
        Ok(Self {
            send,
            authorization: authorization.to_owned(),
            host: format!("localhost:{}", addr.port()),
            path: format!("/twins/{device}/methods?api-version=2021-04-12"),
            body: Bytes::from(body.to_string()),
            payload: payload.to_string(),
        })
    }
}

impl Client for Rest {
    async fn call(&mut self) -> Reply {
        let request = hyper::Request::post(&self.path)
            .header("host", &self.host)
            .header("authorization", &self.authorization)
            .header("content-type", "application/json")
            .body(Full::new(self.body.clone()));
        let request = match request {
            Ok(request) => request,
            Err(error) => return Reply::Failed(error.to_string()),
        };
        if let Err(error) = self.send.ready().await {
            return Reply::Failed(format!("connection lost: {error}"));
        }
        let response = match self.send.send_request(request).await {
            Ok(response) => response,
            Err(error) => return Reply::Failed(format!("request failed: {error}")),
        };
        let http = response.status().as_u16();
        let body = match response.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(error) => return Reply::Failed(format!("reading the answer: {error}")),
        };
        if http != 200 {
            return Reply::Answered {
                status: http,
                echoed: false,
            };
        }
        match serde_json::from_slice::<Answer<'_>>(&body) {
            Ok(answer) => Reply::Answered {
                status: answer.status,
                echoed: answer.payload.get() == self.payload,
            },
            Err(error) => Reply::Failed(format!("the answer is not JSON: {error}")),
        }
    }
}

/// The hub's answer to a method call.
#[derive(serde::Deserialize)]
struct Answer<'a> {
    status: u16,
    #[serde(borrow)]
    payload: &'a serde_json::value::RawValue,
}

/// Calls through `client` until `process` answers 200.
async fn caller_ready(client: &mut Direct, process: &mut Process) -> anyhow::Result<()> {
    let status = process
        .wait_for("answer a call", READY_TIMEOUT, async || {
            let reply = tokio::time::timeout(Duration::from_millis(250), client.call()).await;
            Ok(match reply {
                Ok(Reply::Answered { status, .. }) => Some(status),
                _ => None,
            })
        })
        .await?;
    anyhow::ensure!(
        status == 200,
        "{} answers {METHOD} with {status}",
        process.name()
    );
    Ok(())
}

/// Counts `reply` in `errors`, saying why the first few calls failed.
fn check(errors: &mut Errors, reply: Reply) -> bool {
    match reply {
        Reply::Answered { status, echoed } => errors.check_reply(status, echoed),
        Reply::Failed(why) => {
            if errors.total() < 3 {
                eprintln!("a call failed: {why}");
            }
            errors.add_missing(1);
            false
        }
    }
}

/// How many calls in a row one path makes before the other's turn, when two are timed
/// side by side.
const BLOCK: usize = 100;

/// Times two paths at one call in flight, `calls` calls each after `warmup` each, in
/// alternating blocks of [`BLOCK`] calls, so that whatever drifts while they run (other
/// work, where the scheduler puts the processes) weighs on both alike. `a` and `b`
/// make the calls they are asked for (warm-up calls, then timed ones), as
/// [`latency_of`] does.
async fn latency_paired(
    mut a: impl AsyncFnMut(usize, usize) -> anyhow::Result<LatencyRun>,
    mut b: impl AsyncFnMut(usize, usize) -> anyhow::Result<LatencyRun>,
    warmup: usize,
    calls: usize,
) -> anyhow::Result<(LatencyRun, LatencyRun)> {
    let mut runs = (a(warmup, 0).await?, b(warmup, 0).await?);
    let mut left = calls;
    while left > 0 {
        let block = left.min(BLOCK);
        let timed = (a(0, block).await?, b(0, block).await?);
        for (run, timed) in [(&mut runs.0, timed.0), (&mut runs.1, timed.1)] {
            run.latencies.extend(timed.latencies);
            run.errors.add(&timed.errors);
        }
        left -= block;
    }
    Ok(runs)
}

/// Makes `warmup` and then `calls` calls one after the other, timing the latter.
async fn latency_of(client: &mut impl Client, warmup: usize, calls: usize) -> LatencyRun {
    let mut latencies = Vec::with_capacity(calls);
    let mut errors = Errors::default();
    for call in 0..warmup + calls {
        let started = Instant::now();
        let reply = client.call().await;
        let elapsed = started.elapsed();
        if check(&mut errors, reply) && call >= warmup {
            latencies.push(elapsed);
        }
    }
    LatencyRun { latencies, errors }
}

/// Every client calls in a loop for [`THROUGHPUT_WARMUP`] and then `window`, counting
/// the calls answered in the window and the CPU time `cpu_time` says the hub used in
/// it.
async fn throughput_of<C: Client>(
    clients: Vec<C>,
    window: Duration,
    cpu_time: impl Fn() -> anyhow::Result<Duration>,
) -> anyhow::Result<ThroughputRun> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let opens = tokio::time::Instant::now() + THROUGHPUT_WARMUP;
    let closes = opens + window;
    let counted = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Errors::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for mut client in clients {
        let counted = Arc::clone(&counted);
        let errors = Arc::clone(&errors);
        tasks.spawn(async move {
            while tokio::time::Instant::now() < closes {
                let reply = client.call().await;
                let now = tokio::time::Instant::now();
                check(
                    &mut errors.lock().unwrap_or_else(PoisonError::into_inner),
                    reply,
                );
                if now >= opens && now < closes {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    tokio::time::sleep_until(opens).await;
    let (opened, cpu_before) = (Instant::now(), cpu_time()?);
    tokio::time::sleep_until(closes).await;
    let (closed, cpu_after) = (Instant::now(), cpu_time()?);
    while let Some(joined) = tasks.join_next().await {
        joined.context("a calling task panicked")?;
    }
    let errors = std::mem::take(&mut *errors.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(ThroughputRun {
        calls: counted.load(Ordering::Relaxed),
        elapsed: closed - opened,
        cpu: cpu_after.saturating_sub(cpu_before),
        errors,
    })
}

/// Prints the figures side by side, then each hub row's ratios to its direct path.
fn report(options: &Options, figures: &[(Row, Figures)], busy: f64) {
    println!(
        "edge-hub beside the direct paths, through {}, method echo ({}), {} B payload, {} rounds",
        if options.embedded {
            "the hub's embedded broker"
        } else {
            "Mosquitto (set_tcp_nodelay true)"
        },
        if options.reuse {
            "instance reuse"
        } else {
            "fresh instance per call"
        },
        options.load.payload,
        options.rounds
    );
    println!(
        "  @1: {} calls one at a time per round after {} to warm up, each hub row and \
         its direct path taking turns in blocks of {BLOCK}",
        options.load.calls, options.load.warmup
    );
    println!(
        "  @{0}: {0} calls in flight for {1} s per round after {2} s to warm up (REST: one \
         keep-alive HTTPS connection per call in flight)",
        options.load.in_flight,
        options.load.seconds,
        THROUGHPUT_WARMUP.as_secs()
    );
    println!(
        "  hub CPU/call: the edge-hub process's CPU time in the @{} window per call",
        options.load.in_flight
    );
    println!("  each figure is the median of the rounds'; errors are all rounds'");
    println!(
        "  CPUs busy with other work in the second before the run: {:.0}%",
        busy * 100.0
    );
    if let Some((allowed, online)) = process::cpus_confined() {
        println!(
            "  every process of the run on {allowed} of the machine's {online} CPUs (the \
             benchmark's CPU affinity, which they inherit)"
        );
    }
    println!();
    println!(
        "  {:<27} {:>10} {:>10} {:>11} {:>12}  errors",
        "",
        "p50 @1",
        "p99 @1",
        format!("calls/s @{}", options.load.in_flight),
        "hub CPU/call"
    );
    for (row, figures) in figures {
        let cpu = if row.direct().is_some() {
            us(median(&figures.hub_cpu_per_call))
        } else {
            "-".to_owned()
        };
        println!(
            "  {:<27} {:>10} {:>10} {:>11} {:>12}  {}",
            row.label(),
            us(median(&figures.p50)),
            us(median(&figures.p99)),
            median(&figures.calls_per_second),
            cpu,
            figures.errors
        );
    }
    let find = |row: Row| figures.iter().find(|(r, _)| *r == row).map(|(_, f)| f);
    for (row, this) in figures {
        let Some(direct) = row.direct().and_then(find) else {
            continue;
        };
        let ratio =
            |of: &[Duration], to: &[Duration]| median(of).as_secs_f64() / median(to).as_secs_f64();
        println!();
        println!(
            "  {} vs {}:",
            row.label(),
            row.direct().map_or("", Row::label)
        );
        print_ratio(
            "p50, 1 in flight",
            ratio(&this.p50, &direct.p50),
            Some(Target::AtMost(1.5)),
        );
        print_ratio("p99, 1 in flight", ratio(&this.p99, &direct.p99), None);
        print_ratio(
            &format!("calls/s, {} in flight", options.load.in_flight),
            median(&this.calls_per_second) as f64 / median(&direct.calls_per_second) as f64,
            Some(Target::AtLeast(0.6)),
        );
    }
}
