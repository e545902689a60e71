//! Checking a staged tree against its manifest: the full check (every byte hashed) and the
//! quick one (a seal of inode, size, mtime and ctime taken right after staging).

use crate::store::SealEntry;
use stagehand_common::manifest::{self, EntryKind, Manifest};
use stagehand_common::Digest;
use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
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

fn seal_entry(path: &Path, rel: &str) -> std::io::Result<SealEntry> {
    let md = std::fs::symlink_metadata(path)?;
    Ok(SealEntry {
        path: rel.to_string(),
        ino: md.ino(),
        size: md.size(),
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
    })
}

/// True if every sealed path still looks exactly as it did after staging.
pub fn seal_holds(root: &Path, seal: &[SealEntry]) -> bool {
    !seal.is_empty()
        && seal.iter().all(|s| {
            let path = if s.path.is_empty() { root.to_path_buf() } else { manifest::join(root, &s.path) };
            seal_entry(&path, &s.path).is_ok_and(|now| now == *s)
        })
}

/// Reads the whole tree and checks it against the manifest: entries, kinds, modes, link
/// targets and every chunk's bytes, and nothing extra.
pub fn verify(root: &Path, m: &Manifest) -> Result<(), String> {
    let mut expected: HashSet<String> = HashSet::new();
    for e in &m.entries {
        expected.insert(e.path.clone());
        let path = manifest::join(root, &e.path);
        let md = std::fs::symlink_metadata(&path).map_err(|err| format!("{}: {err}", e.path))?;
        match &e.kind {
            EntryKind::Dir { .. } if md.is_dir() => {}
            EntryKind::Symlink { target } if md.file_type().is_symlink() => {
                let actual = std::fs::read_link(&path).map_err(|err| format!("{}: {err}", e.path))?;
                if actual != Path::new(target) {
                    return Err(format!("{}: symlink changed", e.path));
                }
            }
            EntryKind::File { mode, size, chunks } if md.is_file() => {
                if md.len() != *size {
                    return Err(format!("{}: size changed", e.path));
                }
                if md.permissions().mode() & 0o777 != *mode {
                    return Err(format!("{}: mode changed", e.path));
                }
                let mut f = File::open(&path).map_err(|err| format!("{}: {err}", e.path))?;
                let mut buf = Vec::new();
                for c in chunks.iter() {
                    buf.resize(c.len as usize, 0);
                    f.read_exact(&mut buf).map_err(|err| format!("{}: {err}", e.path))?;
                    if Digest::of(&buf) != c.digest {
                        return Err(format!("{}: content does not match the manifest", e.path));
                    }
                }
            }
            _ => return Err(format!("{}: not the kind of entry the manifest says", e.path)),
        }
    }
    let mut found = Vec::new();
    walk(root, "", &mut found).map_err(|e| format!("listing {}: {e}", root.display()))?;
    if let Some(extra) = found.iter().find(|p| !expected.contains(*p)) {
        return Err(format!("{extra}: not part of the artifact"));
    }
    Ok(())
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
