//! The controller daemon: one QUIC endpoint, four ALPNs. Each connection is checked for the
//! role its certificate was registered with before any of its messages are read.

use crate::chunks::ChunkStore;
use crate::config::{ControllerConfig, Layout};
use crate::fleet::Fleet;
use crate::store::{CertRole, Store};
use crate::{admin, deploy, enrol, init, release};
use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use stagehand_common::activate::ReleaseKey;
use stagehand_common::protocol::{ALPN_ADMIN, ALPN_DEPLOY, ALPN_JOIN, ALPN_RELEASE};
use stagehand_common::tls::{self, Credentials, Pair};
use stagehand_common::{net, AgentId};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tracing::{debug, info, warn};

/// Close codes the controller uses.
pub const CLOSE_UNAUTHORISED: u32 = stagehand_common::protocol::CLOSE_UNAUTHORISED;
pub const CLOSE_PROTOCOL: u32 = 2;

/// Everything a connection handler needs.
pub struct Controller {
    pub store: Store,
    pub chunks: ChunkStore,
    pub fleet: Fleet,
    pub ca: Pair,
    pub release_key: SigningKey,
    pub release_keys: Vec<ReleaseKey>,
    /// Every release key change made (rotations), oldest first: sent to every agent.
    pub key_chain: Vec<stagehand_common::keychain::SignedKeyChange>,
    pub config: ControllerConfig,
    pub ca_fingerprint: String,
    /// Serialises changes to rollouts (the driver's steps, operators' controls, catch-up).
    pub rollouts: std::sync::Mutex<()>,
    /// Agents to catch up, and whether each has just staged something; the driver drains it.
    pub catch_ups: std::sync::Mutex<std::collections::HashMap<AgentId, bool>>,
    /// Rollouts whose last step failed, with why (shown in their status until a step succeeds).
    pub stalled: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// The audit log: who did what, durable before it is acknowledged.
    pub audit: crate::audit::Audit,
    /// What `/metrics` shows (SPEC §12).
    pub metrics: crate::metrics::Metrics,
    /// The fleet page's logins and sessions.
    pub web: crate::web::Web,
    /// Pushes in flight: their chunks are kept by the garbage collection (`gc.rs`).
    pub pushes: crate::gc::Pushes,
    /// Chunk streams served at once across every agent (`fetch_streams`): fan-out's memory.
    pub fetch_slots: Arc<tokio::sync::Semaphore>,
    /// Open admin connections by identity: closed when it is revoked.
    pub admin_conns: std::sync::Mutex<std::collections::HashMap<String, Vec<quinn::Connection>>>,
    /// This controller's name among several sharing the state: its address.
    pub name: String,
    /// Serialises presence records (`note_presence`).
    pub presence: std::sync::Mutex<()>,
    /// Per environment: a digest of the signed policy last sent to its agents from here.
    pub policy_sent: std::sync::Mutex<std::collections::HashMap<String, stagehand_common::Digest>>,
}

impl Controller {
    /// Holds off every other change to rollouts while held.
    pub fn rollout_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.rollouts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the rollout driver to catch an agent up (bounded: one entry per agent).
    pub fn ask_catch_up(&self, id: &AgentId, staged_now: bool) {
        *self.catch_ups.lock().unwrap_or_else(|p| p.into_inner()).entry(id.clone()).or_default() |= staged_now;
        self.fleet.bump();
    }

    /// Whether an agent is connected: to this controller, or (sharing the state) to another.
    pub fn connected(&self, id: &AgentId) -> bool {
        self.fleet.is_connected(id)
            || (self.store.shared() && self.store.connected_elsewhere(id, &self.name).unwrap_or(false))
    }

    /// Tells the other controllers whether an agent is connected here (after its sessions
    /// changed).
    pub fn note_presence(&self, id: &AgentId) {
        if self.store.shared() {
            // Read and recorded under one lock: a detach and an attach racing leave the last word.
            let _one_at_a_time = self.presence.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = self.store.set_presence(id, &self.name, self.fleet.is_connected(id)) {
                warn!(agent = %id, error = %e, "Could not record where the agent is connected.");
            }
        }
    }

    /// The agents asked to be caught up since the last call.
    pub fn take_catch_ups(&self) -> std::collections::HashMap<AgentId, bool> {
        std::mem::take(&mut *self.catch_ups.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A controller serving in this process.
pub struct Running {
    pub addr: SocketAddr,
    /// Where the fleet page and `/metrics` are served, if they are.
    pub http: Option<SocketAddr>,
    pub controller: Arc<Controller>,
    endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
    driver: tokio::task::JoinHandle<()>,
    http_task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, closes every connection and waits for the state to be flushed.
    pub async fn stop(self) {
        self.endpoint.close(0u32.into(), b"controller shutting down");
        self.task.abort();
        self.driver.abort();
        if let Some(h) = &self.http_task {
            h.abort();
        }
        let _ = self.task.await;
        let _ = self.driver.await;
        self.endpoint.wait_idle().await;
        if let Err(e) = self.controller.store.flush() {
            warn!(error = %e, "Could not flush state at shutdown.");
        }
        self.controller.store.close();
    }
}

/// Opens the data directory and starts serving; `listen` overrides the configured address.
pub async fn start(data_dir: &Path, listen: Option<SocketAddr>) -> Result<Running> {
    start_with(data_dir, listen, None).await
}

/// Where the controller keeps its state: `etcd://HOST:PORT[,HOST:PORT…]` shares it with
/// other controllers (SPEC §13); none keeps it in the data directory.
pub fn etcd_endpoints(url: &str) -> Result<Vec<String>> {
    let Some(list) = url.strip_prefix("etcd://") else {
        return Err(crate::client::OpError::new(
            format!("--store {url:?} is not a store this controller knows"),
            "pass --store etcd://HOST:PORT[,HOST:PORT…], or leave it out to keep the state in the data directory",
        )
        .into());
    };
    let endpoints: Vec<String> = list.trim_end_matches('/').split(',').map(str::trim).map(str::to_string).collect();
    for e in &endpoints {
        let ok = e.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            return Err(crate::client::OpError::new(
                format!("--store names {e:?}, which is not HOST:PORT"),
                "pass --store etcd://HOST:PORT[,HOST:PORT…], for example --store etcd://127.0.0.1:2379",
            )
            .into());
        }
    }
    Ok(endpoints)
}

/// [`start`], serving the fleet page and `/metrics` on `http` (else on controller.toml's
/// `http`, if set).
pub async fn start_with(data_dir: &Path, listen: Option<SocketAddr>, http: Option<SocketAddr>) -> Result<Running> {
    start_shared(data_dir, listen, http, None).await
}

/// [`start_with`], keeping the state in etcd (`--store etcd://…`) when `store` says so.
pub async fn start_shared(
    data_dir: &Path,
    listen: Option<SocketAddr>,
    http: Option<SocketAddr>,
    store_url: Option<&str>,
) -> Result<Running> {
    let endpoints = store_url.map(etcd_endpoints).transpose()?;
    let layout = Layout::new(data_dir);
    let config = ControllerConfig::load(&layout.config())?;
    let listen = listen.unwrap_or(config.listen);
    let store = Store::open(&layout.state()).map_err(|e| match e {
        crate::store::StoreError::Locked(_) => anyhow::Error::new(crate::client::OpError::new(
            e.to_string(),
            format!(
                "stop the other controller first (`pgrep -a stagehand`), or serve another data directory than {}",
                data_dir.display()
            ),
        )),
        e => anyhow::Error::new(e).context("opening the state database"),
    })?;
    // Only with the data directory held: nothing below changes files another controller uses.
    let ca = init::load_ca(&layout)?;
    let keys = crate::keys::load(&layout)?;
    let mut server = Credentials::load(&layout.tls_dir())?;
    // The controller's own certificate, reissued for the same key once two thirds have passed.
    if tls::renew_at(&server.me.cert_pem)? <= stagehand_common::ids::now_secs() as i64 {
        server.me = tls::reissue(&ca, &tls::Role::Controller, &server.me, tls::CONTROLLER_LIFETIME)?;
        server.save(&layout.tls_dir())?;
        info!("Renewed the controller's certificate.");
    }
    let chunk_dir = config.chunks.clone().unwrap_or_else(|| layout.store());
    let chunks =
        ChunkStore::open(&chunk_dir).with_context(|| format!("opening the chunk store {}", chunk_dir.display()))?;
    let (audit, entries) = crate::audit::Audit::open(&layout.root)
        .map_err(|e| anyhow::anyhow!("{e:#}; the audit log is the record of who did what: restore it from a backup"))?;
    let ca_fingerprint = tls::fingerprint(&tls::cert_der(&ca.cert_pem)?);
    let tls = tls::server_config(&ca.cert_pem, &server.me, &[ALPN_ADMIN, ALPN_DEPLOY, ALPN_RELEASE, ALPN_JOIN])?;
    // Derived from the server's private key: stable across restarts, known to nobody else.
    let endpoint = net::server_endpoint(listen, tls, server.me.key_pem.as_bytes()).map_err(|e| {
        let in_use = format!("{e}").contains("in use");
        let next = if in_use {
            format!("another process listens on {listen}: stop it, or pass --listen ADDR (for example --listen 0.0.0.0:7444)")
        } else {
            "pass --listen ADDR with an address of this host".to_string()
        };
        anyhow::Error::new(crate::client::OpError::new(format!("cannot listen on {listen}: {e}"), next))
    })?;
    let addr = endpoint.local_addr()?;
    let name = controller_name(addr);
    let store = match endpoints {
        None => store,
        Some(endpoints) => {
            let shared = Store::open_etcd(endpoints, name.clone()).map_err(|e| {
                anyhow::Error::new(crate::client::OpError::new(
                    format!("{e}"),
                    "start etcd, or check the address given to --store (etcd's client URL, e.g. etcd://127.0.0.1:2379)",
                ))
            })?;
            // The first controller on an empty etcd brings the data directory's state.
            if shared.seed_from(&store, &name)? {
                info!("Copied the data directory's state into etcd: this is the first controller sharing it.");
            }
            shared
        }
    };
    // Checked against the state in use: shared, it is at least as far on as this log.
    let disagreements = crate::audit::disagreements(&store, &crate::audit::Facts::of(&entries))?;
    if !disagreements.is_empty() {
        anyhow::bail!(
            "the state database disagrees with the audit log: {}; it may be damaged. Repair it from the log with \
             `stagehand controller repair --data-dir {}`",
            disagreements.join("; "),
            layout.root.display()
        );
    }
    // A data directory from before identities: its one admin is the owner.
    if store.admins()?.is_empty() {
        store.put_admin(&crate::store::AdminRecord {
            v: 1,
            name: "admin".into(),
            role: "owner".into(),
            envs: Vec::new(),
            revoked: false,
            created_at: stagehand_common::ids::now_secs(),
            expires_at: 0,
        })?;
        store.flush()?;
    }
    let resigned = crate::keys::resign_stored(&store, &keys)?;
    if resigned > 0 {
        info!(messages = resigned, key = %keys.public.key_id, "Signed stored messages again with the new release key.");
    }
    stagehand_common::fsx::write_atomic(&layout.addr_file(), addr.to_string().as_bytes(), 0o644)?;
    let controller = Arc::new(Controller {
        fetch_slots: Arc::new(tokio::sync::Semaphore::new(config.fetch_streams)),
        release_keys: vec![keys.public],
        key_chain: keys.chain,
        store,
        chunks,
        fleet: Fleet::default(),
        ca,
        release_key: keys.signing,
        config,
        ca_fingerprint,
        rollouts: std::sync::Mutex::new(()),
        catch_ups: Default::default(),
        stalled: Default::default(),
        audit,
        admin_conns: Default::default(),
        pushes: Default::default(),
        metrics: Default::default(),
        web: Default::default(),
        name,
        presence: Default::default(),
        policy_sent: Default::default(),
    });
    // What agents must enforce, signed before the first of them connects.
    if let Err(e) = crate::policy::sync_all(&controller) {
        warn!(error = %format!("{e:#}"), "Could not bring the release policies up to date; agents keep what they enforce.");
    }
    info!(%addr, "Controller listening.");
    let http = match http.or(controller.config.http) {
        Some(at) => {
            let (bound, task) = crate::web::serve(&controller, at).await.map_err(|e| {
                anyhow::Error::new(crate::client::OpError::new(
                    format!("cannot serve HTTP on {at}: {e}"),
                    "pass --http ADDR with a free address of this host (for example --http 127.0.0.1:9100)",
                ))
            })?;
            info!(addr = %bound, "Serving the fleet page on / and metrics on /metrics.");
            Some((bound, task))
        }
        None => None,
    };
    let task = tokio::spawn(accept_loop(controller.clone(), endpoint.clone()));
    let driver = tokio::spawn(crate::rollout::drive(controller.clone()));
    if controller.store.shared() {
        info!(controller = %controller.name, "Sharing the state in etcd with other controllers.");
        tokio::spawn(follow(controller.clone()));
    }
    let (http, http_task) = http.unzip();
    Ok(Running { addr, http, controller, endpoint, task, driver, http_task })
}

/// This controller's name among those sharing the state: its address, with the host's name
/// when it listens on every address.
fn controller_name(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}:{}", host.trim(), addr.port())
    } else {
        addr.to_string()
    }
}

/// Acts on what other controllers change: their revocations close sessions here, their
/// deploys reach the agents connected here, and waiters (`--wait`, the fleet page, the
/// rollout driver) look again.
async fn follow(ctl: Arc<Controller>) {
    let mut changes = ctl.store.subscribe();
    while changes.changed().await.is_ok() {
        let tables = ctl.store.take_changed();
        let c = ctl.clone();
        match tokio::task::spawn_blocking(move || react(&c, tables)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %format!("{e:#}"), "Could not act on a change another controller made."),
            Err(e) => warn!(error = %e, "Acting on another controller's change panicked."),
        }
        ctl.fleet.bump();
    }
}

/// One agent's or one identity's failure does not keep the others from being acted on.
fn react(ctl: &Controller, tables: u32) -> Result<()> {
    use crate::store::backend::Table;
    let mut failed = None;
    if tables & Table::Agents.bit() != 0 {
        for id in ctl.fleet.agents() {
            match active_agent(ctl, &id) {
                Ok(true) => {}
                Ok(false) => {
                    info!(agent = %id, "Revoked through another controller: closing its sessions.");
                    ctl.fleet.kick(&id);
                }
                Err(e) => failed = Some(e),
            }
        }
    }
    if tables & Table::Admins.bit() != 0 {
        let names: Vec<String> = ctl.admin_conns.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        for name in names {
            if admin::identity(ctl, &name).is_err() {
                for conn in ctl.admin_conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&name).unwrap_or_default()
                {
                    conn.close(CLOSE_UNAUTHORISED.into(), b"identity revoked");
                }
            }
        }
    }
    if tables & Table::Policy.bit() != 0 {
        // A policy another controller signed or had approved reaches the agents here too.
        for env in crate::policy::environments(ctl)? {
            if let Some(p) = ctl.store.policy(&env)? {
                crate::policy::push(ctl, &env, &p)?;
            }
        }
    }
    if tables & Table::Deploys.bit() != 0 {
        for id in ctl.fleet.agents() {
            if let Err(e) = deploy::order_pending(ctl, &id) {
                failed = Some(e);
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Handshakes in flight at most. Beyond them a connection waits its turn in a queue, in
/// order; beyond the queue it is refused at once (a packet, no crypto) and its agent retries
/// after its backoff with jitter. A reconnect storm (every agent after a controller restart)
/// then keeps the controller's handshakes busy without datagrams dropped, handshakes timing
/// out, or agents rebuilding connection attempts only to be refused again.
pub const HANDSHAKES_IN_FLIGHT: usize = 128;
/// Connections waiting for a handshake slot at most: about ten seconds of handshakes.
pub const HANDSHAKES_QUEUED: usize = 4096;
/// A connection that waited longer is refused instead: its agent gives up at the idle timeout
/// (30 s), and a handshake with a peer that left would hold a slot until it timed out too.
pub const HANDSHAKE_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

async fn accept_loop(ctl: Arc<Controller>, endpoint: quinn::Endpoint) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_IN_FLIGHT));
    let mut queue: std::collections::VecDeque<(std::time::Instant, quinn::Incoming)> = Default::default();
    loop {
        ctl.metrics.handshakes_queued.set(queue.len() as i64);
        tokio::select! {
            // Waiting connections first: they came before anything accept() returns now.
            biased;
            permit = handshakes.clone().acquire_owned(), if !queue.is_empty() => {
                let Ok(permit) = permit else { return };
                let Some((at, incoming)) = queue.pop_front() else { continue };
                if at.elapsed() > HANDSHAKE_QUEUE_WAIT {
                    ctl.metrics.handshakes_refused.inc();
                    incoming.refuse();
                } else {
                    handshake(&ctl, incoming, permit);
                }
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                match handshakes.clone().try_acquire_owned() {
                    Ok(permit) if queue.is_empty() => handshake(&ctl, incoming, permit),
                    _ if queue.len() < HANDSHAKES_QUEUED => queue.push_back((std::time::Instant::now(), incoming)),
                    _ => {
                        ctl.metrics.handshakes_refused.inc();
                        incoming.refuse();
                    }
                }
            }
        }
    }
}

/// Completes the handshake of `incoming` holding `permit`, then serves the connection.
fn handshake(ctl: &Arc<Controller>, incoming: quinn::Incoming, permit: tokio::sync::OwnedSemaphorePermit) {
    let ctl = ctl.clone();
    tokio::spawn(async move {
        let remote = incoming.remote_address();
        let conn = incoming.await;
        drop(permit);
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                debug!(%remote, error = %e, "Handshake failed.");
                return;
            }
        };
        if let Err(e) = dispatch(ctl, conn.clone()).await {
            debug!(%remote, error = %format!("{e:#}"), "Connection ended with an error.");
            conn.close(CLOSE_PROTOCOL.into(), b"protocol error");
        }
    });
}

async fn dispatch(ctl: Arc<Controller>, conn: quinn::Connection) -> Result<()> {
    let alpn = net::alpn(&conn).unwrap_or_default();
    if alpn == ALPN_JOIN {
        return enrol::serve(ctl, conn).await;
    }
    let role = match net::peer_fingerprint(&conn) {
        Some(fp) => ctl.store.cert_role(&fp)?,
        None => None,
    };
    match (alpn.as_slice(), role) {
        (ALPN_ADMIN, Some(CertRole::Admin(name))) => admin::serve(ctl, conn, name).await,
        (ALPN_DEPLOY, Some(CertRole::Agent(id))) if active_agent(&ctl, &id)? => deploy::serve(ctl, conn, id).await,
        (ALPN_RELEASE, Some(CertRole::Agent(id))) if active_agent(&ctl, &id)? => release::serve(ctl, conn, id).await,
        // An agent the controller revoked, or removed (its certificate is still registered to
        // it): the agent is told so once and stops, instead of reconnecting for ever. A
        // certificate the controller does not know at all (a state database restored from
        // before a renewal) is only refused: its agent keeps trying, nothing stops for good.
        (ALPN_DEPLOY | ALPN_RELEASE, Some(CertRole::Agent(_))) => {
            debug!(remote = %conn.remote_address(), "Refused a revoked or removed agent.");
            conn.close(stagehand_common::protocol::CLOSE_REVOKED.into(), b"revoked");
            Ok(())
        }
        (alpn, role) => {
            warn!(remote = %conn.remote_address(), alpn = %String::from_utf8_lossy(alpn), ?role, "Refused a connection: its certificate does not grant this channel.");
            conn.close(CLOSE_UNAUTHORISED.into(), b"certificate not allowed on this channel");
            Ok(())
        }
    }
}

/// A known agent that is not revoked.
pub fn active_agent(ctl: &Controller, id: &AgentId) -> Result<bool> {
    Ok(ctl.store.agent(id)?.is_some_and(|a| !a.revoked))
}

/// Runs until `shutdown` completes.
pub async fn serve(
    data_dir: &Path,
    listen: Option<SocketAddr>,
    http: Option<SocketAddr>,
    store: Option<&str>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let running = start_shared(data_dir, listen, http, store).await?;
    shutdown.await;
    info!("Shutting down.");
    running.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn store_urls_name_etcd_endpoints() {
        assert_eq!(
            super::etcd_endpoints("etcd://10.0.0.1:2379, etcd-2:2379/").unwrap(),
            ["10.0.0.1:2379", "etcd-2:2379"]
        );
        for bad in ["10.0.0.1:2379", "etcd://", "etcd://host", "etcd://host:port", "sled:///var/lib"] {
            assert!(super::etcd_endpoints(bad).is_err(), "{bad}");
        }
    }

    /// An agent with several controllers moves on after `FAILOVER_AFTER` without an answer:
    /// a connection waiting in this controller's queue must have been taken or refused by
    /// then, or its handshake would start with a peer that has left and hold a slot.
    #[test]
    fn agents_wait_longer_than_the_handshake_queue_before_failing_over() {
        assert!(stagehand_agent::run::FAILOVER_AFTER > super::HANDSHAKE_QUEUE_WAIT);
    }
}
