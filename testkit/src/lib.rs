//! What the end-to-end tests share, so each test reads as the behaviour it pins down:
//! - [`guest`] and [`HandlerDir`]: real components built from `handlers/` and
//!   `testkit/fixtures/` by this crate's build script, copied into temporary folders;
//! - [`Mosquitto`]: a real Mosquitto on a free loopback port, stopped on drop;
//! - [`TestHost`]: an edge-host running in-process with an injected shutdown;
//! - [`presence`]: waits for a device's retained presence, as a caller sees it;
//! - [`lang`]: guests in Python and JavaScript, built on first use.
//! - [`RawClient`], [`WireCaller`], [`publish_once`]: plain MQTT clients for tests that
//!   send what edge-host and edge-invoker never would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use edge_proto::client;
use edge_proto::transport::Security;
use edge_proto::{BrokerUrl, Namespace, Presence};
use tempfile::TempDir;

pub mod lang;

/// The path of a built guest component, by package name (`echo`, `misbehave`, ...).
pub fn guest(package: &str) -> PathBuf {
    Path::new(env!("EDGE_GUESTS_DIR")).join(format!("{}.wasm", package.replace('-', "_")))
}

/// Sends the host's and the tests' logs to the test output (shown on failure or with
/// `--nocapture`), and to [`capture_logs`] while one is open; `RUST_LOG` filters them.
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Another test in the same binary may have set it up already.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_test_writer())
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(|| CapturedWriter),
        )
        .try_init();
}

/// What the logs said while captures were open, shared by the whole test binary.
static CAPTURED: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());
/// Captures open now: the log is kept only while one is.
static CAPTURING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct CapturedWriter;

impl std::io::Write for CapturedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if CAPTURING.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            CAPTURED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log lines (without colours) written from now until it is dropped, by every
/// thread of this test binary: filter them by what your test's lines carry (a method,
/// a request id), since other tests run alongside.
pub struct LogCapture {
    start: usize,
}

/// Starts capturing the log; see [`LogCapture`].
pub fn capture_logs() -> LogCapture {
    init_logging();
    let start = CAPTURED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .len();
    CAPTURING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    LogCapture { start }
}

impl LogCapture {
    /// The lines captured so far that contain `needle`, joined by newlines.
    pub fn lines_with(&self, needle: &str) -> String {
        let captured = CAPTURED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(captured.get(self.start..).unwrap_or_default())
            .lines()
            .filter(|line| line.contains(needle))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for LogCapture {
    fn drop(&mut self) {
        if CAPTURING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) == 1 {
            CAPTURED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        }
    }
}

/// A temporary handlers folder holding copies of built guests.
pub struct HandlerDir {
    dir: TempDir,
}

impl HandlerDir {
    /// A folder with each named guest as `NAME.wasm`.
    ///
    /// # Errors
    /// When a guest is not built or cannot be copied.
    pub fn with(packages: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("creating a handlers folder")?;
        let this = Self { dir };
        for package in packages {
            this.add(package)?;
        }
        Ok(this)
    }

    /// Copies guest `package` in as `NAME.wasm`.
    ///
    /// # Errors
    /// When the guest is not built or cannot be copied.
    pub fn add(&self, package: &str) -> anyhow::Result<PathBuf> {
        let to = self.path().join(format!("{package}.wasm"));
        std::fs::copy(guest(package), &to)
            .with_context(|| format!("copying guest {package} to {}", to.display()))?;
        Ok(to)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; taken soon after by the caller).
///
/// # Errors
/// When no port can be bound.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding port 0")?;
    Ok(listener.local_addr()?.port())
}

/// A Mosquitto broker of the test's own, on a free loopback port, with TCP_NODELAY
/// on; killed when dropped.
pub struct Mosquitto {
    child: Child,
    /// The listeners' ports; the first is the one [`Mosquitto::url`] names.
    ports: Vec<u16>,
    dir: TempDir,
}

impl Mosquitto {
    /// Starts Mosquitto with no ACL (anonymous access).
    ///
    /// # Errors
    /// When Mosquitto is not installed or does not start listening.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with("")
    }

    /// Starts Mosquitto with `extra` appended to its configuration.
    ///
    /// # Errors
    /// When Mosquitto is not installed or does not start listening.
    pub fn start_with(extra: &str) -> anyhow::Result<Self> {
        Self::start_listener(&format!("allow_anonymous true\n{extra}"))
    }

    /// Starts Mosquitto with `listener_config` right after its `listener` line (so
    /// listener options such as TLS files apply to it). Anonymous clients are refused
    /// unless the configuration says `allow_anonymous true`.
    ///
    /// # Errors
    /// When Mosquitto is not installed or does not start listening.
    pub fn start_listener(listener_config: &str) -> anyhow::Result<Self> {
        let port = free_port()?;
        let dir = tempfile::tempdir().context("creating Mosquitto's folder")?;
        let conf = dir.path().join("mosquitto.conf");
        // TESTKIT_MOSQUITTO_LOG=all shows every packet when a test needs looking into.
        let log_types = std::env::var("TESTKIT_MOSQUITTO_LOG")
            .map(|types| format!("log_type {types}\n"))
            .unwrap_or_else(|_| "log_type error\nlog_type warning\n".to_owned());
        // `user root`: started as root, Mosquitto would drop to its own user and then
        // fail to read files the test gave it in private folders (an ACL, say).
        // `max_queued_messages`: a test that floods a host reads its thousands of answers
        // through one client; Mosquitto's default queue of 1000 would drop some.
        std::fs::write(
            &conf,
            format!(
                "user root\nmax_queued_messages 100000\nper_listener_settings false\nset_tcp_nodelay true\npersistence false\n\
                 log_dest stderr\n{log_types}listener {port} 127.0.0.1\n{listener_config}\n"
            ),
        )?;
        Self::spawn(vec![port], dir)
    }

    /// Starts Mosquitto with `config` as its whole configuration, listeners included,
    /// but for testkit's own lines (run as root, log to stderr, no persistence): for a
    /// test of a configuration file as documented. `ports` are the ports its
    /// `listener` lines use (from [`free_port`]); each is waited for, and the first is
    /// the one [`Mosquitto::url`] names.
    ///
    /// # Errors
    /// When Mosquitto is not installed or does not start listening on every port.
    pub fn start_config(ports: &[u16], config: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(!ports.is_empty(), "Mosquitto needs a listener");
        let dir = tempfile::tempdir().context("creating Mosquitto's folder")?;
        let log_types = std::env::var("TESTKIT_MOSQUITTO_LOG")
            .map(|types| format!("log_type {types}\n"))
            .unwrap_or_else(|_| "log_type error\nlog_type warning\n".to_owned());
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!("user root\npersistence false\nlog_dest stderr\n{log_types}{config}\n"),
        )?;
        Self::spawn(ports.to_vec(), dir)
    }

    fn spawn(ports: Vec<u16>, dir: TempDir) -> anyhow::Result<Self> {
        let child = launch(&ports, dir.path())?;
        Ok(Self { child, ports, dir })
    }

    /// Kills the broker and starts it again on the same port and configuration.
    ///
    /// # Errors
    /// When it does not come back.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.child.kill().ok();
        self.child.wait().ok();
        self.child = launch(&self.ports, self.dir.path())?;
        Ok(())
    }

    /// The broker's URL (its first listener's).
    pub fn url(&self) -> BrokerUrl {
        BrokerUrl::tcp("127.0.0.1", self.ports[0])
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Runs Mosquitto with the configuration in `dir` and waits until it listens on every
/// one of `ports`.
fn launch(ports: &[u16], dir: &Path) -> anyhow::Result<Child> {
    let binary = mosquitto_binary()?;
    let mut child = Command::new(&binary)
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    for port in ports {
        if let Err(e) = client::wait_listening(
            std::net::SocketAddr::from(([127, 0, 0, 1], *port)),
            Duration::from_secs(10),
        ) {
            let exited = child.try_wait().ok().flatten();
            child.kill().ok();
            child.wait().ok();
            bail!("Mosquitto did not start (exit status {exited:?}): {e}");
        }
    }
    Ok(child)
}

/// Where Mosquitto is: `$MOSQUITTO`, else `mosquitto` on the PATH, else Debian's
/// `/usr/sbin/mosquitto`.
fn mosquitto_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("MOSQUITTO") {
        return Ok(path.into());
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("mosquitto"))
        .find(|path| path.is_file());
    let debian = PathBuf::from("/usr/sbin/mosquitto");
    on_path
        .or_else(|| debian.is_file().then_some(debian))
        .context("Mosquitto is not installed: `apt-get install -y mosquitto` (cargo xtask test installs it)")
}

/// An edge-host running in this process, stopped through its injected shutdown.
pub struct TestHost {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<edge_host::RunReport>>,
    /// The device id it serves.
    pub device_id: String,
    /// The broker it is connected to.
    pub broker: BrokerUrl,
}

/// A host configuration for tests: `device_id` serving `handlers` through `broker`.
pub fn host_config(device_id: &str, handlers: &Path, broker: BrokerUrl) -> edge_host::Config {
    edge_host::Config {
        device_id: device_id.to_owned(),
        handlers: handlers.to_owned(),
        broker: Some(broker),
        // Tests compile afresh unless they test the cache, with a folder of their own.
        cache: false,
        ..edge_host::Config::default()
    }
}

impl TestHost {
    /// Starts a host and waits until it is online (subscribed, presence published).
    /// With no broker in `config`, the host starts its embedded broker.
    ///
    /// # Errors
    /// When the host fails to start or is not online within 30 s.
    pub async fn start(config: edge_host::Config) -> anyhow::Result<Self> {
        Self::start_within(config, Duration::from_secs(30)).await
    }

    /// Like [`TestHost::start`], waiting up to `timeout`: for handlers that take long
    /// to compile (a 12-18 MB Python or JavaScript component takes seconds, more on a
    /// busy machine).
    ///
    /// # Errors
    /// When the host fails to start or is not online within `timeout`.
    pub async fn start_within(
        config: edge_host::Config,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let broker = match &config.broker {
            Some(url) => url.clone(),
            None => BrokerUrl::tcp(config.listen.ip().to_string(), config.listen.port()),
        };
        let device_id = config.device_id.clone();
        // Presence is read with the host's own TLS files and credentials, so that a host
        // on a TLS-only or ACL-guarded broker is seen coming online too.
        let security = config.security()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(edge_host::run(config, async {
            rx.await.ok();
        }));
        let online = tokio::select! {
            online = presence_with(&broker, &security, &device_id, true, timeout) => online,
            ended = wait_task(&task) => Err(anyhow::anyhow!("the host stopped while starting: {ended:?}")),
        };
        let host = Self {
            shutdown: Some(tx),
            task,
            device_id,
            broker,
        };
        online?;
        Ok(host)
    }

    /// Shuts the host down cleanly, waits until it has, and returns its report.
    ///
    /// # Errors
    /// When the host ended with an error.
    pub async fn stop(mut self) -> anyhow::Result<edge_host::RunReport> {
        if let Some(tx) = self.shutdown.take() {
            tx.send(()).ok();
        }
        (&mut self.task).await.context("the host task panicked")?
    }
}

async fn wait_task<T>(task: &tokio::task::JoinHandle<T>) -> &'static str {
    while !task.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    "ended"
}

/// Waits until `device_id`'s retained presence says `online`, as a caller would see it.
///
/// # Errors
/// When the broker cannot be reached or the presence does not match within `timeout`.
pub async fn presence(
    broker: &BrokerUrl,
    device_id: &str,
    online: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    presence_with(broker, &Security::default(), device_id, online, timeout).await
}

/// Like [`presence`], connecting with `security` (TLS files, credentials).
///
/// # Errors
/// When the broker cannot be reached or the presence does not match within `timeout`.
pub async fn presence_with(
    broker: &BrokerUrl,
    security: &Security,
    device_id: &str,
    online: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let topic = Namespace::for_device(device_id)?.presence_topic();
    let client_id = format!("testkit-presence-{}-{}", std::process::id(), free_port()?);
    let options = client::options(&client_id, broker, security, Duration::from_secs(5))?;
    let (client, mut eventloop) = client::start(options, 10, client::CONNECT_TIMEOUT);
    let wait = async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    client.subscribe(&topic, rumqttc::QoS::AtLeastOnce).await?;
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) if p.topic == topic => {
                    let seen: Presence = serde_json::from_slice(&p.payload)?;
                    if seen.online == online {
                        return anyhow::Ok(());
                    }
                }
                Ok(_) => {}
                // The broker or host may still be starting: try again shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    let result = tokio::time::timeout(timeout, wait).await.with_context(|| {
        format!(
            "{device_id} not {} within {timeout:?}",
            if online { "online" } else { "offline" }
        )
    })?;
    client.disconnect().await.ok();
    result
}

/// A plain MQTT client for tests that speak the wire protocol directly: publish any
/// topic and payload, and read what arrives on the subscribed filters.
pub struct RawClient {
    client: rumqttc::AsyncClient,
    messages: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    subscribed: tokio::sync::mpsc::UnboundedReceiver<()>,
    connections: Arc<AtomicUsize>,
}

/// How a [`RawClient`] connects, beyond the broker's address.
#[derive(Debug, Clone, Default)]
pub struct RawOptions {
    /// The client id to ask for; none makes a unique one.
    pub client_id: Option<String>,
    /// TLS files and credentials.
    pub security: Security,
}

impl RawClient {
    /// Connects to `broker` and subscribes to `filters` (QoS 1), waiting for the
    /// broker's acknowledgement.
    ///
    /// # Errors
    /// When the broker cannot be reached or does not acknowledge within 10 s.
    pub async fn connect(broker: &BrokerUrl, filters: &[String]) -> anyhow::Result<Self> {
        Self::connect_as(broker, filters, None).await
    }

    /// Like [`RawClient::connect`], logged in as `login` (username, password).
    ///
    /// # Errors
    /// When the broker cannot be reached or does not acknowledge within 10 s.
    pub async fn connect_as(
        broker: &BrokerUrl,
        filters: &[String],
        login: Option<(&str, &str)>,
    ) -> anyhow::Result<Self> {
        let security = Security {
            username: login.map(|(username, _)| username.to_owned()),
            password: login.map(|(_, password)| password.to_owned()),
            ..Security::default()
        };
        let options = RawOptions {
            client_id: None,
            security,
        };
        Self::connect_with(broker, filters, &options).await
    }

    /// Like [`RawClient::connect`], with a chosen client id, TLS and credentials.
    /// Returns once the broker accepted the connection (CONNACK) and every
    /// subscription; a connection the broker refuses (CONNACK with an error code) is
    /// an error at once, one it does not answer is retried for up to 10 s.
    ///
    /// # Errors
    /// When the broker cannot be reached, refuses the connection, or does not
    /// acknowledge within 10 s.
    pub async fn connect_with(
        broker: &BrokerUrl,
        filters: &[String],
        raw: &RawOptions,
    ) -> anyhow::Result<Self> {
        let client_id = match &raw.client_id {
            Some(id) => id.clone(),
            None => format!("testkit-raw-{}-{}", std::process::id(), free_port()?),
        };
        let mut options =
            client::options(&client_id, broker, &raw.security, Duration::from_secs(5))?;
        // Larger than the host's limit, to send it what it must refuse.
        options.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = client::start(options, 100, client::CONNECT_TIMEOUT);
        let (tx, messages) = tokio::sync::mpsc::unbounded_channel();
        let (acked, subscribed) = tokio::sync::mpsc::unbounded_channel();
        let (connected, first) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            let mut connected = Some(connected);
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        counted.fetch_add(1, Ordering::SeqCst);
                        if let Some(connected) = connected.take() {
                            connected.send(Ok(())).ok();
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if tx.send((p.topic, p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        acked.send(()).ok();
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Err(error @ rumqttc::ConnectionError::ConnectionRefused(_))
                        if connected.is_some() =>
                    {
                        // Refused before ever connecting: say why, and stop trying.
                        if let Some(connected) = connected.take() {
                            connected.send(Err(error.to_string())).ok();
                        }
                        return;
                    }
                    // The broker may still be starting, or was restarted: try again.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), first).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(why))) => bail!("the broker refused the connection: {why}"),
            Ok(Err(_)) => bail!("the client's task ended before connecting"),
            Err(_) => bail!("no CONNACK within 10 s"),
        }
        let mut raw = Self {
            client,
            messages,
            subscribed,
            connections,
        };
        for filter in filters {
            raw.client
                .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await?;
            tokio::time::timeout(Duration::from_secs(10), raw.subscribed.recv())
                .await
                .with_context(|| format!("no SUBACK for {filter}"))?;
        }
        Ok(raw)
    }

    /// How many times the broker accepted this client's connection: more than one
    /// means it lost a connection and made another.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Publishes `payload` on `topic` at QoS 0, as callers send requests.
    ///
    /// # Errors
    /// When the client's queue is closed.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) -> anyhow::Result<()> {
        self.client
            .publish(topic, rumqttc::QoS::AtMostOnce, false, payload)
            .await?;
        Ok(())
    }

    /// Publishes `payload` on `topic` at QoS 1, retained, as devices publish presence.
    ///
    /// # Errors
    /// When the client's queue is closed.
    pub async fn publish_retained(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
    ) -> anyhow::Result<()> {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)
            .await?;
        Ok(())
    }

    /// The next message whose topic satisfies `wanted`, skipping others, within
    /// `timeout`.
    ///
    /// # Errors
    /// When none arrives in time.
    pub async fn next_where(
        &mut self,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> anyhow::Result<(String, Vec<u8>)> {
        tokio::time::timeout(timeout, async {
            while let Some((topic, payload)) = self.messages.recv().await {
                if wanted(&topic) {
                    return Some((topic, payload));
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .with_context(|| format!("no matching message within {timeout:?}"))
    }
}

/// What became of a message [`publish_once`] sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The broker acknowledged it (PUBACK).
    Acknowledged,
    /// The broker closed the connection instead, for this reason.
    Disconnected(String),
}

/// Connects to `broker` with `security`, publishes one message at QoS 1 (packets of up
/// to 4 MiB allowed), and says whether the broker acknowledged it or cut the
/// connection; then disconnects.
///
/// # Errors
/// When the broker cannot be reached or refuses the connection, or nothing happens
/// within 10 s.
pub async fn publish_once(
    broker: &BrokerUrl,
    security: &Security,
    topic: &str,
    payload: Vec<u8>,
    retain: bool,
) -> anyhow::Result<Delivery> {
    let client_id = format!("testkit-once-{}-{}", std::process::id(), free_port()?);
    let mut options = client::options(&client_id, broker, security, Duration::from_secs(5))?;
    options.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut eventloop) = client::start(options, 10, client::CONNECT_TIMEOUT);
    let run = async {
        let mut published = false;
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) if !published => {
                    published = true;
                    client
                        .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload.clone())
                        .await?;
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    return anyhow::Ok(Delivery::Acknowledged);
                }
                Ok(_) => {}
                Err(error) if published => return Ok(Delivery::Disconnected(error.to_string())),
                Err(error) => bail!("could not connect: {error}"),
            }
        }
    };
    let delivery = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .context("neither acknowledged nor disconnected within 10 s")??;
    client.disconnect().await.ok();
    Ok(delivery)
}

/// A caller that speaks the wire protocol with a plain MQTT client, for tests that
/// send what edge-invoker never would (bad topics, non-JSON payloads, raw properties).
pub struct WireCaller {
    client: RawClient,
    namespace: Namespace,
    next_id: u64,
}

impl WireCaller {
    /// Connects to `broker` and subscribes to `device_id`'s responses.
    ///
    /// # Errors
    /// When the broker cannot be reached.
    pub async fn connect(broker: &BrokerUrl, device_id: &str) -> anyhow::Result<Self> {
        let namespace = Namespace::for_device(device_id)?;
        let client = RawClient::connect(broker, &[namespace.response_filter()]).await?;
        Ok(Self {
            client,
            namespace,
            next_id: 0,
        })
    }

    /// The device's namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// A request id not used before by this caller.
    pub fn request_id(&mut self) -> String {
        self.next_id += 1;
        format!("w{}", self.next_id)
    }

    /// Calls `method` with `payload` and returns the status and JSON body answered.
    ///
    /// # Errors
    /// When no answer comes within 30 s, or the answer is not JSON.
    pub async fn call(
        &mut self,
        method: &str,
        payload: &[u8],
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let request_id = self.request_id();
        let topic = self.namespace.request_topic(method, &request_id);
        self.call_on(&topic, &request_id, payload).await
    }

    /// Publishes `payload` on `topic` (which must carry `request_id`) and returns the
    /// status and JSON body answered to `request_id`.
    ///
    /// # Errors
    /// When no answer comes within 30 s, or the answer is not JSON.
    pub async fn call_on(
        &mut self,
        topic: &str,
        request_id: &str,
        payload: &[u8],
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        self.client.publish(topic, payload).await?;
        self.answer(request_id).await
    }

    /// Publishes a request without waiting for its answer.
    ///
    /// # Errors
    /// When the client's queue is closed.
    pub async fn send(&self, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
        self.client.publish(topic, payload).await
    }

    /// The status and JSON body answered to `request_id`, within 30 s.
    ///
    /// # Errors
    /// When no answer comes in time, or the answer is not JSON.
    pub async fn answer(&mut self, request_id: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        let namespace = self.namespace.clone();
        let (topic, body) = self
            .client
            .next_where(Duration::from_secs(30), |t| {
                namespace
                    .parse_response(t)
                    .is_some_and(|r| r.request_id == request_id)
            })
            .await
            .with_context(|| format!("no answer to request {request_id}"))?;
        let status = self
            .namespace
            .parse_response(&topic)
            .context("response topic")?
            .status;
        let body = serde_json::from_slice(&body).with_context(|| {
            format!(
                "the answer to {request_id} is not JSON: {}",
                String::from_utf8_lossy(&body)
            )
        })?;
        Ok((status, body))
    }

    /// The next answer to any request: its request id, status and JSON body.
    ///
    /// # Errors
    /// When none comes within `timeout`, or it is not JSON.
    pub async fn any_answer(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<(String, u16, serde_json::Value)> {
        let namespace = self.namespace.clone();
        let (topic, body) = self
            .client
            .next_where(timeout, |t| namespace.parse_response(t).is_some())
            .await?;
        let response = self
            .namespace
            .parse_response(&topic)
            .context("response topic")?;
        Ok((
            response.request_id.to_owned(),
            response.status,
            serde_json::from_slice(&body)?,
        ))
    }
}

/// `device_id`'s method catalog as the broker holds it now (retained).
///
/// # Errors
/// When the broker cannot be reached or holds no catalog for the device.
pub async fn catalog(broker: &BrokerUrl, device_id: &str) -> anyhow::Result<edge_proto::Catalog> {
    let topic = Namespace::for_device(device_id)?.catalog_topic();
    let mut watcher = RawClient::connect(broker, std::slice::from_ref(&topic)).await?;
    let (_, body) = watcher.next_where(Duration::from_secs(5), |_| true).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// Polls `device_id`'s catalog until `check` holds for it, for at most 20 s.
///
/// # Errors
/// When it does not hold in time; the error shows the last catalog.
pub async fn catalog_until(
    broker: &BrokerUrl,
    device_id: &str,
    check: impl Fn(&edge_proto::Catalog) -> bool,
) -> anyhow::Result<edge_proto::Catalog> {
    let started = Instant::now();
    loop {
        let catalog = catalog(broker, device_id).await?;
        if check(&catalog) {
            return Ok(catalog);
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the catalog never got there; last: {catalog:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A certificate authority of the test's own, with a server certificate for
/// 127.0.0.1/localhost and a client certificate, as PEM files in a temporary folder.
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// Generates a CA named `name` and the certificates it signs.
    ///
    /// # Errors
    /// When generating or writing fails.
    pub fn generate(name: &str) -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let dir = tempfile::tempdir()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, name);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        for (file, names) in [
            (
                "server",
                vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            ),
            ("client", vec!["edge-test-client".to_owned()]),
        ] {
            let key = KeyPair::generate()?;
            let cert = CertificateParams::new(names)?.signed_by(&key, &ca)?;
            std::fs::write(dir.path().join(format!("{file}.pem")), cert.pem())?;
            std::fs::write(dir.path().join(format!("{file}.key")), key.serialize_pem())?;
        }
        Ok(Self { dir })
    }

    /// A file of the PKI: `ca.pem`, `server.pem`, `server.key`, `client.pem`,
    /// `client.key`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Mosquitto {
    /// Starts Mosquitto with a TLS listener using `pki`'s server certificate; with
    /// `require_client_cert`, clients must present a certificate the CA signed.
    ///
    /// # Errors
    /// When Mosquitto is not installed or does not start listening.
    pub fn start_tls(pki: &TestPki, require_client_cert: bool) -> anyhow::Result<Self> {
        Self::start_listener(&format!(
            "allow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_client_cert}\n",
            pki.file("ca.pem").display(),
            pki.file("server.pem").display(),
            pki.file("server.key").display(),
        ))
    }
}

/// Polls `check` every 50 ms until it gives a value, and returns it; panics naming
/// `what` if none came within `timeout`. For what a test waits to see happen (a file
/// reloaded, a twin updated), never for how fast it happens.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Python interpreter with the Azure IoT SDKs that the hub's and the invoker's
/// tests run as peers: `EDGE_PYTHON`, else `target/pyenv` (`cargo xtask test` installs
/// it from hub/tests/python/requirements.txt). Fails, never skips, with how to install
/// them when they are missing.
pub fn azure_python() -> PathBuf {
    let python = std::env::var_os("EDGE_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python"),
        PathBuf::from,
    );
    let works = std::process::Command::new(&python)
        .args(["-c", "import azure.iot.device, azure.iot.hub"])
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        works,
        "the Azure IoT SDKs for Python are not installed at {}: run `cargo xtask test`, or \
         point EDGE_PYTHON at an interpreter with hub/tests/python/requirements.txt",
        python.display()
    );
    python
}
