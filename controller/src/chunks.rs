//! The content-addressed store on disk: `chunks/<2 hex>/<64 hex>` and `manifests/<64 hex>`.
//! A chunk is stored only after its bytes hash to its name; a file appears under its name
//! only by rename, so a crash leaves at worst a stray temporary file.

use stagehand_common::{fsx, Digest};
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Clone)]
pub struct ChunkStore {
    root: PathBuf,
}

impl ChunkStore {
    pub fn open(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(root.join("chunks"))?;
        std::fs::create_dir_all(root.join("manifests"))?;
        std::fs::create_dir_all(root.join("tmp"))?;
        // Temporaries left by a crash are never referenced: clear them.
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(ChunkStore { root: root.to_path_buf() })
    }

    /// Where a chunk lives.
    pub fn chunk_path(&self, d: &Digest) -> PathBuf {
        let hex = d.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    fn manifest_path(&self, d: &Digest) -> PathBuf {
        self.root.join("manifests").join(d.to_hex())
    }

    pub fn has(&self, d: &Digest) -> bool {
        self.chunk_path(d).exists()
    }

    /// Stores a chunk after checking its bytes against its digest; durable on return.
    pub fn put(&self, d: &Digest, bytes: &[u8]) -> io::Result<()> {
        if Digest::of(bytes) != *d {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("chunk {} does not match its digest", d.short()),
            ));
        }
        let path = self.chunk_path(d);
        if path.exists() {
            return Ok(());
        }
        let dir = path.parent().expect("chunk paths have a parent");
        std::fs::create_dir_all(dir)?;
        let tmp = self.root.join("tmp").join(format!("{}-{}", d.to_hex(), hex::encode(rand::random::<[u8; 4]>())));
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Makes the names of the given chunks durable (their shard directories).
    pub fn sync_dirs<'a>(&self, digests: impl Iterator<Item = &'a Digest>) -> io::Result<()> {
        let mut shards: Vec<String> = digests.map(|d| d.to_hex()[..2].to_string()).collect();
        shards.sort();
        shards.dedup();
        for s in shards {
            fsx::fsync_dir(&self.root.join("chunks").join(s))?;
        }
        fsx::fsync_dir(&self.root.join("chunks"))
    }

    pub fn get(&self, d: &Digest) -> io::Result<Vec<u8>> {
        fsx::read_limited(&self.chunk_path(d), stagehand_common::frame::CHUNK_LIMIT as u64)
    }

    pub fn put_manifest(&self, d: &Digest, bytes: &[u8]) -> io::Result<()> {
        fsx::write_atomic(&self.manifest_path(d), bytes, 0o644)
    }

    /// Every chunk stored, with its size.
    pub fn chunk_digests(&self) -> io::Result<Vec<(Digest, u64)>> {
        let mut all = Vec::new();
        for shard in std::fs::read_dir(self.root.join("chunks"))? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for e in std::fs::read_dir(shard.path())? {
                let e = e?;
                if let Some(d) = e.file_name().to_str().and_then(Digest::from_hex) {
                    all.push((d, e.metadata()?.len()));
                }
            }
        }
        Ok(all)
    }

    /// Every manifest stored.
    pub fn manifest_digests(&self) -> io::Result<Vec<Digest>> {
        let mut all = Vec::new();
        for e in std::fs::read_dir(self.root.join("manifests"))? {
            if let Some(d) = e?.file_name().to_str().and_then(Digest::from_hex) {
                all.push(d);
            }
        }
        Ok(all)
    }

    pub fn remove_chunk(&self, d: &Digest) -> io::Result<()> {
        match std::fs::remove_file(self.chunk_path(d)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn remove_manifest(&self, d: &Digest) -> io::Result<()> {
        match std::fs::remove_file(self.manifest_path(d)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn manifest(&self, d: &Digest) -> io::Result<Vec<u8>> {
        fsx::read_limited(&self.manifest_path(d), stagehand_common::frame::MANIFEST_LIMIT as u64)
    }
}
