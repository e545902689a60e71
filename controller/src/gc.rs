//! `stagehand artifact rm` and the garbage collection of the chunk store. A chunk is deleted
//! only when no artifact's manifest and no push in flight references it:
//! - the artifact's record goes first, durably (a crash then leaves only garbage, which the
//!   next collection removes);
//! - a push registers its manifest before it learns which chunks are missing, and commits
//!   (checks every chunk, records the artifact) under the same lock a collection holds while
//!   it decides and deletes; so a chunk a push counted on is never taken from under it.

use crate::server::Controller;
use anyhow::Result;
use stagehand_common::manifest::Manifest;
use stagehand_common::Digest;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// A push not committed after this long no longer protects its chunks.
const PUSH_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Pushes in flight (manifest digests, since when); held while a push decides what it
/// needs, while it commits, and while a collection runs.
#[derive(Default)]
pub struct Pushes(std::sync::Mutex<HashMap<Digest, Instant>>);

impl Pushes {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Instant>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a collection removed.
#[derive(Debug, Default)]
pub struct Collected {
    pub chunks: u64,
    pub bytes: u64,
    pub manifests: u64,
}

/// Deletes every chunk and manifest no artifact and no push in flight references.
pub fn collect(ctl: &Controller) -> Result<Collected> {
    let mut pushes = ctl.pushes.lock();
    pushes.retain(|_, since| since.elapsed() < PUSH_GRACE);
    let mut manifests: HashSet<Digest> = pushes.keys().copied().collect();
    // Pushes in flight on other controllers sharing the chunk directory.
    let now = stagehand_common::ids::now_secs();
    manifests.extend(
        ctl.store
            .pushes()?
            .into_iter()
            .filter(|(_, at)| now.saturating_sub(*at) < PUSH_GRACE.as_secs())
            .map(|(d, _)| d),
    );
    manifests.extend(ctl.store.artifacts()?.into_iter().map(|(_, _, a)| a.digest));
    let mut live = HashSet::new();
    for m in &manifests {
        // A manifest that cannot be read keeps nothing alive; its artifact is broken anyway
        // (and a push in flight re-sends what is missing at commit).
        if let Ok(bytes) = ctl.chunks.manifest(m) {
            if let Ok(manifest) = Manifest::decode(&bytes) {
                live.extend(manifest.files().flat_map(|(_, _, _, c)| c.iter().map(|c| c.digest)));
            }
        }
    }
    let mut done = Collected::default();
    for (d, len) in ctl.chunks.chunk_digests()? {
        if !live.contains(&d) {
            ctl.chunks.remove_chunk(&d)?;
            done.chunks += 1;
            done.bytes += len;
        }
    }
    for d in ctl.chunks.manifest_digests()? {
        if !manifests.contains(&d) {
            ctl.chunks.remove_manifest(&d)?;
            done.manifests += 1;
        }
    }
    Ok(done)
}
