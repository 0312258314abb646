//! The sandbox holds: handlers that misbehave on purpose get their status and harm no
//! other call; limits are per handler; WASI gives nothing unless granted. Real
//! components (testkit's fixtures), a real Mosquitto, a plain MQTT client.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use testkit::{HandlerDir, Mosquitto, TestHost, WireCaller, host_config};

const DEVICE: &str = "sandbox-device";

struct Setup {
    _broker: Mosquitto,
    handlers: HandlerDir,
    host: TestHost,
    client: WireCaller,
}

/// A host serving `packages`, each with the sidecar given (if any), its config
/// adjusted by `adjust`.
async fn setup_with(
    packages: &[(&str, Option<&str>)],
    adjust: impl FnOnce(&mut edge_host::Config),
) -> Setup {
    testkit::init_logging();
    let broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(&[]).expect("handlers");
    for (package, sidecar) in packages {
        handlers.add(package).expect("guest");
        if let Some(sidecar) = sidecar {
            std::fs::write(handlers.path().join(format!("{package}.toml")), sidecar)
                .expect("sidecar");
        }
    }
    let mut config = host_config(DEVICE, handlers.path(), broker.url());
    adjust(&mut config);
    let host = TestHost::start(config).await.expect("host starts");
    let client = WireCaller::connect(&broker.url(), DEVICE)
        .await
        .expect("client");
    Setup {
        _broker: broker,
        handlers,
        host,
        client,
    }
}

async fn setup(packages: &[(&str, Option<&str>)]) -> Setup {
    setup_with(packages, |_| {}).await
}

impl Setup {
    async fn call(&mut self, method: &str, payload: &str) -> (u16, Value) {
        self.client
            .call(method, payload.as_bytes())
            .await
            .expect("answered")
    }

    /// A call carrying the caller's timeout, as edge-invoker sends it.
    async fn call_with_timeout(
        &mut self,
        method: &str,
        payload: &str,
        timeout: Duration,
    ) -> (u16, Value) {
        let rid = self.client.request_id();
        let topic = self
            .client
            .namespace()
            .request_topic_with_timeout(method, &rid, timeout);
        self.client
            .call_on(&topic, &rid, payload.as_bytes())
            .await
            .expect("answered")
    }

    async fn still_serves(&mut self) {
        assert_eq!(
            self.call("echo", r#"{"ok":1}"#).await,
            (200, json!({"ok": 1})),
            "the next ordinary call"
        );
    }
}

fn error(body: &Value) -> (&str, &str) {
    (
        body["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {body}")),
        body["error"]["message"].as_str().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_costs_only_its_call_and_is_answered_504() {
    let mut s = setup(&[("echo", None), ("misbehave", Some("timeout_ms = 400"))]).await;
    let (status, body) = s.call("spin", "null").await;
    assert_eq!(
        (status, error(&body).0),
        (504, "deadlineExceeded"),
        "{body}"
    );
    assert!(error(&body).1.contains("400 ms"), "{body}");
    s.still_serves().await;

    // A caller's shorter timeout shortens the deadline further.
    let (status, body) = s
        .call_with_timeout("spin", "null", Duration::from_millis(150))
        .await;
    assert_eq!(
        (status, error(&body).0),
        (504, "deadlineExceeded"),
        "{body}"
    );
    assert!(error(&body).1.contains("150 ms"), "{body}");
    s.still_serves().await;
    s.host.stop().await.expect("clean stop");
}

/// A sleep that outlasts any test: `u32::MAX` ms, about 49 days.
const FOREVER: &[u8] = br#"{"ms":4294967295}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_blocked_forever_in_a_host_call_is_answered_504_at_its_deadline() {
    let mut s = setup(&[("echo", None), ("misbehave", Some("timeout_ms = 300"))]).await;
    let rid = s.client.request_id();
    let topic = s.client.namespace().request_topic("sleep", &rid);
    s.client.send(&topic, FOREVER).await.expect("send");
    // While it sleeps in a host call, the host serves others...
    s.still_serves().await;
    // ...and the sleeper, which would never come back to wasm, is dropped at its
    // deadline and answered.
    let (status, body) = s.client.answer(&rid).await.expect("answered");
    assert_eq!(
        (status, error(&body).0),
        (504, "deadlineExceeded"),
        "{body}"
    );
    assert!(error(&body).1.contains("300 ms"), "{body}");
    s.still_serves().await;
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_stuck_in_host_calls_never_starve_other_handlers_and_free_their_places() {
    // The host's bound is 64; misbehave sets none of its own, so it gets 3/4 of it.
    let mut s = setup(&[("echo", None), ("misbehave", Some("timeout_ms = 2000"))]).await;
    let mut sent = Vec::new();
    for _ in 0..70 {
        let rid = s.client.request_id();
        let topic = s.client.namespace().request_topic("sleep", &rid);
        s.client.send(&topic, FOREVER).await.expect("send");
        sent.push(rid);
    }
    // Calls over the handler's share are refused at once...
    let mut answered = std::collections::HashMap::new();
    while answered.len() < 22 {
        let (rid, status, body) = s
            .client
            .any_answer(Duration::from_secs(30))
            .await
            .expect("the calls over the share are answered at once");
        assert_eq!(status, 503, "{rid}: {body}");
        assert!(error(&body).1.contains("misbehave.wasm limit 48"), "{body}");
        answered.insert(rid, status);
    }
    // ...and while 48 calls are stuck, the other handlers answer.
    s.still_serves().await;
    // At the deadline every stuck call is answered 504, and its place is free again.
    while answered.len() < sent.len() {
        let (rid, status, body) = s
            .client
            .any_answer(Duration::from_secs(30))
            .await
            .expect("every stuck call is answered at its deadline");
        assert_eq!(
            (status, error(&body).0),
            (504, "deadlineExceeded"),
            "{body}"
        );
        assert!(answered.insert(rid, status).is_none(), "answered twice");
    }
    let (status, body) = s.call("status", r#"{"status":201}"#).await;
    assert_eq!(status, 201, "the handler serves again: {body}");
    s.still_serves().await;
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_hangs_while_listing_its_methods_fails_to_load_with_why() {
    let mut s = setup(&[
        ("echo", None),
        (
            "misbehave",
            Some("[config]\nlist_sleep_ms = \"4294967295\""),
        ),
    ])
    .await;
    let catalog = testkit::catalog(&s.host.broker, DEVICE)
        .await
        .expect("catalog");
    let failure = catalog
        .failures
        .iter()
        .find(|f| f.handler == "misbehave.wasm")
        .unwrap_or_else(|| panic!("misbehave is listed as failed: {catalog:?}"));
    assert!(
        failure.error.contains("ran past its deadline"),
        "{failure:?}"
    );
    s.still_serves().await;
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_import_is_capped_per_call_and_the_call_answers() {
    let mut s = setup(&[("echo", None), ("misbehave", None)]).await;
    let logs = testkit::capture_logs();
    // One line of 8 MiB, then 200,000 short lines: each call logs a bounded part.
    let (status, body) = s.call("logFlood", r#"{"lines":1,"bytes":8388608}"#).await;
    assert_eq!((status, body), (200, json!({"logged": 1})));
    let (status, body) = s.call("logFlood", r#"{"lines":200000,"bytes":10}"#).await;
    assert_eq!((status, body), (200, json!({"logged": 200000})));
    s.still_serves().await;
    let logged = logs.lines_with("method=logFlood");
    assert!(
        logged.len() < 256 * 1024,
        "the handler's log stayed bounded: {} bytes",
        logged.len()
    );
    assert!(
        logged.contains("dropped_lines=199744"),
        "the drop is reported"
    );
    assert!(
        logged.contains("dropped_bytes=8387584"),
        "the cut is reported"
    );
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_allocates_without_end_hits_its_own_cap() {
    let mut s = setup(&[("echo", None), ("misbehave", Some("max_memory = 8388608"))]).await;
    let (status, body) = s.call("alloc", "null").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(
        error(&body),
        (
            "handlerFailed",
            "the handler exhausted its memory (limit 8 MiB)"
        )
    );
    s.still_serves().await;
    // The default cap holds for handlers without a sidecar.
    let mut s2 = setup(&[("echo", None), ("misbehave", None)]).await;
    let (status, body) = s2.call("alloc", "null").await;
    assert_eq!(
        (status, error(&body).1),
        (500, "the handler exhausted its memory (limit 64 MiB)")
    );
    s2.still_serves().await;
    s.host.stop().await.expect("clean stop");
    s2.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traps_bad_answers_and_floods_of_output_each_get_their_status() {
    let mut s = setup(&[("echo", None), ("misbehave", None)]).await;
    let (status, body) = s.call("panic", "null").await;
    assert_eq!((status, error(&body).0), (500, "handlerFailed"), "{body}");
    assert!(
        error(&body).1.contains("unreachable"),
        "the trap says what happened: {body}"
    );
    s.still_serves().await;

    let (status, body) = s.call("notJson", "null").await;
    assert_eq!((status, error(&body).0), (500, "invalidResponse"), "{body}");
    s.still_serves().await;

    let (status, body) = s.call("huge", "null").await;
    assert_eq!((status, error(&body).0), (500, "invalidResponse"), "{body}");
    assert!(error(&body).1.contains("limit is 131072"), "{body}");
    s.still_serves().await;

    // Printing a lot is not an error: the log keeps a bounded part, the call answers.
    let (status, body) = s.call("chatty", "null").await;
    assert_eq!((status, body), (200, json!({"printed": 20000})));
    s.still_serves().await;
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_over_the_limit_are_answered_413() {
    let mut s = setup(&[("echo", None)]).await;
    let big = format!("\"{}\"", "x".repeat(128 * 1024));
    let (status, body) = s.call("echo", &big).await;
    assert_eq!((status, error(&body).0), (413, "payloadTooLarge"), "{body}");
    let fits = format!("\"{}\"", "x".repeat(128 * 1024 - 2));
    let (status, body) = s.call("echo", &fits).await;
    assert_eq!(
        (status, body.as_str().map(str::len)),
        (200, Some(128 * 1024 - 2))
    );
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_the_bounds_is_answered_200_or_503_and_none_is_lost() {
    let mut s = setup_with(
        &[("echo", None), ("misbehave", Some("max_in_flight = 2"))],
        |config| config.limits.max_in_flight = 6,
    )
    .await;
    // 60 slow calls at once: the handler's bound (2) and the host's (6) both bite.
    let mut sent = Vec::new();
    for _ in 0..60 {
        let rid = s.client.request_id();
        let topic = s.client.namespace().request_topic("sleep", &rid);
        s.client.send(&topic, br#"{"ms":200}"#).await.expect("send");
        sent.push(rid);
    }
    let mut answered = std::collections::HashMap::new();
    while answered.len() < sent.len() {
        let (rid, status, body) = s
            .client
            .any_answer(Duration::from_secs(30))
            .await
            .expect("every call is answered");
        assert!(
            answered.insert(rid.clone(), (status, body)).is_none(),
            "{rid} answered twice"
        );
    }
    let ok = answered
        .values()
        .filter(|(status, _)| *status == 200)
        .count();
    let busy: Vec<&Value> = answered
        .values()
        .filter(|(status, _)| *status == 503)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(ok + busy.len(), 60, "only 200 and 503: {answered:?}");
    assert!(ok >= 2, "the bound lets calls through: {ok}");
    assert!(
        busy.iter().all(|b| error(b).0 == "tooManyCalls"),
        "{busy:?}"
    );
    assert!(
        busy.iter()
            .any(|b| error(b).1.contains("misbehave.wasm limit 2")),
        "{busy:?}"
    );
    for rid in &sent {
        assert!(answered.contains_key(rid), "{rid} lost");
    }
    s.still_serves().await;
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_gives_nothing_by_default() {
    let mut s = setup(&[("probe", None)]).await;
    let (_, env) = s.call("env", "null").await;
    assert_eq!(
        env,
        json!({"vars": {}, "args": []}),
        "no environment, no arguments"
    );
    let (_, read) = s.call("read", r#"{"path":"/etc/hostname"}"#).await;
    assert!(read["error"].is_string(), "no files: {read}");
    let (_, write) = s.call("write", r#"{"path":"/tmp/x","contents":"x"}"#).await;
    assert!(write["error"].is_string(), "no files: {write}");
    let port = s.host.broker.port.to_string();
    let (_, connect) = s
        .call("connect", &format!(r#"{{"addr":"127.0.0.1:{port}"}}"#))
        .await;
    assert!(connect["error"].is_string(), "no network: {connect}");
    let (_, stdin) = s.call("stdin", "null").await;
    assert_eq!(stdin, json!({"read": 0}), "no inherited stdin");
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_give_exactly_what_they_say() {
    let data = tempfile::tempdir().expect("data folder");
    std::fs::write(data.path().join("reading.txt"), "42").expect("write");
    let sidecar = format!(
        "[grants]\nenv = {{ SITE = \"plant-7\" }}\ndirs = [{{ host = {:?}, guest = \"/data\" }}]\n",
        data.path()
    );
    let mut s = setup(&[("probe", Some(&sidecar))]).await;
    let (_, env) = s.call("env", "null").await;
    assert_eq!(env["vars"], json!({"SITE": "plant-7"}));
    let (_, read) = s.call("read", r#"{"path":"/data/reading.txt"}"#).await;
    assert_eq!(read, json!({"contents": "42"}));
    let (_, write) = s
        .call("write", r#"{"path":"/data/new.txt","contents":"x"}"#)
        .await;
    assert!(
        write["error"].is_string(),
        "read-only unless writable: {write}"
    );
    assert!(!data.path().join("new.txt").exists());
    let (_, outside) = s
        .call("read", r#"{"path":"/data/../../etc/hostname"}"#)
        .await;
    assert!(
        outside["error"].is_string(),
        "nothing outside the folder: {outside}"
    );

    // A writable grant, reloaded by changing the sidecar.
    let writable = sidecar.replace("guest = \"/data\"", "guest = \"/data\", writable = true");
    std::fs::write(s.handlers.path().join("probe.toml"), writable).expect("sidecar");
    testkit::eventually(
        "the writable grant applying",
        Duration::from_secs(20),
        async || {
            let (_, write) = s
                .call("write", r#"{"path":"/data/new.txt","contents":"x"}"#)
                .await;
            (write == json!({"written": 1})).then_some(())
        },
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(data.path().join("new.txt")).expect("written"),
        "x"
    );
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_asking_more_than_the_host_allows_fails_to_load_with_why() {
    let mut s = setup(&[
        ("echo", None),
        ("misbehave", Some("max_memory = 1073741824")),
    ])
    .await;
    let (status, body) = s.call("spin", "null").await;
    assert_eq!((status, error(&body).0), (404, "methodNotFound"), "{body}");
    s.still_serves().await;
    let missing = Path::new("/no/such/folder");
    std::fs::write(
        s.handlers.path().join("echo.toml"),
        format!("[grants]\ndirs = [{{ host = {missing:?}, guest = \"/d\" }}]\n"),
    )
    .expect("sidecar");
    let catalog = testkit::catalog_until(&s.host.broker, DEVICE, |c| {
        c.failures.iter().any(|f| f.handler == "echo.wasm")
    })
    .await
    .expect("the bad sidecar is reported");
    let why: Vec<&str> = catalog.failures.iter().map(|f| f.error.as_str()).collect();
    assert!(
        why.iter()
            .any(|e| e.contains("max_memory 1024 MiB is over the host's limit of 64 MiB")),
        "{why:?}"
    );
    assert!(
        why.iter()
            .any(|e| e.contains("granted folder /no/such/folder is not a folder")),
        "{why:?}"
    );
    // The bad sidecar leaves the last good echo serving.
    s.still_serves().await;
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_importing_what_the_host_does_not_give_fails_naming_it_and_the_fix() {
    let mut s = setup(&[("echo", None)]).await;
    // As a default componentize-js build does: it imports wasi:http.
    std::fs::write(
        s.handlers.path().join("fetches.wasm"),
        r#"(component
            (import "wasi:http/outgoing-handler@0.2.3" (instance (export "handle" (func))))
            (import "acme:tools/magic@1.0.0" (instance (export "wave" (func)))))"#,
    )
    .expect("written");
    // Known packages at a version the host does not link.
    std::fs::write(
        s.handlers.path().join("future.wasm"),
        r#"(component (import "wasi:cli/environment@0.3.0" (instance (export "get-arguments" (func)))))"#,
    )
    .expect("written");
    let catalog = testkit::catalog_until(&s.host.broker, DEVICE, |c| c.failures.len() == 2)
        .await
        .expect("both are reported");
    let why = |file: &str| {
        catalog
            .failures
            .iter()
            .find(|f| f.handler == file)
            .map(|f| f.error.clone())
            .unwrap_or_default()
    };
    let fetches = why("fetches.wasm");
    assert!(
        fetches.contains(
            "the component imports what the host does not give: \
             wasi:http/outgoing-handler@0.2.3, acme:tools/magic@1.0.0"
        ),
        "{fetches}"
    );
    assert!(
        fetches.contains(r#"disableFeatures: ["http", "fetch-event"]"#),
        "{fetches}"
    );
    let future = why("future.wasm");
    assert!(
        future.contains("the component's imports do not match what the host gives"),
        "{future}"
    );
    assert!(future.contains("wasi:cli/environment@0.3.0"), "{future}");
    s.still_serves().await;
    s.host.stop().await.expect("clean stop");
}
