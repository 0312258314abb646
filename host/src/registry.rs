//! The registry: which handler version serves which method, swapped as a whole.
//!
//! The method table is an immutable snapshot behind an `Arc`; a lookup clones the
//! `Arc` of one version, so a call keeps the version it started on however the table
//! changes afterwards. Loading (compiling, pre-instantiating) happens before a table is
//! swapped in, never under the lock.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use edge_proto::{Catalog, CatalogEntry, CatalogFailure};
use sha2::{Digest, Sha256};

use crate::config::HandlerSettings;
use crate::sandbox::{HandlerCode, HandlerContext, Sandbox};

/// One loaded version of one handler file.
pub struct HandlerVersion {
    /// The file name, such as `echo.wasm`.
    pub file: String,
    /// The content digest, `sha256:<hex>`.
    pub digest: String,
    /// The compiled, pre-instantiated code.
    pub code: HandlerCode,
}

impl HandlerVersion {
    /// `file@sha256:<first 12 hex>`, for log lines.
    pub fn label(&self) -> String {
        let short = self.digest.get(..19).unwrap_or(&self.digest);
        format!("{}@{short}", self.file)
    }
}

/// The state of one handler file.
enum Slot {
    Loaded(Arc<HandlerVersion>),
    Failed(String),
}

/// A snapshot of what serves: per file, its loaded version or why it failed; per
/// method, the version that serves it.
#[derive(Default)]
struct Table {
    files: BTreeMap<String, Slot>,
    methods: HashMap<String, Arc<HandlerVersion>>,
}

/// The handlers the host serves.
pub struct Registry {
    table: RwLock<Arc<Table>>,
}

/// What loading a file gives: its version, or why not.
pub type LoadResult = Result<HandlerVersion, String>;

impl Registry {
    /// An empty registry: every method answers 404.
    pub fn new() -> Self {
        Self {
            table: RwLock::new(Arc::new(Table::default())),
        }
    }

    /// The version serving `method` now, if any.
    pub fn lookup(&self, method: &str) -> Option<Arc<HandlerVersion>> {
        self.snapshot().methods.get(method).cloned()
    }

    fn snapshot(&self) -> Arc<Table> {
        // A poisoned lock only means a panic elsewhere while swapping an Arc; the Arc
        // in it is still whole.
        Arc::clone(&self.table.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Installs the outcome of loading each file, in file-name order. A file whose
    /// methods another file already serves fails as a whole and changes nothing.
    pub fn install(&self, loads: Vec<(String, LoadResult)>) {
        let mut table = Table::default();
        for (file, load) in loads {
            let slot = match load {
                Ok(version) => match claim(&table.methods, &version) {
                    Ok(()) => {
                        let version = Arc::new(version);
                        for method in version.code.methods() {
                            table
                                .methods
                                .insert(method.name.clone(), Arc::clone(&version));
                        }
                        Slot::Loaded(version)
                    }
                    Err(why) => Slot::Failed(why),
                },
                Err(why) => Slot::Failed(why),
            };
            table.files.insert(file, slot);
        }
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }

    /// The method catalog, as published on `NS$edge/methods`.
    pub fn catalog(&self) -> Catalog {
        let table = self.snapshot();
        let mut catalog = Catalog::default();
        for (file, slot) in &table.files {
            match slot {
                Slot::Loaded(version) => {
                    catalog
                        .methods
                        .extend(version.code.methods().iter().map(|m| CatalogEntry {
                            name: m.name.clone(),
                            description: m.description.clone(),
                            handler: file.clone(),
                            digest: version.digest.clone(),
                        }));
                }
                Slot::Failed(why) => catalog.failures.push(CatalogFailure {
                    handler: file.clone(),
                    error: why.clone(),
                }),
            }
        }
        catalog.methods.sort_by(|a, b| a.name.cmp(&b.name));
        catalog
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// Checks that none of `version`'s methods is served already.
fn claim(
    methods: &HashMap<String, Arc<HandlerVersion>>,
    version: &HandlerVersion,
) -> Result<(), String> {
    for method in version.code.methods() {
        if let Some(owner) = methods.get(&method.name) {
            return Err(format!(
                "method '{}' is already served by {}",
                method.name, owner.file
            ));
        }
    }
    Ok(())
}

/// The `*.wasm` files directly in `dir`, sorted by name.
///
/// # Errors
/// When the folder cannot be read.
pub fn handler_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the handlers folder {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm") && path.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Loads one handler file and its sidecar `NAME.toml`, if any.
///
/// # Errors
/// When the file or sidecar cannot be read or parsed, or the component fails to load;
/// the message says which and why.
pub fn load_file(
    sandbox: &Sandbox,
    path: &Path,
    device_id: &str,
    defaults: &HandlerSettings,
) -> anyhow::Result<HandlerVersion> {
    let file = file_name(path);
    let wasm = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let settings = HandlerSettings::load_sidecar(&path.with_extension("toml"), defaults)?;
    let digest = format!("sha256:{:x}", Sha256::digest(&wasm));
    let context = HandlerContext {
        file: file.clone(),
        device_id: device_id.to_owned(),
        config: settings.config.clone(),
        max_memory: settings.max_memory,
    };
    let code = sandbox.load(&wasm, context)?;
    Ok(HandlerVersion { file, digest, code })
}

/// A path's file name as text, for logs and the catalog.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
