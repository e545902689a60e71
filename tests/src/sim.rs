//! A fleet simulator: many agents in one process against a real controller, over real QUIC
//! and TLS. Each simulated agent enrols with a token and a key of its own, holds both
//! channels, and speaks the real protocol through `common`'s types: it reports its
//! inventory and version, acknowledges stage orders (keeping no files: it reports the bytes
//! as already held), checks every activate message with the agent's own rules (`verify`,
//! then `check`, with its seq and what it staged) and answers with real receipts. The
//! controller cannot tell it from a real agent except that nothing is on disk.

use anyhow::{bail, Context, Result};
use rand::Rng;
use stagehand_common::activate::{self, AgentView, ReleaseKey, Verdict};
use stagehand_common::frame::{self, read_msg, write_msg};
use stagehand_common::ids::now_secs;
use stagehand_common::protocol::{
    AppState, DeployDown, DeployUp, JoinDown, JoinUp, Receipt, ReceiptOutcome, ReleaseDown, ReleaseUp, StageOutcome,
    StagedArtifact, ALPN_DEPLOY, ALPN_JOIN, ALPN_RELEASE, PROTOCOL_VERSION,
};
use stagehand_common::tls::{self, Credentials, Pair};
use stagehand_common::token::JoinToken;
use stagehand_common::{net, AgentId, Digest};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The real agent's reconnect backoff (agent/src/run.rs), with its jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the whole simulated fleet counts.
#[derive(Default)]
pub struct Stats {
    /// Sessions up now, per channel.
    pub deploy_up: AtomicUsize,
    pub release_up: AtomicUsize,
    /// Sessions that ended, ever.
    pub ended: AtomicUsize,
    /// When each committed receipt was sent, since the last [`Stats::take_acks`].
    acks: Mutex<Vec<Instant>>,
    /// Messages refused, by code.
    refused: Mutex<BTreeMap<&'static str, usize>>,
    /// Bytes fetched for real (see [`SimAgent::fetch_for_real`]).
    pub fetched: AtomicU64,
}

impl Stats {
    pub fn take_acks(&self) -> Vec<Instant> {
        std::mem::take(&mut *self.acks.lock().unwrap())
    }

    pub fn refused(&self) -> BTreeMap<&'static str, usize> {
        self.refused.lock().unwrap().clone()
    }
}

#[derive(Clone, Default)]
struct App {
    active: Option<String>,
    last_seq: Option<u64>,
    last_receipt: Option<Receipt>,
}

#[derive(Default)]
struct State {
    staged: HashMap<(String, String), Digest>,
    apps: BTreeMap<String, App>,
}

/// One simulated agent.
pub struct SimAgent {
    pub id: AgentId,
    pub name: String,
    pub env: String,
    creds: Credentials,
    keys: Mutex<Vec<ReleaseKey>>,
    state: Mutex<State>,
    release_tx: Mutex<Option<mpsc::UnboundedSender<ReleaseUp>>>,
    stats: Arc<Stats>,
    fetch: AtomicBool,
}

/// Enrols one agent with `token` on the shared `endpoint`, as `stagehand-agent join` does,
/// keeping its identity in memory.
pub async fn enrol(
    endpoint: &quinn::Endpoint,
    controller: SocketAddr,
    token: &JoinToken,
    name: &str,
    stats: Arc<Stats>,
) -> Result<Arc<SimAgent>> {
    let (key_pem, csr_der) = tls::new_csr()?;
    let config = net::client_config(tls::join_client_config(&token.ca_fingerprint, ALPN_JOIN)?)?;
    let conn = net::connect(endpoint, controller, config).await.context("connecting to enrol")?;
    let (mut send, mut recv) = conn.open_bi().await?;
    write_msg(&mut send, &JoinUp::Hello { protocol_version: PROTOCOL_VERSION }).await?;
    match read_msg::<_, JoinDown, { frame::CONTROL_LIMIT }>(&mut recv).await? {
        Some(JoinDown::Hello { .. }) => {}
        other => bail!("unexpected answer to hello: {other:?}"),
    }
    let join = JoinUp::Join {
        token_id: token.id.clone(),
        token_secret: token.secret.clone(),
        csr_der,
        name: name.to_string(),
        labels: Default::default(),
    };
    write_msg(&mut send, &join).await?;
    send.finish()?;
    let reply = read_msg::<_, JoinDown, { frame::CONTROL_LIMIT }>(&mut recv).await?;
    conn.close(0u32.into(), b"enrolled");
    let Some(JoinDown::Joined { agent_id, env, cert_pem, ca_pem, release_keys, .. }) = reply else {
        bail!("enrolment of {name} refused: {reply:?}")
    };
    if tls::fingerprint(&tls::cert_der(&ca_pem)?) != token.ca_fingerprint
        || release_keys.len() != 1
        || release_keys[0].fingerprint() != token.release_fingerprint
    {
        bail!("the controller's CA or release key is not the one the token vouches for");
    }
    Ok(Arc::new(SimAgent {
        id: agent_id,
        name: name.to_string(),
        env,
        creds: Credentials { me: Pair { cert_pem, key_pem }, ca_pem },
        keys: Mutex::new(release_keys),
        state: Mutex::default(),
        release_tx: Mutex::default(),
        stats,
        fetch: AtomicBool::new(false),
    }))
}

impl SimAgent {
    /// Holds both channels until the task is aborted, reconnecting as the real agent does.
    pub fn spawn(self: &Arc<Self>, controller: SocketAddr) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let endpoint = match net::client_endpoint(controller) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, agent = %me.name, "No client endpoint.");
                    return;
                }
            };
            tokio::join!(
                me.channel(&endpoint, controller, ALPN_DEPLOY),
                me.channel(&endpoint, controller, ALPN_RELEASE)
            );
        })
    }

    /// From now on, stage orders are carried out for real: the manifest and every chunk are
    /// fetched over the deploy channel and each is checked against its digest, as the real
    /// agent does; only writing them to disk is left out.
    pub fn fetch_for_real(&self) {
        self.fetch.store(true, Ordering::Relaxed);
    }

    /// What is live per app.
    pub fn active(&self, app: &str) -> Option<String> {
        self.state.lock().unwrap().apps.get(app).and_then(|a| a.active.clone())
    }

    async fn channel(self: &Arc<Self>, endpoint: &quinn::Endpoint, controller: SocketAddr, alpn: &'static [u8]) {
        let mut backoff = BACKOFF_MIN;
        // Built once: a simulated agent's certificate does not change (the real agent's may be
        // renewed, and it has a process of its own to parse it in).
        let config = self.creds.client_config(alpn).ok().and_then(|c| net::client_config(c).ok());
        loop {
            let started = Instant::now();
            if let Some(config) = config.clone() {
                if let Ok(conn) = net::connect(endpoint, controller, config).await {
                    let up = if alpn == ALPN_DEPLOY { &self.stats.deploy_up } else { &self.stats.release_up };
                    let result = if alpn == ALPN_DEPLOY {
                        self.deploy_session(&conn, up).await
                    } else {
                        self.release_session(&conn, up).await
                    };
                    if let Err(e) = result {
                        tracing::debug!(agent = %self.name, error = %format!("{e:#}"), "Session ended.");
                    }
                    conn.close(0u32.into(), b"session over");
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = BACKOFF_MIN;
            }
            let jitter = rand::thread_rng().gen_range(0.5..1.5);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn deploy_session(&self, conn: &quinn::Connection, up: &AtomicUsize) -> Result<()> {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_msg(&mut send, &DeployUp::Hello { protocol_version: PROTOCOL_VERSION }).await?;
        match read_msg::<_, DeployDown, { frame::CONTROL_LIMIT }>(&mut recv).await? {
            Some(DeployDown::Hello { .. }) => {}
            other => bail!("expected hello, got {other:?}"),
        }
        let staged: Vec<StagedArtifact> = {
            let s = self.state.lock().unwrap();
            s.staged
                .iter()
                .map(|((app, version), digest)| StagedArtifact {
                    app: app.clone(),
                    version: version.clone(),
                    digest: *digest,
                })
                .collect()
        };
        write_msg(&mut send, &DeployUp::Inventory { staged }).await?;
        write_msg(&mut send, &DeployUp::About { version: env!("CARGO_PKG_VERSION").to_string() }).await?;
        let _up = Up::new(up, &self.stats.ended);
        while let Some(msg) = read_msg::<_, DeployDown, { frame::CONTROL_LIMIT }>(&mut recv).await? {
            match msg {
                DeployDown::Stage { app, version, digest, size } => {
                    let outcome = if self.fetch.load(Ordering::Relaxed) {
                        let t0 = Instant::now();
                        match fetch(conn, digest).await {
                            Ok(fetched_bytes) => {
                                self.stats.fetched.fetch_add(fetched_bytes, Ordering::Relaxed);
                                let millis = t0.elapsed().as_millis() as u64;
                                StageOutcome::Staged { fetched_bytes, reused_bytes: 0, millis }
                            }
                            Err(e) => StageOutcome::Failed { reason: format!("{e:#}") },
                        }
                    } else {
                        StageOutcome::Staged { fetched_bytes: 0, reused_bytes: size, millis: 0 }
                    };
                    if matches!(outcome, StageOutcome::Staged { .. }) {
                        self.state.lock().unwrap().staged.insert((app.clone(), version.clone()), digest);
                    }
                    write_msg(&mut send, &DeployUp::StageReport { app, version, digest, outcome }).await?;
                }
                DeployDown::Renewed { .. } => {}
                DeployDown::Goodbye { reason } => bail!("goodbye: {reason}"),
                DeployDown::Hello { .. } => bail!("second hello"),
            }
        }
        Ok(())
    }

    fn app_states(&self) -> Vec<AppState> {
        let s = self.state.lock().unwrap();
        s.apps
            .iter()
            .map(|(app, a)| AppState { app: app.clone(), active: a.active.clone(), last_seq: a.last_seq })
            .collect()
    }

    async fn release_session(self: &Arc<Self>, conn: &quinn::Connection, up: &AtomicUsize) -> Result<()> {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_msg(&mut send, &ReleaseUp::Hello { protocol_version: PROTOCOL_VERSION }).await?;
        match read_msg::<_, ReleaseDown, { frame::CONTROL_LIMIT }>(&mut recv).await? {
            Some(ReleaseDown::Hello { .. }) => {}
            other => bail!("expected hello, got {other:?}"),
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let receipts: Vec<Receipt> =
            self.state.lock().unwrap().apps.values().filter_map(|a| a.last_receipt.clone()).collect();
        for r in receipts {
            let _ = tx.send(ReleaseUp::Receipt(r));
        }
        let _ = tx.send(ReleaseUp::State { apps: self.app_states() });
        *self.release_tx.lock().unwrap() = Some(tx);
        let _up = Up::new(up, &self.stats.ended);
        let writer = async {
            while let Some(msg) = rx.recv().await {
                write_msg(&mut send, &msg).await?;
            }
            anyhow::Ok(())
        };
        let reader = async {
            while let Some(msg) = read_msg::<_, ReleaseDown, { frame::CONTROL_LIMIT }>(&mut recv).await? {
                match msg {
                    ReleaseDown::Activate(m) => self.activate(m),
                    ReleaseDown::KeyChanges(chain) => {
                        let mut keys = self.keys.lock().unwrap();
                        *keys = stagehand_common::keychain::apply(&keys, &chain);
                    }
                    ReleaseDown::Goodbye { reason } => bail!("goodbye: {reason}"),
                    ReleaseDown::Hello { .. } => bail!("second hello"),
                    // Simulated agents run no release policy and no services.
                    ReleaseDown::Policy(_) | ReleaseDown::Preview(_) => {}
                }
            }
            anyhow::Ok(())
        };
        let result = tokio::select! {
            r = writer => r,
            r = reader => r,
        };
        *self.release_tx.lock().unwrap() = None;
        result
    }

    fn send_release(&self, msg: ReleaseUp) {
        if let Some(tx) = self.release_tx.lock().unwrap().as_ref() {
            let _ = tx.send(msg);
        }
    }

    /// The agent's rules over one message, then the receipt (a scheduled one fires later).
    fn activate(self: &Arc<Self>, msg: activate::SignedActivate) {
        let started = Instant::now();
        let receipt =
            |body: &activate::Activate, outcome: ReceiptOutcome, active: Option<String>, applied: bool| Receipt {
                agent_id: self.id.clone(),
                app: body.app.clone(),
                version: body.version.clone(),
                seq: body.seq,
                outcome,
                active,
                log: String::new(),
                check_us: started.elapsed().as_micros() as u64,
                switch_us: 0,
                total_us: started.elapsed().as_micros() as u64,
                at: now_secs(),
                applied,
            };
        let keys = self.keys.lock().unwrap().clone();
        let body = match activate::verify(&msg, &keys) {
            Ok(b) => b,
            Err(r) => {
                *self.stats.refused.lock().unwrap().entry(r.code()).or_default() += 1;
                return;
            }
        };
        let mut state = self.state.lock().unwrap();
        let staged = state.staged.get(&(body.app.clone(), body.version.clone())).copied();
        let app = state.apps.entry(body.app.clone()).or_default();
        let view = AgentView { agent_id: &self.id, env: &self.env, last_seq: app.last_seq, staged: staged.map(Ok) };
        let answer = match activate::check(&body, &view, now_secs()) {
            Err(r) => {
                *self.stats.refused.lock().unwrap().entry(r.code()).or_default() += 1;
                receipt(&body, ReceiptOutcome::Refused(r), app.active.clone(), false)
            }
            Ok(Verdict::AlreadyApplied) => match app.last_receipt.clone() {
                Some(r) if r.seq == body.seq => r,
                _ => receipt(&body, ReceiptOutcome::Committed, app.active.clone(), true),
            },
            Ok(Verdict::Wait { until }) => {
                let me = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(until.saturating_sub(now_secs()))).await;
                    me.activate(msg);
                });
                receipt(&body, ReceiptOutcome::Scheduled { until }, app.active.clone(), false)
            }
            Ok(Verdict::Apply) => {
                app.active = Some(body.version.clone());
                app.last_seq = Some(body.seq);
                let r = receipt(&body, ReceiptOutcome::Committed, app.active.clone(), true);
                app.last_receipt = Some(r.clone());
                self.stats.acks.lock().unwrap().push(Instant::now());
                r
            }
        };
        drop(state);
        self.send_release(ReleaseUp::Receipt(answer));
        self.send_release(ReleaseUp::State { apps: self.app_states() });
    }
}

/// Fetches an artifact's manifest and every distinct chunk of it on two streams at a time,
/// in batches, as the real agent does (`agent/src/stage.rs`), checking each chunk against its
/// digest; returns the bytes fetched.
async fn fetch(conn: &quinn::Connection, digest: Digest) -> Result<u64> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_msg(&mut send, &DeployUp::FetchManifest { digest }).await?;
    send.finish()?;
    let Some(Some(bytes)) = frame::read_blob::<_, { frame::MANIFEST_LIMIT }>(&mut recv).await? else {
        bail!("the controller does not have the manifest {digest}");
    };
    if Digest::of(&bytes) != digest {
        bail!("the manifest does not match its digest");
    }
    let manifest = stagehand_common::manifest::Manifest::decode(&bytes)?;
    let mut seen = std::collections::HashSet::new();
    let chunks: Vec<Digest> = manifest
        .files()
        .flat_map(|(_, _, _, chunks)| chunks.iter().map(|c| c.digest))
        .filter(|d| seen.insert(*d))
        .collect();
    let per_lane = chunks.len().div_ceil(2).max(1);
    let mut lanes = tokio::task::JoinSet::new();
    for lane in chunks.chunks(per_lane) {
        let (conn, lane) = (conn.clone(), lane.to_vec());
        lanes.spawn(async move {
            let mut total = 0u64;
            for batch in lane.chunks(4096) {
                let (mut send, mut recv) = conn.open_bi().await?;
                write_msg(&mut send, &DeployUp::FetchChunks { digests: batch.to_vec() }).await?;
                send.finish()?;
                for d in batch {
                    let Some(Some(chunk)) = frame::read_blob::<_, { frame::CHUNK_LIMIT }>(&mut recv).await? else {
                        bail!("the controller did not send chunk {}", d.short());
                    };
                    if Digest::of(&chunk) != *d {
                        bail!("chunk {} does not match its digest", d.short());
                    }
                    total += chunk.len() as u64;
                }
            }
            anyhow::Ok(total)
        });
    }
    let mut total = 0;
    while let Some(lane) = lanes.join_next().await {
        total += lane??;
    }
    Ok(total)
}

/// Counts a session up while it lives, and ended when it ends.
struct Up<'a>(&'a AtomicUsize, &'a AtomicUsize);

impl<'a> Up<'a> {
    fn new(n: &'a AtomicUsize, ended: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Up(n, ended)
    }
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.fetch_add(1, Ordering::Relaxed);
    }
}

/// Enrols `n` agents named `{prefix}-{i}` with one multi-use token, `parallel` at a time.
pub async fn enrol_many(
    controller: SocketAddr,
    token: &str,
    prefix: &str,
    n: usize,
    parallel: usize,
    stats: Arc<Stats>,
) -> Result<Vec<Arc<SimAgent>>> {
    let token = Arc::new(JoinToken::parse(token).map_err(anyhow::Error::msg)?);
    let endpoint = net::client_endpoint(controller)?;
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..parallel.max(1) {
        let (endpoint, token, next, stats, prefix) =
            (endpoint.clone(), token.clone(), next.clone(), stats.clone(), prefix.to_string());
        workers.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(mine);
                }
                mine.push(enrol(&endpoint, controller, &token, &format!("{prefix}-{i:05}"), stats.clone()).await?);
            }
        });
    }
    let mut agents = Vec::with_capacity(n);
    while let Some(done) = workers.join_next().await {
        agents.extend(done??);
    }
    endpoint.close(0u32.into(), b"enrolled");
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(agents)
}
