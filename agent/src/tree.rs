//! Checking a staged tree against its manifest: the full check (every byte hashed) and the
//! quick one (a seal of inode, size, mtime and ctime taken right after staging, checked by
//! `share::Ledger::check`, which knows what the agent's own links did to shared inodes).

use crate::store::SealEntry;
use stagehand_common::manifest::{self, EntryKind, Manifest};
use stagehand_common::Digest;
use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Takes the seal of a staged tree (the root and every entry).
pub fn seal(root: &Path, m: &Manifest) -> std::io::Result<Vec<SealEntry>> {
    let mut out = Vec::with_capacity(m.entries.len() + 1);
    out.push(seal_entry(root, "")?);
    for e in &m.entries {
        out.push(seal_entry(&manifest::join(root, &e.path), &e.path)?);
    }
    Ok(out)
}

/// What `path` (`rel` in its tree) looks like now, as a seal records it.
pub fn seal_entry(path: &Path, rel: &str) -> std::io::Result<SealEntry> {
    Ok(stamp(&std::fs::symlink_metadata(path)?, rel))
}

/// What the full check found wrong, and where (relative to the tree's root).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub path: String,
    pub what: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.what)
        } else {
            write!(f, "{}: {}", self.path, self.what)
        }
    }
}

/// Reads the whole tree and checks it against the manifest: entries, kinds, modes, link
/// targets and every chunk's bytes, and nothing extra. Returns the tree's seal as it was
/// read: each file is stamped (`fstat`) before its bytes are read and must look the same
/// after, so a write racing the read can never be sealed as good.
pub fn verify(root: &Path, m: &Manifest) -> Result<Vec<SealEntry>, Damage> {
    let whole = |what: String| Damage { path: String::new(), what };
    let root_before = seal_entry(root, "").map_err(|e| whole(e.to_string()))?;
    let mut seal = vec![root_before.clone()];
    let mut expected: HashSet<String> = HashSet::new();
    for e in &m.entries {
        expected.insert(e.path.clone());
        let damage = |what: String| Damage { path: e.path.clone(), what };
        let path = manifest::join(root, &e.path);
        let md = std::fs::symlink_metadata(&path).map_err(|err| damage(err.to_string()))?;
        match &e.kind {
            EntryKind::Dir { .. } if md.is_dir() => seal.push(stamp(&md, &e.path)),
            EntryKind::Symlink { target } if md.file_type().is_symlink() => {
                let actual = std::fs::read_link(&path).map_err(|err| damage(err.to_string()))?;
                if actual != Path::new(target) {
                    return Err(damage("symlink changed".into()));
                }
                seal.push(stamp(&md, &e.path));
            }
            EntryKind::File { mode, size, chunks } if md.is_file() => {
                let mut f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(|err| damage(err.to_string()))?;
                let before = f.metadata().map_err(|err| damage(err.to_string()))?;
                if before.len() != *size {
                    return Err(damage("size changed".into()));
                }
                if before.permissions().mode() & 0o777 != *mode {
                    return Err(damage("mode changed".into()));
                }
                let mut buf = Vec::new();
                for c in chunks.iter() {
                    buf.resize(c.len as usize, 0);
                    f.read_exact(&mut buf).map_err(|err| damage(err.to_string()))?;
                    if Digest::of(&buf) != c.digest {
                        return Err(damage("content does not match the manifest".into()));
                    }
                }
                let after = f.metadata().map_err(|err| damage(err.to_string()))?;
                let (b, a) = (stamp(&before, &e.path), stamp(&after, &e.path));
                if a != b {
                    return Err(damage("changed while it was being read".into()));
                }
                seal.push(b);
            }
            _ => return Err(damage("not the kind of entry the manifest says".into())),
        }
    }
    let mut found = Vec::new();
    walk(root, "", &mut found).map_err(|e| whole(format!("listing {}: {e}", root.display())))?;
    if let Some(extra) = found.iter().find(|p| !expected.contains(*p)) {
        return Err(Damage { path: extra.clone(), what: "not part of the artifact".into() });
    }
    if seal_entry(root, "").map_err(|e| whole(e.to_string()))? != root_before {
        return Err(whole("the release directory changed while it was being read".into()));
    }
    Ok(seal)
}

fn stamp(md: &std::fs::Metadata, rel: &str) -> SealEntry {
    SealEntry {
        path: rel.to_string(),
        ino: md.ino(),
        size: md.size(),
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
    }
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> std::io::Result<()> {
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let name = item.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        if item.file_type()?.is_dir() {
            walk(&item.path(), &rel, out)?;
        }
        out.push(rel);
    }
    Ok(())
}
