//! What the hub's tests share: a hub running in-process on a Mosquitto backend, a raw
//! MQTT device client (TLS, SAS), a small HTTPS client for the service API, and the
//! Python SDKs' interpreter.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use edge_hub::{Config, Hub};
use edge_proto::BrokerUrl;
use edge_proto::iothub::{sign, unix_now};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet,
    TlsConfiguration, Transport,
};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;

/// A hub in this process, on its own data folder, with a Mosquitto backend.
pub struct TestHub {
    pub hub: Hub,
    pub data: TempDir,
    pub config: Config,
    pub mosquitto: Option<testkit::Mosquitto>,
}

impl TestHub {
    /// A hub on free loopback ports with a fresh Mosquitto behind it.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(None, None).await
    }

    /// A hub with devices on `mqtts` (a free port if none) and `broker` as backend (a
    /// fresh Mosquitto if none).
    pub async fn start_on(
        mqtts: Option<SocketAddr>,
        broker: Option<BrokerUrl>,
    ) -> anyhow::Result<Self> {
        Self::start_with(mqtts, broker, None).await
    }

    /// As [`TestHub::start_on`], sharing `data` (the registry) if given.
    pub async fn start_with(
        mqtts: Option<SocketAddr>,
        broker: Option<BrokerUrl>,
        data_dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        Self::start_full(mqtts, None, broker, data_dir).await
    }

    /// As [`TestHub::start_with`], with the service API (and WebSockets) on `https`
    /// (a free port if none).
    pub async fn start_full(
        mqtts: Option<SocketAddr>,
        https: Option<SocketAddr>,
        broker: Option<BrokerUrl>,
        data_dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        testkit::init_logging();
        let (mosquitto, broker) = match broker {
            Some(broker) => (None, broker),
            None => {
                let mosquitto = testkit::Mosquitto::start()?;
                let url = mosquitto.url();
                (Some(mosquitto), url)
            }
        };
        let data = tempfile::tempdir()?;
        let config = Config {
            data_dir: data_dir.map_or_else(|| data.path().to_owned(), Path::to_owned),
            hostname: "localhost".into(),
            mqtts_listen: mqtts.unwrap_or(loopback(testkit::free_port()?)),
            https_listen: https.unwrap_or(loopback(testkit::free_port()?)),
            broker: Some(broker),
            ..Config::default()
        };
        Self::launch(config, data, mosquitto).await
    }

    /// A hub on free loopback ports with its embedded broker on its own event loop,
    /// as `edge-hub` runs by default: call it inside a `LocalSet`, on a current-thread
    /// runtime, and the broker lives as long as the set.
    pub async fn start_embedded() -> anyhow::Result<Self> {
        testkit::init_logging();
        let data = tempfile::tempdir()?;
        let config = Config {
            data_dir: data.path().to_owned(),
            hostname: "localhost".into(),
            mqtts_listen: loopback(testkit::free_port()?),
            https_listen: loopback(testkit::free_port()?),
            broker: None,
            listen: loopback(testkit::free_port()?),
            broker_on_hub_thread: true,
            ..Config::default()
        };
        Self::launch(config, data, None).await
    }

    async fn launch(
        config: Config,
        data: TempDir,
        mosquitto: Option<testkit::Mosquitto>,
    ) -> anyhow::Result<Self> {
        let hub = Hub::start(config.clone()).await?;
        Ok(Self {
            hub,
            data,
            config,
            mosquitto,
        })
    }

    pub fn broker(&self) -> BrokerUrl {
        self.hub.broker.clone()
    }

    /// The CA clients trust.
    pub fn ca(&self) -> PathBuf {
        self.config.data_dir.join("ca.pem")
    }

    /// Registers `id` and returns its primary key.
    pub fn add_device(&self, id: &str) -> String {
        self.hub
            .registry
            .add_device(id, (None, None), None)
            .expect("registers")
            .primary_key
    }

    /// Registers `id` and returns its connection string.
    pub fn device_string(&self, id: &str) -> String {
        let key = self.add_device(id);
        format!("HostName=localhost;DeviceId={id};SharedAccessKey={key}")
    }

    /// The iothubowner connection string.
    pub fn service_string(&self) -> String {
        let key = self
            .hub
            .registry
            .policy("iothubowner")
            .unwrap()
            .unwrap()
            .primary_key;
        format!(
            "HostName=localhost:{};SharedAccessKeyName=iothubowner;SharedAccessKey={key}",
            self.hub.https_addr.port()
        )
    }

    /// The primary key of `policy`.
    pub fn policy_key(&self, policy: &str) -> String {
        self.hub
            .registry
            .policy(policy)
            .unwrap()
            .unwrap()
            .primary_key
    }

    /// A service token for `policy`.
    pub fn service_token(&self, policy: &str) -> String {
        let key = self.policy_key(policy);
        sign(
            &format!("localhost:{}", self.hub.https_addr.port()),
            &key,
            unix_now() + 3600,
            Some(policy),
        )
        .unwrap()
    }

    /// A device token signed with `key`, valid for `lifetime` seconds.
    pub fn device_token(id: &str, key: &str, lifetime: u64) -> String {
        sign(
            &format!("localhost/devices/{id}"),
            key,
            unix_now() + lifetime,
            None,
        )
        .unwrap()
    }

    /// Calls the service API: `method path` with `body`, authorized by iothubowner.
    pub async fn rest(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let token = self.service_token("iothubowner");
        https(
            self.hub.https_addr,
            &self.ca(),
            method,
            path,
            Some(&token),
            body,
            &[],
        )
        .await
    }

    pub async fn stop(self) {
        self.hub.stop().await;
    }
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn client_tls(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read(ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// One HTTPS/1.1 request to `addr` (as host `localhost`), and its status and JSON body
/// (`null` when empty, a string when not JSON).
pub async fn https(
    addr: SocketAddr,
    ca: &Path,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<&serde_json::Value>,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, serde_json::Value)> {
    let connector = tokio_rustls::TlsConnector::from(client_tls(ca)?);
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        addr.port(),
        body.len()
    );
    if let Some(auth) = authorization {
        request.push_str(&format!("Authorization: {auth}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tls.write_all(request.as_bytes()).await?;
    tls.write_all(body.as_bytes()).await?;
    let mut response = Vec::new();
    // The server may close without close_notify once it answered.
    let _ = tokio::time::timeout(Duration::from_secs(60), tls.read_to_end(&mut response)).await?;
    let text = String::from_utf8(response)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP head in {text:?}"))?;
    let status: u16 = head.split(' ').nth(1).context("no status")?.parse()?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    let json = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body))
    };
    Ok((status, json))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// A device connected to the hub with a raw MQTT client (rumqttc over TLS).
pub struct RawDevice {
    pub client: AsyncClient,
    pub eventloop: EventLoop,
}

impl std::fmt::Debug for RawDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawDevice")
    }
}

/// How a raw connection attempt ended.
#[derive(Debug)]
pub enum Attempt {
    Connected(Box<RawDevice>),
    Refused(ConnectReturnCode),
    Failed(String),
}

/// Connects to the hub as `client_id` with `username` and `password`.
pub async fn connect_raw(
    hub: &TestHub,
    client_id: &str,
    username: &str,
    password: &str,
) -> Attempt {
    connect_raw_with(hub, client_id, username, password, None).await
}

/// As [`connect_raw`], presenting `client_auth` (certificate and key, PEM) if given.
pub async fn connect_raw_with(
    hub: &TestHub,
    client_id: &str,
    username: &str,
    password: &str,
    client_auth: Option<(Vec<u8>, Vec<u8>)>,
) -> Attempt {
    let mut options = MqttOptions::new(client_id, "localhost", hub.hub.mqtts_addr.port());
    options
        .set_credentials(username, password)
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true);
    let ca = std::fs::read(hub.ca()).unwrap();
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth,
    }));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match first {
        Ok(Ok(_)) => Attempt::Connected(Box::new(RawDevice { client, eventloop })),
        Ok(Err(ConnectionError::ConnectionRefused(code))) => Attempt::Refused(code),
        Ok(Err(e)) => Attempt::Failed(e.to_string()),
        Err(_) => Attempt::Failed("no CONNACK within 10 s".into()),
    }
}

/// Connects `id` with a token signed by `key`, as IoT Hub's SDKs do.
pub async fn connect_device(hub: &TestHub, id: &str, key: &str) -> anyhow::Result<RawDevice> {
    let token = TestHub::device_token(id, key, 3600);
    match connect_raw(hub, id, &username(id), &token).await {
        Attempt::Connected(device) => Ok(*device),
        other => bail!("device {id} did not connect: {other:?}"),
    }
}

/// Registers `id`, connects it with its key, and subscribes it to method calls: a
/// device callers can reach.
pub async fn method_device(hub: &TestHub, id: &str) -> anyhow::Result<RawDevice> {
    let key = hub.add_device(id);
    connect_for_methods(hub, id, &key).await
}

/// Registered device `id`, with `key`, connected and subscribed to its method
/// requests.
pub async fn connect_for_methods(hub: &TestHub, id: &str, key: &str) -> anyhow::Result<RawDevice> {
    let mut device = connect_device(hub, id, key).await?;
    device.subscribe("$iothub/methods/POST/#").await?;
    Ok(device)
}

pub fn username(id: &str) -> String {
    format!("localhost/{id}/?api-version=2021-04-12&DeviceClientType=test")
}

/// A device change that lets a device connect with the self-signed certificate of
/// thumbprint `sha256` (and no other).
pub fn thumbprints(sha256: String) -> edge_hub::registry::DeviceChange {
    edge_hub::registry::DeviceChange {
        thumbprints: Some(vec![sha256]),
        ..Default::default()
    }
}

impl RawDevice {
    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) -> anyhow::Result<()> {
        self.client
            .subscribe(filter, rumqttc::QoS::AtMostOnce)
            .await?;
        self.until(|p| matches!(p, Packet::SubAck(_))).await?;
        Ok(())
    }

    /// Unsubscribes and waits for the UNSUBACK.
    pub async fn unsubscribe(&mut self, filter: &str) -> anyhow::Result<()> {
        self.client.unsubscribe(filter).await?;
        self.until(|p| matches!(p, Packet::UnsubAck(_))).await?;
        Ok(())
    }

    /// Publishes at QoS 1 and waits for the PUBACK (the event loop sends what was
    /// queued only while polled).
    pub async fn publish_acked(&mut self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await?;
        self.until(|p| matches!(p, Packet::PubAck(_))).await?;
        Ok(())
    }

    /// Polls until a packet matches `want`, for up to 10 s.
    pub async fn until(&mut self, want: impl Fn(&Packet) -> bool) -> anyhow::Result<Packet> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Event::Incoming(packet) = self.eventloop.poll().await?
                    && want(&packet)
                {
                    return anyhow::Ok(packet);
                }
            }
        })
        .await
        .context("nothing matching within 10 s")?
    }

    /// Polls until the hub closes the connection; how long that took.
    pub async fn closed_within(&mut self, limit: Duration) -> anyhow::Result<Duration> {
        let started = std::time::Instant::now();
        tokio::time::timeout(limit, async {
            loop {
                if self.eventloop.poll().await.is_err() {
                    return;
                }
            }
        })
        .await
        .with_context(|| format!("still connected after {limit:?}"))?;
        Ok(started.elapsed())
    }
}

/// A script in `tests/python/`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// Runs `service.py` with `args` against `hub` (with `connection_string`, else the
/// owner's) and returns the JSON it printed.
pub async fn service(hub: &TestHub, args: &[&str]) -> serde_json::Value {
    service_with(hub, &hub.service_string(), args).await
}

pub async fn service_with(
    hub: &TestHub,
    connection_string: &str,
    args: &[&str],
) -> serde_json::Value {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(testkit::azure_python())
            .arg(script("service.py"))
            .args(args)
            .env("EDGE_SERVICE_CONNECTION_STRING", connection_string)
            .env("REQUESTS_CA_BUNDLE", hub.ca())
            .stderr(Stdio::inherit())
            .output(),
    )
    .await
    .expect("service.py finished")
    .unwrap();
    assert!(out.status.success(), "service.py {args:?} failed");
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The SDK service calls `device`, an edge-host serving the example handler
/// device-method: `DeviceMethod` answers 200, an unknown method gets the host's 404.
pub async fn the_sdk_service_calls_device_method(hub: &TestHub, device: &str) {
    let answer = service(
        hub,
        &[
            "invoke",
            device,
            "DeviceMethod",
            r#"{"method_number":"42"}"#,
        ],
    )
    .await;
    assert_eq!(
        answer,
        serde_json::json!({"status":200,"payload":{"Response":"This is the response from the device"}})
    );
    let answer = service(hub, &["invoke", device, "noSuchMethod", "null"]).await;
    assert_eq!(
        answer["status"], 404,
        "the handler host's own 404: {answer}"
    );
}
