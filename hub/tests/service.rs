//! The service API over HTTPS: method calls through the backend (to an edge-host on
//! the broker and to a device on the hub), IoT Hub's error bodies and codes, SAS with
//! policies, and the registry routes.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{TestHub, connect_device, https, method_device};
use rumqttc::Packet;
use serde_json::json;

fn invoke(method: &str, payload: serde_json::Value) -> serde_json::Value {
    json!({"methodName": method, "payload": payload, "responseTimeoutInSeconds": 5})
}

/// Checks an error answer: the HTTP status is the code over 1000, and the body has
/// IoT Hub's fields.
fn assert_error(answer: &(u16, serde_json::Value), code: u32) {
    let (status, body) = answer;
    assert_eq!(u32::from(*status), code / 1000, "{body}");
    assert_eq!(body["errorCode"], code, "{body}");
    for field in ["trackingId", "message", "info", "timestampUtc"] {
        assert!(body.get(field).is_some(), "{field} missing: {body}");
    }
}

#[tokio::test]
async fn a_rest_call_reaches_an_edge_host_on_the_backend() {
    let hub = TestHub::start().await.unwrap();
    let handlers = testkit::HandlerDir::with(&["device-method"]).unwrap();
    let host = testkit::TestHost::start(testkit::host_config(
        "edge-1",
        handlers.path(),
        hub.broker(),
    ))
    .await
    .unwrap();
    let answer = hub
        .rest(
            "POST",
            "/twins/edge-1/methods?api-version=2021-04-12",
            Some(&invoke("DeviceMethod", json!({"method_number":"42"}))),
        )
        .await
        .unwrap();
    assert_eq!(
        answer,
        (
            200,
            json!({"status":200,"payload":{"Response":"This is the response from the device"}})
        )
    );
    host.stop().await.unwrap();
    // Now offline (its presence says so), and not registered here: IoT Hub's 404103
    // at once, since it was known to the backend.
    let answer = hub
        .rest(
            "POST",
            "/twins/edge-1/methods",
            Some(&invoke("DeviceMethod", json!(null))),
        )
        .await
        .unwrap();
    assert_error(&answer, 404_103);
    hub.stop().await;
}

#[tokio::test]
async fn a_rest_call_reaches_a_device_on_the_hub() {
    let hub = TestHub::start().await.unwrap();
    let mut device = method_device(&hub, "d1").await.unwrap();
    testkit::presence(&hub.broker(), "d1", true, Duration::from_secs(5))
        .await
        .unwrap();
    let rest = tokio::spawn({
        let addr = hub.hub.https_addr;
        let ca = hub.ca();
        let token = hub.service_token("service");
        async move {
            https(
                addr,
                &ca,
                "POST",
                "/twins/d1/methods?api-version=2021-04-12",
                Some(&token),
                Some(&invoke("reboot", json!({"delay":3}))),
                &[],
            )
            .await
        }
    });
    let Packet::Publish(request) = device
        .until(|p| matches!(p, Packet::Publish(_)))
        .await
        .unwrap()
    else {
        unreachable!()
    };
    assert!(
        request
            .topic
            .starts_with("$iothub/methods/POST/reboot/?$rid=")
    );
    assert_eq!(&request.payload[..], br#"{"delay":3}"#);
    let rid = request.topic.split("$rid=").nth(1).unwrap();
    device
        .publish_acked(
            &format!("$iothub/methods/res/201/?$rid={rid}"),
            br#"{"rebooting":true}"#.to_vec(),
        )
        .await
        .unwrap();
    let answer = rest.await.unwrap().unwrap();
    assert_eq!(
        answer,
        (200, json!({"status":201,"payload":{"rebooting":true}}))
    );
    hub.stop().await;
}

#[tokio::test]
async fn call_errors_are_iot_hubs() {
    let hub = TestHub::start().await.unwrap();
    // Not registered and unknown to the backend.
    let answer = hub
        .rest("POST", "/twins/ghost/methods", Some(&invoke("m", json!(1))))
        .await
        .unwrap();
    assert_error(&answer, 404_001);
    // Registered, never connected.
    let key = hub.add_device("d1");
    let answer = hub
        .rest("POST", "/twins/d1/methods", Some(&invoke("m", json!(1))))
        .await
        .unwrap();
    assert_error(&answer, 404_103);
    // Timeouts out of range, a missing method name, a body that is not JSON.
    for body in [
        json!({"methodName":"m","responseTimeoutInSeconds":4}),
        json!({"methodName":"m","responseTimeoutInSeconds":301}),
        json!({"methodName":"m","connectTimeoutInSeconds":-1}),
        json!({"payload":1}),
        json!("not an object"),
    ] {
        let answer = hub
            .rest("POST", "/twins/d1/methods", Some(&body))
            .await
            .unwrap();
        assert_error(&answer, 400_004);
    }
    // Over 128 KiB of payload.
    let big = "x".repeat(130 * 1024);
    let answer = hub
        .rest("POST", "/twins/d1/methods", Some(&invoke("m", json!(big))))
        .await
        .unwrap();
    assert_error(&answer, 413_001);
    // Connected and subscribed, but never answers: 504101 after the response timeout.
    let mut device = connect_device(&hub, "d1", &key).await.unwrap();
    device.subscribe("$iothub/methods/POST/#").await.unwrap();
    testkit::presence(&hub.broker(), "d1", true, Duration::from_secs(5))
        .await
        .unwrap();
    let silent = tokio::spawn(async move {
        // Keep the device's connection polled, and never answer.
        let _ = device.closed_within(Duration::from_secs(30)).await;
    });
    let started = std::time::Instant::now();
    let answer = hub
        .rest("POST", "/twins/d1/methods", Some(&invoke("m", json!(1))))
        .await
        .unwrap();
    assert_error(&answer, 504_101);
    assert!(started.elapsed() >= Duration::from_secs(5));
    silent.abort();
    hub.stop().await;
}

#[tokio::test]
async fn a_connect_timeout_waits_for_a_device_to_come_online() {
    let hub = TestHub::start().await.unwrap();
    let key = hub.add_device("d1");
    let call = tokio::spawn({
        let addr = hub.hub.https_addr;
        let ca = hub.ca();
        let token = hub.service_token("iothubowner");
        async move {
            https(
                addr,
                &ca,
                "POST",
                "/twins/d1/methods",
                Some(&token),
                Some(&json!({"methodName":"m","payload":null,"connectTimeoutInSeconds":20})),
                &[],
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut device = connect_device(&hub, "d1", &key).await.unwrap();
    device.subscribe("$iothub/methods/POST/#").await.unwrap();
    let Packet::Publish(request) = device
        .until(|p| matches!(p, Packet::Publish(_)))
        .await
        .unwrap()
    else {
        unreachable!()
    };
    let rid = request.topic.split("$rid=").nth(1).unwrap();
    device
        .publish_acked(
            &format!("$iothub/methods/res/200/?$rid={rid}"),
            b"null".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(
        call.await.unwrap().unwrap(),
        (200, json!({"status":200,"payload":null}))
    );
    hub.stop().await;
}

#[tokio::test]
async fn tokens_are_checked_against_the_registrys_policies() {
    let hub = TestHub::start().await.unwrap();
    let path = "/devices";
    let call = |token: Option<String>| {
        let addr = hub.hub.https_addr;
        let ca = hub.ca();
        async move {
            https(addr, &ca, "GET", path, token.as_deref(), None, &[])
                .await
                .unwrap()
        }
    };
    let port = hub.hub.https_addr.port();
    let owner_key = hub
        .hub
        .registry
        .policy("iothubowner")
        .unwrap()
        .unwrap()
        .primary_key;
    let sign = |resource: &str, key: &str, se: u64, skn: Option<&str>| {
        edge_proto::iothub::sign(resource, key, se, skn).unwrap()
    };
    let later = edge_proto::iothub::unix_now() + 600;
    let other_key = edge_proto::iothub::generate_key();
    for (what, token) in [
        ("no token", None),
        ("not a token", Some("Bearer x".to_owned())),
        (
            "wrong key",
            Some(sign(
                &format!("localhost:{port}"),
                &other_key,
                later,
                Some("iothubowner"),
            )),
        ),
        (
            "expired",
            Some(sign(
                &format!("localhost:{port}"),
                &owner_key,
                1000,
                Some("iothubowner"),
            )),
        ),
        (
            "another hub",
            Some(sign("elsewhere", &owner_key, later, Some("iothubowner"))),
        ),
        (
            "no policy name",
            Some(sign(&format!("localhost:{port}"), &owner_key, later, None)),
        ),
        (
            "unknown policy",
            Some(sign(
                &format!("localhost:{port}"),
                &owner_key,
                later,
                Some("nobody"),
            )),
        ),
        (
            "a policy without the right",
            Some(hub.service_token("service")),
        ),
    ] {
        let answer = call(token).await;
        assert_error(&answer, 401_002);
        let _ = what;
    }
    // The host without its port (as a client of a hub on 443 signs) is as good.
    let answer = call(Some(sign(
        "localhost",
        &owner_key,
        later,
        Some("iothubowner"),
    )))
    .await;
    assert_eq!(answer.0, 200, "{answer:?}");
    assert_eq!(call(Some(hub.service_token("registryRead"))).await.0, 200);
    hub.stop().await;
}

#[tokio::test]
async fn the_registry_routes_create_read_query_and_delete_devices() {
    let hub = TestHub::start().await.unwrap();
    let (status, created) = hub
        .rest("PUT", "/devices/new-1", Some(&json!({"deviceId":"new-1"})))
        .await
        .unwrap();
    assert_eq!(status, 200, "{created}");
    let key = created["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(created["connectionState"], "Disconnected");
    let again = hub
        .rest("PUT", "/devices/new-1", Some(&json!({"deviceId":"new-1"})))
        .await
        .unwrap();
    assert_error(&again, 409_001);
    hub.rest("PUT", "/devices/new-2", None).await.unwrap();

    let mut device = connect_device(&hub, "new-1", &key).await.unwrap();
    device.subscribe("$iothub/methods/POST/#").await.unwrap();
    testkit::presence(&hub.broker(), "new-1", true, Duration::from_secs(5))
        .await
        .unwrap();
    // The hub's own presence watch sees it shortly after the broker has it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, got) = hub.rest("GET", "/devices/new-1", None).await.unwrap();
    assert_eq!(got["connectionState"], "Connected");
    let (_, list) = hub.rest("GET", "/devices", None).await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let (_, twin) = hub.rest("GET", "/twins/new-1", None).await.unwrap();
    assert_eq!(twin["properties"]["reported"]["$version"], 1);

    let query = |q: &str| json!({ "query": q });
    let ids = |answer: (u16, serde_json::Value)| -> Vec<String> {
        assert_eq!(answer.0, 200, "{answer:?}");
        answer
            .1
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["deviceId"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = hub
        .rest(
            "POST",
            "/devices/query",
            Some(&query("SELECT * FROM devices")),
        )
        .await
        .unwrap();
    assert_eq!(ids(all), ["new-1", "new-2"]);
    let connected = hub
        .rest(
            "POST",
            "/devices/query",
            Some(&query(
                "SELECT * FROM devices WHERE connectionState = 'Connected'",
            )),
        )
        .await
        .unwrap();
    assert_eq!(ids(connected), ["new-1"]);
    let one = hub
        .rest(
            "POST",
            "/devices/query",
            Some(&query("select * from devices where deviceId = 'new-2'")),
        )
        .await
        .unwrap();
    assert_eq!(ids(one), ["new-2"]);
    let bad = hub
        .rest(
            "POST",
            "/devices/query",
            Some(&query("SELECT deviceId FROM devices.modules")),
        )
        .await
        .unwrap();
    assert_error(&bad, 400_004);

    let (status, _) = hub.rest("DELETE", "/devices/new-2", None).await.unwrap();
    assert_eq!(status, 204);
    assert_error(
        &hub.rest("GET", "/devices/new-2", None).await.unwrap(),
        404_001,
    );
    assert_error(
        &hub.rest("DELETE", "/devices/new-2", None).await.unwrap(),
        404_001,
    );
    assert_error(
        &hub.rest("PUT", "/devices/bad%2Fid", None).await.unwrap(),
        400_004,
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_refused_device_put_registers_nothing() {
    let hub = TestHub::start().await.unwrap();
    let body = json!({
        "deviceId": "x1",
        "authentication": {
            "type": "selfSigned",
            "x509Thumbprint": { "primaryThumbprint": "not-a-thumbprint" },
        },
    });
    let refused = hub.rest("PUT", "/devices/x1", Some(&body)).await.unwrap();
    assert_error(&refused, 400_004);
    assert!(
        refused.1["message"]
            .to_string()
            .contains("not-a-thumbprint"),
        "{refused:?}"
    );
    assert_error(
        &hub.rest("GET", "/devices/x1", None).await.unwrap(),
        404_001,
    );
    hub.stop().await;
}

#[tokio::test]
async fn two_hubs_sharing_a_registry_and_a_broker_serve_the_same_devices() {
    let one = TestHub::start().await.unwrap();
    let two = TestHub::start_with(None, Some(one.broker()), Some(&one.config.data_dir))
        .await
        .unwrap();
    // Registered through the second hub's REST API, connected to the first.
    let (status, created) = two
        .rest(
            "PUT",
            "/devices/shared-1",
            Some(&json!({"deviceId":"shared-1"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{created}");
    let key = created["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut device = connect_device(&one, "shared-1", &key).await.unwrap();
    device.subscribe("$iothub/methods/POST/#").await.unwrap();
    testkit::presence(&one.broker(), "shared-1", true, Duration::from_secs(5))
        .await
        .unwrap();
    // Called through the second hub.
    let rest = tokio::spawn({
        let addr = two.hub.https_addr;
        let ca = two.ca();
        let token = two.service_token("service");
        async move {
            https(
                addr,
                &ca,
                "POST",
                "/twins/shared-1/methods",
                Some(&token),
                Some(&invoke("where", json!("two"))),
                &[],
            )
            .await
        }
    });
    let Packet::Publish(request) = device
        .until(|p| matches!(p, Packet::Publish(_)))
        .await
        .unwrap()
    else {
        unreachable!()
    };
    let rid = request.topic.split("$rid=").nth(1).unwrap();
    device
        .publish_acked(
            &format!("$iothub/methods/res/200/?$rid={rid}"),
            br#""one""#.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(
        rest.await.unwrap().unwrap(),
        (200, json!({"status":200,"payload":"one"}))
    );
    let (_, got) = two.rest("GET", "/devices/shared-1", None).await.unwrap();
    assert_eq!(got["connectionState"], "Connected", "{got}");
    // The same device connecting to the second hub takes over from the first.
    let _second = connect_device(&two, "shared-1", &key).await.unwrap();
    device.closed_within(Duration::from_secs(10)).await.unwrap();
    two.stop().await;
    one.stop().await;
}

#[tokio::test]
async fn jobs_are_checked_scheduled_and_cancelled() {
    let hub = TestHub::start().await.unwrap();
    hub.add_device("j1");
    let job = |id: &str, kind: &str| {
        json!({
            "jobId": id,
            "type": kind,
            "cloudToDeviceMethod": {"methodName": "m", "payload": null, "responseTimeoutInSeconds": 5},
            "queryCondition": "deviceId = 'j1'",
            "startTime": "2099-01-01T00:00:00.000Z",
            "maxExecutionTimeInSeconds": 60,
        })
    };
    let answer = hub
        .rest(
            "PUT",
            "/jobs/v2/later",
            Some(&job("later", "scheduleDeviceMethod")),
        )
        .await
        .unwrap();
    assert_eq!(answer.0, 200, "{answer:?}");
    assert_eq!(answer.1["status"], "scheduled");
    assert_eq!(answer.1["deviceJobStatistics"]["pendingCount"], 1);
    let again = hub
        .rest(
            "PUT",
            "/jobs/v2/later",
            Some(&job("later", "scheduleDeviceMethod")),
        )
        .await
        .unwrap();
    assert_eq!(again.0, 409, "{again:?}");
    let (status, cancelled) = hub
        .rest("POST", "/jobs/v2/later/cancel", None)
        .await
        .unwrap();
    assert_eq!((status, &cancelled["status"]), (200, &json!("cancelled")));
    let (_, got) = hub.rest("GET", "/jobs/v2/later", None).await.unwrap();
    assert_eq!(got["status"], "cancelled");
    let long = "x".repeat(65);
    for (id, body) in [
        ("twin", job("twin", "scheduleUpdateTwin")),
        (long.as_str(), job(&long, "scheduleDeviceMethod")),
    ] {
        let answer = hub
            .rest("PUT", &format!("/jobs/v2/{id}"), Some(&body))
            .await
            .unwrap();
        assert_error(&answer, 400_004);
    }
    hub.stop().await;
}

#[tokio::test]
async fn two_hubs_adding_devices_at_once_to_one_registry_lose_none() {
    let one = TestHub::start().await.unwrap();
    let two = TestHub::start_with(None, Some(one.broker()), Some(&one.config.data_dir))
        .await
        .unwrap();
    // Every PUT at once, half through each hub: their read-modify-writes of the shared
    // file overlap, and each must keep the other's devices.
    let mut puts = tokio::task::JoinSet::new();
    for (n, hub) in [&one, &two].into_iter().enumerate() {
        for i in 0..12 {
            let addr = hub.hub.https_addr;
            let ca = hub.ca();
            let token = hub.service_token("iothubowner");
            puts.spawn(async move {
                let id = format!("h{n}-{i}");
                https(
                    addr,
                    &ca,
                    "PUT",
                    &format!("/devices/{id}"),
                    Some(&token),
                    Some(&json!({ "deviceId": id })),
                    &[],
                )
                .await
            });
        }
    }
    while let Some(put) = puts.join_next().await {
        let (status, body) = put.unwrap().unwrap();
        assert_eq!(status, 200, "{body}");
    }
    for hub in [&one, &two] {
        let (status, devices) = hub.rest("GET", "/devices", None).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            devices.as_array().map(Vec::len),
            Some(24),
            "every device added through either hub is in the registry: {devices}"
        );
    }
    // A removal through one hub is seen by the other at once.
    let (status, _) = one.rest("DELETE", "/devices/h1-0", None).await.unwrap();
    assert_eq!(status, 204);
    let (status, body) = two.rest("GET", "/devices/h1-0", None).await.unwrap();
    assert_eq!(
        (status, body["errorCode"].as_u64()),
        (404, Some(404_001)),
        "{body}"
    );
    two.stop().await;
    one.stop().await;
}

#[tokio::test]
async fn a_token_accepted_once_is_refused_once_it_has_expired() {
    let hub = TestHub::start().await.unwrap();
    let port = hub.hub.https_addr.port();
    let owner_key = hub.policy_key("iothubowner");
    let expiry = edge_proto::iothub::unix_now() + 2;
    let token = edge_proto::iothub::sign(
        &format!("localhost:{port}"),
        &owner_key,
        expiry,
        Some("iothubowner"),
    )
    .unwrap();
    let ca = hub.ca();
    let call = || {
        https(
            hub.hub.https_addr,
            &ca,
            "GET",
            "/devices",
            Some(&token),
            None,
            &[],
        )
    };
    // Twice while valid: the second is served from the checked-token cache.
    assert_eq!(call().await.unwrap().0, 200);
    assert_eq!(call().await.unwrap().0, 200);
    while edge_proto::iothub::unix_now() < expiry {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let answer = call().await.unwrap();
    assert_error(&answer, 401_002);
    assert!(
        answer.1["message"]
            .as_str()
            .unwrap_or_default()
            .contains("expired"),
        "{answer:?}"
    );
    hub.stop().await;
}
