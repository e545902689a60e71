//! Retention: an app keeps its live version and the `keep_releases` most recently used
//! other staged versions (staged, ordered again, made live, or rolled back from); older ones
//! are removed after a staging succeeds, so old releases do not fill the disk.
//!
//! Removal never touches what is live: it runs under the activation lock, skips the version
//! `current` names and both sides of an unfinished activation, and takes a version out of
//! the index (so it can no longer be activated) before moving its tree out of `releases/`.

use crate::host::Host;
use crate::journal::Journal;
use anyhow::{Context, Result};
use stagehand_common::fsx;
use std::collections::HashSet;
use tracing::{info, warn};

/// Removes what `app` keeps beyond its retention; returns the versions removed.
pub async fn after_staging(host: &std::sync::Arc<Host>, app: &str) -> Vec<String> {
    let keep = host.layout.app_config(app).keep_releases.unwrap_or(host.layout.config.keep_releases);
    if keep == 0 {
        return Vec::new();
    }
    let _one_at_a_time = host.activation.lock().await;
    let (h, a) = (host.clone(), app.to_string());
    match tokio::task::spawn_blocking(move || prune(&h, &a, keep)).await {
        Ok(Ok(pruned)) => pruned,
        Ok(Err(e)) => {
            warn!(%app, error = %format!("{e:#}"), "Could not remove old releases; they stay.");
            Vec::new()
        }
        Err(e) => {
            warn!(%app, error = %e, "Could not remove old releases; they stay.");
            Vec::new()
        }
    }
}

/// The versions of `app` beyond `keep`, oldest use first, never the protected ones.
pub fn prune(host: &Host, app: &str, keep: usize) -> Result<Vec<String>> {
    let layout = &host.layout;
    let mut protected: HashSet<String> = layout.active(app).into_iter().collect();
    if let Some(i) = Journal::load(&layout.journal(app)).ok().and_then(|j| j.intent) {
        protected.insert(i.version);
        protected.extend(i.previous);
    }
    let mut versions: Vec<(u64, String)> = host
        .store
        .all_staged()?
        .into_iter()
        .filter(|(a, v, _)| a == app && !protected.contains(v))
        .map(|(_, v, r)| (r.used_at, v))
        .collect();
    // Most recently used first; equal times (re-indexed versions) in a stable order.
    versions.sort_by(|a, b| b.cmp(a));
    let mut pruned = Vec::new();
    for (_, version) in versions.into_iter().skip(keep) {
        remove(host, app, &version)?;
        info!(%app, %version, keep, "Removed an old release.");
        pruned.push(version);
    }
    Ok(pruned)
}

/// Out of the index first (durably), then out of `releases/` by rename, then deleted.
fn remove(host: &Host, app: &str, version: &str) -> Result<()> {
    let layout = &host.layout;
    host.store.remove_staged(app, version)?;
    host.store.flush()?;
    let dir = layout.release_dir(app, version);
    let aside = layout.staging(app).join(format!(".pruned-{version}-{}", hex::encode(rand::random::<[u8; 4]>())));
    fsx::create_dir_all_durable(&layout.staging(app))?;
    std::fs::rename(&dir, &aside).with_context(|| format!("moving {} aside", dir.display()))?;
    fsx::fsync_dir(&layout.releases(app))?;
    let _ = std::fs::remove_file(layout.manifest_file(app, version));
    fsx::remove_tree(&aside).with_context(|| format!("removing {}", aside.display()))?;
    Ok(())
}

/// Trees left under `.staging/` by a removal or a repair that a crash interrupted.
pub fn leftovers(host: &Host, app: &str) {
    let Ok(rd) = std::fs::read_dir(host.layout.staging(app)) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // Versions cannot start with a dot, so these names are never a staging in progress.
        if name.starts_with(".pruned-") || name.starts_with(".damaged-") {
            if let Err(err) = fsx::remove_tree(&e.path()) {
                warn!(path = %e.path().display(), error = %err, "Could not remove a leftover tree.");
            }
        }
    }
}
