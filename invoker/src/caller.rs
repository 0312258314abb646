//! [`Caller`]: one MQTT session to the broker, shared by any number of concurrent calls.
//!
//! A spawned task polls the event loop and routes what arrives: a response to the call
//! waiting for its request id (in its namespace), a presence update to the device's
//! watchers, the echo of a sync message to the call waiting on that barrier. The task
//! never blocks and never holds a lock across an `.await`; calls hold none either.
//!
//! Before the first call to a device the caller subscribes to the device's responses
//! and presence, then publishes a token to its own private topic and waits for the echo.
//! The broker handles one connection's packets in order, so once the echo is back the
//! SUBSCRIBE took effect and a retained presence, if any, has been delivered: the
//! caller knows whether the device is online, offline, or publishes no presence. The
//! echo goes at QoS 1, as the presence is delivered: a broker that has QoS 1 messages
//! queued behind its in-flight window still sends QoS 0 ones at once, so a QoS 0 echo
//! could overtake the presence.
//!
//! Reading what the broker holds (retained presence and catalogs, of one device or of
//! every device under a wildcard) uses the same barrier: subscribe, sync, and what has
//! arrived by then is everything the broker held. Those subscriptions are QoS 0, so
//! that a broker never queues (and, past its queue limit, drops) a large fleet's
//! retained messages behind its QoS 1 in-flight window; the QoS 1 echo comes after
//! them all the same, since a broker sends one connection's packets in order.
//!
//! A lost connection does not end the session: the event-loop task reconnects with
//! backoff and subscribes again; calls in flight keep waiting for their answer or
//! their response timeout (504101), as a call through IoT Hub would.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use edge_proto::backoff::Backoff;
use edge_proto::transport::Security;
use edge_proto::{BrokerUrl, Namespace, Presence};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet,
    Publish, QoS, SubscribeReasonCode,
};
use tokio::sync::{OnceCell, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::call::{CallError, CallRequest, MethodResponse};

/// How long the broker may take to accept the connection (TCP and CONNACK).
pub const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// The time left for a device's answer to reach the caller: the device is asked to end
/// the handler this long before the response timeout (at most a tenth of it).
const ANSWER_TRANSIT: Duration = Duration::from_millis(250);

/// How long the broker may take to echo a sync message before the session is deemed
/// broken (for example an ACL that forbids the caller's private topic).
const SYNC_WAIT: Duration = Duration::from_secs(10);

/// The largest MQTT packet sent or received: a 128 KiB payload with its topic fits
/// with room to spare.
const MAX_PACKET: usize = 1024 * 1024;

/// How many requests (publish, subscribe) may queue for the event loop.
const REQUEST_QUEUE: usize = 256;

/// How to reach the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// The broker, `mqtt://host:port` or `mqtts://host:port`.
    pub broker: BrokerUrl,
    /// The MQTT keep-alive interval (at least 1 s).
    pub keep_alive: Duration,
    /// TLS files and credentials.
    pub security: Security,
}

impl ConnectOptions {
    /// Options for `broker` with a 30 s keep-alive, no TLS unless the URL is
    /// `mqtts://`, and no credentials.
    pub fn new(broker: BrokerUrl) -> Self {
        Self {
            broker,
            keep_alive: Duration::from_secs(30),
            security: Security::default(),
        }
    }
}

/// An MQTT session that calls methods. Clones share the session; calls on it may run
/// concurrently. The session ends with [`Caller::disconnect`], or when the last clone
/// is dropped.
#[derive(Clone)]
pub struct Caller {
    shared: Arc<Shared>,
}

/// What the caller's clones and its event-loop task share.
struct Shared {
    client: AsyncClient,
    client_id: String,
    /// The caller's private topic, for sync messages (barriers).
    sync_topic: String,
    broker: String,
    routes: Mutex<Routes>,
    /// The event-loop task, taken by [`Caller::disconnect`].
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Who waits for what: filled by calls, emptied by the event-loop task.
#[derive(Default)]
struct Routes {
    /// Calls waiting for a response, by request id.
    pending: HashMap<String, Pending>,
    /// Barriers waiting for their echo, by token.
    barriers: HashMap<String, oneshot::Sender<()>>,
    /// Devices subscribed to, by presence topic.
    devices: HashMap<String, Arc<Device>>,
    /// Reads of retained messages in progress, by token.
    snapshots: HashMap<String, Snapshot>,
    /// Why the session ended, once it has.
    closed: Option<String>,
}

/// A call waiting for its response.
struct Pending {
    /// The namespace prefix the response must come under.
    prefix: String,
    /// Where the response goes.
    answer: oneshot::Sender<Answer>,
}

/// A response routed to its call.
struct Answer {
    status: u16,
    publish: Publish,
}

/// A read of what the broker holds on some filters ([`Caller::retained`]).
struct Snapshot {
    /// The filters subscribed to.
    filters: Vec<String>,
    /// The last payload seen on each topic.
    messages: BTreeMap<String, Vec<u8>>,
}

/// A device the caller subscribed to.
struct Device {
    /// Its response and presence filters, to subscribe to again after a reconnection.
    filters: [String; 2],
    /// The last presence seen; `None` while the device has published none.
    presence: watch::Sender<Option<Presence>>,
    /// Set once the subscriptions took effect (the sync echo came back).
    subscribed: OnceCell<()>,
}

impl Caller {
    /// Connects to the broker and starts the session: returns once the broker accepted
    /// it (CONNACK).
    ///
    /// # Errors
    /// [`CallError::Connect`] naming the broker when it cannot be reached within
    /// [`CONNECT_WAIT`] or refuses the connection; the first failure ends the attempt.
    pub async fn connect(options: ConnectOptions) -> Result<Self, CallError> {
        let client_id = format!("edge-invoker-{:010x}", rand::random::<u64>() >> 24);
        let broker = options.broker.to_string();
        let host = if options.broker.host.contains(':') {
            format!("[{}]", options.broker.host)
        } else {
            options.broker.host.clone()
        };
        let mut mqtt = MqttOptions::new(client_id.clone(), host, options.broker.port);
        mqtt.set_clean_session(true)
            .set_keep_alive(options.keep_alive.max(Duration::from_secs(1)))
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        options
            .security
            .apply(&options.broker, &mut mqtt)
            .map_err(|e| CallError::Connect {
                broker: broker.clone(),
                reason: e.to_string(),
            })?;
        let (client, mut eventloop) = AsyncClient::new(mqtt, REQUEST_QUEUE);
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(CONNECT_WAIT.as_secs());
        eventloop.set_network_options(network);

        let connect_error = |broker: &str, reason: String| CallError::Connect {
            broker: broker.to_owned(),
            reason,
        };
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(event) => debug!(?event, "before CONNACK"),
                Err(ConnectionError::NetworkTimeout) => {
                    return Err(connect_error(
                        &broker,
                        format!("no answer within {}s", CONNECT_WAIT.as_secs()),
                    ));
                }
                Err(e) => return Err(connect_error(&broker, e.to_string())),
            }
        }
        debug!(%client_id, %broker, "connected");

        let sync_topic = format!("edge-invoker/{client_id}/sync");
        let shared = Arc::new(Shared {
            client,
            client_id,
            sync_topic,
            broker,
            routes: Mutex::new(Routes::default()),
            task: Mutex::new(None),
        });
        // The task holds only a weak reference, so that dropping the last Caller ends it.
        let task = tokio::spawn(run_eventloop(eventloop, Arc::downgrade(&shared)));
        *lock(&shared.task) = Some(task);
        shared
            .client
            .subscribe(shared.sync_topic.clone(), QoS::AtLeastOnce)
            .await
            .map_err(|e| connect_error(&shared.broker, e.to_string()))?;
        Ok(Self { shared })
    }

    /// The MQTT client id of this session, `edge-invoker-` and 10 hex digits.
    pub fn client_id(&self) -> &str {
        &self.shared.client_id
    }

    /// Calls a method and waits for the device's answer, as IoT Hub's service API does:
    /// a device whose presence says offline fails at once with 404103 unless it comes
    /// online within the connect timeout; a device that publishes no presence is called
    /// anyway. The request goes at QoS 0, so it is never held for a device that
    /// reconnects later.
    ///
    /// # Errors
    /// [`CallError::Argument`] (nothing sent), [`CallError::NotOnline`],
    /// [`CallError::Timeout`], or [`CallError::Broker`] when the session ended.
    pub async fn call(&self, request: &CallRequest) -> Result<MethodResponse, CallError> {
        let checked = request.check()?;
        let namespace = checked.namespace;
        let presence = self.watch_device(&namespace).await?;
        self.wait_online(presence, request).await?;

        let request_id = format!("{:016x}", rand::random::<u64>());
        let (answer_tx, answer_rx) = oneshot::channel();
        self.shared.routes(|routes| {
            routes.pending.insert(
                request_id.clone(),
                Pending {
                    prefix: namespace.prefix().to_owned(),
                    answer: answer_tx,
                },
            );
        })?;
        // Removes the entry however this call ends: answered, timed out or cancelled.
        let _pending = PendingGuard {
            shared: &self.shared,
            request_id: &request_id,
        };
        // The device ends the handler in time to answer before this call gives up,
        // leaving the answer this long to travel back.
        let budget = request.response_timeout - ANSWER_TRANSIT.min(request.response_timeout / 10);
        let topic = namespace.request_topic_with_timeout(&request.method, &request_id, budget);
        debug!(%topic, "request");
        self.shared
            .client
            .publish(
                topic,
                QoS::AtMostOnce,
                false,
                checked.payload.as_bytes().to_vec(),
            )
            .await
            .map_err(|e| self.shared.broker_error(e))?;

        match tokio::time::timeout(request.response_timeout, answer_rx).await {
            Ok(Ok(answer)) => Ok(MethodResponse::from_wire(
                answer.status,
                &answer.publish.payload,
            )),
            Ok(Err(_)) => Err(self.shared.closed_error()),
            Err(_) => Err(CallError::Timeout {
                device: request.device.clone(),
                method: request.method.clone(),
                after: request.response_timeout,
            }),
        }
    }

    /// Ends the session cleanly (MQTT DISCONNECT) and waits, briefly, for the event loop
    /// to send it. Calls still in flight on clones fail with [`CallError::Broker`].
    pub async fn disconnect(&self) {
        if let Err(e) = self.shared.client.disconnect().await {
            debug!(error = %e, "disconnect: event loop already gone");
        }
        let Some(task) = lock(&self.shared.task).take() else {
            return;
        };
        if tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .is_err()
        {
            warn!("the broker did not take the DISCONNECT within 2s");
        }
    }

    /// The device's presence, subscribed to with its responses: subscribes and syncs
    /// the first time, and waits for a concurrent first time to finish. The receiver
    /// fails once the session ends.
    async fn watch_device(
        &self,
        namespace: &Namespace,
    ) -> Result<watch::Receiver<Option<Presence>>, CallError> {
        let presence_topic = namespace.presence_topic();
        let device = self.shared.routes(|routes| {
            Arc::clone(
                routes
                    .devices
                    .entry(presence_topic.clone())
                    .or_insert_with(|| {
                        Arc::new(Device {
                            filters: [namespace.response_filter(), presence_topic.clone()],
                            presence: watch::Sender::new(None),
                            subscribed: OnceCell::new(),
                        })
                    }),
            )
        })?;
        device
            .subscribed
            .get_or_try_init(|| async {
                let filters = device
                    .filters
                    .clone()
                    .map(|filter| rumqttc::SubscribeFilter::new(filter, QoS::AtLeastOnce));
                self.shared
                    .client
                    .subscribe_many(filters)
                    .await
                    .map_err(|e| self.shared.broker_error(e))?;
                self.sync().await
            })
            .await?;
        Ok(device.presence.subscribe())
    }

    /// What the broker holds on `filters` (MQTT filters, `+` and `#` allowed): the
    /// retained message of every matching topic, by topic, as the broker holds it now
    /// (a message published meanwhile may replace one). Subscribes at QoS 0, syncs, and
    /// unsubscribes again.
    ///
    /// # Errors
    /// [`CallError::Broker`] when the session ended or the broker did not echo the sync.
    pub async fn retained(
        &self,
        filters: &[String],
    ) -> Result<BTreeMap<String, Vec<u8>>, CallError> {
        let token = format!("{:016x}", rand::random::<u64>());
        self.shared.routes(|routes| {
            routes.snapshots.insert(
                token.clone(),
                Snapshot {
                    filters: filters.to_vec(),
                    messages: BTreeMap::new(),
                },
            )
        })?;
        // Removes the entry however this read ends, cancelled included.
        let _snapshot = SnapshotGuard {
            shared: &self.shared,
            token: &token,
        };
        let read = async {
            let subscriptions = filters
                .iter()
                .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtMostOnce));
            self.shared
                .client
                .subscribe_many(subscriptions)
                .await
                .map_err(|e| self.shared.broker_error(e))?;
            self.sync().await
        };
        let outcome = read.await;
        let (snapshot, still_wanted) = {
            let mut routes = lock(&self.shared.routes);
            let snapshot = routes.snapshots.remove(&token);
            let still_wanted: Vec<String> = routes
                .snapshots
                .values()
                .flat_map(|s| s.filters.iter())
                .chain(routes.devices.values().flat_map(|d| d.filters.iter()))
                .cloned()
                .collect();
            (snapshot, still_wanted)
        };
        outcome?;
        for filter in filters.iter().filter(|f| !still_wanted.contains(f)) {
            if let Err(e) = self.shared.client.unsubscribe(filter.clone()).await {
                debug!(error = %e, %filter, "unsubscribe");
            }
        }
        snapshot
            .map(|s| s.messages)
            .ok_or_else(|| self.shared.closed_error())
    }

    /// Waits until the device is not known to be offline, for up to the connect timeout.
    async fn wait_online(
        &self,
        mut presence: watch::Receiver<Option<Presence>>,
        request: &CallRequest,
    ) -> Result<(), CallError> {
        let takes_calls = |p: &Option<Presence>| p.as_ref().is_none_or(|p| p.online);
        if takes_calls(&presence.borrow_and_update()) {
            return Ok(());
        }
        // The offline state may be stale: a device that just came back has published
        // `online`, and the broker may have sent it without it being routed yet. A sync
        // routes everything sent before it, so "offline" after it is the broker's word.
        self.sync().await?;
        if takes_calls(&presence.borrow_and_update()) {
            return Ok(());
        }
        let not_online = || CallError::NotOnline {
            device: request.device.clone(),
        };
        if request.connect_timeout.is_zero() {
            return Err(not_online());
        }
        debug!(device = %request.device, "offline; waiting for it to come online");
        match tokio::time::timeout(request.connect_timeout, presence.wait_for(takes_calls)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(self.shared.closed_error()),
            Err(_) => Err(not_online()),
        }
    }

    /// Publishes a unique token to the caller's private topic and waits for the echo:
    /// everything the broker sent before it has been routed.
    async fn sync(&self) -> Result<(), CallError> {
        let token = format!("{:016x}", rand::random::<u64>());
        let (echo_tx, echo_rx) = oneshot::channel();
        self.shared.routes(|routes| {
            routes.barriers.insert(token.clone(), echo_tx);
        })?;
        let publish = self
            .shared
            .client
            .publish(
                self.shared.sync_topic.clone(),
                QoS::AtLeastOnce,
                false,
                token.clone().into_bytes(),
            )
            .await;
        let outcome = match publish {
            Err(e) => Err(self.shared.broker_error(e)),
            Ok(()) => match tokio::time::timeout(SYNC_WAIT, echo_rx).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(self.shared.closed_error()),
                Err(_) => Err(CallError::Broker(format!(
                    "the broker at {} did not echo a message on {} within {}s \
                     (is the client allowed to publish and subscribe there?)",
                    self.shared.broker,
                    self.shared.sync_topic,
                    SYNC_WAIT.as_secs()
                ))),
            },
        };
        if outcome.is_err() {
            let _ = self.shared.routes(|routes| routes.barriers.remove(&token));
        }
        outcome
    }
}

impl Shared {
    /// Runs `f` on the routes while the session is open.
    fn routes<T>(&self, f: impl FnOnce(&mut Routes) -> T) -> Result<T, CallError> {
        let mut routes = lock(&self.routes);
        match &routes.closed {
            Some(why) => Err(CallError::Broker(why.clone())),
            None => Ok(f(&mut routes)),
        }
    }

    /// The error for a call that found the session ended.
    fn closed_error(&self) -> CallError {
        let why = lock(&self.routes).closed.clone();
        CallError::Broker(
            why.unwrap_or_else(|| format!("the session with the broker at {} ended", self.broker)),
        )
    }

    /// The error for a request the event loop did not take.
    fn broker_error(&self, error: rumqttc::ClientError) -> CallError {
        debug!(%error, "request not queued");
        self.closed_error()
    }

    /// Ends the session: every waiting call and barrier is woken (their senders drop)
    /// and later calls fail with `why`.
    fn close(&self, why: String) {
        let mut routes = lock(&self.routes);
        routes.closed.get_or_insert(why);
        routes.pending.clear();
        routes.barriers.clear();
        routes.devices.clear();
        routes.snapshots.clear();
    }

    /// Subscribes again, after a reconnection, to everything the session had: the sync
    /// topic and every watched device's responses and presence (whose retained value
    /// then arrives again).
    fn resubscribe(&self) {
        let mut filters = vec![rumqttc::SubscribeFilter::new(
            self.sync_topic.clone(),
            QoS::AtLeastOnce,
        )];
        let routes = lock(&self.routes);
        for device in routes.devices.values() {
            filters.extend(
                device
                    .filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
            );
        }
        for snapshot in routes.snapshots.values() {
            filters.extend(
                snapshot
                    .filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtMostOnce)),
            );
        }
        drop(routes);
        if let Err(error) = self.client.try_subscribe_many(filters) {
            warn!(%error, "could not subscribe again after reconnecting");
        }
    }

    /// Routes one incoming message to whoever waits for it; others are ignored.
    fn route(&self, publish: Publish) {
        if publish.topic == self.sync_topic {
            let token = String::from_utf8_lossy(&publish.payload);
            let echo = lock(&self.routes).barriers.remove(token.as_ref());
            if let Some(echo) = echo {
                let _ = echo.send(());
            }
            return;
        }
        if let Some((prefix, response)) = Namespace::parse_any_response(&publish.topic) {
            let status = response.status;
            let pending = {
                let mut routes = lock(&self.routes);
                match routes.pending.get(response.request_id) {
                    Some(p) if p.prefix == prefix => routes.pending.remove(response.request_id),
                    _ => None,
                }
            };
            match pending {
                Some(pending) => {
                    let _ = pending.answer.send(Answer { status, publish });
                }
                None => debug!(topic = %publish.topic, "a response to another call"),
            }
            return;
        }
        let device = {
            let mut routes = lock(&self.routes);
            for snapshot in routes.snapshots.values_mut() {
                if snapshot
                    .filters
                    .iter()
                    .any(|filter| topic_matches(filter, &publish.topic))
                {
                    if publish.payload.is_empty() {
                        snapshot.messages.remove(&publish.topic);
                    } else {
                        snapshot
                            .messages
                            .insert(publish.topic.clone(), publish.payload.to_vec());
                    }
                }
            }
            routes.devices.get(&publish.topic).cloned()
        };
        match device {
            Some(device) => {
                let presence = if publish.payload.is_empty() {
                    None // the retained presence was cleared
                } else {
                    match serde_json::from_slice::<Presence>(&publish.payload) {
                        Ok(presence) => Some(presence),
                        Err(e) => {
                            warn!(topic = %publish.topic, error = %e, "ignoring a presence that is not valid");
                            None
                        }
                    }
                };
                debug!(topic = %publish.topic, ?presence, "presence");
                device.presence.send_replace(presence);
            }
            None => debug!(topic = %publish.topic, "unexpected message"),
        }
    }
}

/// Polls the event loop until the session ends, routing what arrives. A lost
/// connection does not end it: the task backs off (exponentially, with jitter) and
/// reconnects, then subscribes again to the caller's sync topic and to every device it
/// watches. Calls in flight meanwhile keep waiting, and end with their answer or with
/// 504101 when their response timeout passes.
async fn run_eventloop(mut eventloop: EventLoop, shared: std::sync::Weak<Shared>) {
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

/// Removes a call's entry from the routes when the call ends, however it ends.
struct PendingGuard<'a> {
    shared: &'a Shared,
    request_id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.routes).pending.remove(self.request_id);
    }
}

/// Removes a read of retained messages from the routes when it ends, however it ends.
struct SnapshotGuard<'a> {
    shared: &'a Shared,
    token: &'a str,
}

impl Drop for SnapshotGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.routes).snapshots.remove(self.token);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

/// Whether `topic` matches the MQTT subscription `filter` (`+` one level, `#` the rest).
/// As brokers do, a wildcard at the first level does not match a topic that begins
/// with `$`.
fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let (mut filter, mut topic) = (filter.split('/'), topic.split('/'));
    loop {
        match (filter.next(), topic.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            _ => return false,
        }
    }
}

/// Locks a mutex; a panic elsewhere while it was held leaves plain maps behind, which
/// stay usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn filters_match_topics_as_mqtt_brokers_match_them() {
        let presence = "devices/pump-1/$edge/presence";
        assert!(topic_matches("devices/+/$edge/presence", presence));
        assert!(topic_matches("devices/#", presence));
        assert!(topic_matches(presence, presence));
        assert!(topic_matches("devices/pump-1/#", "devices/pump-1"));
        assert!(!topic_matches("devices/+/$edge/methods", presence));
        assert!(!topic_matches("devices/+", presence));
        assert!(!topic_matches("devices/+/$edge/presence/x", presence));
        assert!(!topic_matches("devices/pump-2/$edge/presence", presence));
        assert!(topic_matches("+/$edge/presence", "pump-1/$edge/presence"));
        assert!(!topic_matches("+/$edge/presence", "$SYS/$edge/presence"));
        assert!(!topic_matches("#", "$SYS/broker"));
    }
}
