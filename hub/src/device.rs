//! The device endpoint: IoT Hub's device protocol (MQTT 3.1.1, one connection per
//! device, identity from the connection, SAS tokens), relayed to the backend.
//!
//! Each connected device gets one backend session of its own (client id
//! `edge-hub.{id}`, TCP_NODELAY, clean), subscribed to the device's requests before the
//! device is told it is connected, with a will that marks it offline:
//!
//! | device (bare topics)                         | backend (`devices/{id}/` namespace)         |
//! |----------------------------------------------|---------------------------------------------|
//! | SUBSCRIBE `$iothub/methods/POST/#`           | presence `{"online":true}` (retained)       |
//! | ← `$iothub/methods/POST/{m}/?$rid=R`         | ← `NS$iothub/methods/POST/{m}/?$rid=R...`   |
//! | `$iothub/methods/res/{s}/?$rid=R`            | → `NS$iothub/methods/res/{s}/?$rid=R` QoS 1 |
//! | `devices/{id}/messages/events/...`           | → the same topic                            |
//! | `$iothub/twin/GET`, `.../PATCH/properties/reported` | served here, from the registry       |
//!
//! Anything else (another device's topics, retained publishes, QoS 2, unknown topics,
//! more than [`MAX_SUBSCRIPTIONS`] subscriptions) disconnects the device, as IoT Hub
//! does. A second connection of the same device replaces the first. The connection
//! ends when the token expires.
//!
//! The connection code is generic over the byte stream, so MQTT over TLS and MQTT over
//! WebSockets can share it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use edge_proto::iothub::{SasError, SasToken, unix_now};
use edge_proto::topic::{check_device_id, check_request_id};
use edge_proto::{ErrorBody, ErrorCode, Namespace};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{self, QoS};
use rumqttc::{AsyncClient, Event, LastWill};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::backend::{self, Backend};
use crate::registry::Registry;
use crate::stopping;

/// IoT Hub's limit on subscriptions per device connection.
pub const MAX_SUBSCRIPTIONS: usize = 5;

/// The largest packet a device may send: IoT Hub's 256 KiB messages, with room for the
/// topic.
const MAX_PACKET: usize = 256 * 1024 + 4096;

/// Once this many bytes are queued for a device, its session writes them before it
/// takes more of the requests waiting for it.
const BATCH_BYTES: usize = 64 * 1024;

/// How long a new connection may take to send CONNECT.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// The subscriptions a device may make (bare topics), as IoT Hub allows them.
const METHODS_FILTER: &str = "$iothub/methods/POST/#";
const TWIN_RESPONSE_FILTER: &str = "$iothub/twin/res/#";
const TWIN_DESIRED_FILTER: &str = "$iothub/twin/PATCH/properties/desired/#";

/// What every device connection shares.
pub struct Devices {
    /// The hub's name, as tokens and usernames name it.
    pub hostname: String,
    /// The identity registry.
    pub registry: Registry,
    /// The backend broker.
    pub backend: Backend,
    /// Devices connected to this instance: a kick for each, by device id.
    connected: Mutex<HashMap<String, Connected>>,
    /// Set to true when the hub shuts down.
    shutdown: watch::Receiver<bool>,
}

/// A connected device's entry: the serial tells a replaced session from its successor.
struct Connected {
    serial: u64,
    kick: Option<oneshot::Sender<()>>,
    /// Becomes true once the session's backend session is closed.
    done: watch::Receiver<bool>,
}

impl Devices {
    /// The shared state for the hub named `hostname`.
    pub fn new(
        hostname: String,
        registry: Registry,
        backend: Backend,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            hostname,
            registry,
            backend,
            connected: Mutex::default(),
            shutdown,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Connected>> {
        self.connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `id` as connected with `serial`, kicking a connection it replaces.
    /// Returns the kick receiver for the new one, the sender to say it is done, and
    /// the replaced session's done receiver.
    fn register(
        &self,
        id: &str,
        serial: u64,
    ) -> (
        oneshot::Receiver<()>,
        watch::Sender<bool>,
        Option<watch::Receiver<bool>>,
    ) {
        let (kick_tx, kick_rx) = oneshot::channel();
        let (done_tx, done) = watch::channel(false);
        let old = self.lock().insert(
            id.to_owned(),
            Connected {
                serial,
                kick: Some(kick_tx),
                done,
            },
        );
        let old_done = old.map(|mut old| {
            if let Some(kick) = old.kick.take() {
                let _ = kick.send(());
            }
            old.done
        });
        (kick_rx, done_tx, old_done)
    }

    fn unregister(&self, id: &str, serial: u64) {
        let mut connected = self.lock();
        if connected.get(id).is_some_and(|c| c.serial == serial) {
            connected.remove(id);
        }
    }
}

/// Why a device connection ended (logged, and the presence's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The device sent DISCONNECT.
    Disconnected,
    /// The connection dropped or the device broke the protocol.
    Lost,
    /// The device broke IoT Hub's rules (a topic it may not use, a retained publish).
    Refused,
    /// Its token expired.
    Expired,
    /// No packet within 1.5 keep-alive intervals.
    KeepAlive,
    /// Another connection of the same device replaced it.
    Replaced,
    /// The backend session was lost (or taken over by another hub instance).
    BackendLost,
    /// The hub shuts down.
    Shutdown,
}

impl End {
    fn reason(self) -> &'static str {
        match self {
            Self::Disconnected => "disconnected",
            Self::Lost | Self::Refused | Self::KeepAlive => "connection-lost",
            Self::Expired => "token-expired",
            Self::Replaced => "replaced",
            Self::BackendLost => "backend-lost",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Serves one device connection (TLS already done, `certificates` the chain the client
/// presented, leaf first, or none) until it ends.
pub async fn serve<S>(
    stream: S,
    devices: Arc<Devices>,
    peer: String,
    certificates: Vec<CertificateDer<'static>>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let mut conn = Connection {
        reader,
        writer,
        buf: BytesMut::with_capacity(4096),
        out: BytesMut::with_capacity(4096),
    };
    let connect = match tokio::time::timeout(CONNECT_WAIT, conn.read_packet()).await {
        Ok(Ok(Some(Packet::Connect(connect)))) => connect,
        Ok(Ok(Some(other))) => {
            debug!(%peer, ?other, "first packet is not CONNECT");
            return conn.close().await;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "before CONNECT");
            return conn.close().await;
        }
        Err(_) => {
            debug!(%peer, "no CONNECT in time");
            return conn.close().await;
        }
    };
    let auth = match authenticate(&devices, &connect, &certificates) {
        Ok(auth) => auth,
        Err((code, why)) => {
            warn!(%peer, client_id = %connect.client_id, %why, ?code, "device refused");
            let _ = conn.send(Packet::ConnAck(ConnAck::new(code, false))).await;
            return conn.close().await;
        }
    };
    let id = auth.device_id.clone();
    let serial = rand::random::<u64>();
    let (kick, done, replaced) = devices.register(&id, serial);
    if let Some(mut old_done) = replaced {
        info!(device = %id, "a new connection replaces the device's old one");
        // Let the old session end first, so that its backend session is gone before
        // this one takes the client id.
        let _ = tokio::time::timeout(Duration::from_secs(3), old_done.wait_for(|d| *d)).await;
    }
    let session = match BackendSession::open(&devices.backend, &id).await {
        Ok(session) => session,
        Err(e) => {
            warn!(device = %id, error = %e, "backend unreachable: device refused");
            devices.unregister(&id, serial);
            done.send_replace(true);
            let _ = conn
                .send(Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::ServiceUnavailable,
                    false,
                )))
                .await;
            return conn.close().await;
        }
    };
    if conn
        .send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )))
        .await
        .is_err()
    {
        session.close(None).await;
        devices.unregister(&id, serial);
        done.send_replace(true);
        return;
    }
    info!(device = %id, %peer, expires = auth.expiry, "device connected");
    let mut state = DeviceSession {
        id: id.clone(),
        namespace: auth.namespace,
        devices: Arc::clone(&devices),
        subscriptions: BTreeSet::new(),
        announced: false,
        backend: session,
    };
    let end = state
        .run(&mut conn, kick, auth.expiry, connect.keep_alive)
        .await;
    info!(device = %id, reason = end.reason(), "device disconnected");
    let presence = match end {
        End::Replaced | End::BackendLost => None,
        _ if state.announced => Some(end.reason()),
        // A device that never subscribed to methods was never announced online.
        _ => None,
    };
    state.backend.close(presence).await;
    devices.unregister(&id, serial);
    done.send_replace(true);
    conn.close().await;
}

/// A device that passed authentication.
struct Authenticated {
    device_id: String,
    namespace: Namespace,
    /// When its token expires, unix seconds.
    expiry: u64,
}

/// Checks CONNECT as IoT Hub does: client id = a registered, enabled device; username
/// `{hub}/{id}/?...`; password a SAS token for `{hub}/devices/{id}` signed with one of
/// its keys, not expired; or no password and a client certificate whose thumbprint
/// (SHA-256 or SHA-1) the device has registered, or, for a device registered for
/// CA-signed certificates, one whose CN is its id and which chains to a CA the
/// registry trusts.
fn authenticate(
    devices: &Devices,
    connect: &mqttbytes::v4::Connect,
    certificates: &[CertificateDer<'static>],
) -> Result<Authenticated, (ConnectReturnCode, String)> {
    use ConnectReturnCode::{BadClientId, BadUserNamePassword, NotAuthorized, ServiceUnavailable};
    let id = connect.client_id.as_str();
    check_device_id(id).map_err(|e| (BadClientId, format!("client id: {e}")))?;
    let namespace = Namespace::for_device(id).map_err(|e| (BadClientId, e.to_string()))?;
    let login = connect
        .login
        .as_ref()
        .ok_or((BadUserNamePassword, "no username and password".to_owned()))?;
    let (host, rest) = login.username.split_once('/').ok_or_else(|| {
        (
            BadUserNamePassword,
            "username is not {hub}/{id}/?api-version=..".to_owned(),
        )
    })?;
    let user_device = rest.split('/').next().unwrap_or_default();
    if user_device != id {
        return Err((
            BadUserNamePassword,
            format!("username names device '{user_device}', the client id '{id}'"),
        ));
    }
    if !same_host(host, &devices.hostname) {
        return Err((
            BadUserNamePassword,
            format!(
                "username names hub '{host}', this is '{}'",
                devices.hostname
            ),
        ));
    }
    if login.password.is_empty() {
        let certificate = certificates.first().ok_or((
            BadUserNamePassword,
            "no password (SAS token) and no client certificate".to_owned(),
        ))?;
        let device = devices
            .registry
            .device(id)
            .map_err(|e| (ServiceUnavailable, format!("registry: {e:#}")))?
            .ok_or((NotAuthorized, "device is not registered".to_owned()))?;
        if device.status != "enabled" {
            return Err((NotAuthorized, "device is disabled".to_owned()));
        }
        let presented = crate::pki::thumbprints(certificate);
        let known = device.x509_thumbprints.iter().any(|registered| {
            presented
                .iter()
                .any(|p| p.eq_ignore_ascii_case(registered.trim()))
        });
        if !known && !device.x509_ca {
            return Err((
                NotAuthorized,
                format!(
                    "the client certificate (SHA-256 {}) is not registered for this device",
                    presented[0]
                ),
            ));
        }
        if !known {
            let cas: Vec<String> = devices
                .registry
                .certificates()
                .map_err(|e| (ServiceUnavailable, format!("registry: {e:#}")))?
                .into_iter()
                .map(|ca| ca.pem)
                .collect();
            crate::pki::verify_ca_signed(certificates, &cas, id)
                .map_err(|why| (NotAuthorized, why))?;
        }
        return Ok(Authenticated {
            device_id: id.to_owned(),
            namespace,
            // A certificate does not expire the session the way a token does.
            expiry: u64::MAX / 2,
        });
    }
    let token = SasToken::parse(&login.password)
        .map_err(|e| (BadUserNamePassword, format!("password: {e}")))?;
    let resource_ok = token
        .resource
        .split_once("/devices/")
        .is_some_and(|(hub, device)| same_host(hub, &devices.hostname) && device == id);
    if !resource_ok {
        return Err((
            NotAuthorized,
            format!("the token is for '{}', not this device", token.resource),
        ));
    }
    let device = devices
        .registry
        .device(id)
        .map_err(|e| (ServiceUnavailable, format!("registry: {e:#}")))?
        .ok_or((NotAuthorized, "device is not registered".to_owned()))?;
    if device.status != "enabled" {
        return Err((NotAuthorized, "device is disabled".to_owned()));
    }
    let now = unix_now();
    match token.verify(&device.primary_key, now) {
        Err(SasError::BadSignature) => token.verify(&device.secondary_key, now),
        other => other,
    }
    .map_err(|e| (NotAuthorized, e.to_string()))?;
    Ok(Authenticated {
        device_id: id.to_owned(),
        namespace,
        expiry: token.expiry,
    })
}

/// Whether `given` names the hub `hostname`, ignoring case and a port.
pub fn same_host(given: &str, hostname: &str) -> bool {
    let bare = |h: &str| -> String {
        let h = h.trim();
        match h.rsplit_once(':') {
            Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                host.to_ascii_lowercase()
            }
            _ => h.to_ascii_lowercase(),
        }
    };
    bare(given) == bare(hostname)
}

/// The device's own backend session: its client, and what its event-loop task sends
/// back (requests for the device; the channel closes when the session is lost).
struct BackendSession {
    client: AsyncClient,
    namespace: Namespace,
    requests: mpsc::Receiver<Publish>,
    task: tokio::task::JoinHandle<()>,
}

impl BackendSession {
    /// Connects as `edge-hub.{id}` with an offline will, subscribes to the device's
    /// requests, and returns once the broker acknowledged both.
    async fn open(backend: &Backend, id: &str) -> anyhow::Result<Self> {
        let namespace = Namespace::for_device(id)?;
        let will = LastWill::new(
            namespace.presence_topic(),
            backend::presence_json(false, Some("connection-lost")),
            QoS::AtLeastOnce,
            true,
        );
        let (client, mut eventloop) = backend.client(&format!("edge-hub.{id}"), Some(will), 64)?;
        client
            .subscribe(namespace.request_filter(), QoS::AtMostOnce)
            .await?;
        let ready = async {
            loop {
                match eventloop.poll().await? {
                    Event::Incoming(rumqttc::Packet::SubAck(_)) => return anyhow::Ok(()),
                    event => debug!(?event, "backend session opening"),
                }
            }
        };
        tokio::time::timeout(backend::CONNECT_WAIT * 2, ready)
            .await
            .map_err(|_| anyhow::anyhow!("the backend broker did not answer in time"))??;
        let (tx, requests) = mpsc::channel(256);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(rumqttc::Packet::Publish(publish))) => {
                        // QoS 0 requests: when the device cannot keep up, drop them,
                        // as a broker would.
                        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(publish) {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        debug!(error = %e, "backend session ended");
                        return;
                    }
                }
            }
        });
        Ok(Self {
            client,
            namespace,
            requests,
            task,
        })
    }

    /// Queues a publish on the backend; the session ends if the backend is gone.
    async fn publish(&self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>) -> Step {
        self.client
            .publish(topic, qos, retain, payload)
            .await
            .map_err(|_| End::BackendLost)
    }

    /// Publishes the offline presence (with `reason`) if given, disconnects, and waits
    /// briefly for the event loop to send everything.
    async fn close(self, presence: Option<&str>) {
        if let Some(reason) = presence {
            let _ = self
                .client
                .publish(
                    self.namespace.presence_topic(),
                    QoS::AtLeastOnce,
                    true,
                    backend::presence_json(false, Some(reason)),
                )
                .await;
        }
        let _ = self.client.disconnect().await;
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// A device's MQTT connection: the two halves of the stream, and buffers.
struct Connection<S> {
    reader: tokio::io::ReadHalf<S>,
    writer: tokio::io::WriteHalf<S>,
    buf: BytesMut,
    out: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// The next whole packet already read, if any.
    fn parse(&mut self) -> Result<Option<Packet>, mqttbytes::Error> {
        match Packet::read(&mut self.buf, MAX_PACKET) {
            Ok(packet) => Ok(Some(packet)),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads until a whole packet arrived; `None` when the device closed.
    async fn read_packet(&mut self) -> anyhow::Result<Option<Packet>> {
        loop {
            if let Some(packet) = self.parse()? {
                return Ok(Some(packet));
            }
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Adds `packet` to what the next [`Connection::flush`] writes.
    fn queue(&mut self, packet: &Packet) -> anyhow::Result<()> {
        packet.write(&mut self.out, usize::MAX)?;
        Ok(())
    }

    /// Writes what was queued, in as few TLS records as it fits in.
    async fn flush(&mut self) -> anyhow::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = self.writer.write_all(&self.out).await;
        self.out.clear();
        written?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Writes `packet` now.
    async fn send(&mut self, packet: Packet) -> anyhow::Result<()> {
        self.queue(&packet)?;
        self.flush().await
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.writer.shutdown()).await;
    }
}

/// One connected device's session.
struct DeviceSession {
    id: String,
    namespace: Namespace,
    devices: Arc<Devices>,
    /// The filters the device subscribed to.
    subscriptions: BTreeSet<String>,
    /// Whether presence `online` was published (the device subscribed to methods).
    announced: bool,
    backend: BackendSession,
}

/// What to do after a packet.
type Step = Result<(), End>;

impl DeviceSession {
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        mut kick: oneshot::Receiver<()>,
        expiry: u64,
        keep_alive: u16,
    ) -> End {
        let mut shutdown = self.devices.shutdown.clone();
        let expires =
            tokio::time::Instant::now() + Duration::from_secs(expiry.saturating_sub(unix_now()));
        let idle_limit =
            (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let mut last_seen = tokio::time::Instant::now();
        loop {
            // Every whole packet already buffered, first; what answers them goes out
            // together, with the requests queued meanwhile.
            loop {
                match conn.parse() {
                    Ok(Some(packet)) => {
                        last_seen = tokio::time::Instant::now();
                        if let Err(end) = self.on_device_packet(conn, packet).await {
                            // What was queued before the end still goes (a refusal's
                            // earlier acknowledgements).
                            let _ = conn.flush().await;
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        warn!(device = %self.id, error = %e, "malformed packet");
                        return End::Lost;
                    }
                }
            }
            if conn.flush().await.is_err() {
                return End::Lost;
            }
            let idle = async {
                match idle_limit {
                    Some(limit) => tokio::time::sleep_until(last_seen + limit).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                read = conn.reader.read_buf(&mut conn.buf) => match read {
                    Ok(0) | Err(_) => return End::Lost,
                    Ok(_) => {}
                },
                request = self.backend.requests.recv() => match request {
                    Some(publish) => {
                        if let Err(end) = self.on_request(conn, publish).await {
                            return end;
                        }
                        // The requests that came meanwhile go out with it.
                        while conn.out.len() < BATCH_BYTES
                            && let Ok(publish) = self.backend.requests.try_recv()
                        {
                            if let Err(end) = self.on_request(conn, publish).await {
                                return end;
                            }
                        }
                    }
                    None => return End::BackendLost,
                },
                _ = &mut kick => return End::Replaced,
                _ = tokio::time::sleep_until(expires) => return End::Expired,
                _ = idle => return End::KeepAlive,
                () = stopping(&mut shutdown) => return End::Shutdown,
            }
        }
    }

    /// A request from the backend: passed on under the bare topic if the device
    /// subscribed to methods.
    async fn on_request<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        publish: Publish,
    ) -> Step {
        let request = match self.namespace.parse_request(&publish.topic) {
            Ok(request) => request,
            Err(e) => {
                warn!(device = %self.id, topic = %publish.topic, error = %e, "request not passed on");
                return match e.request_id() {
                    Some(request_id) => {
                        let message = format!("the request was not passed on: {e}");
                        self.answer_backend(request_id, ErrorCode::InvalidMethod, message)
                            .await
                    }
                    None => Ok(()),
                };
            }
        };
        if !self.subscriptions.contains(METHODS_FILTER) {
            // Between the device's UNSUBSCRIBE (edge-host's reconnection for a fresh
            // token starts with one) and the caller seeing its presence go offline: the
            // caller is told, rather than left to time out, and may send it again.
            debug!(device = %self.id, request_id = request.request_id, "not subscribed to methods: not delivered");
            let message = format!(
                "device '{}' took no method calls when the request came (not subscribed \
                 to them); no handler saw it",
                self.id
            );
            return self
                .answer_backend(request.request_id, ErrorCode::NotDelivered, message)
                .await;
        }
        let topic = format!(
            "$iothub/methods/POST/{}/?$rid={}",
            request.method, request.request_id
        );
        let forward = Publish::from_bytes(topic, QoS::AtMostOnce, publish.payload.clone());
        queue(conn, &Packet::Publish(forward))
    }

    async fn on_device_packet<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        packet: Packet,
    ) -> Step {
        match packet {
            Packet::Publish(publish) => self.on_publish(conn, publish).await,
            Packet::Subscribe(subscribe) => {
                let mut codes = Vec::new();
                for filter in subscribe.filters {
                    if ![METHODS_FILTER, TWIN_RESPONSE_FILTER, TWIN_DESIRED_FILTER]
                        .contains(&filter.path.as_str())
                        && !self.is_c2d_filter(&filter.path)
                    {
                        return self.refuse(format!("subscribe to '{}'", filter.path));
                    }
                    self.subscriptions.insert(filter.path.clone());
                    if self.subscriptions.len() > MAX_SUBSCRIPTIONS {
                        return self.refuse(format!("more than {MAX_SUBSCRIPTIONS} subscriptions"));
                    }
                    let qos = match filter.qos {
                        QoS::AtMostOnce => QoS::AtMostOnce,
                        _ => QoS::AtLeastOnce,
                    };
                    codes.push(SubscribeReasonCode::Success(qos));
                }
                queue(conn, &Packet::SubAck(SubAck::new(subscribe.pkid, codes)))?;
                if self.subscriptions.contains(METHODS_FILTER) && !self.announced {
                    self.announced = true;
                    self.set_presence(true, None).await?;
                }
                Ok(())
            }
            Packet::Unsubscribe(unsubscribe) => {
                for topic in &unsubscribe.topics {
                    self.subscriptions.remove(topic);
                }
                queue(conn, &Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)))?;
                if self.announced && !self.subscriptions.contains(METHODS_FILTER) {
                    self.announced = false;
                    self.set_presence(false, Some("unsubscribed")).await?;
                }
                Ok(())
            }
            Packet::PingReq => queue(conn, &Packet::PingResp),
            Packet::Disconnect => Err(End::Disconnected),
            Packet::PubAck(_) => Ok(()),
            other => self.refuse(format!("unexpected packet {other:?}")),
        }
    }

    fn is_c2d_filter(&self, filter: &str) -> bool {
        filter == format!("devices/{}/messages/devicebound/#", self.id)
    }

    fn refuse(&self, what: String) -> Step {
        warn!(device = %self.id, %what, "IoT Hub does not allow this: disconnecting the device");
        Err(End::Refused)
    }

    async fn set_presence(&self, online: bool, reason: Option<&str>) -> Step {
        self.backend
            .publish(
                self.namespace.presence_topic(),
                QoS::AtLeastOnce,
                true,
                backend::presence_json(online, reason),
            )
            .await
    }

    /// Answers a backend request in the device's stead, with one of the host's errors.
    async fn answer_backend(&self, request_id: &str, code: ErrorCode, message: String) -> Step {
        let topic = self.namespace.response_topic(code.status(), request_id);
        let body = ErrorBody::new(code, message).to_json();
        self.backend
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
    }

    async fn on_publish<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        publish: Publish,
    ) -> Step {
        if publish.retain {
            return self.refuse(format!("retained publish on '{}'", publish.topic));
        }
        if publish.qos == QoS::ExactlyOnce {
            return self.refuse(format!("QoS 2 publish on '{}'", publish.topic));
        }
        let topic = publish.topic.as_str();
        let telemetry = format!("devices/{}/messages/events/", self.id);
        if let Some(rest) = topic.strip_prefix("$iothub/methods/res/") {
            let Some((status, request_id)) = parse_response(rest) else {
                return self.refuse(format!("malformed method response topic '{topic}'"));
            };
            let backend_topic = self.namespace.response_topic(status, request_id);
            self.backend
                .publish(
                    backend_topic,
                    QoS::AtLeastOnce,
                    false,
                    publish.payload.to_vec(),
                )
                .await?;
        } else if let Some(rest) = topic.strip_prefix("$iothub/twin/") {
            self.on_twin(conn, rest, &publish.payload).await?;
        } else if topic.starts_with(&telemetry) {
            let qos = publish.qos;
            self.backend
                .publish(topic.to_owned(), qos, false, publish.payload.to_vec())
                .await?;
        } else {
            return self.refuse(format!("publish to '{topic}'"));
        }
        if publish.qos == QoS::AtLeastOnce {
            queue(conn, &Packet::PubAck(PubAck::new(publish.pkid)))?;
        }
        Ok(())
    }

    /// Twin requests, served from the registry: `GET/?$rid=R` and
    /// `PATCH/properties/reported/?$rid=R`.
    async fn on_twin<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        rest: &str,
        payload: &[u8],
    ) -> Step {
        let (operation, properties) = rest.split_once("/?").unwrap_or((rest, ""));
        let Some(request_id) = property(properties, "$rid") else {
            return self.refuse(format!("twin request without $rid: '{rest}'"));
        };
        let (status, version, body) = match operation {
            "GET" => match self.devices.registry.device(&self.id) {
                Ok(Some(device)) => (
                    200,
                    None,
                    serde_json::to_vec(&device.twin.to_device_json()).unwrap_or_default(),
                ),
                Ok(None) => (404, None, Vec::new()),
                Err(e) => {
                    warn!(device = %self.id, error = %e, "twin read failed");
                    (500, None, Vec::new())
                }
            },
            "PATCH/properties/reported" => {
                match serde_json::from_slice::<serde_json::Value>(payload) {
                    Ok(serde_json::Value::Object(patch)) => {
                        let id = self.id.clone();
                        let patched = self
                            .devices
                            .registry
                            .off_loop(move |registry| registry.patch_reported(&id, &patch))
                            .await;
                        match patched {
                            Ok(version) => (204, Some(version), Vec::new()),
                            Err(e) => {
                                warn!(device = %self.id, error = %e, "twin patch failed");
                                (500, None, Vec::new())
                            }
                        }
                    }
                    _ => (400, None, Vec::new()),
                }
            }
            _ => return self.refuse(format!("twin operation '{operation}'")),
        };
        let mut topic = format!("$iothub/twin/res/{status}/?$rid={request_id}");
        if let Some(version) = version {
            topic.push_str(&format!("&$version={version}"));
        }
        queue(
            conn,
            &Packet::Publish(Publish::new(topic, QoS::AtMostOnce, body)),
        )
    }
}

/// Queues `packet` for the device, written when the session next flushes.
fn queue<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut Connection<S>, packet: &Packet) -> Step {
    conn.queue(packet).map_err(|_| End::Lost)
}

/// `{status}/?$rid={rid}` (other properties allowed) → status and request id.
fn parse_response(rest: &str) -> Option<(u16, &str)> {
    let (status, properties) = rest.split_once("/?")?;
    let status = status.parse().ok()?;
    let request_id = property(properties, "$rid")?;
    check_request_id(request_id).ok()?;
    Some((status, request_id))
}

/// The value of `name` in a property bag `a=1&b=2`.
fn property<'a>(properties: &'a str, name: &str) -> Option<&'a str> {
    properties
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_compare_without_case_or_port() {
        assert!(same_host("LocalHost", "localhost"));
        assert!(same_host("localhost:18443", "localhost"));
        assert!(same_host("hub", "hub:8883"));
        assert!(!same_host("other", "localhost"));
        assert!(!same_host("localhost:x", "localhost"));
    }

    #[test]
    fn response_topics_parse() {
        assert_eq!(parse_response("200/?$rid=1"), Some((200, "1")));
        assert_eq!(parse_response("404/?a=b&$rid=x7"), Some((404, "x7")));
        assert_eq!(parse_response("200/?$rid="), None);
        assert_eq!(parse_response("ok/?$rid=1"), None);
        assert_eq!(parse_response("200"), None);
    }
}
