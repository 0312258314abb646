//! `cargo xtask`: the project's tasks, so that a fresh clone needs two commands.
//!
//! - `cargo xtask run [HOST FLAGS]`: builds the example handlers and runs edge-host
//!   with them on its embedded broker (device `my-device`, 127.0.0.1:1883).
//! - `cargo xtask test [CARGO TEST ARGS]`: installs Mosquitto if it is missing (Debian)
//!   and the Azure IoT SDKs for Python (a venv in `target/pyenv`, for edge-hub's tests),
//!   then runs the whole test suite.
//! - `cargo xtask handlers`: only builds the example handlers into `target/handlers/`.
//! - `cargo xtask hub [HUB FLAGS]`: runs edge-hub (a local IoT Hub) with an edge-host
//!   serving the example handlers as `my-device` on the hub's embedded broker.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};

/// The example handlers: packages under `handlers/`.
const HANDLERS: &[&str] = &["device-method", "echo", "device-info"];

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  run [FLAGS]     build the example handlers and run edge-host with them on its
                  embedded broker; FLAGS go to edge-host (see --help there)
  test [ARGS]     install Mosquitto if missing, then run every test; ARGS go to cargo test
  handlers        build the example handlers into target/handlers/
  hub [FLAGS]     run edge-hub (a local IoT Hub) with edge-host my-device behind it on
                  the hub's embedded broker; FLAGS go to edge-hub (see --help there)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("hub") => hub(&args[1..]),
        Some("handlers") => build_handlers().map(|dir| println!("handlers in {}", dir.display())),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown task {other:?}\n\n{USAGE}")),
        None => Err(anyhow::anyhow!("no task given\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root());
    command
}

/// Builds the example handlers for wasm32-wasip2 and copies them, with their sidecars,
/// into `target/handlers/` as `NAME.wasm`.
fn build_handlers() -> anyhow::Result<PathBuf> {
    let target_dir = root().join("target").join("guests");
    let mut build = cargo();
    build
        .args([
            "build",
            "--profile",
            "guest",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target_dir);
    for package in HANDLERS {
        build.args(["-p", package]);
    }
    check(
        build.status().context("running cargo build")?,
        "building the handlers",
    )?;

    let out = root().join("target").join("handlers");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for package in HANDLERS {
        let built = target_dir
            .join("wasm32-wasip2/guest")
            .join(format!("{}.wasm", package.replace('-', "_")));
        let to = out.join(format!("{package}.wasm"));
        std::fs::copy(&built, &to)
            .with_context(|| format!("copying {} to {}", built.display(), to.display()))?;
        let sidecar = root()
            .join("handlers")
            .join(package)
            .join(format!("{package}.toml"));
        if sidecar.is_file() {
            std::fs::copy(&sidecar, out.join(format!("{package}.toml")))
                .with_context(|| format!("copying {}", sidecar.display()))?;
        }
    }
    Ok(out)
}

/// Builds the handlers, then replaces this process with edge-host serving them.
fn run(flags: &[String]) -> anyhow::Result<()> {
    let handlers = build_handlers()?;
    let mut host = cargo();
    host.args(["run", "--package", "edge-host", "--"]);
    if !flags.iter().any(|f| f.starts_with("--device-id"))
        && std::env::var_os("EDGE_DEVICE_ID").is_none()
    {
        host.args(["--device-id", "my-device"]);
    }
    if !flags.iter().any(|f| f.starts_with("--handlers"))
        && std::env::var_os("EDGE_HANDLERS").is_none()
    {
        host.arg("--handlers").arg(&handlers);
    }
    host.args(flags);
    // exec: Ctrl-C then reaches the host alone, which shuts down cleanly.
    Err(host.exec()).context("running edge-host")
}

/// Builds the handlers, edge-hub and edge-host; runs edge-hub (devices on 8883, the
/// service API on 127.0.0.1:8443, the embedded broker on 127.0.0.1:1883) and edge-host
/// `my-device` on that broker, until both stop (Ctrl-C stops both).
fn hub(flags: &[String]) -> anyhow::Result<()> {
    let handlers = build_handlers()?;
    check(
        cargo()
            .args(["build", "-p", "edge-hub", "-p", "edge-host"])
            .status()
            .context("running cargo build")?,
        "building edge-hub and edge-host",
    )?;
    let bin = root().join("target/debug");
    let mut hub = Command::new(bin.join("edge-hub"))
        .args(flags)
        .spawn()
        .context("running edge-hub")?;
    let broker = std::net::SocketAddr::from(([127, 0, 0, 1], 1883));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(broker).is_err() {
        if std::time::Instant::now() > deadline || hub.try_wait()?.is_some() {
            let _ = hub.kill();
            bail!("edge-hub did not start its broker on {broker}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut host = Command::new(bin.join("edge-host"))
        .args([
            "--device-id",
            "my-device",
            "--broker",
            "mqtt://127.0.0.1:1883",
            "--handlers",
        ])
        .arg(&handlers)
        .spawn()
        .context("running edge-host")?;
    let service = Command::new(bin.join("edge-hub"))
        .args(flags)
        .arg("connection-string")
        .output()
        .context("running edge-hub connection-string")?;
    eprintln!(
        "xtask: edge-hub runs, with edge-host my-device behind it. The service connection string:\n{}",
        String::from_utf8_lossy(&service.stdout).trim()
    );
    let hub_status = hub.wait()?;
    let _ = host.wait();
    check(hub_status, "edge-hub")
}

/// Makes sure Mosquitto is there, then runs the test suite.
fn test(args: &[String]) -> anyhow::Result<()> {
    ensure_mosquitto()?;
    ensure_python_sdks()?;
    let mut tests = cargo();
    tests.arg("test").args(args);
    check(tests.status().context("running cargo test")?, "the tests")
}

/// Installs Debian's Mosquitto when it is missing and this user can.
fn ensure_mosquitto() -> anyhow::Result<()> {
    let found = [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .any(|path| Path::new(path).is_file())
        || std::env::var_os("MOSQUITTO").is_some();
    if found {
        return Ok(());
    }
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"));
    if !root_user || !Path::new("/usr/bin/apt-get").is_file() {
        bail!(
            "the tests need Mosquitto: install it (Debian/Ubuntu: `sudo apt-get install -y mosquitto`) \
             or point MOSQUITTO at its binary"
        );
    }
    eprintln!("xtask: Mosquitto is missing; installing Debian's package");
    check(
        Command::new("apt-get").args(["update", "-qq"]).status()?,
        "apt-get update",
    )?;
    check(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "mosquitto"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?,
        "apt-get install mosquitto",
    )
}

/// The Azure IoT SDKs for Python that edge-hub's tests run as peers, pinned.
const PYTHON_SDKS: &[&str] = &[
    "azure-iot-device==2.14.0",
    "azure-iot-hub==2.7.0",
    // azure-iot-hub imports six without declaring it.
    "six==1.17.0",
];

/// Makes a Python venv at target/pyenv with the Azure IoT SDKs, unless EDGE_PYTHON
/// names an interpreter or the venv already has them.
fn ensure_python_sdks() -> anyhow::Result<()> {
    if std::env::var_os("EDGE_PYTHON").is_some() {
        return Ok(());
    }
    let venv = root().join("target/pyenv");
    let python = venv.join("bin/python");
    let has_sdks = |python: &Path| {
        Command::new(python)
            .args(["-c", "import azure.iot.device, azure.iot.hub"])
            .output()
            .is_ok_and(|out| out.status.success())
    };
    if has_sdks(&python) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing the Azure IoT SDKs for Python into {}",
        venv.display()
    );
    check(
        Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .context("running python3 -m venv (edge-hub's tests need Python 3 with venv)")?,
        "python3 -m venv",
    )?;
    check(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet"])
            .args(PYTHON_SDKS)
            .status()
            .context("running pip")?,
        "pip install of the Azure IoT SDKs",
    )
}

fn check(status: std::process::ExitStatus, what: &str) -> anyhow::Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("{what} failed ({status})")
    }
}
