//! A real Mosquitto of the test's own, on free loopback ports, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use edge_proto::BrokerUrl;
use edge_proto::client;
use tempfile::TempDir;

use crate::free_port;
use crate::pki::TestPki;
use crate::process::ChildGuard;

/// A Mosquitto broker of the test's own, on a free loopback port, with TCP_NODELAY
/// on; killed when dropped.
pub struct Mosquitto {
    /// The broker's process; dropped (killed) before its folder is removed.
    child: ChildGuard,
    /// The listeners' ports; the first is the one [`Mosquitto::url`] names.
    ports: Vec<u16>,
    /// Its configuration (and whatever files the test gave it).
    dir: TempDir,
}

impl Mosquitto {
    /// Starts Mosquitto with no ACL (anonymous access).
    ///
    /// # Errors
    /// When Mosquitto is not installed or does not start listening.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with("")
    }

    /// Starts Mosquitto with `extra` appended to its configuration.
    ///
    /// # Errors
    /// When Mosquitto is not installed or does not start listening.
    pub fn start_with(extra: &str) -> anyhow::Result<Self> {
        Self::start_listener(&format!("allow_anonymous true\n{extra}"))
    }

    /// Starts Mosquitto with `listener_config` right after its `listener` line (so
    /// listener options such as TLS files apply to it). Anonymous clients are refused
    /// unless the configuration says `allow_anonymous true`.
    ///
    /// # Errors
    /// When Mosquitto is not installed or does not start listening.
    pub fn start_listener(listener_config: &str) -> anyhow::Result<Self> {
        let port = free_port()?;
        let dir = tempfile::tempdir().context("creating Mosquitto's folder")?;
        let conf = dir.path().join("mosquitto.conf");
        // TESTKIT_MOSQUITTO_LOG=all shows every packet when a test needs looking into.
        let log_types = std::env::var("TESTKIT_MOSQUITTO_LOG")
            .map(|types| format!("log_type {types}\n"))
            .unwrap_or_else(|_| "log_type error\nlog_type warning\n".to_owned());
        // `user root`: started as root, Mosquitto would drop to its own user and then
        // fail to read files the test gave it in private folders (an ACL, say).
        // `max_queued_messages`: a test that floods a host reads its thousands of answers
        // through one client; Mosquitto's default queue of 1000 would drop some.
        std::fs::write(
            &conf,
            format!(
                "user root\nmax_queued_messages 100000\nper_listener_settings false\nset_tcp_nodelay true\npersistence false\n\
                 log_dest stderr\n{log_types}listener {port} 127.0.0.1\n{listener_config}\n"
            ),
        )?;
        Self::spawn(vec![port], dir)
    }

    /// Starts Mosquitto with `config` as its whole configuration, listeners included,
    /// but for testkit's own lines (run as root, log to stderr, no persistence): for a
    /// test of a configuration file as documented. `ports` are the ports its
    /// `listener` lines use (from [`free_port`]); each is waited for, and the first is
    /// the one [`Mosquitto::url`] names.
    ///
    /// # Errors
    /// When Mosquitto is not installed or does not start listening on every port.
    pub fn start_config(ports: &[u16], config: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(!ports.is_empty(), "Mosquitto needs a listener");
        let dir = tempfile::tempdir().context("creating Mosquitto's folder")?;
        let log_types = std::env::var("TESTKIT_MOSQUITTO_LOG")
            .map(|types| format!("log_type {types}\n"))
            .unwrap_or_else(|_| "log_type error\nlog_type warning\n".to_owned());
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!("user root\npersistence false\nlog_dest stderr\n{log_types}{config}\n"),
        )?;
        Self::spawn(ports.to_vec(), dir)
    }

    fn spawn(ports: Vec<u16>, dir: TempDir) -> anyhow::Result<Self> {
        let child = launch(&ports, dir.path())?;
        Ok(Self { child, ports, dir })
    }

    /// Kills the broker and starts it again on the same port and configuration.
    ///
    /// # Errors
    /// When it does not come back.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        // Killed and reaped before the new one takes its ports.
        self.child.kill().ok();
        self.child.wait().ok();
        self.child = launch(&self.ports, self.dir.path())?;
        Ok(())
    }

    /// The broker's URL (its first listener's).
    pub fn url(&self) -> BrokerUrl {
        BrokerUrl::tcp("127.0.0.1", self.ports[0])
    }
}

/// Runs Mosquitto with the configuration in `dir` and waits until it listens on every
/// one of `ports`.
fn launch(ports: &[u16], dir: &Path) -> anyhow::Result<ChildGuard> {
    let binary = mosquitto_binary()?;
    let mut child = ChildGuard::spawn(
        Command::new(&binary)
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )
    .with_context(|| format!("starting {}", binary.display()))?;
    for port in ports {
        if let Err(e) = client::wait_listening(
            std::net::SocketAddr::from(([127, 0, 0, 1], *port)),
            Duration::from_secs(10),
        ) {
            let exited = child.try_wait().ok().flatten();
            bail!("Mosquitto did not start (exit status {exited:?}): {e}");
        }
    }
    Ok(child)
}

/// Where Mosquitto is: `$MOSQUITTO`, else `mosquitto` on the PATH, else Debian's
/// `/usr/sbin/mosquitto`.
fn mosquitto_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("MOSQUITTO") {
        return Ok(path.into());
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("mosquitto"))
        .find(|path| path.is_file());
    let debian = PathBuf::from("/usr/sbin/mosquitto");
    on_path
        .or_else(|| debian.is_file().then_some(debian))
        .context("Mosquitto is not installed: `apt-get install -y mosquitto` (cargo xtask test installs it)")
}

impl Mosquitto {
    /// Starts Mosquitto with a TLS listener using `pki`'s server certificate; with
    /// `require_client_cert`, clients must present a certificate the CA signed.
    ///
    /// # Errors
    /// When Mosquitto is not installed or does not start listening.
    pub fn start_tls(pki: &TestPki, require_client_cert: bool) -> anyhow::Result<Self> {
        Self::start_listener(&format!(
            "allow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_client_cert}\n",
            pki.file("ca.pem").display(),
            pki.file("server.pem").display(),
            pki.file("server.key").display(),
        ))
    }
}
