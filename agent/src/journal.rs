//! The per-app activation journal. Two files under `DATA/journal/`:
//!
//! - `<app>.seq`: the durable part, the last applied `seq` and an activation in progress.
//!   Two fixed slots written alternately in place, each with a generation and a checksum,
//!   one `fdatasync` per write: a write torn by a crash leaves the other slot intact.
//! - `<app>.json`: the last receipt, for answering a replay; replaced by rename, not
//!   fsynced (it survives `kill -9`; after a power cut a replay's answer is rebuilt).
//!
//! The applied `seq` is durable before the switch it allows becomes visible, so it is never
//! forgotten, whatever instant the agent is killed at.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use stagehand_common::protocol::Receipt;
use stagehand_common::{frame, fsx};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SLOT: usize = 1024;
const RECEIPT_LIMIT: u64 = 1 << 20;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Journal {
    /// The highest `seq` this host has applied (or begun to apply) for the app.
    pub last_seq: Option<u64>,
    /// An activation that began and has not yet committed or reverted.
    pub intent: Option<Intent>,
    /// The answer to `last_seq`, returned again for a replay of the same message.
    pub last_receipt: Option<Receipt>,
    #[serde(skip)]
    generation: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub seq: u64,
    pub version: String,
    /// What `current` pointed at before, to switch back to.
    pub previous: Option<String>,
}

/// What a slot holds.
#[derive(Serialize, Deserialize)]
struct Record {
    generation: u64,
    last_seq: Option<u64>,
    intent: Option<Intent>,
}

fn seq_path(path: &Path) -> PathBuf {
    path.with_extension("seq")
}

fn decode_slot(bytes: &[u8]) -> Option<Record> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let sum = bytes.get(4..12)?;
    let payload = bytes.get(12..12 + len)?;
    if &blake3::hash(payload).as_bytes()[..8] != sum {
        return None;
    }
    frame::decode::<Record, SLOT>(payload).ok()
}

impl Journal {
    /// Loads the journal whose receipt lives at `path` (`<app>.json`).
    pub fn load(path: &Path) -> Result<Journal> {
        let mut j = Journal::default();
        let seq = seq_path(path);
        match fsx::read_limited(&seq, 2 * SLOT as u64) {
            Ok(bytes) => {
                let best = bytes.chunks(SLOT).filter_map(decode_slot).max_by_key(|r| r.generation);
                match best {
                    Some(r) => {
                        j.generation = r.generation;
                        j.last_seq = r.last_seq;
                        j.intent = r.intent;
                    }
                    None if bytes.iter().all(|&b| b == 0) => {}
                    None => bail!("{} is corrupt in both slots; the last applied seq is unknown", seq.display()),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", seq.display())),
        }
        match fsx::read_limited(path, RECEIPT_LIMIT) {
            Ok(bytes) => j.last_receipt = serde_json::from_slice(&bytes).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        Ok(j)
    }

    /// Makes `last_seq` and `intent` durable (one fdatasync), then records the receipt.
    pub fn save(&mut self, path: &Path) -> Result<()> {
        self.save_durable(path)?;
        self.save_receipt(path)
    }

    /// Records an outcome: the slot is written but not fsynced (it survives `kill -9`; a
    /// power cut can only bring back the intent, which start-up then proves again).
    pub fn save_outcome(&mut self, path: &Path) -> Result<()> {
        self.write_slot(path, false)?;
        self.save_receipt(path)
    }

    /// The durable part only: on return it is on disk.
    pub fn save_durable(&mut self, path: &Path) -> Result<()> {
        self.write_slot(path, true)
    }

    fn write_slot(&mut self, path: &Path, durable: bool) -> Result<()> {
        let seq = seq_path(path);
        let file = open_slots(&seq)?;
        self.generation += 1;
        let payload = frame::encode(&Record {
            generation: self.generation,
            last_seq: self.last_seq,
            intent: self.intent.clone(),
        });
        if payload.len() + 12 > SLOT {
            bail!("journal record of {} bytes does not fit its slot", payload.len());
        }
        let mut slot = vec![0u8; SLOT];
        slot[..4].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        slot[4..12].copy_from_slice(&blake3::hash(&payload).as_bytes()[..8]);
        slot[12..12 + payload.len()].copy_from_slice(&payload);
        let at = (self.generation % 2) * SLOT as u64;
        file.write_all_at(&slot, at).with_context(|| format!("writing {}", seq.display()))?;
        if durable {
            file.sync_data().with_context(|| format!("fsync {}", seq.display()))?;
        }
        Ok(())
    }

    fn save_receipt(&self, path: &Path) -> Result<()> {
        let Some(r) = &self.last_receipt else { return Ok(()) };
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(r)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// Opens (creating durably on first use) the two-slot file.
fn open_slots(path: &Path) -> Result<File> {
    if let Ok(f) = OpenOptions::new().write(true).open(path) {
        return Ok(f);
    }
    let dir = path.parent().expect("journal files have a parent");
    std::fs::create_dir_all(dir)?;
    fsx::write_atomic(path, &[0u8; 2 * SLOT], 0o644)?;
    Ok(OpenOptions::new().write(true).open(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_a_torn_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.json");
        let mut j = Journal::load(&path).unwrap();
        assert_eq!(j.last_seq, None);
        j.last_seq = Some(4);
        j.save(&path).unwrap();
        j.last_seq = Some(5);
        j.intent = Some(Intent { seq: 5, version: "v2".into(), previous: Some("v1".into()) });
        j.save(&path).unwrap();
        let back = Journal::load(&path).unwrap();
        assert_eq!(back.last_seq, Some(5));
        assert_eq!(back.intent, j.intent);

        // Tear the newest slot: the previous record survives.
        let seq = seq_path(&path);
        let mut bytes = std::fs::read(&seq).unwrap();
        let newest = (j.generation % 2) as usize * SLOT;
        bytes[newest + 20] ^= 0xFF;
        std::fs::write(&seq, &bytes).unwrap();
        let back = Journal::load(&path).unwrap();
        assert_eq!(back.last_seq, Some(4));
        assert_eq!(back.intent, None);

        // Both torn: refuse to guess.
        let other = SLOT - newest;
        bytes[other + 20] ^= 0xFF;
        std::fs::write(&seq, &bytes).unwrap();
        assert!(Journal::load(&path).is_err());
    }
}
