//! Files shared between the staged versions of one app, and the ledger that keeps every
//! version's seal a true check when they are.
//!
//! A file of a new version whose content and mode equal a file of a staged, intact version
//! is not copied: it is cloned with a reflink (`FICLONE`: an inode of its own sharing the
//! extents) where the filesystem has them, else hard-linked (the same inode in both
//! versions), and copied in the kernel (`copy_file_range`) where neither works or the app
//! says `reuse = "copy"`.
//!
//! A seal records each staged path's inode, size, mtime and ctime; any write moves the
//! ctime, and no one can set it back. But a hard link or an unlink moves it too, and a
//! shared inode's ctime is the same in every version that holds it. So the ledger records,
//! per shared inode, the ctime that the agent's own last link or unlink left
//! (`Store::shared_ctime`), and a sealed path holds if its inode, size and mtime are as
//! sealed and its ctime is either the sealed one or the recorded one. The agent records a
//! ctime only after checking, under the ledger's lock, that the inode held just before its
//! own link or unlink and that nothing but the ctime and the link count moved just after:
//! a write at any time, through any version's path, leaves the record behind, and every
//! version holding the inode fails its seal.
//!
//! What this cannot see: a write that lands in the microseconds between those two checks
//! and then sets the mtime back. Only the file's owner (the agent's user) can set an mtime;
//! it can as well rewrite the index.

use crate::config::Reuse;
use crate::store::{SealEntry, Store};
use crate::tree;
use stagehand_common::fsx;
use stagehand_common::manifest;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use tracing::debug;

/// How a new version's file came to hold a staged version's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reused {
    /// A reflink: an inode of its own, sharing the donor's extents.
    Cloned,
    /// A hard link: the donor's inode.
    Linked,
    /// Copied in the kernel (which may have made it a reflink).
    Copied,
}

/// What a file descriptor's `fstat` says, as far as sharing cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub nlink: u64,
    pub mode: u32,
}

impl Stamp {
    pub fn of(fd: impl std::os::fd::AsFd) -> io::Result<Stamp> {
        let st = rustix::fs::fstat(fd)?;
        Ok(Stamp {
            ino: st.st_ino as u64,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime as i64 * 1_000_000_000 + st.st_mtime_nsec as i64,
            ctime_ns: st.st_ctime as i64 * 1_000_000_000 + st.st_ctime_nsec as i64,
            nlink: st.st_nlink as u64,
            mode: st.st_mode as u32,
        })
    }

    fn is_file(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }

    /// The same content and metadata as `other`, whatever the ctime and link count say.
    fn same_but_ctime(&self, other: &Stamp) -> bool {
        (self.ino, self.size, self.mtime_ns, self.mode) == (other.ino, other.size, other.mtime_ns, other.mode)
    }

    /// This stamp as a seal entry for `path`.
    pub fn entry(&self, path: &str) -> SealEntry {
        SealEntry {
            path: path.to_string(),
            ino: self.ino,
            size: self.size,
            mtime_ns: self.mtime_ns,
            ctime_ns: self.ctime_ns,
        }
    }
}

/// The record of shared inodes, and the lock every link, unlink and seal check of a shared
/// inode takes, so that a check never sees a link whose ctime is not recorded yet.
pub struct Ledger {
    store: Store,
    lock: Mutex<()>,
}

impl Ledger {
    pub fn new(store: Store) -> Ledger {
        Ledger { store, lock: Mutex::new(()) }
    }

    fn guard(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a path of `app` sealed as `sealed` and now looking like `now` is untouched.
    pub fn holds(&self, app: &str, sealed: &SealEntry, now: &SealEntry) -> bool {
        (now.ino, now.size, now.mtime_ns) == (sealed.ino, sealed.size, sealed.mtime_ns)
            && (now.ctime_ns == sealed.ctime_ns || self.store.shared_ctime(app, now.ino) == Some(now.ctime_ns))
    }

    /// Checks a tree against its seal; the error names the first path that changed. A
    /// failure is checked again under the lock: a link in progress may have moved a ctime.
    pub fn check(&self, app: &str, root: &Path, seal: &[SealEntry]) -> Result<(), String> {
        self.check_once(app, root, seal).or_else(|_| {
            let _g = self.guard();
            self.check_once(app, root, seal)
        })
    }

    fn check_once(&self, app: &str, root: &Path, seal: &[SealEntry]) -> Result<(), String> {
        if seal.is_empty() {
            return Err("no seal recorded".into());
        }
        for s in seal {
            let path = if s.path.is_empty() { root.to_path_buf() } else { manifest::join(root, &s.path) };
            let shown = if s.path.is_empty() { "the release directory" } else { &s.path };
            match tree::seal_entry(&path, &s.path) {
                Ok(now) if self.holds(app, s, &now) => {}
                Ok(_) => return Err(format!("{shown} changed since it was staged")),
                Err(e) => return Err(format!("{shown}: {e}")),
            }
        }
        Ok(())
    }

    /// `path` as it is now, if it holds as `sealed` (a file of another version, or a link
    /// to one).
    pub fn holding(&self, app: &str, path: &Path, sealed: &SealEntry) -> Option<SealEntry> {
        let now = || tree::seal_entry(path, &sealed.path).ok().filter(|now| self.holds(app, sealed, now));
        now().or_else(|| {
            let _g = self.guard();
            now()
        })
    }

    /// Records the shared inodes of a tree just read in full and found right, as `seal`
    /// (from `tree::verify`) stamped them, so that the other versions holding them need no
    /// full read. An inode whose ctime moved since it was read is left out.
    pub fn record_verified(&self, app: &str, root: &Path, seal: &[SealEntry]) -> io::Result<()> {
        let _g = self.guard();
        for s in seal.iter().filter(|s| !s.path.is_empty()) {
            let md = std::fs::symlink_metadata(manifest::join(root, &s.path))?;
            if md.is_file() && md.nlink() > 1 && md.ino() == s.ino && ctime_ns(&md) == s.ctime_ns {
                self.store.set_shared_ctime(app, s.ino, s.ctime_ns).map_err(io::Error::other)?;
            }
        }
        Ok(())
    }

    /// Whether an open donor file still holds as `sealed`; a failure is checked again under
    /// the lock (a link in progress may have moved its ctime).
    pub fn still_holds(&self, app: &str, f: &File, sealed: &SealEntry) -> bool {
        let now = || Stamp::of(f).is_ok_and(|st| self.holds(app, sealed, &st.entry(&sealed.path)));
        now() || {
            let _g = self.guard();
            now()
        }
    }

    /// Makes `dst`, which must not exist, a file with the content and mode of `donor`, a
    /// file of a staged version of `app` sealed as `sealed`, without reading it: a reflink
    /// (while `reflinks` says the filesystem takes them), else a hard link; a kernel-side copy
    /// with `Reuse::Copy` or where neither works. `None` when the donor is not as sealed (it
    /// changed) or the copy failed: the caller then builds the file from verified chunks.
    /// Only the hard link, which moves the donor's ctime, takes the lock.
    pub fn reuse(
        &self,
        app: &str,
        donor: &Path,
        sealed: &SealEntry,
        dst: &Path,
        how: Reuse,
        reflinks: &mut bool,
    ) -> io::Result<Option<Reused>> {
        let src = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(donor) {
            Ok(f) => f,
            Err(e) => {
                debug!(path = %donor.display(), error = %e, "A donor file cannot be opened.");
                return Ok(None);
            }
        };
        let pre = Stamp::of(&src)?;
        if !pre.is_file() || !self.holds(app, sealed, &pre.entry(&sealed.path)) {
            return Ok(None);
        }
        let mut made = None;
        if how == Reuse::Share && *reflinks {
            let f = create_new(dst)?;
            match rustix::fs::ioctl_ficlone(&f, &src) {
                Ok(()) => made = Some(Reused::Cloned),
                Err(e) => {
                    use rustix::io::Errno;
                    if [Errno::OPNOTSUPP, Errno::NOTTY, Errno::XDEV, Errno::INVAL, Errno::NOSYS].contains(&e) {
                        debug!(error = %e, "No reflinks here; hard links instead.");
                        *reflinks = false;
                    }
                    std::fs::remove_file(dst)?;
                }
            }
        }
        if how == Reuse::Share && made.is_none() {
            if let Some(linked) = self.link(app, donor, &src, sealed, dst)? {
                return Ok(linked.then_some(Reused::Linked));
            }
        }
        if made.is_none() {
            let f = create_new(dst)?;
            if let Err(e) = copy_range(&src, 0, &f, 0, pre.size) {
                debug!(path = %donor.display(), error = %e, "A kernel-side copy failed; fetching instead.");
                std::fs::remove_file(dst)?;
                return Ok(None);
            }
            made = Some(Reused::Copied);
        }
        // A clone or a copy leaves the donor as it was: it must still be, or what was read
        // may be a write's.
        let post = Stamp::of(&src)?;
        if !post.same_but_ctime(&pre) || !self.still_holds(app, &src, sealed) {
            std::fs::remove_file(dst)?;
            return Ok(None);
        }
        Ok(made)
    }

    /// Hard-links `donor` (open as `src`) at `dst` and records the ctime the link left, under
    /// the lock. `Some(false)`: the donor changed, nothing is left at `dst`; `None`: no hard
    /// link possible here (another filesystem, too many links, links refused).
    fn link(&self, app: &str, donor: &Path, src: &File, sealed: &SealEntry, dst: &Path) -> io::Result<Option<bool>> {
        let _g = self.guard();
        let pre = Stamp::of(src)?;
        if !self.holds(app, sealed, &pre.entry(&sealed.path)) {
            return Ok(Some(false));
        }
        if let Err(e) = std::fs::hard_link(donor, dst) {
            debug!(error = %e, "No hard link; copying instead.");
            return Ok(None);
        }
        let post = Stamp::of(src)?;
        if std::fs::symlink_metadata(dst)?.ino() != pre.ino || !post.same_but_ctime(&pre) || post.nlink != pre.nlink + 1
        {
            // The donor's path was swapped, or the inode written, meanwhile: not what was
            // checked. Neither trusted nor recorded.
            std::fs::remove_file(dst)?;
            return Ok(Some(false));
        }
        self.store.set_shared_ctime(app, post.ino, post.ctime_ns).map_err(io::Error::other)?;
        Ok(Some(true))
    }

    /// Removes the file at `path` (a missing one is not an error), keeping the record of its
    /// inode true for the versions that still hold it. `sealed`: the path's entry in the seal
    /// of the version it belonged to, when known.
    pub fn unlink(&self, app: &str, path: &Path, sealed: Option<&SealEntry>) -> io::Result<()> {
        use rustix::fs::{Mode, OFlags};
        let fd = match rustix::fs::open(path, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) if e == rustix::io::Errno::NOENT => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let _g = self.guard();
        let pre = Stamp::of(&fd)?;
        let recorded = self.store.shared_ctime(app, pre.ino);
        if !pre.is_file() {
            return std::fs::remove_file(path);
        }
        let held = match sealed {
            Some(s) => self.holds(app, s, &pre.entry(&s.path)),
            None => recorded == Some(pre.ctime_ns),
        };
        std::fs::remove_file(path)?;
        let post = Stamp::of(&fd)?;
        let result = if post.nlink == 0 {
            if recorded.is_some() {
                self.store.forget_shared(app, post.ino)
            } else {
                Ok(())
            }
        } else if held && post.same_but_ctime(&pre) && post.nlink + 1 == pre.nlink {
            self.store.set_shared_ctime(app, post.ino, post.ctime_ns)
        } else {
            Ok(())
        };
        result.map_err(io::Error::other)
    }

    /// Removes a tree that may hold shared inodes: those go one by one through
    /// [`Ledger::unlink`], the rest with the tree. `seal`: the tree's seal, when it was a
    /// staged version.
    pub fn remove_tree(&self, app: &str, dir: &Path, seal: Option<&[SealEntry]>) -> io::Result<()> {
        let sealed: HashMap<&str, &SealEntry> = seal.unwrap_or_default().iter().map(|s| (s.path.as_str(), s)).collect();
        match std::fs::symlink_metadata(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
            Ok(md) if !md.is_dir() => return self.unlink(app, dir, None),
            Ok(_) => {}
        }
        self.unlink_shared(app, dir, "", &sealed)?;
        fsx::remove_tree(dir)?;
        self.store.flush().map(|_| ()).map_err(io::Error::other)
    }

    fn unlink_shared(&self, app: &str, dir: &Path, rel: &str, sealed: &HashMap<&str, &SealEntry>) -> io::Result<()> {
        // A staged tree may hold read-only directories.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        for item in std::fs::read_dir(dir)? {
            let item = item?;
            let name = item.file_name().to_string_lossy().into_owned();
            let rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let kind = item.file_type()?;
            if kind.is_dir() {
                self.unlink_shared(app, &item.path(), &rel, sealed)?;
            } else if kind.is_file() {
                let md = item.metadata()?;
                if md.nlink() > 1 || self.store.shared_ctime(app, md.ino()).is_some() {
                    self.unlink(app, &item.path(), sealed.get(rel.as_str()).copied())?;
                }
            }
        }
        Ok(())
    }

    /// Forgets the recorded inodes of `app` that no staged version holds (`held`): what a
    /// crash left between an unlink and its record.
    pub fn forget_unheld(&self, app: &str, held: &std::collections::HashSet<u64>) -> Result<(), sled::Error> {
        for ino in self.store.shared_inodes(app) {
            if !held.contains(&ino) {
                self.store.forget_shared(app, ino)?;
            }
        }
        Ok(())
    }
}

fn ctime_ns(md: &std::fs::Metadata) -> i64 {
    md.ctime() * 1_000_000_000 + md.ctime_nsec()
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Copies `len` bytes from `src` at `from` to `dst` at `to`, in the kernel.
pub fn copy_range(src: &File, from: u64, dst: &File, to: u64, len: u64) -> io::Result<()> {
    let (mut from, mut to, mut left) = (from, to, len);
    while left > 0 {
        let want = left.min(1 << 30) as usize;
        let n = rustix::fs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), want)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the source file ended early"));
        }
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A ledger over a fresh store, and a tree `A` with one file `f`, sealed.
    struct World {
        _db: tempfile::TempDir,
        dir: tempfile::TempDir,
        ledger: Ledger,
    }

    const APP: &str = "web";

    impl World {
        /// On the default filesystem, or on tmpfs with `shm`.
        fn new(shm: bool) -> World {
            let db = tempfile::tempdir().unwrap();
            let dir = match shm && Path::new("/dev/shm").is_dir() {
                true => tempfile::tempdir_in("/dev/shm").unwrap(),
                false => tempfile::tempdir().unwrap(),
            };
            let ledger = Ledger::new(Store::open(db.path()).unwrap());
            std::fs::create_dir(dir.path().join("A")).unwrap();
            std::fs::write(dir.path().join("A/f"), b"shared content").unwrap();
            std::fs::set_permissions(dir.path().join("A/f"), std::fs::Permissions::from_mode(0o644)).unwrap();
            World { _db: db, dir, ledger }
        }

        fn path(&self, rel: &str) -> std::path::PathBuf {
            self.dir.path().join(rel)
        }

        fn seal(&self, version: &str) -> Vec<SealEntry> {
            vec![
                tree::seal_entry(&self.path(version), "").unwrap(),
                tree::seal_entry(&self.path(&format!("{version}/f")), "f").unwrap(),
            ]
        }

        /// Makes version `to` share `A/f` (sealed as `sealed`), and returns its seal.
        fn share(&self, sealed: &SealEntry, to: &str, how: Reuse) -> (Option<Reused>, Vec<SealEntry>) {
            std::fs::create_dir(self.path(to)).unwrap();
            let made = self
                .ledger
                .reuse(APP, &self.path("A/f"), sealed, &self.path(&format!("{to}/f")), how, &mut true)
                .unwrap();
            (made, if made.is_some() { self.seal(to) } else { Vec::new() })
        }

        fn holds(&self, version: &str, seal: &[SealEntry]) -> Result<(), String> {
            self.ledger.check(APP, &self.path(version), seal)
        }
    }

    #[test]
    fn links_and_unlinks_keep_every_holders_seal() {
        for shm in [false, true] {
            let w = World::new(shm);
            let a = w.seal("A");
            let (made, b) = w.share(&a[1], "B", Reuse::Share);
            // Neither ext4 nor tmpfs has reflinks: the fallback is a hard link.
            assert_eq!(made, Some(Reused::Linked), "shm={shm}");
            assert_eq!(b[1].ino, a[1].ino);
            let (_, c) = w.share(&b[1], "C", Reuse::Share);
            assert_eq!(std::fs::symlink_metadata(w.path("A/f")).unwrap().nlink(), 3);
            for (v, seal) in [("A", &a), ("B", &b), ("C", &c)] {
                assert_eq!(w.holds(v, seal), Ok(()), "{v} after two links, shm={shm}");
            }
            w.ledger.unlink(APP, &w.path("A/f"), Some(&a[1])).unwrap();
            for (v, seal) in [("B", &b), ("C", &c)] {
                assert_eq!(w.holds(v, seal), Ok(()), "{v} after an unlink, shm={shm}");
            }
            w.ledger.remove_tree(APP, &w.path("B"), Some(&b)).unwrap();
            assert_eq!(w.holds("C", &c), Ok(()), "C after B's removal, shm={shm}");
            assert_eq!(std::fs::symlink_metadata(w.path("C/f")).unwrap().nlink(), 1);
            assert_eq!(std::fs::read(w.path("C/f")).unwrap(), b"shared content");
            w.ledger.remove_tree(APP, &w.path("C"), Some(&c)).unwrap();
            assert!(w.ledger.store.shared_inodes(APP).is_empty(), "the last unlink forgets the inode");
        }
    }

    /// A write, a write that puts the mtime back, and a chmod, each through one version's
    /// path: every version holding the inode fails its seal, and the agent's own later
    /// unlinks do not make them hold again.
    #[test]
    fn a_change_through_one_holder_fails_every_holder() {
        type Change = fn(&Path);
        let changes: [(&str, Change); 3] = [
            ("write", |p| std::fs::OpenOptions::new().write(true).open(p).unwrap().write_all_at(b"S", 0).unwrap()),
            ("write, mtime set back", |p| {
                let before = std::fs::metadata(p).unwrap().modified().unwrap();
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.write_all_at(b"S", 0).unwrap();
                f.set_modified(before).unwrap();
            }),
            ("chmod", |p| std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666)).unwrap()),
        ];
        for (what, change) in changes {
            let w = World::new(false);
            let a = w.seal("A");
            let (_, b) = w.share(&a[1], "B", Reuse::Share);
            let (_, c) = w.share(&a[1], "C", Reuse::Share);
            change(&w.path("B/f"));
            for (v, seal) in [("A", &a), ("B", &b), ("C", &c)] {
                let err = w.holds(v, seal).expect_err(&format!("{what} through B went unnoticed in {v}"));
                assert!(err.starts_with("f changed"), "{err}");
            }
            // The changed inode is shared no more, and unlinking it records nothing.
            assert_eq!(w.share(&a[1], "D", Reuse::Share).0, None, "{what}: a changed donor was shared");
            w.ledger.unlink(APP, &w.path("A/f"), Some(&a[1])).unwrap();
            for (v, seal) in [("B", &b), ("C", &c)] {
                assert!(w.holds(v, seal).is_err(), "{what}: {v} holds again after an unlink");
            }
        }
    }

    #[test]
    fn copy_gives_a_version_its_own_inode() {
        let w = World::new(false);
        let a = w.seal("A");
        let (made, b) = w.share(&a[1], "B", Reuse::Copy);
        assert_eq!(made, Some(Reused::Copied));
        assert_ne!(b[1].ino, a[1].ino);
        assert_eq!(std::fs::read(w.path("B/f")).unwrap(), b"shared content");
        std::fs::write(w.path("B/f"), b"written by the app").unwrap();
        assert_eq!(w.holds("A", &a), Ok(()), "a write into a copy reached the original");
    }
}
