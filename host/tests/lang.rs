//! Handlers in Python and JavaScript are first-class: the examples answer with their
//! configuration and the device id, and the sandbox holds for them as for Rust (a
//! loop ends at the deadline, unbounded allocation at the memory cap, an exception
//! costs only its call, fresh instances share nothing, made ahead of their calls or
//! not). Real components built with
//! componentize-py and componentize-js (testkit::lang), a real Mosquitto, a plain MQTT
//! client. Without those toolchains these tests fail, saying how to install them.

use std::time::Duration;

use serde_json::{Value, json};
use testkit::{HandlerDir, Mosquitto, TestHost, WireCaller, host_config};

const DEVICE: &str = "lang-device";

/// How long a host may take to start when it compiles a 12-18 MB component (seconds
/// alone, minutes on a machine busy with other builds).
const COMPILE_TIME: Duration = Duration::from_secs(300);

/// Hosts start one at a time, so that the first to load a 12-18 MB component compiles
/// it (seconds) into the shared compiled-code cache and the others take it from there.
static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    _broker: Mosquitto,
    _handlers: HandlerDir,
    host: TestHost,
    client: WireCaller,
}

/// A host serving the Rust `echo` and the Python or JavaScript guests named, each
/// with the sidecar given (if any).
async fn setup(guests: &[(&str, Option<&str>)]) -> Setup {
    testkit::init_logging();
    let broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(&["echo"]).expect("handlers");
    for (name, sidecar) in guests {
        // Built here, not inside the host's start: a missing toolchain fails the test
        // with the message that says how to install it.
        handlers.add_lang(name).unwrap_or_else(|e| panic!("{e:#}"));
        if let Some(sidecar) = sidecar {
            std::fs::write(handlers.path().join(format!("{name}.toml")), sidecar).expect("sidecar");
        }
    }
    let mut config = host_config(DEVICE, handlers.path(), broker.url());
    config.cache = true;
    config.cache_dir = Some(testkit::lang::compile_cache());
    let host = {
        let _one_at_a_time = STARTING.lock().await;
        TestHost::start_within(config, COMPILE_TIME)
            .await
            .expect("host starts")
    };
    let client = WireCaller::connect(&broker.url(), DEVICE)
        .await
        .expect("client");
    Setup {
        _broker: broker,
        _handlers: handlers,
        host,
        client,
    }
}

impl Setup {
    async fn call(&mut self, method: &str, payload: &str) -> (u16, Value) {
        self.client
            .call(method, payload.as_bytes())
            .await
            .expect("answered")
    }

    /// The host still serves: Rust's echo, and a fresh instance of `count` (the
    /// guest's own counting method) right after a call of the same guest failed.
    async fn still_serves(&mut self, count: &str) {
        assert_eq!(
            self.call("echo", r#"{"ok":1}"#).await,
            (200, json!({"ok": 1})),
            "the next ordinary call"
        );
        assert_eq!(
            self.call(count, "null").await,
            (200, json!({"calls": 1})),
            "the next call of the same handler"
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
async fn the_python_and_javascript_examples_answer_with_their_config_and_the_device_id() {
    let mut s = setup(&[
        ("greeter-py", Some("[config]\ngreeting = \"Grüezi\"\n")),
        (
            "sensor-js",
            Some("[config]\nsensor = \"boiler\"\noffset = \"-1.5\"\n"),
        ),
    ])
    .await;
    let (status, body) = s.call("greet", r#"{"name":"Ada"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["message"], "Grüezi, Ada! This is lang-device.");
    assert_eq!(body["deviceId"], DEVICE);
    let (status, body) = s.call("greet", r#"{"name":42}"#).await;
    assert_eq!((status, error(&body).0), (400, "invalidPayload"), "{body}");

    let (status, body) = s.call("readSensor", "null").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["deviceId"], &body["sensor"], &body["unit"]),
        (&json!(DEVICE), &json!("boiler"), &json!("C")),
        "{body}"
    );
    assert_eq!(body["value"].as_f64(), Some(20.0), "21.5 - 1.5: {body}");
    let (status, body) = s.call("readSensor", r#"{"unit":"F"}"#).await;
    assert_eq!(
        (status, body["value"].as_f64()),
        (200, Some(68.0)),
        "{body}"
    );
    let (status, body) = s.call("readSensor", r#"{"unit":"K"}"#).await;
    assert_eq!((status, error(&body).0), (400, "invalidPayload"), "{body}");
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_in_python_or_javascript_is_answered_504_at_its_deadline() {
    let mut s = setup(&[
        ("py-misbehave", Some("timeout_ms = 500")),
        ("js-misbehave", Some("timeout_ms = 500")),
    ])
    .await;
    for (spin, count) in [("pySpin", "pyCount"), ("jsSpin", "jsCount")] {
        let started = std::time::Instant::now();
        let (status, body) = s.call(spin, "null").await;
        assert_eq!(
            (status, error(&body).0),
            (504, "deadlineExceeded"),
            "{spin}: {body}"
        );
        assert!(error(&body).1.contains("500 ms"), "{spin}: {body}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{spin} was ended late: {:?}",
            started.elapsed()
        );
        s.still_serves(count).await;
    }
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_allocation_in_python_or_javascript_is_answered_500_at_the_memory_cap() {
    let sidecar = "max_memory = 33554432"; // 32 MiB
    let mut s = setup(&[
        ("py-misbehave", Some(sidecar)),
        ("js-misbehave", Some(sidecar)),
    ])
    .await;
    for (alloc, count) in [("pyAlloc", "pyCount"), ("jsAlloc", "jsCount")] {
        let (status, body) = s.call(alloc, "null").await;
        assert_eq!(status, 500, "{alloc}: {body}");
        assert_eq!(
            error(&body),
            (
                "handlerFailed",
                "the handler exhausted its memory (limit 32 MiB)"
            ),
            "{alloc}"
        );
        s.still_serves(count).await;
    }
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncaught_exception_in_python_or_javascript_is_answered_500_and_costs_only_its_call() {
    let mut s = setup(&[("py-misbehave", None), ("js-misbehave", None)]).await;
    for (raise, count) in [("pyRaise", "pyCount"), ("jsThrow", "jsCount")] {
        let (status, body) = s.call(raise, "null").await;
        assert_eq!(
            (status, error(&body).0),
            (500, "handlerFailed"),
            "{raise}: {body}"
        );
        s.still_serves(count).await;
    }
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_python_and_javascript_instances_share_nothing() {
    let mut s = setup(&[("py-misbehave", None), ("js-misbehave", None)]).await;
    let log = testkit::capture_logs();
    for count in ["pyCount", "jsCount"] {
        // The first few calls instantiate their own instance; Python's take long to,
        // so the later ones are served by instances made ahead of them.
        for _ in 0..10 {
            assert_eq!(
                s.call(count, "null").await,
                (200, json!({"calls": 1})),
                "{count}: a global counter starts again in every fresh instance"
            );
        }
    }
    let ahead = log.lines_with("made ahead of its calls");
    assert!(
        ahead.contains("py-misbehave.wasm"),
        "the Python handler's later calls were served by instances made ahead: {ahead:?}"
    );
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_reuse_opted_in_python_and_javascript_keep_their_globals_between_calls() {
    // The counterpart of the test above, so that it cannot pass for a broken counter.
    let reuse = "reuse = true\nreuse_max_calls = 100";
    let mut s = setup(&[("py-misbehave", Some(reuse)), ("js-misbehave", Some(reuse))]).await;
    for count in ["pyCount", "jsCount"] {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (status, body) = s.call(count, "null").await;
            assert_eq!(status, 200, "{body}");
            seen.push(body["calls"].as_u64().expect("a count"));
        }
        assert_eq!(
            seen,
            [1, 2, 3],
            "{count}: one warm instance served the calls"
        );
    }
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_echoes_keep_every_character_of_the_payload() {
    // Strings cross into and out of each language's engine through its bindings (for
    // JavaScript, build.mjs replaces the bindings' UTF-8 encoder with the engine's
    // own): one, two, three and four bytes per character, an escaped quote and NUL,
    // and a payload long enough to take several allocations.
    let mut s = setup(&[("py-misbehave", None), ("js-misbehave", None)]).await;
    let mixed = "a é ß 漢字 😀 \"quoted\" \u{0} \u{10FFFF} end";
    let long: String = std::iter::repeat_n(mixed, 200).collect();
    for payload in [
        json!({"text": mixed, "n": [1, 2.5, null, true]}),
        json!({"long": long}),
        json!("😀"),
    ] {
        let text = payload.to_string();
        for echo in ["pyEcho", "jsEcho"] {
            assert_eq!(
                s.call(echo, &text).await,
                (200, payload.clone()),
                "{echo} answered its payload back, character for character"
            );
        }
    }
    s.host.stop().await.expect("clean stop");
}
