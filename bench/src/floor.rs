//! The floor of the end-to-end benchmark: a raw MQTT responder that answers every
//! request with its own payload and status 200, on the same topics and at the same QoS
//! as edge-host (requests taken at QoS 0, answers sent at QoS 1), with no dispatch and
//! no sandbox. It runs as a process of its own (`edge-bench floor-responder`, started
//! by the benchmark), so that it is measured exactly as the host is.
//!
//! The same responder also runs as a device connected through edge-hub
//! (`edge-bench hub-device`, started by [`crate::hub`]): IoT Hub's dialect, that is
//! MQTT over TLS to the hub, a SAS token, and bare `$iothub/methods/...` topics.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use edge_proto::{BrokerUrl, Namespace, client};
use rumqttc::{Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

/// Answers the client may queue: far more than the calls the benchmark keeps in flight.
const QUEUE: usize = 4096;

/// Options of the floor responder.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// The broker to connect to.
    #[arg(long, value_name = "mqtt://HOST:PORT")]
    broker: BrokerUrl,
    /// The device to answer for (also the MQTT client id, as edge-host uses it).
    #[arg(long)]
    device_id: String,
}

/// Options of the responder as a device connected through edge-hub.
#[derive(Debug, clap::Args)]
pub struct HubDeviceOptions {
    /// The hub's MQTT/TLS port on loopback (its certificate names `localhost`).
    #[arg(long)]
    port: u16,
    /// The hub's CA certificate (PEM).
    #[arg(long, value_name = "FILE")]
    ca_file: PathBuf,
    /// The device id (client id, and the hub's username names it).
    #[arg(long)]
    device_id: String,
    /// The device's SAS token for hub `localhost`.
    #[arg(long)]
    token: String,
}

/// Answers requests on the backend until the process is ended (SIGTERM).
///
/// # Errors
/// When the device id is invalid or the client's queue closes.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let namespace = Namespace::for_device(&options.device_id)
        .with_context(|| format!("invalid device id {:?}", options.device_id))?;
    let mqtt = MqttOptions::new(
        &options.device_id,
        &options.broker.host,
        options.broker.port,
    );
    answer(mqtt, namespace, "floor-responder").await
}

/// Answers requests as a device connected through edge-hub until the process is ended.
///
/// # Errors
/// When the device id is invalid, the CA file cannot be read, or the client's queue
/// closes.
pub async fn run_through_hub(options: HubDeviceOptions) -> anyhow::Result<()> {
    let id = &options.device_id;
    // Through the hub the device speaks the bare topics: an empty namespace.
    let namespace = Namespace::new("", id).with_context(|| format!("invalid device id {id:?}"))?;
    let mut mqtt = MqttOptions::new(id, "localhost", options.port);
    mqtt.set_credentials(
        format!("localhost/{id}/?api-version=2021-04-12"),
        &options.token,
    );
    mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        client_tls(&options.ca_file)?,
    )));
    answer(mqtt, namespace, "hub-device").await
}

/// A TLS client configuration that trusts the CA certificates in `ca_file`.
///
/// # Errors
/// When the file cannot be read or holds no certificate.
pub fn client_tls(ca_file: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read(ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(cert.with_context(|| format!("{} is not PEM", ca_file.display()))?)
            .with_context(|| format!("a certificate in {}", ca_file.display()))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "{} holds no certificate",
        ca_file.display()
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Connects with `mqtt` and answers every request under `namespace` with its payload.
async fn answer(mut mqtt: MqttOptions, namespace: Namespace, who: &str) -> anyhow::Result<()> {
    mqtt.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(client::MAX_PACKET, client::MAX_PACKET);
    // TCP_NODELAY, as edge-host: without it each answer can stall ~40 ms on a delayed ACK.
    let (client, mut eventloop) = client::start(mqtt, QUEUE, client::CONNECT_TIMEOUT);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => client
                .try_subscribe(namespace.request_filter(), QoS::AtMostOnce)
                .context("subscribing to requests")?,
            Ok(Event::Incoming(Packet::Publish(request))) => {
                let Ok(topic) = namespace.parse_request(&request.topic) else {
                    continue;
                };
                let answer = namespace.response_topic(200, topic.request_id);
                if let Err(error) =
                    client.try_publish(answer, QoS::AtLeastOnce, false, request.payload)
                {
                    eprintln!("{who}: could not queue an answer: {error}");
                }
            }
            Ok(_) => {}
            Err(error) => {
                eprintln!("{who}: {error}; reconnecting");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
