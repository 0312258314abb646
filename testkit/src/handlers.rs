//! Guest components built by this crate's build script, and temporary handler
//! folders holding copies of them.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tempfile::TempDir;

/// The path of a built guest component, by package name (`echo`, `misbehave`, ...).
pub fn guest(package: &str) -> PathBuf {
    Path::new(env!("EDGE_GUESTS_DIR")).join(format!("{}.wasm", package.replace('-', "_")))
}

/// A temporary handlers folder holding copies of built guests.
pub struct HandlerDir {
    dir: TempDir,
}

impl HandlerDir {
    /// A folder with each named guest as `NAME.wasm`.
    ///
    /// # Errors
    /// When a guest is not built or cannot be copied.
    pub fn with(packages: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("creating a handlers folder")?;
        let this = Self { dir };
        for package in packages {
            this.add(package)?;
        }
        Ok(this)
    }

    /// Copies guest `package` in as `NAME.wasm`.
    ///
    /// # Errors
    /// When the guest is not built or cannot be copied.
    pub fn add(&self, package: &str) -> anyhow::Result<PathBuf> {
        let to = self.path().join(format!("{package}.wasm"));
        std::fs::copy(guest(package), &to)
            .with_context(|| format!("copying guest {package} to {}", to.display()))?;
        Ok(to)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}
