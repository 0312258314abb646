//! From files to handler versions: the [`Loader`] brings the registry in line with the
//! handlers folder, comparing every `*.wasm` (and its sidecar `NAME.toml`) with what
//! was last loaded by content digest.
//!
//! A sync looks at the whole folder, so a missed, doubled or reordered event changes
//! nothing: only a file whose content differs from what was last loaded is loaded
//! again, and only a file that is gone is unregistered. A half-written file fails to
//! load and leaves the last good version serving until the rest arrives. What one look
//! finds is applied in one swap ([`Registry::apply`]), so what serves depends on the
//! folder's final state, not on the order the files are visited in.

use std::collections::BTreeSet;
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

/// A loaded version waiting to be applied, and what to log about it.
struct Loaded {
    file: String,
    label: String,
    methods: Vec<String>,
    load_ms: u128,
}

impl Loader {
    /// Brings the registry in line with the folder as it is now, in one swap: every new
    /// or changed handler file is loaded (off the serving path), and every file that is
    /// gone is unregistered. Blocks while compiling: run it off the async threads.
    ///
    /// # Errors
    /// When the folder cannot be read; the registry is then left as it was.
    pub fn sync(&self, registry: &Registry) -> anyhow::Result<()> {
        let paths = handler_files(&self.dir)?;
        let present: BTreeSet<String> = paths.iter().map(|path| file_name(path)).collect();
        let mut changes = Vec::new();
        for file in registry.files() {
            if !present.contains(&file) {
                tracing::info!(handler = %file, "handler removed");
                changes.push((file, Change::Removed));
            }
        }
        let mut loaded = Vec::new();
        for path in &paths {
            let file = file_name(path);
            let started = Instant::now();
            if let Some(change) = self.examine(registry, path, &file) {
                if let Change::Loaded(_, version) = &change {
                    loaded.push(Loaded {
                        file: file.clone(),
                        label: version.label(),
                        methods: version
                            .method_names()
                            .into_iter()
                            .map(str::to_owned)
                            .collect(),
                        load_ms: started.elapsed().as_millis(),
                    });
                }
                changes.push((file, change));
            }
        }
        let refused = registry.apply(changes);
        for Loaded {
            file,
            label,
            methods,
            load_ms,
        } in loaded
        {
            match refused.get(&file) {
                None => tracing::info!(handler = %label, ?methods, load_ms, "handler loaded"),
                Some(why) => tracing::error!(
                    handler = %label, error = %why,
                    "handler refused; it serves once the clash is gone, the last good version meanwhile"
                ),
            }
        }
        Ok(())
    }

    /// What changed about one handler file since the registry last saw it, if anything.
    fn examine(&self, registry: &Registry, path: &Path, file: &str) -> Option<Change> {
        let sidecar_path = path.with_extension("toml");
        let sources = match read_sources(path, &sidecar_path) {
            Ok(sources) => sources,
            // Gone between listing and reading, or unreadable: the next event tells.
            Err(error) => {
                tracing::debug!(handler = %file, %error, "handler file not readable now");
                return None;
            }
        };
        let fingerprint = Fingerprint {
            wasm: digest(&sources.wasm),
            sidecar: sources.sidecar.as_deref().map(digest),
        };
        // Unchanged: serving, failed, or waiting for a clash to clear (the registry
        // serves it then without a new load).
        if registry.fingerprint(file).as_ref() == Some(&fingerprint) {
            return None;
        }
        match self.load(file, &sources, &sidecar_path, &fingerprint) {
            Ok(version) => Some(Change::Loaded(fingerprint, Box::new(version))),
            Err(error) => {
                let why = format!("{error:#}");
                tracing::error!(handler = %file, error = %why, "handler failed to load; the last good version (if any) serves");
                Some(Change::Failed(Some(fingerprint), why))
            }
        }
    }

    fn load(
        &self,
        file: &str,
        sources: &Sources,
        sidecar_path: &Path,
        fingerprint: &Fingerprint,
    ) -> anyhow::Result<HandlerVersion> {
        let settings = match &sources.sidecar {
            Some(bytes) => std::str::from_utf8(bytes)
                .map_err(anyhow::Error::from)
                .and_then(|text| HandlerSettings::parse_sidecar(text, &self.defaults))
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
        let code = self
            .sandbox
            .load(&sources.wasm, &fingerprint.wasm, context)?;
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

/// A handler file's contents and its sidecar's, as read.
struct Sources {
    wasm: Vec<u8>,
    /// None when there is no sidecar.
    sidecar: Option<Vec<u8>>,
}

/// Reads a handler file and its sidecar (none when it does not exist).
fn read_sources(path: &Path, sidecar: &Path) -> std::io::Result<Sources> {
    let wasm = std::fs::read(path)?;
    let sidecar = match std::fs::read(sidecar) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    Ok(Sources { wasm, sidecar })
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
