//! The registry: which handler version serves which method, swapped as a whole.
//!
//! The method table is an immutable snapshot behind an `Arc`; a lookup clones the
//! `Arc` of one version, so a call keeps the version it started on however the table
//! changes afterwards. A version is compiled and pre-instantiated before it is applied,
//! never under the lock, and a file that fails to load keeps its last good version
//! serving. A version refused because another file serves one of its methods waits,
//! and serves as soon as that clash is gone. Every change bumps a generation that the
//! MQTT session watches to republish the catalog.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use edge_proto::{Catalog, CatalogEntry, CatalogFailure};
use tokio::sync::{Semaphore, watch};

use crate::sandbox::HandlerCode;

/// One loaded version of one handler file.
pub struct HandlerVersion {
    /// The file name, such as `echo.wasm`.
    pub file: String,
    /// The content digest of the `.wasm`, `sha256:<hex>`.
    pub digest: String,
    /// The compiled, pre-instantiated code.
    pub code: HandlerCode,
    /// The longest one call may run (before a caller's shorter timeout).
    pub timeout: Duration,
    /// The handler's own bound on calls in flight, when it has one.
    pub in_flight: Option<Arc<Semaphore>>,
    /// That bound's size, for error messages.
    pub max_in_flight: Option<usize>,
}

impl HandlerVersion {
    /// `file@sha256:<first 12 hex>`, for log lines.
    pub fn label(&self) -> String {
        let short = self.digest.get(..19).unwrap_or(&self.digest);
        format!("{}@{short}", self.file)
    }

    /// The names of the methods it serves.
    pub fn method_names(&self) -> Vec<&str> {
        self.code
            .methods()
            .iter()
            .map(|m| m.name.as_str())
            .collect()
    }
}

/// What a handler file was made of when it was last loaded (or failed to load): the
/// digests of the `.wasm` and of its sidecar. An unchanged fingerprint is not reloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// Digest of the `.wasm`.
    pub wasm: String,
    /// Digest of the sidecar `NAME.toml`, if there is one.
    pub sidecar: Option<String>,
}

/// A change to one handler file.
pub enum Change {
    /// A new version compiled and pre-instantiated: serve it, or, while one of its
    /// methods is served by another file, keep it waiting until that clash is gone.
    Loaded(Fingerprint, Arc<HandlerVersion>),
    /// The file as it is now cannot serve: keep the last good version, report why.
    /// No fingerprint when the file could not be read at all (not a regular file, too
    /// large): then the reason itself says what was seen.
    Failed(Option<Fingerprint>, String),
    /// The file is gone: its methods answer 404 from now on (unless another file
    /// takes them in the same change).
    Removed,
}

/// The state of one handler file.
#[derive(Clone)]
struct Slot {
    /// The version serving, if any: the last one that loaded and could serve.
    serving: Option<Arc<HandlerVersion>>,
    /// The file as it is now, loaded, but refused because another file serves one of
    /// its methods: it serves as soon as that clash is gone, without being loaded again.
    waiting: Option<Arc<HandlerVersion>>,
    /// Why the file as it is now does not serve, if it does not.
    failure: Option<String>,
    /// What the file was made of at the last attempt (none when it could not be read).
    seen: Option<Fingerprint>,
}

impl Slot {
    /// Whether `version` serves or waits here.
    fn holds(&self, version: &Arc<HandlerVersion>) -> bool {
        [&self.serving, &self.waiting]
            .into_iter()
            .flatten()
            .any(|held| Arc::ptr_eq(held, version))
    }
}

/// A snapshot of what serves.
#[derive(Default)]
struct Table {
    files: BTreeMap<String, Slot>,
    /// Derived from `files`: the version serving each method.
    methods: HashMap<String, Arc<HandlerVersion>>,
}

impl Table {
    fn from_files(files: BTreeMap<String, Slot>) -> Self {
        Self {
            methods: served_methods(&files),
            files,
        }
    }
}

/// The version serving each method, as `files` has it.
fn served_methods(files: &BTreeMap<String, Slot>) -> HashMap<String, Arc<HandlerVersion>> {
    let mut methods = HashMap::new();
    for version in files.values().filter_map(|slot| slot.serving.as_ref()) {
        for name in version.method_names() {
            methods.insert(name.to_owned(), Arc::clone(version));
        }
    }
    methods
}

/// Serves every waiting version that no longer clashes, one at a time in file order
/// (each one served can free or take methods others wait for), until none can; the
/// ones left waiting say which file holds their method now. Returns the files whose
/// waiting version now serves.
fn settle(files: &mut BTreeMap<String, Slot>) -> Vec<String> {
    let mut promoted = Vec::new();
    loop {
        let methods = served_methods(files);
        let mut changed = false;
        for (file, slot) in files.iter_mut() {
            let Some(waiting) = &slot.waiting else {
                continue;
            };
            match clash(&methods, file, waiting) {
                Some(why) => slot.failure = Some(why),
                None => {
                    slot.serving = slot.waiting.take();
                    slot.failure = None;
                    promoted.push(file.clone());
                    changed = true;
                    break;
                }
            }
        }
        if !changed {
            return promoted;
        }
    }
}

/// The handlers the host serves.
pub struct Registry {
    table: RwLock<Arc<Table>>,
    generation: watch::Sender<u64>,
}

impl Registry {
    /// An empty registry: every method answers 404.
    pub fn new() -> Self {
        Self {
            table: RwLock::new(Arc::new(Table::default())),
            generation: watch::Sender::new(0),
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

    /// What `file` was made of at its last load attempt, if it is known and was read.
    pub fn fingerprint(&self, file: &str) -> Option<Fingerprint> {
        self.snapshot()
            .files
            .get(file)
            .and_then(|slot| slot.seen.clone())
    }

    /// Why `file` as it is now does not serve, if it does not.
    pub fn failure(&self, file: &str) -> Option<String> {
        self.snapshot()
            .files
            .get(file)
            .and_then(|slot| slot.failure.clone())
    }

    /// The handler files known, serving, waiting or failed.
    pub fn files(&self) -> Vec<String> {
        self.snapshot().files.keys().cloned().collect()
    }

    /// Applies the changes of one look at the folder in one atomic swap, so that what
    /// serves afterwards depends on the folder's final state, not on the order of the
    /// changes: removals first, then every loaded version that no longer clashes (see
    /// [`Change::Loaded`]), in file order. A loaded version whose methods another file
    /// serves keeps waiting, and the file keeps its last good version meanwhile; a
    /// version that was waiting serves as soon as its clash is gone, in this swap or a
    /// later one.
    ///
    /// Returns the files whose loaded version (from `changes`) was refused, with why.
    pub fn apply(&self, changes: Vec<(String, Change)>) -> BTreeMap<String, String> {
        if changes.is_empty() {
            return BTreeMap::new();
        }
        let mut refused = BTreeMap::new();
        let late = {
            let mut guard = self.table.write().unwrap_or_else(|e| e.into_inner());
            let mut files = guard.files.clone();
            let mut loaded = Vec::new();
            for (file, change) in changes {
                match change {
                    Change::Removed => {
                        files.remove(&file);
                    }
                    Change::Failed(seen, why) => {
                        let serving = files.get(&file).and_then(|slot| slot.serving.clone());
                        let slot = Slot {
                            serving,
                            waiting: None,
                            failure: Some(why),
                            seen,
                        };
                        files.insert(file, slot);
                    }
                    Change::Loaded(seen, version) => {
                        let serving = files.get(&file).and_then(|slot| slot.serving.clone());
                        let slot = Slot {
                            serving,
                            waiting: Some(version),
                            failure: None,
                            seen: Some(seen),
                        };
                        files.insert(file.clone(), slot);
                        loaded.push(file);
                    }
                }
            }
            let promoted = settle(&mut files);
            // Versions that waited since an earlier swap and serve now; the caller
            // reports on the ones it loaded.
            let late: Vec<Arc<HandlerVersion>> = promoted
                .iter()
                .filter(|file| !loaded.contains(file))
                .filter_map(|file| files.get(file)?.serving.clone())
                .collect();
            for file in loaded {
                if let Some(slot) = files.get(&file).filter(|slot| slot.waiting.is_some()) {
                    refused.insert(file, slot.failure.clone().unwrap_or_default());
                }
            }
            *guard = Arc::new(Table::from_files(files));
            late
        };
        for version in late {
            tracing::info!(handler = %version.label(), "handler no longer clashes with another file; it serves now");
        }
        self.generation.send_modify(|generation| *generation += 1);
        refused
    }

    /// Whether `version` of `file` serves, or waits to, now.
    pub fn holds(&self, file: &str, version: &Arc<HandlerVersion>) -> bool {
        self.snapshot()
            .files
            .get(file)
            .is_some_and(|slot| slot.holds(version))
    }

    /// Replaces `baseline`, a version of `file` served (or waiting) from baseline code,
    /// with `optimised`, the same version's optimised build, in one atomic swap as a
    /// reload does: calls already running finish on the baseline code, every later one
    /// runs on the optimised. Nothing else about the file changes (a failure reported
    /// for a newer file stays), so the catalog is not republished.
    ///
    /// Returns false, changing nothing, when `baseline` is no longer what `file`
    /// serves or waits with (the file changed or went), or when `optimised` lists other
    /// methods than `baseline` did.
    pub fn upgrade(
        &self,
        file: &str,
        baseline: &Arc<HandlerVersion>,
        optimised: HandlerVersion,
    ) -> bool {
        if optimised.method_names() != baseline.method_names() {
            return false;
        }
        let optimised = Arc::new(optimised);
        let mut guard = self.table.write().unwrap_or_else(|e| e.into_inner());
        let mut files = guard.files.clone();
        let Some(slot) = files.get_mut(file) else {
            return false;
        };
        let is_baseline = |held: &Option<Arc<HandlerVersion>>| {
            held.as_ref()
                .is_some_and(|held| Arc::ptr_eq(held, baseline))
        };
        if is_baseline(&slot.serving) {
            slot.serving = Some(optimised);
        } else if is_baseline(&slot.waiting) {
            slot.waiting = Some(optimised);
        } else {
            return false;
        }
        *guard = Arc::new(Table::from_files(files));
        true
    }

    /// A receiver that sees every change, for republishing the catalog.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The method catalog, as published on `NS$edge/methods`: within
    /// [`edge_proto::message::CATALOG_MAX_BYTES`] however many handlers and texts.
    pub fn catalog(&self) -> Catalog {
        let table = self.snapshot();
        let mut methods = Vec::new();
        let mut failures = Vec::new();
        for (file, slot) in &table.files {
            if let Some(version) = &slot.serving {
                methods.extend(version.code.methods().iter().map(|m| CatalogEntry {
                    name: m.name.clone(),
                    description: m.description.clone(),
                    handler: file.clone(),
                    digest: version.digest.clone(),
                }));
            }
            if let Some(why) = &slot.failure {
                failures.push(CatalogFailure {
                    handler: file.clone(),
                    error: why.clone(),
                });
            }
        }
        Catalog::bounded(methods, failures)
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// Why `version` of `file` cannot serve: one of its methods is served by another file.
fn clash(
    methods: &HashMap<String, Arc<HandlerVersion>>,
    file: &str,
    version: &HandlerVersion,
) -> Option<String> {
    version.method_names().into_iter().find_map(|name| {
        let owner = methods.get(name)?;
        (owner.file != file).then(|| format!("method '{name}' is already served by {}", owner.file))
    })
}
