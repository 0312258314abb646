//! The MQTT session: connects, subscribes to the device's request topic, announces the
//! method catalog, hands each request to the dispatcher on a task of its own, and
//! publishes the answers.
//!
//! It speaks one of two dialects ([`Link`]): the backend protocol on a broker (requests
//! under the device's namespace; presence and catalog retained, with a will), or IoT
//! Hub's device protocol (bare `$iothub/...` topics, the catalog as the twin's reported
//! properties, nothing retained, and a SAS token renewed before it expires).
//!
//! The poll loop never waits on a handler: it only parses topics and spawns. A lost
//! connection is retried with exponential backoff and jitter; every new connection
//! subscribes again and announces the catalog again.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use edge_proto::backoff::Backoff;
use edge_proto::client::{CONNECT_TIMEOUT, MAX_PACKET};
use edge_proto::iothub::{DeviceEndpoint, EndpointError, unix_now};
use edge_proto::{BrokerUrl, Namespace, Presence};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions,
    Packet, QoS, Request,
};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::call::CallError;
use crate::dispatch::{CallGuard, Dispatcher};
use crate::registry::Registry;

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

/// How long the session may go without a packet before pinging.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// The longest a token is renewed ahead of its expiry; a short-lived one is renewed
/// when four fifths of its life have passed.
const RENEW_AHEAD: Duration = Duration::from_secs(120);

/// How long a renewal waits for the hub to confirm that it stopped sending requests
/// (UNSUBACK) before reconnecting anyway.
const RENEW_DRAIN: Duration = Duration::from_secs(5);

/// IoT Hub's twin topics: responses to the device's twin requests, and the reported
/// properties patch (followed by the request id).
const TWIN_RESPONSES: &str = "$iothub/twin/res/#";
const TWIN_RESPONSE_PREFIX: &str = "$iothub/twin/res/";
const TWIN_REPORTED: &str = "$iothub/twin/PATCH/properties/reported/?$rid=";

/// What the session needs to know about the device and where it connects.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Where to connect, and the dialect to speak there.
    pub link: Link,
    /// Requests taken and not yet answered (running, or with their answer waiting to be
    /// queued) that the session holds at most; past it, a request is answered 503 at
    /// once, so a flood while answers drain slowly cannot grow memory without bound.
    pub max_pending: usize,
}

/// Where the session connects, and the dialect it speaks there.
#[derive(Debug, Clone)]
pub enum Link {
    /// The backend protocol on an MQTT broker: requests under the device's namespace,
    /// presence and catalog retained, a will that marks the device offline.
    Broker {
        /// The broker to connect to.
        broker: BrokerUrl,
        /// The device id, which is also the MQTT client id.
        device_id: String,
        /// The device's topic namespace.
        namespace: Namespace,
        /// TLS and credentials.
        security: edge_proto::transport::Security,
        /// How to reach the broker without a socket when it runs in this process (the
        /// embedded broker's `Link`); `broker` then only names it.
        in_process: Option<rumqttc::Connector>,
    },
    /// IoT Hub's device protocol: bare topics, the catalog reported in the twin.
    IotHub(DeviceEndpoint),
}

/// Why the session stopped without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The hub refused credentials that were just made: trying again cannot help.
    #[error(
        "IoT Hub refused the device's {what} ({code:?}): check the connection string's \
         DeviceId and key (or certificate), and that the device is registered and enabled"
    )]
    Refused {
        /// The CONNACK's return code.
        code: ConnectReturnCode,
        /// What was presented.
        what: &'static str,
    },
    /// No token can be made (a ready token that expired, say).
    #[error(transparent)]
    Token(#[from] EndpointError),
}

/// The IoT Hub side of a session: the endpoint, and when its token must be renewed.
struct Hub {
    endpoint: DeviceEndpoint,
    /// When to renew the token (or, while draining, when to stop waiting for the
    /// hub's UNSUBACK); none when the token cannot be renewed here (a ready token, or
    /// X.509).
    renew_at: Option<Instant>,
    /// Whether a renewal unsubscribed from requests and waits for the hub to confirm.
    draining: bool,
    /// Answers taken out of the client for a renewal, sent on the new connection.
    carried: Vec<Request>,
    /// The request id of the next twin request.
    next_rid: u64,
}

impl Hub {
    /// Sets fresh credentials on `options` (a new token when the key can sign one), and
    /// when to renew them.
    fn sign(&mut self, options: &mut MqttOptions) -> Result<(), EndpointError> {
        let (password, expiry) = self.endpoint.password(unix_now())?;
        options.set_credentials(self.endpoint.username(), password);
        self.draining = false;
        self.renew_at = expiry
            .filter(|_| self.endpoint.signs_tokens())
            .map(|expiry| {
                // From the exact time, not the whole second the token was signed in.
                let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(expiry);
                let life = expires
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                Instant::now() + life - (life / 5).min(RENEW_AHEAD)
            });
        Ok(())
    }

    /// What the device presents, for messages.
    fn credential(&self) -> &'static str {
        match self.endpoint.connection.auth {
            edge_proto::iothub::DeviceAuth::SharedAccessKey(_) => {
                "token, just signed with the connection string's key"
            }
            edge_proto::iothub::DeviceAuth::SharedAccessSignature(_) => {
                "connection string's SharedAccessSignature"
            }
            edge_proto::iothub::DeviceAuth::X509 => "client certificate",
        }
    }
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
    /// Set when connected to IoT Hub rather than to a broker.
    hub: Option<Hub>,
}

impl Session {
    /// A session that has not connected yet; [`Session::run`] connects.
    ///
    /// # Errors
    /// When TLS cannot be set up, or no token can be made.
    pub fn new(
        config: SessionConfig,
        dispatcher: Arc<Dispatcher>,
        registry: Arc<Registry>,
    ) -> anyhow::Result<Self> {
        let (options, namespace, hub) = match config.link {
            Link::Broker {
                broker,
                device_id,
                namespace,
                security,
                in_process,
            } => {
                let mut options =
                    edge_proto::client::options(&device_id, &broker, &security, KEEP_ALIVE)
                        .with_context(|| format!("cannot set up the connection to {broker}"))?;
                if let Some(connector) = in_process {
                    options.set_transport(rumqttc::Transport::Custom(connector));
                }
                options.set_last_will(LastWill::new(
                    namespace.presence_topic(),
                    presence_json(false, Some("connection-lost")),
                    QoS::AtLeastOnce,
                    true,
                ));
                (options, namespace, None)
            }
            Link::IotHub(endpoint) => {
                let (mut options, _expiry) =
                    endpoint.options(KEEP_ALIVE, unix_now()).with_context(|| {
                        format!(
                            "cannot set up the connection to IoT Hub {}",
                            endpoint.connection.connect_host()
                        )
                    })?;
                // IoT Hub's topics are bare: the device's namespace is empty.
                let namespace = Namespace::new("", &endpoint.connection.device_id)
                    .context("invalid DeviceId in the connection string")?;
                let mut hub = Hub {
                    endpoint,
                    renew_at: None,
                    draining: false,
                    carried: Vec::new(),
                    next_rid: 1,
                };
                hub.sign(&mut options)?;
                (options, namespace, Some(hub))
            }
        };
        let (client, eventloop) = edge_proto::client::start(options, 1024, CONNECT_TIMEOUT);
        Ok(Self {
            client,
            eventloop,
            namespace: Arc::new(namespace),
            dispatcher,
            registry,
            calls: JoinSet::new(),
            max_pending: config.max_pending,
            owed: VecDeque::new(),
            hub,
        })
    }

    /// Serves until `shutdown` completes, then marks the device offline, answers the
    /// calls in flight (for at most `SHUTDOWN_GRACE`) and disconnects. Connection
    /// failures do not end it: it backs off and reconnects (on IoT Hub with a fresh
    /// token).
    ///
    /// # Errors
    /// Only on IoT Hub: when the hub refuses credentials that were just made, or when
    /// no token can be made any more (a ready token that expired).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), SessionError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Backoff::default();
        let mut changes = self.registry.subscribe();
        let result = loop {
            // Every event can have made room in the client's outgoing queue.
            self.pay_owed();
            let renew_at = self.hub.as_ref().and_then(|hub| hub.renew_at);
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                Some(_) = self.calls.join_next() => {}
                Ok(()) = changes.changed() => self.publish_catalog(),
                () = sleep_until(renew_at) => {
                    if let Err(error) = self.renew() {
                        break Err(error.into());
                    }
                }
                event = self.eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        self.on_connect();
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => self.on_publish(publish),
                    Ok(Event::Incoming(Packet::UnsubAck(_))) if self.hub.as_ref().is_some_and(|hub| hub.draining) => {
                        if let Err(error) = self.reconnect() {
                            break Err(error.into());
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        if let Err(fatal) = self.on_connection_error(&error) {
                            break Err(fatal);
                        }
                        let delay = backoff.next_delay();
                        tracing::warn!(%error, retry_in_ms = delay.as_millis(), "MQTT connection failed");
                        tokio::select! {
                            () = &mut shutdown => break Ok(()),
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                },
            }
        };
        match result {
            Ok(()) => self.shut_down().await,
            // Not connected, and not to be: nothing to drain or to say goodbye to.
            Err(_) => self.calls.abort_all(),
        }
        result
    }

    /// On IoT Hub, a failed connection is retried with a fresh token; a refusal of
    /// credentials that were just made ends the session (retrying would only hammer
    /// the hub), as does a ready token that expired.
    fn on_connection_error(&mut self, error: &ConnectionError) -> Result<(), SessionError> {
        let Some(hub) = &mut self.hub else {
            return Ok(());
        };
        if let ConnectionError::ConnectionRefused(
            code @ (ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword),
        ) = error
        {
            return Err(SessionError::Refused {
                code: *code,
                what: hub.credential(),
            });
        }
        hub.sign(&mut self.eventloop.mqtt_options)?;
        Ok(())
    }

    /// Renews the token before it expires (IoT Hub would then disconnect the device):
    /// first unsubscribes from requests, so that none is sent to a connection about to
    /// close; once the hub confirms (or after [`RENEW_DRAIN`]), [`Session::reconnect`].
    fn renew(&mut self) -> Result<(), EndpointError> {
        let Some(hub) = &mut self.hub else {
            return Ok(());
        };
        if hub.draining {
            tracing::warn!("no UNSUBACK from the hub; reconnecting anyway");
            return self.reconnect();
        }
        hub.draining = true;
        hub.renew_at = Some(Instant::now() + RENEW_DRAIN);
        if let Err(error) = self.client.try_unsubscribe(self.namespace.request_filter()) {
            tracing::warn!(%error, "could not queue the unsubscription; reconnecting at once");
            return self.reconnect();
        }
        Ok(())
    }

    /// Reconnects with a fresh token. Answers not yet acknowledged are carried over to
    /// the new connection: the hub matches answers by request id, whichever connection
    /// brings them.
    fn reconnect(&mut self) -> Result<(), EndpointError> {
        let Some(hub) = &mut self.hub else {
            return Ok(());
        };
        hub.sign(&mut self.eventloop.mqtt_options)?;
        // Drops the connection, and moves what was not yet acknowledged (and what
        // waits in the client's queue) to the event loop's pending list, which a new
        // clean session would clear: keep the answers aside until it is up.
        self.eventloop.clean();
        hub.carried.extend(
            self.eventloop
                .pending
                .drain(..)
                .filter(|request| matches!(request, Request::Publish(_))),
        );
        tracing::info!(
            carried = hub.carried.len(),
            "reconnecting to IoT Hub with a fresh SAS token"
        );
        Ok(())
    }

    /// Publishes the method catalog on every connection and every change: retained on
    /// the broker, or as the twin's reported properties on IoT Hub.
    ///
    /// The registry bounds the catalog well under [`MAX_PACKET`]; should one still not
    /// fit, it is not queued (the client would drop the connection over it, again on
    /// every reconnect): the broker keeps the previous catalog, and the log says why.
    fn publish_catalog(&mut self) {
        let catalog = self.registry.catalog();
        let (topic, payload, retain) = match &mut self.hub {
            None => (
                self.namespace.catalog_topic(),
                serde_json::to_vec(&catalog).unwrap_or_default(),
                true,
            ),
            Some(hub) => {
                let rid = hub.next_rid;
                hub.next_rid += 1;
                (
                    format!("{TWIN_REPORTED}{rid}"),
                    serde_json::to_vec(&catalog.reported_properties()).unwrap_or_default(),
                    false,
                )
            }
        };
        let packet = payload.len() + topic.len() + PUBLISH_OVERHEAD;
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
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        {
            tracing::error!(%error, "could not queue the method catalog");
        }
    }

    /// Subscribes to requests and announces the device, on every connection: presence
    /// and catalog retained on a broker; on IoT Hub, the catalog in the twin, and the
    /// answers carried over a token renewal.
    fn on_connect(&mut self) {
        tracing::info!(request_filter = %self.namespace.request_filter(), "connected");
        if let Some(hub) = &mut self.hub {
            // The new session cleared the event loop's pending list: what a renewal
            // carried over goes out first.
            self.eventloop.pending.extend(hub.carried.drain(..));
            let queued = self
                .client
                .try_subscribe(self.namespace.request_filter(), QoS::AtMostOnce)
                .and_then(|()| self.client.try_subscribe(TWIN_RESPONSES, QoS::AtMostOnce));
            if let Err(error) = queued {
                tracing::error!(%error, "could not queue the subscriptions");
            }
            self.publish_catalog();
            return;
        }
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

    /// An answer of the hub to a twin request: a refused catalog is worth a warning.
    fn on_twin_response(topic: &str) {
        let status = topic
            .strip_prefix(TWIN_RESPONSE_PREFIX)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default();
        if status.starts_with('2') {
            tracing::debug!(%topic, "the hub took the reported catalog");
        } else {
            tracing::warn!(%topic, "the hub refused the reported catalog");
        }
    }

    /// Starts serving one request, or logs why it cannot be answered.
    fn on_publish(&mut self, publish: rumqttc::Publish) {
        if self.hub.is_some() && publish.topic.starts_with(TWIN_RESPONSE_PREFIX) {
            Self::on_twin_response(&publish.topic);
            return;
        }
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
            // The answer is queued: now tear down the call's instance. Not after a
            // yield, though that would put the answer on the socket sooner: the guard
            // holds the call's places in the in-flight bounds, and a session that reads
            // new requests while spent instances wait to be torn down admits more than
            // the bounds (tried: thousands of 503s at 64 in flight, RSS doubled).
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
        let mut queued = self.client.try_unsubscribe(self.namespace.request_filter());
        // IoT Hub knows by itself that the device left; a broker is told.
        if self.hub.is_none() {
            queued = queued.and_then(|()| {
                self.client.try_publish(
                    self.namespace.presence_topic(),
                    QoS::AtLeastOnce,
                    true,
                    presence_json(false, Some("shutdown")),
                )
            });
        }
        if let Err(error) = queued {
            tracing::warn!(%error, "could not queue the unsubscription and offline presence");
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

/// Completes at `at`, or never.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
