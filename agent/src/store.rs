//! The agent's sled index: which versions are staged, with their digest and a seal of the
//! staged files, and the ctime the agent's own last link or unlink left on each inode that
//! versions share (`share.rs`), and what each staged version's `[verify]` said (`verify.rs`).
//! The filesystem (`releases/`, `current`, the journal) is the truth; this
//! index is rebuilt from it at start-up when it disagrees. Only this module touches sled.

use serde::{Deserialize, Serialize};
use stagehand_common::frame;
use stagehand_common::protocol::VerifyOutcome;
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

/// What a staged version's `[verify]` said, for the content it was staged with. Its own type,
/// not the wire's: a change of the protocol does not change what is on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRecord {
    pub v: u8,
    pub digest: Digest,
    pub outcome: StoredVerify,
}

impl VerifyRecord {
    pub const VERSION: u8 = 1;

    pub fn new(digest: Digest, outcome: &VerifyOutcome) -> Self {
        let outcome = match outcome {
            VerifyOutcome::Passed => StoredVerify::Passed,
            VerifyOutcome::Failed { log } => StoredVerify::Failed { log: log.clone() },
            VerifyOutcome::NotDeclared => StoredVerify::NotDeclared,
        };
        VerifyRecord { v: Self::VERSION, digest, outcome }
    }

    pub fn outcome(&self) -> VerifyOutcome {
        match &self.outcome {
            StoredVerify::Passed => VerifyOutcome::Passed,
            StoredVerify::Failed { log } => VerifyOutcome::Failed { log: log.clone() },
            StoredVerify::NotDeclared => VerifyOutcome::NotDeclared,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredVerify {
    Passed,
    Failed { log: String },
    NotDeclared,
}

/// A verify record of another version (or none that decodes) counts as absent: the
/// command runs again.
fn decode_verify(v: &[u8]) -> Option<VerifyRecord> {
    frame::decode::<VerifyRecord, RECORD_LIMIT>(v).ok().filter(|r| r.v == VerifyRecord::VERSION)
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
    verify: sled::Tree,
}

/// How many versions [`Store::ran`] remembers per app.
pub const RAN_LIMIT: usize = 16;
const RAN_BYTES: usize = 16 << 10;

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
        Ok(Store {
            staged: db.open_tree("staged")?,
            meta: db.open_tree("meta")?,
            shared: db.open_tree("shared")?,
            verify: db.open_tree("verify")?,
            db,
        })
    }

    pub fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush().map(|_| ())
    }

    pub fn put_staged(&self, app: &str, version: &str, r: &StagedRecord) -> Result<(), sled::Error> {
        self.staged.insert(key(app, version), frame::encode(r))?;
        Ok(())
    }

    /// Takes a version out of the index, with its verify result.
    pub fn remove_staged(&self, app: &str, version: &str) -> Result<(), sled::Error> {
        self.staged.remove(key(app, version))?;
        self.verify.remove(key(app, version))?;
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
        if swapped.is_ok() {
            self.verify.remove(key(app, version))?;
        }
        Ok(swapped.is_ok())
    }

    /// Records a verify result, only while the version is indexed with the digest it is
    /// for (atomically: a removal that wins leaves no result behind); false if it is not.
    pub fn put_verify(&self, app: &str, version: &str, r: &VerifyRecord) -> Result<bool, sled::Error> {
        use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
        let k = key(app, version);
        let value = frame::encode(r);
        let put = (&self.staged, &self.verify).transaction(|(staged, verify)| {
            let held = staged.get(&k)?.and_then(|v| frame::decode::<StagedRecord, RECORD_LIMIT>(&v).ok());
            if held.is_some_and(|s| s.digest == r.digest) {
                verify.insert(k.as_slice(), value.as_slice())?;
                return Ok(true);
            }
            Ok::<_, ConflictableTransactionError<()>>(false)
        });
        match put {
            Ok(put) => Ok(put),
            Err(TransactionError::Storage(e)) => Err(e),
            // Never raised: the closure aborts with nothing.
            Err(TransactionError::Abort(())) => Ok(false),
        }
    }

    /// The verify result recorded for a version, whatever digest it is for.
    pub fn verify_result(&self, app: &str, version: &str) -> Result<Option<VerifyRecord>, sled::Error> {
        Ok(self.verify.get(key(app, version))?.and_then(|v| decode_verify(&v)))
    }

    pub fn remove_verify(&self, app: &str, version: &str) -> Result<(), sled::Error> {
        self.verify.remove(key(app, version))?;
        Ok(())
    }

    /// Every (app, version) with a verify record, including those that do not decode (so
    /// that they can be removed).
    pub fn all_verify(&self) -> Result<Vec<(String, String, Option<VerifyRecord>)>, sled::Error> {
        let mut out = Vec::new();
        for kv in self.verify.iter() {
            let (k, v) = kv?;
            let k = String::from_utf8_lossy(&k).into_owned();
            if let Some((app, version)) = k.split_once('\0') {
                out.push((app.to_string(), version.to_string(), decode_verify(&v)));
            }
        }
        Ok(out)
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

    /// The versions an app ran here (committed), with the digest each ran with, oldest
    /// first, at most [`RAN_LIMIT`] (SPEC §14: going back to one needs no approvals). An index:
    /// lost, going back asks for approvals.
    pub fn ran(&self, app: &str) -> Vec<(String, Digest)> {
        let Some(v) = self.meta.get(format!("ran\0{app}")).ok().flatten() else { return Vec::new() };
        frame::decode::<Vec<(String, Digest)>, RAN_BYTES>(&v).unwrap_or_default()
    }

    /// Records that `version` (with `digest`) ran: it moves to the end of [`Store::ran`].
    pub fn add_ran(&self, app: &str, version: &str, digest: &Digest) -> Result<(), sled::Error> {
        let mut ran = self.ran(app);
        ran.retain(|(v, _)| v != version);
        ran.push((version.to_string(), *digest));
        let drop = ran.len().saturating_sub(RAN_LIMIT);
        ran.drain(..drop);
        self.meta.insert(format!("ran\0{app}"), frame::encode(&ran))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(digest: Digest) -> StagedRecord {
        StagedRecord { v: 1, digest, seal: Vec::new(), used_at: 1 }
    }

    #[test]
    fn a_verify_record_survives_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest([7; 32]);
        store.put_staged("web", "1", &staged(d)).unwrap();
        for outcome in [VerifyOutcome::Passed, VerifyOutcome::Failed { log: "no".into() }, VerifyOutcome::NotDeclared] {
            assert!(store.put_verify("web", "1", &VerifyRecord::new(d, &outcome)).unwrap());
            let back = store.verify_result("web", "1").unwrap().unwrap();
            assert_eq!((back.v, back.digest, back.outcome()), (VerifyRecord::VERSION, d, outcome));
        }
        assert_eq!(store.all_verify().unwrap().len(), 1);
    }

    /// A result is kept only for a version indexed with its digest, and leaves with it.
    #[test]
    fn a_verify_record_belongs_to_its_staged_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (d, other) = (Digest([1; 32]), Digest([2; 32]));
        let r = VerifyRecord::new(d, &VerifyOutcome::Passed);
        assert!(!store.put_verify("web", "1", &r).unwrap(), "not staged");
        store.put_staged("web", "1", &staged(other)).unwrap();
        assert!(!store.put_verify("web", "1", &r).unwrap(), "staged with other content");
        store.put_staged("web", "1", &staged(d)).unwrap();
        assert!(store.put_verify("web", "1", &r).unwrap());
        store.remove_staged("web", "1").unwrap();
        assert_eq!(store.verify_result("web", "1").unwrap(), None);

        store.put_staged("web", "2", &staged(d)).unwrap();
        assert!(store.put_verify("web", "2", &r).unwrap());
        assert!(!store.remove_staged_if("web", "2", &staged(other)).unwrap());
        assert!(store.verify_result("web", "2").unwrap().is_some(), "kept while the version stays");
        assert!(store.remove_staged_if("web", "2", &staged(d)).unwrap());
        assert_eq!(store.verify_result("web", "2").unwrap(), None);
    }

    /// A record written by another record version reads as absent.
    #[test]
    fn a_verify_record_of_another_version_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest([3; 32]);
        store.put_staged("web", "1", &staged(d)).unwrap();
        let r = VerifyRecord { v: 9, ..VerifyRecord::new(d, &VerifyOutcome::Passed) };
        assert!(store.put_verify("web", "1", &r).unwrap());
        assert_eq!(store.verify_result("web", "1").unwrap(), None);
        assert_eq!(store.all_verify().unwrap(), vec![("web".into(), "1".into(), None)]);
    }
}
