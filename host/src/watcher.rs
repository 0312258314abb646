//! From file events to reloads: [`watch`] runs the [`Loader`] whenever the handlers
//! folder changes.
//!
//! Events are debounced (editors and `cp` write in pieces; rsync and scp leave
//! temporary names); the loader then compares the whole folder with the registry, so
//! an event only says when to look, never what changed.
//!
//! A watch holds on to the folder it was set on, not to its path: when the folder is
//! replaced as a whole (`rm -rf` and created again, or the handlers path is a symlink
//! that a release swaps with `ln -sfn`), the old watch sees nothing more. So the
//! parent folder is watched too, for the handlers path being created, removed or
//! renamed over, and the folder's identity (device and inode of what the path leads
//! to) is checked on those events and every `IDENTITY_CHECK`: when it changed, the
//! watch is set again on what the path leads to now, and the folder synced.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use notify_debouncer_full::notify::event::ModifyKind;
use notify_debouncer_full::notify::{
    self, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _,
};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc::UnboundedSender;

use crate::loader::{Loader, is_handler_source};
use crate::registry::Registry;

/// How long the folder must be quiet before a reload: long enough for a copy in pieces
/// to finish, short enough that a deployed file serves within a fraction of a second.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// How often the handlers folder's identity is checked when no event says it changed:
/// the fallback for replacements no watch reports (a parent folder replaced in turn, a
/// mount). One `stat` of two paths each time.
const IDENTITY_CHECK: Duration = Duration::from_secs(2);

/// Keeps the folder watched while it lives.
pub struct Watch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        // The task owns the watches: ending it ends them.
        self.task.abort();
    }
}

/// What the watch task hears about.
enum Signal {
    /// A debounced batch of events in the handlers folder.
    Files(DebounceEventResult),
    /// The handlers path itself may lead somewhere else now.
    Folder,
}

/// Watches the loader's folder and syncs the registry after every burst of changes,
/// one sync at a time, on a blocking thread; follows the folder when it is replaced.
///
/// # Errors
/// When the folder cannot be watched (it does not exist, or the system's watch limit
/// is reached).
pub fn watch(loader: Loader, registry: Arc<Registry>) -> anyhow::Result<Watch> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Signal>();
    let dir = std::path::absolute(&loader.dir)
        .with_context(|| format!("cannot resolve {}", loader.dir.display()))?;
    let mut watching = Watching::start(dir, tx)?;
    let loader = Arc::new(loader);
    let task = tokio::spawn(async move {
        let mut check = tokio::time::interval(IDENTITY_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (mut relevant, mut moved) = (false, false);
            tokio::select! {
                signal = rx.recv() => {
                    let Some(signal) = signal else { return };
                    watching.hear(signal, &mut relevant, &mut moved);
                    // Coalesce whatever else arrived meanwhile into the same sync.
                    while let Ok(more) = rx.try_recv() {
                        watching.hear(more, &mut relevant, &mut moved);
                    }
                }
                _ = check.tick() => {}
            }
            relevant |= watching.follow(moved);
            if !relevant {
                continue;
            }
            let (loader, registry) = (Arc::clone(&loader), Arc::clone(&registry));
            let synced = tokio::task::spawn_blocking(move || loader.sync(&registry)).await;
            match synced {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::error!(error = %format!("{error:#}"), "reload failed; nothing changed")
                }
                Err(error) => tracing::error!(%error, "reload task failed; nothing changed"),
            }
        }
    });
    Ok(Watch { task })
}

/// What a path leads to: device and inode, and the birth time where the file system
/// keeps one (an inode freed by `rm -rf` may be reused at once by `mkdir`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    born: Option<SystemTime>,
}

impl Identity {
    /// What `path` leads to now (following symlinks), if anything.
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let metadata = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            born: metadata.created().ok(),
        })
    }
}

/// The watches on the handlers folder and on its parent, and what they were set on.
struct Watching {
    /// The handlers path, absolute but with symlinks kept: what it leads to may change.
    dir: PathBuf,
    /// Where signals go.
    tx: UnboundedSender<Signal>,
    /// The folder the watch is on, if the path led to one when it was set.
    identity: Option<Identity>,
    /// The watch on the folder; none while the path leads nowhere.
    folder: Option<Debouncer<RecommendedWatcher, RecommendedCache>>,
    /// The parent folder the parent watch is on.
    parent_identity: Option<Identity>,
    /// The watch on the parent folder, for the handlers path itself changing.
    parent: Option<RecommendedWatcher>,
}

impl Watching {
    /// Watches `dir` and its parent.
    ///
    /// # Errors
    /// When `dir` cannot be watched; a parent that cannot be watched is only logged
    /// (the periodic identity check stands in for it).
    fn start(dir: PathBuf, tx: UnboundedSender<Signal>) -> anyhow::Result<Self> {
        let mut watching = Self {
            identity: Identity::of(&dir),
            folder: None,
            parent_identity: None,
            parent: None,
            dir,
            tx,
        };
        watching.folder = Some(watch_folder(&watching.dir, &watching.tx)?);
        watching.watch_parent();
        Ok(watching)
    }

    /// Takes in one signal: whether it asks for a sync, or for a look at the folder's
    /// identity.
    fn hear(&self, signal: Signal, relevant: &mut bool, moved: &mut bool) {
        match signal {
            Signal::Folder => *moved = true,
            Signal::Files(Ok(events)) => {
                for event in &events {
                    // Opening and reading change nothing, and every sync opens and
                    // reads each handler file: heeded, they would start the next
                    // sync, and that one the next, for as long as the host runs.
                    if matches!(event.kind, EventKind::Access(_)) {
                        continue;
                    }
                    if event.paths.iter().any(|path| is_handler_source(path)) {
                        *relevant = true;
                    }
                    // The watched folder itself removed or moved away.
                    if reshapes(&event.kind) && event.paths.contains(&self.dir) {
                        *moved = true;
                    }
                }
            }
            Signal::Files(Err(errors)) => {
                for error in errors {
                    tracing::warn!(%error, "file watcher error");
                }
                // Something may have been missed: a sync costs little and sets it right.
                *relevant = true;
            }
        }
    }

    /// Sets the watches again when what the paths lead to changed, or when an event
    /// said the handlers path was replaced (`moved`: a new folder may have the old
    /// one's inode). Returns whether the folder must be synced.
    fn follow(&mut self, moved: bool) -> bool {
        let parent_now = self.dir.parent().and_then(Identity::of);
        if parent_now != self.parent_identity {
            self.watch_parent();
        }
        let now = Identity::of(&self.dir);
        if !moved && now == self.identity {
            return false;
        }
        // Identity first, then the watch: a replacement in between shows as a change
        // at the next look.
        self.identity = now;
        self.folder = None;
        if self.identity.is_none() {
            tracing::warn!(folder = %self.dir.display(), "the handlers folder is gone; what was loaded serves until it is back");
            return false;
        }
        match watch_folder(&self.dir, &self.tx) {
            Ok(folder) => {
                tracing::info!(folder = %self.dir.display(), "the handlers folder was replaced; watching the new one");
                self.folder = Some(folder);
            }
            Err(error) => {
                // The next identity check tries again.
                self.identity = None;
                tracing::error!(error = %format!("{error:#}"), "cannot watch the new handlers folder");
            }
        }
        true
    }

    /// (Re)sets the watch on the parent folder; logs when it cannot.
    fn watch_parent(&mut self) {
        self.parent = None;
        let Some(parent) = self.dir.parent() else {
            return;
        };
        self.parent_identity = Identity::of(parent);
        match watch_parent(parent, &self.dir, &self.tx) {
            Ok(watcher) => self.parent = Some(watcher),
            Err(error) => tracing::warn!(
                error = %format!("{error:#}"),
                "cannot watch the folder around the handlers folder; its replacement is noticed within {IDENTITY_CHECK:?}"
            ),
        }
    }
}

/// A debounced watch on the handlers folder.
fn watch_folder(
    dir: &Path,
    tx: &UnboundedSender<Signal>,
) -> anyhow::Result<Debouncer<RecommendedWatcher, RecommendedCache>> {
    let tx = tx.clone();
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result| {
        // The receiver is gone only when the host is stopping.
        tx.send(Signal::Files(result)).ok();
    })
    .context("cannot start the file watcher")?;
    debouncer
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    Ok(debouncer)
}

/// A watch on `parent` that signals when `dir` (one of its entries) is created,
/// removed or renamed over. Only those: the parent also sees every open of `dir`,
/// which each sync does.
fn watch_parent(
    parent: &Path,
    dir: &Path,
    tx: &UnboundedSender<Signal>,
) -> anyhow::Result<RecommendedWatcher> {
    let name = dir.file_name().map(ToOwned::to_owned);
    let tx = tx.clone();
    let mut watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
        let replaced = match result {
            Ok(event) => {
                reshapes(&event.kind)
                    && event
                        .paths
                        .iter()
                        .any(|path| path.file_name() == name.as_deref())
            }
            // Something may have been missed: a look costs one stat.
            Err(_) => true,
        };
        if replaced {
            tx.send(Signal::Folder).ok();
        }
    })
    .context("cannot start the file watcher")?;
    watcher
        .watch(parent, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", parent.display()))?;
    Ok(watcher)
}

/// Whether an event kind can change what a path leads to: created, removed, renamed.
fn reshapes(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
    )
}
