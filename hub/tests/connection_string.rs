//! edge-host given a device connection string, against edge-hub standing in for IoT
//! Hub: the Azure SDK service app calls it over MQTT and over MQTT over WebSockets, it
//! reports its catalog in the twin, renews its token before the hub would disconnect
//! it, stops at once on a wrong key, and never does what a real hub refuses (edge-hub
//! disconnects a device for it, and says so in its log).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{TestHub, thumbprints};
use edge_proto::iothub::HubTransport;
use serde_json::json;
use tokio::task::JoinHandle;

/// An edge-host in this process, connected to the hub with a device connection string.
struct HubHost {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<edge_host::RunReport>>,
}

impl HubHost {
    /// The host's configuration: `connection_string` to `hub` over `transport`,
    /// serving `handlers`, trusting the hub's CA.
    fn config(
        hub: &TestHub,
        connection_string: &str,
        transport: HubTransport,
        handlers: &Path,
    ) -> edge_host::Config {
        let port = match transport {
            HubTransport::Mqtt => hub.hub.mqtts_addr.port(),
            HubTransport::MqttWs => hub.hub.https_addr.port(),
        };
        let mut config = edge_host::Config {
            handlers: handlers.to_owned(),
            cache: false,
            connection_string: Some(connection_string.to_owned().into()),
            transport,
            hub_port: Some(port),
            ..edge_host::Config::default()
        };
        config.tls.ca_file = Some(hub.ca());
        config
    }

    /// Starts the host, and waits until the hub announces `device` online on the
    /// backend (it does once the device subscribed to methods).
    async fn start(hub: &TestHub, device: &str, config: edge_host::Config) -> Self {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(edge_host::run(config, async {
            rx.await.ok();
        }));
        testkit::presence(&hub.broker(), device, true, Duration::from_secs(30))
            .await
            .expect("the device comes online through the hub");
        Self {
            shutdown: Some(tx),
            task,
        }
    }

    async fn stop(mut self) -> edge_host::RunReport {
        if let Some(tx) = self.shutdown.take() {
            tx.send(()).ok();
        }
        (&mut self.task)
            .await
            .expect("the host task ran")
            .expect("a clean stop")
    }
}

/// The twin's reported properties, through the service API.
async fn reported(hub: &TestHub, device: &str) -> serde_json::Value {
    let (status, twin) = hub
        .rest("GET", &format!("/twins/{device}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{twin}");
    twin["properties"]["reported"].clone()
}

/// The method names the twin reports, once they are `want` (within 10 s).
async fn reported_methods(hub: &TestHub, device: &str, want: &[&str]) -> Vec<String> {
    testkit::eventually(
        "the twin reports the catalog",
        Duration::from_secs(10),
        || async move {
            let reported = reported(hub, device).await;
            let names: Vec<String> = reported["methods"]
                .as_array()?
                .iter()
                .filter_map(|m| m["name"].as_str().map(str::to_owned))
                .collect();
            (names == want).then_some(names)
        },
    )
    .await
}

async fn the_sdk_service_calls_the_host(transport: HubTransport) {
    let hub = TestHub::start().await.unwrap();
    let device = format!("cs-host-{transport}");
    let connection_string = hub.device_string(&device);
    let handlers = testkit::HandlerDir::with(&["device-method"]).unwrap();
    let logs = testkit::capture_logs();
    let host = HubHost::start(
        &hub,
        &device,
        HubHost::config(&hub, &connection_string, transport, handlers.path()),
    )
    .await;

    common::the_sdk_service_calls_device_method(&hub, &device).await;

    // The catalog is in the twin, and follows a reload.
    let methods = reported_methods(&hub, &device, &["DeviceMethod"]).await;
    assert_eq!(methods, ["DeviceMethod"]);
    let twin = reported(&hub, &device).await;
    assert_eq!(twin["methods"][0]["handler"], "device-method.wasm");
    assert!(
        twin["methods"][0]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{twin}"
    );
    assert_eq!(twin["failures"], json!([]));
    handlers.add("echo").unwrap();
    reported_methods(&hub, &device, &["DeviceMethod", "echo"]).await;
    std::fs::write(handlers.path().join("broken.wasm"), b"not a component").unwrap();
    let (hub_ref, device_ref) = (&hub, device.as_str());
    testkit::eventually(
        "the twin reports the failure",
        Duration::from_secs(10),
        || async move {
            (reported(hub_ref, device_ref).await["failures"][0]["handler"] == "broken.wasm")
                .then_some(())
        },
    )
    .await;

    host.stop().await;
    // Nothing the host did made the hub disconnect it.
    assert_eq!(
        logs.lines_with("IoT Hub does not allow this"),
        "",
        "the host did what IoT Hub refuses"
    );
    assert_eq!(logs.lines_with("MQTT connection failed"), "");
    hub.stop().await;
}

#[tokio::test]
async fn the_sdk_service_calls_an_edge_host_connected_with_a_connection_string() {
    the_sdk_service_calls_the_host(HubTransport::Mqtt).await;
}

#[tokio::test]
async fn the_sdk_service_calls_an_edge_host_connected_over_mqtt_over_websockets() {
    the_sdk_service_calls_the_host(HubTransport::MqttWs).await;
}

#[tokio::test]
async fn the_host_renews_its_token_before_it_expires_and_loses_no_call() {
    let hub = TestHub::start().await.unwrap();
    let device = "cs-renew";
    let connection_string = hub.device_string(device);
    let handlers = testkit::HandlerDir::with(&["misbehave"]).unwrap();
    let logs = testkit::capture_logs();
    let mut config = HubHost::config(
        &hub,
        &connection_string,
        HubTransport::Mqtt,
        handlers.path(),
    );
    // Renewed after 4/5 of it: about every 4 s.
    config.sas_lifetime = Duration::from_secs(5);
    let host = HubHost::start(&hub, device, config).await;

    // Calls that run across the renewals: each sleeps 1.5 s in the handler while new
    // ones start every 0.5 s, for 12 s (two or three renewals). Each call may wait up to 5 s
    // for the device to be connected (connectTimeoutInSeconds), as IoT Hub lets a
    // caller do across a device's reconnection.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..24u32 {
        let body = json!({
            "methodName": "sleep",
            "payload": {"ms": 1500},
            "responseTimeoutInSeconds": 10,
            "connectTimeoutInSeconds": 5,
        });
        let hub_addr = hub.hub.https_addr;
        let ca = hub.ca();
        let token = hub.service_token("iothubowner");
        calls.spawn(async move {
            let answer = common::https(
                hub_addr,
                &ca,
                "POST",
                &format!("/twins/{device}/methods?api-version=2021-04-12"),
                Some(&token),
                Some(&body),
                &[],
            )
            .await;
            (i, answer)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    while let Some(joined) = calls.join_next().await {
        let (i, answer) = joined.unwrap();
        let (status, body) = answer.unwrap();
        assert_eq!(
            (status, &body["status"]),
            (200, &json!(200)),
            "call {i} across a renewal: {body}"
        );
    }
    let renewals = logs.lines_with("reconnecting to IoT Hub with a fresh SAS token");
    assert!(
        renewals.lines().count() >= 2,
        "the token was renewed before each expiry:\n{renewals}"
    );
    // The hub never had to disconnect the device for an expired token.
    assert_eq!(logs.lines_with("token-expired"), "");
    assert_eq!(logs.lines_with("IoT Hub does not allow this"), "");
    host.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn a_wrong_key_stops_the_host_with_a_clear_error_instead_of_retrying() {
    let hub = TestHub::start().await.unwrap();
    hub.add_device("cs-wrong-key");
    let wrong = format!(
        "HostName=localhost;DeviceId=cs-wrong-key;SharedAccessKey={}",
        edge_proto::iothub::generate_key()
    );
    let handlers = testkit::HandlerDir::with(&["echo"]).unwrap();
    let config = HubHost::config(&hub, &wrong, HubTransport::Mqtt, handlers.path());
    let ended = tokio::time::timeout(
        Duration::from_secs(60),
        edge_host::run(config, std::future::pending()),
    )
    .await
    .expect("the host gives up rather than retrying forever");
    let error = format!("{:#}", ended.expect_err("a refused key is an error"));
    assert!(
        error.contains("IoT Hub refused the device's token"),
        "{error}"
    );
    assert!(error.contains("check the connection string"), "{error}");

    // A service connection string is not a device's, and says so.
    let mut config = HubHost::config(
        &hub,
        &hub.service_string(),
        HubTransport::Mqtt,
        handlers.path(),
    );
    config.hub_port = None;
    let error = format!(
        "{:#}",
        edge_host::run(config, std::future::pending())
            .await
            .expect_err("not a device connection string")
    );
    assert!(error.contains("edge-host needs a device's"), "{error}");
    hub.stop().await;
}

#[tokio::test]
async fn an_edge_host_connects_with_an_x509_certificate() {
    let hub = TestHub::start().await.unwrap();
    let device = "cs-x509";
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![device.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let files = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    hub.add_device(device);
    let [sha256, _] = edge_hub::pki::thumbprints(cert.der());
    hub.hub
        .registry
        .put_device(device, thumbprints(sha256), Some("*"))
        .unwrap();
    let handlers = testkit::HandlerDir::with(&["device-method"]).unwrap();
    let connection_string = format!("HostName=localhost;DeviceId={device};x509=true");

    // Without the certificate, the host says what is missing before connecting.
    let config = HubHost::config(
        &hub,
        &connection_string,
        HubTransport::Mqtt,
        handlers.path(),
    );
    let error = format!(
        "{:#}",
        edge_host::run(config, std::future::pending())
            .await
            .expect_err("x509=true needs a certificate")
    );
    assert!(error.contains("--cert-file and --key-file"), "{error}");

    let mut config = HubHost::config(
        &hub,
        &connection_string,
        HubTransport::Mqtt,
        handlers.path(),
    );
    config.tls.cert_file = Some(cert_file);
    config.tls.key_file = Some(key_file);
    let host = HubHost::start(&hub, device, config).await;
    common::the_sdk_service_calls_device_method(&hub, device).await;
    host.stop().await;
    hub.stop().await;
}
