//! `cargo xtask new NAME --lang rust|python|js [--dir PATH]`: a standalone handler
//! folder, outside any workspace, that builds to a component with one command.
//!
//! Every scaffold holds a copy of `wit/handler.wit` (so it needs nothing from this
//! repository), a handler serving one method named `NAME` that uses `log`,
//! `device-id` and `config-get`, a sidecar `NAME.toml`, a README and a `.gitignore`.
//! The templates are in `xtask/templates/`; the JavaScript one shares its build script
//! and lock file with the example `handlers/sensor-js`, and the Python one its pin of
//! componentize-py with `handlers/greeter-py`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// The language of a scaffold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    /// Rust with wit-bindgen, built by cargo for wasm32-wasip2.
    Rust,
    /// Python, built by componentize-py.
    Python,
    /// JavaScript, built by componentize-js.
    Js,
}

impl std::str::FromStr for Language {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "rust" | "rs" => Ok(Self::Rust),
            "python" | "py" => Ok(Self::Python),
            "js" | "javascript" => Ok(Self::Js),
            other => bail!("unknown language {other:?}: rust, python or js"),
        }
    }
}

/// A scaffold made by [`new`].
#[derive(Debug, Clone)]
pub struct Scaffold {
    /// Its folder.
    pub dir: PathBuf,
    /// The one command that builds it, run in its folder.
    pub build: &'static [&'static str],
    /// Where that command writes the component, from the folder.
    pub wasm: PathBuf,
}

const WIT: &str = include_str!("../../wit/handler.wit");
const SIDECAR: &str = include_str!("../templates/common-sidecar.toml");
const PY_PIN: &str = include_str!("../../handlers/greeter-py/build-requirements.txt");
const JS_BUILD: &str = include_str!("../../handlers/sensor-js/build.mjs");
const JS_LOCK: &str = include_str!("../../handlers/sensor-js/package-lock.json");

/// Makes a handler named `name` in `lang` in the folder `dir`, which must not exist
/// yet (or be empty).
///
/// # Errors
/// When `name` is not a valid handler name (lowercase letters, digits and `-`,
/// starting with a letter, at most 64 characters), `dir` exists and is not an empty
/// folder, or a file cannot be written.
pub fn new(name: &str, lang: Language, dir: &Path) -> anyhow::Result<Scaffold> {
    check_name(name)?;
    if dir.exists() {
        let empty = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none());
        if !empty {
            bail!(
                "{} already exists: the scaffold never overwrites anything; pick another NAME or --dir",
                dir.display()
            );
        }
    }
    let crate_name = name.replace('-', "_");
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{crate}}", &crate_name)
            .replace("{{componentize_py}}", componentize_py_version())
    };
    let mut files: Vec<(&str, String)> = vec![
        ("wit/handler.wit", WIT.to_owned()),
        ("SIDECAR", fill(SIDECAR)),
    ];
    let scaffold = match lang {
        Language::Rust => {
            files.extend([
                (
                    "Cargo.toml",
                    fill(include_str!("../templates/rust/Cargo.toml")),
                ),
                ("src/lib.rs", fill(include_str!("../templates/rust/lib.rs"))),
                (
                    "README.md",
                    fill(include_str!("../templates/rust/README.md")),
                ),
                (
                    ".gitignore",
                    include_str!("../templates/rust/gitignore").to_owned(),
                ),
            ]);
            Scaffold {
                dir: dir.to_owned(),
                build: &["cargo", "build", "--release", "--target", "wasm32-wasip2"],
                wasm: Path::new("target/wasm32-wasip2/release").join(format!("{crate_name}.wasm")),
            }
        }
        Language::Python => {
            files.extend([
                ("app.py", fill(include_str!("../templates/python/app.py"))),
                (
                    "build.sh",
                    fill(include_str!("../templates/python/build.sh")),
                ),
                (
                    "README.md",
                    fill(include_str!("../templates/python/README.md")),
                ),
                (
                    ".gitignore",
                    include_str!("../templates/python/gitignore").to_owned(),
                ),
            ]);
            Scaffold {
                dir: dir.to_owned(),
                build: &["./build.sh"],
                wasm: PathBuf::from(format!("{name}.wasm")),
            }
        }
        Language::Js => {
            files.extend([
                (
                    "handler.js",
                    fill(include_str!("../templates/js/handler.js")),
                ),
                (
                    "package.json",
                    fill(include_str!("../templates/js/package.json")),
                ),
                ("package-lock.json", js_lock(name)),
                ("build.mjs", JS_BUILD.to_owned()),
                ("README.md", fill(include_str!("../templates/js/README.md"))),
                (
                    ".gitignore",
                    include_str!("../templates/js/gitignore").to_owned(),
                ),
            ]);
            Scaffold {
                dir: dir.to_owned(),
                build: &["npm", "run", "build"],
                wasm: PathBuf::from(format!("{name}.wasm")),
            }
        }
    };
    for (file, contents) in files {
        let file = if file == "SIDECAR" {
            format!("{name}.toml")
        } else {
            file.to_owned()
        };
        let path = dir.join(&file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    }
    if lang == Language::Python {
        make_executable(&dir.join("build.sh"))?;
    }
    Ok(scaffold)
}

/// Handler names become file, crate, package and method names: keep them plain.
fn check_name(name: &str) -> anyhow::Result<()> {
    let plain = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !plain {
        bail!(
            "invalid handler name {name:?}: lowercase letters, digits and `-`, starting with a letter \
             (it names the folder, the .wasm, the package and the method)"
        );
    }
    Ok(())
}

/// The componentize-py version pinned for the examples (`componentize-py==X`).
fn componentize_py_version() -> &'static str {
    PY_PIN
        .lines()
        .find_map(|line| line.trim().strip_prefix("componentize-py=="))
        .unwrap_or("0.25.1")
}

/// The example's lock file, renamed for the scaffold: the same pinned componentize-js.
fn js_lock(name: &str) -> String {
    JS_LOCK.replace("\"name\": \"sensor-js\"", &format!("\"name\": \"{name}\""))
}

fn make_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut permissions = std::fs::metadata(path)?.permissions();
    permissions.set_mode(0o755);
    std::fs::set_permissions(path, permissions)
        .with_context(|| format!("making {} executable", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_break_a_file_crate_or_method_name_are_refused() {
        for bad in ["", "Caps", "1st", "a b", "a/b", "trailing-", "under_score"] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        check_name("my-handler2").expect("a plain name");
    }

    #[test]
    fn a_scaffold_never_overwrites_a_folder_that_has_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("keep.txt"), "mine").expect("write");
        let error = new("keep", Language::Python, dir.path()).expect_err("refused");
        assert!(error.to_string().contains("never overwrites"), "{error}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("keep.txt")).expect("kept"),
            "mine"
        );
    }

    #[test]
    fn the_python_pin_and_the_js_lock_carry_over_to_the_scaffolds() {
        assert!(
            PY_PIN.contains(&format!("componentize-py=={}\n", componentize_py_version())),
            "the pin file names no version: {PY_PIN}"
        );
        let lock = js_lock("my-thing");
        assert!(lock.contains("\"name\": \"my-thing\""), "{lock:.200}");
        assert!(!lock.contains("sensor-js"));
        assert!(lock.contains("\"node_modules/@bytecodealliance/componentize-js\""));
    }
}
