//! Only the right parties get in: TLS with a CA and certificates the test makes (mutual
//! TLS), a wrong CA refused with a clear error, and docs/mosquitto.acl keeping each
//! device to its own topics. Real Mosquitto, real hosts, edge-invoker's Caller.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use edge_invoker::{CallError, CallRequest, Caller, ConnectOptions};
use edge_proto::BrokerUrl;
use edge_proto::Namespace;
use edge_proto::transport::{Security, TlsFiles};
use testkit::{HandlerDir, Mosquitto, RawClient, TestHost, TestPki, host_config};

fn tls_files(pki: &TestPki, client_cert: bool) -> TlsFiles {
    TlsFiles {
        ca_file: Some(pki.file("ca.pem")),
        cert_file: client_cert.then(|| pki.file("client.pem")),
        key_file: client_cert.then(|| pki.file("client.key")),
    }
}

fn mqtts(broker: &Mosquitto) -> BrokerUrl {
    BrokerUrl {
        tls: true,
        ..broker.url()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_invoker_call_over_mutual_tls() {
    testkit::init_logging();
    let pki = TestPki::generate("edge test CA").expect("pki");
    let broker = Mosquitto::start_tls(&pki, true).expect("mosquitto with TLS");
    let handlers = HandlerDir::with(&["echo"]).expect("handlers");
    let mut config = host_config("tls-device", handlers.path(), mqtts(&broker));
    config.tls.ca_file = Some(pki.file("ca.pem"));
    config.tls.cert_file = Some(pki.file("client.pem"));
    config.tls.key_file = Some(pki.file("client.key"));
    let host = TestHost::start(config)
        .await
        .expect("the host comes online over TLS");
    let mut options = ConnectOptions::new(mqtts(&broker));
    options.security = Security {
        tls: tls_files(&pki, true),
        ..Security::default()
    };
    let caller = Caller::connect(options)
        .await
        .expect("the invoker connects over TLS");
    let request = CallRequest::new("tls-device", "echo", r#"{"over":"tls"}"#);
    let response = caller.call(&request).await.expect("answered over TLS");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.payload.to_value(),
        serde_json::json!({"over": "tls"})
    );
    host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_or_with_a_wrong_ca_is_refused_clearly() {
    testkit::init_logging();
    let pki = TestPki::generate("edge test CA").expect("pki");
    let other = TestPki::generate("some other CA").expect("pki");
    let broker = Mosquitto::start_tls(&pki, true).expect("mosquitto with TLS");

    let mut wrong_ca = ConnectOptions::new(mqtts(&broker));
    wrong_ca.security = Security {
        tls: tls_files(&other, true),
        ..Security::default()
    };
    let error = Caller::connect(wrong_ca)
        .await
        .err()
        .expect("a wrong CA is refused");
    assert!(matches!(error, CallError::Connect { .. }), "{error}");
    assert!(
        error.to_string().contains("UnknownIssuer"),
        "the error says why: {error}"
    );

    let mut no_cert = ConnectOptions::new(mqtts(&broker));
    no_cert.security = Security {
        tls: tls_files(&pki, false),
        ..Security::default()
    };
    assert!(
        Caller::connect(no_cert).await.is_err(),
        "mutual TLS wants a client certificate"
    );

    // The host says why in its log, and keeps trying (the broker may be fixed).
    let handlers = HandlerDir::with(&["echo"]).expect("handlers");
    let mut host = Command::new(env!("CARGO_BIN_EXE_edge-host"))
        .args([
            "--device-id",
            "wrong-ca-device",
            "--broker",
            &mqtts(&broker).to_string(),
        ])
        .arg("--handlers")
        .arg(handlers.path())
        .arg("--ca-file")
        .arg(other.file("ca.pem"))
        .args([
            "--cert-file",
            &other.file("client.pem").display().to_string(),
        ])
        .args([
            "--key-file",
            &other.file("client.key").display().to_string(),
        ])
        .arg("--no-cache")
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .expect("edge-host starts");
    let stderr = host.stderr.take().expect("piped");
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|line| line.contains("MQTT connection failed"))
    });
    let line = tokio::time::timeout(Duration::from_secs(20), line)
        .await
        .expect("the host logs the failure")
        .expect("reader")
        .expect("a failure line");
    host.kill().ok();
    host.wait().ok();
    assert!(line.contains("UnknownIssuer"), "{line}");
}

/// Writes a Mosquitto password file with `users` (name, password).
fn password_file(dir: &Path, users: &[(&str, &str)]) -> std::path::PathBuf {
    let path = dir.join("passwords");
    for (i, (user, password)) in users.iter().enumerate() {
        let mut command = Command::new("mosquitto_passwd");
        command.arg("-b");
        if i == 0 {
            command.arg("-c");
        }
        let status = command
            .arg(&path)
            .args([user, password])
            .status()
            .expect("mosquitto_passwd runs");
        assert!(status.success(), "mosquitto_passwd failed");
    }
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_documented_acl_a_device_cannot_read_or_answer_for_another() {
    testkit::init_logging();
    let secrets = tempfile::tempdir().expect("folder");
    let passwords = password_file(
        secrets.path(),
        &[("device-a", "pa"), ("device-b", "pb"), ("operator", "po")],
    );
    let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/mosquitto.acl");
    let broker = Mosquitto::start_listener(&format!(
        "allow_anonymous false\npassword_file {}\nacl_file {}\n",
        passwords.display(),
        acl.display()
    ))
    .expect("mosquitto with the ACL");

    let handlers = HandlerDir::with(&["misbehave"]).expect("handlers");
    let password = secrets.path().join("device-a.password");
    std::fs::write(&password, "pa\n").expect("password file");
    let mut config = host_config("device-a", handlers.path(), broker.url());
    config.username = Some("device-a".into());
    config.password_file = Some(password);
    let host = TestHost::start(config)
        .await
        .expect("device-a comes online under its own name");
    let operator = Security {
        username: Some("operator".into()),
        password: Some("po".into()),
        ..Security::default()
    };
    let a = Namespace::for_device("device-a").expect("valid");
    // device-b, logged in, tries to read device-a's requests and to answer in its name.
    let mut rogue = RawClient::connect_as(
        &broker.url(),
        &[a.request_filter()],
        Some(("device-b", "pb")),
    )
    .await
    .expect("device-b connects");
    let mut witness = RawClient::connect_as(
        &broker.url(),
        &[a.response_filter()],
        Some(("operator", "po")),
    )
    .await
    .expect("the operator connects");
    let mut options = ConnectOptions::new(broker.url());
    options.security = operator;
    let caller = Caller::connect(options)
        .await
        .expect("the operator's invoker connects");
    let request = CallRequest::new("device-a", "status", r#"{"status":200,"body":"from a"}"#);
    let response = caller
        .call(&request)
        .await
        .expect("the operator calls device-a");
    assert_eq!(response.payload.to_value(), serde_json::json!("from a"));

    rogue
        .publish(
            &a.response_topic(200, "forged"),
            br#""forged by b""#.as_slice(),
        )
        .await
        .expect("publish");
    rogue
        .publish(
            &a.request_topic("status", "b-calls-a"),
            br#"{"status":200}"#.as_slice(),
        )
        .await
        .expect("publish");
    // The operator's real answer reached the witness; nothing of device-b's did.
    let mut seen = Vec::new();
    while let Ok((topic, _)) = witness
        .next_where(Duration::from_millis(500), |_| true)
        .await
    {
        seen.push(topic);
    }
    assert_eq!(seen.len(), 1, "only the real answer: {seen:?}");
    assert!(
        !seen[0].contains("forged") && !seen[0].contains("b-calls-a"),
        "{seen:?}"
    );
    assert!(
        rogue
            .next_where(Duration::from_millis(300), |_| true)
            .await
            .is_err(),
        "device-b received device-a's request"
    );
    host.stop().await.expect("clean stop");
}
