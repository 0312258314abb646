//! `cargo xtask`: the project's tasks, so that a fresh clone needs two commands.
//!
//! - `cargo xtask run [HOST FLAGS]`: builds the example handlers and runs edge-host
//!   with them on its embedded broker (device `my-device`, 127.0.0.1:1883).
//! - `cargo xtask test [CARGO TEST ARGS]`: installs Mosquitto if it is missing (Debian)
//!   and the Azure IoT SDKs for Python (a venv in `target/pyenv`, for edge-hub's tests),
//!   then runs the whole test suite.
//! - `cargo xtask handlers`: only builds the example handlers into `target/handlers/`.
//! - `cargo xtask toolchains`: installs the pinned Python and JavaScript handler
//!   toolchains under `target/` ([`xtask::lang`]).
//! - `cargo xtask new NAME --lang rust|python|js [--dir PATH]`: a standalone handler
//!   folder that builds with one command ([`xtask::scaffold`]).
//! - `cargo xtask hub [HUB FLAGS]`: runs edge-hub (a local IoT Hub) with an edge-host
//!   serving the example handlers as `my-device` on the hub's embedded broker.
//!
//! Each task that builds guests first makes sure the `wasm32-wasip2` target is installed
//! (see [`ensure_wasm_target`]): rustup installs the targets of `rust-toolchain.toml`
//! only when it installs the toolchain itself, so a machine that already had stable has
//! no wasm target until someone adds it.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use xtask::guests::{self, WASM_TARGET};

/// The example handlers: packages under `handlers/`.
const HANDLERS: &[&str] = &["device-method", "echo", "device-info"];

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  run [FLAGS]     build the example handlers and run edge-host with them on its
                  embedded broker; FLAGS go to edge-host (see --help there)
  test [ARGS]     install Mosquitto if missing, then run every test; ARGS go to cargo test
  handlers        build the example handlers into target/handlers/
  hub [FLAGS]     run edge-hub (a local IoT Hub) with edge-host my-device behind it on
                  the hub's embedded broker; FLAGS go to edge-hub (see --help there)
  toolchains      install the pinned Python and JavaScript handler toolchains (under target/)
  new NAME --lang rust|python|js [--dir PATH]
                  make a standalone handler folder (default ./NAME) that builds with one command";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("hub") => hub(&args[1..]),
        Some("handlers") => build_handlers().map(|dir| println!("handlers in {}", dir.display())),
        Some("toolchains") => xtask::lang::install_all(&root()),
        Some("new") => new(&args[1..]),
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
    xtask::root()
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root());
    command
}

/// Builds the example handlers for wasm32-wasip2 and copies them, with their sidecars,
/// into `target/handlers/` as `NAME.wasm`.
fn build_handlers() -> anyhow::Result<PathBuf> {
    ensure_wasm_target()?;
    check(
        guests::build_command(&root(), HANDLERS)
            .status()
            .context("running cargo build")?,
        "building the handlers",
    )?;

    let out = root().join("target").join("handlers");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for package in HANDLERS {
        let built = guests::out_dir(&root()).join(format!("{}.wasm", package.replace('-', "_")));
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
    // The handlers in other languages than Rust: Python and JavaScript.
    xtask::lang::build_examples(&root(), &out)?;
    Ok(out)
}

/// `new NAME --lang rust|python|js [--dir PATH]`: makes a standalone handler folder.
fn new(args: &[String]) -> anyhow::Result<()> {
    let mut name = None;
    let mut lang = None;
    let mut dir = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        match arg.as_str() {
            "--lang" => lang = Some(value("--lang")?.parse::<xtask::scaffold::Language>()?),
            "--dir" => dir = Some(PathBuf::from(value("--dir")?)),
            flag if flag.starts_with('-') => bail!("unknown flag {flag:?}\n\n{USAGE}"),
            _ if name.is_none() => name = Some(arg.clone()),
            extra => bail!("unexpected argument {extra:?}\n\n{USAGE}"),
        }
    }
    let name = name.with_context(|| format!("new: no NAME given\n\n{USAGE}"))?;
    let lang =
        lang.with_context(|| format!("new: --lang rust|python|js is required\n\n{USAGE}"))?;
    let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
    let scaffold = xtask::scaffold::new(&name, lang, &dir)?;
    println!(
        "made {}: build it with `cd {} && {}`, which writes {}",
        scaffold.dir.display(),
        scaffold.dir.display(),
        scaffold.build.join(" "),
        scaffold.wasm.display()
    );
    Ok(())
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
/// service API on 127.0.0.1:8443, the embedded broker on 127.0.0.1:1883 unless `flags`
/// say otherwise) and edge-host `my-device` on that broker, until both stop (Ctrl-C
/// stops both).
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
    let broker = listen_flag(flags)?;
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
            &format!("mqtt://{broker}"),
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

/// Where edge-hub's embedded broker listens given the hub's `flags`: `--listen ADDR`
/// (or `--listen=ADDR`), else `EDGE_LISTEN`, else 127.0.0.1:1883.
fn listen_flag(flags: &[String]) -> anyhow::Result<std::net::SocketAddr> {
    let given = flags
        .iter()
        .position(|flag| flag == "--listen")
        .and_then(|at| flags.get(at + 1).cloned())
        .or_else(|| {
            flags
                .iter()
                .find_map(|flag| flag.strip_prefix("--listen=").map(str::to_owned))
        })
        .or_else(|| std::env::var("EDGE_LISTEN").ok());
    match given {
        Some(addr) => addr
            .parse()
            .with_context(|| format!("--listen {addr}: not an address such as 127.0.0.1:1883")),
        None => Ok(std::net::SocketAddr::from(([127, 0, 0, 1], 1883))),
    }
}

/// Makes sure Mosquitto is there, then runs the test suite.
fn test(args: &[String]) -> anyhow::Result<()> {
    ensure_mosquitto()?;
    // testkit's build script builds every guest for the wasm target, and the Python
    // and JavaScript tests build theirs with these toolchains.
    ensure_wasm_target()?;
    xtask::lang::install_all(&root())?;
    ensure_python_sdks()?;
    let mut tests = cargo();
    tests.arg("test").args(args);
    check(tests.status().context("running cargo test")?, "the tests")
}

/// Adds the `wasm32-wasip2` target to the project's toolchain when it is missing.
///
/// rustup runs in the workspace root, so it acts on the toolchain `rust-toolchain.toml`
/// names, the one cargo builds with. Without rustup (a distribution's Rust, say) the
/// target's standard library is looked for where rustc keeps it, and when it is not
/// there the error says what to install.
///
/// # Errors
/// When the target is missing and cannot be added.
fn ensure_wasm_target() -> anyhow::Result<()> {
    let listed = Command::new("rustup")
        .current_dir(root())
        .args(["target", "list", "--installed"])
        .output();
    match listed {
        Ok(out) if out.status.success() => {
            if lists_target(&String::from_utf8_lossy(&out.stdout), WASM_TARGET) {
                return Ok(());
            }
            eprintln!(
                "xtask: the {WASM_TARGET} target is missing; adding it (rustup target add {WASM_TARGET})"
            );
            let added = Command::new("rustup")
                .current_dir(root())
                .args(["target", "add", WASM_TARGET])
                .status()
                .context("running rustup target add")?;
            check(added, &format!("rustup target add {WASM_TARGET}"))
        }
        Ok(out) => bail!(
            "`rustup target list --installed` failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            missing_target_help()
        ),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            if guests::rustc_has_target(&root(), WASM_TARGET) {
                Ok(())
            } else {
                bail!("{}", missing_target_help())
            }
        }
        Err(error) => Err(error).context("running rustup"),
    }
}

/// What to do when the wasm target is missing and this program cannot add it.
fn missing_target_help() -> String {
    format!(
        "the {WASM_TARGET} target is not installed for this toolchain, and the handlers are built for it. \
         With rustup: `rustup target add {WASM_TARGET}`. Without rustup: install your Rust \
         distribution's standard library for {WASM_TARGET} (or install Rust with rustup, \
         https://rustup.rs), then run this again."
    )
}

/// Whether `rustup target list --installed` output lists `target`.
fn lists_target(output: &str, target: &str) -> bool {
    output.lines().any(|line| line.trim() == target)
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

/// The Azure IoT SDKs for Python that edge-hub's tests run as peers, pinned there.
const PYTHON_SDKS: &str = "hub/tests/python/requirements.txt";

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
            .args(["install", "--quiet", "-r"])
            .arg(root().join(PYTHON_SDKS))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hubs_broker_address_is_read_from_its_listen_flag() {
        let flags = |args: &[&str]| args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        let addr = |a: &str| a.parse::<std::net::SocketAddr>().expect("an address");
        let spaced = flags(&["--data-dir", "/tmp/d", "--listen", "127.0.0.1:21883"]);
        assert_eq!(
            listen_flag(&spaced).expect("parses"),
            addr("127.0.0.1:21883")
        );
        let joined = flags(&["--listen=127.0.0.1:21884"]);
        assert_eq!(
            listen_flag(&joined).expect("parses"),
            addr("127.0.0.1:21884")
        );
        let error = listen_flag(&flags(&["--listen", "nowhere"])).expect_err("not an address");
        assert!(error.to_string().contains("nowhere"), "{error}");
    }

    #[test]
    fn the_wasm_target_is_found_only_as_a_whole_line_of_rustups_list() {
        let installed = "wasm32-wasip2\nx86_64-unknown-linux-gnu\n";
        assert!(lists_target(installed, "wasm32-wasip2"));
        assert!(!lists_target("x86_64-unknown-linux-gnu\n", "wasm32-wasip2"));
        assert!(!lists_target("wasm32-wasip2-threads\n", "wasm32-wasip2"));
        assert!(!lists_target("", "wasm32-wasip2"));
        // Windows line ends and stray blanks do not hide it.
        assert!(lists_target(
            "x86_64-pc-windows-msvc\r\nwasm32-wasip2\r\n",
            "wasm32-wasip2"
        ));
    }
}
