//! The agent's sled index: which versions are staged, with their digest and a seal of the
//! staged files, and the ctime the agent's own last link or unlink left on each inode that
//! versions share (`share.rs`). The filesystem (`releases/`, `current`, the journal) is the truth; this
//! index is rebuilt from it at start-up when it disagrees. Only this module touches sled.

use serde::{Deserialize, Serialize};
use stagehand_common::frame;
use stagehand_common::Digest;
use std::path::Path;

const RECORD_LIMIT: usize = 64 << 20;

/// A staged version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StagedRecord {
    pub v: u8,
    pub digest: Digest,
    pub seal: Vec<SealEntry>,
    /// When the version was last staged, ordered again or made live ([`Store::next_stamp`]:
    /// milliseconds since the epoch, never going backwards); 0 when
    /// re-indexed from disk. Retention keeps the most recently used.
    pub used_at: u64,
}

/// What a staged path looked like right after staging. Any write to a file or a directory
/// changes its ctime, which no one can set back, so a match means untouched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealEntry {
    pub path: String,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// A counter kept in `meta`: 8 big-endian bytes, 0 when absent or malformed.
fn counter(v: Option<&[u8]>) -> u64 {
    v.and_then(|v| <[u8; 8]>::try_from(v).ok()).map(u64::from_be_bytes).unwrap_or(0)
}

fn now_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    staged: sled::Tree,
    meta: sled::Tree,
    shared: sled::Tree,
}

fn key(app: &str, version: &str) -> Vec<u8> {
    format!("{app}\0{version}").into_bytes()
}

fn shared_key(app: &str, ino: u64) -> Vec<u8> {
    let mut k = format!("{app}\0").into_bytes();
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, sled::Error> {
        let db = sled::Config::new().path(dir).cache_capacity(8 << 20).open()?;
        Ok(Store { staged: db.open_tree("staged")?, meta: db.open_tree("meta")?, shared: db.open_tree("shared")?, db })
    }

    pub fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush().map(|_| ())
    }

    pub fn put_staged(&self, app: &str, version: &str, r: &StagedRecord) -> Result<(), sled::Error> {
        self.staged.insert(key(app, version), frame::encode(r))?;
        Ok(())
    }

    pub fn remove_staged(&self, app: &str, version: &str) -> Result<(), sled::Error> {
        self.staged.remove(key(app, version))?;
        Ok(())
    }

    /// A stamp for `used_at`: the wall clock in milliseconds, but always above the last
    /// stamp, so that a clock stepped backwards cannot make the newest version the oldest.
    pub fn next_stamp(&self) -> Result<u64, sled::Error> {
        let now = now_millis();
        let new = self.meta.update_and_fetch(b"stamp", |old| Some(now.max(counter(old) + 1).to_be_bytes().to_vec()))?;
        Ok(counter(new.as_deref()))
    }

    /// Changes a record that is still there; never brings back one removed meanwhile.
    pub fn update_staged(
        &self,
        app: &str,
        version: &str,
        f: impl Fn(StagedRecord) -> StagedRecord,
    ) -> Result<(), sled::Error> {
        self.staged.update_and_fetch(key(app, version), |old| {
            let old = old?;
            Some(match frame::decode::<StagedRecord, RECORD_LIMIT>(old) {
                Ok(r) => frame::encode(&f(r)),
                Err(_) => old.to_vec(),
            })
        })?;
        Ok(())
    }

    /// Marks a staged version as used now, if it is indexed.
    pub fn touch(&self, app: &str, version: &str) -> Result<(), sled::Error> {
        let stamp = self.next_stamp()?;
        self.update_staged(app, version, |r| StagedRecord { used_at: stamp, ..r })
    }

    /// Removes a record if it is exactly `expected` (nobody touched it since it was read);
    /// false if it changed or is gone.
    pub fn remove_staged_if(&self, app: &str, version: &str, expected: &StagedRecord) -> Result<bool, sled::Error> {
        let swapped =
            self.staged.compare_and_swap(key(app, version), Some(frame::encode(expected)), None::<Vec<u8>>)?;
        Ok(swapped.is_ok())
    }

    /// A record that cannot be decoded counts as absent (the index is rebuildable).
    pub fn staged(&self, app: &str, version: &str) -> Result<Option<StagedRecord>, sled::Error> {
        Ok(self.staged.get(key(app, version))?.and_then(|v| frame::decode::<StagedRecord, RECORD_LIMIT>(&v).ok()))
    }

    /// Every (app, version) in the index.
    pub fn all_staged(&self) -> Result<Vec<(String, String, StagedRecord)>, sled::Error> {
        let mut out = Vec::new();
        for kv in self.staged.iter() {
            let (k, v) = kv?;
            let k = String::from_utf8_lossy(&k).into_owned();
            let Some((app, version)) = k.split_once('\0') else {
                continue;
            };
            if let Ok(r) = frame::decode::<StagedRecord, RECORD_LIMIT>(&v) {
                out.push((app.to_string(), version.to_string(), r));
            }
        }
        Ok(out)
    }

    /// The ctime the agent's own last link or unlink left on inode `ino` of `app`'s root.
    pub fn shared_ctime(&self, app: &str, ino: u64) -> Option<i64> {
        let v = self.shared.get(shared_key(app, ino)).ok().flatten()?;
        <[u8; 8]>::try_from(&v[..]).ok().map(i64::from_be_bytes)
    }

    pub fn set_shared_ctime(&self, app: &str, ino: u64, ctime_ns: i64) -> Result<(), sled::Error> {
        self.shared.insert(shared_key(app, ino), &ctime_ns.to_be_bytes())?;
        Ok(())
    }

    pub fn forget_shared(&self, app: &str, ino: u64) -> Result<(), sled::Error> {
        self.shared.remove(shared_key(app, ino))?;
        Ok(())
    }

    /// Inodes of `app` with a recorded ctime.
    pub fn shared_inodes(&self, app: &str) -> Vec<u64> {
        let prefix = format!("{app}\0").into_bytes();
        self.shared
            .scan_prefix(&prefix)
            .keys()
            .flatten()
            .filter_map(|k| <[u8; 8]>::try_from(&k[prefix.len()..]).ok().map(u64::from_be_bytes))
            .collect()
    }

    /// The latest wall-clock second this agent has seen: a clock stepped backwards cannot
    /// revive an expired message.
    pub fn latest_time(&self) -> u64 {
        counter(self.meta.get(b"latest_time").ok().flatten().as_deref())
    }

    pub fn set_latest_time(&self, t: u64) -> Result<(), sled::Error> {
        if t <= self.latest_time() {
            return Ok(());
        }
        self.meta.fetch_and_update(b"latest_time", |old| Some(counter(old).max(t).to_be_bytes().to_vec()))?;
        Ok(())
    }
}
