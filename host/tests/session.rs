//! The MQTT session survives faults: a broker restart mid-load, a host killed hard, a
//! clean shutdown with calls in flight. Real Mosquitto, the real `edge-host` binary
//! where signals matter, edge-invoker's Caller as the client.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use edge_invoker::{CallError, CallRequest, Caller, ConnectOptions};
use edge_proto::Namespace;
use testkit::{
    ChildGuard, HandlerDir, Mosquitto, RawClient, TestHost, eventually, host_config, presence,
};

/// Starts the real `edge-host` binary for `device` on `broker`, serving `handlers`;
/// killed if the test ends first.
fn spawn_host(device: &str, handlers: &HandlerDir, broker: &Mosquitto) -> ChildGuard {
    ChildGuard::spawn(&mut host_command(device, handlers, broker)).expect("edge-host starts")
}

/// The command that runs the real `edge-host` binary for `device` on `broker`, serving
/// `handlers`.
fn host_command(device: &str, handlers: &HandlerDir, broker: &Mosquitto) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edge-host"));
    command
        .args([
            "--device-id",
            device,
            "--broker",
            &broker.url().to_string(),
            "--no-cache",
        ])
        .arg("--handlers")
        .arg(handlers.path())
        .env(
            "RUST_LOG",
            std::env::var("HOST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null());
    command
}

/// Sends `count` calls of misbehave's `sleep` for `ms` to `device` (request ids
/// `sleep-0`, `sleep-1`, ...) and returns once the host has taken them all: a probe
/// sent after them on the same connection has been answered, and a host takes one
/// connection's requests in order. The client reads the device's responses.
async fn sleepers_in_flight(
    broker: &Mosquitto,
    device: &str,
    count: usize,
    ms: u32,
) -> (Namespace, RawClient) {
    let ns = Namespace::for_device(device).expect("valid");
    let mut client = RawClient::connect(&broker.url(), &[ns.response_filter()])
        .await
        .expect("client");
    for i in 0..count {
        let topic = ns.request_topic("sleep", &format!("sleep-{i}"));
        client
            .publish(&topic, format!(r#"{{"ms":{ms}}}"#))
            .await
            .expect("sent");
    }
    let probe = ns.request_topic("status", "probe");
    client
        .publish(&probe, r#"{"status":200}"#)
        .await
        .expect("sent");
    client
        .next_where(Duration::from_secs(10), |t| t.ends_with("$rid=probe"))
        .await
        .expect("the probe is answered while the sleepers run");
    (ns, client)
}

/// A Mosquitto and the real `edge-host` binary for `device` serving `packages`, online,
/// with a Caller connected to the broker.
async fn binary_host(
    device: &str,
    packages: &[&str],
) -> (Mosquitto, HandlerDir, ChildGuard, Caller) {
    testkit::init_logging();
    let broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(packages).expect("handlers");
    let host = spawn_host(device, &handlers, &broker);
    presence(&broker.url(), device, true, Duration::from_secs(30))
        .await
        .expect("online");
    let caller = Caller::connect(ConnectOptions::new(broker.url()))
        .await
        .expect("caller");
    (broker, handlers, host, caller)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_load_is_survived_and_no_call_is_answered_twice() {
    testkit::init_logging();
    let mut broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(&["echo"]).expect("handlers");
    let host = TestHost::start(host_config("restart-device", handlers.path(), broker.url()))
        .await
        .expect("host starts");
    let caller = Caller::connect(ConnectOptions::new(broker.url()))
        .await
        .expect("caller");
    // A witness of every answer on the wire, to catch one answered twice.
    let ns = Namespace::for_device("restart-device").expect("valid");
    let witness = Arc::new(tokio::sync::Mutex::new(
        RawClient::connect(&broker.url(), &[ns.response_filter()])
            .await
            .expect("witness"),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (caller, stop) = (caller.clone(), Arc::clone(&stop));
        load.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut request = CallRequest::new("restart-device", "echo", "1");
            request.response_timeout = Duration::from_secs(5);
            while !stop.load(Ordering::Relaxed) {
                let outcome =
                    tokio::time::timeout(Duration::from_secs(10), caller.call(&request)).await;
                outcomes.push((
                    Instant::now(),
                    outcome.expect("a call never hangs past its timeout"),
                ));
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.restart().expect("mosquitto comes back");
    let restarted = Instant::now();
    // The witness lost its connection too; it sees everything from here on.
    *witness.lock().await = RawClient::connect(&broker.url(), &[ns.response_filter()])
        .await
        .expect("witness");

    // Served again within a few seconds.
    let served_again = loop {
        let mut request = CallRequest::new("restart-device", "echo", "2");
        request.response_timeout = Duration::from_secs(5);
        if let Ok(response) = caller.call(&request).await {
            assert_eq!(response.status, 200);
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(20),
            "never served again after the restart"
        );
    };
    // Longer than a response timeout, so that every load task, even one whose call was
    // lost with the old connection, gets to call again after the restart.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for task in load {
        outcomes.extend(task.await.expect("load task"));
    }
    for (_, outcome) in &outcomes {
        match outcome {
            Ok(response) => assert_eq!(response.status, 200),
            Err(CallError::Timeout { .. }) => {} // in flight at the restart: 504101
            Err(other) => panic!("a call ended otherwise than with an answer or 504101: {other}"),
        }
    }
    assert!(
        outcomes.iter().any(|(at, o)| *at > restarted && o.is_ok()),
        "the load was served after the restart"
    );

    let mut answers: HashMap<String, usize> = HashMap::new();
    let mut witness = witness.lock().await;
    while let Ok((topic, _)) = witness
        .next_where(Duration::from_millis(200), |_| true)
        .await
    {
        let rid = ns
            .parse_response(&topic)
            .expect("response topic")
            .request_id
            .to_owned();
        *answers.entry(rid).or_default() += 1;
    }
    assert!(
        !answers.is_empty(),
        "the witness saw the answers after the restart"
    );
    assert!(
        answers.values().all(|&n| n == 1),
        "a call was answered twice: {answers:?}"
    );
    tracing_note(served_again);
    host.stop().await.expect("clean stop");
}

fn tracing_note(served_again: Duration) {
    eprintln!(
        "served again {} ms after the broker restart",
        served_again.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_hard_is_reported_not_online_at_once() {
    let (broker, _handlers, mut host, caller) = binary_host("killed-device", &["echo"]).await;
    assert_eq!(
        caller
            .call(&CallRequest::new("killed-device", "echo", "1"))
            .await
            .expect("served")
            .status,
        200
    );

    host.signal(testkit::Signal::KILL)
        .expect("the signal is sent");
    host.wait().expect("reaped");
    // The broker publishes the host's will as soon as the connection drops.
    presence(
        &broker.url(),
        "killed-device",
        false,
        Duration::from_secs(10),
    )
    .await
    .expect("offline by will");
    let started = Instant::now();
    let outcome = caller
        .call(&CallRequest::new("killed-device", "echo", "1"))
        .await;
    assert!(
        matches!(outcome, Err(CallError::NotOnline { .. })),
        "{outcome:?}"
    );
    assert_eq!(
        outcome.as_ref().err().and_then(CallError::code),
        Some(404103)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "at once, not after the 30 s response timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_the_calls_in_flight_marks_offline_and_exits_0() {
    let (broker, _handlers, mut host, caller) =
        binary_host("stopping-device", &["misbehave"]).await;

    // Five calls that take 1.5 s.
    let (ns, mut client) = sleepers_in_flight(&broker, "stopping-device", 5, 1500).await;
    host.signal(testkit::Signal::TERM)
        .expect("the signal is sent");
    for _ in 0..5 {
        let (topic, _) = client
            .next_where(Duration::from_secs(10), |t| t.contains("$rid=sleep-"))
            .await
            .expect("answered despite the shutdown");
        let status = ns.parse_response(&topic).expect("response topic").status;
        assert_eq!(status, 200, "{topic}");
    }
    let status = tokio::task::spawn_blocking(move || host.wait())
        .await
        .expect("join")
        .expect("exit");
    assert_eq!(status.code(), Some(0), "a clean shutdown exits 0");
    presence(
        &broker.url(),
        "stopping-device",
        false,
        Duration::from_secs(5),
    )
    .await
    .expect("offline");
    let outcome = caller
        .call(&CallRequest::new("stopping-device", "count", "null"))
        .await;
    assert!(
        matches!(outcome, Err(CallError::NotOnline { .. })),
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_calls_stuck_in_host_calls_exits_within_the_grace_without_panics() {
    testkit::init_logging();
    let broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(&["misbehave"]).expect("handlers");
    let mut host =
        ChildGuard::spawn(host_command("stuck-device", &handlers, &broker).stderr(Stdio::piped()))
            .expect("edge-host starts");
    presence(&broker.url(), "stuck-device", true, Duration::from_secs(30))
        .await
        .expect("online");
    // Calls that sleep in a host call for days, with the default 30 s deadline.
    let _sleepers = sleepers_in_flight(&broker, "stuck-device", 8, u32::MAX).await;

    let stopped = Instant::now();
    host.signal(testkit::Signal::TERM)
        .expect("the signal is sent");
    let status = eventually(
        "the host exits within its 10 s grace (and then some)",
        Duration::from_secs(25),
        || std::future::ready(host.try_wait().expect("wait")),
    )
    .await;
    eprintln!("stopped in {} ms", stopped.elapsed().as_millis());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut host.stderr.take().expect("piped"), &mut stderr)
        .expect("stderr");
    assert_eq!(status.code(), Some(0), "a clean shutdown exits 0: {stderr}");
    assert!(
        !stderr.contains("panicked"),
        "no panic on the way out: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_zero_is_refused_and_a_pool_of_workers_serves_as_one_event_loop_does() {
    testkit::init_logging();
    let broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(&["misbehave"]).expect("handlers");

    let refused = host_command("pool-device", &handlers, &broker)
        .args(["--threads", "0"])
        .stderr(Stdio::piped())
        .output()
        .expect("edge-host runs");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "a usage error: {stderr}");
    assert!(stderr.contains("--threads"), "names the flag: {stderr}");

    let _host =
        ChildGuard::spawn(host_command("pool-device", &handlers, &broker).args(["--threads", "2"]))
            .expect("edge-host starts");
    presence(&broker.url(), "pool-device", true, Duration::from_secs(30))
        .await
        .expect("online");
    let caller = Caller::connect(ConnectOptions::new(broker.url()))
        .await
        .expect("caller");
    let mut calls = tokio::task::JoinSet::new();
    for status in 200..208_u16 {
        let caller = caller.clone();
        calls.spawn(async move {
            let request =
                CallRequest::new("pool-device", "status", format!(r#"{{"status":{status}}}"#));
            (status, caller.call(&request).await)
        });
    }
    while let Some(joined) = calls.join_next().await {
        let (status, outcome) = joined.expect("join");
        let response = outcome.expect("answered");
        assert_eq!(response.status, status, "{response:?}");
    }
}

/// The names of `child`'s threads, from `/proc`.
fn thread_names(child: &ChildGuard) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", child.id())).expect("/proc");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_its_embedded_broker_the_host_serves_with_the_broker_on_its_own_event_loop() {
    testkit::init_logging();
    let handlers = HandlerDir::with(&["echo"]).expect("handlers");
    for (threads, broker_thread) in [("1", false), ("2", true)] {
        let port = testkit::free_port().expect("a port");
        let listen = format!("127.0.0.1:{port}");
        let host = ChildGuard::spawn(
            Command::new(env!("CARGO_BIN_EXE_edge-host"))
                .args([
                    "--device-id",
                    "own-broker",
                    "--no-cache",
                    "--listen",
                    &listen,
                ])
                .args(["--threads", threads])
                .arg("--handlers")
                .arg(handlers.path())
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null()),
        )
        .expect("edge-host starts");
        let broker: edge_proto::BrokerUrl = format!("mqtt://{listen}").parse().expect("a url");
        presence(&broker, "own-broker", true, Duration::from_secs(30))
            .await
            .expect("online on its own broker");
        let caller = Caller::connect(ConnectOptions::new(broker))
            .await
            .expect("caller");
        let response = caller
            .call(&CallRequest::new("own-broker", "echo", r#"{"n":1}"#))
            .await
            .expect("answered");
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.payload.to_value(), serde_json::json!({"n":1}));
        let names = thread_names(&host);
        assert_eq!(
            names.iter().any(|name| name == "embedded-broker"),
            broker_thread,
            "--threads {threads}: the broker has a thread of its own only with a pool: {names:?}"
        );
        // The host's session reaches its broker in memory: the caller's is the only
        // socket connected to the broker (once presence's own client has closed).
        testkit::eventually(
            &format!("--threads {threads}: only the caller connected over TCP"),
            Duration::from_secs(5),
            async || (testkit::connections_to(port).expect("the TCP table") == 1).then_some(()),
        )
        .await;
        caller.disconnect().await;
    }
}
