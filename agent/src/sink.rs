//! Where fetched chunks are written. Chunks that follow each other in a file are gathered
//! into one block-aligned buffer, and the whole blocks of that run are written with
//! `O_DIRECT`: the bytes go from the buffer to the disk without a copy into the page cache
//! and without the writeback that follows it, which on a two-core host costs about as much
//! CPU as the QUIC transfer itself (BENCHMARKS.md). The partial blocks at either end of a
//! run, short runs, and filesystems that refuse `O_DIRECT` go through the page cache.
//!
//! Nothing here makes data durable: the caller fsyncs every file before the tree is
//! renamed into `releases/`. Bytes are never written before the caller verified them.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

/// Alignment of direct writes, in memory and in the file: a multiple of every logical
/// block size Linux filesystems use.
const BLOCK: usize = 4096;
/// Bytes a run gathers before its whole blocks are written.
const RUN: usize = 8 << 20;
/// Runs whose whole blocks add up to less than this are written through the page cache.
const DIRECT_MIN: usize = 64 << 10;
/// Files kept open at once: a tree of thousands of files must not hold thousands of
/// descriptors, and most chunks land in the file the previous one did.
const OPEN_MAX: usize = 16;

/// A writer of verified chunks into the files of one staging tree.
pub struct Sink {
    paths: Arc<Vec<PathBuf>>,
    open: HashMap<usize, Handles>,
    /// `RUN` plus room for a chunk and the alignment slack; `base` is its first aligned byte.
    mem: Vec<u8>,
    base: usize,
    run: Option<Run>,
    /// Bytes per file written through the page cache and not yet reported.
    buffered: HashMap<usize, u64>,
    direct_bytes: u64,
    allow_direct: bool,
}

struct Handles {
    plain: File,
    /// `None` once the filesystem refused direct I/O for this file.
    direct: Option<File>,
}

/// Bytes `[from, end)` of file `idx` are in the buffer; `mem[base]` holds byte `start`,
/// the block boundary at or below `from`.
#[derive(Clone, Copy)]
struct Run {
    idx: usize,
    start: u64,
    from: u64,
    end: u64,
}

impl Sink {
    /// A sink for the files at `paths`, which exist already.
    pub fn new(paths: Arc<Vec<PathBuf>>) -> Self {
        Self::with_direct(paths, true)
    }

    /// `direct: false` writes everything through the page cache.
    pub fn with_direct(paths: Arc<Vec<PathBuf>>, direct: bool) -> Self {
        let mem = vec![0u8; RUN + chunk_room() + 2 * BLOCK];
        let base = mem.as_ptr().align_offset(BLOCK);
        Sink {
            paths,
            open: HashMap::new(),
            mem,
            base,
            run: None,
            buffered: HashMap::new(),
            direct_bytes: 0,
            allow_direct: direct,
        }
    }

    /// Room in the buffer for `len` bytes that go at `offset` of file `idx`, for the caller
    /// to fill and verify before calling [`Sink::commit`]. Writes out what the buffer held
    /// when the new bytes do not continue it.
    pub fn slot(&mut self, idx: usize, offset: u64, len: usize) -> Result<&mut [u8]> {
        assert!(len <= chunk_room(), "a chunk larger than the sink's buffer");
        match self.run {
            // The bytes continue the run, but the buffer is full: write its whole blocks.
            Some(r) if r.idx == idx && r.end == offset && (offset - r.start) as usize + len > RUN => {
                self.write_out(true)?
            }
            Some(r) if r.idx == idx && r.end == offset => {}
            Some(_) => self.write_out(false)?,
            None => {}
        }
        let r = *self.run.get_or_insert(Run { idx, start: align_down(offset), from: offset, end: offset });
        let at = self.base + (offset - r.start) as usize;
        Ok(&mut self.mem[at..at + len])
    }

    /// The `len` bytes of the last slot are verified: they belong to the run.
    pub fn commit(&mut self, len: usize) {
        if let Some(r) = self.run.as_mut() {
            r.end += len as u64;
        }
    }

    /// Writes the last committed `len` bytes again at `offset` of file `idx`: a chunk that
    /// occurs in more than one place of the artifact.
    pub fn copy_last(&mut self, len: usize, idx: usize, offset: u64) -> Result<()> {
        let r = self.run.expect("copy_last after commit");
        let hi = self.base + (r.end - r.start) as usize;
        let plain = &handles(&mut self.open, &self.paths, idx, false)?.plain;
        plain.write_all_at(&self.mem[hi - len..hi], offset).with_context(|| write_err(&self.paths, idx))?;
        *self.buffered.entry(idx).or_default() += len as u64;
        Ok(())
    }

    /// Writes out everything the buffer holds.
    pub fn finish(&mut self) -> Result<()> {
        self.write_out(false)
    }

    /// Bytes written with direct I/O so far.
    pub fn direct_bytes(&self) -> u64 {
        self.direct_bytes
    }

    /// Hands over, per file, the bytes written through the page cache since the last call:
    /// what a flusher should start writing back.
    pub fn drain_buffered(&mut self, mut f: impl FnMut(usize, u64)) {
        for (idx, n) in self.buffered.drain() {
            f(idx, n);
        }
    }

    /// Writes the run out. With `keep_tail`, the partial block at its end stays in the
    /// buffer, moved to the front, for the run to go on from.
    fn write_out(&mut self, keep_tail: bool) -> Result<()> {
        let Some(r) = self.run.take() else { return Ok(()) };
        let lo = (r.from - r.start) as usize;
        let hi = (r.end - r.start) as usize;
        let cut = if keep_tail { align_down(r.end).max(r.from) - r.start } else { hi as u64 } as usize;
        if cut > lo {
            self.write_range(r, lo, cut)?;
        }
        if keep_tail {
            self.mem.copy_within(self.base + cut..self.base + hi, self.base + cut % BLOCK);
            let start = r.start + (cut - cut % BLOCK) as u64;
            self.run = Some(Run { idx: r.idx, start, from: r.from.max(start), end: r.end });
        }
        Ok(())
    }

    /// Writes `mem[base + lo .. base + hi]` at `r.start + lo` of the run's file.
    fn write_range(&mut self, r: Run, lo: usize, hi: usize) -> Result<()> {
        let (a, b) = (align_up(lo as u64) as usize, align_down(hi as u64) as usize);
        let direct = self.allow_direct && b > a && b - a >= DIRECT_MIN;
        let h = handles(&mut self.open, &self.paths, r.idx, direct)?;
        let mem = &self.mem[self.base..];
        let plain = |lo: usize, hi: usize| {
            h.plain.write_all_at(&mem[lo..hi], r.start + lo as u64).with_context(|| write_err(&self.paths, r.idx))
        };
        let buffered = self.buffered.entry(r.idx).or_default();
        if !direct || h.direct.is_none() {
            plain(lo, hi)?;
            *buffered += (hi - lo) as u64;
            return Ok(());
        }
        plain(lo, a)?;
        plain(b, hi)?;
        *buffered += (a - lo + hi - b) as u64;
        let f = h.direct.as_ref().expect("checked above");
        match f.write_all_at(&mem[a..b], r.start + a as u64) {
            Ok(()) => {
                self.direct_bytes += (b - a) as u64;
                Ok(())
            }
            // Some filesystems accept O_DIRECT at open and refuse it at write.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                h.direct = None;
                plain(a, b)?;
                *buffered += (b - a) as u64;
                Ok(())
            }
            Err(e) => Err(e).with_context(|| write_err(&self.paths, r.idx)),
        }
    }
}

/// The largest chunk a slot can take.
pub const fn chunk_room() -> usize {
    stagehand_common::manifest::CHUNK_MAX as usize
}

fn handles<'a>(
    open: &'a mut HashMap<usize, Handles>,
    paths: &[PathBuf],
    idx: usize,
    want_direct: bool,
) -> Result<&'a mut Handles> {
    if !open.contains_key(&idx) {
        if open.len() >= OPEN_MAX {
            open.clear();
        }
        let path = &paths[idx];
        let plain = OpenOptions::new().write(true).open(path).with_context(|| format!("opening {}", path.display()))?;
        // Refused (EINVAL) on filesystems without direct I/O: those get the page cache.
        let direct =
            want_direct.then(|| OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok()).flatten();
        open.insert(idx, Handles { plain, direct });
    }
    Ok(open.get_mut(&idx).expect("inserted above"))
}

fn write_err(paths: &[PathBuf], idx: usize) -> String {
    format!("writing {}", paths[idx].display())
}

fn align_down(x: u64) -> u64 {
    x & !(BLOCK as u64 - 1)
}

fn align_up(x: u64) -> u64 {
    align_down(x + BLOCK as u64 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Random files cut into random chunks, written in a shuffled order of runs (and with
    /// some chunks written twice), come out byte-identical, with and without direct I/O.
    #[test]
    fn files_come_out_identical() {
        for (seed, direct, root) in [(1u64, true, None), (2, false, None), (3, true, Some("/dev/shm"))] {
            let dir = match root {
                Some(r) if std::path::Path::new(r).is_dir() => tempfile::tempdir_in(r).unwrap(),
                _ => tempfile::tempdir().unwrap(),
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let sizes = [0usize, 1, 4095, 4096, 70_000, 3 << 20, 9 << 20];
            let mut want = Vec::new();
            let mut paths = Vec::new();
            let mut pieces = Vec::new();
            for (i, &size) in sizes.iter().enumerate() {
                let data: Vec<u8> = (0..size).map(|_| rng.gen()).collect();
                let path = dir.path().join(format!("f{i}"));
                let f = File::create(&path).unwrap();
                f.set_len(size as u64).unwrap();
                let mut off = 0;
                let mut run = Vec::new();
                while off < size {
                    let len = rng.gen_range(1..=chunk_room()).min(size - off);
                    run.push((i, off, len));
                    off += len;
                    if rng.gen_bool(0.2) {
                        pieces.push(std::mem::take(&mut run));
                    }
                }
                pieces.push(run);
                want.push(data);
                paths.push(path);
            }
            // Runs of different files interleave, as they do across a manifest.
            for i in (1..pieces.len()).rev() {
                pieces.swap(i, rng.gen_range(0..=i));
            }
            let mut sink = Sink::with_direct(Arc::new(paths.clone()), direct);
            let mut dup: Option<(usize, usize, usize)> = None;
            for (idx, off, len) in pieces.into_iter().flatten() {
                sink.slot(idx, off as u64, len).unwrap().copy_from_slice(&want[idx][off..off + len]);
                sink.commit(len);
                // Now and then, write the same chunk a second time over itself elsewhere.
                if rng.gen_bool(0.1) {
                    sink.copy_last(len, idx, off as u64).unwrap();
                    dup = Some((idx, off, len));
                }
            }
            sink.finish().unwrap();
            if direct && direct_io_works(dir.path()) {
                assert!(sink.direct_bytes() > 4 << 20, "only {} bytes went direct", sink.direct_bytes());
            } else {
                assert_eq!(sink.direct_bytes(), 0);
            }
            for (path, data) in paths.iter().zip(&want) {
                assert!(std::fs::read(path).unwrap() == *data, "{} differs (direct: {direct})", path.display());
            }
            assert!(dup.is_some(), "the test wrote no chunk twice");
        }
    }

    fn direct_io_works(dir: &std::path::Path) -> bool {
        OpenOptions::new().write(true).create(true).custom_flags(libc::O_DIRECT).open(dir.join("probe")).is_ok()
    }
}
