//! Every edge-invoker command as operators run it: the real binary against a real
//! Mosquitto with several real hosts, some online, one offline, one whose handler
//! fails; the outputs for people and with `--json`, and the exit codes.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use edge_proto::BrokerUrl;
use serde_json::{Value, json};
use tempfile::TempDir;
use testkit::{HandlerDir, Mosquitto, RawClient, TestHost, eventually, free_port, host_config};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A payload of 120 KiB, which faulty's `getInfo` has no memory to take.
fn heavy() -> String {
    format!("{{\"pad\":\"{}\"}}", "x".repeat(120 * 1024))
}

/// What the hosts' presence names as their agent.
const AGENT: &str = concat!("edge-host ", env!("CARGO_PKG_VERSION"));

/// One run of the binary.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Starts `edge-invoker ARGS...` with `env` set, its streams piped, in an environment
/// cleared of the variables that would change what it does; killed if dropped first.
fn spawn_invoker(args: &[&str], env: &[(&str, &str)]) -> tokio::process::Child {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_edge-invoker"));
    for var in [
        "EDGE_BROKER",
        "EDGE_NAMESPACE",
        "EDGE_INVOKER_CONFIG",
        "NO_COLOR",
        "CLICOLOR",
        "CLICOLOR_FORCE",
        "RUST_LOG",
    ] {
        command.env_remove(var);
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("edge-invoker starts")
}

/// What a run of the binary left, once it ended.
async fn finished(child: tokio::process::Child) -> Run {
    let out = child.wait_with_output().await.expect("edge-invoker runs");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("UTF-8 output");
    Run {
        code: out.status.code().expect("an exit code, not a signal"),
        stdout: text(out.stdout),
        stderr: text(out.stderr),
    }
}

/// Runs `edge-invoker ARGS...` with `env` set and `stdin` on its standard input, in
/// an environment cleared of the variables that would change what it does.
async fn invoker_with(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Run {
    let mut child = spawn_invoker(args, env);
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).await.expect("stdin written");
    drop(input);
    finished(child).await
}

/// Runs `edge-invoker --broker URL ARGS...`.
async fn invoker(broker: &BrokerUrl, args: &[&str]) -> Run {
    let url = broker.to_string();
    let mut all = vec!["--broker", url.as_str()];
    all.extend_from_slice(args);
    invoker_with(&all, &[], b"").await
}

/// The JSON lines of a run's stdout.
fn json_lines(run: &Run) -> Vec<Value> {
    run.stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\n{run:?}"))
        })
        .collect()
}

/// `text` with every RFC 3339 time (`2026-11-26T12:30:36Z`) replaced by a placeholder
/// of the same width, so that tables keep their layout.
fn mask_times(text: &str) -> String {
    const SHAPE: &[u8; 20] = b"0000-00-00T00:00:00Z";
    let bytes = text.as_bytes();
    let mut out = String::new();
    let mut at = 0;
    while at < bytes.len() {
        let window = bytes.get(at..at + SHAPE.len());
        let is_time = window.is_some_and(|w| {
            w.iter().zip(SHAPE).all(|(b, s)| {
                if *s == b'0' {
                    b.is_ascii_digit()
                } else {
                    b == s
                }
            })
        });
        if is_time {
            out.push_str("YYYY-MM-DDThh:mm:ssZ");
            at += SHAPE.len();
        } else {
            let c = text[at..].chars().next().expect("in bounds");
            out.push(c);
            at += c.len_utf8();
        }
    }
    out
}

/// The cells of a table line: text separated by two spaces or more.
fn cells(line: &str) -> Vec<&str> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

/// A Mosquitto and the hosts on it, sharing one compiled-code cache so that only the
/// first host compiles each handler.
struct Site {
    mosquitto: Mosquitto,
    cache: TempDir,
    /// `echo` and `device-info`, served by the pumps.
    pumps: HandlerDir,
}

impl Site {
    fn new() -> Self {
        testkit::init_logging();
        Self {
            mosquitto: Mosquitto::start().expect("mosquitto starts"),
            cache: tempfile::tempdir().expect("cache folder"),
            pumps: HandlerDir::with(&["echo", "device-info"]).expect("handlers"),
        }
    }

    fn broker(&self) -> BrokerUrl {
        self.mosquitto.url()
    }

    /// Starts `device` serving the handlers in `handlers`, and waits until it is online.
    async fn host(&self, device: &str, handlers: &Path) -> TestHost {
        let mut config = host_config(device, handlers, self.broker());
        config.cache = true;
        config.cache_dir = Some(self.cache.path().to_owned());
        TestHost::start(config).await.expect("host starts")
    }

    /// Starts `device` serving the pumps' handlers.
    async fn pump(&self, device: &str) -> TestHost {
        self.host(device, self.pumps.path()).await
    }
}

/// Why the broker says `device` is offline after its host stopped: a clean stop
/// publishes `shutdown` (with the time it happened) and waits until the broker has it.
async fn offline_reason(broker: &BrokerUrl, device: &str) -> String {
    let topic = format!("devices/{device}/$edge/presence");
    let mut reader = RawClient::connect(broker, std::slice::from_ref(&topic))
        .await
        .expect("reader");
    let (_, payload) = reader
        .next_where(Duration::from_secs(10), |_| true)
        .await
        .expect("a retained presence");
    let presence: Value = serde_json::from_slice(&payload).expect("presence JSON");
    assert_eq!(presence["online"], json!(false), "{presence}");
    assert_eq!(presence["reason"], json!("shutdown"), "{presence}");
    presence["reason"].as_str().expect("a reason").to_owned()
}

/// Makes the broker retain a presence saying `device` is online, with nothing behind
/// it: no catalog, no answers. Returns once the broker has it (its echo came back).
async fn online_without_host(broker: &BrokerUrl, device: &str) -> RawClient {
    let topic = format!("devices/{device}/$edge/presence");
    let mut client = RawClient::connect(broker, std::slice::from_ref(&topic))
        .await
        .expect("client");
    client
        .publish_retained(&topic, br#"{"online":true}"#.as_slice())
        .await
        .expect("presence");
    client
        .next_where(Duration::from_secs(10), |t| t == topic)
        .await
        .expect("the broker holds the presence");
    client
}

/// The fleet most tests run against.
struct Fleet {
    site: Site,
    /// pump-1 and pump-2 (echo, getInfo, reboot), and faulty.
    hosts: Vec<TestHost>,
    /// faulty's handlers: misbehave, a device-info short of memory, and a file that
    /// is not a component.
    _faulty: HandlerDir,
    /// The reason pump-3's retained presence gives for being offline.
    offline_reason: String,
}

impl Fleet {
    /// pump-1 and pump-2 online; pump-3 offline (it stopped cleanly); faulty online,
    /// serving misbehave (whose `panic` answers 500) and device-info with its memory
    /// capped at the 17 pages it starts with, so that its `getInfo` fails with 500
    /// (handlerFailed, memory exhausted) for a payload of [`heavy`] size while the
    /// pumps' answer it; and `broken.wasm`, which fails to load.
    async fn start() -> Self {
        let site = Site::new();
        let mut hosts = vec![site.pump("pump-1").await, site.pump("pump-2").await];
        site.pump("pump-3")
            .await
            .stop()
            .await
            .expect("pump-3 stops cleanly");
        let offline_reason = offline_reason(&site.broker(), "pump-3").await;
        let faulty = HandlerDir::with(&["misbehave", "device-info"]).expect("handlers");
        std::fs::write(
            faulty.path().join("device-info.toml"),
            format!("max_memory = {}\n", 17 * 65536),
        )
        .expect("sidecar");
        std::fs::write(faulty.path().join("broken.wasm"), "not a component").expect("broken");
        hosts.push(site.host("faulty", faulty.path()).await);
        Self {
            site,
            hosts,
            _faulty: faulty,
            offline_reason,
        }
    }

    fn broker(&self) -> BrokerUrl {
        self.site.broker()
    }

    async fn stop(self) {
        for host in self.hosts {
            host.stop().await.expect("clean stop");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_answers_for_online_offline_and_failing_devices() {
    let fleet = Fleet::start().await;
    let broker = fleet.broker();

    let run = invoker(&broker, &["call", "pump-1", "echo", r#"{"n":1}"#]).await;
    assert_eq!(
        (run.code, run.stdout.as_str(), run.stderr.as_str()),
        (
            0,
            "Response status : 200\nResponse payload: {\"n\":1}\n",
            "Invoking method 'echo' on device 'pump-1' with payload: {\"n\":1}\n"
        )
    );
    let run = invoker(&broker, &["--json", "call", "pump-1", "echo", r#"{"n":1}"#]).await;
    assert_eq!(
        (run.code, run.stdout.as_str(), run.stderr.as_str()),
        (0, "{\"status\":200,\"payload\":{\"n\":1}}\n", "")
    );

    let run = invoker(&broker, &["call", "pump-3", "echo"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str(), run.stderr.as_str()),
        (
            3,
            "",
            "Invoking method 'echo' on device 'pump-3' with payload: null\n\
             error: device 'pump-3' is not online (404103 DeviceNotOnline)\n"
        )
    );
    let run = invoker(&broker, &["--json", "call", "pump-3", "echo"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (
            3,
            "{\"errorCode\":404103,\"message\":\"device 'pump-3' is not online\"}\n"
        )
    );

    let run = invoker(&broker, &["call", "faulty", "panic", "{}"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.starts_with(
            "Response status : 500\nResponse payload: {\"error\":{\"code\":\"handlerFailed\","
        ),
        "{run:?}"
    );
    let run = invoker(&broker, &["--json", "call", "faulty", "panic", "{}"]).await;
    let answer: Value = serde_json::from_str(&run.stdout).expect("one JSON object");
    assert_eq!(
        (
            run.code,
            &answer["status"],
            &answer["payload"]["error"]["code"]
        ),
        (1, &json!(500), &json!("handlerFailed")),
        "{run:?}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_reads_its_payload_from_a_file_or_stdin() {
    let site = Site::new();
    let host = site.pump("pump-1").await;
    let url = site.broker().to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("payload.json");
    std::fs::write(
        &file,
        "{\n  \"big\": 12345678901234567890,\n  \"s\": \"a b\"\n}\n",
    )
    .expect("payload file");
    let at_file = format!("@{}", file.display());

    let run = invoker_with(
        &["--broker", &url, "call", "pump-1", "echo", &at_file],
        &[],
        b"",
    )
    .await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (
            0,
            "Response status : 200\nResponse payload: {\"big\":12345678901234567890,\"s\":\"a b\"}\n"
        ),
        "{run:?}"
    );
    let run = invoker_with(
        &["--broker", &url, "--json", "call", "pump-1", "echo", "-"],
        &[],
        b"[1, 2, 3]\n",
    )
    .await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "{\"status\":200,\"payload\":[1,2,3]}\n"),
        "{run:?}"
    );
    host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_lists_every_known_device_online_or_not() {
    let fleet = Fleet::start().await;
    let broker = fleet.broker();

    let run = invoker(&broker, &["devices"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{run:?}");
    let offline = format!("offline ({})", fleet.offline_reason);
    let w = offline.len();
    assert_eq!(
        mask_times(&run.stdout),
        format!(
            "DEVICE  {:w$}  SINCE                 {:<21}  AGENT\n\
             faulty  {:w$}  YYYY-MM-DDThh:mm:ssZ  12 (1 failed to load)  {AGENT}\n\
             pump-1  {:w$}  YYYY-MM-DDThh:mm:ssZ  {:<21}  {AGENT}\n\
             pump-2  {:w$}  YYYY-MM-DDThh:mm:ssZ  {:<21}  {AGENT}\n\
             pump-3  {offline}  YYYY-MM-DDThh:mm:ssZ  {:<21}  {AGENT}\n",
            "STATE", "METHODS", "online", "online", 3, "online", 3, 3
        )
    );

    let run = invoker(&broker, &["devices", "pump-?"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let listed: Vec<&str> = run.stdout.lines().skip(1).map(|l| cells(l)[0]).collect();
    assert_eq!(listed, ["pump-1", "pump-2", "pump-3"]);

    let run = invoker(&broker, &["--json", "devices", "*"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{run:?}");
    let mut lines = json_lines(&run);
    for line in &mut lines {
        let since = line["since"].take();
        assert_eq!(
            since.as_str().map(mask_times).as_deref(),
            Some("YYYY-MM-DDThh:mm:ssZ"),
            "{line}"
        );
    }
    assert_eq!(
        lines,
        [
            json!({"deviceId": "faulty", "online": true, "since": null, "reason": null,
                   "agent": AGENT, "methods": 12, "failedHandlers": 1}),
            json!({"deviceId": "pump-1", "online": true, "since": null, "reason": null,
                   "agent": AGENT, "methods": 3, "failedHandlers": 0}),
            json!({"deviceId": "pump-2", "online": true, "since": null, "reason": null,
                   "agent": AGENT, "methods": 3, "failedHandlers": 0}),
            json!({"deviceId": "pump-3", "online": false, "since": null,
                   "reason": fleet.offline_reason, "agent": AGENT, "methods": 3,
                   "failedHandlers": 0}),
        ]
    );

    // Nothing matching is not an error; the note goes to stderr, stdout stays empty.
    let run = invoker(&broker, &["devices", "valve-*"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str(), run.stderr.as_str()),
        (0, "", "No device matches 'valve-*' (4 devices known).\n")
    );
    let run = invoker(&broker, &["--json", "devices", "valve-*"]).await;
    assert_eq!((run.code, run.stdout.as_str()), (0, ""));

    // A broker that holds no presence at all.
    let empty = Mosquitto::start().expect("mosquitto starts");
    let run = invoker(&empty.url(), &["devices"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str(), run.stderr.as_str()),
        (
            0,
            "",
            "The broker holds no device's presence under devices/+/.\n"
        )
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_follows_the_namespace() {
    let site = Site::new();
    let mut config = host_config("pump-9", site.pumps.path(), site.broker());
    config.namespace = "plant-7/{device-id}/".into();
    config.cache = true;
    config.cache_dir = Some(site.cache.path().to_owned());
    // TestHost waits for the presence under the default namespace; this host uses
    // another, so wait for it by listing.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let host = tokio::spawn(edge_host::run(config, async {
        stopped.await.ok();
    }));
    let broker = site.broker();
    let run = eventually("pump-9 is listed", Duration::from_secs(30), || async {
        let run = invoker(&broker, &["--namespace", "plant-7/{device-id}/", "devices"]).await;
        run.stdout.contains("pump-9").then_some(run)
    })
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout
            .lines()
            .skip(1)
            .map(|l| cells(l)[0])
            .collect::<Vec<_>>(),
        ["pump-9"]
    );
    // Under the default namespace there is nobody.
    let run = invoker(&broker, &["devices"]).await;
    assert_eq!((run.code, run.stdout.as_str()), (0, ""), "{run:?}");
    stop.send(()).ok();
    host.await.expect("host task").expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_shows_the_retained_catalog_and_calls_nothing() {
    let fleet = Fleet::start().await;
    let broker = fleet.broker();
    // Every request to any device would arrive here, before the marker published after
    // the command has ended.
    let mut watcher = RawClient::connect(
        &broker,
        &[
            "devices/+/$iothub/methods/POST/#".to_owned(),
            "test/marker".to_owned(),
        ],
    )
    .await
    .expect("watcher");

    let catalog = testkit::catalog(&broker, "pump-1")
        .await
        .expect("pump-1's catalog");
    let names: Vec<&str> = catalog.methods.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["echo", "getInfo", "reboot"]);

    let run = invoker(&broker, &["methods", "pump-1"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{run:?}");
    let mut lines = run.stdout.lines();
    assert_eq!(
        mask_times(lines.next().expect("state line")),
        format!("pump-1: online since YYYY-MM-DDThh:mm:ssZ, {AGENT}")
    );
    assert_eq!(
        cells(lines.next().expect("header")),
        ["METHOD", "HANDLER", "DIGEST", "DESCRIPTION"]
    );
    for method in &catalog.methods {
        let short = &method.digest[..method.digest.find(':').expect("algorithm") + 13];
        assert_eq!(
            cells(lines.next().expect("a row per method")),
            [
                method.name.as_str(),
                method.handler.as_str(),
                short,
                method.description.as_str()
            ]
        );
    }
    assert_eq!(lines.next(), None, "{}", run.stdout);

    let run = invoker(&broker, &["--json", "methods", "pump-1"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let mut shown: Value = serde_json::from_str(&run.stdout).expect("one JSON object");
    assert!(shown["presence"]["since"].take().is_string(), "{shown}");
    assert_eq!(
        shown,
        json!({
            "deviceId": "pump-1",
            "presence": {"online": true, "since": null, "agent": AGENT},
            "methods": serde_json::to_value(&catalog.methods).expect("serializes"),
            "failures": [],
        })
    );

    // An offline device's catalog is still there, and shown with its state.
    let run = invoker(&broker, &["methods", "pump-3"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout.lines().next(),
        Some(
            format!(
                "pump-3: offline ({}), {AGENT}; its catalog as last published",
                fleet.offline_reason
            )
            .as_str()
        )
    );
    assert_eq!(run.stdout.lines().count(), 5, "{}", run.stdout);

    // A handler file that failed to load is listed after the methods.
    let run = invoker(&broker, &["methods", "faulty"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines[14], "Handler files that failed to load:",
        "{}",
        run.stdout
    );
    assert!(
        lines[15].starts_with("  broken.wasm: not a valid component"),
        "{}",
        run.stdout
    );
    // The error's own lines stay under it.
    assert!(
        lines[16..].iter().all(|l| l.starts_with("    ")),
        "{}",
        run.stdout
    );
    let run = invoker(&broker, &["--json", "methods", "faulty"]).await;
    let shown: Value = serde_json::from_str(&run.stdout).expect("one JSON object");
    assert_eq!(
        shown["failures"][0]["handler"],
        json!("broken.wasm"),
        "{shown}"
    );
    assert_eq!(shown["methods"].as_array().map(Vec::len), Some(12));

    // An unknown device: exit 6 (no such device), one line, nothing on stdout.
    for args in [&["methods", "nobody"][..], &["--json", "methods", "nobody"]] {
        let run = invoker(&broker, args).await;
        assert_eq!(
            (run.code, run.stdout.as_str(), run.stderr.as_str()),
            (
                6,
                "",
                "error: no such device: the broker holds neither a presence nor a method \
                 catalog for device 'nobody'\n"
            )
        );
    }

    // A device the broker knows that publishes no catalog: exit 8, not "no such device".
    let _bare = online_without_host(&broker, "bare").await;
    let run = invoker(&broker, &["methods", "bare"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str(), run.stderr.as_str()),
        (
            8,
            "",
            "error: device 'bare' is online but the broker holds no method catalog for it\n"
        )
    );

    // No request reached any device.
    let marker = RawClient::connect(&broker, &[]).await.expect("client");
    marker.publish("test/marker", "end").await.expect("marker");
    let (topic, _) = watcher
        .next_where(Duration::from_secs(10), |_| true)
        .await
        .expect("the marker arrives");
    assert_eq!(topic, "test/marker", "a request was sent to a device");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reports_each_device_once_with_totals() {
    let fleet = Fleet::start().await;
    let broker = fleet.broker();
    // A device that says it is online and never answers.
    let _mute = online_without_host(&broker, "mute").await;

    let heavy = heavy();
    let args = [
        "broadcast",
        "getInfo",
        heavy.as_str(),
        "--devices",
        "*",
        "--response-timeout",
        "5",
    ];
    let run = invoker(&broker, &args).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.stderr,
        format!(
            "Invoking method 'getInfo' on 5 devices with payload: {{\"pad\":\"{}… \
             (122890 bytes)\n",
            "x".repeat(72)
        )
    );
    let lines: Vec<&str> = run.stdout.lines().collect();
    let rows: Vec<Vec<&str>> = lines.iter().map(|l| cells(l)).collect();
    assert_eq!(rows[0], ["DEVICE", "STATUS", "TIME", "RESULT"]);
    let row = |at: usize| (rows[at][0], rows[at][1], rows[at][3]);
    assert_eq!(
        row(1),
        (
            "faulty",
            "500",
            r#"{"error":{"code":"handlerFailed","message":"the handler exhausted its memory (limit 1 MiB)"}}"#
        )
    );
    assert_eq!(
        row(2),
        ("mute", "504101", "no answer within 5s (GatewayTimeout)")
    );
    for (at, device) in [(3, "pump-1"), (4, "pump-2")] {
        assert_eq!(
            (rows[at][0], rows[at][1]),
            (device, "200"),
            "{}",
            run.stdout
        );
        let info: Value = serde_json::from_str(rows[at][3]).expect("the answer, as JSON");
        assert_eq!(info["deviceId"], json!(device), "{info}");
    }
    assert_eq!(row(5), ("pump-3", "404103", "not online (DeviceNotOnline)"));
    for row in &rows[1..6] {
        let time = row[2];
        assert!(
            time.ends_with(" ms") || time.ends_with(" s"),
            "a time: {time}"
        );
    }
    assert_eq!(
        &lines[6..],
        [
            "",
            "5 devices: 2 succeeded, 1 failed, 1 not online, 1 timed out"
        ]
    );

    let mut json_args = vec!["--json"];
    json_args.extend_from_slice(&args);
    let run = invoker(&broker, &json_args).await;
    assert_eq!((run.code, run.stderr.as_str()), (1, ""), "{run:?}");
    let mut results = json_lines(&run);
    results.sort_by_key(|r| r["deviceId"].as_str().map(str::to_owned));
    for result in &mut results {
        assert!(result["elapsedMs"].take().is_u64(), "{result}");
        // getInfo's answer holds a time and a request id; keep what is fixed.
        if let Some(answer) = result
            .get_mut("payload")
            .filter(|a| a.get("requestId").is_some())
        {
            *answer = json!({"deviceId": answer["deviceId"].take()});
        }
    }
    assert_eq!(
        results,
        [
            json!({"deviceId": "faulty", "status": 500, "elapsedMs": null, "payload":
                   {"error": {"code": "handlerFailed",
                              "message": "the handler exhausted its memory (limit 1 MiB)"}}}),
            json!({"deviceId": "mute", "errorCode": 504101, "elapsedMs": null,
                   "message": "device 'mute' did not answer method 'getInfo' within 5s"}),
            json!({"deviceId": "pump-1", "status": 200, "elapsedMs": null,
                   "payload": {"deviceId": "pump-1"}}),
            json!({"deviceId": "pump-2", "status": 200, "elapsedMs": null,
                   "payload": {"deviceId": "pump-2"}}),
            json!({"deviceId": "pump-3", "errorCode": 404103, "elapsedMs": null,
                   "message": "device 'pump-3' is not online"}),
        ]
    );

    // Every device answering 2xx is exit 0; devices named outright and by a file.
    let dir = tempfile::tempdir().expect("temp dir");
    let list = dir.path().join("devices.txt");
    std::fs::write(&list, "# the pumps that are up\npump-2\n").expect("devices file");
    let list = list.to_str().expect("UTF-8 path");
    let run = invoker(
        &broker,
        &[
            "broadcast",
            "echo",
            "{}",
            "--devices",
            "pump-1",
            "--devices-file",
            list,
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let rows: Vec<Vec<&str>> = run.stdout.lines().map(cells).collect();
    assert_eq!(
        rows.iter()
            .skip(1)
            .take(2)
            .map(|r| (r[0], r[1]))
            .collect::<Vec<_>>(),
        [("pump-1", "200"), ("pump-2", "200")]
    );
    assert_eq!(
        run.stdout.lines().last(),
        Some("2 devices: 2 succeeded, 0 failed, 0 not online, 0 timed out")
    );

    // A pattern that matches nothing calls nothing: exit 6, no such device.
    let run = invoker(&broker, &["broadcast", "echo", "--devices", "valve-*"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str(), run.stderr.as_str()),
        (
            6,
            "",
            "error: no device to call: none of the 5 devices the broker knows matches 'valve-*'\n"
        )
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_does_not_wait_for_offline_devices_unless_told_to() {
    let site = Site::new();
    let broker = site.broker();
    site.pump("pump-3")
        .await
        .stop()
        .await
        .expect("pump-3 stops cleanly");

    // At once, not after the 300 s response timeout.
    let started = Instant::now();
    let run = invoker(
        &broker,
        &[
            "--json",
            "broadcast",
            "echo",
            "--devices",
            "pump-*",
            "--response-timeout",
            "300",
        ],
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        json_lines(&run)
            .iter()
            .map(|r| (r["deviceId"].clone(), r["errorCode"].clone()))
            .collect::<Vec<_>>(),
        [(json!("pump-3"), json!(404103))]
    );

    // With a connect timeout, the job waits for the device to come online. The device
    // starts only once the job's log says it waits for it, so the job cannot have
    // found it online.
    let url = broker.to_string();
    let mut job = spawn_invoker(
        &[
            "--json",
            "--broker",
            &url,
            "broadcast",
            "echo",
            "7",
            "--devices",
            "pump-*",
            "--connect-timeout",
            "60",
        ],
        &[("RUST_LOG", "edge_invoker=debug")],
    );
    drop(job.stdin.take());
    let mut log = BufReader::new(job.stderr.take().expect("stderr")).lines();
    let waiting = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = log.next_line().await.expect("stderr") {
            if line.contains("offline; waiting for it to come online") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(waiting, Ok(true), "the job waits for pump-3");
    let waiting_since = Instant::now();
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    let host = site.pump("pump-3").await;
    let host_took = waiting_since.elapsed();
    let run = finished(job).await;
    drain.await.expect("stderr drained");
    assert_eq!(run.code, 0, "{run:?}");
    let mut results = json_lines(&run);
    let elapsed = results[0]
        .as_object_mut()
        .and_then(|result| result.remove("elapsedMs"))
        .and_then(|ms| ms.as_u64())
        .map(Duration::from_millis)
        .expect("an elapsed time");
    assert_eq!(
        results,
        [json!({"deviceId": "pump-3", "status": 200, "payload": 7})]
    );
    // The call's time includes the wait: at least the time the host took to start
    // (less the moment between the job and the test seeing its presence).
    assert!(
        elapsed + Duration::from_millis(250) >= host_took,
        "{elapsed:?} for a call that waited {host_took:?}"
    );
    host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_to_two_dozen_hosts_reports_every_device_exactly_once() {
    let site = Site::new();
    let broker = site.broker();
    let mut hosts = Vec::new();
    for n in 1..=24 {
        hosts.push(site.pump(&format!("unit-{n:02}")).await);
    }
    // Two more that went offline.
    for n in 25..=26 {
        site.pump(&format!("unit-{n:02}"))
            .await
            .stop()
            .await
            .expect("clean stop");
    }
    let expected: Vec<String> = (1..=26).map(|n| format!("unit-{n:02}")).collect();

    let run = invoker(
        &broker,
        &[
            "broadcast",
            "echo",
            r#"{"hello":"units"}"#,
            "--devices",
            "unit-*",
            "--concurrency",
            "5",
        ],
    )
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 1 + 26 + 2, "{}", run.stdout);
    let rows: Vec<Vec<&str>> = lines[1..27].iter().map(|l| cells(l)).collect();
    assert_eq!(
        rows.iter().map(|r| r[0].to_owned()).collect::<Vec<_>>(),
        expected,
        "each device once, sorted"
    );
    for row in &rows[..24] {
        assert_eq!((row[1], row[3]), ("200", r#"{"hello":"units"}"#), "{row:?}");
    }
    for row in &rows[24..] {
        assert_eq!(
            (row[1], row[3]),
            ("404103", "not online (DeviceNotOnline)"),
            "{row:?}"
        );
    }
    assert_eq!(
        lines[28],
        "26 devices: 24 succeeded, 0 failed, 2 not online, 0 timed out"
    );

    let run = invoker(
        &broker,
        &[
            "--json",
            "broadcast",
            "echo",
            "--devices",
            "unit-*",
            "--concurrency",
            "3",
        ],
    )
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    let results = json_lines(&run);
    let mut devices: Vec<String> = results
        .iter()
        .map(|r| r["deviceId"].as_str().expect("deviceId").to_owned())
        .collect();
    devices.sort();
    assert_eq!(devices, expected, "each device exactly once");
    let succeeded = results.iter().filter(|r| r["status"] == json!(200)).count();
    let not_online = results
        .iter()
        .filter(|r| r["errorCode"] == json!(404103))
        .count();
    assert_eq!((succeeded, not_online), (24, 2));

    for host in hosts {
        host.stop().await.expect("clean stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_usage_is_one_line_naming_the_problem_and_nothing_is_sent() {
    // Nothing listens here: a command that tried to connect would exit 5, not 2.
    let nowhere = format!("mqtt://127.0.0.1:{}", free_port().expect("free port"));
    let dir = tempfile::tempdir().expect("temp dir");
    let bad_config = dir.path().join("bad.toml");
    std::fs::write(&bad_config, "response_timeout = 30\nbrokr = \"mqtt://x\"\n").expect("write");
    let bad_config = format!("{}", bad_config.display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["frobnicate"], "unrecognized subcommand 'frobnicate'"),
        (vec!["call", "d", "m", "{not json"], "payload is not JSON"),
        (
            vec!["call", "d", "m", "@/nonexistent/payload.json"],
            "payload file /nonexistent/payload.json: No such file or directory",
        ),
        (
            vec!["call", "d", "m", "--response-timeout", "301"],
            "response timeout 301s is out of range: it must be 5 to 300 seconds (400004",
        ),
        (
            vec!["broadcast", "m", "{oops", "--devices", "*"],
            "payload is not JSON",
        ),
        (
            vec![
                "broadcast",
                "m",
                "--devices",
                "*",
                "--response-timeout",
                "4",
            ],
            "response timeout 4s is out of range",
        ),
        (
            vec![
                "broadcast",
                "m",
                "--devices",
                "*",
                "--connect-timeout",
                "301",
            ],
            "connect timeout 301s is out of range",
        ),
        (
            vec![
                "broadcast",
                "m",
                "--devices-file",
                "/nonexistent/devices.txt",
            ],
            "could not read the devices file /nonexistent/devices.txt",
        ),
        (
            vec!["broadcast", "m", "@/nonexistent/p.json", "--devices", "*"],
            "payload file /nonexistent/p.json",
        ),
        (
            vec!["broadcast", "m", "--devices", "a/b"],
            "--devices a/b: device id contains '/'",
        ),
        (
            vec!["broadcast", "m"],
            "the following required arguments were not provided",
        ),
        (
            vec!["broadcast", "m", "--devices", "*", "--concurrency", "0"],
            "invalid value '0' for '--concurrency <N>'",
        ),
        (
            vec!["--namespace", "", "devices"],
            "does not hold {device-id} once as a whole topic level",
        ),
        (vec!["methods", "bad/device"], "device id contains '/'"),
        (
            vec!["--config", "/nonexistent/edge-invoker.toml", "devices"],
            "could not read the config file /nonexistent/edge-invoker.toml",
        ),
        (
            vec!["--config", &bad_config, "methods", "d"],
            "line 2: unknown field `brokr`",
        ),
        (vec!["completions", "tcsh"], "invalid value 'tcsh'"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["--broker", nowhere.as_str()];
        all.extend_from_slice(&args);
        let run = invoker_with(&all, &[], b"").await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        let errors: Vec<&str> = run
            .stderr
            .lines()
            .filter(|l| l.starts_with("error"))
            .collect();
        assert_eq!(errors.len(), 1, "{args:?}: {}", run.stderr);
        assert!(errors[0].contains(needle), "{args:?}: {}", run.stderr);
        assert!(!run.stderr.contains("panicked"), "{args:?}: {}", run.stderr);
        assert_eq!(run.stdout, "", "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_gives_defaults_that_flags_and_environment_override() {
    let site = Site::new();
    let host = site.pump("pump-1").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("edge-invoker.toml");
    std::fs::write(
        &config,
        format!(
            "broker = \"{}\"\nnamespace = \"devices/{{device-id}}/\"\nresponse_timeout = 10\n",
            site.broker()
        ),
    )
    .expect("config file");
    let config = config.to_str().expect("UTF-8 path");
    let nowhere = format!("mqtt://127.0.0.1:{}", free_port().expect("free port"));

    let run = invoker_with(
        &["--config", config, "call", "pump-1", "echo", "1"],
        &[],
        b"",
    )
    .await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "Response status : 200\nResponse payload: 1\n")
    );
    let run = invoker_with(
        &["call", "pump-1", "echo", "1"],
        &[("EDGE_INVOKER_CONFIG", config)],
        b"",
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    // The flag and the environment variable win over the file.
    let run = invoker_with(
        &[
            "--config", config, "--broker", &nowhere, "call", "pump-1", "echo",
        ],
        &[],
        b"",
    )
    .await;
    assert_eq!(run.code, 5, "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("error: could not reach the broker at {nowhere}")),
        "{run:?}"
    );
    let run = invoker_with(
        &["--config", config, "devices"],
        &[("EDGE_BROKER", &nowhere)],
        b"",
    )
    .await;
    assert_eq!(run.code, 5, "{run:?}");
    host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colour_only_when_asked_and_never_with_no_color() {
    let site = Site::new();
    let host = site.pump("pump-1").await;
    let url = site.broker().to_string();
    let args = ["--broker", url.as_str(), "devices"];

    let piped = invoker_with(&args, &[], b"").await;
    assert!(!piped.stdout.contains('\u{1b}'), "{piped:?}");
    let forced = invoker_with(&args, &[("CLICOLOR_FORCE", "1")], b"").await;
    assert!(
        forced.stdout.contains("\u{1b}[1mDEVICE\u{1b}[0m"),
        "{forced:?}"
    );
    assert!(
        forced.stdout.contains("\u{1b}[32monline\u{1b}[0m"),
        "{forced:?}"
    );
    let no_color = invoker_with(&args, &[("CLICOLOR_FORCE", "1"), ("NO_COLOR", "1")], b"").await;
    assert_eq!(no_color.stdout, piped.stdout);
    // JSON is never coloured.
    let json = invoker_with(
        &[
            "--broker",
            url.as_str(),
            "--json",
            "call",
            "pump-1",
            "echo",
            "{\"a\":1}",
        ],
        &[("CLICOLOR_FORCE", "1")],
        b"",
    )
    .await;
    assert_eq!(json.stdout, "{\"status\":200,\"payload\":{\"a\":1}}\n");
    host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_are_printed_for_bash_zsh_and_fish() {
    for (shell, marker) in [
        ("bash", "complete -F _edge__invoker"),
        ("zsh", "#compdef edge-invoker"),
        ("fish", "complete -c edge-invoker"),
    ] {
        let run = invoker_with(&["completions", shell], &[], b"").await;
        assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{shell}");
        assert!(run.stdout.contains(marker), "{shell}: {}", run.stdout);
        for command in ["call", "devices", "methods", "broadcast", "completions"] {
            assert!(run.stdout.contains(command), "{shell} lacks {command}");
        }
    }
    // Bash takes the script and registers the completion.
    let script = invoker_with(&["completions", "bash"], &[], b"")
        .await
        .stdout;
    let bash = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!("{script}\ncomplete -p edge-invoker"))
        .output()
        .await
        .expect("bash runs");
    assert!(bash.status.success(), "{bash:?}");
    assert!(
        String::from_utf8_lossy(&bash.stdout).contains("edge-invoker"),
        "{bash:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_lists_a_fleet_larger_than_the_brokers_message_queue() {
    // Mosquitto queues at most 1000 QoS 1 messages per client beyond its in-flight
    // window and drops the rest; a listing reads retained presence at QoS 0 so that a
    // large fleet arrives whole. 1500 devices, each with presence and catalog: 3000
    // retained messages.
    let mosquitto = Mosquitto::start().expect("mosquitto starts");
    let broker = mosquitto.url();
    let publisher = RawClient::connect(&broker, &[]).await.expect("client");
    let devices: Vec<String> = (0..1500).map(|n| format!("meter-{n:04}")).collect();
    for device in &devices {
        let presence = r#"{"online":true,"since":"2026-11-26T12:00:00Z","agent":"fake 1"}"#;
        publisher
            .publish_retained(&format!("devices/{device}/$edge/presence"), presence)
            .await
            .expect("presence");
        publisher
            .publish_retained(
                &format!("devices/{device}/$edge/methods"),
                r#"{"methods":[{"name":"read","description":"","handler":"m.wasm","digest":"sha256:00"}]}"#,
            )
            .await
            .expect("catalog");
    }
    // The broker handles one client's messages in order: once the last is retained,
    // all are.
    let last = format!("devices/{}/$edge/methods", devices[1499]);
    let mut reader = RawClient::connect(&broker, std::slice::from_ref(&last))
        .await
        .expect("reader");
    reader
        .next_where(Duration::from_secs(30), |_| true)
        .await
        .expect("the last catalog is retained");

    let run = invoker(&broker, &["--json", "devices"]).await;
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{:?}", run.stderr);
    let listed = json_lines(&run);
    assert_eq!(listed.len(), 1500);
    for (line, device) in listed.iter().zip(&devices) {
        assert_eq!(
            (&line["deviceId"], &line["online"], &line["methods"]),
            (&json!(device), &json!(true), &json!(1)),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_keeps_at_most_its_concurrency_in_flight() {
    // Six devices played by one plain MQTT client, which answers only when the test
    // says: the requests it holds unanswered are the job's calls in flight.
    let mosquitto = Mosquitto::start().expect("mosquitto starts");
    let broker = mosquitto.url();
    let mut devices = RawClient::connect(&broker, &["devices/+/$iothub/methods/POST/#".to_owned()])
        .await
        .expect("devices' client");
    for n in 1..=6 {
        devices
            .publish_retained(
                &format!("devices/fake-{n}/$edge/presence"),
                br#"{"online":true}"#.as_slice(),
            )
            .await
            .expect("presence");
    }
    let url = broker.to_string();
    let job = tokio::spawn(async move {
        invoker_with(
            &[
                "--broker",
                &url,
                "--json",
                "broadcast",
                "echo",
                "--devices",
                "fake-*",
                "--concurrency",
                "3",
            ],
            &[],
            b"",
        )
        .await
    });
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next_request(&mut devices, 10_000).await.expect("a request"));
    }
    let mut answered = 0;
    while let Some((namespace, request_id)) = held.pop() {
        // Three in flight and no fourth until one is answered.
        assert!(
            next_request(&mut devices, 500).await.is_none(),
            "a request beyond the concurrency of 3"
        );
        devices
            .publish(&namespace.response_topic(200, &request_id), "true")
            .await
            .expect("answer");
        answered += 1;
        if answered <= 3 {
            held.push(
                next_request(&mut devices, 10_000)
                    .await
                    .expect("the next request once one is answered"),
            );
        }
    }
    assert_eq!(answered, 6);
    let run = job.await.expect("the job ends");
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(json_lines(&run).len(), 6);
}

/// The next request the fake devices' client receives within `wait_ms`: the device's
/// namespace and the request id to answer.
async fn next_request(
    devices: &mut RawClient,
    wait_ms: u64,
) -> Option<(edge_proto::Namespace, String)> {
    let (topic, _) = devices
        .next_where(Duration::from_millis(wait_ms), |_| true)
        .await
        .ok()?;
    let device = topic.split('/').nth(1)?;
    let namespace = edge_proto::Namespace::for_device(device).ok()?;
    let request_id = namespace.parse_request(&topic).ok()?.request_id.to_owned();
    Some((namespace, request_id))
}
