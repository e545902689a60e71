//! The audit log (SPEC §10): `DATA/audit/audit.log`, one JSON entry per line, each chained
//! to the one before by a BLAKE3 hash, appended and fdatasync-ed before the action it records
//! is acknowledged. Who did what, with which arguments and outcome; agents' enrolments and
//! receipts; revocations, used tokens and every seq signed.
//!
//! Like the agent's filesystem, the log is the truth and sled is an index: at start the
//! controller checks that its database agrees with the log (revocations, used tokens, seq
//! high-water marks) and refuses to start otherwise, naming `stagehand controller repair`,
//! which brings the database back in line with the log.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// 1, 2, 3… without gaps.
    pub n: u64,
    /// Unix seconds.
    pub at: u64,
    /// The operator identity, `agent:<id>`, or `controller`.
    pub who: String,
    /// What happened: a request's name (`release`, `token-create`…), `enrolled`, `receipt`,
    /// `signed`, `agent-revoked`…
    pub what: String,
    pub args: serde_json::Value,
    /// `ok`, or the error.
    pub outcome: String,
    /// The hash of the entry before (zeros for the first).
    pub prev: String,
    /// BLAKE3 of `prev` and this entry's other fields.
    pub hash: String,
}

impl Entry {
    fn digest(&self) -> String {
        let body = serde_json::json!([self.n, self.at, self.who, self.what, self.args, self.outcome, self.prev]);
        blake3::hash(body.to_string().as_bytes()).to_hex().to_string()
    }
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where the log lives under a controller's data directory.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("audit").join("audit.log")
}

/// Reads and checks the whole chain; the error names the first entry that does not hold.
pub fn read(path: &Path) -> Result<Vec<Entry>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut out: Vec<Entry> = Vec::new();
    let mut prev = GENESIS.to_string();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        let n = i as u64 + 1;
        let e: Entry = serde_json::from_str(&line)
            .map_err(|err| anyhow::anyhow!("entry {n} of {} is not an audit entry: {err}", path.display()))?;
        if e.n != n || e.prev != prev || e.digest() != e.hash {
            bail!("entry {n} of {} was altered (its hash chain does not hold)", path.display());
        }
        prev = e.hash.clone();
        out.push(e);
    }
    Ok(out)
}

/// The log, open for appending.
pub struct Audit {
    inner: Mutex<Tail>,
    /// Group commit: the highest entry known to be on disk, and the file to sync. One
    /// fdatasync covers every entry written before it began, so callers that queue behind a
    /// sync in progress usually find theirs done (5,000 receipts took 5,000 syncs in a row).
    synced: Mutex<(u64, File)>,
}

struct Tail {
    file: File,
    n: u64,
    prev: String,
    /// The newest entries, for the fleet page (`stagehand audit` reads the whole log).
    recent: std::collections::VecDeque<Entry>,
}

/// How many of the newest entries the fleet page can show.
pub const RECENT: usize = 5000;

impl Audit {
    /// Opens (creating) the log; its chain must hold.
    pub fn open(data_dir: &Path) -> Result<(Audit, Vec<Entry>)> {
        let path = path(data_dir);
        stagehand_common::fsx::create_dir_all_durable(path.parent().expect("the log has a directory"))?;
        let entries = read(&path)?;
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let (n, prev) = entries.last().map_or((0, GENESIS.to_string()), |e| (e.n, e.hash.clone()));
        let recent = entries[entries.len().saturating_sub(RECENT)..].iter().cloned().collect();
        let sync = file.try_clone()?;
        let audit = Audit { inner: Mutex::new(Tail { file, n, prev, recent }), synced: Mutex::new((n, sync)) };
        Ok((audit, entries))
    }

    /// Up to `take` of the newest entries, newest first, skipping the `skip` newest; and how
    /// many entries the log holds.
    pub fn newest(&self, skip: usize, take: usize) -> (Vec<Entry>, u64) {
        let t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (t.recent.iter().rev().skip(skip).take(take).cloned().collect(), t.n)
    }

    /// Appends an entry and waits for the disk: on return, it survives a power cut.
    pub fn record(&self, who: &str, what: &str, args: serde_json::Value, outcome: &str) -> Result<()> {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut e = Entry {
            n: t.n + 1,
            at: stagehand_common::ids::now_secs(),
            who: who.to_string(),
            what: what.to_string(),
            args,
            outcome: outcome.to_string(),
            prev: t.prev.clone(),
            hash: String::new(),
        };
        e.hash = e.digest();
        let mut line = serde_json::to_vec(&e)?;
        line.push(b'\n');
        t.file.write_all(&line).context("appending to the audit log")?;
        let n = e.n;
        t.n = e.n;
        t.prev = e.hash.clone();
        if t.recent.len() == RECENT {
            t.recent.pop_front();
        }
        t.recent.push_back(e);
        drop(t);
        self.sync_through(n)
    }

    /// Returns once entry `n` and every one before it are on disk.
    fn sync_through(&self, n: u64) -> Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if synced.0 >= n {
            return Ok(());
        }
        // Everything written so far goes with this sync.
        let written = self.inner.lock().unwrap_or_else(|p| p.into_inner()).n;
        synced.1.sync_data().context("syncing the audit log")?;
        synced.0 = written;
        Ok(())
    }
}

/// What the log says the database must hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub revoked_agents: Vec<String>,
    pub revoked_admins: Vec<String>,
    /// Per token id: the uses it was created with, and how many enrolments used it.
    pub tokens: BTreeMap<String, (u64, u64)>,
    /// Per app, the highest seq signed.
    pub seqs: BTreeMap<String, u64>,
}

impl Facts {
    pub fn of(entries: &[Entry]) -> Facts {
        let mut f = Facts::default();
        for e in entries.iter().filter(|e| e.outcome == "ok") {
            let arg = |k: &str| e.args.get(k).and_then(|v| v.as_str()).map(str::to_string);
            match e.what.as_str() {
                "revoke-agent" => f.revoked_agents.extend(arg("agent")),
                "revoke-admin" => f.revoked_admins.extend(arg("name")),
                "create-token" => {
                    if let Some(id) = arg("id") {
                        // The controller keeps at least one use, whatever was asked.
                        f.tokens.entry(id).or_default().0 =
                            e.args.get("uses").and_then(|v| v.as_u64()).unwrap_or(1).max(1);
                    }
                }
                "enrolled" => {
                    if let Some(id) = arg("token") {
                        f.tokens.entry(id).or_default().1 += 1;
                    }
                }
                "signed" => {
                    if let (Some(app), Some(seq)) = (arg("app"), e.args.get("seq").and_then(|v| v.as_u64())) {
                        let high = f.seqs.entry(app).or_default();
                        *high = (*high).max(seq);
                    }
                }
                _ => {}
            }
        }
        f
    }
}

/// Where the database disagrees with the log: a revocation it lost, a token it would let be
/// used again, a seq counter below what was signed.
pub fn disagreements(store: &crate::store::Store, f: &Facts) -> crate::store::Result<Vec<String>> {
    let mut out = Vec::new();
    for id in &f.revoked_agents {
        if store.agent(&stagehand_common::AgentId(id.clone()))?.is_some_and(|a| !a.revoked) {
            out.push(format!("agent {id} is revoked in the log but not in the database"));
        }
    }
    for name in &f.revoked_admins {
        if store.admin(name)?.is_none_or(|a| !a.revoked) {
            out.push(format!("identity {name} is revoked in the log but not in the database"));
        }
    }
    for (id, (uses, used)) in &f.tokens {
        if let Some(t) = store.token(id)? {
            if u64::from(t.uses_left) + used > *uses {
                out.push(format!(
                    "token {id} has {} uses left; the log allows {}",
                    t.uses_left,
                    uses.saturating_sub(*used)
                ));
            }
        }
    }
    for (app, high) in &f.seqs {
        match store.seq_counter(app) {
            Ok(n) if n >= *high => {}
            Ok(_) => out.push(format!("the seq counter of {app} is below {high}, the highest seq signed")),
            Err(e) => out.push(format!("the seq counter of {app} is unreadable ({e})")),
        }
    }
    Ok(out)
}

/// Brings the database in line with the log; returns what it changed.
pub fn repair(store: &crate::store::Store, f: &Facts) -> crate::store::Result<Vec<String>> {
    let mut changed = Vec::new();
    for id in &f.revoked_agents {
        if let Some(mut a) = store.agent(&stagehand_common::AgentId(id.clone()))?.filter(|a| !a.revoked) {
            a.revoked = true;
            store.put_agent(&a)?;
            changed.push(format!("agent {id} revoked again"));
        }
    }
    for name in &f.revoked_admins {
        match store.admin(name)? {
            Some(mut a) if !a.revoked => {
                a.revoked = true;
                store.put_admin(&a)?;
                changed.push(format!("identity {name} revoked again"));
            }
            Some(_) => {}
            None => {
                store.put_admin(&crate::store::AdminRecord {
                    v: 1,
                    name: name.clone(),
                    role: "viewer".into(),
                    envs: Vec::new(),
                    revoked: true,
                    created_at: 0,
                    expires_at: 0,
                })?;
                changed.push(format!("identity {name} recorded as revoked"));
            }
        }
    }
    for (id, (uses, used)) in &f.tokens {
        if let Some(mut t) = store.token(id)? {
            let allowed = uses.saturating_sub(*used);
            if u64::from(t.uses_left) > allowed {
                t.uses_left = allowed as u32;
                store.put_token(id, &t)?;
                changed.push(format!("token {id} has {allowed} uses left"));
            }
        }
    }
    for (app, high) in &f.seqs {
        if store.seq_counter(app).map_or(true, |n| n < *high) {
            store.set_seq_counter(app, *high)?;
            changed.push(format!("the seq counter of {app} raised to {high}"));
        }
    }
    store.flush()?;
    Ok(changed)
}
