//! The session's intake is bounded: when the broker stops taking the host's answers
//! (it never acknowledges them, so they pile up in the client's queue) while requests
//! keep coming, the host holds a bounded number of requests and refuses the rest with
//! 503 at once instead of growing without end. The broker here is a minimal MQTT
//! peer written for the purpose, since no real broker can be told to stop
//! acknowledging; the host, its handler and its MQTT client are the real ones.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, Publish, SubAck, SubscribeReasonCode,
};
use testkit::{HandlerDir, host_config};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

const DEVICE: &str = "intake-device";
const REQUESTS: usize = 3000;

/// Reads one MQTT packet, reading more bytes as needed.
async fn read_packet(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    buffer: &mut BytesMut,
) -> Option<Packet> {
    loop {
        match Packet::read(buffer, 1 << 20) {
            Ok(packet) => return Some(packet),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                if stream.read_buf(buffer).await.ok()? == 0 {
                    return None;
                }
            }
            Err(error) => panic!("the host sent a malformed packet: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_while_answers_cannot_drain_is_refused_past_the_intake_bound() {
    let logs = testkit::capture_logs();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handlers = HandlerDir::with(&["echo"]).expect("handlers");
    let config = host_config(
        DEVICE,
        handlers.path(),
        edge_proto::BrokerUrl::tcp("127.0.0.1", port),
    );
    let max_in_flight = config.limits.max_in_flight;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let host = tokio::spawn(edge_host::run(config, async {
        stopped.await.ok();
    }));

    let (mut stream, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .expect("the host connects")
        .expect("accept");
    let mut buffer = BytesMut::new();
    let mut out = BytesMut::new();
    // Handshake: CONNACK, then SUBACK for the request filter; nothing is ever PUBACKed.
    loop {
        match read_packet(&mut stream, &mut buffer).await.expect("open") {
            Packet::Connect(_) => {
                ConnAck::new(ConnectReturnCode::Success, false)
                    .write(&mut out)
                    .expect("connack");
            }
            Packet::Subscribe(subscribe) => {
                SubAck::new(
                    subscribe.pkid,
                    vec![SubscribeReasonCode::Success(QoS::AtMostOnce)],
                )
                .write(&mut out)
                .expect("suback");
                stream.write_all(&out).await.expect("write");
                out.clear();
                break;
            }
            _ => {}
        }
        stream.write_all(&out).await.expect("write");
        out.clear();
    }
    for i in 0..REQUESTS {
        let topic = format!("devices/{DEVICE}/$iothub/methods/POST/echo/?$rid=r{i}");
        Publish::new(topic, QoS::AtMostOnce, b"1".to_vec())
            .write(&mut out)
            .expect("publish");
    }
    stream.write_all(&out).await.expect("write");

    // Drain what the host sends, never acknowledging it, until it has refused some.
    let (mut from_host, to_host) = stream.into_split();
    let drain =
        tokio::spawn(
            async move { while read_packet(&mut from_host, &mut buffer).await.is_some() {} },
        );
    let pending_bound = format!("host intake limit {}", max_in_flight * 4);
    testkit::eventually(
        &format!("requests past the intake bound are refused with 503 ({pending_bound})"),
        Duration::from_secs(30),
        async || (!logs.lines_with(&pending_bound).is_empty()).then_some(()),
    )
    .await;
    assert!(!host.is_finished(), "the host goes on serving");

    stop.send(()).ok();
    drop(to_host);
    drain.abort();
    tokio::time::timeout(Duration::from_secs(30), host)
        .await
        .expect("the host stops")
        .expect("the host task")
        .expect("a clean run");
}
