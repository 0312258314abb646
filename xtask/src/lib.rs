//! The code behind `cargo xtask` that the tests share, so that they build guests and
//! scaffolds exactly as the project's commands do:
//!
//! - [`lang`]: handlers in Python and JavaScript. Their pinned toolchains
//!   (componentize-py in a venv, componentize-js from npm, both under `target/`),
//!   and building a component from sources, cached by the digest of its inputs.
//! - [`scaffold`]: `cargo xtask new NAME --lang rust|python|js`, a standalone handler
//!   folder that builds with one command.
//! - [`guests`]: the Rust guests' target and build command (`cargo xtask handlers` and
//!   testkit's build script).

pub mod guests;
pub mod lang;
pub mod scaffold;

use std::path::{Path, PathBuf};

/// The workspace's root folder.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// Fails with `what` unless `status` is a success.
///
/// # Errors
/// When the process did not exit 0.
pub fn check(status: std::process::ExitStatus, what: &str) -> anyhow::Result<()> {
    if status.success() {
        Ok(())
    } else {
        anyhow::bail!("{what} failed ({status})")
    }
}
