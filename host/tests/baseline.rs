//! A large new handler serves from a baseline (Winch) build as soon as it lands, and
//! moves to its optimised (Cranelift) build once that is compiled in the background,
//! in one swap that fails no call; the compiled-code cache then holds the optimised
//! code only, and a restart serves that at once, never baseline code. A real host, a
//! real Mosquitto, the Python example (componentize-py, 18 MB) renamed into a temporary
//! handlers folder while the host runs, with a compiled-code cache of its own, cold.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::{HandlerDir, Mosquitto, TestHost, WireCaller, host_config};

const DEVICE: &str = "baseline-device";

/// How long Cranelift may take on the 18 MB component: seconds alone, minutes on a
/// machine busy with other builds.
const OPTIMISE_TIME: Duration = Duration::from_secs(300);

/// The log lines of calls of `greet` (this file's tests are the only ones calling it).
fn greet_calls(logs: &testkit::LogCapture) -> Vec<String> {
    logs.lines_with("method called")
        .lines()
        .filter(|line| line.contains("greet"))
        .map(str::to_owned)
        .collect()
}

/// Calls `greet` for Ada.
async fn greet(client: &mut WireCaller) -> (u16, Value) {
    client
        .call("greet", br#"{"name":"Ada"}"#)
        .await
        .expect("answered")
}

/// The compiled-code cache's entries (its key aside).
fn cache_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("the cache folder")
        .map(|entry| {
            entry
                .expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name != "key")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_new_handler_serves_from_baseline_code_then_swaps_to_optimised_code_without_a_failed_call()
 {
    let logs = testkit::capture_logs();
    let built = testkit::lang::guest("greeter-py").unwrap_or_else(|e| panic!("{e:#}"));
    let broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(&["echo"]).expect("handlers");
    let cache = tempfile::tempdir().expect("cache folder");
    let mut config = host_config(DEVICE, handlers.path(), broker.url());
    config.cache = true;
    config.cache_dir = Some(cache.path().to_owned());
    let host = TestHost::start(config.clone()).await.expect("host starts");
    let mut client = WireCaller::connect(&broker.url(), DEVICE)
        .await
        .expect("client");
    assert_eq!(greet(&mut client).await.0, 404, "not deployed yet");

    // Lands as a deployment does: copied aside, renamed into place.
    let staged = handlers.path().join(".greeter-py.wasm.staged");
    std::fs::copy(&built, &staged).expect("staged");
    std::fs::rename(&staged, handlers.path().join("greeter-py.wasm")).expect("renamed in");
    let landed = Instant::now();
    testkit::eventually("greeter-py serving", OPTIMISE_TIME, async || {
        let (status, body) = greet(&mut client).await;
        assert!(
            status == 200 || status == 404,
            "before it serves, 404: {status} {body}"
        );
        (status == 200).then_some(())
    })
    .await;
    let first_answer = landed.elapsed();

    // Every call from the first answer on succeeds, across the swap and after it.
    let mut calls_after_swap = 0;
    let mut calls = 0;
    while calls_after_swap < 20 {
        let (status, body) = greet(&mut client).await;
        assert_eq!(
            (status, &body["message"]),
            (200, &json!("Hello, Ada! This is baseline-device.")),
            "call {calls} after the first answer: {body}"
        );
        calls += 1;
        if !logs
            .lines_with("handler swapped to its optimised build")
            .is_empty()
        {
            calls_after_swap += 1;
        }
        // Calls at a steady pace, not flat out: the log is searched after each one.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            landed.elapsed() < OPTIMISE_TIME,
            "the optimised build never replaced the baseline one"
        );
    }

    let served = greet_calls(&logs);
    let first = served.first().expect("greet calls were logged");
    let last = served.last().expect("greet calls were logged");
    assert!(
        first.contains("code=baseline"),
        "the first answer came from the baseline build: {first}"
    );
    assert!(
        last.contains("code=optimised"),
        "the last answer came from the optimised build: {last}"
    );
    let swapped_at = served
        .iter()
        .position(|line| line.contains("code=optimised"))
        .expect("an optimised call");
    assert!(
        served[swapped_at..]
            .iter()
            .all(|line| line.contains("code=optimised")),
        "once swapped, every call ran optimised code:\n{}",
        served.join("\n")
    );
    eprintln!(
        "first answer {first_answer:?} after landing; {swapped_at} calls from baseline code, {calls} in all"
    );

    let report = host.stop().await.expect("host stops cleanly");
    assert_eq!(
        report.compilations, 2,
        "echo and greeter-py were compiled optimised once each (baseline builds are not counted)"
    );
    assert_eq!(
        cache_entries(cache.path()).len(),
        2,
        "the cache holds the optimised code of echo and greeter-py, and nothing else: {:?}",
        cache_entries(cache.path())
    );

    // A restart takes the optimised code from the cache and serves it from the start.
    let restart = testkit::capture_logs();
    let host = TestHost::start(config).await.expect("host restarts");
    let (status, body) = greet(&mut client).await;
    assert_eq!(status, 200, "{body}");
    let served = greet_calls(&restart);
    assert!(
        !served.is_empty() && served.iter().all(|line| line.contains("code=optimised")),
        "after a restart, greeter-py serves optimised code at once:\n{}",
        served.join("\n")
    );
    let report = host.stop().await.expect("host stops cleanly");
    assert_eq!(report.compilations, 0, "a warm restart compiles nothing");
}
