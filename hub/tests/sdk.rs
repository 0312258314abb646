//! The official Azure IoT SDKs for Python as peers, unchanged but for their connection
//! strings and CA trust: azure-iot-device 2.14 (SSL_CERT_FILE) and azure-iot-hub 2.7
//! (REQUESTS_CA_BUNDLE). The device SDK's ports are fixed, 8883 for MQTT and 443 for
//! MQTT over WebSockets, so these tests bind the hub there, one test at a time. The interpreter is EDGE_PYTHON or
//! target/pyenv (`cargo xtask test` installs it); without it these tests fail.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{TestHub, loopback, script, service, service_with, thumbprints};
use edge_invoker::{CallRequest, Caller, ConnectOptions};
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// One hub on the fixed ports (8883, 443) at a time.
static PORT_8883: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn hub_on_8883() -> TestHub {
    TestHub::start_on(Some(loopback(8883)), None)
        .await
        .expect("the hub starts on 127.0.0.1:8883 (is another hub running there?)")
}

/// A device on the SDK, running `device.py`.
struct SdkDevice {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl SdkDevice {
    /// Starts the SDK device with `connection_string` and waits until it takes calls.
    async fn start(hub: &TestHub, connection_string: &str) -> Self {
        Self::start_with(hub, connection_string, &[]).await
    }

    /// As [`SdkDevice::start`], with `args` for `device.py` (`--websockets`).
    async fn start_with(hub: &TestHub, connection_string: &str, args: &[&str]) -> Self {
        Self::start_env(hub, connection_string, args, &[]).await
    }

    /// As [`SdkDevice::start_with`], with more environment for `device.py`.
    async fn start_env(
        hub: &TestHub,
        connection_string: &str,
        args: &[&str],
        env: &[(&str, &std::path::Path)],
    ) -> Self {
        let mut child = Command::new(testkit::azure_python())
            .arg(script("device.py"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .env("EDGE_DEVICE_CONNECTION_STRING", connection_string)
            .env("SSL_CERT_FILE", hub.ca())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut device = Self { child, lines };
        device.expect_line("READY", Duration::from_secs(60)).await;
        device
    }

    /// Waits for a line starting with `prefix`; returns it.
    async fn expect_line(&mut self, prefix: &str, limit: Duration) -> String {
        let found = tokio::time::timeout(limit, async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                if line.starts_with(prefix) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!("the SDK device never printed {prefix}; see its stderr above"),
        }
    }

    /// Closes stdin: the device shuts its client down and exits.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        self.expect_line("STOPPED", Duration::from_secs(30)).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

fn assert_service_error(answer: &serde_json::Value, code: u32) {
    assert_eq!(answer["httpStatus"], code / 1000, "{answer}");
    assert_eq!(answer["error"]["errorCode"], code, "{answer}");
}

#[tokio::test]
async fn the_sdk_service_calls_an_sdk_device_through_the_hub() {
    let _port = PORT_8883.lock().await;
    let hub = hub_on_8883().await;
    let mut device = SdkDevice::start(&hub, &hub.device_string("sdk-device")).await;

    let answer = service(&hub, &["invoke", "sdk-device", "hello", r#"{"a":1}"#]).await;
    assert_eq!(
        answer,
        json!({"status":200,"payload":{"method":"hello","payload":{"a":1}}})
    );
    device
        .expect_line("CALL hello", Duration::from_secs(5))
        .await;
    let answer = service(&hub, &["invoke", "sdk-device", "fail", "null"]).await;
    assert_eq!(
        answer,
        json!({"status":500,"payload":{"error":"asked to fail"}})
    );
    let answer = service(&hub, &["invoke", "sdk-device", "silent", "null", "5"]).await;
    assert_service_error(&answer, 504_101);

    // The twin the device reported, and its connection state, through the service SDK.
    let twin = service(&hub, &["twin", "sdk-device"]).await;
    assert_eq!(twin["connectionState"], "Connected", "{twin}");
    assert_eq!(twin["reported"]["sdk"], "azure-iot-device", "{twin}");

    device.stop().await;
    let answer = service(&hub, &["invoke", "sdk-device", "hello", "1"]).await;
    assert_service_error(&answer, 404_103);
    hub.stop().await;
}

#[tokio::test]
async fn the_sdk_service_calls_an_edge_host_on_the_backend() {
    let _port = PORT_8883.lock().await;
    let hub = hub_on_8883().await;
    let handlers = testkit::HandlerDir::with(&["device-method"]).unwrap();
    let host = testkit::TestHost::start(testkit::host_config(
        "edge-1",
        handlers.path(),
        hub.broker(),
    ))
    .await
    .unwrap();
    common::the_sdk_service_calls_device_method(&hub, "edge-1").await;
    host.stop().await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn edge_invoker_on_the_backend_calls_an_sdk_device() {
    let _port = PORT_8883.lock().await;
    let hub = hub_on_8883().await;
    let device = SdkDevice::start(&hub, &hub.device_string("sdk-device")).await;
    let caller = Caller::connect(ConnectOptions::new(hub.broker()))
        .await
        .unwrap();
    let response = caller
        .call(&CallRequest::new(
            "sdk-device",
            "fromInvoker",
            r#"{"x":[1,2]}"#,
        ))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        response.payload.to_value(),
        json!({"method":"fromInvoker","payload":{"x":[1,2]}})
    );
    caller.disconnect().await;
    device.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn the_sdk_device_is_refused_with_bad_credentials() {
    let _port = PORT_8883.lock().await;
    let hub = hub_on_8883().await;
    let good = hub.device_string("d1");
    let key = hub.add_device("d2");
    let other_key = edge_proto::iothub::generate_key();
    let expired = edge_proto::iothub::sign("localhost/devices/d1", &key, 1000, None).unwrap();
    let d2_token = TestHub::device_token("d2", &key, 3600);
    let connect = |cs: String| {
        let ca = hub.ca();
        async move {
            let out = Command::new(testkit::azure_python())
                .arg(script("connect.py"))
                .env("EDGE_DEVICE_CONNECTION_STRING", cs)
                .env("SSL_CERT_FILE", ca)
                .stderr(Stdio::null())
                .output()
                .await
                .unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        }
    };
    for (what, cs) in [
        (
            "wrong key",
            format!("HostName=localhost;DeviceId=d1;SharedAccessKey={other_key}"),
        ),
        (
            "unregistered device",
            format!("HostName=localhost;DeviceId=nobody;SharedAccessKey={key}"),
        ),
        (
            "expired token",
            format!("HostName=localhost;DeviceId=d1;SharedAccessSignature={expired}"),
        ),
        (
            "another device's token",
            format!("HostName=localhost;DeviceId=d1;SharedAccessSignature={d2_token}"),
        ),
    ] {
        let outcome = connect(cs).await;
        assert!(outcome.starts_with("REFUSED"), "{what}: {outcome}");
    }
    assert_eq!(connect(good).await, "CONNECTED");
    hub.stop().await;
}

#[tokio::test]
async fn the_sdk_service_gets_iot_hubs_errors() {
    let _port = PORT_8883.lock().await;
    let hub = hub_on_8883().await;
    hub.add_device("registered");
    let answer = service(&hub, &["invoke", "nobody", "m", "null"]).await;
    assert_service_error(&answer, 404_001);
    let answer = service(&hub, &["invoke", "registered", "m", "null"]).await;
    assert_service_error(&answer, 404_103);
    let answer = service(&hub, &["invoke", "registered", "m", "null", "400"]).await;
    assert_service_error(&answer, 400_004);
    let wrong_key = format!(
        "HostName=localhost:{};SharedAccessKeyName=iothubowner;SharedAccessKey={}",
        hub.hub.https_addr.port(),
        edge_proto::iothub::generate_key()
    );
    let answer = service_with(&hub, &wrong_key, &["invoke", "registered", "m", "null"]).await;
    assert_service_error(&answer, 401_002);
    hub.stop().await;
}

#[tokio::test]
async fn the_sdk_registry_calls_work() {
    let _port = PORT_8883.lock().await;
    let hub = hub_on_8883().await;
    let created = service(&hub, &["create", "reg-1"]).await;
    assert_eq!(created["deviceId"], "reg-1", "{created}");
    assert!(
        created["primaryKey"]
            .as_str()
            .is_some_and(|k| !k.is_empty())
    );
    let got = service(&hub, &["get", "reg-1"]).await;
    assert_eq!(got["connectionState"], "Disconnected", "{got}");
    service(&hub, &["create", "reg-2"]).await;
    let list = service(&hub, &["list"]).await;
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");

    let device = SdkDevice::start(
        &hub,
        &format!(
            "HostName=localhost;DeviceId=reg-1;SharedAccessKey={}",
            created["primaryKey"].as_str().unwrap()
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let connected = service(
        &hub,
        &[
            "query",
            "SELECT * FROM devices WHERE connectionState = 'Connected'",
        ],
    )
    .await;
    assert_eq!(
        connected,
        json!([{"deviceId":"reg-1","connectionState":"Connected"}])
    );
    device.stop().await;
    let deleted = service(&hub, &["delete", "reg-2"]).await;
    assert_eq!(deleted, json!({"deleted":"reg-2"}));
    let gone = service(&hub, &["get", "reg-2"]).await;
    assert_service_error(&gone, 404_001);
    hub.stop().await;
}

#[tokio::test]
async fn the_sdk_service_calls_an_sdk_device_over_mqtt_over_websockets() {
    let _port = PORT_8883.lock().await;
    // Devices over MQTT/TLS on a free port, not 8883: the SDK can only come in over 443.
    let hub = TestHub::start_full(None, Some(loopback(443)), None, None)
        .await
        .expect("the hub starts on 127.0.0.1:443 (is another hub running there?)");
    assert_ne!(hub.hub.mqtts_addr.port(), 8883);
    let mut device =
        SdkDevice::start_with(&hub, &hub.device_string("ws-device"), &["--websockets"]).await;
    let answer = service(
        &hub,
        &["invoke", "ws-device", "overWebSockets", r#"{"b":true}"#],
    )
    .await;
    assert_eq!(
        answer,
        json!({"status":200,"payload":{"method":"overWebSockets","payload":{"b":true}}})
    );
    device
        .expect_line("CALL overWebSockets", Duration::from_secs(5))
        .await;
    device.stop().await;
    let answer = service(&hub, &["invoke", "ws-device", "overWebSockets", "null"]).await;
    assert_service_error(&answer, 404_103);
    hub.stop().await;
}

#[tokio::test]
async fn the_sdk_job_manager_runs_a_method_job_over_matching_devices() {
    let _port = PORT_8883.lock().await;
    let hub = hub_on_8883().await;
    let mut device = SdkDevice::start(&hub, &hub.device_string("job-1")).await;
    hub.add_device("job-2"); // registered, never connected: its call fails
    hub.add_device("job-3"); // not in the condition: not called
    let created = service(
        &hub,
        &[
            "job-create",
            "reboot-all",
            "reboot",
            r#"{"delay":1}"#,
            "deviceId = 'job-1' OR deviceId = 'job-2'",
        ],
    )
    .await;
    assert_eq!(created["deviceCount"], 2, "{created}");
    let mut last = created;
    for _ in 0..60 {
        if last["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        last = service(&hub, &["job-get", "reboot-all"]).await;
    }
    assert_eq!(
        last,
        json!({"jobId":"reboot-all","status":"completed","deviceCount":2,"succeededCount":1,"failedCount":1})
    );
    device
        .expect_line("CALL reboot", Duration::from_secs(5))
        .await;
    let missing = service(&hub, &["job-get", "nope"]).await;
    assert_eq!(missing["httpStatus"], 404, "{missing}");
    device.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn the_sdk_device_connects_with_a_self_signed_certificate() {
    let _port = PORT_8883.lock().await;
    let hub = hub_on_8883().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["x509-device".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let files = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    hub.add_device("x509-device");
    let [sha256, _] = edge_hub::pki::thumbprints(cert.der());
    hub.hub
        .registry
        .put_device("x509-device", thumbprints(sha256), Some("*"))
        .unwrap();
    let device = SdkDevice::start_env(
        &hub,
        "HostName=localhost;DeviceId=x509-device;x509=true",
        &[],
        &[
            ("EDGE_DEVICE_CERT_FILE", &cert_file),
            ("EDGE_DEVICE_KEY_FILE", &key_file),
        ],
    )
    .await;
    let answer = service(&hub, &["invoke", "x509-device", "hello", "1"]).await;
    assert_eq!(
        answer,
        json!({"status":200,"payload":{"method":"hello","payload":1}})
    );
    device.stop().await;
    hub.stop().await;
}
