//! The MQTT session: connects to the broker, subscribes to the device's request topic,
//! keeps presence and the method catalog (both retained), hands each request to the
//! dispatcher on a task of its own, and publishes the answers.
//!
//! The poll loop never waits on a handler: it only parses topics and spawns. A lost
//! connection is retried with exponential backoff and jitter; every new connection
//! subscribes again and republishes presence and catalog.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use edge_proto::backoff::Backoff;
use edge_proto::{BrokerUrl, Namespace, Presence};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Packet, QoS};
use tokio::task::JoinSet;

use crate::dispatch::{CallError, CallGuard, Dispatcher};
use crate::registry::Registry;

/// The largest MQTT packet taken or sent: a 128 KiB payload and its topic fit with room
/// to spare, so that an oversized request still arrives and is answered 413.
const MAX_PACKET: usize = 1024 * 1024;

/// Refusals the session owes at most while the client's outgoing queue is full: each is
/// a request id and a short error body (about 200 bytes), so a flood of any length costs
/// a few MiB at most. Past it, a refusal is dropped with a warning, as a broker drops
/// QoS 0 requests it cannot deliver.
const OWED_MAX: usize = 32 * 1024;

/// The bytes of a QoS 1 PUBLISH packet besides its topic and payload: the fixed header
/// (1, and up to 4 of remaining length), the topic's length (2) and the packet id (2).
const PUBLISH_OVERHEAD: usize = 9;

/// How long a clean shutdown waits for calls in flight to be answered.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What the session needs to know about the device and the broker.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The broker to connect to.
    pub broker: BrokerUrl,
    /// The device id, which is also the MQTT client id.
    pub device_id: String,
    /// The device's topic namespace.
    pub namespace: Namespace,
    /// TLS and credentials.
    pub security: edge_proto::transport::Security,
    /// Requests taken and not yet answered (running, or with their answer waiting to be
    /// queued) that the session holds at most; past it, a request is answered 503 at
    /// once, so a flood while answers drain slowly cannot grow memory without bound.
    pub max_pending: usize,
}

/// The device's MQTT session.
pub struct Session {
    client: AsyncClient,
    eventloop: EventLoop,
    namespace: Arc<Namespace>,
    dispatcher: Arc<Dispatcher>,
    registry: Arc<Registry>,
    calls: JoinSet<()>,
    max_pending: usize,
    /// Refusals (topic, body) not yet taken by the client's outgoing queue, oldest
    /// first; sent as the queue drains.
    owed: VecDeque<(String, Vec<u8>)>,
}

impl Session {
    /// A session that has not connected yet; [`Session::run`] connects.
    pub fn new(
        config: SessionConfig,
        dispatcher: Arc<Dispatcher>,
        registry: Arc<Registry>,
    ) -> anyhow::Result<Self> {
        let namespace = Arc::new(config.namespace);
        let mut options =
            MqttOptions::new(&config.device_id, &config.broker.host, config.broker.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_last_will(LastWill::new(
                namespace.presence_topic(),
                presence_json(false, Some("connection-lost")),
                QoS::AtLeastOnce,
                true,
            ));
        config
            .security
            .apply(&config.broker, &mut options)
            .with_context(|| format!("cannot set up the connection to {}", config.broker))?;
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let mut network = NetworkOptions::new();
        // Without it, each answer can stall ~40 ms on a delayed ACK (Nagle).
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(5);
        eventloop.set_network_options(network);
        Ok(Self {
            client,
            eventloop,
            namespace,
            dispatcher,
            registry,
            calls: JoinSet::new(),
            max_pending: config.max_pending,
            owed: VecDeque::new(),
        })
    }

    /// Serves until `shutdown` completes, then marks the device offline, answers the
    /// calls in flight (for at most [`SHUTDOWN_GRACE`]) and disconnects. Connection
    /// failures never end it: it backs off and reconnects.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Backoff::default();
        let mut changes = self.registry.subscribe();
        loop {
            // Every event can have made room in the client's outgoing queue.
            self.pay_owed();
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = self.calls.join_next() => {}
                Ok(()) = changes.changed() => self.publish_catalog(),
                event = self.eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        self.on_connect();
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => self.on_publish(publish),
                    Ok(_) => {}
                    Err(error) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(%error, retry_in_ms = delay.as_millis(), "MQTT connection failed");
                        tokio::select! {
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                },
            }
        }
        self.shut_down().await;
    }

    /// Publishes the method catalog, retained: on every connection and every change.
    ///
    /// The registry bounds the catalog well under [`MAX_PACKET`]; should one still not
    /// fit, it is not queued (the client would drop the connection over it, again on
    /// every reconnect): the broker keeps the previous catalog, and the log says why.
    fn publish_catalog(&self) {
        let topic = self.namespace.catalog_topic();
        let catalog = serde_json::to_vec(&self.registry.catalog()).unwrap_or_default();
        let packet = catalog.len() + topic.len() + PUBLISH_OVERHEAD;
        if packet > MAX_PACKET {
            tracing::error!(
                bytes = packet,
                limit = MAX_PACKET,
                "the method catalog is too large for one MQTT packet; the previous one stays"
            );
            return;
        }
        if let Err(error) = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, catalog)
        {
            tracing::error!(%error, "could not queue the method catalog");
        }
    }

    /// Subscribes to requests and publishes presence and catalog, on every connection.
    fn on_connect(&self) {
        tracing::info!(request_filter = %self.namespace.request_filter(), "connected to the broker");
        self.publish_catalog();
        let queued = self
            .client
            .try_subscribe(self.namespace.request_filter(), QoS::AtMostOnce)
            .and_then(|()| {
                self.client.try_publish(
                    self.namespace.presence_topic(),
                    QoS::AtLeastOnce,
                    true,
                    presence_json(true, None),
                )
            });
        if let Err(error) = queued {
            tracing::error!(%error, "could not queue the subscription and presence");
        }
    }

    /// Starts serving one request, or logs why it cannot be answered.
    fn on_publish(&mut self, publish: rumqttc::Publish) {
        let (request_id, call) = match self.namespace.parse_request(&publish.topic) {
            Ok(request) => (
                request.request_id.to_owned(),
                Ok((request.method.to_owned(), request.timeout)),
            ),
            Err(error) => match error.request_id() {
                Some(request_id) => (request_id.to_owned(), Err(error)),
                None => {
                    tracing::warn!(topic = %publish.topic, %error, "ignored a request that cannot be answered");
                    return;
                }
            },
        };
        if self.calls.len() >= self.max_pending {
            let error = CallError::TooManyCalls {
                scope: "host intake".to_owned(),
                limit: self.max_pending,
            };
            tracing::warn!(rid = %request_id, status = error.status(), %error, "refused a request");
            self.owe(&request_id, &error);
            return;
        }
        let dispatcher = Arc::clone(&self.dispatcher);
        let namespace = Arc::clone(&self.namespace);
        let client = self.client.clone();
        self.calls.spawn(async move {
            let (answer, guard) = match call {
                Ok((method, timeout)) => {
                    dispatcher
                        .dispatch(&method, &request_id, timeout, &publish.payload)
                        .await
                }
                Err(error) => {
                    let answer = CallError::InvalidMethod(error.to_string()).answer();
                    tracing::warn!(rid = %request_id, %error, status = answer.status, "refused a request");
                    (answer, CallGuard::default())
                }
            };
            let topic = namespace.response_topic(answer.status, &request_id);
            if let Err(error) = client
                .publish(topic, QoS::AtLeastOnce, false, answer.payload)
                .await
            {
                tracing::error!(rid = %request_id, %error, "could not queue the response");
            }
            // The answer is queued: now tear down the call's instance.
            drop(guard);
        });
    }

    /// Answers a request with `error` without running it, from the poll loop, without
    /// waiting: the refusal is owed until the client's outgoing queue takes it.
    fn owe(&mut self, request_id: &str, error: &CallError) {
        if self.owed.len() >= OWED_MAX {
            tracing::warn!(rid = %request_id, status = error.status(), "refusal dropped: {OWED_MAX} are already waiting for the broker");
            return;
        }
        let answer = error.answer();
        self.owed.push_back((
            self.namespace.response_topic(answer.status, request_id),
            answer.payload,
        ));
        self.pay_owed();
    }

    /// Queues owed refusals, oldest first, until the client's outgoing queue is full.
    fn pay_owed(&mut self) {
        while let Some((topic, payload)) = self.owed.front() {
            if self
                .client
                .try_publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                .is_err()
            {
                return;
            }
            self.owed.pop_front();
        }
    }

    /// Marks the device offline, lets the calls in flight answer, and disconnects.
    async fn shut_down(mut self) {
        tracing::info!(in_flight = self.calls.len(), "shutting down");
        let queued = self
            .client
            .try_unsubscribe(self.namespace.request_filter())
            .and_then(|()| {
                self.client.try_publish(
                    self.namespace.presence_topic(),
                    QoS::AtLeastOnce,
                    true,
                    presence_json(false, Some("shutdown")),
                )
            });
        if let Err(error) = queued {
            tracing::warn!(%error, "could not queue the offline presence");
        }
        let grace = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(grace);
        let mut disconnecting = false;
        loop {
            // Disconnect once every call has answered and the broker acknowledged every
            // answer (and the offline presence): nothing is left to lose.
            self.pay_owed();
            if !disconnecting
                && self.calls.is_empty()
                && self.owed.is_empty()
                && self.eventloop.state.inflight() == 0
            {
                disconnecting = self.client.try_disconnect().is_ok();
            }
            tokio::select! {
                () = &mut grace => {
                    tracing::warn!(abandoned = self.calls.len(), "calls still running at the end of the shutdown grace");
                    break;
                }
                Some(_) = self.calls.join_next() => {}
                event = self.eventloop.poll() => match event {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                        self.wait_for_close().await;
                        break;
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => self.refuse(&publish),
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "connection lost during shutdown");
                        break;
                    }
                },
            }
        }
        self.calls.abort_all();
        tracing::info!("disconnected");
    }

    /// Answers a request that arrived while shutting down: 503, at once.
    fn refuse(&mut self, publish: &rumqttc::Publish) {
        let request_id = match self.namespace.parse_request(&publish.topic) {
            Ok(request) => request.request_id.to_owned(),
            Err(error) => match error.request_id() {
                Some(request_id) => request_id.to_owned(),
                None => return,
            },
        };
        self.owe(&request_id, &CallError::ShuttingDown);
    }

    /// After DISCONNECT, reads until the broker closes the connection (briefly): a
    /// socket closed with unread data (the broker's last acknowledgements) is reset
    /// rather than closed, and the broker may then drop what it had not yet read.
    async fn wait_for_close(&mut self) {
        let closed = async { while self.eventloop.poll().await.is_ok() {} };
        if tokio::time::timeout(Duration::from_secs(2), closed)
            .await
            .is_err()
        {
            tracing::debug!("the broker did not close the connection after DISCONNECT");
        }
    }
}

/// The presence document, as JSON bytes.
fn presence_json(online: bool, reason: Option<&str>) -> Vec<u8> {
    let presence = Presence {
        online,
        // The will is written at connect time: it cannot know when the device dropped.
        since: (reason != Some("connection-lost"))
            .then(|| humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
        reason: reason.map(str::to_owned),
        agent: Some(concat!("edge-host ", env!("CARGO_PKG_VERSION")).to_owned()),
    };
    serde_json::to_vec(&presence).unwrap_or_default()
}
