//! The hub's benchmark: a call through edge-hub's REST API (HTTPS with keep-alive)
//! beside edge-invoker's direct MQTT path, in one run, both answered by the same raw
//! MQTT responder (no dispatch, no sandbox) through one Mosquitto with TCP_NODELAY, so
//! that the difference is the hub's own cost. Figures: latency with 1 call in flight
//! (p50, p99) and calls per second with 64 in flight, each the median of the rounds'.
//!
//! `cargo run --release -p edge-hub --features bench --bin edge-hub-bench [-- --calls N
//! --seconds S --rounds R]` (needs Mosquitto, as the tests do). DESIGN.md's targets for the hub: p50 ≤ 1.5x the
//! direct path's, throughput ≥ 0.6x.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use edge_hub::{Config, Hub};
use edge_invoker::{CallRequest, Caller, ConnectOptions};
use edge_proto::{BrokerUrl, Namespace};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};

const DEVICE: &str = "bench-device";
const PAYLOAD: &str = r#""0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef""#;

struct Args {
    calls: usize,
    seconds: u64,
    rounds: usize,
    in_flight: usize,
}

fn args() -> Args {
    let mut args = Args {
        calls: 2000,
        seconds: 5,
        rounds: 3,
        in_flight: 64,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = pair.get(1).and_then(|v| v.parse().ok());
        match (pair[0].as_str(), value) {
            ("--calls", Some(v)) => args.calls = v,
            ("--seconds", Some(v)) => args.seconds = v as u64,
            ("--rounds", Some(v)) => args.rounds = v,
            ("--in-flight", Some(v)) => args.in_flight = v,
            _ => panic!("usage: bench [--calls N] [--seconds S] [--rounds R] [--in-flight N]"),
        }
    }
    args
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Mosquitto on a free port, with TCP_NODELAY, killed on drop (its folder with it).
struct Mosquitto(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mosquitto() -> anyhow::Result<(Mosquitto, BrokerUrl)> {
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nallow_anonymous true\nmax_queued_messages 100000\nset_tcp_nodelay true\n\
             persistence false\nlistener {port} 127.0.0.1\n"
        ),
    )?;
    let child = Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stderr(Stdio::null())
        .spawn()
        .context("starting /usr/sbin/mosquitto")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "Mosquitto did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((Mosquitto(child, dir), BrokerUrl::tcp("127.0.0.1", port)))
}

/// The raw responder: answers every request with its payload, status 200, and
/// publishes a retained presence so that callers know it is online.
async fn responder(broker: &BrokerUrl) -> anyhow::Result<()> {
    let namespace = Namespace::for_device(DEVICE)?;
    let mut options = MqttOptions::new(DEVICE, &broker.host, broker.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 4096);
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client
                        .try_subscribe(namespace.request_filter(), QoS::AtMostOnce)
                        .unwrap();
                    client
                        .try_publish(
                            namespace.presence_topic(),
                            QoS::AtLeastOnce,
                            true,
                            br#"{"online":true,"agent":"bench responder"}"#.to_vec(),
                        )
                        .unwrap();
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(request))) => {
                    if let Ok(topic) = namespace.parse_request(&request.topic) {
                        let answer = namespace.response_topic(200, topic.request_id);
                        let _ =
                            client.try_publish(answer, QoS::AtLeastOnce, false, request.payload);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    ready.await?;
    Ok(())
}

/// One keep-alive HTTPS connection to the hub's service API.
struct Rest {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authorization: String,
    host: String,
}

impl Rest {
    async fn connect(addr: SocketAddr, ca: &std::path::Path, authorization: &str) -> Self {
        let pem = std::fs::read(ca).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let (send, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(connection);
        Self {
            send,
            authorization: authorization.to_owned(),
            host: format!("localhost:{}", addr.port()),
        }
    }

    async fn call(&mut self) -> bool {
        let body =
            format!(r#"{{"methodName":"echo","payload":{PAYLOAD},"responseTimeoutInSeconds":30}}"#);
        let request =
            hyper::Request::post(format!("/twins/{DEVICE}/methods?api-version=2021-04-12"))
                .header("host", &self.host)
                .header("authorization", &self.authorization)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
        if let Err(e) = self.send.ready().await {
            eprintln!("connection lost: {e}");
            return false;
        }
        let response = match self.send.send_request(request).await {
            Ok(response) => response,
            Err(e) => {
                eprintln!("request failed: {e:?}");
                return false;
            }
        };
        let status = response.status();
        let body = response.into_body().collect().await;
        if status != 200 {
            eprintln!("HTTP {status}: {:?}", body.map(|b| b.to_bytes()));
        }
        status == 200
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Something that makes one call and says whether it was answered 200.
trait Call: Send + 'static {
    fn call(&mut self) -> impl std::future::Future<Output = bool> + Send;
}

struct Direct(Caller, CallRequest);

impl Call for Direct {
    async fn call(&mut self) -> bool {
        self.0.call(&self.1).await.is_ok_and(|r| r.status == 200)
    }
}

impl Call for Rest {
    async fn call(&mut self) -> bool {
        Rest::call(self).await
    }
}

/// (p50, p99) of `calls` made one at a time after a tenth as many to warm up.
async fn latency(one: &mut impl Call, calls: usize) -> (Duration, Duration) {
    for _ in 0..calls / 10 {
        assert!(one.call().await, "a warm-up call failed");
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        assert!(one.call().await, "a call failed");
        samples.push(started.elapsed());
    }
    (
        percentile(&mut samples, 50.0),
        percentile(&mut samples, 99.0),
    )
}

/// Calls per second with every caller in `callers` calling in a loop: a second of
/// warm-up, then `seconds` counted.
async fn throughput<C: Call>(callers: Vec<C>, seconds: u64) -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    let counted = Arc::new(AtomicU64::new(0));
    let open = Instant::now() + Duration::from_secs(1);
    let close = open + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for mut caller in callers {
        let counted = Arc::clone(&counted);
        tasks.spawn(async move {
            while Instant::now() < close {
                let ok = caller.call().await;
                let now = Instant::now();
                if ok && now >= open && now < close {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    counted.load(Ordering::Relaxed) as f64 / seconds as f64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = args();
    let (_mosquitto, broker) = mosquitto()?;
    responder(&broker).await?;
    let data = tempfile::tempdir()?;
    let hub = Hub::start(Config {
        data_dir: data.path().to_owned(),
        mqtts_listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
        https_listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
        broker: Some(broker.clone()),
        ..Config::default()
    })
    .await?;
    let policy = hub
        .registry
        .policy("service")?
        .context("no service policy")?;
    let token = edge_proto::iothub::sign(
        &format!("localhost:{}", hub.https_addr.port()),
        &policy.primary_key,
        edge_proto::iothub::unix_now() + 3600,
        Some("service"),
    )?;
    let ca = data.path().join("ca.pem");
    let caller = Caller::connect(ConnectOptions::new(broker.clone())).await?;
    let request = CallRequest::new(DEVICE, "echo", PAYLOAD);

    let mut direct = (Vec::new(), Vec::new(), Vec::new());
    let mut rest = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        // Direct: edge-invoker's Caller on the broker, one session shared by all calls.
        let (p50, p99) = latency(&mut Direct(caller.clone(), request.clone()), args.calls).await;
        let callers = (0..args.in_flight)
            .map(|_| Direct(caller.clone(), request.clone()))
            .collect();
        let rate = throughput(callers, args.seconds).await;
        direct.0.push(p50.as_secs_f64());
        direct.1.push(p99.as_secs_f64());
        direct.2.push(rate);
        eprintln!("round {round}: direct p50 {p50:?} p99 {p99:?} {rate:.0} calls/s");

        // Through the hub: one keep-alive HTTPS connection per call in flight.
        let (p50, p99) = latency(
            &mut Rest::connect(hub.https_addr, &ca, &token).await,
            args.calls,
        )
        .await;
        let mut callers = Vec::with_capacity(args.in_flight);
        for _ in 0..args.in_flight {
            callers.push(Rest::connect(hub.https_addr, &ca, &token).await);
        }
        let rate = throughput(callers, args.seconds).await;
        rest.0.push(p50.as_secs_f64());
        rest.1.push(p99.as_secs_f64());
        rest.2.push(rate);
        eprintln!("round {round}: hub    p50 {p50:?} p99 {p99:?} {rate:.0} calls/s");
    }
    let show = |label: &str, figures: &mut (Vec<f64>, Vec<f64>, Vec<f64>)| {
        (
            label.to_owned(),
            median(&mut figures.0),
            median(&mut figures.1),
            median(&mut figures.2),
        )
    };
    let (_, d50, d99, drate) = show("direct", &mut direct);
    let (_, h50, h99, hrate) = show("hub", &mut rest);
    println!(
        "edge-hub benchmark: {} rounds, {} calls at 1 in flight, {} s at {} in flight, payload {} bytes",
        args.rounds,
        args.calls,
        args.seconds,
        args.in_flight,
        PAYLOAD.len()
    );
    println!(
        "{:<44} {:>10} {:>10} {:>12}",
        "path", "p50", "p99", "calls/s"
    );
    println!(
        "{:<44} {:>7.1} us {:>7.1} us {:>12.0}",
        "edge-invoker's Caller, direct MQTT",
        d50 * 1e6,
        d99 * 1e6,
        drate
    );
    println!(
        "{:<44} {:>7.1} us {:>7.1} us {:>12.0}",
        "REST through edge-hub (HTTPS keep-alive)",
        h50 * 1e6,
        h99 * 1e6,
        hrate
    );
    println!(
        "hub / direct: p50 {:.2}x (target <= 1.5x), throughput {:.2}x (target >= 0.6x)",
        h50 / d50,
        hrate / drate
    );
    caller.disconnect().await;
    hub.stop().await;
    Ok(())
}
