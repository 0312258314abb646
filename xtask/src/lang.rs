//! Handlers in Python and JavaScript: their toolchains and their builds.
//!
//! The toolchains are pinned and live under `target/`, apart from anything installed
//! on the machine: componentize-py (pinned in `handlers/greeter-py/build-requirements.txt`)
//! in the venv `target/pyenv-handlers`, and componentize-js (pinned by
//! `handlers/sensor-js/package-lock.json`) installed with `npm ci` in
//! `target/jsenv-handlers`, beside the build script every JavaScript guest is built
//! with (`handlers/sensor-js/build.mjs`). [`Toolchain::install`] installs what is
//! missing or outdated; [`Toolchain::find`] only looks, and says how to install.
//!
//! Builds are cached in `target/lang-guests/`: a component is rebuilt only when a
//! digest of its inputs (its sources, the WIT, the toolchain's pin, the build script)
//! changed, since componentize-py and componentize-js take 10-20 s each.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

use crate::check;

/// The language a guest is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// Python, built with componentize-py; the module `app` defines `Handler`.
    Python,
    /// JavaScript, built with componentize-js; `handler.js` exports `handler`.
    Js,
}

impl Lang {
    /// How people call the language.
    pub fn label(self) -> &'static str {
        match self {
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
        }
    }
}

/// A guest component written in Python or JavaScript.
#[derive(Debug, Clone, Copy)]
pub struct Guest {
    /// Its name: the component is built as `NAME.wasm`.
    pub name: &'static str,
    /// Its language.
    pub lang: Lang,
    /// The folder of its sources, from the workspace root.
    pub dir: &'static str,
}

/// The example handlers in Python and JavaScript, served by `cargo xtask run`.
pub const EXAMPLES: &[Guest] = &[
    Guest {
        name: "greeter-py",
        lang: Lang::Python,
        dir: "handlers/greeter-py",
    },
    Guest {
        name: "sensor-js",
        lang: Lang::Js,
        dir: "handlers/sensor-js",
    },
];

/// The test fixtures in Python and JavaScript, which misbehave on purpose.
pub const FIXTURES: &[Guest] = &[
    Guest {
        name: "py-misbehave",
        lang: Lang::Python,
        dir: "testkit/fixtures/py-misbehave",
    },
    Guest {
        name: "js-misbehave",
        lang: Lang::Js,
        dir: "testkit/fixtures/js-misbehave",
    },
];

/// The guest called `name`, among the examples and the fixtures.
pub fn guest(name: &str) -> Option<&'static Guest> {
    EXAMPLES.iter().chain(FIXTURES).find(|g| g.name == name)
}

/// The venv holding componentize-py, from the workspace root.
pub const PY_ENV: &str = "target/pyenv-handlers";
/// The npm folder holding componentize-js and the build script, from the root.
pub const JS_ENV: &str = "target/jsenv-handlers";
/// The file pinning componentize-py, from the root.
pub const PY_PIN: &str = "handlers/greeter-py/build-requirements.txt";
/// The npm package whose lock file pins componentize-js and whose `build.mjs` builds
/// every JavaScript guest, from the root.
pub const JS_PACKAGE: &str = "handlers/sensor-js";
/// Where built components are cached, from the root.
pub const OUT: &str = "target/lang-guests";

/// The name of the file, in a toolchain's folder, that says which pin it installed.
const STAMP: &str = ".edge-pin";

/// An installed toolchain for one language.
#[derive(Debug, Clone)]
pub struct Toolchain {
    lang: Lang,
    /// The venv (Python) or npm folder (JavaScript).
    dir: PathBuf,
    /// What it was installed from: the pin's digest, part of every build's digest.
    pin: String,
}

impl Toolchain {
    /// The toolchain for `lang`, if it is installed and matches its pin.
    ///
    /// # Errors
    /// When it is missing or outdated: the message names the command that installs it.
    pub fn find(root: &Path, lang: Lang) -> anyhow::Result<Self> {
        let toolchain = Self::expected(root, lang)?;
        if toolchain.is_installed() {
            return Ok(toolchain);
        }
        let (what, dir) = match lang {
            Lang::Python => (
                "componentize-py (pinned in handlers/greeter-py/build-requirements.txt)",
                PY_ENV,
            ),
            Lang::Js => (
                "componentize-js (pinned in handlers/sensor-js/package-lock.json)",
                JS_ENV,
            ),
        };
        bail!(
            "the {} handlers' toolchain is not installed: {what} is missing or outdated in {dir}. \
             Install it with `cargo xtask toolchains` (needs {}); `cargo xtask test`, \
             `cargo xtask handlers` and .ci/run install it too",
            lang.label(),
            match lang {
                Lang::Python => "python3 with venv and pip, and PyPI",
                Lang::Js => "Node.js 18+ with npm, and the npm registry",
            }
        )
    }

    /// The toolchain for `lang`, installed first when it is missing or outdated.
    ///
    /// # Errors
    /// When Python (with venv) or Node.js (with npm) is missing, or the install fails.
    pub fn install(root: &Path, lang: Lang) -> anyhow::Result<Self> {
        let toolchain = Self::expected(root, lang)?;
        if toolchain.is_installed() {
            return Ok(toolchain);
        }
        eprintln!(
            "xtask: installing the {} handlers' toolchain into {}",
            lang.label(),
            toolchain.dir.display()
        );
        std::fs::remove_file(toolchain.dir.join(STAMP)).ok();
        match lang {
            Lang::Python => toolchain.install_python(root)?,
            Lang::Js => toolchain.install_js(root)?,
        }
        std::fs::write(toolchain.dir.join(STAMP), &toolchain.pin)
            .with_context(|| format!("writing {}", toolchain.dir.join(STAMP).display()))?;
        Ok(toolchain)
    }

    fn expected(root: &Path, lang: Lang) -> anyhow::Result<Self> {
        let (dir, pins): (&str, &[&str]) = match lang {
            Lang::Python => (PY_ENV, &[PY_PIN]),
            Lang::Js => (
                JS_ENV,
                &[
                    "handlers/sensor-js/package.json",
                    "handlers/sensor-js/package-lock.json",
                ],
            ),
        };
        let mut pin = Sha256::new();
        for file in pins {
            let path = root.join(file);
            pin.update(
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
            );
        }
        Ok(Self {
            lang,
            dir: root.join(dir),
            pin: hex(&pin.finalize()),
        })
    }

    fn is_installed(&self) -> bool {
        let tool = match self.lang {
            Lang::Python => self.componentize_py(),
            Lang::Js => self
                .dir
                .join("node_modules/@bytecodealliance/componentize-js/package.json"),
        };
        tool.is_file()
            && std::fs::read_to_string(self.dir.join(STAMP)).is_ok_and(|stamp| stamp == self.pin)
            && (self.lang == Lang::Python || self.dir.join("build.mjs").is_file())
    }

    fn install_python(&self, root: &Path) -> anyhow::Result<()> {
        let python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
        let venv = Command::new(&python)
            .args(["-m", "venv", "--clear"])
            .arg(&self.dir)
            .status();
        match venv {
            Ok(status) if status.success() => {}
            other => bail!(
                "making a venv with `{} -m venv` failed ({other:?}): the Python handlers need \
                 Python 3 with venv and pip (Debian: `apt-get install -y python3-venv`), or \
                 PYTHON naming such an interpreter",
                python.to_string_lossy()
            ),
        }
        check(
            Command::new(self.dir.join("bin/pip"))
                .args(["install", "--disable-pip-version-check", "-q", "-r"])
                .arg(root.join(PY_PIN))
                .status()
                .context("running pip")?,
            "installing componentize-py from PyPI",
        )
    }

    fn install_js(&self, root: &Path) -> anyhow::Result<()> {
        let npm_found = Command::new("npm")
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success());
        if !npm_found {
            bail!(
                "npm is not installed: the JavaScript handlers need Node.js 18+ with npm \
                 (Debian: `apt-get install -y nodejs npm`)"
            );
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        for file in ["package.json", "package-lock.json", "build.mjs"] {
            copy_if_changed(&root.join(JS_PACKAGE).join(file), &self.dir.join(file))?;
        }
        check(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&self.dir)
                .status()
                .context("running npm ci")?,
            "installing componentize-js from npm (`npm ci`)",
        )
    }

    /// The componentize-py binary (Python only).
    pub fn componentize_py(&self) -> PathBuf {
        self.dir.join("bin/componentize-py")
    }

    /// The folder holding `node_modules/` (JavaScript) or the venv (Python).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Installs both toolchains when missing or outdated.
///
/// # Errors
/// As [`Toolchain::install`].
pub fn install_all(root: &Path) -> anyhow::Result<()> {
    Toolchain::install(root, Lang::Python)?;
    Toolchain::install(root, Lang::Js)?;
    Ok(())
}

/// One build at a time in a process: tests running in parallel threads ask for the
/// same components.
static BUILDING: Mutex<()> = Mutex::new(());

/// Builds `guest` with `toolchain` (or takes it from `target/lang-guests/` when its
/// inputs are unchanged) and returns the path of its `.wasm`.
///
/// # Errors
/// When the sources cannot be read or the build fails; componentize-py's or
/// componentize-js's own message is on stderr.
pub fn build(root: &Path, guest: &Guest, toolchain: &Toolchain) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        toolchain.lang == guest.lang,
        "{} is {}, not {}",
        guest.name,
        guest.lang.label(),
        toolchain.lang.label()
    );
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(PoisonError::into_inner);
    let sources = root.join(guest.dir);
    let wit = root.join("wit");
    let out_dir = root.join(OUT);
    let out = out_dir.join(format!("{}.wasm", guest.name));
    let stamp = out_dir.join(format!("{}.inputs", guest.name));

    let mut inputs = Sha256::new();
    inputs.update(toolchain.pin.as_bytes());
    digest_tree(&mut inputs, &wit)?;
    digest_tree(&mut inputs, &sources)?;
    if guest.lang == Lang::Js {
        // The build script may change without the pin changing: the toolchain's copy
        // (which runs there, beside node_modules) is kept current here, for every
        // build, whoever asks for it (tests too).
        let script = toolchain.dir.join("build.mjs");
        copy_if_changed(&root.join(JS_PACKAGE).join("build.mjs"), &script)?;
        digest_file(&mut inputs, &script)?;
    }
    let inputs = hex(&inputs.finalize());
    if out.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == inputs) {
        return Ok(out);
    }

    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    std::fs::remove_file(&stamp).ok();
    let partial = out_dir.join(format!(
        "{}.wasm.partial-{}",
        guest.name,
        std::process::id()
    ));
    eprintln!(
        "xtask: building {} ({}), 10-20 s",
        guest.name,
        guest.lang.label()
    );
    let mut command = match guest.lang {
        Lang::Python => {
            // componentize-py writes `__pycache__` beside the modules it imports: build
            // from a copy, so that the source folder stays as it is.
            let staged = out_dir.join(format!("{}.src", guest.name));
            if staged.exists() {
                std::fs::remove_dir_all(&staged)
                    .with_context(|| format!("removing {}", staged.display()))?;
            }
            copy_tree(&sources, &staged)?;
            let mut command = Command::new(toolchain.componentize_py());
            command
                .arg("-d")
                .arg(&wit)
                .args(["-w", "device-handler", "componentize", "-p"])
                .arg(&staged)
                .arg("app")
                .arg("-o")
                .arg(&partial)
                // The component gets the handler's own imports only, not an active venv's.
                .env_remove("VIRTUAL_ENV");
            command
        }
        Lang::Js => {
            let mut command = Command::new("node");
            command
                .arg(toolchain.dir.join("build.mjs"))
                .arg(sources.join("handler.js"))
                .arg(&wit)
                .arg(&partial);
            command
        }
    };
    let status = command
        .current_dir(&out_dir)
        .status()
        .with_context(|| format!("running the {} build of {}", guest.lang.label(), guest.name))?;
    check(status, &format!("building {}", guest.name))?;
    std::fs::rename(&partial, &out).with_context(|| format!("writing {}", out.display()))?;
    std::fs::write(&stamp, &inputs).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(out)
}

/// Builds the example handlers (installing their toolchains when missing) and copies
/// them, with their sidecars, into `out` as `NAME.wasm` and `NAME.toml`.
///
/// # Errors
/// When a toolchain cannot be installed or a build fails.
pub fn build_examples(root: &Path, out: &Path) -> anyhow::Result<()> {
    for guest in EXAMPLES {
        let toolchain = Toolchain::install(root, guest.lang)?;
        let built = build(root, guest, &toolchain)?;
        let to = out.join(format!("{}.wasm", guest.name));
        copy_if_changed(&built, &to)?;
        let sidecar = root.join(guest.dir).join(format!("{}.toml", guest.name));
        if sidecar.is_file() {
            copy_if_changed(&sidecar, &out.join(format!("{}.toml", guest.name)))?;
        }
    }
    Ok(())
}

/// The build inputs in `dir`, sorted by name: everything but what the builds and
/// tools write (`node_modules`, caches, `.wasm`), hidden files, and sidecars, which
/// the host reads, not the build.
fn inputs(dir: &Path) -> anyhow::Result<Vec<std::fs::DirEntry>> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.retain(|entry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        !(name.starts_with('.')
            || name == "node_modules"
            || name == "__pycache__"
            || name.ends_with(".wasm")
            || name.ends_with(".toml"))
    });
    entries.sort_by_key(std::fs::DirEntry::file_name);
    Ok(entries)
}

/// Adds every build input under `dir` to `digest`: names and contents.
fn digest_tree(digest: &mut Sha256, dir: &Path) -> anyhow::Result<()> {
    for entry in inputs(dir)? {
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            digest_tree(digest, &path)?;
        } else {
            digest_file(digest, &path)?;
        }
    }
    Ok(())
}

/// Copies every build input under `from` into `to`.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in inputs(from)? {
        let path = entry.path();
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&path, &target)?;
        } else {
            std::fs::copy(&path, &target)
                .with_context(|| format!("copying {} to {}", path.display(), target.display()))?;
        }
    }
    Ok(())
}

fn digest_file(digest: &mut Sha256, path: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    digest.update(path.file_name().unwrap_or_default().as_encoded_bytes());
    digest.update((bytes.len() as u64).to_le_bytes());
    digest.update(&bytes);
    Ok(())
}

/// Copies `from` to `to` unless `to` already holds the same bytes (so that a watching
/// host does not reload an unchanged handler), through a hidden file renamed into
/// place (so that it never loads half of one).
fn copy_if_changed(from: &Path, to: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    if std::fs::read(to).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let name = to.file_name().unwrap_or_default().to_string_lossy();
    let partial = to.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    std::fs::write(&partial, &bytes).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, to).with_context(|| format!("writing {}", to.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
