//! Instance reuse, the opt-in for handlers that keep no state between calls: warm
//! instances serve call after call, and a trap, a deadline, the call bound or a reload
//! retires them, so a broken instance never serves again. The `count` method of the
//! misbehave fixture keeps state on purpose, to tell a reused instance from a fresh one.

use std::time::Duration;

use serde_json::{Value, json};
use testkit::{HandlerDir, Mosquitto, TestHost, WireCaller, host_config};

const DEVICE: &str = "reuse-device";

struct Setup {
    _broker: Mosquitto,
    handlers: HandlerDir,
    host: TestHost,
    client: WireCaller,
}

async fn setup(sidecar: Option<&str>) -> Setup {
    testkit::init_logging();
    let broker = Mosquitto::start().expect("mosquitto starts");
    let handlers = HandlerDir::with(&["misbehave"]).expect("handlers");
    if let Some(sidecar) = sidecar {
        std::fs::write(handlers.path().join("misbehave.toml"), sidecar).expect("sidecar");
    }
    let host = TestHost::start(host_config(DEVICE, handlers.path(), broker.url()))
        .await
        .expect("host starts");
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

impl Setup {
    async fn call(&mut self, method: &str) -> (u16, Value) {
        self.client.call(method, b"null").await.expect("answered")
    }

    /// The `count` answers of `n` calls made one after another.
    async fn counts(&mut self, n: usize) -> Vec<u64> {
        let mut counts = Vec::new();
        for _ in 0..n {
            let (status, body) = self.call("count").await;
            assert_eq!(status, 200, "{body}");
            counts.push(body["count"].as_u64().expect("a count"));
        }
        counts
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_opt_in_every_call_gets_a_fresh_instance() {
    let mut s = setup(None).await;
    assert_eq!(s.counts(3).await, [1, 1, 1]);
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_instance_serves_until_a_trap_or_a_deadline_retires_it() {
    // The deadline must leave room for `alloc` to reach the 64 MiB cap on a busy
    // machine (it took 350 ms once with two builds running): it is 2 s, and `spin`
    // runs that long.
    let mut s = setup(Some("reuse = true\ntimeout_ms = 2000\n")).await;
    assert_eq!(
        s.counts(3).await,
        [1, 2, 3],
        "one warm instance serves call after call"
    );

    let (status, body) = s.call("panic").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(
        s.counts(2).await,
        [1, 2],
        "the trapped instance never serves again"
    );

    let (status, body) = s.call("spin").await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(
        s.counts(1).await,
        [1],
        "nor does one that ran past its deadline"
    );

    let (status, body) = s.call("alloc").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(s.counts(1).await, [1], "nor one that exhausted its memory");
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_instance_serves_a_bounded_number_of_calls() {
    let mut s = setup(Some("reuse = true\nreuse_max_calls = 2\n")).await;
    assert_eq!(s.counts(5).await, [1, 2, 1, 2, 1]);
    s.host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_retires_the_old_versions_warm_instances() {
    let mut s = setup(Some("reuse = true\n")).await;
    assert_eq!(s.counts(2).await, [1, 2]);
    // The same handler, reloaded (its sidecar changed): its warm instances go with the
    // old version.
    std::fs::write(
        s.handlers.path().join("misbehave.toml"),
        "reuse = true\n# reloaded\n",
    )
    .expect("sidecar");
    testkit::eventually(
        "the reload retiring the warm instance",
        Duration::from_secs(20),
        async || (s.counts(1).await[0] == 1).then_some(()),
    )
    .await;
    assert_eq!(
        s.counts(2).await,
        [2, 3],
        "the new version's instance is reused in turn"
    );
    let (_, body) = s.call("echo").await;
    assert_eq!(body["error"]["code"], json!("methodNotFound"));
    s.host.stop().await.expect("clean stop");
}
