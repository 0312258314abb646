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
//!
//! A large new component whose optimised code is not cached serves first from a
//! baseline build (see [`crate::sandbox::Tier`]); once applied, it is handed to the
//! [`Optimiser`], which swaps in the optimised build when it is ready.
//!
//! Only regular files (or symlinks to them) are read, each under a size cap
//! ([`MAX_HANDLER_BYTES`], [`MAX_SIDECAR_BYTES`]); anything else named like a handler
//! or a sidecar is reported in the catalog's failures, unread.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

use crate::call::HandlerContext;
use crate::config::HandlerSettings;
use crate::optimiser::{Job, Optimiser};
use crate::registry::{Change, Fingerprint, HandlerVersion, Registry};
use crate::sandbox::{Sandbox, Tier};

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
    /// Builds the optimised code of versions loaded from baseline code.
    pub optimiser: Optimiser,
}

/// The largest handler file read. Components of interpreted languages carry their
/// interpreter: a Python handler is about 18 MB, a JavaScript one 12 MB; 256 MiB leaves
/// room for far larger ones and still stops a file that would exhaust memory.
pub const MAX_HANDLER_BYTES: u64 = 256 * 1024 * 1024;

/// The largest sidecar read: a few settings and config values take a few KiB; a
/// sidecar over 1 MiB is a mistake (or an attack on the catalog) and fails to load.
pub const MAX_SIDECAR_BYTES: u64 = 1024 * 1024;

/// A loaded version waiting to be applied, and what to log about it.
struct Loaded {
    file: String,
    label: String,
    methods: Vec<String>,
    tier: Tier,
    load_ms: u128,
}

impl Loader {
    /// Brings the registry in line with the folder as it is now, in one swap: every new
    /// or changed handler file is loaded (off the serving path), every file that is
    /// gone is unregistered, and a file that cannot be read (not a regular file, too
    /// large) is reported. Blocks while compiling: run it off the async threads.
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
        let mut to_optimise = Vec::new();
        for path in &paths {
            let file = file_name(path);
            let started = Instant::now();
            if let Some(change) = self.examine(registry, path, &file, &mut to_optimise) {
                if let Change::Loaded(_, version) = &change {
                    loaded.push(Loaded {
                        file: file.clone(),
                        label: version.label(),
                        methods: version
                            .method_names()
                            .into_iter()
                            .map(str::to_owned)
                            .collect(),
                        tier: version.code.tier(),
                        load_ms: started.elapsed().as_millis(),
                    });
                }
                changes.push((file, change));
            }
        }
        let refused = registry.apply(changes);
        // After the swap: the optimiser skips versions the registry does not hold.
        for job in to_optimise {
            self.optimiser.submit(job);
        }
        for Loaded {
            file,
            label,
            methods,
            tier,
            load_ms,
        } in loaded
        {
            match refused.get(&file) {
                None => {
                    tracing::info!(handler = %label, ?methods, code = %tier, load_ms, "handler loaded")
                }
                Some(why) => tracing::error!(
                    handler = %label, error = %why,
                    "handler refused; it serves once the clash is gone, the last good version meanwhile"
                ),
            }
        }
        Ok(())
    }

    /// What changed about one handler file since the registry last saw it, if anything.
    /// A version loaded from baseline code adds its optimised build to `to_optimise`.
    fn examine(
        &self,
        registry: &Registry,
        path: &Path,
        file: &str,
        to_optimise: &mut Vec<Job>,
    ) -> Option<Change> {
        let sidecar_path = path.with_extension("toml");
        let started = Instant::now();
        let sources = match read_sources(path, &sidecar_path) {
            Ok(sources) => sources,
            // Gone between listing and reading: the event of its removal follows.
            Err(Unreadable::Gone) => return None,
            Err(Unreadable::Refused(why)) => {
                let unchanged = registry.fingerprint(file).is_none()
                    && registry.failure(file) == Some(why.clone());
                if !unchanged {
                    tracing::error!(handler = %file, error = %why, "handler not read; the last good version (if any) serves");
                }
                return (!unchanged).then_some(Change::Failed(None, why));
            }
        };
        let fingerprint = Fingerprint {
            wasm: digest(&sources.wasm),
            sidecar: sources.sidecar.as_deref().map(digest),
        };
        tracing::debug!(
            handler = %file, bytes = sources.wasm.len(),
            read_ms = started.elapsed().as_millis(), "handler read and digested"
        );
        // Unchanged: serving, failed, or waiting for a clash to clear (the registry
        // serves it then without a new load).
        if registry.fingerprint(file).as_ref() == Some(&fingerprint) {
            return None;
        }
        match self.load(file, &sources, &sidecar_path, &fingerprint) {
            Ok(version) => {
                let version = Arc::new(version);
                if version.code.tier() == Tier::Baseline {
                    to_optimise.push(Job::new(file.to_owned(), sources.wasm, &version));
                }
                Some(Change::Loaded(fingerprint, version))
            }
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

/// Why a handler file was not read.
enum Unreadable {
    /// It is gone.
    Gone,
    /// It (or its sidecar) is there but is not read: why, for the catalog.
    Refused(String),
}

/// Reads a handler file and its sidecar (none when there is none).
fn read_sources(path: &Path, sidecar: &Path) -> Result<Sources, Unreadable> {
    let wasm = read_regular(path, MAX_HANDLER_BYTES)?;
    let sidecar = match read_regular(sidecar, MAX_SIDECAR_BYTES) {
        Ok(bytes) => Some(bytes),
        Err(Unreadable::Gone) => None,
        Err(refused) => return Err(refused),
    };
    Ok(Sources { wasm, sidecar })
}

/// Reads `path` if it is a regular file (or a symlink to one) of at most `max` bytes.
///
/// Anything else is refused unread: a FIFO would block the loader until a writer came,
/// a device such as `/dev/zero` would be read until memory ran out, and a folder named
/// like a sidecar must not quietly stand for "no sidecar".
fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, Unreadable> {
    let name = file_name(path);
    // Look before opening: opening a FIFO or a device can block or act by itself.
    let metadata = std::fs::metadata(path).map_err(|e| not_read(path, &name, &e))?;
    check_regular(&name, &metadata, max)?;
    // Non-blocking, in case a FIFO took the file's place since: the open cannot hang,
    // and the opened file's own metadata says what was opened.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| not_read(path, &name, &e))?;
    let metadata = file.metadata().map_err(|e| not_read(path, &name, &e))?;
    check_regular(&name, &metadata, max)?;
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    // One byte past the cap tells a file that grew while being read.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| not_read(path, &name, &e))?;
    if bytes.len() as u64 > max {
        return Err(Unreadable::Refused(format!(
            "{name} is over {max} bytes, the limit"
        )));
    }
    Ok(bytes)
}

/// Refuses what is not a regular file of at most `max` bytes.
fn check_regular(name: &str, metadata: &std::fs::Metadata, max: u64) -> Result<(), Unreadable> {
    let kind = metadata.file_type();
    let what = if kind.is_file() {
        if metadata.len() > max {
            return Err(Unreadable::Refused(format!(
                "{name} is {} bytes; the limit is {max}",
                metadata.len()
            )));
        }
        return Ok(());
    } else if kind.is_dir() {
        "a folder"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Err(Unreadable::Refused(format!(
        "{name} is not a regular file ({what}); only regular files and symlinks to them are read"
    )))
}

/// Why `path` could not be looked at or read: gone, or a reason for the catalog.
fn not_read(path: &Path, name: &str, error: &std::io::Error) -> Unreadable {
    if error.kind() != std::io::ErrorKind::NotFound {
        return Unreadable::Refused(format!("{name} cannot be read: {error}"));
    }
    // A symlink whose target is missing is there, but stands for nothing.
    match std::fs::symlink_metadata(path) {
        Ok(link) if link.file_type().is_symlink() => {
            Unreadable::Refused(format!("{name} is a symlink to nothing"))
        }
        _ => Unreadable::Gone,
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// The handler files directly in `dir`: `*.wasm`, not hidden, sorted by name; of any
/// type (what is not a regular file is refused when read, and reported).
///
/// # Errors
/// When the folder cannot be read.
pub fn handler_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the handlers folder {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| is_handler_source(path))
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
