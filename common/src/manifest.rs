//! Artifacts as manifests: a tree of directories, files (as content-defined chunks) and
//! symlinks. An artifact's digest is the BLAKE3 of its encoded manifest, so the same
//! content always has the same digest whatever its app or version.

use crate::frame;
use crate::ids::Digest;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Smallest, average and largest chunk (FastCDC). Large enough that per-chunk costs
/// (a request entry, a file in the controller's store) stay small against the bytes.
pub const CHUNK_MIN: u32 = 64 * 1024;
pub const CHUNK_AVG: u32 = 256 * 1024;
pub const CHUNK_MAX: u32 = 1024 * 1024;

/// A directory tree or a single file, as the agent must rebuild it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Entries sorted by path; a directory comes before what it holds.
    pub entries: Vec<Entry>,
}

/// One path in the tree, relative to its root, `/`-separated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
}

/// What lives at a path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    Dir { mode: u32 },
    File { mode: u32, size: u64, chunks: Vec<ChunkRef> },
    Symlink { target: String },
}

/// One chunk of a file, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub digest: Digest,
    pub len: u32,
}

/// Where a chunk's bytes can be read on the machine that built the manifest.
#[derive(Clone, Debug)]
pub struct ChunkSource {
    pub digest: Digest,
    pub path: PathBuf,
    pub offset: u64,
    pub len: u32,
}

/// Why a tree cannot be an artifact.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A path or symlink would reach outside the artifact's root.
    #[error("unsafe path {path:?}: {why}")]
    UnsafePath { path: String, why: String },
    /// The manifest contradicts itself.
    #[error("inconsistent manifest: {0}")]
    Inconsistent(String),
    /// Something other than a file, directory or symlink.
    #[error("unsupported file type at {0}")]
    Unsupported(PathBuf),
    /// Reading the tree failed.
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io { path: path.to_path_buf(), source }
}

impl Manifest {
    /// Encodes the manifest canonically.
    pub fn encode(&self) -> Vec<u8> {
        frame::encode(self)
    }

    /// Decodes and validates a manifest received from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let m: Manifest = frame::decode::<_, { frame::MANIFEST_LIMIT }>(bytes)
            .map_err(|e| ManifestError::Inconsistent(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// The artifact digest.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.encode())
    }

    /// Total bytes of file content.
    pub fn total_size(&self) -> u64 {
        self.files().map(|(_, _, size, _)| size).sum()
    }

    /// Iterates over files: (path, mode, size, chunks).
    pub fn files(&self) -> impl Iterator<Item = (&str, u32, u64, &[ChunkRef])> {
        self.entries.iter().filter_map(|e| match &e.kind {
            EntryKind::File { mode, size, chunks } => Some((e.path.as_str(), *mode, *size, &chunks[..])),
            _ => None,
        })
    }

    /// Checks every rule a staged tree relies on: safe, unique, ordered paths; symlinks
    /// that stay inside the root; sizes that match their chunks.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let links: HashSet<&str> = self
            .entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Symlink { .. }))
            .map(|e| e.path.as_str())
            .collect();
        let mut dirs: HashSet<&str> = HashSet::new();
        dirs.insert("");
        let mut prev: Option<&str> = None;
        for e in &self.entries {
            check_rel_path(&e.path)?;
            if let Some(p) = prev {
                if p >= e.path.as_str() {
                    return Err(ManifestError::Inconsistent(format!(
                        "paths out of order or repeated: {p:?} then {:?}",
                        e.path
                    )));
                }
            }
            prev = Some(&e.path);
            let parent = e.path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
            if !dirs.contains(parent) {
                return Err(ManifestError::Inconsistent(format!("{:?} has no parent directory entry", e.path)));
            }
            if let EntryKind::Dir { mode } | EntryKind::File { mode, .. } = &e.kind {
                // Permission bits only: no setuid, setgid or sticky bit comes in through a deploy.
                if mode & !0o777 != 0 {
                    return Err(ManifestError::UnsafePath {
                        path: e.path.clone(),
                        why: format!("mode {mode:o} has bits beyond 0o777"),
                    });
                }
            }
            match &e.kind {
                EntryKind::Dir { .. } => {
                    dirs.insert(&e.path);
                }
                EntryKind::File { size, chunks, .. } => {
                    let sum: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
                    if sum != *size || chunks.iter().any(|c| c.len == 0 || c.len > CHUNK_MAX) {
                        return Err(ManifestError::Inconsistent(format!(
                            "{:?}: chunks do not add up to its size",
                            e.path
                        )));
                    }
                }
                EntryKind::Symlink { target } => check_link_target(&e.path, target, &links)?,
            }
        }
        Ok(())
    }
}

/// A relative path of normal components only.
fn check_rel_path(path: &str) -> Result<(), ManifestError> {
    let bad = |why: &str| ManifestError::UnsafePath { path: path.to_string(), why: why.to_string() };
    if path.is_empty() || path.len() > 4096 {
        return Err(bad("empty or longer than 4096 bytes"));
    }
    if path.starts_with('/') {
        return Err(bad("absolute"));
    }
    for part in path.split('/') {
        match part {
            "" => return Err(bad("empty component")),
            "." | ".." => return Err(bad("'.' or '..' component")),
            p if p.contains('\0') => return Err(bad("NUL byte")),
            _ => {}
        }
    }
    Ok(())
}

/// A symlink target must be relative and, resolved lexically from the link's directory,
/// stay inside the root.
fn check_link_target(link: &str, target: &str, links: &HashSet<&str>) -> Result<(), ManifestError> {
    let bad =
        |why: &str| ManifestError::UnsafePath { path: link.to_string(), why: format!("symlink to {target:?} {why}") };
    if target.is_empty() || target.contains('\0') || target.len() > 4096 {
        return Err(bad("is empty or malformed"));
    }
    if target.starts_with('/') {
        return Err(bad("is absolute"));
    }
    let mut depth: Vec<&str> = link.split('/').collect();
    depth.pop();
    let parts: Vec<&str> = target.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        match *part {
            "" | "." => {}
            ".." => {
                if depth.pop().is_none() {
                    return Err(bad("escapes the artifact"));
                }
            }
            p => {
                depth.push(p);
                // Text alone cannot follow a symlink: going on through one could land anywhere.
                let more = parts[i + 1..].iter().any(|q| !q.is_empty() && *q != ".");
                if more && links.contains(depth.join("/").as_str()) {
                    return Err(bad("passes through another symlink"));
                }
            }
        }
    }
    Ok(())
}

/// Reads a file or directory into a manifest and the places its chunks can be read from.
/// A single file becomes a tree holding that one file under its own name.
pub fn build(root: &Path) -> Result<(Manifest, Vec<ChunkSource>), ManifestError> {
    let meta = std::fs::symlink_metadata(root).map_err(io_err(root))?;
    let mut entries = Vec::new();
    let mut sources = Vec::new();
    if meta.is_file() {
        let name = root
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| ManifestError::UnsafePath {
                path: root.display().to_string(),
                why: "file name is not UTF-8".into(),
            })?
            .to_string();
        entries.push(file_entry(root, name, &meta, &mut sources)?);
    } else if meta.is_dir() {
        walk(root, "", &mut entries, &mut sources)?;
        // Byte order of whole paths; a parent, being a prefix, still precedes its children.
        entries.sort_by(|a, b| a.path.cmp(&b.path));
    } else {
        return Err(ManifestError::Unsupported(root.to_path_buf()));
    }
    let manifest = Manifest { entries };
    manifest.validate()?;
    Ok((manifest, sources))
}

fn walk(
    dir: &Path,
    prefix: &str,
    entries: &mut Vec<Entry>,
    sources: &mut Vec<ChunkSource>,
) -> Result<(), ManifestError> {
    let mut names = Vec::new();
    for item in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let item = item.map_err(io_err(dir))?;
        let name = item.file_name().into_string().map_err(|n| ManifestError::UnsafePath {
            path: n.to_string_lossy().into_owned(),
            why: "name is not UTF-8".into(),
        })?;
        names.push(name);
    }
    for name in names {
        let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        let path = dir.join(&name);
        let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            entries.push(Entry { path: rel.clone(), kind: EntryKind::Dir { mode: meta.permissions().mode() & 0o777 } });
            walk(&path, &rel, entries, sources)?;
        } else if ft.is_file() {
            entries.push(file_entry(&path, rel, &meta, sources)?);
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).map_err(io_err(&path))?;
            let target = target.to_str().ok_or_else(|| ManifestError::UnsafePath {
                path: rel.clone(),
                why: "symlink target is not UTF-8".into(),
            })?;
            check_link_target(&rel, target, &HashSet::new())?;
            entries.push(Entry { path: rel, kind: EntryKind::Symlink { target: target.to_string() } });
        } else {
            return Err(ManifestError::Unsupported(path));
        }
    }
    Ok(())
}

fn file_entry(
    path: &Path,
    rel: String,
    meta: &std::fs::Metadata,
    sources: &mut Vec<ChunkSource>,
) -> Result<Entry, ManifestError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut chunks = Vec::new();
    let mut size = 0u64;
    for chunk in chunk_reader(file) {
        let chunk = chunk.map_err(|e| ManifestError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let digest = Digest::of(&chunk.data);
        let len = chunk.length as u32;
        sources.push(ChunkSource { digest, path: path.to_path_buf(), offset: chunk.offset, len });
        chunks.push(ChunkRef { digest, len });
        size += u64::from(len);
    }
    Ok(Entry { path: rel, kind: EntryKind::File { mode: meta.permissions().mode() & 0o777, size, chunks } })
}

/// Content-defined chunks of a reader.
pub fn chunk_reader<R: Read>(r: R) -> fastcdc::v2020::StreamCDC<R> {
    fastcdc::v2020::StreamCDC::new(r, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
}

/// Joins a manifest path under a root, for use after [`Manifest::validate`].
pub fn join(root: &Path, rel: &str) -> PathBuf {
    let mut p = root.to_path_buf();
    for part in Path::new(rel).components() {
        if let Component::Normal(n) = part {
            p.push(n);
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry { path: path.into(), kind }
    }

    #[test]
    fn builds_a_tree_with_modes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/run"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(root.join("bin/run"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        symlink("bin/run", root.join("link")).unwrap();
        let (m, sources) = build(root).unwrap();
        let paths: Vec<_> = m.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["bin", "bin/run", "empty", "link"]);
        assert!(matches!(m.entries[1].kind, EntryKind::File { mode: 0o755, size: 10, .. }));
        assert!(matches!(&m.entries[2].kind, EntryKind::File { size: 0, chunks, .. } if chunks.is_empty()));
        assert_eq!(sources.len(), 1);
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn escaping_symlink_is_refused_when_building() {
        let dir = tempfile::tempdir().unwrap();
        symlink("../../etc/passwd", dir.path().join("evil")).unwrap();
        assert!(matches!(build(dir.path()), Err(ManifestError::UnsafePath { .. })));
    }

    #[test]
    fn unsafe_manifests_are_refused() {
        let dir = EntryKind::Dir { mode: 0o755 };
        let cases = vec![
            vec![entry("../x", dir.clone())],
            vec![entry("/abs", dir.clone())],
            vec![entry("a//b", dir.clone())],
            vec![entry("a/./b", dir.clone())],
            vec![entry("l", EntryKind::Symlink { target: "/etc".into() })],
            vec![entry("a", dir.clone()), entry("a/l", EntryKind::Symlink { target: "../../x".into() })],
            vec![entry("b", dir.clone()), entry("a", dir.clone())],
            vec![entry("a/b", dir.clone())],
            vec![entry("f", EntryKind::File { mode: 0o644, size: 5, chunks: vec![] })],
        ];
        for entries in cases {
            let m = Manifest { entries: entries.clone() };
            assert!(m.validate().is_err(), "{entries:?}");
        }
        // A symlink that goes on through another symlink (`a/up -> ..`, then `x -> a/up/../../etc`).
        let through = Manifest {
            entries: vec![
                entry("a", dir.clone()),
                entry("a/up", EntryKind::Symlink { target: "..".into() }),
                entry("x", EntryKind::Symlink { target: "a/up/../../etc".into() }),
            ],
        };
        assert!(matches!(through.validate(), Err(ManifestError::UnsafePath { .. })));
        // setuid and friends are refused.
        let setuid = Manifest { entries: vec![entry("f", EntryKind::File { mode: 0o4755, size: 0, chunks: vec![] })] };
        assert!(setuid.validate().is_err());
        let sticky = Manifest { entries: vec![entry("d", EntryKind::Dir { mode: 0o1777 })] };
        assert!(sticky.validate().is_err());
        let ok =
            Manifest { entries: vec![entry("a", dir), entry("a/l", EntryKind::Symlink { target: "../x".into() })] };
        ok.validate().unwrap();
    }

    #[test]
    fn content_defined_chunks_survive_an_insert() {
        use rand::{RngCore, SeedableRng};
        let mut data = vec![0u8; 4_000_000];
        rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut data);
        let a: Vec<Digest> = chunk_reader(&data[..]).map(|c| Digest::of(&c.unwrap().data)).collect();
        data.splice(100..100, [1, 2, 3]);
        let b: Vec<Digest> = chunk_reader(&data[..]).map(|c| Digest::of(&c.unwrap().data)).collect();
        let shared = b.iter().filter(|d| a.contains(d)).count();
        assert!(shared + 2 >= b.len(), "only {shared} of {} chunks shared", b.len());
    }
}
