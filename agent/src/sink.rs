//! Where fetched chunks are written. Chunks that follow each other in a file are gathered
//! into one block-aligned buffer, and the whole blocks of that run are written with
//! `O_DIRECT`: the bytes go from the buffer to the disk without a copy into the page cache
//! and without the writeback that follows it, which on a two-core host costs about as much
//! CPU as the QUIC transfer itself (BENCHMARKS.md).
//!
//! A file is written one way only while the transfer runs, so that direct writes and the
//! page cache never hold the same bytes at once (a page dirtied during a direct write to the
//! same folio could outlive it, stale): files of at least [`DIRECT_FILE_MIN`] on a
//! filesystem that accepts `O_DIRECT` get direct writes of whole blocks, and the partial
//! blocks at either end of a run are kept as [`Edge`]s, written through the page cache only
//! after every fetch stream is done; smaller files go through the page cache.
//!
//! Nothing here makes data durable: the caller fsyncs every file before the tree is
//! renamed into `releases/`. Bytes are never written before the caller verified them.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::warn;

/// Files smaller than this are written through the page cache.
pub const DIRECT_FILE_MIN: u64 = 1 << 20;
/// Bytes a run gathers before its whole blocks are written.
const RUN: usize = 8 << 20;
/// Files kept open at once: a tree of thousands of files must not hold thousands of
/// descriptors, and most chunks land in the file the previous one did.
const OPEN_MAX: usize = 16;

/// Alignment of direct writes, in memory and in the file: 4 KiB (a multiple of every
/// logical block size) or the page size if larger, so that no page is shared between a
/// direct write and an edge.
pub fn block() -> usize {
    rustix::param::page_size().max(4096).next_power_of_two()
}

/// Whether the file at `path`, of `size` bytes, is to be written with direct I/O.
pub fn wants_direct(path: &Path, size: u64) -> bool {
    size >= DIRECT_FILE_MIN && OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).is_ok()
}

/// Drops `file`'s pages from the page cache (after a resumed staging read them back, or a
/// donor copy wrote some): its direct writes then share no page with cached data.
pub fn forget_cached(file: &File) -> std::io::Result<()> {
    file.sync_data()?;
    rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed)?;
    Ok(())
}

/// Bytes of a partially covered block of a direct file, written after every stream is done.
#[derive(Debug)]
pub struct Edge {
    pub idx: usize,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// Writes edges through the page cache; the caller fsyncs.
pub fn write_edges(paths: Arc<Vec<PathBuf>>, edges: &[Edge]) -> Result<()> {
    let mut io = Io::new(paths, Arc::default());
    for e in edges {
        io.plain(e.idx)?.write_all_at(&e.bytes, e.offset).with_context(|| write_err(&io.paths, e.idx))?;
    }
    Ok(())
}

/// A writer of verified chunks into the files of one staging tree.
pub struct Sink {
    io: Io,
    /// `RUN` plus room for a chunk and the alignment slack; `base` is its first aligned byte.
    mem: Vec<u8>,
    base: usize,
    run: Option<Run>,
    /// An aligned buffer for the rare chunk that occurs in more than one place.
    scratch: Vec<u8>,
}

/// The file side: descriptors, which files go direct, what is left for later.
struct Io {
    paths: Arc<Vec<PathBuf>>,
    direct: Arc<Vec<bool>>,
    block: usize,
    open: HashMap<usize, Handles>,
    /// Bytes per file written through the page cache and not yet reported.
    buffered: HashMap<usize, u64>,
    edges: Vec<Edge>,
    direct_bytes: u64,
    fell_back: bool,
}

#[derive(Default)]
struct Handles {
    plain: Option<File>,
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
    /// A sink for the files at `paths`, which exist already; `direct[i]` says whether file
    /// `i` is written with direct I/O ([`wants_direct`]).
    pub fn new(paths: Arc<Vec<PathBuf>>, direct: Arc<Vec<bool>>) -> Self {
        let block = block();
        let mem = vec![0u8; RUN + chunk_room() + 2 * block];
        let base = aligned_start(&mem, block);
        Sink { io: Io::new(paths, direct), mem, base, run: None, scratch: Vec::new() }
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
        let block = self.io.block;
        let r = *self.run.get_or_insert(Run { idx, start: align_down(offset, block), from: offset, end: offset });
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
        let block = self.io.block;
        if self.scratch.is_empty() {
            self.scratch = vec![0u8; chunk_room() + 3 * block];
        }
        let base = aligned_start(&self.scratch, block);
        let lo = (offset % block as u64) as usize;
        self.scratch[base + lo..base + lo + len].copy_from_slice(&self.mem[hi - len..hi]);
        self.io.emit(&self.scratch[base..], idx, align_down(offset, block), lo, lo + len)
    }

    /// Writes out everything the buffer holds; returns the edges left for
    /// [`write_edges`] once every stream is done.
    pub fn finish(&mut self) -> Result<Vec<Edge>> {
        self.write_out(false)?;
        Ok(std::mem::take(&mut self.io.edges))
    }

    /// Bytes written with direct I/O so far.
    pub fn direct_bytes(&self) -> u64 {
        self.io.direct_bytes
    }

    /// Hands over, per file, the bytes written through the page cache since the last call:
    /// what a flusher should start writing back.
    pub fn drain_buffered(&mut self, mut f: impl FnMut(usize, u64)) {
        for (idx, n) in self.io.buffered.drain() {
            f(idx, n);
        }
    }

    /// Writes the run out. With `keep_tail`, the partial block at its end stays in the
    /// buffer, moved to the front, for the run to go on from.
    fn write_out(&mut self, keep_tail: bool) -> Result<()> {
        let Some(r) = self.run.take() else { return Ok(()) };
        let block = self.io.block;
        let lo = (r.from - r.start) as usize;
        let hi = (r.end - r.start) as usize;
        let cut = if keep_tail { align_down(r.end, block).max(r.from) - r.start } else { hi as u64 } as usize;
        if cut > lo {
            self.io.emit(&self.mem[self.base..], r.idx, r.start, lo, cut)?;
        }
        if keep_tail {
            let keep_from = cut - cut % block;
            self.mem.copy_within(self.base + keep_from..self.base + hi, self.base);
            let start = r.start + keep_from as u64;
            self.run = Some(Run { idx: r.idx, start, from: r.from.max(start + (cut - keep_from) as u64), end: r.end });
        }
        Ok(())
    }
}

impl Io {
    fn new(paths: Arc<Vec<PathBuf>>, direct: Arc<Vec<bool>>) -> Self {
        Io {
            paths,
            direct,
            block: block(),
            open: HashMap::new(),
            buffered: HashMap::new(),
            edges: Vec::new(),
            direct_bytes: 0,
            fell_back: false,
        }
    }

    /// Writes `buf[lo..hi]` at `start + lo` of file `idx`; `buf` starts block-aligned and
    /// `start` is a block boundary.
    fn emit(&mut self, buf: &[u8], idx: usize, start: u64, lo: usize, hi: usize) -> Result<()> {
        if !self.direct[idx] {
            self.plain(idx)?
                .write_all_at(&buf[lo..hi], start + lo as u64)
                .with_context(|| write_err(&self.paths, idx))?;
            *self.buffered.entry(idx).or_default() += (hi - lo) as u64;
            return Ok(());
        }
        let (a, b) = (align_up(lo as u64, self.block) as usize, align_down(hi as u64, self.block) as usize);
        if b <= a {
            self.edges.push(Edge { idx, offset: start + lo as u64, bytes: buf[lo..hi].to_vec() });
            return Ok(());
        }
        if lo < a {
            self.edges.push(Edge { idx, offset: start + lo as u64, bytes: buf[lo..a].to_vec() });
        }
        if b < hi {
            self.edges.push(Edge { idx, offset: start + b as u64, bytes: buf[b..hi].to_vec() });
        }
        debug_assert!(
            buf[a..].as_ptr().align_offset(self.block) == 0 && (start + a as u64).is_multiple_of(self.block as u64)
        );
        let result = self.direct(idx)?.write_all_at(&buf[a..b], start + a as u64);
        match result {
            Ok(()) => {
                self.direct_bytes += (b - a) as u64;
                Ok(())
            }
            // A filesystem that accepted O_DIRECT at open and refuses it at write.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                if !self.fell_back {
                    warn!(path = %self.paths[idx].display(), "Direct writes refused; writing through the page cache.");
                    self.fell_back = true;
                }
                self.plain(idx)?
                    .write_all_at(&buf[a..b], start + a as u64)
                    .with_context(|| write_err(&self.paths, idx))?;
                *self.buffered.entry(idx).or_default() += (b - a) as u64;
                Ok(())
            }
            Err(e) => Err(e).with_context(|| write_err(&self.paths, idx)),
        }
    }

    fn handles(&mut self, idx: usize) -> &mut Handles {
        if !self.open.contains_key(&idx) && self.open.len() >= OPEN_MAX {
            self.open.clear();
        }
        self.open.entry(idx).or_default()
    }

    fn plain(&mut self, idx: usize) -> Result<&File> {
        let path = self.paths[idx].clone();
        let h = self.handles(idx);
        if h.plain.is_none() {
            h.plain = Some(
                OpenOptions::new().write(true).open(&path).with_context(|| format!("opening {}", path.display()))?,
            );
        }
        Ok(h.plain.as_ref().expect("opened above"))
    }

    fn direct(&mut self, idx: usize) -> Result<&File> {
        let path = self.paths[idx].clone();
        let h = self.handles(idx);
        if h.direct.is_none() {
            h.direct = Some(
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)
                    .with_context(|| format!("opening {} for direct writes", path.display()))?,
            );
        }
        Ok(h.direct.as_ref().expect("opened above"))
    }
}

/// The largest chunk a slot can take.
pub const fn chunk_room() -> usize {
    stagehand_common::manifest::CHUNK_MAX as usize
}

fn aligned_start(buf: &[u8], block: usize) -> usize {
    let off = buf.as_ptr().align_offset(block);
    assert!(off < block, "cannot align a buffer to {block} bytes");
    off
}

fn write_err(paths: &[PathBuf], idx: usize) -> String {
    format!("writing {}", paths[idx].display())
}

fn align_down(x: u64, block: usize) -> u64 {
    x & !(block as u64 - 1)
}

fn align_up(x: u64, block: usize) -> u64 {
    align_down(x + block as u64 - 1, block)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Chunk lengths that land on and around block boundaries, and random ones.
    fn chunk_len(rng: &mut impl Rng) -> usize {
        match rng.gen_range(0..8) {
            0 => [1, 4095, 4096, 4097, 8191, chunk_room()][rng.gen_range(0..6)],
            1 => rng.gen_range(1..64),
            _ => rng.gen_range(1..=chunk_room()),
        }
    }

    /// Random files, partly present already (bytes that must survive), the rest cut into
    /// chunks and written in a shuffled order of runs by two sinks on two threads, with
    /// slots filled and never committed: every file comes out byte-identical, through the
    /// page cache and as read back from the disk.
    #[test]
    fn files_come_out_identical() {
        for (seed, root) in [(1u64, None), (2, Some("/dev/shm")), (3, None), (4, None)] {
            let dir = match root {
                Some(r) if Path::new(r).is_dir() => tempfile::tempdir_in(r).unwrap(),
                _ => tempfile::tempdir().unwrap(),
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let sizes = [0usize, 1, 4095, 4096, 70_000, 1 << 20, 3 << 20, 21 << 20];
            let (mut want, mut paths, mut runs, mut present) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (i, &size) in sizes.iter().enumerate() {
                let data: Vec<u8> = (0..size).map(|_| rng.gen()).collect();
                let path = dir.path().join(format!("f{i}"));
                let f = File::create(&path).unwrap();
                f.set_len(size as u64).unwrap();
                let mut off = 0;
                let mut run = Vec::new();
                while off < size {
                    let len = chunk_len(&mut rng).min(size - off);
                    match rng.gen_range(0..10) {
                        // Present already, as after a resume or a donor copy.
                        0 => {
                            f.write_all_at(&data[off..off + len], off as u64).unwrap();
                            present.push((i, off, len));
                        }
                        // A chunk on its own, between two present ones.
                        1 => runs.push(vec![(i, off, len)]),
                        _ => run.push((i, off, len)),
                    }
                    off += len;
                    if rng.gen_bool(0.1) {
                        runs.push(std::mem::take(&mut run));
                    }
                }
                runs.push(run);
                forget_cached(&f).unwrap();
                want.push(data);
                paths.push(path);
            }
            for i in (1..runs.len()).rev() {
                runs.swap(i, rng.gen_range(0..=i));
            }
            let paths = Arc::new(paths);
            let direct: Arc<Vec<bool>> =
                Arc::new(paths.iter().zip(sizes).map(|(p, s)| wants_direct(p, s as u64)).collect());
            let (want, present) = (Arc::new(want), Arc::new(present));
            // Two streams, as staging runs them: each its own sink, the runs dealt alternately.
            let mut lanes: [Vec<_>; 2] = Default::default();
            for (n, run) in runs.into_iter().enumerate() {
                lanes[n % 2].push(run);
            }
            let handles: Vec<_> = lanes
                .into_iter()
                .enumerate()
                .map(|(lane, runs)| {
                    let (paths, direct, want, present) = (paths.clone(), direct.clone(), want.clone(), present.clone());
                    std::thread::spawn(move || {
                        let mut sink = Sink::new(paths, direct);
                        let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 10 + lane as u64);
                        for (idx, off, len) in runs.into_iter().flatten() {
                            if !present.is_empty() && rng.gen_bool(0.05) {
                                // A chunk that failed its check: filled, never committed.
                                let (pi, poff, plen) = present[rng.gen_range(0..present.len())];
                                sink.slot(pi, poff as u64, plen).unwrap().fill(0xEE);
                            }
                            sink.slot(idx, off as u64, len).unwrap().copy_from_slice(&want[idx][off..off + len]);
                            sink.commit(len);
                        }
                        let edges = sink.finish().unwrap();
                        (edges, sink.direct_bytes())
                    })
                })
                .collect();
            let mut direct_bytes = 0;
            let mut edges = Vec::new();
            for h in handles {
                let (e, d) = h.join().unwrap();
                edges.extend(e);
                direct_bytes += d;
            }
            write_edges(paths.clone(), &edges).unwrap();
            for (path, data) in paths.iter().zip(want.iter()) {
                let f = File::open(path).unwrap();
                assert!(std::fs::read(path).unwrap() == *data, "{} differs (seed {seed})", path.display());
                forget_cached(&f).unwrap();
                assert!(std::fs::read(path).unwrap() == *data, "{} differs on disk (seed {seed})", path.display());
            }
            if direct.iter().any(|d| *d) {
                assert!(direct_bytes > 8 << 20, "only {direct_bytes} bytes went direct (seed {seed})");
            }
            assert!(direct.iter().zip(sizes).all(|(d, s)| !*d || s as u64 >= DIRECT_FILE_MIN));
        }
    }

    /// One long run, in order, with lengths on and around block boundaries: the buffer fills
    /// and goes on from the partial block it kept, many times.
    #[test]
    fn a_long_run_keeps_its_tail_across_buffer_fills() {
        let dir = tempfile::tempdir().unwrap();
        let size = 20usize << 20;
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let path = dir.path().join("f");
        File::create(&path).unwrap().set_len(size as u64).unwrap();
        let direct = wants_direct(&path, size as u64);
        let mut sink = Sink::new(Arc::new(vec![path.clone()]), Arc::new(vec![direct]));
        let lens = [1, 4095, 4097, chunk_room(), 12_345, 8191, 4096];
        let mut off = 0;
        for len in lens.iter().cycle() {
            let len = (*len).min(size - off);
            sink.slot(0, off as u64, len).unwrap().copy_from_slice(&data[off..off + len]);
            sink.commit(len);
            off += len;
            if off == size {
                break;
            }
        }
        let edges = sink.finish().unwrap();
        if direct {
            assert!(sink.direct_bytes() >= (size - 2 * block()) as u64, "{} went direct", sink.direct_bytes());
            assert!(edges.len() <= 1, "one run has at most a tail edge: {edges:?}");
        }
        write_edges(Arc::new(vec![path.clone()]), &edges).unwrap();
        assert!(std::fs::read(&path).unwrap() == data);
    }

    /// The same chunk written in two places: the copy goes through `copy_last`, into a
    /// place nothing else writes, in a direct file and in a small one.
    #[test]
    fn copies_land_where_nothing_else_writes() {
        let dir = tempfile::tempdir().unwrap();
        let chunk: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let sizes = [4u64 << 20, 400_000];
        let paths: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("f{i}"))).collect();
        for (p, s) in paths.iter().zip(sizes) {
            File::create(p).unwrap().set_len(s).unwrap();
        }
        let direct: Vec<bool> = paths.iter().zip(sizes).map(|(p, s)| wants_direct(p, s)).collect();
        let mut sink = Sink::new(Arc::new(paths.clone()), Arc::new(direct));
        sink.slot(0, 5, chunk.len()).unwrap().copy_from_slice(&chunk);
        sink.commit(chunk.len());
        for (idx, off) in [(0usize, 3_000_001u64), (0, 1 << 20), (1, 99_999)] {
            sink.copy_last(chunk.len(), idx, off).unwrap();
        }
        let edges = sink.finish().unwrap();
        write_edges(Arc::new(paths.clone()), &edges).unwrap();
        let f0 = std::fs::read(&paths[0]).unwrap();
        let mut expect = vec![0u8; 4 << 20];
        for off in [5usize, 3_000_001, 1 << 20] {
            expect[off..off + chunk.len()].copy_from_slice(&chunk);
        }
        assert!(f0 == expect);
        let f1 = std::fs::read(&paths[1]).unwrap();
        assert!(f1[99_999..99_999 + chunk.len()] == chunk[..]);
        assert!(f1[..99_999].iter().chain(&f1[99_999 + chunk.len()..]).all(|b| *b == 0));
    }
}
