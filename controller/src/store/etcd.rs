//! The store in etcd, shared by several controllers (SPEC §13).
//!
//! Reads come from a mirror of every key, loaded at start and kept current by a watch:
//! as fast as sled's, and still served while etcd is away. Writes go to the mirror at once
//! and to etcd in order, batched into transactions by a writer thread; `flush` waits until
//! etcd has them, which is what sled's flush promises too. A compare-and-swap (a token
//! used, a seq allocated, an agent revoked, a rollout started) is one etcd transaction,
//! after every write queued before it.
//!
//! A key with writes of this controller still queued ignores the watch until they land;
//! otherwise a change is taken only if it is newer (by etcd revision) than what the mirror
//! holds, so this controller's own writes coming back late never undo a later one.
//!
//! One lease per controller (`LEASE_TTL`): it carries the controller's presence records
//! and, for the one that holds it, the leadership key (`meta/leader`).

use super::backend::{Backend, Swapped, Table, Val};
use super::etcd_api::{self, Compare, EtcdError, Write};
use super::{Result, StoreError};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// The key in `meta` that the controller driving rollouts holds on its lease.
pub const LEADER_KEY: &[u8] = b"leader";
/// Every key of the state lives under this prefix.
const PREFIX: &[u8] = b"/stagehand/";
/// How long a controller that stops renewing its lease stays the leader in etcd's eyes.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How long a flush or a compare-and-swap waits for etcd before it fails.
const WAIT: Duration = Duration::from_secs(8);
/// Writes sent in one transaction (etcd allows 128 operations by default).
const BATCH_OPS: usize = 100;
const BATCH_BYTES: usize = 1 << 20;
/// Bytes of writes waiting for etcd at most. While etcd is away writes wait (and this
/// controller's reads show them); past this bound new ones are refused, as a flush is.
const QUEUE_BYTES: usize = 256 << 20;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn full_key(t: Table, key: &[u8]) -> Vec<u8> {
    let mut k = PREFIX.to_vec();
    k.extend_from_slice(t.name().as_bytes());
    k.push(b'/');
    k.extend_from_slice(key);
    k
}

/// The table a full key belongs to.
fn table_of(full: &[u8]) -> Option<Table> {
    let rest = full.strip_prefix(PREFIX)?;
    let end = rest.iter().position(|&b| b == b'/')?;
    Table::by_name(std::str::from_utf8(&rest[..end]).ok()?)
}

struct Entry {
    /// None: deleted (kept until the watch has gone past it).
    val: Option<Arc<[u8]>>,
    /// The etcd revision the value is from.
    rev: i64,
    /// The generation of this controller's last queued write to the key, until it lands.
    pending: u64,
    /// The newest change etcd reported while a write was pending: it may be newer than the
    /// write, once that lands.
    later: Option<(Option<Arc<[u8]>>, i64)>,
}

impl Entry {
    fn new() -> Entry {
        Entry { val: None, rev: 0, pending: 0, later: None }
    }

    /// This controller's write `gen` landed at revision `rev` (or not at all): reads see
    /// it, unless etcd has reported a newer change meanwhile.
    fn landed(&mut self, gen: u64, rev: Option<i64>) {
        if self.pending != gen {
            return;
        }
        self.pending = 0;
        if let Some(rev) = rev {
            self.rev = self.rev.max(rev);
        }
        if let Some((val, later)) = self.later.take() {
            if later > self.rev {
                self.val = val;
                self.rev = later;
            }
        }
    }
}

#[derive(Default)]
struct Mirror {
    map: BTreeMap<Vec<u8>, Entry>,
    deleted: usize,
}

impl Mirror {
    /// Takes a value etcd holds at `rev`, unless a newer one (or a queued write) is here.
    /// Returns whether it changed what reads see.
    fn take(&mut self, key: Vec<u8>, val: Option<Arc<[u8]>>, rev: i64) -> bool {
        let e = self.map.entry(key).or_insert_with(Entry::new);
        if rev <= e.rev {
            return false;
        }
        if e.pending != 0 {
            if e.later.as_ref().is_none_or(|(_, r)| rev > *r) {
                e.later = Some((val, rev));
            }
            return false;
        }
        let changed = e.val != val;
        if val.is_none() && e.val.is_some() {
            self.deleted += 1;
        }
        e.val = val;
        e.rev = rev;
        changed
    }

    /// Forgets deleted keys the watch has gone past.
    fn prune(&mut self, upto: i64) {
        if self.deleted > 4096 {
            self.map.retain(|_, e| e.val.is_some() || e.pending != 0 || e.rev > upto);
            self.deleted = 0;
        }
    }
}

enum Op {
    Write {
        key: Vec<u8>,
        val: Option<Arc<[u8]>>,
    },
    Swap {
        key: Vec<u8>,
        old: Option<Vec<u8>>,
        new: Option<Arc<[u8]>>,
        /// Written with it if it succeeds.
        then: Vec<(Vec<u8>, Arc<[u8]>)>,
        /// The outcome, or why etcd refused the transaction.
        reply: std::sync::mpsc::SyncSender<std::result::Result<Swapped, String>>,
        cancelled: Arc<AtomicBool>,
    },
}

impl Op {
    /// The bytes it holds, near enough.
    fn size(&self) -> usize {
        let len = |v: &Option<Arc<[u8]>>| v.as_ref().map_or(0, |v| v.len());
        match self {
            Op::Write { key, val } => key.len() + len(val),
            Op::Swap { key, old, new, then, .. } => {
                key.len()
                    + old.as_ref().map_or(0, Vec::len)
                    + len(new)
                    + then.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            }
        }
    }
}

#[derive(Default)]
struct Queue {
    ops: VecDeque<(u64, Op)>,
    /// What `ops` holds, in bytes (`Op::size`).
    bytes: usize,
    /// Generations: every queued op takes the next one.
    next: u64,
    /// Every op up to this generation has landed (or failed for good).
    done: u64,
    /// A batch etcd refused (for good), with why: the next flush reports it.
    refused: Option<String>,
}

impl Queue {
    /// Queues an op and returns its generation; refuses it (saying how many bytes wait)
    /// when `limit` bytes are waiting already. An op alone in the queue is always taken.
    fn push(&mut self, op: Op, limit: usize) -> std::result::Result<u64, usize> {
        let size = op.size();
        if !self.ops.is_empty() && self.bytes + size > limit {
            return Err(self.bytes);
        }
        self.next += 1;
        self.bytes += size;
        self.ops.push_back((self.next, op));
        Ok(self.next)
    }

    /// The next transaction's ops: writes in order, up to `BATCH_OPS` or `BATCH_BYTES`
    /// (at least one), or one compare-and-swap alone.
    fn next_batch(&mut self) -> Vec<(u64, Op)> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some((_, op)) = self.ops.front() {
            let swap = matches!(op, Op::Swap { .. });
            if swap && !batch.is_empty() {
                break;
            }
            let size = op.size();
            if !batch.is_empty() && (batch.len() >= BATCH_OPS || bytes + size > BATCH_BYTES) {
                break;
            }
            bytes += size;
            self.bytes -= size;
            batch.push(self.ops.pop_front().expect("a front op"));
            if swap {
                break;
            }
        }
        batch
    }
}

/// This controller's keys on its lease, and which of them etcd does not have yet.
#[derive(Default)]
struct Ephemeral {
    live: HashMap<Vec<u8>, Vec<u8>>,
    dirty: HashSet<Vec<u8>>,
}

struct Inner {
    api: etcd_api::Etcd,
    /// This controller's name in the shared state: its address.
    name: String,
    mirror: RwLock<Mirror>,
    queue: Mutex<Queue>,
    /// The writer waits on it for ops; flushes wait on it for their ops to land.
    queue_moved: Condvar,
    /// Why etcd cannot be written now, if it cannot.
    trouble: Mutex<Option<String>>,
    changes: tokio::sync::watch::Sender<u64>,
    changed: AtomicU32,
    ephemeral: Mutex<Ephemeral>,
    lease: Mutex<Option<(i64, Instant)>>,
    leader: AtomicBool,
    loaded: (Mutex<bool>, Condvar),
    stop: AtomicBool,
}

pub struct Etcd(Arc<Inner>);

impl Etcd {
    /// Connects to etcd at `endpoints`, loads the state and starts following it. `name`
    /// says which controller this is (its address) to the others.
    pub fn open(endpoints: Vec<String>, name: String) -> Result<Self> {
        let inner = Arc::new(Inner {
            api: etcd_api::Etcd::new(endpoints),
            name,
            mirror: Default::default(),
            queue: Default::default(),
            queue_moved: Condvar::new(),
            trouble: Default::default(),
            changes: tokio::sync::watch::channel(0).0,
            changed: AtomicU32::new(0),
            ephemeral: Default::default(),
            lease: Default::default(),
            leader: AtomicBool::new(false),
            loaded: (Mutex::new(false), Condvar::new()),
            stop: AtomicBool::new(false),
        });
        for (name, work) in
            [("etcd-writer", write_loop as fn(&Inner)), ("etcd-watch", watch_loop), ("etcd-lease", lease_loop)]
        {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || work(&inner))
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        }
        // A large state takes its time to load; an etcd that does not answer fails soon.
        let started = Instant::now();
        let (loaded, cv) = &inner.loaded;
        let mut done = lock(loaded);
        while !*done {
            let unreachable = started.elapsed() > WAIT && lock(&inner.trouble).is_some();
            if unreachable || started.elapsed() > etcd_api::LOAD_TIMEOUT {
                drop(done);
                inner.stop.store(true, SeqCst);
                let why = lock(&inner.trouble).clone().unwrap_or_else(|| "the state did not load in time".into());
                return Err(StoreError::Unavailable(why));
            }
            done = cv.wait_timeout(done, Duration::from_millis(200)).unwrap_or_else(|p| p.into_inner()).0;
        }
        drop(done);
        Ok(Etcd(inner))
    }
}

impl Inner {
    fn trouble(&self, e: &EtcdError) {
        let mut t = lock(&self.trouble);
        if t.is_none() {
            warn!(error = %e, "The shared state in etcd cannot be reached; serving what this controller holds.");
        }
        *t = Some(e.to_string());
    }

    fn fine(&self) {
        if lock(&self.trouble).take().is_some() {
            info!(etcd = %self.api.endpoints(), "The shared state in etcd is reachable again.");
        }
    }

    fn notify(&self, tables: u32) {
        if tables != 0 {
            self.changed.fetch_or(tables, SeqCst);
            self.changes.send_modify(|n| *n += 1);
        }
    }

    fn unavailable(&self) -> StoreError {
        let why = lock(&self.trouble)
            .clone()
            .unwrap_or_else(|| format!("etcd at {} did not answer in time", self.api.endpoints()));
        StoreError::Unavailable(why)
    }

    /// Queues an op and, for a write, shows it to this controller's reads at once; refuses
    /// it while `QUEUE_BYTES` wait for an etcd that does not take them.
    fn enqueue(&self, op: Op) -> Result<u64> {
        let mut q = lock(&self.queue);
        let write = match &op {
            Op::Write { key, val } => Some((key.clone(), val.clone())),
            Op::Swap { .. } => None,
        };
        let gen = q.push(op, QUEUE_BYTES).map_err(|waiting| {
            let why = lock(&self.trouble).clone().unwrap_or_else(|| "etcd is slow to take writes".into());
            StoreError::Unavailable(format!("{} MiB of writes wait for etcd ({why}); refusing more", waiting >> 20))
        })?;
        if let Some((key, val)) = write {
            let mut m = self.mirror.write().unwrap_or_else(|p| p.into_inner());
            let e = m.map.entry(key).or_insert(Entry::new());
            let deleted = val.is_none() && e.val.is_some();
            e.val = val;
            e.pending = gen;
            // Counted for pruning like a deletion another controller made.
            m.deleted += usize::from(deleted);
        }
        drop(q);
        self.queue_moved.notify_all();
        Ok(gen)
    }
}

/// Sends queued writes to etcd in order, in batches; retries while etcd is away.
fn write_loop(inner: &Inner) {
    loop {
        let batch: Vec<(u64, Op)> = {
            let mut q = lock(&inner.queue);
            while q.ops.is_empty() {
                if inner.stop.load(SeqCst) {
                    return;
                }
                q = inner.queue_moved.wait_timeout(q, Duration::from_millis(500)).unwrap_or_else(|p| p.into_inner()).0;
            }
            q.next_batch()
        };
        let last = batch.last().map_or(0, |(g, _)| *g);
        let refused = if matches!(batch.first(), Some((_, Op::Swap { .. }))) {
            batch.into_iter().next().and_then(|(_, op)| swap_now(inner, op))
        } else {
            write_now(inner, batch)
        };
        let mut q = lock(&inner.queue);
        q.done = q.done.max(last);
        if refused.is_some() {
            q.refused = refused;
        }
        drop(q);
        inner.queue_moved.notify_all();
    }
}

/// Waits while etcd is away (and this controller runs); false once it stops.
fn backoff(inner: &Inner, e: &EtcdError, attempt: &mut u32) -> bool {
    inner.trouble(e);
    *attempt += 1;
    std::thread::sleep(Duration::from_millis(50u64 << (*attempt).min(4)));
    !inner.stop.load(SeqCst)
}

/// Writes a batch in one transaction (the last write of each key: etcd refuses a key twice
/// in one). Returns why etcd refused it, if it did for good.
fn write_now(inner: &Inner, batch: Vec<(u64, Op)>) -> Option<String> {
    let mut last: HashMap<&[u8], (u64, Option<&[u8]>)> = HashMap::new();
    let mut order = Vec::new();
    for (gen, op) in &batch {
        if let Op::Write { key, val } = op {
            if last.insert(key, (*gen, val.as_deref())).is_none() {
                order.push(key.as_slice());
            }
        }
    }
    let writes: Vec<Write> = order
        .iter()
        .map(|k| match last[k].1 {
            Some(value) => Write::Put { key: k, value, lease: None },
            None => Write::Delete { key: k },
        })
        .collect();
    let mut attempt = 0;
    let outcome = loop {
        match inner.api.txn(&[], &writes) {
            Ok(o) => break Ok(o.revision),
            Err(e @ EtcdError::Unreachable { .. }) => {
                if !backoff(inner, &e, &mut attempt) {
                    return None;
                }
            }
            Err(e) => break Err(e.to_string()),
        }
    };
    inner.fine();
    let mut m = inner.mirror.write().unwrap_or_else(|p| p.into_inner());
    for k in order {
        if let Some(e) = m.map.get_mut(k) {
            e.landed(last[k].0, outcome.as_ref().ok().copied());
        }
    }
    match outcome {
        Ok(_) => None,
        Err(why) => {
            warn!(error = %why, "etcd refused a batch of writes; they are lost.");
            Some(why)
        }
    }
}

/// One compare-and-swap, answered to the caller that waits for it.
fn swap_now(inner: &Inner, op: Op) -> Option<String> {
    let Op::Swap { key, old, new, then, reply, cancelled } = op else { return None };
    let compare = match &old {
        Some(o) => Compare::Value(&key, o),
        None => Compare::Absent(&key),
    };
    let mut writes = vec![match &new {
        Some(v) => Write::Put { key: &key, value: v, lease: None },
        None => Write::Delete { key: &key },
    }];
    for (k, v) in &then {
        writes.push(Write::Put { key: k, value: v, lease: None });
    }
    let mut attempt = 0;
    let outcome = loop {
        if cancelled.load(SeqCst) {
            return None;
        }
        match inner.api.txn(&[compare], &writes) {
            Ok(o) => break o,
            Err(e @ EtcdError::Unreachable { .. }) => {
                if !backoff(inner, &e, &mut attempt) {
                    return None;
                }
            }
            Err(e) => {
                // Said to the caller, not left for the next flush to find.
                let _ = reply.send(Err(e.to_string()));
                return None;
            }
        }
    };
    inner.fine();
    let mut m = inner.mirror.write().unwrap_or_else(|p| p.into_inner());
    let answer = if outcome.succeeded {
        // As etcd reported it (a later change may already be here from the watch).
        m.take(key.clone(), new.clone(), outcome.revision);
        for (k, v) in then {
            m.take(k, Some(v), outcome.revision);
        }
        Ok(())
    } else {
        // The caller decides again on what the key holds now; the mirror learns it from the
        // watch, in order with the changes around it.
        let current = outcome.current.into_iter().find(|kv| kv.key == key);
        Err(current.map(|kv| Val::Shared(Arc::from(kv.value))))
    };
    drop(m);
    let _ = reply.send(Ok(answer));
    None
}

/// Loads every key, then follows etcd's changes; starts over whenever the watch breaks.
fn watch_loop(inner: &Inner) {
    let mut attempt = 0;
    while !inner.stop.load(SeqCst) {
        let (kvs, rev) = match inner.api.range(PREFIX) {
            Ok(r) => r,
            Err(e) => {
                backoff(inner, &e, &mut attempt);
                continue;
            }
        };
        attempt = 0;
        {
            let mut m = inner.mirror.write().unwrap_or_else(|p| p.into_inner());
            let present: HashSet<&[u8]> = kvs.iter().map(|kv| kv.key.as_slice()).collect();
            let gone: Vec<Vec<u8>> = m
                .map
                .iter()
                .filter(|(k, e)| e.val.is_some() && e.pending == 0 && e.rev <= rev && !present.contains(k.as_slice()))
                .map(|(k, _)| k.clone())
                .collect();
            for k in gone {
                m.take(k, None, rev);
            }
            for kv in &kvs {
                m.take(kv.key.clone(), Some(kv.value.as_slice().into()), kv.mod_revision);
            }
        }
        inner.notify(u32::MAX);
        tracing::debug!(keys = kvs.len(), revision = rev, "Loaded the shared state; following it.");
        let (loaded, cv) = &inner.loaded;
        *lock(loaded) = true;
        cv.notify_all();
        let ended = inner.api.watch(PREFIX, rev + 1, |events, upto| {
            let mut tables = 0;
            tracing::trace!(events = events.len(), upto, "Changes from etcd.");
            let mut m = inner.mirror.write().unwrap_or_else(|p| p.into_inner());
            for e in events {
                let table = table_of(&e.kv.key);
                let val = (!e.deleted).then(|| Arc::<[u8]>::from(e.kv.value));
                if m.take(e.kv.key, val, e.kv.mod_revision) {
                    tables |= table.map_or(0, Table::bit);
                }
            }
            m.prune(upto);
            drop(m);
            inner.notify(tables);
            !inner.stop.load(SeqCst)
        });
        if let Err(e) = ended {
            backoff(inner, &e, &mut attempt);
        }
    }
}

/// Keeps this controller's lease alive, its presence records on it, and campaigns for the
/// leadership key. A controller that cannot renew its lease in time stops driving before
/// etcd lets it go, so two never drive at once.
fn lease_loop(inner: &Inner) {
    let leader_key = full_key(Table::Meta, LEADER_KEY);
    let mut attempt = 0;
    while !inner.stop.load(SeqCst) {
        let lease = *lock(&inner.lease);
        let result = (|| -> std::result::Result<(), EtcdError> {
            let id = match lease {
                None => {
                    let id = inner.api.lease_grant(LEASE_TTL.as_secs())?;
                    *lock(&inner.lease) = Some((id, Instant::now()));
                    // Every presence record goes on the new lease.
                    let mut eph = lock(&inner.ephemeral);
                    let keys: Vec<Vec<u8>> = eph.live.keys().cloned().collect();
                    eph.dirty.extend(keys);
                    id
                }
                Some((id, renewed)) if renewed.elapsed() >= Duration::from_secs(1) => {
                    if inner.api.lease_keep_alive(id)? {
                        *lock(&inner.lease) = Some((id, Instant::now()));
                    } else {
                        warn!("This controller's lease in etcd expired; taking a new one.");
                        *lock(&inner.lease) = None;
                        inner.leader.store(false, SeqCst);
                        return Ok(());
                    }
                    id
                }
                Some((id, _)) => id,
            };
            sync_ephemeral(inner, id)?;
            if !inner.leader.load(SeqCst) {
                let claim = Write::Put { key: &leader_key, value: inner.name.as_bytes(), lease: Some(id) };
                if inner.api.txn(&[Compare::Absent(&leader_key)], &[claim])?.succeeded {
                    inner.leader.store(true, SeqCst);
                    info!(controller = %inner.name, "This controller now drives rollouts and catch-up (it holds the lease).");
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                attempt = 0;
                inner.fine();
            }
            Err(e) => {
                inner.trouble(&e);
                attempt += 1;
            }
        }
        // Renewal late enough that etcd may already have let the lease go: step down.
        // The lease is given up with the leadership: a renewal that succeeds later would keep
        // the leadership key alive for a controller that no longer drives, and nobody would.
        let late = lock(&inner.lease).filter(|(_, renewed)| renewed.elapsed() + Duration::from_secs(1) >= LEASE_TTL);
        if let Some((id, _)) = late {
            if inner.leader.swap(false, SeqCst) {
                warn!("This controller could not renew its lease in etcd in time: it stops driving rollouts.");
            }
            *lock(&inner.lease) = None;
            let _ = inner.api.lease_revoke(id);
        }
        std::thread::sleep(Duration::from_millis(if attempt == 0 { 250 } else { 500 }));
    }
}

/// Writes the presence records etcd does not have yet, on lease `id`.
fn sync_ephemeral(inner: &Inner, id: i64) -> std::result::Result<(), EtcdError> {
    let (keys, values): (Vec<Vec<u8>>, Vec<Option<Vec<u8>>>) = {
        let eph = lock(&inner.ephemeral);
        eph.dirty.iter().take(BATCH_OPS).map(|k| (k.clone(), eph.live.get(k).cloned())).unzip()
    };
    if keys.is_empty() {
        return Ok(());
    }
    let writes: Vec<Write> = keys
        .iter()
        .zip(&values)
        .map(|(k, v)| match v {
            Some(value) => Write::Put { key: k, value, lease: Some(id) },
            None => Write::Delete { key: k },
        })
        .collect();
    inner.api.txn(&[], &writes)?;
    let mut eph = lock(&inner.ephemeral);
    for (k, v) in keys.into_iter().zip(values) {
        // Unless it changed again meanwhile.
        if eph.live.get(&k) == v.as_ref() {
            eph.dirty.remove(&k);
        }
    }
    Ok(())
}

impl Backend for Etcd {
    fn get(&self, t: Table, key: &[u8]) -> Result<Option<Val>> {
        let m = self.0.mirror.read().unwrap_or_else(|p| p.into_inner());
        Ok(m.map.get(&full_key(t, key)).and_then(|e| e.val.clone()).map(Val::Shared))
    }

    /// etcd's answer, taken into the mirror; the mirror's when etcd does not answer.
    fn get_fresh(&self, t: Table, key: &[u8]) -> Result<Option<Val>> {
        let k = full_key(t, key);
        if let Ok(Some(kv)) = self.0.api.get(&k) {
            let mut m = self.0.mirror.write().unwrap_or_else(|p| p.into_inner());
            m.take(k, Some(kv.value.into()), kv.mod_revision);
        }
        self.get(t, key)
    }

    fn scan(&self, t: Table, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Val)>> {
        let start = full_key(t, prefix);
        let skip = full_key(t, b"").len();
        let m = self.0.mirror.read().unwrap_or_else(|p| p.into_inner());
        Ok(m.map
            .range(start.clone()..)
            .take_while(|(k, _)| k.starts_with(&start))
            .filter_map(|(k, e)| Some((k[skip..].to_vec(), Val::Shared(e.val.clone()?))))
            .collect())
    }

    fn put(&self, t: Table, key: &[u8], value: Vec<u8>) -> Result<()> {
        self.0.enqueue(Op::Write { key: full_key(t, key), val: Some(value.into()) }).map(drop)
    }

    fn remove(&self, t: Table, key: &[u8]) -> Result<()> {
        self.0.enqueue(Op::Write { key: full_key(t, key), val: None }).map(drop)
    }

    fn swap_and_put(
        &self,
        t: Table,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<Vec<u8>>,
        then: Vec<(Table, Vec<u8>, Vec<u8>)>,
    ) -> Result<Swapped> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let cancelled = Arc::new(AtomicBool::new(false));
        self.0.enqueue(Op::Swap {
            key: full_key(t, key),
            old: old.map(<[u8]>::to_vec),
            new: new.map(Arc::from),
            then: then.into_iter().map(|(t, k, v)| (full_key(t, &k), Arc::from(v))).collect(),
            reply,
            cancelled: cancelled.clone(),
        })?;
        match answer.recv_timeout(WAIT) {
            Ok(Ok(swapped)) => Ok(swapped),
            Ok(Err(why)) => Err(StoreError::Unavailable(format!("etcd refused a write: {why}"))),
            Err(_) => {
                cancelled.store(true, SeqCst);
                Err(self.0.unavailable())
            }
        }
    }

    fn flush(&self) -> Result<()> {
        let q = lock(&self.0.queue);
        let target = q.next;
        let (mut q, _) =
            self.0.queue_moved.wait_timeout_while(q, WAIT, |q| q.done < target).unwrap_or_else(|p| p.into_inner());
        if let Some(why) = q.refused.take() {
            return Err(StoreError::Unavailable(format!("etcd refused a write: {why}")));
        }
        if q.done < target {
            drop(q);
            return Err(self.0.unavailable());
        }
        Ok(())
    }

    fn set_ephemeral(&self, t: Table, key: &[u8], value: Option<Vec<u8>>) -> Result<()> {
        let k = full_key(t, key);
        {
            let mut m = self.0.mirror.write().unwrap_or_else(|p| p.into_inner());
            let e = m.map.entry(k.clone()).or_insert(Entry::new());
            e.val = value.as_deref().map(Arc::from);
        }
        let mut eph = lock(&self.0.ephemeral);
        match value {
            Some(v) => eph.live.insert(k.clone(), v),
            None => eph.live.remove(&k),
        };
        eph.dirty.insert(k);
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    fn is_leader(&self) -> bool {
        self.0.leader.load(SeqCst)
    }

    fn writable(&self) -> Result<()> {
        match lock(&self.0.trouble).clone() {
            Some(why) => Err(StoreError::Unavailable(why)),
            None => Ok(()),
        }
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.changes.subscribe()
    }

    fn take_changed(&self) -> u32 {
        self.0.changed.swap(0, SeqCst)
    }

    /// Lands what is queued and gives up the lease: another controller takes over at once.
    fn close(&self) {
        let _ = self.flush();
        self.0.stop.store(true, SeqCst);
        self.0.leader.store(false, SeqCst);
        if let Some((id, _)) = lock(&self.0.lease).take() {
            let _ = self.0.api.lease_revoke(id);
        }
        self.0.queue_moved.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(key: &str, len: usize) -> Op {
        Op::Write { key: key.as_bytes().to_vec(), val: Some(Arc::from(vec![7u8; len])) }
    }

    fn swap(key: &str) -> Op {
        let (reply, _) = std::sync::mpsc::sync_channel(1);
        Op::Swap {
            key: key.as_bytes().to_vec(),
            old: None,
            new: Some(Arc::from(&b"v"[..])),
            then: Vec::new(),
            reply,
            cancelled: Arc::new(AtomicBool::new(false)),
        }
    }

    fn gens(batch: &[(u64, Op)]) -> Vec<u64> {
        batch.iter().map(|(g, _)| *g).collect()
    }

    #[test]
    fn writes_past_the_bound_are_refused_until_etcd_takes_what_waits() {
        let mut q = Queue::default();
        // Alone in the queue an op is taken whatever its size: it would never fit otherwise.
        assert_eq!(q.push(write("big", 5000), 1000), Ok(1));
        assert_eq!(q.push(write("a", 10), 1000), Err(5003));
        assert_eq!(gens(&q.next_batch()), vec![1]);
        assert_eq!(q.bytes, 0);
        for i in 0..9 {
            assert!(q.push(write(&format!("k{i}"), 98), 1000).is_ok());
        }
        assert_eq!(q.bytes, 900);
        assert_eq!(q.push(write("k9", 99), 1000), Err(900), "1001 bytes would wait");
        assert_eq!(q.push(write("k9", 98), 1000), Ok(11), "a refused op takes no generation");
        assert_eq!(q.push(swap("s"), 1000), Err(1000));
        assert_eq!(gens(&q.next_batch()), (2..=11).collect::<Vec<_>>());
        assert_eq!(q.bytes, 0);
        assert_eq!(q.push(swap("s"), 1000), Ok(12));
    }

    #[test]
    fn batches_keep_order_and_a_swap_goes_alone() {
        let mut q = Queue::default();
        for i in 0..BATCH_OPS + 5 {
            q.push(write(&format!("k{i}"), 1), QUEUE_BYTES).unwrap();
        }
        q.push(swap("s"), QUEUE_BYTES).unwrap();
        q.push(write("after", 1), QUEUE_BYTES).unwrap();
        let first = q.next_batch();
        assert_eq!(gens(&first), (1..=BATCH_OPS as u64).collect::<Vec<_>>());
        assert_eq!(gens(&q.next_batch()), (BATCH_OPS as u64 + 1..=BATCH_OPS as u64 + 5).collect::<Vec<_>>());
        let s = q.next_batch();
        assert!(matches!(s.as_slice(), [(_, Op::Swap { .. })]), "a swap alone");
        assert_eq!(gens(&q.next_batch()), vec![BATCH_OPS as u64 + 7]);
        assert!(q.next_batch().is_empty());
        assert_eq!(q.bytes, 0);
        // Large writes: a batch stops before BATCH_BYTES, and still takes one that is larger.
        q.push(write("a", BATCH_BYTES / 2), QUEUE_BYTES).unwrap();
        q.push(write("b", BATCH_BYTES / 2), QUEUE_BYTES).unwrap();
        q.push(write("c", BATCH_BYTES * 2), QUEUE_BYTES).unwrap();
        assert_eq!(q.next_batch().len(), 1);
        assert_eq!(q.next_batch().len(), 1);
        assert_eq!(q.next_batch().len(), 1);
    }
}
