//! The controller's state: typed records, and the operations the controller needs of them,
//! over one of two backends (`backend`): sled in the data directory, or etcd shared by
//! several controllers. Records are versioned types of their own, encoded by
//! `common::frame`. Anything acknowledged to an operator or an agent is flushed first.

pub mod backend;
mod embedded;
pub mod etcd;
pub mod etcd_api;

use backend::{Backend, Table, Val};

use crate::plan::rollout::Rollout;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use stagehand_common::activate::SignedActivate;
use stagehand_common::frame;
use stagehand_common::protocol::{Labels, Receipt};
use stagehand_common::{AgentId, Digest};
use std::path::Path;
use std::sync::Arc;

/// Records are read whole: a rollout of some thousands of hosts is the largest.
const RECORD_LIMIT: usize = 32 << 20;

/// What can go wrong with the state database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("state database: {0}")]
    Sled(#[from] sled::Error),
    /// A record could not be decoded (written by an incompatible version, or corrupted).
    #[error("state database record {key:?} is unreadable: {why}")]
    Corrupt { key: String, why: String },
    /// The shared state cannot be reached or written now.
    #[error("the shared state store is unavailable: {0}")]
    Unavailable(String),
    /// Another process holds the database: a controller already runs on this data directory.
    #[error(
        "the state database {0} is in use by another process (a controller already running on this data directory?)"
    )]
    Locked(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A release policy signed for an environment's agents, with the approvals it carries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub v: u8,
    pub signed: stagehand_common::policy::SignedPolicy,
    /// The policy agents enforce as far as is known: a loosening counts only with its approvals.
    pub base: stagehand_common::policy::Policy,
    /// The policies agents took before this one, oldest first (at most [`POLICY_CHAIN`]):
    /// sent before it, so an agent that missed some walks from its own to the newest.
    pub chain: Vec<stagehand_common::policy::SignedPolicy>,
    /// When the approvals were last changed (ms), for humans.
    pub at: u64,
}

/// How many earlier policies a policy record carries for agents to walk.
pub const POLICY_CHAIN: usize = 16;

/// A freeze of an environment (SPEC §14).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FreezeRecord {
    pub v: u8,
    pub reason: String,
    pub by: String,
    pub at: u64,
    /// Unix seconds; 0: until unfrozen.
    pub until: u64,
}

/// What an agent enforces, as it last reported.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentPolicyRecord {
    pub v: u8,
    pub serial: u64,
    pub approvals: u32,
    pub refused: Option<(u64, String)>,
}

/// What a staged version's `[verify]` said on a host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyRecord {
    pub v: u8,
    pub digest: Digest,
    pub outcome: stagehand_common::protocol::VerifyOutcome,
}

/// A host's preview of an app, as it last reported.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PreviewRecord {
    pub v: u8,
    pub version: Option<String>,
    pub port: Option<u16>,
    pub detail: String,
    /// When it was reported (ms).
    pub at: u64,
}

/// An operator identity (SPEC §10).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRecord {
    pub v: u8,
    pub name: String,
    /// viewer, deployer, releaser or owner.
    pub role: String,
    /// A releaser's environments; empty: all.
    pub envs: Vec<String>,
    pub revoked: bool,
    pub created_at: u64,
    pub expires_at: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentRecord {
    pub v: u8,
    pub id: AgentId,
    pub name: String,
    pub env: String,
    /// Labels the join token bound: the only ones rollout selectors match.
    pub labels: Labels,
    pub cert_fingerprint: String,
    pub revoked: bool,
    pub joined_at: u64,
    /// Labels the agent asked for at join: shown as its own, never used for targeting.
    pub own_labels: Labels,
}

/// An agent as version 1 stored it, when labels asked for and bound were merged.
#[derive(Deserialize)]
struct AgentRecordV1 {
    _v: u8,
    id: AgentId,
    name: String,
    env: String,
    labels: Labels,
    cert_fingerprint: String,
    revoked: bool,
    joined_at: u64,
}

impl From<AgentRecordV1> for AgentRecord {
    /// Merged labels cannot be told apart any more: they are kept as the agent's own, so
    /// nothing an agent may have chosen selects it.
    fn from(a: AgentRecordV1) -> Self {
        AgentRecord {
            v: 2,
            id: a.id,
            name: a.name,
            env: a.env,
            labels: Labels::new(),
            cert_fingerprint: a.cert_fingerprint,
            revoked: a.revoked,
            joined_at: a.joined_at,
            own_labels: a.labels,
        }
    }
}

fn dec_agent(k: &[u8], bytes: &[u8]) -> Result<AgentRecord> {
    match bytes.first() {
        Some(1) => dec::<AgentRecordV1>(k, bytes).map(AgentRecord::from),
        _ => dec(k, bytes),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertRole {
    Agent(AgentId),
    Admin(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    pub v: u8,
    pub secret_hash: String,
    pub env: String,
    pub labels: Labels,
    pub expires_at: u64,
    pub uses_left: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArtifactRecord {
    pub v: u8,
    pub digest: Digest,
    pub size: u64,
    pub pushed_at: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeployRecord {
    pub v: u8,
    pub digest: Digest,
    pub size: u64,
    pub at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageState {
    Pending,
    Staged,
    Failed(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageRecord {
    pub v: u8,
    pub digest: Digest,
    pub state: StageState,
    pub at: u64,
}

/// What an environment should run for one app.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DesiredRecord {
    pub v: u8,
    pub version: String,
    pub digest: Digest,
    /// The seq of the environment-wide message.
    pub seq: u64,
    pub message: SignedActivate,
    pub targets: Vec<AgentId>,
    /// Versions released before this one, oldest first (for rollback).
    pub history: Vec<String>,
    /// The selectors of the rollout that released it: catch-up brings only agents they
    /// match (by token labels) to this version.
    pub selectors: Labels,
    /// The first seq of the rollout that released it.
    pub since_seq: u64,
    /// Agents a later rollout that failed or was aborted could not send back: catch-up
    /// brings them to this version whatever seq they applied since.
    pub owed: Vec<AgentId>,
    /// The message's further parts, when it names more hosts than one message holds
    /// (`plan::rollout::PART_HOSTS`); `message` is the first. The last field (layout 3).
    pub more: Vec<SignedActivate>,
}

/// What a rollout's end writes with its record (`Store::replace_rollout`).
#[derive(Default)]
pub struct Ends {
    /// The environment's released version, as the rollout leaves it.
    pub desired: Option<DesiredRecord>,
    /// The rollout's digest completed here (promotion).
    pub promoted: bool,
}

/// The layout of [`DesiredRecord`] written now.
pub const DESIRED_VERSION: u8 = 3;

impl DesiredRecord {
    /// The part of the environment's message that can name `id`.
    pub fn message_for(&self, id: &AgentId) -> &SignedActivate {
        match crate::plan::rollout::part_of(id, 1 + self.more.len()) {
            0 => &self.message,
            n => &self.more[n - 1],
        }
    }
}

/// What an environment should run, as version 1 stored it (released to every agent).
#[derive(Deserialize)]
struct DesiredRecordV1 {
    _v: u8,
    version: String,
    digest: Digest,
    seq: u64,
    message: SignedActivate,
    targets: Vec<AgentId>,
    history: Vec<String>,
}

fn dec_desired(k: &[u8], bytes: &[u8]) -> Result<DesiredRecord> {
    match bytes.first() {
        Some(1) => dec::<DesiredRecordV1>(k, bytes).map(|d| DesiredRecord {
            v: DESIRED_VERSION,
            version: d.version,
            digest: d.digest,
            seq: d.seq,
            message: d.message,
            targets: d.targets,
            history: d.history,
            selectors: Labels::new(),
            since_seq: d.seq,
            owed: vec![],
            more: vec![],
        }),
        // Layout 2 had one message, whatever it named: no further parts (an empty list, as
        // encoded: a u64 length of zero).
        Some(2) => {
            let mut v3 = bytes.to_vec();
            v3.extend_from_slice(&0u64.to_be_bytes());
            Ok(DesiredRecord { v: DESIRED_VERSION, ..dec(k, &v3)? })
        }
        _ => dec(k, bytes),
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AppStateRecord {
    pub v: u8,
    pub active: Option<String>,
    pub last_seq: Option<u64>,
}

/// The controller's database.
#[derive(Clone)]
pub struct Store {
    db: Arc<dyn Backend>,
    desired_cache: Arc<std::sync::Mutex<DesiredCache>>,
}

/// Decoded desired records by key, with the bytes they were decoded from.
type DesiredCache = std::collections::HashMap<Vec<u8>, (Val, Arc<DesiredRecord>)>;

fn key(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    frame::encode(v)
}

fn dec<T: DeserializeOwned>(k: &[u8], bytes: &[u8]) -> Result<T> {
    frame::decode::<T, RECORD_LIMIT>(bytes)
        .map_err(|e| StoreError::Corrupt { key: String::from_utf8_lossy(k).replace('\0', "/"), why: e.to_string() })
}

impl Store {
    fn raw(&self, t: Table, k: impl AsRef<[u8]>) -> Result<Option<Val>> {
        self.db.get(t, k.as_ref())
    }

    fn put(&self, t: Table, k: impl AsRef<[u8]>, v: impl Into<Vec<u8>>) -> Result<()> {
        self.db.put(t, k.as_ref(), v.into())
    }

    fn del(&self, t: Table, k: impl AsRef<[u8]>) -> Result<()> {
        self.db.remove(t, k.as_ref())
    }

    fn get<T: DeserializeOwned>(&self, t: Table, k: &[u8]) -> Result<Option<T>> {
        self.db.get(t, k)?.map(|v| dec(k, &v)).transpose()
    }

    fn scan<T: DeserializeOwned>(&self, t: Table, prefix: &[u8]) -> Result<Vec<(Vec<u8>, T)>> {
        self.db.scan(t, prefix)?.into_iter().map(|(k, v)| Ok((k.clone(), dec(&k, &v)?))).collect()
    }
}

/// A rollout record, read in its current layout or brought up from an older one; one of
/// an unknown layout is refused, not misread.
fn dec_rollout(k: &[u8], bytes: &[u8]) -> Result<Rollout> {
    use crate::plan::rollout::RECORD_VERSION;
    let gate = || enc(&crate::plan::rollout::Gate::default());
    let r: Rollout = match bytes.first() {
        // Layout 1 had no traffic weight (one byte: it moved all traffic) and no gate;
        // layout 2 no gate (the last field: it waited for nothing).
        Some(1) => {
            let mut v3 = bytes.to_vec();
            v3.push(stagehand_common::activate::FULL_TRAFFIC);
            v3.extend(gate());
            Rollout { v: RECORD_VERSION, ..dec(k, &v3)? }
        }
        Some(2) => Rollout { v: RECORD_VERSION, ..dec(k, &[bytes, &gate()].concat())? },
        _ => dec(k, bytes)?,
    };
    if r.v != RECORD_VERSION {
        return Err(StoreError::Corrupt {
            key: format!("rollout {}", hex::encode(k)),
            why: format!("record version {} is not {}", r.v, RECORD_VERSION),
        });
    }
    Ok(r)
}

fn last_part(k: &[u8]) -> String {
    let s = String::from_utf8_lossy(k);
    s.rsplit('\0').next().unwrap_or_default().to_string()
}

impl Store {
    /// The store in sled, in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self::on(Arc::new(embedded::Sled::open(dir)?)))
    }

    /// The store shared in etcd at `endpoints`; `name` is this controller's address.
    pub fn open_etcd(endpoints: Vec<String>, name: String) -> Result<Self> {
        Ok(Self::on(Arc::new(etcd::Etcd::open(endpoints, name)?)))
    }

    fn on(db: Arc<dyn Backend>) -> Self {
        Store { db, desired_cache: Default::default() }
    }

    /// Makes everything written so far durable (shared: in etcd). Blocks: call it off the
    /// async threads.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()
    }

    /// Whether other controllers share this state (etcd).
    pub fn shared(&self) -> bool {
        self.db.shared()
    }

    /// Whether this controller drives rollouts and catch-up now.
    pub fn is_leader(&self) -> bool {
        self.db.is_leader()
    }

    /// Whether a write would be made durable now; the error says why not.
    pub fn writable(&self) -> Result<()> {
        self.db.writable()
    }

    /// Bumped whenever another controller changes the state.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.db.subscribe()
    }

    /// The tables other controllers changed since the last call (`Table::bit`s).
    pub fn take_changed(&self) -> u32 {
        self.db.take_changed()
    }

    /// Lands what is written and lets another controller take over at once.
    pub fn close(&self) {
        self.db.close()
    }

    // ---- identities ----

    pub fn put_agent(&self, a: &AgentRecord) -> Result<()> {
        self.put(Table::Agents, a.id.0.as_bytes(), enc(a))?;
        self.put(Table::Certs, a.cert_fingerprint.as_bytes(), enc(&CertRole::Agent(a.id.clone())))?;
        Ok(())
    }

    /// Changes an agent's record atomically (compare and swap): `f` sees the record as it is
    /// and returns the new one, or an error that leaves it as it was. A revocation and a
    /// renewal racing each other can never undo one another.
    pub fn update_agent<E>(
        &self,
        id: &AgentId,
        f: impl Fn(AgentRecord) -> std::result::Result<AgentRecord, E>,
    ) -> Result<std::result::Result<AgentRecord, Option<E>>> {
        let mut old = self.raw(Table::Agents, id.0.as_bytes())?;
        loop {
            let Some(current) = old else { return Ok(Err(None)) };
            let new = match f(dec_agent(id.0.as_bytes(), &current)?) {
                Ok(n) => n,
                Err(e) => return Ok(Err(Some(e))),
            };
            // Lost to another change: `f` decides again on the record as it is now.
            match self.db.swap(Table::Agents, id.0.as_bytes(), Some(&current), Some(enc(&new)))? {
                Ok(()) => {
                    self.put(Table::Certs, new.cert_fingerprint.as_bytes(), enc(&CertRole::Agent(new.id.clone())))?;
                    return Ok(Ok(new));
                }
                Err(now) => old = now,
            }
        }
    }

    /// Removes an agent's record and everything kept about it (stagings, app states,
    /// receipts). A certificate naming an unknown agent is refused everywhere.
    pub fn remove_agent(&self, id: &AgentId) -> Result<()> {
        for kind in ["verify", "preview"] {
            for (k, _) in self.db.scan(Table::Policy, &key(&[kind, &id.0, ""]))? {
                self.db.remove(Table::Policy, &k)?;
            }
        }
        self.del(Table::Policy, key(&["agent", &id.0]))?;
        let prefix = key(&[&id.0, ""]);
        for t in [Table::Stage, Table::AppState, Table::Receipts, Table::RecentReceipts] {
            for (k, _) in self.db.scan(t, &prefix)? {
                self.db.remove(t, &k)?;
            }
        }
        self.del(Table::Agents, id.0.as_bytes())?;
        Ok(())
    }

    pub fn agent(&self, id: &AgentId) -> Result<Option<AgentRecord>> {
        // One enrolled through another controller a moment ago is found too.
        let v = match self.raw(Table::Agents, id.0.as_bytes())? {
            Some(v) => Some(v),
            None => self.db.get_fresh(Table::Agents, id.0.as_bytes())?,
        };
        v.map(|v| dec_agent(id.0.as_bytes(), &v)).transpose()
    }

    pub fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.db.scan(Table::Agents, b"")?.into_iter().map(|(k, v)| dec_agent(&k, &v)).collect()
    }

    /// Agents of an environment that are not revoked.
    pub fn agents_in(&self, env: &str) -> Result<Vec<AgentRecord>> {
        Ok(self.agents()?.into_iter().filter(|a| a.env == env && !a.revoked).collect())
    }

    pub fn put_admin(&self, a: &AdminRecord) -> Result<()> {
        self.put(Table::Admins, a.name.as_bytes(), enc(a))?;
        Ok(())
    }

    pub fn admin(&self, name: &str) -> Result<Option<AdminRecord>> {
        self.get(Table::Admins, name.as_bytes())
    }

    pub fn admins(&self) -> Result<Vec<AdminRecord>> {
        Ok(self.scan(Table::Admins, b"")?.into_iter().map(|(_, a)| a).collect())
    }

    pub fn put_admin_cert(&self, fingerprint: &str, name: &str) -> Result<()> {
        self.put(Table::Certs, fingerprint.as_bytes(), enc(&CertRole::Admin(name.to_string())))?;
        Ok(())
    }

    /// A certificate's role; one another controller registered a moment ago is found too.
    pub fn cert_role(&self, fingerprint: &str) -> Result<Option<CertRole>> {
        match self.get(Table::Certs, fingerprint.as_bytes())? {
            Some(role) => Ok(Some(role)),
            None => self
                .db
                .get_fresh(Table::Certs, fingerprint.as_bytes())?
                .map(|v| dec(fingerprint.as_bytes(), &v))
                .transpose(),
        }
    }

    // ---- tokens ----

    pub fn put_token(&self, id: &str, t: &TokenRecord) -> Result<()> {
        self.put(Table::Tokens, id.as_bytes(), enc(t))?;
        Ok(())
    }

    pub fn token(&self, id: &str) -> Result<Option<TokenRecord>> {
        self.get(Table::Tokens, id.as_bytes())
    }

    /// Uses a token once, atomically: `f` decides from the record whether it may be used.
    pub fn consume_token<E>(
        &self,
        id: &str,
        f: impl Fn(&TokenRecord) -> std::result::Result<(), E>,
    ) -> Result<std::result::Result<TokenRecord, Option<E>>> {
        let mut old = match self.raw(Table::Tokens, id.as_bytes())? {
            Some(v) => Some(v),
            None => self.db.get_fresh(Table::Tokens, id.as_bytes())?,
        };
        loop {
            let Some(current) = old else {
                return Ok(Err(None));
            };
            let rec: TokenRecord = dec(id.as_bytes(), &current)?;
            if let Err(e) = f(&rec) {
                return Ok(Err(Some(e)));
            }
            let mut next = rec.clone();
            next.uses_left -= 1;
            let new = if next.uses_left == 0 { None } else { Some(enc(&next)) };
            // Lost to another use: decided again on what the token holds now.
            match self.db.swap(Table::Tokens, id.as_bytes(), Some(&current), new)? {
                Ok(()) => return Ok(Ok(rec)),
                Err(now) => old = now,
            }
        }
    }

    // ---- artifacts and deploys ----

    pub fn put_artifact(&self, app: &str, version: &str, a: &ArtifactRecord) -> Result<()> {
        self.put(Table::Artifacts, key(&[app, version]), enc(a))?;
        Ok(())
    }

    pub fn artifact(&self, app: &str, version: &str) -> Result<Option<ArtifactRecord>> {
        self.get(Table::Artifacts, &key(&[app, version]))
    }

    /// Every artifact: (app, version, record), by app then version.
    pub fn artifacts(&self) -> Result<Vec<(String, String, ArtifactRecord)>> {
        Ok(self
            .scan::<ArtifactRecord>(Table::Artifacts, b"")?
            .into_iter()
            .filter_map(|(k, a)| {
                let s = String::from_utf8_lossy(&k).into_owned();
                let (app, version) = s.split_once('\0')?;
                Some((app.to_string(), version.to_string(), a))
            })
            .collect())
    }

    /// Forgets an artifact and every environment's order to stage it (flushed by the caller
    /// before any chunk goes).
    pub fn remove_artifact(&self, app: &str, version: &str) -> Result<()> {
        for (k, _) in self.db.scan(Table::Deploys, b"")? {
            let s = String::from_utf8_lossy(&k).into_owned();
            let mut parts = s.split('\0').skip(1);
            if parts.next() == Some(app) && parts.next() == Some(version) {
                self.del(Table::Deploys, &k)?;
            }
        }
        self.del(Table::Artifacts, key(&[app, version]))?;
        Ok(())
    }

    /// The version an agent says it runs (informational, not flushed).
    pub fn put_agent_about(&self, id: &AgentId, version: &str) -> Result<()> {
        self.put(Table::Meta, key(&["agent-version", &id.0]), version.as_bytes())?;
        Ok(())
    }

    pub fn agent_version(&self, id: &AgentId) -> Result<Option<String>> {
        Ok(self.raw(Table::Meta, key(&["agent-version", &id.0]))?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// When an agent was last connected (informational, not flushed).
    pub fn put_last_seen(&self, id: &AgentId, at: u64) -> Result<()> {
        self.put(Table::Meta, key(&["agent-seen", &id.0]), &at.to_be_bytes()[..])?;
        Ok(())
    }

    pub fn last_seen(&self, id: &AgentId) -> Result<u64> {
        Ok(self
            .raw(Table::Meta, key(&["agent-seen", &id.0]))?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Whether any version of `app` was pushed.
    pub fn knows_app(&self, app: &str) -> Result<bool> {
        Ok(!self.db.scan(Table::Artifacts, &key(&[app, ""]))?.is_empty())
    }

    pub fn put_deploy(&self, env: &str, app: &str, version: &str, d: &DeployRecord) -> Result<()> {
        self.put(Table::Deploys, key(&[env, app, version]), enc(d))?;
        Ok(())
    }

    /// Deploys of an environment: (app, version, record).
    pub fn deploys_in(&self, env: &str) -> Result<Vec<(String, String, DeployRecord)>> {
        let prefix = key(&[env, ""]);
        Ok(self
            .scan::<DeployRecord>(Table::Deploys, &prefix)?
            .into_iter()
            .filter_map(|(k, d)| {
                let s = String::from_utf8_lossy(&k).into_owned();
                let mut parts = s.split('\0').skip(1);
                Some((parts.next()?.to_string(), parts.next()?.to_string(), d))
            })
            .collect())
    }

    pub fn put_stage(&self, agent: &AgentId, app: &str, version: &str, r: &StageRecord) -> Result<()> {
        self.put(Table::Stage, key(&[&agent.0, app, version]), enc(r))?;
        Ok(())
    }

    pub fn remove_stage(&self, agent: &AgentId, app: &str, version: &str) -> Result<()> {
        self.del(Table::Stage, key(&[&agent.0, app, version]))?;
        Ok(())
    }

    pub fn stage(&self, agent: &AgentId, app: &str, version: &str) -> Result<Option<StageRecord>> {
        self.get(Table::Stage, &key(&[&agent.0, app, version]))
    }

    /// Stage records of an agent for one app (or all apps with `app = None`):
    /// (app, version, record).
    pub fn stages_of(&self, agent: &AgentId, app: Option<&str>) -> Result<Vec<(String, String, StageRecord)>> {
        let prefix = match app {
            Some(app) => key(&[&agent.0, app, ""]),
            None => key(&[&agent.0, ""]),
        };
        Ok(self
            .scan::<StageRecord>(Table::Stage, &prefix)?
            .into_iter()
            .filter_map(|(k, r)| {
                let s = String::from_utf8_lossy(&k).into_owned();
                let mut parts = s.split('\0').skip(1);
                Some((parts.next()?.to_string(), parts.next()?.to_string(), r))
            })
            .collect())
    }

    // ---- releases ----

    /// The next seq for an app. Callers flush before a message carrying it leaves.
    pub fn next_seq(&self, app: &str) -> Result<u64> {
        self.bump(&key(&["seq", app]), &format!("the seq counter of {app}"))
    }

    /// The last seq issued for an app (0 if none).
    pub fn seq_counter(&self, app: &str) -> Result<u64> {
        let k = key(&["seq", app]);
        match self.raw(Table::Meta, &k)? {
            None => Ok(0),
            Some(b) => <[u8; 8]>::try_from(&b[..]).map(u64::from_be_bytes).map_err(|_| StoreError::Corrupt {
                key: format!("seq/{app}"),
                why: format!("the seq counter is {} bytes, not 8", b.len()),
            }),
        }
    }

    /// Sets an app's seq counter (repair from the audit log).
    pub fn set_seq_counter(&self, app: &str, seq: u64) -> Result<()> {
        self.put(Table::Meta, key(&["seq", app]), seq.to_be_bytes())?;
        Ok(())
    }

    /// Adds one to a counter in `meta` and returns the new value. A counter that is there and
    /// unreadable fails closed: reading it as 0 would issue numbers already used.
    fn bump(&self, k: &[u8], what: &str) -> Result<u64> {
        let mut old = self.raw(Table::Meta, k)?;
        loop {
            let n = match old.as_deref() {
                None => 0,
                Some(b) => match <[u8; 8]>::try_from(b) {
                    Ok(b) => u64::from_be_bytes(b),
                    Err(_) => {
                        return Err(StoreError::Corrupt {
                            key: String::from_utf8_lossy(k).replace('\0', "/"),
                            why: format!(
                                "{what} is {} bytes, not 8; refusing to issue a number that may have been used \
                                 already. The database is damaged: restore it from a backup",
                                b.len()
                            ),
                        })
                    }
                },
            };
            let new = n.checked_add(1).ok_or_else(|| StoreError::Corrupt {
                key: String::from_utf8_lossy(k).into_owned(),
                why: format!("{what} is exhausted"),
            })?;
            // Lost to another controller: counted on from what it holds now.
            match self.db.swap(Table::Meta, k, old.as_deref(), Some(new.to_be_bytes().to_vec()))? {
                Ok(()) => return Ok(new),
                Err(now) => old = now,
            }
        }
    }

    pub fn put_desired(&self, env: &str, app: &str, d: &DesiredRecord) -> Result<()> {
        self.put(Table::Desired, key(&[env, app]), enc(d))?;
        Ok(())
    }

    pub fn desired(&self, env: &str, app: &str) -> Result<Option<Arc<DesiredRecord>>> {
        let k = key(&[env, app]);
        self.raw(Table::Desired, &k)?.map(|v| self.decoded_desired(&k, v)).transpose()
    }

    /// Desired records of an environment: (app, record).
    pub fn desired_in(&self, env: &str) -> Result<Vec<(String, Arc<DesiredRecord>)>> {
        self.db
            .scan(Table::Desired, &key(&[env, ""]))?
            .into_iter()
            .map(|(k, v)| Ok((last_part(&k), self.decoded_desired(&k, v)?)))
            .collect()
    }

    /// A desired record names every host its release went to: at 10,000 hosts it takes a
    /// millisecond to decode, and catch-up reads it for every agent that reports. Decoded
    /// once per content: the cache holds the bytes it decoded and is used only while they
    /// are what the tree holds.
    fn decoded_desired(&self, k: &[u8], v: Val) -> Result<Arc<DesiredRecord>> {
        let mut cache = self.desired_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((bytes, d)) = cache.get(k) {
            if *bytes == v {
                return Ok(d.clone());
            }
        }
        let d = Arc::new(dec_desired(k, &v)?);
        cache.insert(k.to_vec(), (v, d.clone()));
        Ok(d)
    }

    /// Every desired record: (env, app, record).
    pub fn all_desired(&self) -> Result<Vec<(String, String, DesiredRecord)>> {
        self.db
            .scan(Table::Desired, b"")?
            .into_iter()
            .map(|(k, v)| {
                let text = String::from_utf8_lossy(&k).into_owned();
                let mut parts = text.split('\0');
                let (env, app) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                Ok((env.to_string(), app.to_string(), dec_desired(&k, &v)?))
            })
            .collect()
    }

    pub fn put_receipt(&self, r: &Receipt) -> Result<()> {
        self.put(Table::Receipts, key(&[&r.agent_id.0, &r.app]), enc(r))?;
        Ok(())
    }

    pub fn receipt(&self, agent: &AgentId, app: &str) -> Result<Option<Receipt>> {
        self.get(Table::Receipts, &key(&[&agent.0, app]))
    }

    /// Keeps a receipt by its seq too, with the few before it of the same agent and app: a
    /// rollout finds the answer to its own message even when a later one came first.
    pub fn put_recent_receipt(&self, r: &Receipt) -> Result<()> {
        const KEEP: usize = 4;
        let prefix = key(&[&r.agent_id.0, &r.app, ""]);
        let mut k = prefix.clone();
        k.extend_from_slice(&r.seq.to_be_bytes());
        self.put(Table::RecentReceipts, k, enc(r))?;
        let keys: Vec<Vec<u8>> = self.db.scan(Table::RecentReceipts, &prefix)?.into_iter().map(|(k, _)| k).collect();
        for old in keys.iter().rev().skip(KEEP) {
            self.del(Table::RecentReceipts, old)?;
        }
        Ok(())
    }

    /// The receipt an agent sent for one seq, if it is among the recent ones.
    pub fn receipt_for(&self, agent: &AgentId, app: &str, seq: u64) -> Result<Option<Receipt>> {
        let mut k = key(&[&agent.0, app, ""]);
        k.extend_from_slice(&seq.to_be_bytes());
        self.get(Table::RecentReceipts, &k)
    }

    pub fn put_appstate(&self, agent: &AgentId, app: &str, s: &AppStateRecord) -> Result<()> {
        self.put(Table::AppState, key(&[&agent.0, app]), enc(s))?;
        Ok(())
    }

    pub fn appstate(&self, agent: &AgentId, app: &str) -> Result<AppStateRecord> {
        Ok(self.get(Table::AppState, &key(&[&agent.0, app]))?.unwrap_or_default())
    }

    /// All app states of an agent: (app, record).
    pub fn appstates_of(&self, agent: &AgentId) -> Result<Vec<(String, AppStateRecord)>> {
        Ok(self.scan(Table::AppState, &key(&[&agent.0, ""]))?.into_iter().map(|(k, s)| (last_part(&k), s)).collect())
    }

    // ---- rollouts ----

    /// A new rollout id, `r-<n>`; never reused (callers flush before it is shown).
    pub fn next_rollout_id(&self) -> Result<String> {
        Ok(format!("r-{}", self.bump(b"rollout-id", "the rollout id counter")?))
    }

    /// Rollouts are keyed by their number, big-endian, so a scan is in creation order.
    fn rollout_key(id: &str) -> Vec<u8> {
        let n: u64 = id.strip_prefix("r-").and_then(|n| n.parse().ok()).unwrap_or(u64::MAX);
        n.to_be_bytes().to_vec()
    }

    /// Stores a rollout and its place among the running ones. sled keeps a prefix of the
    /// writes on a crash, so the marker of a running rollout goes first and that of an
    /// ended one is removed last: a marker may outlive its rollout, never the other way.
    pub fn put_rollout(&self, r: &Rollout) -> Result<()> {
        let marker = key(&["active-rollout", &r.env, &r.app]);
        if r.state.is_final() {
            self.put(Table::Rollouts, Self::rollout_key(&r.id), enc(r))?;
            self.del(Table::Meta, marker)?;
        } else {
            self.put(Table::Meta, marker, r.id.as_bytes())?;
            self.put(Table::Rollouts, Self::rollout_key(&r.id), enc(r))?;
        }
        Ok(())
    }

    /// Stores a new rollout and marks it as the running one of its app and environment,
    /// unless one already runs: atomically across controllers, the record and its mark
    /// together (a driver on another controller never sees one without the other). None if
    /// it now runs, else the id of the rollout that does.
    pub fn start_rollout(&self, r: &Rollout) -> Result<Option<String>> {
        let marker = key(&["active-rollout", &r.env, &r.app]);
        let record = vec![(Table::Rollouts, Self::rollout_key(&r.id), enc(r))];
        Ok(match self.db.swap_and_put(Table::Meta, &marker, None, Some(r.id.as_bytes().to_vec()), record)? {
            Ok(()) => None,
            Err(held) => Some(held.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default()),
        })
    }

    /// Replaces a rollout record with `new` if it still is `before`, atomically across
    /// controllers (an operator's pause through one, the driver's step on another): false if
    /// it changed meanwhile, and nothing was written. What its end decides (the released
    /// version, the promotion) is written with it, in the same transaction, or not at all.
    pub fn replace_rollout(&self, before: &Rollout, new: &Rollout, ends: Ends) -> Result<bool> {
        let k = Self::rollout_key(&before.id);
        let mut then = Vec::new();
        if let Some(d) = &ends.desired {
            then.push((Table::Desired, key(&[&new.env, &new.app]), enc(d)));
        }
        if ends.promoted {
            then.push((Table::Promoted, key(&[&new.env, &new.app, &new.digest.to_hex()]), new.id.as_bytes().to_vec()));
        }
        let mut expected = enc(before);
        for _ in 0..2 {
            match self.db.swap_and_put(Table::Rollouts, &k, Some(&expected), Some(enc(new)), then.clone())? {
                Ok(()) => {
                    // The mark of an ended rollout goes after its record (see put_rollout).
                    if new.state.is_final() {
                        self.clear_active_rollout_of(&new.env, &new.app, &new.id)?;
                    }
                    return Ok(true);
                }
                // Written in an older layout: the same rollout, other bytes.
                Err(Some(current)) if dec_rollout(&k, &current).is_ok_and(|r| r == *before) => {
                    expected = current.to_vec()
                }
                Err(_) => return Ok(false),
            }
        }
        Ok(false)
    }

    /// Removes the mark of the running rollout of (env, app) if it is still `id`'s: a late
    /// removal never takes the mark of a rollout started since.
    pub fn clear_active_rollout_of(&self, env: &str, app: &str, id: &str) -> Result<()> {
        // Not `id`'s any more (or gone already): nothing to remove.
        let _ = self.db.swap(Table::Meta, &key(&["active-rollout", env, app]), Some(id.as_bytes()), None)?;
        Ok(())
    }

    // ---- several controllers ----

    /// Copies every record of `from` (a data directory's database) here, if this shared
    /// store has never been seeded: true if it copied. Of controllers starting at once on an
    /// empty etcd, one copies.
    pub fn seed_from(&self, from: &Store, me: &str) -> Result<bool> {
        let claim = format!("seeding by {me}").into_bytes();
        match self.db.swap(Table::Meta, b"seeded", None, Some(claim))? {
            Ok(()) => {}
            Err(Some(done)) if &done[..] == b"1" => return Ok(false),
            // Another controller copies now: its copy is waited for, not read half done.
            Err(_) => {
                let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
                while std::time::Instant::now() < until {
                    if self.db.get_fresh(Table::Meta, b"seeded")?.is_some_and(|v| &v[..] == b"1") {
                        return Ok(false);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                return Err(StoreError::Unavailable(
                    "another controller began copying its state into etcd and has not finished in 60 s; if it \
                     died, remove the key (etcdctl del /stagehand/meta/seeded) and start again"
                        .into(),
                ));
            }
        }
        for t in Table::ALL {
            if matches!(t, Table::Presence | Table::CatchUp | Table::Outbox) {
                continue;
            }
            for (k, v) in from.db.scan(t, b"")? {
                if t == Table::Meta && &k[..] == etcd::LEADER_KEY {
                    continue;
                }
                self.db.put(t, &k, v.to_vec())?;
            }
        }
        self.flush()?;
        self.put(Table::Meta, b"seeded", b"1".to_vec())?;
        self.flush()?;
        Ok(true)
    }

    /// Records that `agent` is (or is no longer) connected to the controller `me`, for the
    /// other controllers (kept on this controller's lease: it goes when the controller does).
    pub fn set_presence(&self, agent: &AgentId, me: &str, connected: bool) -> Result<()> {
        self.db.set_ephemeral(Table::Presence, &key(&[&agent.0, me]), connected.then(Vec::new))
    }

    /// Whether `agent` is connected to a controller other than `me`.
    pub fn connected_elsewhere(&self, agent: &AgentId, me: &str) -> Result<bool> {
        Ok(self.db.scan(Table::Presence, &key(&[&agent.0, ""]))?.iter().any(|(k, _)| last_part(k) != me))
    }

    /// Asks the controller that drives to catch `agent` up (from one that does not).
    pub fn ask_catch_up(&self, agent: &AgentId, staged_now: bool) -> Result<()> {
        let staged_before = self.raw(Table::CatchUp, agent.0.as_bytes())?.is_some_and(|v| v.first() == Some(&1));
        self.put(Table::CatchUp, agent.0.as_bytes(), vec![u8::from(staged_now || staged_before)])
    }

    /// The agents other controllers asked to catch up, and whether each has just staged.
    pub fn take_catch_ups(&self) -> Result<Vec<(AgentId, bool)>> {
        let mut taken = Vec::new();
        for (k, v) in self.db.scan(Table::CatchUp, b"")? {
            // Taken as read: one asked again meanwhile stays for the next call.
            if self.db.swap(Table::CatchUp, &k, Some(&v), None)?.is_ok() {
                taken.push((AgentId(String::from_utf8_lossy(&k).into_owned()), v.first() == Some(&1)));
            }
        }
        Ok(taken)
    }

    /// Leaves a catch-up message for the controller `agent` is connected to.
    pub fn put_outbox(&self, agent: &AgentId, app: &str, m: &SignedActivate) -> Result<()> {
        self.put(Table::Outbox, key(&[&agent.0, app]), enc(m))
    }

    /// Catch-up messages waiting for `agent`: (app, message, bytes to take it with).
    pub fn outbox_of(&self, agent: &AgentId) -> Result<Vec<(String, SignedActivate, Vec<u8>)>> {
        self.db
            .scan(Table::Outbox, &key(&[&agent.0, ""]))?
            .into_iter()
            .map(|(k, v)| Ok((last_part(&k), dec(&k, &v)?, v.to_vec())))
            .collect()
    }

    /// Takes a message from the outbox, unless a newer one replaced it: whether it was taken.
    pub fn take_outbox(&self, agent: &AgentId, app: &str, bytes: &[u8]) -> Result<bool> {
        Ok(self.db.swap(Table::Outbox, &key(&[&agent.0, app]), Some(bytes), None)?.is_ok())
    }

    /// Every agent with catch-up messages waiting.
    pub fn outbox_agents(&self) -> Result<Vec<AgentId>> {
        let mut ids: Vec<AgentId> = self
            .db
            .scan(Table::Outbox, b"")?
            .into_iter()
            .filter_map(|(k, _)| Some(AgentId(String::from_utf8_lossy(k.split(|&b| b == 0).next()?).into_owned())))
            .collect();
        ids.dedup();
        Ok(ids)
    }

    /// A push under way (shared chunk directories: every controller's collection keeps it).
    pub fn put_push(&self, manifest: &Digest, at: u64) -> Result<()> {
        self.put(Table::Meta, key(&["push", &manifest.to_hex()]), at.to_be_bytes().to_vec())
    }

    pub fn remove_push(&self, manifest: &Digest) -> Result<()> {
        self.del(Table::Meta, key(&["push", &manifest.to_hex()]))
    }

    /// Pushes under way on any controller: (manifest, started at).
    pub fn pushes(&self) -> Result<Vec<(Digest, u64)>> {
        Ok(self
            .db
            .scan(Table::Meta, &key(&["push", ""]))?
            .into_iter()
            .filter_map(|(k, v)| {
                let d = Digest::from_hex(&last_part(&k))?;
                Some((d, u64::from_be_bytes(<[u8; 8]>::try_from(&v[..]).ok()?)))
            })
            .collect())
    }

    pub fn rollout(&self, id: &str) -> Result<Option<Rollout>> {
        let k = Self::rollout_key(id);
        self.raw(Table::Rollouts, &k)?.map(|v| dec_rollout(&k, &v)).transpose()
    }

    /// Every rollout, oldest first.
    pub fn rollouts(&self) -> Result<Vec<Rollout>> {
        self.db.scan(Table::Rollouts, b"")?.into_iter().map(|(k, v)| dec_rollout(&k, &v)).collect()
    }

    /// The id of the rollout of (env, app) that has not ended, if any.
    pub fn active_rollout(&self, env: &str, app: &str) -> Result<Option<String>> {
        Ok(self.raw(Table::Meta, key(&["active-rollout", env, app]))?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Every rollout that has not ended: (env, app, id).
    pub fn active_rollouts(&self) -> Result<Vec<(String, String, String)>> {
        self.db
            .scan(Table::Meta, &key(&["active-rollout", ""]))?
            .into_iter()
            .map(|(k, v)| {
                let k = String::from_utf8_lossy(&k).into_owned();
                let mut parts = k.split('\0').skip(1);
                let (env, app) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                Ok((env.to_string(), app.to_string(), String::from_utf8_lossy(&v).into_owned()))
            })
            .collect()
    }

    /// Records that `digest` of `app` completed a rollout in `env` (promotion).
    pub fn put_promoted(&self, env: &str, app: &str, digest: &Digest, rollout: &str) -> Result<()> {
        self.put(Table::Promoted, key(&[env, app, &digest.to_hex()]), rollout.as_bytes())?;
        Ok(())
    }

    /// The rollout through which `digest` of `app` completed in `env`, if it did.
    pub fn promoted(&self, env: &str, app: &str, digest: &Digest) -> Result<Option<String>> {
        Ok(self
            .raw(Table::Promoted, key(&[env, app, &digest.to_hex()]))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    // ---- release policy (SPEC §14) ----

    pub fn put_approval_key(&self, name: &str, public: &[u8; 32]) -> Result<()> {
        self.put(Table::Policy, key(&["key", name]), public.to_vec())
    }

    /// An identity's approval public key, if it was issued one.
    pub fn approval_key(&self, name: &str) -> Result<Option<[u8; 32]>> {
        Ok(self.raw(Table::Policy, key(&["key", name]))?.and_then(|v| <[u8; 32]>::try_from(&*v).ok()))
    }

    pub fn put_policy(&self, env: &str, r: &PolicyRecord) -> Result<()> {
        self.put(Table::Policy, key(&["signed", env]), enc(r))
    }

    /// The newest policy signed for an environment's agents.
    pub fn policy(&self, env: &str) -> Result<Option<PolicyRecord>> {
        self.get(Table::Policy, &key(&["signed", env]))
    }

    /// Replaces a policy record only as it was read (another controller may sign one too).
    pub fn swap_policy(&self, env: &str, before: Option<&PolicyRecord>, new: &PolicyRecord) -> Result<bool> {
        let before = before.map(enc);
        Ok(self.db.swap(Table::Policy, &key(&["signed", env]), before.as_deref(), Some(enc(new)))?.is_ok())
    }

    pub fn put_freeze(&self, env: &str, f: Option<&FreezeRecord>) -> Result<()> {
        match f {
            Some(f) => self.put(Table::Policy, key(&["freeze", env]), enc(f)),
            None => self.del(Table::Policy, key(&["freeze", env])),
        }
    }

    pub fn freeze(&self, env: &str) -> Result<Option<FreezeRecord>> {
        self.get(Table::Policy, &key(&["freeze", env]))
    }

    pub fn put_agent_policy(&self, agent: &AgentId, r: &AgentPolicyRecord) -> Result<()> {
        self.put(Table::Policy, key(&["agent", &agent.0]), enc(r))
    }

    pub fn agent_policy(&self, agent: &AgentId) -> Result<Option<AgentPolicyRecord>> {
        self.get(Table::Policy, &key(&["agent", &agent.0]))
    }

    pub fn put_verify(&self, agent: &AgentId, app: &str, version: &str, r: &VerifyRecord) -> Result<()> {
        self.put(Table::Policy, key(&["verify", &agent.0, app, version]), enc(r))
    }

    pub fn verify(&self, agent: &AgentId, app: &str, version: &str) -> Result<Option<VerifyRecord>> {
        self.get(Table::Policy, &key(&["verify", &agent.0, app, version]))
    }

    pub fn remove_verify(&self, agent: &AgentId, app: &str, version: &str) -> Result<()> {
        self.del(Table::Policy, key(&["verify", &agent.0, app, version]))
    }

    pub fn put_preview(&self, agent: &AgentId, app: &str, r: &PreviewRecord) -> Result<()> {
        self.put(Table::Policy, key(&["preview", &agent.0, app]), enc(r))
    }

    pub fn preview(&self, agent: &AgentId, app: &str) -> Result<Option<PreviewRecord>> {
        self.get(Table::Policy, &key(&["preview", &agent.0, app]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What layout 2 of the desired record was: layout 3 without `more`.
    #[derive(Serialize)]
    struct DesiredRecordV2 {
        v: u8,
        version: String,
        digest: Digest,
        seq: u64,
        message: SignedActivate,
        targets: Vec<AgentId>,
        history: Vec<String>,
        selectors: Labels,
        since_seq: u64,
        owed: Vec<AgentId>,
    }

    #[test]
    fn a_desired_record_of_layout_2_reads_as_one_part() {
        let message = SignedActivate { body: vec![1, 2, 3], signature: vec![4; 64] };
        let old = DesiredRecordV2 {
            v: 2,
            version: "v2".into(),
            digest: Digest([7; 32]),
            seq: 9,
            message: message.clone(),
            targets: vec![AgentId("a-1".into()), AgentId("a-2".into())],
            history: vec!["v1".into()],
            selectors: Labels::new(),
            since_seq: 8,
            owed: vec![AgentId("a-3".into())],
        };
        let d = dec_desired(b"k", &enc(&old)).unwrap();
        assert_eq!((d.v, d.version.as_str(), d.seq, d.since_seq), (DESIRED_VERSION, "v2", 9, 8));
        assert_eq!((d.targets.len(), d.owed.len(), d.more.len()), (2, 1, 0));
        assert_eq!(d.message_for(&AgentId("a-2".into())), &message);
        // And the current layout reads back as written.
        let again = dec_desired(b"k", &enc(&d)).unwrap();
        assert_eq!((again.message, again.more.len(), again.history), (message, 0, vec!["v1".to_string()]));
    }
}
