//! The processes under test, each a child of the benchmark so that all of them are
//! measured the same way: edge-host and edge-hub (the release binaries beside this
//! one), the floor responder (this binary's hidden `floor-responder`), the same
//! responder as a device connected through edge-hub (`hub-device`) and the embedded
//! broker on its own (`embedded-broker`). Their CPU time and memory come from
//! `/proc`; they are stopped with SIGTERM, as a service manager would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use edge_proto::BrokerUrl;
use testkit::{ChildGuard, Signal};

/// The device id every process under test serves.
pub const DEVICE: &str = "bench-device";

/// How long a stopped process may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// A process under test, killed when dropped if it still runs (its [`ChildGuard`]).
pub struct Process {
    child: ChildGuard,
    /// What it is, for messages: `edge-host`, `edge-hub`, `floor-responder`,
    /// `hub-device` or `embedded-broker`.
    name: &'static str,
}

impl Process {
    /// Starts the release edge-host serving [`DEVICE`] with the handlers in `handlers`,
    /// its compiled-code cache in `cache_dir`, through `broker`, logging warnings only.
    ///
    /// # Errors
    /// When the edge-host binary is not built or cannot be started.
    pub fn host(broker: &BrokerUrl, handlers: &Path, cache_dir: &Path) -> anyhow::Result<Self> {
        Self::host_with(
            DEVICE,
            ["--broker".to_owned(), broker.to_string()],
            handlers,
            cache_dir,
            &[],
        )
    }

    /// Starts the release edge-host as [`Process::host`] does, serving as `device`.
    ///
    /// # Errors
    /// When the edge-host binary is not built or cannot be started.
    pub fn host_as(
        device: &str,
        broker: &BrokerUrl,
        handlers: &Path,
        cache_dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::host_with(
            device,
            ["--broker".to_owned(), broker.to_string()],
            handlers,
            cache_dir,
            &[],
        )
    }

    /// Starts the release edge-host as [`Process::host`] does, with `flags` added.
    ///
    /// # Errors
    /// When the edge-host binary is not built or cannot be started.
    pub fn host_flags(
        broker: &BrokerUrl,
        handlers: &Path,
        cache_dir: &Path,
        flags: &[&str],
    ) -> anyhow::Result<Self> {
        Self::host_with(
            DEVICE,
            ["--broker".to_owned(), broker.to_string()],
            handlers,
            cache_dir,
            flags,
        )
    }

    /// Starts the release edge-host as [`Process::host`] does, but on its own embedded
    /// broker listening on `listen`: the default path, `cargo xtask run`'s.
    ///
    /// # Errors
    /// When the edge-host binary is not built or cannot be started.
    pub fn host_on_embedded(
        listen: SocketAddr,
        handlers: &Path,
        cache_dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::host_with(
            DEVICE,
            ["--listen".to_owned(), listen.to_string()],
            handlers,
            cache_dir,
            &[],
        )
    }

    fn host_with(
        device: &str,
        broker_args: [String; 2],
        handlers: &Path,
        cache_dir: &Path,
        flags: &[&str],
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(host_binary()?);
        command
            .args(broker_args)
            .args(["--device-id", device, "--handlers"])
            .arg(handlers)
            .arg("--cache-dir")
            .arg(cache_dir)
            .args(flags);
        Self::spawn(command, "edge-host")
    }

    /// Starts `command` (a release binary of the workspace) logging warnings only, and
    /// no line per failed call.
    fn spawn(mut command: Command, name: &'static str) -> anyhow::Result<Self> {
        let child = ChildGuard::spawn(
            command
                // Failed calls are the benchmark's to count (and expected while it
                // waits for a handler to serve): edge-host's line for each would bury
                // the figures under thousands of lines.
                .env("RUST_LOG", "warn,edge_host::dispatch=error")
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        )
        .with_context(|| format!("starting {}", command.get_program().to_string_lossy()))?;
        Ok(Self { child, name })
    }

    /// Starts the floor responder (this binary, `floor-responder`) for [`DEVICE`].
    ///
    /// # Errors
    /// When this binary cannot be found or started again.
    pub fn floor(broker: &BrokerUrl) -> anyhow::Result<Self> {
        Self::floor_as(broker, DEVICE)
    }

    /// Starts the floor responder as [`Process::floor`] does, serving `device`.
    ///
    /// # Errors
    /// When this binary cannot be found or started again.
    pub fn floor_as(broker: &BrokerUrl, device: &str) -> anyhow::Result<Self> {
        Self::this_binary(
            "floor-responder",
            &["--broker", &broker.to_string(), "--device-id", device],
        )
    }

    /// Starts edge-host's embedded broker on its own (this binary, `embedded-broker`),
    /// listening on `listen`.
    ///
    /// # Errors
    /// When this binary cannot be found or started again.
    pub fn embedded_broker(listen: SocketAddr) -> anyhow::Result<Self> {
        Self::this_binary("embedded-broker", &["--listen", &listen.to_string()])
    }

    /// Starts the release edge-hub on the registry in `data_dir`, relaying to
    /// `backend`, devices on `mqtts`, the service API on `https`, logging warnings only.
    ///
    /// # Errors
    /// When the edge-hub binary is not built or cannot be started.
    pub fn hub(
        backend: Backend<'_>,
        data_dir: &Path,
        mqtts: SocketAddr,
        https: SocketAddr,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(hub_binary()?);
        command
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--hostname", "localhost"]);
        match backend {
            Backend::Broker(broker) => command.args(["--broker", &broker.to_string()]),
            Backend::Embedded(listen) => command.args(["--listen", &listen.to_string()]),
        };
        command
            .args(["--mqtts-listen", &mqtts.to_string()])
            .args(["--https-listen", &https.to_string()]);
        Self::spawn(command, "edge-hub")
    }

    /// Starts the raw responder as a device connected through edge-hub (this binary,
    /// `hub-device`): [`DEVICE`] on the hub's MQTT/TLS port `port` on loopback, trusting
    /// `ca`, with the SAS `token`.
    ///
    /// # Errors
    /// When this binary cannot be found or started again.
    pub fn hub_device(port: u16, ca: &Path, token: &str) -> anyhow::Result<Self> {
        let ca = ca.to_string_lossy();
        Self::this_binary(
            "hub-device",
            &[
                "--port",
                &port.to_string(),
                "--ca-file",
                &ca,
                "--device-id",
                DEVICE,
                "--token",
                token,
            ],
        )
    }

    /// Starts this binary again with its hidden `subcommand` and `args`.
    fn this_binary(subcommand: &'static str, args: &[&str]) -> anyhow::Result<Self> {
        let binary = std::env::current_exe().context("finding the edge-bench binary")?;
        let child = ChildGuard::spawn(
            Command::new(&binary)
                .arg(subcommand)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        )
        .with_context(|| format!("starting {} {subcommand}", binary.display()))?;
        Ok(Self {
            child,
            name: subcommand,
        })
    }

    /// What it is: `edge-host`, `edge-hub`, `floor-responder`, `hub-device` or
    /// `embedded-broker`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// CPU time it has used so far, user and system, all threads.
    ///
    /// # Errors
    /// When `/proc/PID/stat` cannot be read (the process is gone).
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        cpu_time(self.child.id())
    }

    /// How many times its threads have been switched out so far (voluntary and not,
    /// all threads alive now): each a wake-up when it idles.
    ///
    /// # Errors
    /// When `/proc/PID/task` cannot be read (the process is gone).
    pub fn context_switches(&self) -> anyhow::Result<u64> {
        let tasks = format!("/proc/{}/task", self.child.id());
        let mut switches = 0;
        for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
            // A thread that ended meanwhile has no status left to read.
            let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
                continue;
            };
            switches += status
                .lines()
                .filter(|line| line.contains("ctxt_switches:"))
                .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        Ok(switches)
    }

    /// Its resident memory now (`VmRSS`), in bytes.
    ///
    /// # Errors
    /// When `/proc/PID/status` cannot be read (the process is gone).
    pub fn rss(&self) -> anyhow::Result<u64> {
        self.status_bytes("VmRSS")
    }

    /// The most resident memory it has had (`VmHWM`), in bytes.
    ///
    /// # Errors
    /// When `/proc/PID/status` cannot be read (the process is gone).
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        self.status_bytes("VmHWM")
    }

    /// The value of `field` in `/proc/PID/status`, in bytes.
    fn status_bytes(&self, field: &str) -> anyhow::Result<u64> {
        testkit::status_bytes(Some(self.child.id()), field)
            .with_context(|| format!("reading {field} of {}", self.name))
    }

    /// Fails if it has exited, with how.
    ///
    /// # Errors
    /// When it has exited, or its state cannot be read.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("{} exited while being measured: {status}", self.name),
            None => Ok(()),
        }
    }

    /// Tries `check` until it gives a value, checking between tries that this process
    /// still runs, for at most `timeout`; `what` names the wait for the error, as in
    /// "edge-host did not {what} within 60s".
    ///
    /// # Errors
    /// When the process exits, `check` fails, or `timeout` passes first.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl AsyncFnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let started = Instant::now();
        loop {
            self.check_running()?;
            if let Some(value) = check().await? {
                return Ok(value);
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "{} did not {what} within {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits until it exits (killing it after [`STOP_GRACE`]).
    ///
    /// # Errors
    /// When the signal cannot be sent, or it had to be killed.
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        self.child
            .signal(Signal::TERM)
            .with_context(|| format!("sending SIGTERM to {}", self.name))?;
        let asked = Instant::now();
        while asked.elapsed() < STOP_GRACE {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!(
            "{} did not exit within {STOP_GRACE:?} of SIGTERM; killed",
            self.name
        )
    }
}

/// The edge-host binary beside this one (both build into `target/release`).
///
/// # Errors
/// When it is not there.
pub fn host_binary() -> anyhow::Result<PathBuf> {
    sibling_binary("edge-host")
}

/// The edge-hub binary beside this one.
///
/// # Errors
/// When it is not there.
pub fn hub_binary() -> anyhow::Result<PathBuf> {
    sibling_binary("edge-hub")
}

/// The binary of package `name` beside this one (they build into one folder).
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let binary = std::env::current_exe()
        .context("finding the edge-bench binary")?
        .with_file_name(name);
    if !binary.is_file() {
        bail!(
            "{} is missing: build it beside edge-bench first with \
             `cargo build --release -p edge-bench -p edge-host -p edge-hub`",
            binary.display()
        );
    }
    Ok(binary)
}

/// The CPU time (user + system, all threads) process `pid` has used, from
/// `/proc/PID/stat`.
///
/// # Errors
/// When the file cannot be read or parsed.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields
    // after its closing parenthesis, where field 3 (state) is the first.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("field {n} of {path}"))
    };
    // Fields 14 and 15: utime and stime, in clock ticks.
    let ticks = field(14)? + field(15)?;
    Ok(Duration::from_secs_f64(
        ticks as f64 / rustix::param::clock_ticks_per_second() as f64,
    ))
}

/// The share (0–1) of all CPUs that was busy over `window`, from `/proc/stat`: how
/// much else runs on the machine, measured before a benchmark starts anything.
///
/// # Errors
/// When `/proc/stat` cannot be read or parsed.
pub fn machine_busy(window: Duration) -> anyhow::Result<f64> {
    let (busy_before, total_before) = cpu_counters()?;
    std::thread::sleep(window);
    let (busy_after, total_after) = cpu_counters()?;
    let total = total_after.saturating_sub(total_before).max(1);
    Ok(busy_after.saturating_sub(busy_before) as f64 / total as f64)
}

/// The CPUs this process may run on (its affinity, which the processes it starts
/// inherit, as `taskset` sets it) and the CPUs the machine has online, when fewer may
/// be used than are there.
pub fn cpus_confined() -> Option<(usize, usize)> {
    let allowed = std::thread::available_parallelism().ok()?.get();
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let online = stat
        .lines()
        .filter(|line| {
            line.starts_with("cpu") && line.as_bytes().get(3).is_some_and(u8::is_ascii_digit)
        })
        .count();
    (allowed < online).then_some((allowed, online))
}

/// Busy and total clock ticks of all CPUs since boot (the `cpu` line of `/proc/stat`;
/// idle and iowait are not busy).
fn cpu_counters() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .filter_map(|value| value.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user already).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Ok((total.saturating_sub(idle), total))
}

/// What edge-hub relays to.
#[derive(Debug, Clone, Copy)]
pub enum Backend<'a> {
    /// An MQTT broker of the run's.
    Broker(&'a BrokerUrl),
    /// Its own embedded broker, listening on this address (its default path).
    Embedded(SocketAddr),
}

/// Measures how busy the machine is for a second and warns on stderr when other work
/// would make the figures noisy; returns the busy share for the report.
///
/// # Errors
/// When `/proc/stat` cannot be read.
pub fn check_quiet() -> anyhow::Result<f64> {
    let busy = machine_busy(Duration::from_secs(1))?;
    if busy > 0.2 {
        eprintln!(
            "warning: {:.0}% of the CPUs were busy before the benchmark started: other work \
             on the machine makes the figures noisy and slow; run it on a quiet machine",
            busy * 100.0
        );
    }
    Ok(busy)
}
