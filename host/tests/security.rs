//! Only the right parties get in: TLS with a CA and certificates the test makes (mutual
//! TLS), a wrong CA refused with a clear error, docs/mosquitto.acl keeping each device
//! to its own topics, and docs/mosquitto.conf keeping devices from pushing each other
//! off and oversized messages from cutting anyone's connection. Real Mosquitto, real
//! hosts, edge-invoker's Caller and command line.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use edge_invoker::{CallError, CallRequest, Caller, Cli, ConnectOptions, Exit, Io};
use edge_proto::BrokerUrl;
use edge_proto::Namespace;
use edge_proto::transport::{Security, TlsFiles};
use testkit::{
    ChildGuard, Delivery, HandlerDir, Mosquitto, RawClient, RawOptions, TestHost, TestPki,
    free_port, host_config, presence_with, publish_once,
};

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
    let mut host = ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_edge-host"))
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
            .stderr(Stdio::piped()),
    )
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
    drop(host);
    assert!(line.contains("UnknownIssuer"), "{line}");
}

/// Writes a Mosquitto password file at `path` with `users` (name, password).
fn password_file(path: &Path, users: &[(&str, &str)]) -> PathBuf {
    let path = path.to_owned();
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
        &secrets.path().join("passwords"),
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

/// Mosquitto configured by docs/mosquitto.conf as documented, with the test's own
/// ports, certificates and password files in place of the paths the file names.
struct DocumentedBroker {
    _mosquitto: Mosquitto,
    pki: TestPki,
    secrets: tempfile::TempDir,
    /// The devices' listener (TLS).
    devices: BrokerUrl,
    /// The callers' listener (TLS).
    callers: BrokerUrl,
}

impl DocumentedBroker {
    /// Devices device-a, device-b and device-c; caller operator. Each password is `p`
    /// and the account's last letter.
    fn start() -> Self {
        let pki = TestPki::generate("edge test CA").expect("pki");
        let secrets = tempfile::tempdir().expect("folder");
        let devices_passwd = password_file(
            &secrets.path().join("edge-devices.passwd"),
            &[("device-a", "pa"), ("device-b", "pb"), ("device-c", "pc")],
        );
        let callers_passwd = password_file(
            &secrets.path().join("edge-callers.passwd"),
            &[("operator", "po")],
        );
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
        let mut config =
            std::fs::read_to_string(docs.join("mosquitto.conf")).expect("docs/mosquitto.conf");
        let devices_port = free_port().expect("port");
        let callers_port = loop {
            let port = free_port().expect("port");
            if port != devices_port {
                break port;
            }
        };
        for (documented, here) in [
            (
                "listener 8883",
                format!("listener {devices_port} 127.0.0.1"),
            ),
            (
                "listener 8884",
                format!("listener {callers_port} 127.0.0.1"),
            ),
            (
                "/etc/mosquitto/certs/server.pem",
                pki.file("server.pem").display().to_string(),
            ),
            (
                "/etc/mosquitto/certs/server.key",
                pki.file("server.key").display().to_string(),
            ),
            (
                "/etc/mosquitto/edge-devices.passwd",
                devices_passwd.display().to_string(),
            ),
            (
                "/etc/mosquitto/edge-callers.passwd",
                callers_passwd.display().to_string(),
            ),
            (
                "/etc/mosquitto/edge-methods.acl",
                docs.join("mosquitto.acl").display().to_string(),
            ),
        ] {
            assert!(
                config.contains(documented),
                "docs/mosquitto.conf no longer says {documented:?}: update this test"
            );
            config = config.replace(documented, &here);
        }
        let mosquitto = Mosquitto::start_config(&[devices_port, callers_port], &config)
            .expect("mosquitto with the documented config");
        let tls = |port| BrokerUrl {
            tls: true,
            ..BrokerUrl::tcp("127.0.0.1", port)
        };
        Self {
            _mosquitto: mosquitto,
            pki,
            secrets,
            devices: tls(devices_port),
            callers: tls(callers_port),
        }
    }

    /// TLS trusting the test's CA, logged in as `user`.
    fn login(&self, user: &str, password: &str) -> Security {
        Security {
            tls: TlsFiles {
                ca_file: Some(self.pki.file("ca.pem")),
                ..TlsFiles::default()
            },
            username: Some(user.to_owned()),
            password: Some(password.to_owned()),
        }
    }

    /// A raw client on `broker` asking for `client_id`, logged in as `user`.
    fn as_client(&self, client_id: &str, user: &str, password: &str) -> RawOptions {
        RawOptions {
            client_id: Some(client_id.to_owned()),
            security: self.login(user, password),
        }
    }

    /// A file holding `password`, for the binaries' `--password-file`.
    fn password_file(&self, user: &str, password: &str) -> PathBuf {
        let path = self.secrets.path().join(format!("{user}.password"));
        std::fs::write(&path, format!("{password}\n")).expect("password file");
        path
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_documented_config_no_device_account_can_push_another_device_off() {
    testkit::init_logging();
    let broker = DocumentedBroker::start();
    let own = "devices/device-a/$edge/still-here".to_owned();
    let mut device_a = RawClient::connect_with(
        &broker.devices,
        std::slice::from_ref(&own),
        &broker.as_client("device-a", "device-a", "pa"),
    )
    .await
    .expect("device-a connects");
    // device-b logs in asking for device-a's client id. Without the documented config
    // the broker would close device-a's connection to make room for it.
    let _rogue = RawClient::connect_with(
        &broker.devices,
        &[],
        &broker.as_client("device-a", "device-b", "pb"),
    )
    .await
    .expect("device-b connects, under its own name");
    // device-a's first connection still stands: its own message comes back on it.
    device_a
        .publish(&own, b"still here".as_slice())
        .await
        .expect("publish");
    let back = device_a
        .next_where(Duration::from_secs(10), |t| t == own)
        .await;
    assert!(
        back.is_ok() && device_a.connections() == 1,
        "device-a was pushed off ({} connections, its message {})",
        device_a.connections(),
        if back.is_ok() {
            "came back"
        } else {
            "was lost"
        }
    );
    // Device accounts do not exist on the callers' listener, where ids are free.
    let elsewhere = RawClient::connect_with(
        &broker.callers,
        &[],
        &broker.as_client("device-a", "device-b", "pb"),
    )
    .await;
    assert!(
        elsewhere.is_err(),
        "a device account logs in on the callers' listener"
    );
}

/// Runs edge-invoker's command line in this process, as `operator` through the
/// callers' listener; returns its exit and what it printed on stdout and stderr. A
/// command that does not end within 60 s (an invoker whose connection keeps
/// dropping) is a failure too.
async fn invoker(broker: &DocumentedBroker, args: &[&str]) -> Result<(Exit, String), String> {
    let password = broker.password_file("operator", "po");
    let ca = broker.pki.file("ca.pem");
    let mut argv = vec![
        "edge-invoker".to_owned(),
        "--broker".to_owned(),
        broker.callers.to_string(),
        "--ca-file".to_owned(),
        ca.display().to_string(),
        "--username".to_owned(),
        "operator".to_owned(),
        "--password-file".to_owned(),
        password.display().to_string(),
        "--response-timeout".to_owned(),
        "10".to_owned(),
    ];
    let Some((command, rest)) = args.split_first() else {
        return Err("no command".into());
    };
    // --response-timeout belongs to call; the other options go anywhere.
    if *command != "call" {
        argv.truncate(argv.len() - 2);
    }
    argv.insert(1, (*command).to_owned());
    argv.extend(rest.iter().map(|a| (*a).to_owned()));
    let cli = <Cli as clap::Parser>::try_parse_from(&argv).map_err(|e| e.to_string())?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let io = Io {
        stdin: &mut std::io::empty(),
        stdout: &mut stdout,
        stderr: &mut stderr,
        stdout_is_terminal: false,
        stderr_is_terminal: false,
        color_stdout: false,
        color_stderr: false,
    };
    let exit = tokio::time::timeout(Duration::from_secs(60), edge_invoker::run_with(cli, io))
        .await
        .map_err(|_| format!("{args:?} did not end within 60 s"))?;
    Ok((
        exit,
        format!(
            "{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_documented_config_an_oversized_message_cuts_neither_host_nor_invoker() {
    testkit::init_logging();
    let broker = DocumentedBroker::start();
    let handlers = HandlerDir::with(&["echo"]).expect("handlers");
    let log_path = broker.secrets.path().join("host.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    // device-a: the real edge-host binary on the devices' listener, its log kept.
    let mut host = ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_edge-host"))
            .args([
                "--device-id",
                "device-a",
                "--username",
                "device-a",
                "--no-cache",
            ])
            .args(["--broker", &broker.devices.to_string()])
            .arg("--handlers")
            .arg(handlers.path())
            .arg("--ca-file")
            .arg(broker.pki.file("ca.pem"))
            .arg("--password-file")
            .arg(broker.password_file("device-a", "pa"))
            .env("RUST_LOG", "warn")
            .env_remove("EDGE_PASSWORD")
            .stdin(Stdio::null())
            .stderr(log),
    )
    .expect("edge-host starts");
    let operator = broker.login("operator", "po");
    presence_with(
        &broker.callers,
        &operator,
        "device-a",
        true,
        Duration::from_secs(30),
    )
    .await
    .expect("device-a comes online");

    let mut problems = Vec::new();
    let big = vec![b'x'; 3 << 19]; // 1.5 MiB
    // A caller sends device-a a request of 1.5 MiB: the host would drop its connection
    // on it, and lose the calls queued behind it.
    let request = Namespace::for_device("device-a")
        .expect("valid")
        .request_topic("echo", "big");
    let delivery = publish_once(&broker.callers, &operator, &request, big.clone(), false)
        .await
        .expect("the caller connects");
    if !matches!(delivery, Delivery::Disconnected(_)) {
        problems.push(format!(
            "the broker took a 1.5 MiB request for device-a: {delivery:?}"
        ));
    }
    // device-b retains a presence of 1.5 MiB: every invoker listing devices would read
    // it and drop its connection, again on each reconnection.
    let presence = Namespace::for_device("device-b")
        .expect("valid")
        .presence_topic();
    let delivery = publish_once(
        &broker.devices,
        &broker.login("device-b", "pb"),
        &presence,
        big,
        true,
    )
    .await
    .expect("device-b connects");
    if !matches!(delivery, Delivery::Disconnected(_)) {
        problems.push(format!(
            "the broker took a 1.5 MiB retained presence from device-b: {delivery:?}"
        ));
    }

    // The invoker lists the devices and calls device-a as if nothing happened.
    match invoker(&broker, &["devices"]).await {
        Ok((Exit::Success, out)) if out.contains("device-a") && !out.contains("device-b") => {}
        other => problems.push(format!("devices: {other:?}")),
    }
    match invoker(&broker, &["call", "device-a", "echo", r#"{"after":"big"}"#]).await {
        Ok((Exit::Success, out)) if out.contains("Response status : 200") => {}
        other => problems.push(format!("call: {other:?}")),
    }
    // The host never lost its connection.
    host.signal(testkit::Signal::TERM).expect("SIGTERM is sent");
    let status = host.wait().expect("the host ends");
    let log = std::fs::read_to_string(&log_path).expect("the host's log");
    if !status.success() || log.contains("MQTT connection failed") {
        problems.push(format!("the host ({status}) logged:\n{log}"));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
