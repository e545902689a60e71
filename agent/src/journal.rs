//! The per-app activation journal, `DATA/journal/<app>.journal`, one file of fixed layout:
//!
//! - two 1 KiB slots, the durable part: the last applied `seq` and an activation in progress.
//!   Written alternately in place, each with a generation and a checksum, one `fdatasync` per
//!   durable write: a write torn by a crash leaves the other slot intact;
//! - a receipt region: the last receipt, for answering a replay. Written in place without
//!   waiting for the disk (it survives `kill -9`; after a power cut a replay's answer is
//!   rebuilt from what is live).
//!
//! Writing in place keeps an activation free of file creations and renames: the only
//! metadata operation on its path is the switch of `current` itself.
//! The applied `seq` is durable before the switch it allows becomes visible, so it is never
//! forgotten, whatever instant the agent is killed at.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use stagehand_common::protocol::Receipt;
use stagehand_common::{frame, fsx};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

const SLOT: usize = 1024;
const RECEIPT_AT: usize = 2 * SLOT;
const FILE_SIZE: usize = 64 << 10;

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

/// A region: length, 8 bytes of BLAKE3, payload. `None` if torn or empty.
fn region(bytes: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let sum = bytes.get(4..12)?;
    let payload = bytes.get(12..12 + len)?;
    (len > 0 && &blake3::hash(payload).as_bytes()[..8] == sum).then_some(payload)
}

fn encode_region(payload: &[u8], size: usize) -> Option<Vec<u8>> {
    if payload.len() + 12 > size {
        return None;
    }
    let mut out = Vec::with_capacity(12 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&blake3::hash(payload).as_bytes()[..8]);
    out.extend_from_slice(payload);
    Some(out)
}

fn decode_slot(bytes: &[u8]) -> Option<Record> {
    frame::decode::<Record, SLOT>(region(bytes)?).ok()
}

impl Journal {
    /// Loads an app's journal; a missing file is an app never activated.
    pub fn load(path: &Path) -> Result<Journal> {
        let bytes = match fsx::read_limited(path, FILE_SIZE as u64) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Journal::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Self::parse(&bytes).with_context(|| path.display().to_string())
    }

    /// A journal from its file's bytes (at most the file's size).
    pub fn parse(bytes: &[u8]) -> Result<Journal> {
        let mut j = Journal::default();
        let slots = bytes.get(..RECEIPT_AT).unwrap_or(bytes);
        match slots.chunks(SLOT).filter_map(decode_slot).max_by_key(|r| r.generation) {
            Some(r) => {
                j.generation = r.generation;
                j.last_seq = r.last_seq;
                j.intent = r.intent;
            }
            None if slots.iter().all(|&b| b == 0) => {}
            None => bail!("corrupt in both slots; the last applied seq is unknown"),
        }
        j.last_receipt = bytes.get(RECEIPT_AT..).and_then(region).and_then(|p| serde_json::from_slice(p).ok());
        Ok(j)
    }

    /// The durable part: on return, `last_seq` and `intent` are on disk.
    pub fn save_durable(&mut self, path: &Path) -> Result<()> {
        let file = open(path)?;
        // The newest slot may hold an outcome not yet on disk; this write goes to the other
        // slot, which may be the only durable one. Make the newest durable first, so a torn
        // write here can never fall back past it. (Free when nothing is pending.)
        file.sync_data().with_context(|| format!("fsync {}", path.display()))?;
        self.write_slot(&file, path)?;
        file.sync_data().with_context(|| format!("fsync {}", path.display()))
    }

    /// Records an outcome and its receipt without waiting for the disk (it survives
    /// `kill -9`; a power cut can only bring back the intent, which start-up proves again).
    pub fn save_outcome(&mut self, path: &Path) -> Result<()> {
        let file = open(path)?;
        self.write_slot(&file, path)?;
        if let Some(r) = &self.last_receipt {
            let json = serde_json::to_vec(r)?;
            if let Some(region) = encode_region(&json, FILE_SIZE - RECEIPT_AT) {
                file.write_all_at(&region, RECEIPT_AT as u64).with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Ok(())
    }

    fn write_slot(&mut self, file: &File, path: &Path) -> Result<()> {
        self.generation += 1;
        let payload = frame::encode(&Record {
            generation: self.generation,
            last_seq: self.last_seq,
            intent: self.intent.clone(),
        });
        let Some(mut slot) = encode_region(&payload, SLOT) else {
            bail!("journal record of {} bytes does not fit its slot", payload.len());
        };
        slot.resize(SLOT, 0);
        let at = (self.generation % 2) * SLOT as u64;
        file.write_all_at(&slot, at).with_context(|| format!("writing {}", path.display()))
    }
}

/// Opens the journal file, creating it (full size, durably) only if it does not exist: any
/// other error is reported, never answered by starting a fresh journal.
fn open(path: &Path) -> Result<File> {
    match OpenOptions::new().write(true).open(path) {
        Ok(f) => return Ok(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    }
    let dir = path.parent().expect("journal files have a parent");
    fsx::create_dir_all_durable(dir).with_context(|| format!("creating {}", dir.display()))?;
    fsx::write_atomic(path, &vec![0u8; FILE_SIZE], 0o644)?;
    Ok(OpenOptions::new().write(true).open(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_a_torn_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.journal");
        let mut j = Journal::load(&path).unwrap();
        assert_eq!(j.last_seq, None);
        j.last_seq = Some(4);
        j.save_durable(&path).unwrap();
        j.last_seq = Some(5);
        j.intent = Some(Intent { seq: 5, version: "v2".into(), previous: Some("v1".into()) });
        j.save_durable(&path).unwrap();
        let back = Journal::load(&path).unwrap();
        assert_eq!(back.last_seq, Some(5));
        assert_eq!(back.intent, j.intent);
        assert!(back.last_receipt.is_none());

        // Tear the newest slot: the previous record survives.
        let seq = path.clone();
        let mut bytes = std::fs::read(&seq).unwrap();
        let newest = (j.generation % 2) as usize * SLOT;
        bytes[newest + 20] ^= 0xFF;
        std::fs::write(&seq, &bytes).unwrap();
        let back = Journal::load(&path).unwrap();
        assert_eq!(back.last_seq, Some(4));
        assert_eq!(back.intent, None);

        // An outcome with its receipt.
        let mut j = Journal::load(&path).unwrap();
        j.intent = None;
        j.last_receipt = Some(Receipt {
            agent_id: stagehand_common::AgentId("a-1".into()),
            app: "web".into(),
            version: "v1".into(),
            seq: 4,
            outcome: stagehand_common::protocol::ReceiptOutcome::Committed,
            active: Some("v1".into()),
            log: "ok".into(),
            check_us: 1,
            switch_us: 2,
            total_us: 3,
            at: 4,
            applied: true,
        });
        j.save_outcome(&path).unwrap();
        let back = Journal::load(&path).unwrap();
        assert_eq!(back.last_receipt, j.last_receipt);
        assert_eq!(back.last_seq, Some(4));
        let mut bytes = std::fs::read(&seq).unwrap();

        // Both torn: refuse to guess.
        bytes[20] ^= 0xFF;
        bytes[SLOT + 20] ^= 0xFF;
        std::fs::write(&seq, &bytes).unwrap();
        assert!(Journal::load(&path).is_err());
    }
}
