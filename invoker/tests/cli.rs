//! edge-invoker as operators run it: the real binary against real hosts serving real
//! handler components, on the embedded broker and through Mosquitto.

use std::process::Output;
use std::time::{Duration, Instant};

use edge_proto::BrokerUrl;
use serde_json::{Value, json};
use testkit::{HandlerDir, Mosquitto, TestHost, free_port, host_config};

/// Runs `edge-invoker --broker URL ARGS...`.
async fn invoker(broker: &BrokerUrl, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_edge-invoker"))
        .arg("--broker")
        .arg(broker.to_string())
        .args(args)
        .output()
        .await
        .expect("edge-invoker runs")
}

/// Asserts that `--json call ... echo 7` exited 0 and printed the echo's answer.
fn assert_answered_7(out: &Output) {
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim()
        ),
        (Some(0), r#"{"status":200,"payload":7}"#),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a `--json` call and returns the exit code and the JSON printed.
async fn call_json(broker: &BrokerUrl, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["--json", "call"];
    all.extend_from_slice(args);
    let out = invoker(broker, &all).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "--json printed {stdout:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("exit code"), json)
}

async fn start_host(device: &str, broker: Option<&Mosquitto>) -> (TestHost, HandlerDir) {
    testkit::init_logging();
    let handlers =
        HandlerDir::with(&["device-method", "echo", "device-info", "misbehave"]).expect("handlers");
    let mut config = match broker {
        Some(mosquitto) => host_config(device, handlers.path(), mosquitto.url()),
        None => {
            let mut config = host_config(device, handlers.path(), BrokerUrl::tcp("", 0));
            config.broker = None;
            config.listen = ([127, 0, 0, 1], free_port().expect("free port")).into();
            config
        }
    };
    // Longer than the invoker's shortest response timeout (5 s), so that a handler that
    // spins is timed out by the caller first; short enough to end the test soon after.
    config.limits.call_timeout_ms = 8_000;
    let host = TestHost::start(config).await.expect("host starts");
    (host, handlers)
}

/// The calls both brokers must carry the same way: each status, with its body and exit code.
async fn statuses_and_bodies(broker: &BrokerUrl, device: &str) {
    let (code, out) = call_json(
        broker,
        &[device, "DeviceMethod", r#"{"method_number":"42"}"#],
    )
    .await;
    assert_eq!(
        (code, out),
        (
            0,
            json!({"status": 200, "payload": {"Response": "This is the response from the device"}})
        )
    );

    let (code, out) = call_json(broker, &[device, "echo", r#"{"big":12345678901234567890}"#]).await;
    assert_eq!(code, 0);
    assert_eq!(
        out["payload"]["big"].to_string(),
        "12345678901234567890",
        "numbers keep their digits: {out}"
    );

    let (code, out) = call_json(broker, &[device, "getInfo"]).await;
    assert_eq!(
        (code, &out["status"], &out["payload"]["deviceId"]),
        (0, &json!(200), &json!(device)),
        "{out}"
    );

    // 400 chosen by the handler: a payload it cannot use.
    let (code, out) = call_json(broker, &[device, "reboot", r#"{"delaySeconds":-1}"#]).await;
    assert_eq!(
        (code, &out["status"], &out["payload"]["error"]["code"]),
        (1, &json!(400), &json!("invalidPayload")),
        "{out}"
    );

    let (code, out) = call_json(broker, &[device, "noSuchMethod", "{}"]).await;
    assert_eq!(
        (code, &out["status"], &out["payload"]["error"]["code"]),
        (1, &json!(404), &json!("methodNotFound")),
        "{out}"
    );

    let (code, out) = call_json(broker, &[device, "panic", "{}"]).await;
    assert_eq!(
        (code, &out["status"], &out["payload"]["error"]["code"]),
        (1, &json!(500), &json!("handlerFailed")),
        "{out}"
    );

    let (code, out) = call_json(broker, &[device, "notJson", "{}"]).await;
    assert_eq!(
        (code, &out["status"], &out["payload"]["error"]["code"]),
        (1, &json!(500), &json!("invalidResponse")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tutorial_call_prints_what_call_method_on_device_prints() {
    let (host, _handlers) = start_host("my-device", None).await;
    let out = invoker(
        &host.broker,
        &[
            "call",
            "my-device",
            "DeviceMethod",
            r#"{"method_number":"42"}"#,
        ],
    )
    .await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stderr.contains(r#"Invoking method 'DeviceMethod' on device 'my-device' with payload: {"method_number":"42"}"#), "{stderr}");
    assert_eq!(
        stdout,
        "Response status : 200\nResponse payload: {\"Response\":\"This is the response from the device\"}\n"
    );
    host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_and_bodies_on_the_embedded_broker() {
    let (host, _handlers) = start_host("embedded-device", None).await;
    statuses_and_bodies(&host.broker, "embedded-device").await;
    host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_and_bodies_through_mosquitto() {
    let mosquitto = Mosquitto::start().expect("mosquitto starts");
    let (host, _handlers) = start_host("mosquitto-device", Some(&mosquitto)).await;
    statuses_and_bodies(&mosquitto.url(), "mosquitto-device").await;
    host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_fails_at_once_with_404103() {
    let mosquitto = Mosquitto::start().expect("mosquitto starts");
    let (host, _handlers) = start_host("gone-device", Some(&mosquitto)).await;
    host.stop().await.expect("clean stop");
    let started = Instant::now();
    let (code, out) = call_json(&mosquitto.url(), &["gone-device", "echo", "{}"]).await;
    assert_eq!((code, &out["errorCode"]), (3, &json!(404103)), "{out}");
    // "At once": well under the 30 s default response timeout the call would otherwise wait.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    let out = invoker(&mosquitto.url(), &["call", "gone-device", "echo"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr.contains("error: device 'gone-device' is not online (404103 DeviceNotOnline)"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_handler_is_ended_in_time_to_answer_504_before_the_caller_gives_up() {
    let mosquitto = Mosquitto::start().expect("mosquitto starts");
    let (host, _handlers) = start_host("slow-device", Some(&mosquitto)).await;
    // The invoker tells the host how long it waits; the host ends the handler before
    // then, so the caller learns why (504 deadlineExceeded), not just that time ran out.
    let (code, out) = call_json(
        &mosquitto.url(),
        &["slow-device", "spin", "{}", "--response-timeout", "5"],
    )
    .await;
    assert_eq!(
        (code, &out["status"], &out["payload"]["error"]["code"]),
        (1, &json!(504), &json!("deadlineExceeded")),
        "{out}"
    );
    // The spinning call cost only itself.
    let (code, out) = call_json(&mosquitto.url(), &["slow-device", "echo", "1"]).await;
    assert_eq!((code, out), (0, json!({"status": 200, "payload": 1})));
    host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_does_not_answer_in_time_gives_504101() {
    let mosquitto = Mosquitto::start().expect("mosquitto starts");
    // A device that says it is online and then never answers (wedged, or an old
    // firmware that drops the method), and one that publishes no presence at all.
    let mute = testkit::RawClient::connect(&mosquitto.url(), &[])
        .await
        .expect("client");
    let presence = edge_proto::Namespace::for_device("mute-device")
        .expect("valid")
        .presence_topic();
    mute.publish_retained(&presence, br#"{"online":true}"#.as_slice())
        .await
        .expect("presence");
    for device in ["mute-device", "silent-device"] {
        let started = Instant::now();
        let (code, out) = call_json(
            &mosquitto.url(),
            &[device, "echo", "{}", "--response-timeout", "5"],
        )
        .await;
        assert_eq!(
            (code, &out["errorCode"]),
            (4, &json!(504101)),
            "{device}: {out}"
        );
        assert!(
            started.elapsed() >= Duration::from_secs(5),
            "{device}: gave up before its timeout"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_usage_is_one_line_naming_the_problem() {
    let port = free_port().expect("free port");
    let nowhere = BrokerUrl::tcp("127.0.0.1", port);
    for (args, needle) in [
        (vec!["call", "d", "m", "{not json"], "payload is not JSON"),
        (
            vec!["call", "d", "m", "{}", "--response-timeout", "4"],
            "400004",
        ),
        (
            vec!["call", "d", "m", "{}", "--connect-timeout", "301"],
            "400004",
        ),
        (vec!["call", "bad/device", "m"], "device id"),
    ] {
        let out = invoker(&nowhere, &args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(
            stderr
                .trim()
                .lines()
                .filter(|l| l.starts_with("error"))
                .count(),
            1,
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    let out = invoker(&nowhere, &["frobnicate"]).await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_flags_take_the_invoker_to_a_tls_broker_and_a_wrong_ca_is_one_clear_line() {
    testkit::init_logging();
    let pki = testkit::TestPki::generate("edge test CA").expect("pki");
    let other = testkit::TestPki::generate("another CA").expect("pki");
    let mosquitto = Mosquitto::start_tls(&pki, true).expect("mosquitto with TLS");
    let broker = BrokerUrl {
        tls: true,
        ..mosquitto.url()
    };
    let handlers = HandlerDir::with(&["echo"]).expect("handlers");
    let mut config = host_config("tls-cli-device", handlers.path(), broker.clone());
    config.tls.ca_file = Some(pki.file("ca.pem"));
    config.tls.cert_file = Some(pki.file("client.pem"));
    config.tls.key_file = Some(pki.file("client.key"));
    let host = TestHost::start(config)
        .await
        .expect("the host comes online over TLS");
    let tls_args = |pki: &testkit::TestPki| {
        vec![
            "--ca-file".to_owned(),
            pki.file("ca.pem").display().to_string(),
            "--cert-file".to_owned(),
            pki.file("client.pem").display().to_string(),
            "--key-file".to_owned(),
            pki.file("client.key").display().to_string(),
        ]
    };
    let mut args = tls_args(&pki);
    args.extend(["--json", "call", "tls-cli-device", "echo", "7"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = invoker(&broker, &args).await;
    assert_answered_7(&out);

    let mut args = tls_args(&other);
    args.extend(["call", "tls-cli-device", "echo", "7"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = invoker(&broker, &args).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("UnknownIssuer"), "{stderr}");
    host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_broker_at_an_ipv6_address_is_named_by_the_bare_address() {
    testkit::init_logging();
    let pki = testkit::TestPki::generate("edge test CA").expect("pki");
    // Mosquitto is waited for on 127.0.0.1; the TLS listener on ::1 is waited for here.
    let (plain, v6) = (free_port().expect("port"), free_port().expect("port"));
    let _mosquitto = Mosquitto::start_config(
        &[plain],
        &format!(
            "allow_anonymous true\nlistener {plain} 127.0.0.1\nlistener {v6} ::1\n\
             cafile {}\ncertfile {}\nkeyfile {}\n",
            pki.file("ca.pem").display(),
            pki.file("server.pem").display(),
            pki.file("server.key").display(),
        ),
    )
    .expect("mosquitto");
    edge_proto::client::wait_listening(
        std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, v6)),
        Duration::from_secs(10),
    )
    .expect("mosquitto listens on ::1");
    let broker = BrokerUrl {
        tls: true,
        ..BrokerUrl::tcp("::1", v6)
    };
    let handlers = HandlerDir::with(&["echo"]).expect("handlers");
    let mut config = host_config("ipv6-tls-device", handlers.path(), broker.clone());
    config.tls.ca_file = Some(pki.file("ca.pem"));
    let host = TestHost::start(config)
        .await
        .expect("the host comes online over TLS on ::1");
    let ca = pki.file("ca.pem").display().to_string();
    let out = invoker(
        &broker,
        &[
            "--ca-file",
            &ca,
            "--json",
            "call",
            "ipv6-tls-device",
            "echo",
            "7",
        ],
    )
    .await;
    assert_answered_7(&out);
    host.stop().await.expect("clean stop");
}

/// Runs `edge-invoker --broker URL ARGS...` with the system's trust store replaced by
/// `cert_file` (rustls-native-certs reads `SSL_CERT_FILE` instead of the system's).
async fn invoker_trusting(
    broker: &BrokerUrl,
    cert_file: &std::path::Path,
    args: &[&str],
) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_edge-invoker"))
        .arg("--broker")
        .arg(broker.to_string())
        .args(args)
        .env("SSL_CERT_FILE", cert_file)
        .env_remove("SSL_CERT_DIR")
        .env_remove("EDGE_CA_FILE")
        .output()
        .await
        .expect("edge-invoker runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_without_a_ca_file_trusts_the_systems_roots() {
    testkit::init_logging();
    let pki = testkit::TestPki::generate("edge test CA").expect("pki");
    let mosquitto = Mosquitto::start_tls(&pki, true).expect("mosquitto with TLS");
    let broker = BrokerUrl {
        tls: true,
        ..mosquitto.url()
    };
    let handlers = HandlerDir::with(&["echo"]).expect("handlers");
    let mut config = host_config("system-roots-device", handlers.path(), broker.clone());
    config.tls.ca_file = Some(pki.file("ca.pem"));
    config.tls.cert_file = Some(pki.file("client.pem"));
    config.tls.key_file = Some(pki.file("client.key"));
    let host = TestHost::start(config)
        .await
        .expect("the host comes online");
    // The test's CA stands in for the system's roots: no --ca-file is given.
    let (cert, key) = (
        pki.file("client.pem").display().to_string(),
        pki.file("client.key").display().to_string(),
    );
    let args = [
        "--cert-file",
        &cert,
        "--key-file",
        &key,
        "--json",
        "call",
        "system-roots-device",
        "echo",
        "7",
    ];
    let out = invoker_trusting(&broker, &pki.file("ca.pem"), &args).await;
    assert_answered_7(&out);
    host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_system_trust_store_is_one_clear_error_not_a_panic() {
    let pki = testkit::TestPki::generate("edge test CA").expect("pki");
    let mosquitto = Mosquitto::start_tls(&pki, false).expect("mosquitto with TLS");
    let broker = BrokerUrl {
        tls: true,
        ..mosquitto.url()
    };
    let nowhere = pki.file("no-such-trust-store.pem");
    let (cert, key) = (
        pki.file("client.pem").display().to_string(),
        pki.file("client.key").display().to_string(),
    );
    let with_cert = [
        "--cert-file",
        cert.as_str(),
        "--key-file",
        key.as_str(),
        "devices",
    ];
    for args in [&["devices"][..], &with_cert[..]] {
        let out = invoker_trusting(&broker, &nowhere, args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
        assert!(
            errors[0].contains("no CA certificate to trust")
                && errors[0].contains("no-such-trust-store.pem")
                && errors[0].contains("--ca-file"),
            "{args:?}: {stderr}"
        );
    }
}
