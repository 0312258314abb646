//! From file events to reloads: [`watch`] runs the [`Loader`] whenever the handlers
//! folder changes.
//!
//! Events say when to look, never what changed: the loader then compares the whole
//! folder with the registry. When to look depends on how the file came:
//! - written in place (`cp`, editors, scp write in pieces): once the folder has been
//!   quiet for `DEBOUNCE`, so that no half-written file is read;
//! - whole, by a rename into the folder (the recommended deploy, and how rsync ends)
//!   or a removal: after `SETTLE`, so that a deploy serves without waiting out the
//!   debounce, while files renamed in together (a handler and its sidecar, by one
//!   script) still land in one sync. Not while a write is in progress: then the
//!   write's debounce covers both.
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
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use notify::event::{ModifyKind, RenameMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc::UnboundedSender;

use crate::loader::{Loader, is_handler_source};
use crate::registry::Registry;

/// How long the folder must be quiet after a write before a reload: long enough for a
/// copy in pieces to finish, short enough that a copied file serves within a fraction
/// of a second.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// How long after a file arrived whole (renamed in, or removed) the folder is synced,
/// when no write is in progress: time for the other renames of the same deploy (a
/// script's next `mv`, a sidecar) to come, a hundredth of what a write waits.
const SETTLE: Duration = Duration::from_millis(10);

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
    /// An event in the handlers folder (opens and reads are not sent).
    File(notify::Result<notify::Event>),
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
        let mut pending = Pending::default();
        loop {
            let mut moved = false;
            let due = pending.due;
            tokio::select! {
                signal = rx.recv() => {
                    let Some(signal) = signal else { return };
                    let now = Instant::now();
                    watching.hear(signal, &mut pending, &mut moved, now);
                    // Whatever else arrived meanwhile counts as heard now.
                    while let Ok(more) = rx.try_recv() {
                        watching.hear(more, &mut pending, &mut moved, now);
                    }
                }
                () = sleep_until(due) => {}
                _ = check.tick() => {}
            }
            let replaced = watching.follow(moved);
            if !replaced && !pending.is_due(Instant::now()) {
                continue;
            }
            pending = Pending::default();
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

/// Sleeps until `due`, or forever when nothing is due.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

/// What an event in the handlers folder asks of the next sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heard {
    /// Nothing: no handler file is concerned.
    Nothing,
    /// A handler file is being written (or something may have been missed): sync once
    /// the folder has been quiet for `DEBOUNCE`.
    Written,
    /// A handler file arrived whole or went away (renamed in or out, removed): sync
    /// after `SETTLE`, unless a write is in progress.
    Whole,
}

/// What one event in the handlers folder asks for: [`Heard::Whole`] for renames and
/// removals of handler files, [`Heard::Written`] for any other change of one.
fn heard(event: &notify::Event) -> Heard {
    if matches!(event.kind, EventKind::Access(_))
        || !event.paths.iter().any(|path| is_handler_source(path))
    {
        return Heard::Nothing;
    }
    match event.kind {
        EventKind::Remove(_)
        | EventKind::Modify(ModifyKind::Name(
            RenameMode::To | RenameMode::From | RenameMode::Both,
        )) => Heard::Whole,
        _ => Heard::Written,
    }
}

/// When the folder is synced next.
#[derive(Debug, Default)]
struct Pending {
    /// When, if anything is pending.
    due: Option<Instant>,
    /// Whether a file is being written: then an arrival waits for the write's debounce.
    writing: bool,
}

impl Pending {
    /// Takes in what an event at `now` asks for.
    fn hear(&mut self, heard: Heard, now: Instant) {
        match heard {
            Heard::Nothing => {}
            Heard::Written => {
                self.writing = true;
                self.due = Some(now + DEBOUNCE);
            }
            Heard::Whole if !self.writing => self.due = Some(now + SETTLE),
            // The write's debounce, already set, covers it.
            Heard::Whole => {}
        }
    }

    /// Whether the sync is due at `now`.
    fn is_due(&self, now: Instant) -> bool {
        self.due.is_some_and(|due| due <= now)
    }
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
    folder: Option<RecommendedWatcher>,
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

    /// Takes in one signal heard at `now`: when it asks for a sync (into `pending`), and
    /// whether it asks for a look at the folder's identity (`moved`).
    fn hear(&self, signal: Signal, pending: &mut Pending, moved: &mut bool, now: Instant) {
        match signal {
            Signal::Folder => *moved = true,
            Signal::File(Ok(event)) => {
                pending.hear(heard(&event), now);
                // The watched folder itself removed or moved away.
                if reshapes(&event.kind) && event.paths.contains(&self.dir) {
                    *moved = true;
                }
            }
            Signal::File(Err(error)) => {
                tracing::warn!(%error, "file watcher error");
                // Something may have been missed: a sync costs little and sets it right.
                pending.hear(Heard::Written, now);
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

/// A watch on the handlers folder, sending every event but opens and reads: opening
/// and reading change nothing, and every sync opens and reads each handler file, so
/// heeded they would start the next sync, and that one the next, for as long as the
/// host runs.
fn watch_folder(dir: &Path, tx: &UnboundedSender<Signal>) -> anyhow::Result<RecommendedWatcher> {
    let tx = tx.clone();
    let mut watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
        if result
            .as_ref()
            .is_ok_and(|event| matches!(event.kind, EventKind::Access(_)))
        {
            return;
        }
        // The receiver is gone only when the host is stopping.
        tx.send(Signal::File(result)).ok();
    })
    .context("cannot start the file watcher")?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    Ok(watcher)
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

#[cfg(test)]
mod tests {
    use notify::event::{AccessKind, CreateKind, DataChange, RemoveKind};

    use super::*;

    fn event(kind: EventKind, paths: &[&str]) -> notify::Event {
        let mut event = notify::Event::new(kind);
        event.paths = paths.iter().map(PathBuf::from).collect();
        event
    }

    const WRITE: EventKind = EventKind::Modify(ModifyKind::Data(DataChange::Any));
    const RENAMED_IN: EventKind = EventKind::Modify(ModifyKind::Name(RenameMode::To));

    #[test]
    fn renames_and_removals_of_handler_files_are_whole_other_changes_are_writes() {
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert_eq!(
            heard(&event(renamed, &["/h/.echo.tmp", "/h/echo.wasm"])),
            Heard::Whole
        );
        assert_eq!(heard(&event(RENAMED_IN, &["/h/echo.toml"])), Heard::Whole);
        let removed = EventKind::Remove(RemoveKind::File);
        assert_eq!(heard(&event(removed, &["/h/echo.wasm"])), Heard::Whole);
        assert_eq!(heard(&event(WRITE, &["/h/echo.wasm"])), Heard::Written);
        let created = EventKind::Create(CreateKind::File);
        assert_eq!(heard(&event(created, &["/h/echo.wasm"])), Heard::Written);
        // Not a handler file, or only read: nothing to do.
        assert_eq!(heard(&event(WRITE, &["/h/.echo.tmp"])), Heard::Nothing);
        assert_eq!(heard(&event(RENAMED_IN, &["/h/notes.txt"])), Heard::Nothing);
        let read = EventKind::Access(AccessKind::Any);
        assert_eq!(heard(&event(read, &["/h/echo.wasm"])), Heard::Nothing);
    }

    #[test]
    fn a_file_renamed_in_is_synced_after_the_settle_a_write_after_the_debounce() {
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);

        let mut pending = Pending::default();
        pending.hear(Heard::Whole, start);
        assert_eq!(pending.due, Some(start + SETTLE));
        // The next rename of the same deploy extends the settle.
        pending.hear(Heard::Whole, ms(5));
        assert_eq!(pending.due, Some(ms(5) + SETTLE));
        assert!(!pending.is_due(ms(5)) && pending.is_due(ms(5) + SETTLE));

        let mut pending = Pending::default();
        pending.hear(Heard::Written, start);
        assert_eq!(pending.due, Some(start + DEBOUNCE));
        // A rename while a file is being written waits for the write's debounce: the
        // sync would read the half-written file.
        pending.hear(Heard::Whole, ms(50));
        assert_eq!(pending.due, Some(start + DEBOUNCE));
        pending.hear(Heard::Written, ms(60));
        assert_eq!(pending.due, Some(ms(60) + DEBOUNCE));

        let mut pending = Pending::default();
        pending.hear(Heard::Whole, start);
        pending.hear(Heard::Written, ms(3));
        assert_eq!(pending.due, Some(ms(3) + DEBOUNCE));
        pending.hear(Heard::Nothing, ms(4));
        assert_eq!(pending.due, Some(ms(3) + DEBOUNCE));
        assert!(!Pending::default().is_due(ms(1000)));
    }
}
