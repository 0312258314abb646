//! What the end-to-end tests share, so each test reads as the behaviour it pins down.
//!
//! Layout:
//! - [`handlers`]: [`guest`], real components built from `handlers/` and
//!   `testkit/fixtures/` by this crate's build script, and [`HandlerDir`], copies of
//!   them in a temporary folder;
//! - [`mosquitto`]: [`Mosquitto`], a real Mosquitto on a free loopback port, killed on
//!   drop;
//! - [`host`]: [`TestHost`], an edge-host running in-process with an injected shutdown,
//!   and what a caller sees of a device: [`presence`], [`catalog`];
//! - [`wire`]: [`RawClient`], [`WireCaller`], [`publish_once`]: plain MQTT clients for
//!   tests that send what edge-host and edge-invoker never would;
//! - [`pki`]: [`TestPki`], a certificate authority of the test's own;
//! - [`process`]: [`ChildGuard`], a child process killed and reaped on drop, for every
//!   process a test starts (hosts, brokers, hubs);
//! - [`logs`]: [`init_logging`], and [`capture_logs`] for tests that read the log;
//! - [`lang`]: guests in Python and JavaScript, built on first use;
//! - here: [`free_port`], [`connections_to`] (who is connected to a listener),
//!   [`eventually`] (wait for what a test can see) and [`azure_python`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

pub mod handlers;
pub mod host;
pub mod lang;
pub mod logs;
pub mod mosquitto;
pub mod pki;
pub mod process;
pub mod wire;

pub use handlers::{HandlerDir, guest};
pub use host::{TestHost, catalog, catalog_until, host_config, presence, presence_with};
pub use logs::{LogCapture, capture_logs, init_logging};
pub use mosquitto::Mosquitto;
pub use pki::TestPki;
pub use process::{ChildGuard, Signal, status_bytes};
pub use wire::{Delivery, RawClient, RawOptions, WireCaller, publish_once};

/// A free TCP port on 127.0.0.1 (free when asked; taken soon after by the caller).
///
/// # Errors
/// When no port can be bound.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding port 0")?;
    Ok(listener.local_addr()?.port())
}

/// How many TCP connections to local port `port` are established on this machine: a
/// listener's accepted sockets, as the kernel lists them in `/proc/net/tcp` and
/// `/proc/net/tcp6`. Each client connected to a broker there counts once.
///
/// # Errors
/// When neither table can be read.
pub fn connections_to(port: u16) -> anyhow::Result<usize> {
    // Each line: `sl local_address rem_address st ...`, addresses as `HEXIP:HEXPORT`,
    // state 01 for ESTABLISHED.
    let local = format!(":{port:04X}");
    let mut count = 0;
    let mut read_any = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        read_any = true;
        count += text
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields
                    .get(1)
                    .is_some_and(|address| address.ends_with(&local))
                    && fields.get(3) == Some(&"01")
            })
            .count();
    }
    anyhow::ensure!(read_any, "cannot read /proc/net/tcp or /proc/net/tcp6");
    Ok(count)
}

/// Polls `check` every 50 ms until it gives a value, and returns it; panics naming
/// `what` if none came within `timeout`. For what a test waits to see happen (a file
/// reloaded, a twin updated), never for how fast it happens.
///
/// `check` is an async closure, so it may borrow what the test holds mutably (a
/// caller, a setup) across its awaits.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Python interpreter with the Azure IoT SDKs that the hub's and the invoker's
/// tests run as peers: `EDGE_PYTHON`, else `target/pyenv` (`cargo xtask test` installs
/// it from hub/tests/python/requirements.txt). Fails, never skips, with how to install
/// them when they are missing.
pub fn azure_python() -> PathBuf {
    let python = std::env::var_os("EDGE_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python"),
        PathBuf::from,
    );
    let works = std::process::Command::new(&python)
        .args(["-c", "import azure.iot.device, azure.iot.hub"])
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        works,
        "the Azure IoT SDKs for Python are not installed at {}: run `cargo xtask test`, or \
         point EDGE_PYTHON at an interpreter with hub/tests/python/requirements.txt",
        python.display()
    );
    python
}
