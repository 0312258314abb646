//! One client connection: CONNECT, then its packets in, and the messages routed to it
//! out, on one task of the broker's thread.

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use edge_proto::client::MAX_PACKET;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{self, Protocol, QoS};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, DuplexStream};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::debug;

use crate::router::{self, Delivery, MAX_QUEUED, Message, Router, Serial};

/// How long a new connection may take to send CONNECT.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// How long a write to a client may stall (it stopped reading) before the connection is
/// given up, so that a stuck client cannot hold its session forever.
const WRITE_STALL: Duration = Duration::from_secs(60);

/// Up to how many bytes of queued messages are written with one system call.
const BATCH_BYTES: usize = 256 * 1024;

/// How much room the input buffer has before each read.
const READ_CHUNK: usize = 16 * 1024;

/// How a connection ended, which decides whether its will is published.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT: no will.
    Disconnected,
    /// Another connection took over the client id; the router already published the
    /// will.
    TakenOver,
    /// The connection broke, timed out, or broke the protocol: the will goes out.
    Lost(String),
}

/// Serves TCP connection number `serial` from `peer` until it ends.
pub async fn serve_tcp(
    mut stream: TcpStream,
    peer: SocketAddr,
    serial: Serial,
    router: Rc<RefCell<Router>>,
) {
    // Without it each small packet may wait ~40 ms for the peer's delayed ACK.
    if let Err(error) = stream.set_nodelay(true) {
        debug!(%peer, %error, "cannot set TCP_NODELAY");
    }
    let (reader, writer) = stream.split();
    serve(Connection::new(reader, writer), &peer, serial, router).await;
}

/// Serves in-process connection number `serial` (one end of a pipe a
/// [`Link`](crate::Link) opened) until it ends.
pub async fn serve_pipe(stream: DuplexStream, serial: Serial, router: Rc<RefCell<Router>>) {
    let (reader, writer) = tokio::io::split(stream);
    serve(
        Connection::new(reader, writer),
        &"in-process",
        serial,
        router,
    )
    .await;
}

/// Serves a connection, whatever carries it, until it ends.
async fn serve<R, W>(
    mut conn: Connection<R, W>,
    peer: &dyn std::fmt::Display,
    serial: Serial,
    router: Rc<RefCell<Router>>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let connect = match tokio::time::timeout(CONNECT_WAIT, conn.first_packet()).await {
        Ok(Ok(Some(connect))) => connect,
        Ok(Ok(None)) => return,
        Ok(Err(refusal)) => {
            debug!(%peer, %refusal, "connection refused");
            if let Some(code) = refusal.code {
                conn.queue(&Packet::ConnAck(ConnAck::new(code, false)));
                let _ = conn.flush().await;
            }
            return;
        }
        Err(_) => {
            debug!(%peer, "no CONNECT within {CONNECT_WAIT:?}");
            return;
        }
    };
    let id = if connect.client_id.is_empty() {
        format!("edge-broker-{serial}")
    } else {
        connect.client_id.clone()
    };
    let (mailbox, inbox) = mpsc::channel(MAX_QUEUED);
    let kick = Rc::new(Notify::new());
    let will = connect.last_will.map(|will| Message {
        topic: will.topic,
        payload: will.message,
        qos: will.qos,
        retain: will.retain,
    });
    router
        .borrow_mut()
        .connect(serial, &id, mailbox, Rc::clone(&kick), will);
    // Sessions are not kept past their connection: a client asking for a persistent
    // one is told, as after an expiry, that none was present.
    conn.queue(&Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        false,
    )));
    debug!(client = %id, %peer, "connected");
    let mut session = Session {
        serial,
        router: Rc::clone(&router),
        next_pkid: 0,
        awaiting_release: HashSet::new(),
        handed: false,
    };
    let keep_alive = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let end = session.run(&mut conn, inbox, &kick, keep_alive).await;
    let will = match &end {
        End::TakenOver => None,
        // A client that said DISCONNECT has its will dropped.
        End::Disconnected => {
            router.borrow_mut().disconnect(serial);
            None
        }
        End::Lost(_) => router.borrow_mut().disconnect(serial),
    };
    if let Some(will) = will {
        router.borrow_mut().publish(&will);
    }
    let reason = match &end {
        End::Disconnected => "DISCONNECT",
        End::TakenOver => "taken over by a new connection",
        End::Lost(why) => why,
    };
    debug!(client = %id, %peer, %reason, "disconnected");
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.writer.shutdown()).await;
}

/// Why a connection was refused before it was registered.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
struct Refusal {
    reason: String,
    /// The CONNACK to answer with, when the protocol allows one.
    code: Option<ConnectReturnCode>,
}

impl Refusal {
    fn new(reason: impl Into<String>, code: Option<ConnectReturnCode>) -> Self {
        Self {
            reason: reason.into(),
            code,
        }
    }
}

/// The two halves of a client's connection and their buffers.
struct Connection<R, W> {
    reader: R,
    writer: W,
    input: BytesMut,
    output: BytesMut,
}

impl<R, W> Connection<R, W> {
    fn new(reader: R, writer: W) -> Self {
        Self {
            reader,
            writer,
            input: BytesMut::with_capacity(4096),
            output: BytesMut::with_capacity(4096),
        }
    }

    /// Adds `packet` to what goes out on the next flush.
    fn queue(&mut self, packet: &Packet) {
        // Packets the broker writes are within the limits it reads with: this fails
        // only on a bug, and then the client is better off without the packet.
        if let Err(error) = packet.write(&mut self.output, usize::MAX) {
            tracing::error!(%error, "cannot encode a packet");
        }
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Connection<R, W> {
    /// The client's CONNECT, checked; `None` when it closed first.
    async fn first_packet(&mut self) -> Result<Option<Connect>, Refusal> {
        loop {
            // Anything but CONNECT (HTTP, TLS, noise) is refused at its first byte, not
            // once it has sent as much as its first byte claims.
            if self.input.first().is_some_and(|byte| byte >> 4 != 1) {
                return Err(Refusal::new("the first packet is not CONNECT", None));
            }
            match Packet::read(&mut self.input, MAX_PACKET) {
                Ok(Packet::Connect(connect)) => {
                    return match connect.protocol {
                        Protocol::V4 => check_connect(connect).map(Some),
                        Protocol::V5 => Err(Refusal::new(
                            "MQTT 5 is not supported (MQTT 3.1.1 is)",
                            Some(ConnectReturnCode::RefusedProtocolVersion),
                        )),
                    };
                }
                Ok(other) => {
                    return Err(Refusal::new(
                        format!("the first packet was not CONNECT but {other:?}"),
                        None,
                    ));
                }
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(mqttbytes::Error::InvalidProtocolLevel(level)) => {
                    return Err(Refusal::new(
                        format!("protocol level {level} is not supported (MQTT 3.1.1 is)"),
                        Some(ConnectReturnCode::RefusedProtocolVersion),
                    ));
                }
                Err(error) => {
                    return Err(Refusal::new(format!("malformed CONNECT: {error}"), None));
                }
            }
            self.input.reserve(READ_CHUNK);
            match self.reader.read_buf(&mut self.input).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }

    /// Writes out what was queued.
    async fn flush(&mut self) -> Result<(), String> {
        if self.output.is_empty() {
            return Ok(());
        }
        let written = tokio::time::timeout(WRITE_STALL, self.writer.write_all(&self.output)).await;
        self.output.clear();
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("write failed: {error}")),
            Err(_) => Err(format!("the client read nothing for {WRITE_STALL:?}")),
        }
    }
}

/// What MQTT 3.1.1 requires of a CONNECT beyond its encoding.
fn check_connect(connect: Connect) -> Result<Connect, Refusal> {
    if connect.client_id.is_empty() && !connect.clean_session {
        return Err(Refusal::new(
            "an empty client id needs a clean session",
            Some(ConnectReturnCode::BadClientId),
        ));
    }
    if let Some(will) = &connect.last_will
        && !router::valid_topic(&will.topic)
    {
        return Err(Refusal::new(
            format!("invalid will topic {:?}", will.topic),
            None,
        ));
    }
    Ok(connect)
}

/// A registered client's state beyond the router's.
struct Session {
    serial: Serial,
    router: Rc<RefCell<Router>>,
    /// The last packet id used for a QoS 1 message to the client.
    next_pkid: u16,
    /// QoS 2 publishes already routed, waiting for their PUBREL.
    awaiting_release: HashSet<u16>,
    /// Whether messages were handed to other sessions since the last flush.
    handed: bool,
}

impl Session {
    async fn run<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<R, W>,
        mut inbox: mpsc::Receiver<Delivery>,
        kick: &Notify,
        keep_alive: Option<Duration>,
    ) -> End {
        let mut last_seen = Instant::now();
        loop {
            loop {
                match Packet::read(&mut conn.input, MAX_PACKET) {
                    Ok(packet) => {
                        last_seen = Instant::now();
                        if let Some(end) = self.on_packet(conn, packet) {
                            let _ = conn.flush().await;
                            return end;
                        }
                    }
                    Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                    Err(error) => return End::Lost(format!("malformed packet: {error}")),
                }
            }
            if std::mem::take(&mut self.handed) {
                // Let the subscribers write what was just routed to them before this
                // connection's own acknowledgements go out: a call's answer is on its
                // caller's critical path, the PUBACK to its sender is not.
                tokio::task::yield_now().await;
            }
            if let Err(why) = conn.flush().await {
                return End::Lost(why);
            }
            let idle = async {
                match keep_alive {
                    Some(limit) => tokio::time::sleep_until(last_seen + limit).await,
                    None => std::future::pending().await,
                }
            };
            // read_buf only fills spare capacity, and would read a few bytes at a time
            // into a full buffer.
            conn.input.reserve(READ_CHUNK);
            tokio::select! {
                read = conn.reader.read_buf(&mut conn.input) => match read {
                    Ok(0) => return End::Lost("the client closed the connection".into()),
                    Err(error) => return End::Lost(format!("read failed: {error}")),
                    Ok(_) => {}
                },
                delivery = inbox.recv() => {
                    let Some(delivery) = delivery else {
                        return End::TakenOver;
                    };
                    self.deliver(conn, delivery);
                    while conn.output.len() < BATCH_BYTES {
                        match inbox.try_recv() {
                            Ok(delivery) => self.deliver(conn, delivery),
                            Err(_) => break,
                        }
                    }
                }
                () = kick.notified() => return End::TakenOver,
                () = idle => return End::Lost("keep-alive expired".into()),
            }
        }
    }

    /// Handles one packet from the client, queueing what answers it; `Some` ends the
    /// connection.
    fn on_packet<R, W>(&mut self, conn: &mut Connection<R, W>, packet: Packet) -> Option<End> {
        match packet {
            Packet::Publish(publish) => return self.on_publish(conn, publish),
            Packet::PubRel(release) => {
                self.awaiting_release.remove(&release.pkid);
                conn.queue(&Packet::PubComp(PubComp::new(release.pkid)));
            }
            // Acknowledgements of what the broker sent: nothing is kept to resend.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::Subscribe(subscribe) => {
                let mut retained = Vec::new();
                let codes = subscribe
                    .filters
                    .iter()
                    .map(|filter| {
                        if !router::valid_filter(&filter.path) {
                            return SubscribeReasonCode::Failure;
                        }
                        // QoS 2 is granted as QoS 1, which MQTT allows a server to do.
                        let granted = if filter.qos == QoS::AtMostOnce {
                            QoS::AtMostOnce
                        } else {
                            QoS::AtLeastOnce
                        };
                        retained.extend(self.router.borrow_mut().subscribe(
                            self.serial,
                            &filter.path,
                            granted,
                        ));
                        SubscribeReasonCode::Success(granted)
                    })
                    .collect();
                conn.queue(&Packet::SubAck(SubAck::new(subscribe.pkid, codes)));
                for delivery in retained {
                    self.deliver(conn, delivery);
                }
            }
            Packet::Unsubscribe(unsubscribe) => {
                for filter in &unsubscribe.topics {
                    self.router.borrow_mut().unsubscribe(self.serial, filter);
                }
                conn.queue(&Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)));
            }
            Packet::PingReq => conn.queue(&Packet::PingResp),
            Packet::Disconnect => return Some(End::Disconnected),
            other => {
                return Some(End::Lost(format!("a client may not send {other:?}")));
            }
        }
        None
    }

    fn on_publish<R, W>(&mut self, conn: &mut Connection<R, W>, publish: Publish) -> Option<End> {
        if !router::valid_topic(&publish.topic) {
            return Some(End::Lost(format!(
                "published to an invalid topic {:?}",
                publish.topic
            )));
        }
        let pkid = publish.pkid;
        let qos = publish.qos;
        // A QoS 2 publish sent again before its PUBREL was already routed once.
        let repeat = qos == QoS::ExactlyOnce && !self.awaiting_release.insert(pkid);
        if !repeat {
            self.handed |= 0 < self.router.borrow_mut().publish(&Message {
                topic: publish.topic,
                payload: publish.payload,
                qos,
                retain: publish.retain,
            });
        }
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => conn.queue(&Packet::PubAck(PubAck::new(pkid))),
            QoS::ExactlyOnce => conn.queue(&Packet::PubRec(PubRec::new(pkid))),
        }
        None
    }

    /// Queues `delivery` to the client, with a packet id when it goes at QoS 1.
    fn deliver<R, W>(&mut self, conn: &mut Connection<R, W>, delivery: Delivery) {
        let pkid = if delivery.qos == QoS::AtMostOnce {
            0
        } else {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            self.next_pkid
        };
        conn.queue(&Packet::Publish(Publish {
            dup: false,
            qos: delivery.qos,
            retain: delivery.retain,
            topic: delivery.topic.to_string(),
            pkid,
            payload: delivery.payload,
        }));
    }
}
