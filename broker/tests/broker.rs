//! The embedded broker as its clients see it: rumqttc clients (the ones edge-host and
//! edge-invoker use) and raw sockets for what a well-behaved client never sends.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use edge_proto::BrokerUrl;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, LastWill, Packet, Subscribe};
use rumqttc::{AsyncClient, Event, Incoming, Publish};
use tokio::sync::mpsc;

/// How long anything expected may take to arrive.
const WAIT: Duration = Duration::from_secs(5);

fn broker() -> BrokerUrl {
    edge_broker::start(([127, 0, 0, 1], 0).into())
        .expect("broker starts")
        .url
}

/// A connected rumqttc client and the publishes it receives.
struct Client {
    client: AsyncClient,
    received: mpsc::UnboundedReceiver<Publish>,
    /// Resolves when the connection ends.
    closed: tokio::sync::oneshot::Receiver<()>,
}

impl Client {
    async fn connect(url: &BrokerUrl, id: &str) -> Self {
        Self::connect_with(url, id, |_| {}).await
    }

    async fn connect_with(
        url: &BrokerUrl,
        id: &str,
        configure: impl FnOnce(&mut rumqttc::MqttOptions),
    ) -> Self {
        let mut options = edge_proto::client::options(
            id,
            url,
            &edge_proto::transport::Security::default(),
            Duration::from_secs(30),
        )
        .expect("options");
        configure(&mut options);
        let (client, mut eventloop) =
            edge_proto::client::start(options, 64, Duration::from_secs(5));
        let (tx, received) = mpsc::unbounded_channel();
        let (connected_tx, connected) = tokio::sync::oneshot::channel();
        let (closed_tx, closed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut connected_tx = Some(connected_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(ack.code);
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(publish))) => {
                        let _ = tx.send(publish);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let _ = closed_tx.send(());
        });
        let code = tokio::time::timeout(WAIT, connected)
            .await
            .expect("CONNACK in time")
            .expect("event loop alive");
        assert_eq!(code, ConnectReturnCode::Success);
        Self {
            client,
            received,
            closed,
        }
    }

    async fn subscribe(&self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.expect("subscribe");
    }

    /// The next publish received, within [`WAIT`].
    async fn next(&mut self) -> Publish {
        tokio::time::timeout(WAIT, self.received.recv())
            .await
            .expect("a publish in time")
            .expect("client running")
    }

    /// Whether nothing arrives for `quiet`.
    async fn nothing_for(&mut self, quiet: Duration) -> Option<Publish> {
        tokio::time::timeout(quiet, self.received.recv())
            .await
            .ok()
            .flatten()
    }
}

/// A raw MQTT connection for what rumqttc would not send.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    fn open(url: &BrokerUrl) -> Self {
        let stream = TcpStream::connect((url.host.as_str(), url.port)).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    fn send(&mut self, packet: &Packet) {
        self.try_send(packet).expect("send");
    }

    /// Sends `packet`, which the broker may refuse (and close on) before it has all of it.
    fn try_send(&mut self, packet: &Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).expect("encode");
        self.stream.write_all(&out)
    }

    fn connect(url: &BrokerUrl, connect: Connect) -> Self {
        let mut raw = Self::open(url);
        raw.send(&Packet::Connect(connect));
        assert_eq!(
            raw.read(),
            Some(Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::Success,
                false
            )))
        );
        raw
    }

    /// The next packet, or `None` when the broker closed the connection.
    fn read(&mut self) -> Option<Packet> {
        let mut chunk = [0u8; 4096];
        loop {
            match Packet::read(&mut self.buf, usize::MAX) {
                Ok(packet) => return Some(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(error) => panic!("the broker sent a malformed packet: {error}"),
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(error) => panic!("no packet and no close within {WAIT:?}: {error}"),
            }
        }
    }
}

fn connect_packet(id: &str, keep_alive: u16, will: Option<LastWill>) -> Connect {
    let mut connect = Connect::new(id);
    connect.keep_alive = keep_alive;
    connect.last_will = will;
    connect
}

/// Subscribes `device` to device d1's requests (at `qos`) and `caller` to its answers,
/// and waits until both subscriptions took effect.
async fn method_pair(device: &mut Client, caller: &Client, qos: QoS) {
    device
        .subscribe("devices/d1/$iothub/methods/POST/#", qos)
        .await;
    caller
        .subscribe("devices/d1/$iothub/methods/res/+/#", QoS::AtLeastOnce)
        .await;
    // The subscriptions are in place once a probe through them arrives.
    settle(
        caller,
        device,
        "devices/d1/$iothub/methods/POST/probe/?$rid=0",
    )
    .await;
}

/// Call `rid` from `caller` to `device` (a [`method_pair`]) at `qos`, which the device
/// answers at QoS 1 with the payload it got: the request as the device received it,
/// and the answer as the caller did, each checked to be on its topic.
async fn round_trip(
    caller: &mut Client,
    device: &mut Client,
    rid: u32,
    qos: QoS,
    payload: Vec<u8>,
) -> (Publish, Publish) {
    let request = format!("devices/d1/$iothub/methods/POST/echo/?$rid={rid}");
    caller
        .client
        .publish(&request, qos, false, payload)
        .await
        .expect("publish");
    let got = device.next().await;
    assert_eq!(got.topic, request);
    let answer = format!("devices/d1/$iothub/methods/res/200/?$rid={rid}");
    device
        .client
        .publish(&answer, QoS::AtLeastOnce, false, got.payload.clone())
        .await
        .expect("publish");
    let back = caller.next().await;
    assert_eq!(back.topic, answer);
    (got, back)
}

#[tokio::test]
async fn a_request_and_its_answer_cross_the_broker_through_wildcards() {
    let url = broker();
    let mut device = Client::connect(&url, "device").await;
    let mut caller = Client::connect(&url, "caller").await;
    method_pair(&mut device, &caller, QoS::AtMostOnce).await;
    for rid in 1..=50 {
        let payload = format!("{{\"n\":{rid}}}").into_bytes();
        let (got, back) = round_trip(&mut caller, &mut device, rid, QoS::AtMostOnce, payload).await;
        assert_eq!(got.qos, QoS::AtMostOnce);
        assert_eq!(back.qos, QoS::AtLeastOnce);
        assert_eq!(back.payload, got.payload);
        assert!(!back.retain);
    }
}

/// Publishes on `topic` from `from` until `to` receives it: subscriptions are
/// acknowledged asynchronously, so this shows they are in place.
async fn settle(from: &Client, to: &mut Client, topic: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        from.client
            .publish(topic, QoS::AtMostOnce, false, "probe")
            .await
            .expect("publish");
        if let Some(got) = to.nothing_for(Duration::from_millis(100)).await {
            assert_eq!(got.topic, topic);
            while to.nothing_for(Duration::from_millis(100)).await.is_some() {}
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the subscription never took effect"
        );
    }
}

#[tokio::test]
async fn a_retained_message_reaches_later_subscribers_until_it_is_cleared() {
    let url = broker();
    let publisher = Client::connect(&url, "publisher").await;
    publisher
        .client
        .publish(
            "devices/d1/$edge/presence",
            QoS::AtLeastOnce,
            true,
            r#"{"online":true}"#,
        )
        .await
        .expect("publish");
    let mut late = Client::connect(&url, "late").await;
    late.subscribe("devices/+/$edge/presence", QoS::AtLeastOnce)
        .await;
    let got = late.next().await;
    assert_eq!(got.topic, "devices/d1/$edge/presence");
    assert_eq!(&got.payload[..], br#"{"online":true}"#);
    assert!(
        got.retain,
        "a retained message sent on subscribing is marked retained"
    );

    // An empty retained payload clears it: a new subscriber gets nothing.
    publisher
        .client
        .publish("devices/d1/$edge/presence", QoS::AtLeastOnce, true, "")
        .await
        .expect("publish");
    let cleared = late.next().await;
    assert!(cleared.payload.is_empty() && !cleared.retain);
    let mut later = Client::connect(&url, "later").await;
    later
        .subscribe("devices/+/$edge/presence", QoS::AtLeastOnce)
        .await;
    assert!(
        later
            .nothing_for(Duration::from_millis(500))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_lost_connection_publishes_its_will_and_a_disconnect_does_not() {
    let url = broker();
    let mut watcher = Client::connect(&url, "watcher").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    // Let the subscription land before the wills go.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let will = |name: &str| LastWill::new(format!("wills/{name}"), "gone", QoS::AtLeastOnce, true);
    let polite = Raw::connect(&url, connect_packet("polite", 60, Some(will("polite"))));
    let mut polite = polite;
    polite.send(&Packet::Disconnect);
    drop(polite);
    let abrupt = Raw::connect(&url, connect_packet("abrupt", 60, Some(will("abrupt"))));
    drop(abrupt);

    let got = watcher.next().await;
    assert_eq!(got.topic, "wills/abrupt");
    assert_eq!(&got.payload[..], b"gone");
    assert!(
        watcher
            .nothing_for(Duration::from_millis(500))
            .await
            .is_none(),
        "a client that said DISCONNECT has its will dropped"
    );
    // The will was retained: a new subscriber still reads it.
    let mut late = Client::connect(&url, "late").await;
    late.subscribe("wills/abrupt", QoS::AtLeastOnce).await;
    assert!(late.next().await.retain);
}

#[tokio::test]
async fn a_client_silent_past_its_keep_alive_is_dropped_and_its_will_published() {
    let url = broker();
    let mut watcher = Client::connect(&url, "watcher").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut silent = Raw::connect(
        &url,
        connect_packet(
            "silent",
            1,
            Some(LastWill::new(
                "wills/silent",
                "timed out",
                QoS::AtMostOnce,
                false,
            )),
        ),
    );
    let started = Instant::now();
    assert_eq!(
        silent.read(),
        None,
        "the broker closes the silent connection"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "closed after {:?}, before the keep-alive ran out",
        started.elapsed()
    );
    assert_eq!(watcher.next().await.topic, "wills/silent");
}

#[tokio::test]
async fn a_second_connection_with_the_same_id_replaces_the_first() {
    let url = broker();
    let mut watcher = Client::connect(&url, "watcher").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    watcher.subscribe("to/twin", QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut first = Raw::connect(
        &url,
        connect_packet(
            "twin",
            60,
            Some(LastWill::new(
                "wills/twin",
                "replaced",
                QoS::AtMostOnce,
                false,
            )),
        ),
    );
    first.send(&Packet::Subscribe(Subscribe::new(
        "to/twin",
        QoS::AtMostOnce,
    )));
    assert!(matches!(first.read(), Some(Packet::SubAck(_))));

    let mut second = Client::connect(&url, "twin").await;
    assert_eq!(first.read(), None, "the first connection is closed");
    assert_eq!(watcher.next().await.topic, "wills/twin");
    // The first connection's subscriptions went with it; the second's work.
    second.subscribe("to/twin", QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    watcher
        .client
        .publish("to/twin", QoS::AtLeastOnce, false, "hello")
        .await
        .expect("publish");
    assert_eq!(&second.next().await.payload[..], b"hello");
    assert_eq!(&watcher.next().await.payload[..], b"hello");
}

#[tokio::test]
async fn wildcards_at_the_first_level_do_not_reach_dollar_topics() {
    let url = broker();
    let mut all = Client::connect(&url, "all").await;
    all.subscribe("#", QoS::AtMostOnce).await;
    let mut dollar = Client::connect(&url, "dollar").await;
    dollar.subscribe("$iothub/#", QoS::AtMostOnce).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    all.client
        .publish(
            "$iothub/methods/POST/m/?$rid=1",
            QoS::AtMostOnce,
            false,
            "x",
        )
        .await
        .expect("publish");
    assert_eq!(dollar.next().await.topic, "$iothub/methods/POST/m/?$rid=1");
    assert!(all.nothing_for(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn a_qos2_publish_is_delivered_once_and_completed() {
    let url = broker();
    let mut subscriber = Client::connect(&url, "subscriber").await;
    subscriber.subscribe("q2", QoS::ExactlyOnce).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut raw = Raw::connect(&url, connect_packet("q2-publisher", 60, None));
    let mut publish = rumqttc::mqttbytes::v4::Publish::new("q2", QoS::ExactlyOnce, "once");
    publish.pkid = 7;
    raw.send(&Packet::Publish(publish.clone()));
    assert_eq!(
        raw.read(),
        Some(Packet::PubRec(rumqttc::mqttbytes::v4::PubRec::new(7)))
    );
    // Sent again before PUBREL (a retry): acknowledged, not delivered twice.
    publish.dup = true;
    raw.send(&Packet::Publish(publish));
    assert_eq!(
        raw.read(),
        Some(Packet::PubRec(rumqttc::mqttbytes::v4::PubRec::new(7)))
    );
    raw.send(&Packet::PubRel(rumqttc::mqttbytes::v4::PubRel::new(7)));
    assert_eq!(
        raw.read(),
        Some(Packet::PubComp(rumqttc::mqttbytes::v4::PubComp::new(7)))
    );
    let got = subscriber.next().await;
    assert_eq!(got.qos, QoS::AtLeastOnce, "QoS 2 is delivered at QoS 1");
    assert!(
        subscriber
            .nothing_for(Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn bad_input_closes_only_the_connection_that_sent_it() {
    let url = broker();
    let mut device = Client::connect(&url, "device").await;
    device.subscribe("ok/#", QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // MQTT 5 is refused with "unacceptable protocol version".
    let mut v5 = Raw::open(&url);
    v5.stream
        .write_all(&[
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 0, 0, 0,
        ])
        .expect("send");
    assert_eq!(
        v5.read(),
        Some(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::RefusedProtocolVersion,
            false
        )))
    );
    assert_eq!(v5.read(), None);

    // Garbage first, a publish before CONNECT, a packet over the size limit, a
    // publish to a wildcard topic: each closes its own connection.
    let mut garbage = Raw::open(&url);
    garbage
        .stream
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .expect("send");
    assert_eq!(garbage.read(), None);

    let mut early = Raw::open(&url);
    early.send(&Packet::Publish(rumqttc::mqttbytes::v4::Publish::new(
        "ok/early",
        QoS::AtMostOnce,
        "x",
    )));
    assert_eq!(early.read(), None);

    let mut big = Raw::connect(&url, connect_packet("big", 60, None));
    // The broker closes on the packet's header: the rest may not be written.
    let _ = big.try_send(&Packet::Publish(
        rumqttc::mqttbytes::v4::Publish::from_bytes(
            "ok/big",
            QoS::AtMostOnce,
            Bytes::from(vec![b'x'; edge_proto::client::MAX_PACKET + 1]),
        ),
    ));
    assert_eq!(big.read(), None);

    let mut wild = Raw::connect(&url, connect_packet("wild", 60, None));
    wild.send(&Packet::Publish(rumqttc::mqttbytes::v4::Publish::new(
        "ok/+",
        QoS::AtMostOnce,
        "x",
    )));
    assert_eq!(wild.read(), None);

    // An invalid filter is refused in the SUBACK, and the connection stays.
    let mut filters = Raw::connect(&url, connect_packet("filters", 60, None));
    filters.send(&Packet::Subscribe(Subscribe::new(
        "a/#/b",
        QoS::AtLeastOnce,
    )));
    match filters.read() {
        Some(Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            vec![rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure]
        ),
        other => panic!("expected a SUBACK, got {other:?}"),
    }
    filters.send(&Packet::PingReq);
    assert_eq!(filters.read(), Some(Packet::PingResp));

    // Nothing of that reached the subscriber, and the broker still serves.
    assert!(
        device
            .nothing_for(Duration::from_millis(200))
            .await
            .is_none()
    );
    let other = Client::connect(&url, "other").await;
    other
        .client
        .publish("ok/after", QoS::AtLeastOnce, false, "fine")
        .await
        .expect("publish");
    assert_eq!(device.next().await.topic, "ok/after");
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_holds_up_no_one_else() {
    let url = broker();
    let mut stuck = Raw::connect(&url, connect_packet("stuck", 0, None));
    stuck.send(&Packet::Subscribe(Subscribe::new(
        "flood/#",
        QoS::AtLeastOnce,
    )));
    assert!(matches!(stuck.read(), Some(Packet::SubAck(_))));
    let mut reader = Client::connect(&url, "reader").await;
    reader.subscribe("flood/#", QoS::AtMostOnce).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Far more than the stuck client's socket buffers and queue hold, at the pace of
    // the broker's acknowledgements.
    let publisher = Client::connect_with(&url, "publisher", |o| {
        o.set_inflight(20);
    })
    .await;
    let payload = vec![b'x'; 16 * 1024];
    let count = 3000;
    let publishing = tokio::spawn(async move {
        for i in 0..count {
            publisher
                .client
                .publish(
                    format!("flood/{i}"),
                    QoS::AtLeastOnce,
                    false,
                    payload.clone(),
                )
                .await
                .expect("publish");
        }
        publisher
    });
    for i in 0..count {
        let got = reader.next().await;
        assert_eq!(got.topic, format!("flood/{i}"));
    }
    let _publisher = publishing.await.expect("publisher");
    drop(stuck);
}

#[tokio::test]
async fn the_closed_event_loop_of_a_replaced_client_reports_it() {
    // A replaced rumqttc client sees its connection end (and would reconnect): the
    // broker does not leave it hanging.
    let url = broker();
    let first = Client::connect(&url, "same").await;
    let _second = Client::connect(&url, "same").await;
    tokio::time::timeout(WAIT, first.closed)
        .await
        .expect("the first client's connection ends")
        .expect("event loop reported");
}

/// Sends CONNECT on an in-process connection and returns its CONNACK.
async fn connect_pipe(pipe: &mut tokio::io::DuplexStream, connect: Connect) -> Option<Packet> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut out = BytesMut::new();
    Packet::Connect(connect)
        .write(&mut out, usize::MAX)
        .expect("encode");
    pipe.write_all(&out).await.expect("write CONNECT");
    let mut input = BytesMut::new();
    loop {
        match Packet::read(&mut input, usize::MAX) {
            Ok(packet) => return Some(packet),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(error) => panic!("the broker sent a malformed packet: {error}"),
        }
        let read = tokio::time::timeout(WAIT, pipe.read_buf(&mut input))
            .await
            .expect("an answer in time")
            .expect("read");
        if read == 0 {
            return None;
        }
    }
}

#[tokio::test]
async fn clients_of_the_brokers_own_process_meet_tcp_clients_through_its_link() {
    let running = edge_broker::start(([127, 0, 0, 1], 0).into()).expect("broker starts");
    let url = running.url.clone();
    let connector = running.link.connector();
    let mut device = Client::connect_with(&url, "device", |options| {
        options.set_transport(rumqttc::Transport::Custom(connector));
    })
    .await;
    let mut caller = Client::connect(&url, "caller").await;
    caller.subscribe("devices/d2/#", QoS::AtLeastOnce).await;
    method_pair(&mut device, &caller, QoS::AtLeastOnce).await;
    for rid in 1..=20 {
        let (got, back) = round_trip(
            &mut caller,
            &mut device,
            rid,
            QoS::AtLeastOnce,
            vec![b'x'; 4096],
        )
        .await;
        assert_eq!((got.payload.len(), back.payload), (4096, got.payload));
    }

    // An in-process connection that ends without DISCONNECT leaves its will.
    let mut pipe = running
        .link
        .open()
        .expect("the broker takes the connection");
    let will = LastWill::new("devices/d2/gone", "lost", QoS::AtLeastOnce, false);
    assert_eq!(
        connect_pipe(&mut pipe, connect_packet("d2", 60, Some(will))).await,
        Some(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false
        )))
    );
    drop(pipe);
    let got = caller.next().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("devices/d2/gone", &b"lost"[..])
    );
}

#[test]
fn a_link_to_a_broker_whose_event_loop_ended_refuses_to_open() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    let running = local.block_on(&runtime, async {
        let running = edge_broker::start_here(([127, 0, 0, 1], 0).into()).expect("broker starts");
        let mut pipe = running.link.open().expect("open");
        assert!(
            matches!(
                connect_pipe(&mut pipe, connect_packet("c", 60, None)).await,
                Some(Packet::ConnAck(_))
            ),
            "the broker serves the pipe while its loop runs"
        );
        running
    });
    drop(local);
    let error = running.link.open().expect_err("the broker is gone");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
}
