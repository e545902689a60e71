//! The per-app activation journal, `DATA/journal/<app>.json`: the last applied `seq`, an
//! activation in progress, and the last receipt. It is replaced atomically and fsynced
//! (write, fsync, rename, fsync the directory) before anything it records becomes visible:
//! the applied `seq` is never forgotten, whatever instant the agent is killed at.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use stagehand_common::fsx;
use stagehand_common::protocol::Receipt;
use std::path::Path;

const LIMIT: u64 = 1 << 20;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Journal {
    pub v: u8,
    /// The highest `seq` this host has applied (or begun to apply) for the app.
    pub last_seq: Option<u64>,
    /// An activation that began and has not yet committed or reverted.
    pub intent: Option<Intent>,
    /// The answer to `last_seq`, returned again for a replay of the same message.
    pub last_receipt: Option<Receipt>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Intent {
    pub seq: u64,
    pub version: String,
    /// What `current` pointed at before, to switch back to.
    pub previous: Option<String>,
}

impl Journal {
    pub fn load(path: &Path) -> Result<Journal> {
        match fsx::read_limited(path, LIMIT) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Journal {
                v: 1,
                ..Default::default()
            }),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Durable on return.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        fsx::write_atomic(path, &serde_json::to_vec_pretty(self)?, 0o644)
            .with_context(|| format!("writing {}", path.display()))
    }
}
