//! The store in sled, in the data directory: one controller, always the one that drives.

use super::backend::{Backend, Swapped, Table, Val};
use super::{Result, StoreError};
use std::path::Path;

pub struct Sled {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    flushes: Flushes,
    /// Never bumped: nobody else writes this database.
    changes: tokio::sync::watch::Sender<u64>,
}

/// Group commit for [`Sled::flush`]: callers that ask at once share one sled flush.
#[derive(Default)]
struct Flushes {
    /// Bumped by every caller, after its writes and before it waits.
    asked: std::sync::atomic::AtomicU64,
    /// The highest ask the last completed flush covers.
    done: std::sync::Mutex<u64>,
}

impl Sled {
    pub fn open(dir: &Path) -> Result<Self> {
        let open = || {
            sled::Config::new().path(dir).cache_capacity(64 << 20).open().map_err(|e| match &e {
                // sled reports the lock it could not take as an error of its own making.
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("could not acquire lock") =>
                {
                    StoreError::Locked(dir.display().to_string())
                }
                _ => StoreError::Sled(e),
            })
        };
        // A database this process just closed (`controller init`, then `serve` in one process:
        // the tests, a restart) keeps its lock until sled's background threads let go of it,
        // which may take a moment on a loaded machine: a lock is waited for up to 2 s.
        let mut tries = 0;
        let db = loop {
            match open() {
                Err(StoreError::Locked(_)) if tries < 40 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => break other?,
            }
        };
        let trees = Table::ALL.iter().map(|t| db.open_tree(t.name())).collect::<std::result::Result<_, _>>()?;
        Ok(Sled { db, trees, flushes: Flushes::default(), changes: tokio::sync::watch::channel(0).0 })
    }

    fn tree(&self, t: Table) -> &sled::Tree {
        &self.trees[t as usize]
    }
}

impl Backend for Sled {
    fn get(&self, t: Table, key: &[u8]) -> Result<Option<Val>> {
        Ok(self.tree(t).get(key)?.map(Val::Sled))
    }

    fn scan(&self, t: Table, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Val)>> {
        self.tree(t)
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((k.to_vec(), Val::Sled(v)))
            })
            .collect()
    }

    fn put(&self, t: Table, key: &[u8], value: Vec<u8>) -> Result<()> {
        self.tree(t).insert(key, value)?;
        Ok(())
    }

    fn remove(&self, t: Table, key: &[u8]) -> Result<()> {
        self.tree(t).remove(key)?;
        Ok(())
    }

    /// One controller: nobody else reads between the two writes.
    fn swap_and_put(
        &self,
        t: Table,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<Vec<u8>>,
        then: Vec<(Table, Vec<u8>, Vec<u8>)>,
    ) -> Result<Swapped> {
        let swapped = self.tree(t).compare_and_swap(key, old, new)?.map_err(|e| e.current.map(Val::Sled));
        if swapped.is_ok() {
            for (t, k, v) in then {
                self.tree(t).insert(k, v)?;
            }
        }
        Ok(swapped)
    }

    /// Blocks (an fsync). Callers that ask while a flush runs share the next one: at 10,000
    /// agents reconnecting at once, a few fsyncs instead of one each.
    fn flush(&self) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let mine = self.flushes.asked.fetch_add(1, SeqCst) + 1;
        let mut done = self.flushes.done.lock().unwrap_or_else(|p| p.into_inner());
        if *done >= mine {
            return Ok(());
        }
        // Every ask up to here was made after its writes: this flush covers them all.
        let covers = self.flushes.asked.load(SeqCst);
        self.db.flush()?;
        *done = covers;
        Ok(())
    }

    /// Presence is only kept for other controllers: one controller knows its own sessions.
    fn set_ephemeral(&self, _: Table, _: &[u8], _: Option<Vec<u8>>) -> Result<()> {
        Ok(())
    }

    fn shared(&self) -> bool {
        false
    }

    fn is_leader(&self) -> bool {
        true
    }

    fn writable(&self) -> Result<()> {
        Ok(())
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn take_changed(&self) -> u32 {
        0
    }
}
