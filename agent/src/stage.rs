//! Staging: fetch a manifest and the chunks this host lacks, verify each, write them into a
//! temporary tree beside `releases/`, fsync, and rename it into place. A half-written
//! version is never visible under `releases/`; a restarted stage resumes from what the
//! temporary tree already holds.
//!
//! What another staged version of the app already has is not fetched: whole files are
//! shared with it (`share.rs`), and chunks of changed files are copied from it in the
//! kernel, without hashing them again while that version's seal holds.

use crate::config::Reuse;
use crate::failpoint;
use crate::host::Host;
use crate::share::{self, Ledger, Reused, Stamp};
use crate::sink::{self, Edge, Sink};
use crate::store::{SealEntry, StagedRecord};
use crate::tree;
use anyhow::{bail, Context, Result};
use stagehand_common::frame::{self, read_blob, write_msg};
use stagehand_common::ids::check_name;
use stagehand_common::manifest::{self, EntryKind, Manifest};
use stagehand_common::protocol::{DeployUp, StageOutcome};
use stagehand_common::{fsx, Digest};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

/// Streams fetching chunks at once, and chunks per request.
pub const LANES: usize = 2;
const BATCH: usize = 4096;

/// One order from the controller.
#[derive(Clone, Debug)]
pub struct Order {
    pub app: String,
    pub version: String,
    pub digest: Digest,
}

/// Stages an artifact; never panics, always answers with an outcome.
pub async fn stage(host: Arc<Host>, conn: quinn::Connection, order: Order) -> StageOutcome {
    let started = Instant::now();
    match stage_inner(&host, &conn, &order).await {
        Ok((fetched_bytes, reused_bytes, [linked, cloned, copied])) => {
            let millis = started.elapsed().as_millis() as u64;
            info!(app = %order.app, version = %order.version, fetched_bytes, reused_bytes, linked, cloned, copied, millis, "Staged.");
            StageOutcome::Staged { fetched_bytes, reused_bytes, millis }
        }
        Err(e) => {
            let reason = format!("{e:#}");
            warn!(app = %order.app, version = %order.version, %reason, "Staging failed.");
            StageOutcome::Failed { reason }
        }
    }
}

/// Stages an order: bytes fetched, bytes reused, and files linked, cloned and copied whole.
async fn stage_inner(host: &Arc<Host>, conn: &quinn::Connection, order: &Order) -> Result<(u64, u64, [usize; 3])> {
    let (app, version, digest) = (&order.app, &order.version, order.digest);
    check_name("app", app).map_err(anyhow::Error::msg)?;
    check_name("version", version).map_err(anyhow::Error::msg)?;
    let layout = &host.layout;
    layout.check_root(app).map_err(anyhow::Error::msg)?;
    let release_dir = layout.release_dir(app, version);
    if let Some(rec) = host.store.staged(app, version)? {
        if rec.digest != digest {
            bail!("{app} {version} is already staged here with other content ({}); versions are immutable", rec.digest);
        }
        match host.intact(app, version) {
            Some(Ok(_)) => {
                // Ordered again: the controller still wants it, so retention keeps it.
                host.store.touch(app, version)?;
                return Ok((0, 0, [0; 3]));
            }
            Some(Err(why)) if layout.active(app).as_deref() == Some(version.as_str()) => {
                bail!("the live copy of {app} {version} was modified on this host ({why}); release another version, then deploy again to repair it")
            }
            Some(Err(_)) => {
                // Damaged and not live: move it out of releases/ and stage it afresh.
                warn!(%app, %version, "The staged copy was modified; staging it again.");
                let aside =
                    layout.staging(app).join(format!(".damaged-{version}-{}", hex::encode(rand::random::<[u8; 4]>())));
                fsx::create_dir_all_durable(&layout.staging(app))?;
                std::fs::rename(&release_dir, &aside)
                    .with_context(|| format!("moving {} aside", release_dir.display()))?;
                fsx::fsync_dir(&layout.releases(app))?;
                host.store.remove_staged(app, version)?;
                if let Err(e) = host.ledger.remove_tree(app, &aside, None) {
                    warn!(path = %aside.display(), error = %e, "Could not remove the damaged copy; it is removed at the next start.");
                }
            }
            None => {}
        }
    }
    if release_dir.exists() {
        bail!("{} exists but does not match any staged artifact; move it away and deploy again", release_dir.display());
    }

    let bytes = fetch_manifest(conn, digest).await?;
    if Digest::of(&bytes) != digest {
        bail!("the manifest the controller sent does not match digest {digest}");
    }
    let manifest = Arc::new(Manifest::decode(&bytes).context("the artifact's manifest is unacceptable")?);
    let staging = layout.staging(app).join(format!("{version}-{}", digest.short()));

    let t0 = Instant::now();
    let plan = {
        let (host, app, version) = (host.clone(), app.clone(), version.clone());
        let (staging, manifest) = (staging.clone(), manifest.clone());
        tokio::task::spawn_blocking(move || {
            let donors = donors(&host, &app, &version);
            let reuse = host.layout.app_config(&app).reuse;
            prepare(&host.ledger, &app, reuse, &staging, &manifest, &donors)
        })
        .await??
    };
    let (reused, counts) = (plan.reused, plan.counts);
    let t1 = Instant::now();
    let fetched = fetch(host, app, conn, plan.need, plan.files.clone(), plan.direct.clone(), &staging).await?;
    let t2 = Instant::now();

    let (host2, app2, version2, manifest_file) =
        (host.clone(), app.clone(), version.clone(), layout.manifest_file(app, version));
    tokio::task::spawn_blocking(move || {
        let target = Target { staging: &staging, release_dir: &release_dir, manifest_file: &manifest_file };
        let seal = finish(&host2.ledger, &app2, &target, &bytes, &manifest, &plan.files, &plan.made)?;
        // A result left by an earlier copy (a crash between two removals) is not this one's.
        host2.store.remove_verify(&app2, &version2)?;
        host2.store.put_staged(
            &app2,
            &version2,
            &StagedRecord { v: 1, digest, seal, used_at: host2.store.next_stamp()? },
        )?;
        host2.store.flush()?;
        anyhow::Ok(())
    })
    .await??;
    tracing::debug!(
        prepare_ms = (t1 - t0).as_millis() as u64,
        fetch_ms = (t2 - t1).as_millis() as u64,
        finish_ms = t2.elapsed().as_millis() as u64,
        "Staging phases."
    );
    Ok((fetched, reused, counts))
}

async fn fetch_manifest(conn: &quinn::Connection, digest: Digest) -> Result<Vec<u8>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_msg(&mut send, &DeployUp::FetchManifest { digest }).await?;
    send.finish()?;
    match read_blob::<_, { frame::MANIFEST_LIMIT }>(&mut recv).await? {
        Some(Some(b)) => Ok(b),
        _ => bail!("the controller does not have the manifest {digest}"),
    }
}

/// What the other staged versions of the app offer a new one.
#[derive(Default)]
struct Donors {
    /// Whole files of versions whose seal holds, by mode and content.
    files: HashMap<(u32, u64, Digest), Donor>,
    /// Chunks wherever they are: first those of versions whose seal holds.
    chunks: HashMap<Digest, ChunkAt>,
}

/// A file of a staged version whose seal held when staging began.
struct Donor {
    path: PathBuf,
    sealed: Arc<SealEntry>,
}

/// Where a chunk is; `sealed` when its version's seal held when staging began, so that its
/// bytes may be copied without hashing them while the file still holds.
struct ChunkAt {
    path: PathBuf,
    offset: u64,
    sealed: Option<Arc<SealEntry>>,
}

/// A file's identity for sharing: its mode, its size and the digest of its chunk list
/// (content-defined chunks: the same content has the same list).
fn file_key(mode: u32, size: u64, chunks: &[manifest::ChunkRef]) -> (u32, u64, Digest) {
    let mut list = Vec::with_capacity(chunks.len() * 36);
    for c in chunks {
        list.extend_from_slice(&c.digest.0);
        list.extend_from_slice(&c.len.to_be_bytes());
    }
    (mode, size, Digest::of(&list))
}

fn donors(host: &Host, app: &str, version: &str) -> Donors {
    let mut versions = Vec::new();
    for (a, v, rec) in host.store.all_staged().unwrap_or_default() {
        if a != app || v == version {
            continue;
        }
        let Ok(m) = host.layout.read_manifest(&a, &v) else {
            continue;
        };
        let root = host.layout.release_dir(&a, &v);
        let trusted = m.digest() == rec.digest && host.ledger.check(app, &root, &rec.seal).is_ok();
        versions.push((!trusted, std::cmp::Reverse(rec.used_at), root, m, rec.seal));
    }
    // Versions whose seal holds first, then the most recently used (the last retention
    // removes): their files and chunks are found before the others'.
    versions.sort_by_key(|v| (v.0, v.1));
    let mut out = Donors::default();
    for (untrusted, _, root, m, seal) in versions {
        let mut sealed: HashMap<String, Arc<SealEntry>> =
            if untrusted { HashMap::new() } else { seal.into_iter().map(|s| (s.path.clone(), Arc::new(s))).collect() };
        for (path, mode, size, chunks) in m.files() {
            let file = manifest::join(&root, path);
            let entry = sealed.remove(path);
            // Empty files are made, not shared: one inode for every empty file would alias
            // them all.
            if let Some(s) = entry.as_ref().filter(|_| size > 0) {
                out.files
                    .entry(file_key(mode, size, chunks))
                    .or_insert_with(|| Donor { path: file.clone(), sealed: s.clone() });
            }
            let mut offset = 0u64;
            for c in chunks {
                out.chunks.entry(c.digest).or_insert_with(|| ChunkAt {
                    path: file.clone(),
                    offset,
                    sealed: entry.clone(),
                });
                offset += u64::from(c.len);
            }
        }
    }
    out
}

/// A chunk still to fetch and every place it goes.
struct Need {
    digest: Digest,
    len: u32,
    places: Vec<(usize, u64)>,
}

/// How a file of the new version is being made.
enum Made {
    /// Written here, chunk by chunk: fetched, copied from another version, or found from an
    /// earlier attempt.
    Written,
    /// Reused whole from another version, sealed there as this.
    Reused(Reused, Arc<SealEntry>),
}

struct Plan {
    files: Arc<Vec<PathBuf>>,
    made: Vec<Made>,
    /// Per file: written with direct I/O (`sink::wants_direct`).
    direct: Arc<Vec<bool>>,
    need: Vec<Need>,
    reused: u64,
    /// Files linked, cloned and copied whole.
    counts: [usize; 3],
}

/// Lays out the temporary tree and decides, file by file and chunk by chunk, what is
/// already there (from an interrupted attempt), what is reused from another staged
/// version, and what to fetch.
fn prepare(ledger: &Ledger, app: &str, reuse: Reuse, staging: &Path, m: &Manifest, donors: &Donors) -> Result<Plan> {
    let resumed = staging.exists();
    std::fs::create_dir_all(staging).with_context(|| format!("creating {}", staging.display()))?;
    let mut files = Vec::new();
    let mut made = Vec::new();
    let mut direct = Vec::new();
    let mut need: Vec<Need> = Vec::new();
    let mut index: HashMap<Digest, usize> = HashMap::new();
    let mut reused = 0u64;
    let mut counts = [0; 3];
    let mut reflinks = true;
    let mut sources = Sources::default();
    let mut buf = Vec::new();
    for e in &m.entries {
        let path = manifest::join(staging, &e.path);
        match &e.kind {
            EntryKind::Dir { .. } => match std::fs::create_dir(&path) {
                Ok(()) => {}
                Err(err)
                    if err.kind() == std::io::ErrorKind::AlreadyExists
                        && std::fs::symlink_metadata(&path).is_ok_and(|md| md.is_dir()) => {}
                Err(err) => return Err(err).with_context(|| format!("creating {}", path.display())),
            },
            EntryKind::Symlink { target } => {
                if std::fs::symlink_metadata(&path).is_ok() {
                    std::fs::remove_file(&path)?;
                }
                std::os::unix::fs::symlink(target, &path).with_context(|| format!("creating {}", path.display()))?;
            }
            EntryKind::File { mode, size, chunks } => {
                files.push(path.clone());
                if resumed {
                    // Never write into what an earlier attempt linked: it is another
                    // version's inode.
                    let shared = std::fs::symlink_metadata(&path).is_ok_and(|md| !md.is_file() || md.nlink() > 1);
                    if shared {
                        ledger.unlink(app, &path, None).with_context(|| format!("removing {}", path.display()))?;
                    }
                }
                if let Some(d) = donors.files.get(&file_key(*mode, *size, chunks)) {
                    if resumed {
                        ledger.unlink(app, &path, None).with_context(|| format!("removing {}", path.display()))?;
                    }
                    let how = ledger
                        .reuse(app, &d.path, &d.sealed, &path, reuse, &mut reflinks)
                        .with_context(|| format!("reusing {} for {}", d.path.display(), path.display()))?;
                    if let Some(how) = how {
                        counts[match how {
                            Reused::Linked => 0,
                            Reused::Cloned => 1,
                            Reused::Copied => 2,
                        }] += 1;
                        reused += size;
                        made.push(Made::Reused(how, d.sealed.clone()));
                        direct.push(false);
                        failpoint::hit_n("stage-reuse", (counts[0] + counts[1] + counts[2]) as u64);
                        continue;
                    }
                }
                made.push(Made::Written);
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                let had = f.metadata()?.len();
                if had != *size {
                    f.set_len(*size)?;
                }
                let idx = files.len() - 1;
                let reused_before = reused;
                let mut offset = 0u64;
                for c in chunks {
                    let len = c.len as usize;
                    buf.resize(len, 0);
                    let present = resumed
                        && had == *size
                        && f.read_exact_at(&mut buf, offset).is_ok()
                        && Digest::of(&buf) == c.digest;
                    let copied = match donors.chunks.get(&c.digest).filter(|_| !present) {
                        None => false,
                        // Kernel-side while the donor holds as sealed; else read and hashed.
                        Some(at) => {
                            sources.copy(ledger, app, at, &f, offset, c.len)?
                                || File::open(&at.path).and_then(|d| d.read_exact_at(&mut buf, at.offset)).is_ok()
                                    && Digest::of(&buf) == c.digest
                                    && f.write_all_at(&buf, offset).is_ok()
                        }
                    };
                    if present || copied {
                        reused += u64::from(c.len);
                    } else {
                        match index.get(&c.digest) {
                            Some(&i) => need[i].places.push((idx, offset)),
                            None => {
                                index.insert(c.digest, need.len());
                                need.push(Need { digest: c.digest, len: c.len, places: vec![(idx, offset)] });
                            }
                        }
                    }
                    offset += u64::from(c.len);
                }
                let is_direct = sink::wants_direct(&path, *size);
                if is_direct && (resumed || reused > reused_before) {
                    // What was read back or copied here is in the page cache: out with it
                    // before direct writes go to the same file.
                    sink::forget_cached(&f).with_context(|| format!("syncing {}", path.display()))?;
                }
                direct.push(is_direct);
            }
        }
    }
    sources.check(ledger, app)?;
    Ok(Plan { files: Arc::new(files), made, direct: Arc::new(direct), need, reused, counts })
}

/// Donor files whose chunks were copied without hashing them, as they were when first
/// opened: each must still hold as sealed once staging is done reading from it.
#[derive(Default)]
struct Sources {
    open: HashMap<PathBuf, Option<(File, Stamp, Arc<SealEntry>)>>,
}

impl Sources {
    /// At most this many donor files open at once.
    const OPEN_MAX: usize = 64;

    /// Copies `len` bytes of a chunk from where `at` says to `dst` at `to`, in the kernel;
    /// false if `at` is not of a sealed version, or no longer holds, or the copy failed. An
    /// error: a donor already copied from changed, and what came from it cannot be trusted.
    fn copy(&mut self, ledger: &Ledger, app: &str, at: &ChunkAt, dst: &File, to: u64, len: u32) -> Result<bool> {
        let Some(sealed) = &at.sealed else { return Ok(false) };
        if self.open.len() >= Self::OPEN_MAX && !self.open.contains_key(&at.path) {
            self.check(ledger, app)?;
        }
        let src = self.open.entry(at.path.clone()).or_insert_with(|| {
            let f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&at.path).ok()?;
            let pre = Stamp::of(&f).ok()?;
            ledger.holds(app, sealed, &pre.entry(&sealed.path)).then(|| (f, pre, sealed.clone()))
        });
        Ok(match src {
            Some((f, _, _)) => share::copy_range(f, at.offset, dst, to, u64::from(len)).is_ok(),
            None => false,
        })
    }

    /// Checks every donor read from and closes them; fails if one changed meanwhile (its
    /// copied bytes cannot be trusted).
    fn check(&mut self, ledger: &Ledger, app: &str) -> Result<()> {
        let mut changed = None;
        for (path, src) in self.open.drain() {
            let Some((f, pre, sealed)) = src else { continue };
            let same = Stamp::of(&f).is_ok_and(|now| now.ino == pre.ino) && ledger.still_holds(app, &f, &sealed);
            if !same && changed.is_none() {
                changed = Some(path);
            }
        }
        match changed {
            Some(path) => bail!("{} changed while this version was copying from it; deploy again", path.display()),
            None => Ok(()),
        }
    }
}

/// Fetches the needed chunks over several streams; each stream's chunks are verified and
/// written on a blocking thread while the next ones arrive. The partial blocks of direct
/// files are written once every stream is done.
async fn fetch(
    host: &Arc<Host>,
    app: &str,
    conn: &quinn::Connection,
    need: Vec<Need>,
    files: Arc<Vec<PathBuf>>,
    direct: Arc<Vec<bool>>,
    staging: &Path,
) -> Result<u64> {
    if need.is_empty() {
        return Ok(0);
    }
    let written = Arc::new(AtomicU64::new(0));
    let (flush_tx, flusher) = flusher(files.clone());
    let lanes = std::env::var("STAGEHAND_FETCH_LANES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LANES)
        .clamp(1, 16)
        .min(need.len());
    let per_lane = need.len().div_ceil(lanes);
    let mut need = need;
    let mut tasks = tokio::task::JoinSet::new();
    while !need.is_empty() {
        let rest = need.split_off(per_lane.min(need.len()));
        let lane = std::mem::replace(&mut need, rest);
        let sink = Sink::new(files.clone(), direct.clone());
        tasks.spawn(fetch_lane(conn.clone(), lane, sink, written.clone(), flush_tx.clone()));
    }
    drop(flush_tx);
    let mut total = 0;
    let mut edges = Vec::new();
    let mut failure = None;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok((n, e))) => {
                total += n;
                edges.extend(e);
            }
            Ok(Err(e)) => {
                tasks.abort_all();
                failure.get_or_insert(e);
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                failure.get_or_insert(e.into());
            }
        }
    }
    // Every sender is gone once the lanes are: the flusher finishes its last round.
    let flushed = tokio::task::spawn_blocking(move || {
        flusher.join().unwrap_or_else(|_| Err(std::io::Error::other("the flusher panicked")))
    })
    .await?;
    if let Some(e) = failure {
        return Err(e);
    }
    if let Err(e) = flushed {
        // After a failed fsync the page cache cannot be trusted: start this version over.
        if let Err(r) = host.ledger.remove_tree(app, staging, None) {
            warn!(path = %staging.display(), error = %r, "Could not discard the partial copy.");
        }
        bail!("writing back staged files failed: {e}; the partial copy was discarded, deploy again to retry");
    }
    tokio::task::spawn_blocking(move || sink::write_edges(files, &edges)).await??;
    Ok(total)
}

/// Bytes written before the flusher starts writing them back.
const FLUSH_EVERY: u64 = 32 << 20;

/// Starts writeback of what went through the page cache while the transfer is still
/// running, so that the fsync at the end finds little left to do: a thread that fdatasyncs
/// files once enough bytes went into them. Its first error is its result: an error seen
/// here is not reported again by a later fsync.
fn flusher(
    files: Arc<Vec<PathBuf>>,
) -> (std::sync::mpsc::Sender<(usize, u64)>, std::thread::JoinHandle<std::io::Result<()>>) {
    let (tx, rx) = std::sync::mpsc::channel::<(usize, u64)>();
    let handle = std::thread::spawn(move || {
        let mut dirty: HashMap<usize, u64> = HashMap::new();
        let mut pending = 0u64;
        let mut result = Ok(());
        while let Ok((idx, n)) = rx.recv() {
            *dirty.entry(idx).or_default() += n;
            pending += n;
            if pending >= FLUSH_EVERY && result.is_ok() {
                for (idx, _) in dirty.drain() {
                    if let Err(e) = File::open(&files[idx]).and_then(|f| f.sync_data()) {
                        result = Err(std::io::Error::new(e.kind(), format!("{}: {e}", files[idx].display())));
                        break;
                    }
                }
                pending = 0;
            }
        }
        result
    });
    (tx, handle)
}

/// One fetch stream: requests chunks in batches and hands them, as they arrive, to a
/// blocking writer that verifies and writes them. Returns the bytes fetched and the edges
/// the writer left for later.
async fn fetch_lane(
    conn: quinn::Connection,
    lane: Vec<Need>,
    mut sink: Sink,
    written: Arc<AtomicU64>,
    flush: std::sync::mpsc::Sender<(usize, u64)>,
) -> Result<(u64, Vec<Edge>)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<bytes::Bytes>, Need)>(16);
    // A writer that gets fewer chunks than the lane holds stops without writing what it
    // gathered: the stage failed or was cancelled.
    let expected = lane.len();
    let writer = tokio::task::spawn_blocking(move || {
        // Received pieces are packet-sized: gather them once, off the network task,
        // straight into the buffer the sink writes from.
        let report = |idx, n| {
            let _ = flush.send((idx, n));
        };
        let mut received = 0;
        while let Some((pieces, need)) = rx.blocking_recv() {
            received += 1;
            let len = need.len as usize;
            let (idx, offset) = need.places[0];
            let slot = sink.slot(idx, offset, len)?;
            let mut at = 0;
            for p in &pieces {
                slot[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            if Digest::of(slot) != need.digest {
                bail!("chunk {} from the controller does not match its digest; staging stopped", need.digest.short());
            }
            sink.commit(len);
            for &(idx, offset) in &need.places[1..] {
                sink.copy_last(len, idx, offset)?;
            }
            sink.drain_buffered(report);
            failpoint::hit_n("stage-chunk", written.fetch_add(1, Ordering::Relaxed) + 1);
        }
        if received < expected {
            return Ok(Vec::new());
        }
        let edges = sink.finish()?;
        sink.drain_buffered(report);
        tracing::debug!(direct_bytes = sink.direct_bytes(), edges = edges.len(), "A fetch stream is written out.");
        anyhow::Ok(edges)
    });
    let reader = async {
        let mut total = 0u64;
        let mut lane = lane;
        while !lane.is_empty() {
            let rest = lane.split_off(BATCH.min(lane.len()));
            let batch = std::mem::replace(&mut lane, rest);
            let (mut send, recv) = conn.open_bi().await?;
            let digests = batch.iter().map(|n| n.digest).collect();
            write_msg(&mut send, &DeployUp::FetchChunks { digests }).await?;
            send.finish()?;
            let mut incoming = Incoming::new(recv);
            for need in batch {
                let pieces = match incoming.blob().await? {
                    Some(Some(p)) => p,
                    Some(None) => bail!("the controller does not have chunk {}", need.digest.short()),
                    None => bail!("the controller ended the transfer early"),
                };
                let len: usize = pieces.iter().map(|p| p.len()).sum();
                if len != need.len as usize {
                    bail!("chunk {} has the wrong length", need.digest.short());
                }
                total += len as u64;
                if tx.send((pieces, need)).await.is_err() {
                    // The writer stopped; its error says why.
                    return Ok(total);
                }
            }
        }
        anyhow::Ok(total)
    };
    let read = reader.await;
    drop(tx);
    let edges = writer.await??;
    Ok((read?, edges))
}

/// Reads blobs as `frame::write_blob` framed them, without copying their bytes out of the
/// QUIC receive buffers, taking many received pieces per call.
struct Incoming {
    recv: quinn::RecvStream,
    pending: std::collections::VecDeque<bytes::Bytes>,
    buffered: usize,
}

impl Incoming {
    fn new(recv: quinn::RecvStream) -> Self {
        Incoming { recv, pending: Default::default(), buffered: 0 }
    }

    /// Receives until `n` bytes are buffered; false if the stream ended first.
    async fn want(&mut self, n: usize) -> Result<bool> {
        let mut bufs: [bytes::Bytes; 32] = Default::default();
        while self.buffered < n {
            match self.recv.read_chunks(&mut bufs).await? {
                Some(k) => {
                    for b in bufs[..k].iter_mut() {
                        self.buffered += b.len();
                        self.pending.push_back(std::mem::take(b));
                    }
                }
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Takes exactly `n` buffered bytes as pieces.
    fn take(&mut self, mut n: usize) -> Vec<bytes::Bytes> {
        let mut out = Vec::new();
        self.buffered -= n;
        while n > 0 {
            let front = self.pending.front_mut().expect("enough bytes are buffered");
            if front.len() <= n {
                n -= front.len();
                out.push(self.pending.pop_front().expect("just looked"));
            } else {
                out.push(front.split_to(n));
                n = 0;
            }
        }
        out
    }

    /// The next blob: `None` at the end of the stream, `Some(None)` for "absent".
    async fn blob(&mut self) -> Result<Option<Option<Vec<bytes::Bytes>>>> {
        if !self.want(4).await? {
            if self.buffered == 0 {
                return Ok(None);
            }
            bail!("the stream ended inside a chunk header");
        }
        let mut len = [0u8; 4];
        let mut at = 0;
        for p in self.take(4) {
            len[at..at + p.len()].copy_from_slice(&p);
            at += p.len();
        }
        let len = u32::from_be_bytes(len);
        if len == u32::MAX {
            return Ok(Some(None));
        }
        let len = len as usize;
        if len > frame::CHUNK_LIMIT {
            bail!("chunk of {len} bytes exceeds the limit of {}", frame::CHUNK_LIMIT);
        }
        if !self.want(len).await? {
            bail!("the stream ended inside a chunk");
        }
        Ok(Some(Some(self.take(len))))
    }
}

/// Where a staged tree goes: the temporary tree, its place under `releases/`, and its
/// manifest's file.
struct Target<'a> {
    staging: &'a Path,
    release_dir: &'a Path,
    manifest_file: &'a Path,
}

/// Sets modes, fsyncs every file and directory, records the manifest, renames the tree into
/// `releases/` and fsyncs both parents. Returns the seal of the staged tree.
fn finish(
    ledger: &Ledger,
    app: &str,
    to: &Target,
    manifest_bytes: &[u8],
    m: &Manifest,
    files: &[PathBuf],
    made: &[Made],
) -> Result<Vec<SealEntry>> {
    let staging = to.staging;
    let fail = |what: String| {
        // After a failed fsync the page cache cannot be trusted: start this version over.
        let _ = ledger.remove_tree(app, staging, None);
        anyhow::anyhow!("{what}; the partial copy was discarded, deploy again to retry")
    };
    let mut shared = HashMap::new();
    for ((path, made), (rel, mode, _, _)) in files.iter().zip(made).zip(m.files()) {
        if let Made::Reused(Reused::Linked, sealed) = made {
            // Another version's inode, durable and of this mode already: a chmod would move
            // its ctime in every version. It must still be as that version sealed it.
            let Some(now) = ledger.holding(app, path, sealed) else {
                return Err(fail(format!("{rel}, shared with an older version, changed while this one was staged")));
            };
            shared.insert(rel, now);
            continue;
        }
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| fail(format!("opening {}: {e}", path.display())))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| fail(format!("chmod: {e}")))?;
        f.sync_all().map_err(|e| fail(format!("fsync: {e}")))?;
    }
    let mut dirs: Vec<(PathBuf, u32)> = m
        .entries
        .iter()
        .filter_map(|e| match e.kind {
            EntryKind::Dir { mode } => Some((manifest::join(staging, &e.path), mode)),
            _ => None,
        })
        .collect();
    dirs.reverse();
    dirs.push((staging.to_path_buf(), 0o755));
    for (d, mode) in &dirs {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(*mode)).map_err(|e| fail(format!("chmod: {e}")))?;
        fsx::fsync_dir(d).map_err(|e| fail(format!("fsync {}: {e}", d.display())))?;
    }
    if let Some(dir) = to.manifest_file.parent() {
        fsx::create_dir_all_durable(dir)?;
    }
    fsx::write_atomic(to.manifest_file, manifest_bytes, 0o644)?;
    let releases = to.release_dir.parent().expect("release dirs have a parent");
    fsx::create_dir_all_durable(releases)?;
    failpoint::hit("stage-before-rename");
    std::fs::rename(staging, to.release_dir).with_context(|| format!("renaming into {}", to.release_dir.display()))?;
    fsx::fsync_dir(releases)?;
    if let Some(p) = staging.parent() {
        fsx::fsync_dir(p)?;
    }
    let mut seal = tree::seal(to.release_dir, m)?;
    // A shared inode is sealed as it was checked above, not as it is now: a write since
    // then must fail this version's seal too.
    for s in &mut seal {
        if let Some(now) = shared.get(s.path.as_str()) {
            *s = SealEntry { path: s.path.clone(), ..now.clone() };
        }
    }
    Ok(seal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    /// Bytes copied from a donor that is written afterwards must fail the staging, however
    /// many other donors are opened after it (the 65th once closed them all unchecked).
    #[test]
    fn a_donor_changed_after_a_copy_fails_the_staging() {
        let (db, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ledger = Ledger::new(Store::open(db.path()).unwrap());
        let donors: Vec<(PathBuf, Arc<SealEntry>)> = (0..Sources::OPEN_MAX + 2)
            .map(|i| {
                let p = dir.path().join(format!("f{i}"));
                std::fs::write(&p, [i as u8; 8]).unwrap();
                let sealed = Arc::new(tree::seal_entry(&p, &format!("f{i}")).unwrap());
                (p, sealed)
            })
            .collect();
        let dst =
            File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("dst")).unwrap();
        let at = |i: usize| ChunkAt { path: donors[i].0.clone(), offset: 0, sealed: Some(donors[i].1.clone()) };
        let mut sources = Sources::default();
        assert!(sources.copy(&ledger, "web", &at(0), &dst, 0, 4).unwrap());
        std::fs::OpenOptions::new().write(true).open(&donors[0].0).unwrap().write_all_at(b"XXXX", 4).unwrap();
        assert!(sources.copy(&ledger, "web", &at(0), &dst, 4, 4).unwrap(), "still open: copied");
        let mut failed = false;
        for i in 1..donors.len() {
            if sources.copy(&ledger, "web", &at(i), &dst, 8, 4).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed || sources.check(&ledger, "web").is_err(), "copies from a changed donor were trusted");
    }
}
