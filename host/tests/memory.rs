//! The host's own memory stays bounded: it returns to its baseline after handlers
//! exhaust theirs, and a flood of calls past the bounds does not pile up. One test,
//! alone in its test binary, so that no other test's memory moves the figures.

use testkit::{HandlerDir, Mosquitto, TestHost, WireCaller, host_config};

/// The resident set of this process (host included: it runs in-process), in bytes.
fn rss() -> usize {
    let bytes = testkit::status_bytes(None, "VmRSS").expect("VmRSS in /proc/self/status");
    usize::try_from(bytes).expect("a resident set that fits in memory")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_memory_stays_bounded_through_exhaustion_and_floods() {
    testkit::init_logging();
    let broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(&["echo", "misbehave"]).expect("handlers");
    let mut config = host_config("memory-device", handlers.path(), broker.url());
    config.limits.max_in_flight = 8;
    let host = TestHost::start(config).await.expect("host starts");
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

    // A flood: 3,000 calls with 4 KiB payloads at once, far past the bound of 8 in
    // flight. Every one is answered (200 or 503) and the host keeps no backlog.
    let payload = format!("\"{}\"", "x".repeat(4094));
    let mut sent = std::collections::HashSet::new();
    for _ in 0..3000 {
        let rid = client.request_id();
        let topic = client.namespace().request_topic("echo", &rid);
        client.send(&topic, payload.as_bytes()).await.expect("send");
        sent.insert(rid);
    }
    let mut statuses = std::collections::BTreeMap::new();
    while !sent.is_empty() {
        let (rid, status, _) = client
            .any_answer(std::time::Duration::from_secs(30))
            .await
            .expect("every call is answered");
        assert!(sent.remove(&rid), "{rid} unknown or answered twice");
        *statuses.entry(status).or_insert(0) += 1;
    }
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    let flooded = rss().saturating_sub(baseline);
    assert!(
        flooded < 64 << 20,
        "a flood of 3,000 calls ({statuses:?}) left the host {} MiB above its baseline",
        flooded >> 20
    );
    host.stop().await.expect("clean stop");
}
