//! The MQTT session under a [`Caller`](super::Caller): how to reach the broker,
//! connecting, and the event-loop task that keeps the session up (reconnects with
//! backoff, subscribes again) and hands every incoming message to the routes.

use std::sync::Weak;
use std::time::Duration;

use edge_proto::BrokerUrl;
use edge_proto::backoff::Backoff;
use edge_proto::transport::Security;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Outgoing, Packet, SubscribeReasonCode,
};
use tracing::{debug, warn};

use super::routes::Shared;
use crate::call::CallError;

/// How long the broker may take to accept the connection (TCP and CONNACK).
pub const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// How many requests (publish, subscribe) may queue for the event loop.
const REQUEST_QUEUE: usize = 256;

/// How long a device no call uses stays subscribed, by default.
pub const IDLE_DEVICE: Duration = Duration::from_secs(600);

/// How to reach the broker, and what the session keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// The broker, `mqtt://host:port` or `mqtts://host:port`.
    pub broker: BrokerUrl,
    /// The MQTT keep-alive interval (at least 1 s).
    pub keep_alive: Duration,
    /// TLS files and credentials.
    pub security: Security,
    /// How long the session stays subscribed to a device (its responses and presence)
    /// after the last call to it ended; a later call subscribes again. Bounds what a
    /// long-lived session (edge-hub's) holds for a fleet it calls.
    pub idle_device: Duration,
    /// How to reach a broker that runs in this process without a socket (edge-broker's
    /// `Link::connector`); `broker` still names it in errors.
    pub in_process: Option<rumqttc::Connector>,
}

impl ConnectOptions {
    /// Options for `broker` with a 30 s keep-alive, no TLS unless the URL is
    /// `mqtts://`, and no credentials.
    pub fn new(broker: BrokerUrl) -> Self {
        Self {
            broker,
            keep_alive: Duration::from_secs(30),
            security: Security::default(),
            idle_device: IDLE_DEVICE,
            in_process: None,
        }
    }
}

/// A session the broker accepted, before its event-loop task runs.
pub(super) struct Connected {
    /// The handle that queues requests for the event loop.
    pub(super) client: AsyncClient,
    /// The event loop, to be polled by [`run_eventloop`].
    pub(super) eventloop: EventLoop,
    /// The MQTT client id, `edge-invoker-` and 10 hex digits.
    pub(super) client_id: String,
    /// The broker's URL, for errors.
    pub(super) broker: String,
}

/// Connects to the broker with a fresh client id and a clean session: returns once the
/// broker accepted it (CONNACK).
///
/// # Errors
/// [`CallError::Connect`] naming the broker when it cannot be reached within
/// [`CONNECT_WAIT`] or refuses the connection; the first failure ends the attempt.
pub(super) async fn connect(options: &ConnectOptions) -> Result<Connected, CallError> {
    let client_id = format!("edge-invoker-{:010x}", rand::random::<u64>() >> 24);
    let broker = options.broker.to_string();
    let connect_error = |reason: String| CallError::Connect {
        broker: broker.clone(),
        reason,
    };
    let mut mqtt = edge_proto::client::options(
        &client_id,
        &options.broker,
        &options.security,
        options.keep_alive,
    )
    .map_err(|e| connect_error(e.to_string()))?;
    if let Some(connector) = &options.in_process {
        mqtt.set_transport(rumqttc::Transport::Custom(connector.clone()));
    }
    let (client, mut eventloop) = edge_proto::client::start(mqtt, REQUEST_QUEUE, CONNECT_WAIT);

    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(event) => debug!(?event, "before CONNACK"),
            Err(ConnectionError::NetworkTimeout) => {
                return Err(connect_error(format!(
                    "no answer within {}s",
                    CONNECT_WAIT.as_secs()
                )));
            }
            Err(e) => return Err(connect_error(e.to_string())),
        }
    }
    debug!(%client_id, %broker, "connected");
    Ok(Connected {
        client,
        eventloop,
        client_id,
        broker,
    })
}

/// Polls the event loop until the session ends, routing what arrives. A lost
/// connection does not end it: the task backs off (exponentially, with jitter) and
/// reconnects, then subscribes again to the caller's sync topic and to every device it
/// watches. Calls in flight meanwhile keep waiting, and end with their answer or with
/// 504101 when their response timeout passes.
pub(super) async fn run_eventloop(mut eventloop: EventLoop, shared: Weak<Shared>) {
    let mut backoff = Backoff::default();
    let mut lost = false;
    loop {
        let event = eventloop.poll().await;
        let Some(shared) = shared.upgrade() else {
            return; // every Caller was dropped
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => shared.route(publish),
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                if std::mem::take(&mut lost) {
                    debug!(broker = %shared.broker, "reconnected");
                    shared.resubscribe();
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                    warn!(
                        "the broker at {} refused a subscription; answers or presence may not arrive",
                        shared.broker
                    );
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                shared.close(format!(
                    "the session with the broker at {} was closed",
                    shared.broker
                ));
                return;
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                lost = true;
                let delay = backoff.next_delay();
                warn!(broker = %shared.broker, error = %e, retry_in_ms = delay.as_millis(), "lost the connection to the broker; reconnecting");
                drop(shared);
                tokio::time::sleep(delay).await;
            }
        }
    }
}
