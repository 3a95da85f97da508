//! inotify on one directory, as a nudge: any change sends on a channel (coalesced), and the
//! caller's periodic pass stays the fallback where inotify is unavailable.

use std::path::Path;

/// Watch `dir` (not recursively); `None` when inotify cannot, logged with `what` it watches.
pub fn watch_dir(
    dir: &Path,
    what: &str,
    tx: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "inotify unavailable: relying on periodic passes"))
    .ok()?;
    match watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
        Ok(()) => Some(watcher),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the {what}: relying on periodic passes");
            None
        }
    }
}
