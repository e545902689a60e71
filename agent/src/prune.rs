//! Retention: an app keeps its live version and the `keep_releases` most recently used
//! other staged versions (staged, ordered again, made live, or replaced by an activation:
//! the rollback target); older ones are removed after a staging succeeds, so old releases
//! do not fill the disk.
//!
//! Removal never touches what is live. It runs under the activation lock, which every change
//! of `current` holds; it keeps the version `current` names, both sides of an unfinished
//! activation, versions a scheduled message will activate, the version just staged and any
//! being staged; it stops if it cannot read `current` or the journal. A version leaves the
//! index first, only if its record did not change since it was read, and only then its
//! tree is renamed out of `releases/`; the tree is deleted after the lock is released,
//! through the ledger: a file other versions share loses one link, and their seals
//! still hold.

use crate::host::Host;
use crate::journal::Journal;
use crate::store::SealEntry;
use anyhow::{Context, Result};
use stagehand_common::fsx;
use stagehand_common::protocol::DeployUp;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{info, warn};

/// Applies `app`'s retention after `just_staged` was staged, telling the controller about
/// each version removed.
pub async fn after_staging(host: &Arc<Host>, app: &str, just_staged: &str) {
    let keep = host.layout.app_config(app).keep_releases.unwrap_or(host.layout.config.keep_releases);
    if keep == 0 {
        return;
    }
    let (h, a, j) = (host.clone(), app.to_string(), just_staged.to_string());
    let lock = host.activation(app).lock_owned().await;
    let moved = tokio::task::spawn_blocking(move || {
        let _lock = lock;
        prune(&h, &a, &j, keep)
    })
    .await
    .map_err(anyhow::Error::from)
    .and_then(|r| r);
    let aside = match moved {
        Ok(aside) => aside,
        Err(e) => {
            warn!(%app, error = %format!("{e:#}"), "Old releases were not removed.");
            return;
        }
    };
    let host = host.clone();
    let app = app.to_string();
    let _ = tokio::task::spawn_blocking(move || {
        for (dir, seal) in aside {
            if let Err(e) = host.ledger.remove_tree(&app, &dir, Some(&seal)) {
                warn!(path = %dir.display(), error = %e, "Could not delete a removed release; retried at the next start.");
            }
        }
    })
    .await;
}

/// Takes the versions of `app` beyond `keep` out of the index and `releases/`, reporting
/// each to the controller; returns where their trees were moved, with their seals, for the
/// caller to delete. The caller holds the activation lock.
pub fn prune(host: &Host, app: &str, just_staged: &str, keep: usize) -> Result<Vec<(PathBuf, Vec<SealEntry>)>> {
    // A staging in progress may be copying from any staged version: retention waits for
    // it (its own completion applies retention).
    if host.is_staging_app(app) {
        tracing::debug!(%app, "Retention waits for the staging in progress.");
        return Ok(Vec::new());
    }
    let layout = &host.layout;
    let current = layout.current(app);
    let mut protected: HashSet<String> = host.scheduled_versions(app);
    // A version whose service runs (routed, draining) runs from its release directory.
    protected.extend(host.services.running(app));
    if let Some(route) = crate::switch::load_route(layout, app) {
        protected.extend(route.versions.into_iter().map(|(v, _)| v));
    }
    match std::fs::read_link(&current) {
        Ok(target) => protected.extend(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", current.display())),
    }
    let journal = Journal::load(&layout.journal(app)).context("reading the activation journal")?;
    if let Some(i) = journal.intent {
        protected.insert(i.version);
        protected.extend(i.previous);
    }
    let mut versions: Vec<_> = host
        .store
        .all_staged()?
        .into_iter()
        .filter(|(a, v, _)| a == app && !protected.contains(v) && (v == just_staged || !host.is_staging(a, v)))
        .map(|(_, v, r)| (r.used_at, v, r))
        .collect();
    // Most recently used first; equal times (re-indexed versions) in a stable order.
    versions.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
    let mut aside = Vec::new();
    for (_, version, record) in versions.into_iter().skip(keep) {
        if version == just_staged {
            // Counted among the kept, never removed (its stamp is the newest anyway).
            continue;
        }
        match remove(host, app, &version, &record) {
            Ok(Some(dir)) => {
                info!(%app, %version, keep, "Removed an old release.");
                host.send_deploy(DeployUp::Pruned { app: app.to_string(), version });
                aside.push((dir, record.seal));
            }
            Ok(None) => {}
            Err(e) => warn!(%app, %version, error = %format!("{e:#}"), "Could not remove an old release; it stays."),
        }
    }
    Ok(aside)
}

/// Out of the index (if unchanged) and durably out of `releases/`. `None` when the record
/// changed meanwhile: the version was used again and stays.
fn remove(host: &Host, app: &str, version: &str, record: &crate::store::StagedRecord) -> Result<Option<PathBuf>> {
    let layout = &host.layout;
    // Leaves the index with it (`Store::remove_staged_if`), and returns with it below.
    let verified = host.store.verify_result(app, version).ok().flatten();
    if !host.store.remove_staged_if(app, version, record)? {
        return Ok(None);
    }
    host.store.flush()?;
    let dir = layout.release_dir(app, version);
    let aside = layout.staging(app).join(format!(".pruned-{version}-{}", hex::encode(rand::random::<[u8; 4]>())));
    let moved = fsx::create_dir_all_durable(&layout.staging(app)).and_then(|()| std::fs::rename(&dir, &aside));
    match moved {
        Ok(()) => fsx::fsync_dir(&layout.releases(app))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            // Still in releases/: back into the index, as it was.
            host.store.put_staged(app, version, record)?;
            if let Some(r) = verified {
                host.store.put_verify(app, version, &r)?;
            }
            return Err(e).with_context(|| format!("moving {} aside", dir.display()));
        }
    }
    // One left behind is removed at the next start (`leftovers`).
    let _ = std::fs::remove_file(layout.manifest_file(app, version));
    Ok(Some(aside))
}

/// What a crash left: trees under `.staging/` that a removal or a repair moved aside, and
/// manifests of versions no longer under `releases/`. Run at start-up, before any staging.
pub fn leftovers(host: &Host) {
    for app in host.layout.apps() {
        if let Ok(rd) = std::fs::read_dir(host.layout.staging(&app)) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // Versions cannot start with a dot, so these are never a staging in progress.
                if name.starts_with(".pruned-") || name.starts_with(".damaged-") {
                    if let Err(err) = host.ledger.remove_tree(&app, &e.path(), None) {
                        warn!(path = %e.path().display(), error = %err, "Could not remove a leftover tree.");
                    }
                }
            }
        }
        let manifests = host.layout.app_root(&app).join(".manifests");
        if let Ok(rd) = std::fs::read_dir(&manifests) {
            for e in rd.flatten() {
                let version = e.file_name().to_string_lossy().into_owned();
                if !host.layout.release_dir(&app, &version).exists() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}
