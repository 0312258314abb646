//! From files to handler versions: the [`Loader`] brings the registry in line with the
//! handlers folder, comparing every `*.wasm` (and its sidecar `NAME.toml`) with what
//! was last loaded by content digest.
//!
//! A sync looks at the whole folder, so a missed, doubled or reordered event changes
//! nothing: only a file whose content differs from what was last loaded is loaded
//! again, and only a file that is gone is unregistered. A half-written file fails to
//! load and leaves the last good version serving until the rest arrives.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

use crate::config::HandlerSettings;
use crate::registry::{Change, Fingerprint, HandlerVersion, Registry};
use crate::sandbox::{HandlerContext, Sandbox};

/// Loads handler files into the registry.
pub struct Loader {
    /// The sandbox to compile in.
    pub sandbox: Arc<Sandbox>,
    /// The handlers folder.
    pub dir: PathBuf,
    /// The device id handlers see.
    pub device_id: String,
    /// Settings of handlers whose sidecar does not set them.
    pub defaults: HandlerSettings,
    /// The longest a call may run when a handler's sidecar does not say.
    pub call_timeout: Duration,
}

impl Loader {
    /// Loads every new or changed handler file in the folder and unregisters the ones
    /// that are gone. Blocks while compiling: run it off the async threads.
    ///
    /// # Errors
    /// When the folder cannot be read; the registry is then left as it was.
    pub fn sync(&self, registry: &Registry) -> anyhow::Result<()> {
        let paths = handler_files(&self.dir)?;
        let present: Vec<String> = paths.iter().map(|path| file_name(path)).collect();
        for (path, file) in paths.iter().zip(&present) {
            self.sync_file(registry, path, file);
        }
        for file in registry.files() {
            if !present.contains(&file) {
                registry.apply(&file, Change::Removed).ok();
                tracing::info!(handler = %file, "handler removed; its methods answer 404");
            }
        }
        Ok(())
    }

    fn sync_file(&self, registry: &Registry, path: &Path, file: &str) {
        let sidecar_path = path.with_extension("toml");
        let (wasm, sidecar) = match read_sources(path, &sidecar_path) {
            Ok(sources) => sources,
            // Gone between listing and reading, or unreadable: the next event tells.
            Err(error) => {
                tracing::debug!(handler = %file, %error, "handler file not readable now");
                return;
            }
        };
        let fingerprint = Fingerprint {
            wasm: digest(&wasm),
            sidecar: sidecar.as_deref().map(|text| digest(text.as_bytes())),
        };
        if registry.fingerprint(file).as_ref() == Some(&fingerprint) {
            return;
        }
        let started = Instant::now();
        match self.load(file, &wasm, sidecar.as_deref(), &sidecar_path, &fingerprint) {
            Ok(version) => {
                let label = version.label();
                let methods: Vec<String> = version
                    .method_names()
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
                match registry.apply(file, Change::Loaded(fingerprint, Box::new(version))) {
                    Ok(()) => tracing::info!(
                        handler = %label, ?methods, load_ms = started.elapsed().as_millis(),
                        "handler loaded"
                    ),
                    Err(why) => {
                        tracing::error!(handler = %label, error = %why, "handler refused; the last good version serves")
                    }
                }
            }
            Err(error) => {
                let why = format!("{error:#}");
                tracing::error!(handler = %file, error = %why, "handler failed to load; the last good version (if any) serves");
                registry.apply(file, Change::Failed(fingerprint, why)).ok();
            }
        }
    }

    fn load(
        &self,
        file: &str,
        wasm: &[u8],
        sidecar: Option<&str>,
        sidecar_path: &Path,
        fingerprint: &Fingerprint,
    ) -> anyhow::Result<HandlerVersion> {
        let settings = match sidecar {
            Some(text) => HandlerSettings::parse_sidecar(text, &self.defaults)
                .with_context(|| format!("invalid sidecar {}", sidecar_path.display()))?,
            None => self.defaults.clone(),
        };
        let context = HandlerContext {
            file: file.to_owned(),
            device_id: self.device_id.clone(),
            config: settings.config,
            max_memory: settings.max_memory,
            grants: settings.grants,
            reuse: settings.reuse.then_some(settings.reuse_max_calls),
        };
        let code = self.sandbox.load(wasm, &fingerprint.wasm, context)?;
        Ok(HandlerVersion {
            file: file.to_owned(),
            digest: fingerprint.wasm.clone(),
            code,
            timeout: settings
                .timeout_ms
                .map_or(self.call_timeout, Duration::from_millis),
            in_flight: settings
                .max_in_flight
                .map(|limit| Arc::new(tokio::sync::Semaphore::new(limit))),
            max_in_flight: settings.max_in_flight,
        })
    }
}

/// Reads a handler file and its sidecar (none when it does not exist).
fn read_sources(path: &Path, sidecar: &Path) -> std::io::Result<(Vec<u8>, Option<String>)> {
    let wasm = std::fs::read(path)?;
    let sidecar = match std::fs::read_to_string(sidecar) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    Ok((wasm, sidecar))
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// The handler files directly in `dir`: `*.wasm`, not hidden, sorted by name.
///
/// # Errors
/// When the folder cannot be read.
pub fn handler_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the handlers folder {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| is_handler_source(path) && path.is_file())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm"))
        .collect();
    files.sort();
    Ok(files)
}

/// Whether a change to `path` can change what serves: a `*.wasm` or a sidecar
/// `*.toml`, not hidden (rsync's and editors' temporary files are).
pub(crate) fn is_handler_source(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .is_none_or(|name| name.to_string_lossy().starts_with('.'));
    !hidden
        && path
            .extension()
            .is_some_and(|ext| ext == "wasm" || ext == "toml")
}

/// A path's file name as text, for logs and the catalog.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_visible_wasm_and_sidecars_matter() {
        assert!(is_handler_source(Path::new("/h/echo.wasm")));
        assert!(is_handler_source(Path::new("/h/echo.toml")));
        assert!(!is_handler_source(Path::new("/h/.echo.wasm.Xy12ab")));
        assert!(!is_handler_source(Path::new("/h/echo.wasm~")));
        assert!(!is_handler_source(Path::new("/h/echo.wasm.part")));
        assert!(!is_handler_source(Path::new("/h/notes.txt")));
    }
}
