//! The host's own memory returns to its baseline after handlers exhaust theirs. Alone
//! in its test binary, so that no other test's memory moves the figure.

use testkit::{HandlerDir, Mosquitto, TestHost, WireCaller, host_config};

/// The resident set of this process (host included: it runs in-process), in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    let kib: usize = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

#[tokio::test]
async fn memory_a_handler_exhausted_is_given_back() {
    testkit::init_logging();
    let broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(&["echo", "misbehave"]).expect("handlers");
    let host = TestHost::start(host_config("memory-device", handlers.path(), broker.url()))
        .await
        .expect("host starts");
    let mut client = WireCaller::connect(&broker.url(), "memory-device")
        .await
        .expect("client");

    // Warm up every path once, then take the baseline.
    let (status, _) = client.call("alloc", b"null").await.expect("answered");
    assert_eq!(status, 500);
    assert_eq!(client.call("echo", b"1").await.expect("answered").0, 200);
    let baseline = rss();

    // Each call fills 64 MiB of linear memory before it is stopped: 640 MiB in all.
    for _ in 0..10 {
        let (status, body) = client.call("alloc", b"null").await.expect("answered");
        assert_eq!(status, 500, "{body}");
    }
    assert_eq!(client.call("echo", b"1").await.expect("answered").0, 200);
    let after = rss();
    let grown = after.saturating_sub(baseline);
    assert!(
        grown < 32 << 20,
        "the host kept {} MiB of the 640 MiB its handlers touched (baseline {} MiB, after {} MiB)",
        grown >> 20,
        baseline >> 20,
        after >> 20
    );
    host.stop().await.expect("clean stop");
}
