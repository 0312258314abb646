//! The device endpoint, driven by a raw MQTT client the way IoT Hub's device SDKs
//! speak: authentication, the topic mapping to the backend, twins, telemetry, and the
//! rules a real hub enforces by disconnecting.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{
    Attempt, TestHub, connect_device, connect_for_methods, connect_raw, connect_raw_with,
    method_device, thumbprints, username,
};
use edge_hub::registry::DeviceChange;
use edge_invoker::{CallError, CallRequest, Caller, ConnectOptions};
use rumqttc::{ConnectReturnCode, Packet, QoS};
use serde_json::json;

async fn caller(hub: &TestHub) -> Caller {
    Caller::connect(ConnectOptions::new(hub.broker()))
        .await
        .unwrap()
}

/// The next request the raw device gets.
async fn next_request(device: &mut common::RawDevice) -> rumqttc::Publish {
    let Packet::Publish(request) = device
        .until(|p| matches!(p, Packet::Publish(_)))
        .await
        .unwrap()
    else {
        unreachable!()
    };
    request
}

/// Answers `request` from the raw device with 200 and `payload`.
async fn answer(device: &mut common::RawDevice, request: &rumqttc::Publish, payload: Vec<u8>) {
    let rid = request.topic.split("$rid=").nth(1).unwrap().to_owned();
    device
        .publish_acked(&format!("$iothub/methods/res/200/?$rid={rid}"), payload)
        .await
        .unwrap();
}

/// Answers the next request the raw device gets with 200 and the request's payload.
async fn answer_one(device: &mut common::RawDevice) -> String {
    let request = next_request(device).await;
    answer(device, &request, request.payload.to_vec()).await;
    request.topic
}

#[tokio::test]
async fn a_device_on_the_hub_is_called_by_edge_invoker_on_the_backend() {
    let hub = TestHub::start().await.unwrap();
    let mut device = method_device(&hub, "d1").await.unwrap();
    let caller = caller(&hub).await;
    let call = tokio::spawn({
        let caller = caller.clone();
        async move {
            caller
                .call(&CallRequest::new("d1", "ping", r#"{"n":42}"#))
                .await
        }
    });
    let topic = answer_one(&mut device).await;
    assert!(
        topic.starts_with("$iothub/methods/POST/ping/?$rid="),
        "the device sees IoT Hub's bare topic: {topic}"
    );
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.payload.to_value(), serde_json::json!({"n":42}));
    hub.stop().await;
}

#[tokio::test]
async fn on_one_event_loop_with_its_broker_the_hub_relays_calls_from_the_backend_and_its_api() {
    let local = tokio::task::LocalSet::new();
    let broker = local
        .run_until(async {
            let hub = TestHub::start_embedded().await.unwrap();
            let mut device = method_device(&hub, "d1").await.unwrap();
            testkit::presence(&hub.broker(), "d1", true, Duration::from_secs(5))
                .await
                .unwrap();
            let caller = caller(&hub).await;
            let call = tokio::spawn({
                let caller = caller.clone();
                async move { caller.call(&CallRequest::new("d1", "ping", "[1]")).await }
            });
            answer_one(&mut device).await;
            let response = call.await.unwrap().unwrap();
            assert_eq!(
                (response.status, response.payload.to_value()),
                (200, json!([1]))
            );

            let body = json!({"methodName": "ping", "payload": {"n": 2}});
            let path = "/twins/d1/methods?api-version=2021-04-12";
            let (answer, _) =
                tokio::join!(hub.rest("POST", path, Some(&body)), answer_one(&mut device));
            assert_eq!(
                answer.unwrap(),
                (200, json!({"status": 200, "payload": {"n": 2}}))
            );
            // The hub's own sessions (its Caller, the presence watch, d1's backend
            // session) reach the broker in memory: the test's caller is the only socket
            // connected to it.
            let port = hub.broker().port;
            testkit::eventually(
                "only the test's caller connected over TCP",
                Duration::from_secs(5),
                async || (testkit::connections_to(port).unwrap() == 1).then_some(()),
            )
            .await;
            caller.disconnect().await;
            let broker = hub.hub.broker.clone();
            hub.stop().await;
            broker
        })
        .await;
    // The broker was a task of the set: gone with it, not running on a thread of its own.
    drop(local);
    let refused = tokio::net::TcpStream::connect((broker.host.as_str(), broker.port)).await;
    assert!(refused.is_err(), "the broker still listens on {broker}");
}

#[tokio::test]
async fn a_device_is_online_on_the_backend_only_while_subscribed_to_methods() {
    online_only_while_connected(TestHub::start().await.unwrap()).await;
}

/// The same on the hub's default path: its embedded broker, which its devices' backend
/// sessions reach in memory (their end, polite or not, closes the pipe).
#[tokio::test]
async fn on_its_embedded_broker_a_device_is_online_only_while_connected() {
    tokio::task::LocalSet::new()
        .run_until(async {
            online_only_while_connected(TestHub::start_embedded().await.unwrap()).await;
        })
        .await;
}

/// A device through `hub` is online on the backend while subscribed to methods, and
/// offline once it disconnects or its connection is lost; a call then finds it offline.
async fn online_only_while_connected(hub: TestHub) {
    let key = hub.add_device("d1");
    let mut device = connect_for_methods(&hub, "d1", &key).await.unwrap();
    testkit::presence(&hub.broker(), "d1", true, Duration::from_secs(5))
        .await
        .unwrap();
    device.client.disconnect().await.unwrap();
    let _ = device.closed_within(Duration::from_secs(5)).await;
    testkit::presence(&hub.broker(), "d1", false, Duration::from_secs(5))
        .await
        .unwrap();
    let error = caller(&hub)
        .await
        .call(&CallRequest::new("d1", "ping", ""))
        .await
        .unwrap_err();
    assert!(matches!(error, CallError::NotOnline { .. }), "{error:?}");
    // Back, then gone without DISCONNECT (its socket dropped).
    let device = connect_for_methods(&hub, "d1", &key).await.unwrap();
    testkit::presence(&hub.broker(), "d1", true, Duration::from_secs(5))
        .await
        .unwrap();
    drop(device);
    testkit::presence(&hub.broker(), "d1", false, Duration::from_secs(5))
        .await
        .unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn bad_credentials_are_refused_with_connack_codes() {
    let hub = TestHub::start().await.unwrap();
    let key = hub.add_device("d1");
    let other_key = hub.add_device("d2");
    let cases = [
        (
            "wrong key",
            "d1",
            username("d1"),
            TestHub::device_token("d1", &other_key, 3600),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            "expired token",
            "d1",
            username("d1"),
            edge_proto::iothub::sign("localhost/devices/d1", &key, 1000, None).unwrap(),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            "token for another device",
            "d1",
            username("d1"),
            TestHub::device_token("d2", &other_key, 3600),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            "unregistered device",
            "d9",
            username("d9"),
            TestHub::device_token("d9", &key, 3600),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            "username for another device",
            "d1",
            username("d2"),
            TestHub::device_token("d1", &key, 3600),
            ConnectReturnCode::BadUserNamePassword,
        ),
        (
            "password not a token",
            "d1",
            username("d1"),
            "hunter2".to_owned(),
            ConnectReturnCode::BadUserNamePassword,
        ),
    ];
    for (what, id, user, password, code) in cases {
        match connect_raw(&hub, id, &user, &password).await {
            Attempt::Refused(got) => assert_eq!(got, code, "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    // And the right token connects, so the refusals above were about the credentials.
    connect_device(&hub, "d1", &key).await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn what_iot_hub_refuses_disconnects_the_device() {
    let hub = TestHub::start().await.unwrap();
    let key = hub.add_device("d1");
    hub.add_device("d2");
    for (what, topic, retain) in [
        (
            "another device's telemetry",
            "devices/d2/messages/events/",
            false,
        ),
        ("an unknown topic", "hello/world", false),
        (
            "a retained telemetry message",
            "devices/d1/messages/events/",
            true,
        ),
        (
            "another device's namespace",
            "devices/d2/$iothub/methods/res/200/?$rid=1",
            false,
        ),
    ] {
        let mut device = connect_device(&hub, "d1", &key).await.unwrap();
        device
            .client
            .publish(topic, QoS::AtLeastOnce, retain, b"{}".to_vec())
            .await
            .unwrap();
        device
            .closed_within(Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let mut device = connect_device(&hub, "d1", &key).await.unwrap();
    device
        .client
        .subscribe("devices/d2/#", QoS::AtMostOnce)
        .await
        .unwrap();
    device.closed_within(Duration::from_secs(5)).await.unwrap();

    let mut device = connect_device(&hub, "d1", &key).await.unwrap();
    for filter in [
        "$iothub/methods/POST/#",
        "$iothub/twin/res/#",
        "$iothub/twin/PATCH/properties/desired/#",
        "devices/d1/messages/devicebound/#",
    ] {
        device.subscribe(filter).await.unwrap();
    }
    // Four allowed filters pass; a sixth subscription (any) is one too many, and an
    // unknown filter is refused anyway.
    device
        .client
        .subscribe("$iothub/unknown/#", QoS::AtMostOnce)
        .await
        .unwrap();
    device.closed_within(Duration::from_secs(5)).await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn a_token_that_expires_ends_the_connection() {
    let hub = TestHub::start().await.unwrap();
    let key = hub.add_device("d1");
    let token = TestHub::device_token("d1", &key, 2);
    let Attempt::Connected(mut device) = connect_raw(&hub, "d1", &username("d1"), &token).await
    else {
        panic!("connects");
    };
    let took = device.closed_within(Duration::from_secs(6)).await.unwrap();
    assert!(took <= Duration::from_secs(4), "closed after {took:?}");
    hub.stop().await;
}

#[tokio::test]
async fn a_second_connection_of_a_device_drops_the_first() {
    let hub = TestHub::start().await.unwrap();
    let key = hub.add_device("d1");
    let mut first = connect_device(&hub, "d1", &key).await.unwrap();
    let mut second = connect_device(&hub, "d1", &key).await.unwrap();
    first.closed_within(Duration::from_secs(5)).await.unwrap();
    second.subscribe("$iothub/methods/POST/#").await.unwrap();
    let caller = caller(&hub).await;
    let call = tokio::spawn(async move { caller.call(&CallRequest::new("d1", "ping", "1")).await });
    answer_one(&mut second).await;
    assert_eq!(call.await.unwrap().unwrap().status, 200);
    hub.stop().await;
}

#[tokio::test]
async fn twins_are_read_and_reported_properties_patched_and_versioned() {
    let hub = TestHub::start().await.unwrap();
    let key = hub.add_device("d1");
    let mut device = connect_device(&hub, "d1", &key).await.unwrap();
    device.subscribe("$iothub/twin/res/#").await.unwrap();
    device
        .client
        .publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=7",
            QoS::AtMostOnce,
            false,
            br#"{"firmware":"1.2"}"#.to_vec(),
        )
        .await
        .unwrap();
    let Packet::Publish(ack) = device
        .until(|p| matches!(p, Packet::Publish(_)))
        .await
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!(ack.topic, "$iothub/twin/res/204/?$rid=7&$version=2");
    device
        .client
        .publish(
            "$iothub/twin/GET/?$rid=8",
            QoS::AtMostOnce,
            false,
            Vec::new(),
        )
        .await
        .unwrap();
    let Packet::Publish(twin) = device
        .until(|p| matches!(p, Packet::Publish(_)))
        .await
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!(twin.topic, "$iothub/twin/res/200/?$rid=8");
    let twin: serde_json::Value = serde_json::from_slice(&twin.payload).unwrap();
    assert_eq!(
        twin,
        serde_json::json!({"desired":{"$version":1},"reported":{"firmware":"1.2","$version":2}})
    );
    device
        .client
        .publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=9",
            QoS::AtMostOnce,
            false,
            b"not json".to_vec(),
        )
        .await
        .unwrap();
    let Packet::Publish(refused) = device
        .until(|p| matches!(p, Packet::Publish(_)))
        .await
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!(refused.topic, "$iothub/twin/res/400/?$rid=9");
    hub.stop().await;
}

#[tokio::test]
async fn telemetry_reaches_the_backend_under_the_devices_topic() {
    let hub = TestHub::start().await.unwrap();
    let key = hub.add_device("d1");
    let mut listener =
        testkit::RawClient::connect(&hub.broker(), &["devices/d1/messages/events/#".to_owned()])
            .await
            .unwrap();
    let mut device = connect_device(&hub, "d1", &key).await.unwrap();
    device
        .publish_acked(
            "devices/d1/messages/events/%24.ct=application%2Fjson",
            br#"{"t":21.5}"#.to_vec(),
        )
        .await
        .unwrap();
    let (topic, payload) = listener
        .next_where(Duration::from_secs(5), |t| {
            t.starts_with("devices/d1/messages/events/")
        })
        .await
        .unwrap();
    assert_eq!(
        topic,
        "devices/d1/messages/events/%24.ct=application%2Fjson"
    );
    assert_eq!(payload, br#"{"t":21.5}"#);
    hub.stop().await;
}

/// A self-signed certificate for `cn`: (certificate PEM, key PEM, DER).
fn self_signed(cn: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![cn.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (
        cert.pem().into_bytes(),
        key.serialize_pem().into_bytes(),
        cert.der().to_vec(),
    )
}

#[tokio::test]
async fn a_device_with_a_registered_certificate_connects_without_a_token() {
    let hub = TestHub::start().await.unwrap();
    let (cert, key, der) = self_signed("x1");
    hub.add_device("x1");
    let [sha256, _] = edge_hub::pki::thumbprints(&der);
    hub.hub
        .registry
        .put_device("x1", thumbprints(sha256.to_ascii_lowercase()), Some("*"))
        .unwrap();
    let Attempt::Connected(mut device) = connect_raw_with(
        &hub,
        "x1",
        &username("x1"),
        "",
        Some((cert.clone(), key.clone())),
    )
    .await
    else {
        panic!("the registered certificate connects");
    };
    device.subscribe("$iothub/methods/POST/#").await.unwrap();
    let caller = caller(&hub).await;
    let call = tokio::spawn(async move { caller.call(&CallRequest::new("x1", "ping", "2")).await });
    answer_one(&mut device).await;
    assert_eq!(call.await.unwrap().unwrap().status, 200);

    let (other_cert, other_key, _) = self_signed("x1");
    for (what, client_auth, code) in [
        (
            "an unregistered certificate",
            Some((other_cert, other_key)),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            "neither token nor certificate",
            None,
            ConnectReturnCode::BadUserNamePassword,
        ),
    ] {
        match connect_raw_with(&hub, "x1", &username("x1"), "", client_auth).await {
            Attempt::Refused(got) => assert_eq!(got, code, "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    // The certificate is the device's, not any device's.
    hub.add_device("x2");
    match connect_raw_with(&hub, "x2", &username("x2"), "", Some((cert, key))).await {
        Attempt::Refused(got) => assert_eq!(got, ConnectReturnCode::NotAuthorized),
        other => panic!("another device with x1's certificate: {other:?}"),
    }
    hub.stop().await;
}

/// A CA for device certificates: (its certificate PEM, the issuer to sign with).
fn device_ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), rcgen::Issuer::new(params, key))
}

/// A client certificate whose CN is `cn`, signed by `ca`: (certificate PEM, key PEM).
fn signed_by(ca: &rcgen::Issuer<'static, rcgen::KeyPair>, cn: &str) -> (Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

#[tokio::test]
async fn a_device_with_a_certificate_signed_by_a_registered_ca_connects_by_its_cn() {
    let hub = TestHub::start().await.unwrap();
    let (ca_pem, ca) = device_ca("fleet CA");
    hub.hub.registry.add_certificate("fleet", &ca_pem).unwrap();
    for id in ["ca-1", "ca-2"] {
        hub.add_device(id);
        let change = DeviceChange {
            x509_ca: Some(true),
            ..DeviceChange::default()
        };
        hub.hub.registry.put_device(id, change, Some("*")).unwrap();
    }
    let good = signed_by(&ca, "ca-1");
    let Attempt::Connected(mut device) =
        connect_raw_with(&hub, "ca-1", &username("ca-1"), "", Some(good.clone())).await
    else {
        panic!("a certificate with CN ca-1 signed by the registered CA connects as ca-1");
    };
    device.subscribe("$iothub/methods/POST/#").await.unwrap();
    let caller = caller(&hub).await;
    let call =
        tokio::spawn(async move { caller.call(&CallRequest::new("ca-1", "ping", "3")).await });
    answer_one(&mut device).await;
    assert_eq!(call.await.unwrap().unwrap().status, 200);
    drop(device);

    let (_, other_ca) = device_ca("someone else's CA");
    hub.add_device("plain");
    for (what, id, client_auth) in [
        (
            "a CN of another device",
            "ca-2",
            Some(signed_by(&ca, "ca-1")),
        ),
        (
            "a CA the registry does not trust",
            "ca-1",
            Some(signed_by(&other_ca, "ca-1")),
        ),
        (
            "a device not registered for CA-signed certificates",
            "plain",
            Some(signed_by(&ca, "plain")),
        ),
    ] {
        match connect_raw_with(&hub, id, &username(id), "", client_auth).await {
            Attempt::Refused(got) => assert_eq!(got, ConnectReturnCode::NotAuthorized, "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    // Once the CA is no longer trusted, its certificates no longer connect.
    hub.hub.registry.remove_certificate("fleet").unwrap();
    match connect_raw_with(&hub, "ca-1", &username("ca-1"), "", Some(good)).await {
        Attempt::Refused(got) => assert_eq!(got, ConnectReturnCode::NotAuthorized),
        other => panic!("after the CA was removed: {other:?}"),
    }
    hub.stop().await;
}

/// Publishes a request for `method` to d1 on the backend, as a caller does, and returns
/// the status and error code of the answer to `rid`.
async fn backend_answer(
    backend: &mut testkit::RawClient,
    method: &str,
    rid: &str,
) -> (u16, String) {
    let topic = format!("devices/d1/$iothub/methods/POST/{method}/?$rid={rid}");
    backend.publish(&topic, "{}").await.unwrap();
    let suffix = format!("/?$rid={rid}");
    let (topic, payload) = backend
        .next_where(Duration::from_secs(5), |t| t.ends_with(&suffix))
        .await
        .unwrap();
    let status = topic
        .strip_prefix("devices/d1/$iothub/methods/res/")
        .and_then(|rest| rest.strip_suffix(&suffix))
        .unwrap_or_else(|| panic!("an answer on the response topic: {topic}"));
    let body: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status.parse().unwrap(), code)
}

#[tokio::test]
async fn a_request_the_device_cannot_take_is_answered_by_the_hub_not_dropped() {
    let hub = TestHub::start().await.unwrap();
    let mut device = method_device(&hub, "d1").await.unwrap();
    device.unsubscribe("$iothub/methods/POST/#").await.unwrap();
    let mut backend = testkit::RawClient::connect(
        &hub.broker(),
        &["devices/d1/$iothub/methods/res/#".to_owned()],
    )
    .await
    .unwrap();

    // Connected, not subscribed to methods (as edge-host is while it reconnects).
    let answer = backend_answer(&mut backend, "ping", "r1").await;
    assert_eq!(answer, (503, "notDelivered".to_owned()));

    // A method name no device could be called by, with a request id to answer on.
    device.subscribe("$iothub/methods/POST/#").await.unwrap();
    let answer = backend_answer(&mut backend, "two words", "r2").await;
    assert_eq!(answer, (400, "invalidMethod".to_owned()));
    hub.stop().await;
}

#[tokio::test]
async fn a_caller_sends_a_request_that_was_not_delivered_again_once_the_device_is_back() {
    let hub = TestHub::start().await.unwrap();
    let mut device = method_device(&hub, "d1").await.unwrap();
    device.unsubscribe("$iothub/methods/POST/#").await.unwrap();
    testkit::presence(&hub.broker(), "d1", false, Duration::from_secs(5))
        .await
        .unwrap();
    // The caller's view lags (it saw `online` and sent, as in the moment between the
    // device's UNSUBSCRIBE and its offline presence reaching the caller): a stale
    // presence that says online makes every send meet the hub's "not delivered".
    let backend = testkit::RawClient::connect(
        &hub.broker(),
        &["devices/d1/$iothub/methods/res/#".to_owned()],
    )
    .await
    .unwrap();
    backend
        .publish_retained(
            "devices/d1/$edge/presence",
            r#"{"online":true,"agent":"stale"}"#,
        )
        .await
        .unwrap();
    testkit::presence(&hub.broker(), "d1", true, Duration::from_secs(5))
        .await
        .unwrap();
    let caller = caller(&hub).await;

    // Without a connect timeout: offline, as IoT Hub answers for a device that is not
    // taking calls, and not the hub's 503 passed off as the device's answer.
    let error = caller
        .call(&CallRequest::new("d1", "ping", "{}"))
        .await
        .unwrap_err();
    assert!(matches!(error, CallError::NotOnline { .. }), "{error:?}");

    // With one: sent again until the device takes calls again, then answered by it.
    let call = tokio::spawn({
        let caller = caller.clone();
        async move {
            let mut request = CallRequest::new("d1", "ping", r#"{"n":7}"#);
            request.connect_timeout = Duration::from_secs(10);
            caller.call(&request).await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    device.subscribe("$iothub/methods/POST/#").await.unwrap();
    answer_one(&mut device).await;
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.payload.to_value(), serde_json::json!({"n":7}));
    hub.stop().await;
}

/// Calls `device` through `caller`, answers it from the raw device, and returns the
/// status the caller got.
async fn call_answered(caller: &Caller, id: &str, device: &mut common::RawDevice) -> u16 {
    let call = tokio::spawn({
        let caller = caller.clone();
        let id = id.to_owned();
        async move { caller.call(&CallRequest::new(id, "ping", "{}")).await }
    });
    answer_one(device).await;
    call.await.unwrap().unwrap().status
}

#[tokio::test]
async fn a_caller_forgets_the_devices_it_has_not_called_for_a_while() {
    let hub = TestHub::start().await.unwrap();
    let mut devices = Vec::new();
    for id in ["d1", "d2"] {
        let device = method_device(&hub, id).await.unwrap();
        testkit::presence(&hub.broker(), id, true, Duration::from_secs(5))
            .await
            .unwrap();
        devices.push(device);
    }
    let [mut d1, mut d2] = <[_; 2]>::try_from(devices).unwrap();
    let idle = Duration::from_millis(300);
    let mut options = ConnectOptions::new(hub.broker());
    options.idle_device = idle;
    let caller = Caller::connect(options).await.unwrap();

    // A call still running keeps its device, however long it takes.
    let slow = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call(&CallRequest::new("d1", "ping", "{}")).await }
    });
    let request = next_request(&mut d1).await;
    tokio::time::sleep(idle + idle / 2).await;
    assert_eq!(call_answered(&caller, "d2", &mut d2).await, 200);
    assert_eq!(caller.watched_devices(), 2, "d1's call is still running");
    answer(&mut d1, &request, b"{}".to_vec()).await;
    assert_eq!(slow.await.unwrap().unwrap().status, 200);

    // Idle past the limit: forgotten at the next call to another device.
    tokio::time::sleep(idle + idle / 2).await;
    assert_eq!(call_answered(&caller, "d2", &mut d2).await, 200);
    assert_eq!(caller.watched_devices(), 1, "d1 was idle: unsubscribed");

    // Called again: subscribed afresh, its presence and its answer reach the call.
    assert_eq!(call_answered(&caller, "d1", &mut d1).await, 200);
    assert!(caller.watched_devices() >= 1);
    hub.stop().await;
}
