//! The wire contract of docs/protocol.md, checked with a plain MQTT client against a
//! host with real handler components, through a real Mosquitto.

use std::time::Duration;

use edge_proto::{Catalog, Namespace, Presence};
use serde_json::{Value, json};
use testkit::{HandlerDir, Mosquitto, RawClient, TestHost, WireCaller, host_config};

const DEVICE: &str = "wire-device";
const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    _broker: Mosquitto,
    _handlers: HandlerDir,
    host: TestHost,
    client: WireCaller,
    ns: Namespace,
}

async fn setup() -> Setup {
    testkit::init_logging();
    let broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(&["echo", "device-method", "misbehave"]).expect("handlers");
    let host = TestHost::start(host_config(DEVICE, handlers.path(), broker.url()))
        .await
        .expect("host starts");
    let client = WireCaller::connect(&broker.url(), DEVICE)
        .await
        .expect("client connects");
    Setup {
        _broker: broker,
        _handlers: handlers,
        host,
        ns: client.namespace().clone(),
        client,
    }
}

impl Setup {
    async fn raw_call(&mut self, topic: &str, rid: &str, payload: &[u8]) -> (u16, Value) {
        self.client
            .call_on(topic, rid, payload)
            .await
            .expect("answered")
    }

    async fn call(&mut self, method: &str, rid: &str, payload: &[u8]) -> (u16, Value) {
        let topic = self.ns.request_topic(method, rid);
        self.raw_call(&topic, rid, payload).await
    }
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_answers_with_its_status_and_payload() {
    let mut s = setup().await;
    let (status, body) = s
        .call("DeviceMethod", "1", br#"{"method_number":"42"}"#)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"Response": "This is the response from the device"})
    );

    let (status, body) = s.call("echo", "2", br#"{"a":[1,2,{"b":null}]}"#).await;
    assert_eq!((status, body), (200, json!({"a": [1, 2, {"b": null}]})));

    // The handler picks its status; the host passes it through untouched.
    let (status, body) = s
        .call("status", "3", br#"{"status":418,"body":{"teapot":true}}"#)
        .await;
    assert_eq!((status, body), (418, json!({"teapot": true})));
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_payload_reaches_the_handler_as_null() {
    let mut s = setup().await;
    let (status, body) = s.call("echo", "e", b"").await;
    assert_eq!((status, body), (200, Value::Null));
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_answers_400_404_and_500_with_error_bodies() {
    let mut s = setup().await;

    let (status, body) = s.call("echo", "bad-json", b"{not json").await;
    assert_eq!((status, error_code(&body)), (400, "invalidJson"), "{body}");

    let (status, body) = s.call("echo", "bad-utf8", &[0xff, 0xfe, 0x00]).await;
    assert_eq!((status, error_code(&body)), (400, "invalidJson"), "{body}");

    let topic = format!(
        "{}$iothub/methods/POST/bad method/?$rid=bad-name",
        s.ns.prefix()
    );
    let (status, body) = s.raw_call(&topic, "bad-name", b"{}").await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "invalidMethod"),
        "{body}"
    );

    let topic = format!(
        "{}$iothub/methods/POST/a/b/?$rid=extra-level",
        s.ns.prefix()
    );
    let (status, body) = s.raw_call(&topic, "extra-level", b"{}").await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "invalidMethod"),
        "{body}"
    );

    let (status, body) = s.call("noSuchMethod", "missing", b"{}").await;
    assert_eq!(
        (status, error_code(&body)),
        (404, "methodNotFound"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("noSuchMethod")),
        "{body}"
    );

    let (status, body) = s.call("panic", "trap", b"{}").await;
    assert_eq!(
        (status, error_code(&body)),
        (500, "handlerFailed"),
        "{body}"
    );

    let (status, body) = s.call("notJson", "not-json-answer", b"{}").await;
    assert_eq!(
        (status, error_code(&body)),
        (500, "invalidResponse"),
        "{body}"
    );

    // After all of that, an ordinary call is served as ever.
    let (status, body) = s.call("echo", "after", b"[1]").await;
    assert_eq!((status, body), (200, json!([1])));
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_cannot_be_answered_are_dropped_and_the_host_serves_on() {
    let mut s = setup().await;
    let prefix = s.ns.prefix().to_owned();
    for topic in [
        format!("{prefix}$iothub/methods/POST/echo/"),
        format!("{prefix}$iothub/methods/POST/echo"),
        format!("{prefix}$iothub/methods/POST/echo/?$rid="),
        format!("{prefix}$iothub/methods/POST/echo/?other=1"),
        format!(
            "{prefix}$iothub/methods/POST/echo/?$rid={}",
            "r".repeat(500)
        ),
    ] {
        s.client.send(&topic, b"{}").await.expect("publish");
    }
    let (status, body) = s.call("echo", "still-here", b"\"ok\"").await;
    assert_eq!((status, body), (200, json!("ok")));
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_catalog_are_retained_and_shutdown_marks_offline() {
    let s = setup().await;
    let filters = [s.ns.presence_topic(), s.ns.catalog_topic()];
    let mut watcher = RawClient::connect(&s.host.broker, &filters)
        .await
        .expect("watcher");

    let presence_topic = s.ns.presence_topic();
    let (_, presence) = watcher
        .next_where(WAIT, |t| t == presence_topic)
        .await
        .expect("retained presence");
    let presence: Presence = serde_json::from_slice(&presence).expect("presence document");
    assert!(presence.online && presence.since.is_some(), "{presence:?}");

    let catalog_topic = s.ns.catalog_topic();
    let (_, catalog) = watcher
        .next_where(WAIT, |t| t == catalog_topic)
        .await
        .expect("retained catalog");
    let catalog: Catalog = serde_json::from_slice(&catalog).expect("catalog document");
    let echo = catalog
        .methods
        .iter()
        .find(|m| m.name == "echo")
        .expect("echo listed");
    assert_eq!(echo.handler, "echo.wasm");
    assert!(
        echo.digest.starts_with("sha256:") && echo.digest.len() == 7 + 64,
        "{}",
        echo.digest
    );
    assert!(catalog.methods.iter().any(|m| m.name == "DeviceMethod"));
    assert!(catalog.failures.is_empty(), "{:?}", catalog.failures);

    s.host.stop().await.expect("clean stop");
    let (_, presence) = watcher
        .next_where(WAIT, |t| t == presence_topic)
        .await
        .expect("offline presence");
    let presence: Presence = serde_json::from_slice(&presence).expect("presence document");
    assert!(!presence.online, "{presence:?}");
    assert_eq!(presence.reason.as_deref(), Some("shutdown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_handler_is_reported_and_the_others_serve() {
    testkit::init_logging();
    let broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(&["echo", "wrong-world"]).expect("handlers");
    std::fs::write(handlers.path().join("garbage.wasm"), b"\0asm not really").expect("write");
    let host = TestHost::start(host_config(DEVICE, handlers.path(), broker.url()))
        .await
        .expect("host starts despite bad files");
    let ns = Namespace::for_device(DEVICE).expect("valid");
    let mut watcher = RawClient::connect(&broker.url(), &[ns.catalog_topic()])
        .await
        .expect("watcher");
    let (_, catalog) = watcher.next_where(WAIT, |_| true).await.expect("catalog");
    let catalog: Catalog = serde_json::from_slice(&catalog).expect("catalog document");
    let failed: Vec<&str> = catalog
        .failures
        .iter()
        .map(|f| f.handler.as_str())
        .collect();
    assert_eq!(
        failed,
        ["garbage.wasm", "wrong-world.wasm"],
        "{:?}",
        catalog.failures
    );
    assert!(
        catalog.failures[1].error.contains("handler world"),
        "{:?}",
        catalog.failures[1]
    );
    assert_eq!(catalog.methods.len(), 1);
    host.stop().await.expect("clean stop");
}
