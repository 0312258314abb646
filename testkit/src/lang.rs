//! Guests in Python and JavaScript (the examples in `handlers/` and the fixtures in
//! `fixtures/`), built on first use by the same code as `cargo xtask handlers`
//! (`xtask::lang`), cached in `target/lang-guests/` by the digest of their inputs.
//!
//! Their toolchains are not installed here: when one is missing, [`guest`] fails with
//! the command that installs it (`cargo xtask test` and .ci/run install both), so a
//! test that needs it fails rather than passing without running.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::HandlerDir;

/// The path of the built Python or JavaScript guest `name` (`greeter-py`,
/// `sensor-js`, `py-misbehave`, `js-misbehave`), built now unless cached.
///
/// # Errors
/// When its toolchain is not installed, or the build fails.
pub fn guest(name: &str) -> anyhow::Result<PathBuf> {
    let root = xtask::root();
    let guest = xtask::lang::guest(name)
        .with_context(|| format!("no Python or JavaScript guest is called {name:?}"))?;
    let toolchain = xtask::lang::Toolchain::find(&root, guest.lang)?;
    xtask::lang::build(&root, guest, &toolchain)
}

/// A compiled-code cache folder shared by the tests that load these 12-18 MB
/// components, so that each is compiled (seconds) once, not once per test. Entries are
/// checksummed and keyed to the engine, as in production.
pub fn compile_cache() -> PathBuf {
    xtask::root().join(xtask::lang::OUT).join("compiled")
}

impl HandlerDir {
    /// Copies the Python or JavaScript guest `name` in as `NAME.wasm`, building it
    /// first unless cached.
    ///
    /// # Errors
    /// When its toolchain is not installed, the build fails, or the copy fails.
    pub fn add_lang(&self, name: &str) -> anyhow::Result<PathBuf> {
        let built = guest(name)?;
        let to = self.path().join(format!("{name}.wasm"));
        std::fs::copy(&built, &to)
            .with_context(|| format!("copying {} to {}", built.display(), to.display()))?;
        Ok(to)
    }
}
