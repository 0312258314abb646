//! From file events to reloads: [`watch`] runs the [`Loader`] whenever the handlers
//! folder changes.
//!
//! Events are debounced (editors and `cp` write in pieces; rsync and scp leave
//! temporary names); the loader then compares the whole folder with the registry, so
//! an event only says when to look, never what changed.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use notify_debouncer_full::notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};

use crate::loader::{Loader, is_handler_source};
use crate::registry::Registry;

/// How long the folder must be quiet before a reload: long enough for a copy in pieces
/// to finish, short enough that a deployed file serves within a fraction of a second.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Keeps the folder watched while it lives.
pub struct Watch {
    _debouncer: notify_debouncer_full::Debouncer<
        notify_debouncer_full::notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
}

/// Watches the loader's folder and syncs the registry after every burst of changes,
/// one sync at a time, on a blocking thread.
///
/// # Errors
/// When the folder cannot be watched (it does not exist, or the system's watch limit
/// is reached).
pub fn watch(loader: Loader, registry: Arc<Registry>) -> anyhow::Result<Watch> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<DebounceEventResult>();
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result| {
        // The receiver is gone only when the host is stopping.
        tx.send(result).ok();
    })
    .context("cannot start the file watcher")?;
    debouncer
        .watch(&loader.dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", loader.dir.display()))?;
    let loader = Arc::new(loader);
    tokio::spawn(async move {
        while let Some(result) = rx.recv().await {
            let mut relevant = matters(result);
            // Coalesce whatever else arrived meanwhile into the same sync.
            while let Ok(more) = rx.try_recv() {
                relevant |= matters(more);
            }
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
    Ok(Watch {
        _debouncer: debouncer,
    })
}

/// Whether a batch of events touches a handler source; errors are logged.
fn matters(result: DebounceEventResult) -> bool {
    match result {
        Ok(events) => events
            .iter()
            .flat_map(|event| event.paths.iter())
            .any(|path| is_handler_source(path)),
        Err(errors) => {
            for error in errors {
                tracing::warn!(%error, "file watcher error");
            }
            // Something may have been missed: a sync costs little and sets it right.
            true
        }
    }
}
