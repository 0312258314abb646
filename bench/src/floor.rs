//! The floor of the end-to-end benchmark: a raw MQTT responder that answers every
//! request with its own payload and status 200, on the same topics and at the same QoS
//! as edge-host (requests taken at QoS 0, answers sent at QoS 1), with no dispatch and
//! no sandbox. It runs as a process of its own (`edge-bench floor-responder`, started
//! by the benchmark), so that it is measured exactly as the host is.

use std::time::Duration;

use anyhow::Context as _;
use edge_proto::{BrokerUrl, Namespace};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};

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

/// Answers requests until the process is ended (SIGTERM).
///
/// # Errors
/// When the device id is invalid or the client's queue closes.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let namespace = Namespace::for_device(&options.device_id)
        .with_context(|| format!("invalid device id {:?}", options.device_id))?;
    let mut mqtt = MqttOptions::new(
        &options.device_id,
        &options.broker.host,
        options.broker.port,
    );
    mqtt.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(mqtt, QUEUE);
    let mut network = NetworkOptions::new();
    // As edge-host: without it each answer can stall ~40 ms on a delayed ACK.
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
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
                    eprintln!("floor-responder: could not queue an answer: {error}");
                }
            }
            Ok(_) => {}
            Err(error) => {
                eprintln!("floor-responder: {error}; reconnecting");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
