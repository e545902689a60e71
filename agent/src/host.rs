//! This machine as the agent sees it: where each app's `releases/` and `current` live, the
//! identity, the index of staged versions, and the recovery done at start-up.

use crate::config::{AgentConfig, AppConfig, Identity};
use crate::share::Ledger;
use crate::store::{StagedRecord, Store};
use crate::tree;
use anyhow::{Context, Result};
use stagehand_common::activate::{Activate, SignedActivate};
use stagehand_common::ids::check_name;
use stagehand_common::manifest::Manifest;
use stagehand_common::protocol::{DeployUp, ReleaseUp, StageOutcome, StagedArtifact};
use stagehand_common::{frame, fsx, Digest};
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Paths only: usable without opening (and locking) the state database.
#[derive(Clone, Debug)]
pub struct Layout {
    pub data_dir: PathBuf,
    pub config: AgentConfig,
}

impl Layout {
    pub fn load(data_dir: &Path) -> Result<Self> {
        Ok(Layout { data_dir: data_dir.to_path_buf(), config: AgentConfig::load(data_dir)? })
    }

    pub fn app_config(&self, app: &str) -> AppConfig {
        self.config.apps.get(app).cloned().unwrap_or_default()
    }

    /// Where an app's `releases/` and `current` live.
    pub fn app_root(&self, app: &str) -> PathBuf {
        self.config.apps.get(app).and_then(|a| a.root.clone()).unwrap_or_else(|| self.data_dir.join("apps").join(app))
    }

    pub fn releases(&self, app: &str) -> PathBuf {
        self.app_root(app).join("releases")
    }

    pub fn release_dir(&self, app: &str, version: &str) -> PathBuf {
        self.releases(app).join(version)
    }

    pub fn current(&self, app: &str) -> PathBuf {
        self.app_root(app).join("current")
    }

    /// Temporary trees being staged, beside `releases/`.
    pub fn staging(&self, app: &str) -> PathBuf {
        self.app_root(app).join(".staging")
    }

    /// The manifest of each staged version, written before the version appears.
    pub fn manifest_file(&self, app: &str, version: &str) -> PathBuf {
        self.app_root(app).join(".manifests").join(version)
    }

    pub fn journal(&self, app: &str) -> PathBuf {
        self.data_dir.join("journal").join(format!("{app}.journal"))
    }

    pub fn socket(&self) -> PathBuf {
        self.data_dir.join("agent.sock")
    }

    /// Every app this host knows: under `DATA/apps`, in the config, or with a journal.
    pub fn apps(&self) -> Vec<String> {
        let mut apps: BTreeSet<String> = self.config.apps.keys().cloned().collect();
        let sources = [(self.data_dir.join("apps"), &[""][..]), (self.data_dir.join("journal"), &[".journal"][..])];
        for (dir, suffixes) in sources {
            let Ok(rd) = std::fs::read_dir(dir) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let app =
                    suffixes.iter().find_map(|s| if s.is_empty() { Some(name.as_str()) } else { name.strip_suffix(s) });
                if let Some(app) = app.filter(|a| check_name("app", a).is_ok()) {
                    apps.insert(app.to_string());
                }
            }
        }
        apps.into_iter().collect()
    }

    /// The version `current` points at.
    pub fn active(&self, app: &str) -> Option<String> {
        let target = std::fs::read_link(self.current(app)).ok()?;
        let version = target.file_name()?.to_str()?.to_string();
        self.release_dir(app, &version).is_dir().then_some(version)
    }

    /// Versions present under `releases/`.
    pub fn release_versions(&self, app: &str) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.releases(app))
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        out.retain(|v| check_name("version", v).is_ok());
        out.sort();
        out
    }

    /// Refuses an app root that someone other than the agent's user (or root) could change:
    /// the root itself writable by group or others, or an ancestor writable by them without
    /// the sticky bit. A local user who can write there could plant symlinks that redirect
    /// the agent's writes and chmods, which run as root.
    pub fn check_root(&self, app: &str) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let root = self.app_root(app);
        let me = rustix::process::geteuid().as_raw();
        // Where it really is, and the path that leads there: a directory on either that
        // others can change could redirect the agent.
        let real = std::fs::canonicalize(&root).unwrap_or_else(|_| root.clone());
        let mut paths: Vec<&Path> = real.ancestors().collect();
        paths.extend(root.ancestors().skip(1));
        for p in paths {
            let md = match std::fs::metadata(p) {
                Ok(md) => md,
                // Not created yet: the agent creates it, as its own user.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("cannot check {}: {e}", p.display())),
            };
            let mode = md.mode();
            let writable = mode & 0o022 != 0 && (p == real || mode & 0o1000 == 0);
            if (md.uid() != me && md.uid() != 0) || writable {
                return Err(unsafe_path(p, mode, md.uid(), me, &root));
            }
        }
        // What the agent keeps under the root: its own directories, or they were planted.
        for name in [".staging", "releases", ".manifests"] {
            let p = root.join(name);
            let md = match std::fs::symlink_metadata(&p) {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("cannot check {}: {e}", p.display())),
            };
            if !md.is_dir() || (md.uid() != me && md.uid() != 0) || md.mode() & 0o022 != 0 {
                return Err(unsafe_path(&p, md.mode(), md.uid(), me, &root));
            }
        }
        Ok(())
    }

    pub fn read_manifest(&self, app: &str, version: &str) -> Result<Manifest> {
        let bytes = fsx::read_limited(&self.manifest_file(app, version), frame::MANIFEST_LIMIT as u64)?;
        Ok(Manifest::decode(&bytes)?)
    }
}

/// Why a path under or above an app root is not safe to stage into, and the repair.
fn unsafe_path(p: &Path, mode: u32, uid: u32, me: u32, root: &Path) -> String {
    let kind = if mode & 0o170000 == 0o120000 { "a symlink" } else { "a path" };
    format!(
        "{} ({kind}, mode {:o}, owner uid {uid}) can be changed by users other than the agent's, who could plant \
         symlinks that redirect the agent's writes under the app root {}; make it a directory owned by root or uid \
         {me} and not writable by group or others (chmod go-w), or remove what was planted",
        p.display(),
        mode & 0o7777,
        root.display()
    )
}

/// Stagings in progress, and those asked for again while running.
#[derive(Default)]
struct Staging {
    running: HashSet<(String, String)>,
    again: HashSet<(String, String)>,
}

/// The running agent's shared state.
pub struct Host {
    pub layout: Layout,
    pub identity: Identity,
    pub store: Store,
    /// Inodes shared between versions, and the seal checks that know about them.
    pub ledger: Ledger,
    /// The credentials new connections present (renewed over the deploy channel), and the
    /// key of a renewal asked for.
    credentials: Mutex<stagehand_common::tls::Credentials>,
    /// Set once when the agent must stop for good (revoked, certificate expired), with why.
    stop: tokio::sync::watch::Sender<Option<String>>,
    /// The environment's release policy in force (SPEC §14).
    pub policy: crate::policy::Enforced,
    /// Per app: the version previewed beside the live one (SPEC §14).
    previews: Mutex<std::collections::HashMap<String, String>>,
    /// The release keys pinned now: the identity's, moved on by key changes.
    release_keys: Mutex<Vec<stagehand_common::activate::ReleaseKey>>,
    pending_key: Mutex<Option<(String, Vec<u8>)>>,
    /// One activation (or retention pass) at a time per app.
    activations: Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    staging: Mutex<Staging>,
    deploy: Mutex<Option<(mpsc::UnboundedSender<DeployUp>, quinn::Connection)>>,
    release_tx: Mutex<Option<mpsc::UnboundedSender<ReleaseUp>>>,
    scheduler: Mutex<Option<mpsc::UnboundedSender<(u64, SignedActivate)>>>,
    /// (app, version) of messages waiting in the scheduler, with how many: retention keeps them.
    scheduled: Mutex<std::collections::HashMap<(String, String), usize>>,
    /// Supervised services (SPEC §9).
    pub services: std::sync::Arc<crate::service::Services>,
    /// What `/metrics` shows (SPEC §12).
    pub metrics: crate::metrics::Metrics,
    /// Per app: its listener (traffic mode) and the versions it routes to.
    traffic: Mutex<std::collections::HashMap<String, crate::switch::AppTraffic>>,
    /// Which of agent.toml's controllers both channels go to (a count, taken modulo their
    /// number): moved on by a channel that cannot reach it, followed by the other, so both
    /// stay with one controller.
    pub controller_at: tokio::sync::watch::Sender<u64>,
}

impl Host {
    /// Opens the data directory (taking the state database's lock) and brings the index and
    /// any interrupted activation in line with the filesystem.
    pub fn open(data_dir: &Path) -> Result<Host> {
        let layout = Layout::load(data_dir)?;
        let identity = Identity::load(data_dir)?;
        let store = Store::open(&data_dir.join("state")).with_context(|| {
            format!(
                "opening the state database in {}; is another stagehand-agent running on this data dir?",
                data_dir.display()
            )
        })?;
        let policy = crate::policy::Enforced::load(data_dir, &identity.env)?;
        let host = Host {
            policy,
            previews: Mutex::default(),
            layout,
            credentials: Mutex::new(identity.credentials.clone()),
            release_keys: Mutex::new(identity.release_keys.clone()),
            stop: tokio::sync::watch::Sender::new(None),
            pending_key: Mutex::default(),
            identity,
            ledger: Ledger::new(store.clone()),
            store,
            activations: Mutex::default(),
            staging: Mutex::default(),
            deploy: Mutex::default(),
            release_tx: Mutex::default(),
            scheduler: Mutex::default(),
            scheduled: Mutex::default(),
            services: std::sync::Arc::new(crate::service::Services::new(data_dir)),
            traffic: Mutex::default(),
            metrics: crate::metrics::Metrics::default(),
            controller_at: tokio::sync::watch::Sender::new(0),
        };
        host.rebuild_index()?;
        Ok(host)
    }

    pub(crate) fn traffic(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, crate::switch::AppTraffic>> {
        self.traffic.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_traffic(&self, app: &str, t: crate::switch::AppTraffic) {
        self.traffic().insert(app.to_string(), t);
    }

    /// Asks the running agent to stop for good, with why (the first reason wins).
    pub fn stop_for_good(&self, why: String) {
        self.stop.send_if_modified(|s| {
            let first = s.is_none();
            if first {
                *s = Some(why);
            }
            first
        });
    }

    /// Watches for [`Host::stop_for_good`].
    pub fn stopped_for_good(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.stop.subscribe()
    }

    /// The version previewed for an app, if any.
    pub fn preview_of(&self, app: &str) -> Option<String> {
        self.previews.lock().unwrap_or_else(|p| p.into_inner()).get(app).cloned()
    }

    pub fn set_preview(&self, app: &str, version: &str) {
        self.previews.lock().unwrap_or_else(|p| p.into_inner()).insert(app.to_string(), version.to_string());
    }

    pub fn take_preview(&self, app: &str) -> Option<String> {
        self.previews.lock().unwrap_or_else(|p| p.into_inner()).remove(app)
    }

    /// Whether a message names a release key pinned now (its signature is checked later).
    pub fn signed_by_pinned(&self, msg: &SignedActivate) -> bool {
        Activate::decode_unverified(&msg.body).is_some_and(|b| self.release_keys().iter().any(|k| k.key_id == b.key_id))
    }

    /// The release keys pinned now.
    pub fn release_keys(&self) -> Vec<stagehand_common::activate::ReleaseKey> {
        self.release_keys.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Walks a chain of release key changes (SPEC §10) and pins what it leads to, durably
    /// before any message is checked against it. Returns whether the pins changed.
    pub fn apply_key_changes(&self, chain: &[stagehand_common::keychain::SignedKeyChange]) -> Result<bool> {
        let mut pinned = self.release_keys.lock().unwrap_or_else(|p| p.into_inner());
        let next = stagehand_common::keychain::apply(&pinned, chain);
        if next == *pinned {
            return Ok(false);
        }
        Identity::save_release_keys(&self.layout.data_dir, &next)?;
        let ids = |k: &[stagehand_common::activate::ReleaseKey]| {
            k.iter().map(|k| k.key_id.as_str()).collect::<Vec<_>>().join(",")
        };
        info!(before = %ids(&pinned), after = %ids(&next), "Release keys changed by a signed key change.");
        *pinned = next;
        Ok(true)
    }

    fn rebuild_index(&self) -> Result<()> {
        let l = &self.layout;
        for app in l.apps() {
            // A temporary link left by a crash mid-switch is never `current`: remove it.
            if let Ok(rd) = std::fs::read_dir(l.app_root(&app)) {
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().starts_with(".current.tmp-") {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
            for version in l.release_versions(&app) {
                if self.store.staged(&app, &version)?.is_some() {
                    continue;
                }
                let dir = l.release_dir(&app, &version);
                let checked = l.read_manifest(&app, &version).map_err(|e| format!("{e:#}")).and_then(|m| {
                    let seal = tree::verify(&dir, &m).map_err(|d| d.to_string())?;
                    self.ledger.record_verified(&app, &dir, &seal).map_err(|e| e.to_string())?;
                    Ok((m.digest(), seal))
                });
                match checked {
                    Ok((digest, seal)) => {
                        info!(%app, %version, "Re-indexed a staged version.");
                        self.store.put_staged(&app, &version, &StagedRecord { v: 1, digest, seal, used_at: 0 })?;
                    }
                    Err(why) => {
                        warn!(%app, %version, %why, "A version under releases/ does not match its manifest; it will not be activated.")
                    }
                }
            }
        }
        let mut held: std::collections::HashMap<String, HashSet<u64>> = Default::default();
        for (app, version, r) in self.store.all_staged()? {
            if !l.release_dir(&app, &version).is_dir() {
                self.store.remove_staged(&app, &version)?;
                continue;
            }
            held.entry(app).or_default().extend(r.seal.iter().map(|s| s.ino));
        }
        for app in l.apps() {
            self.ledger.forget_unheld(&app, held.get(&app).unwrap_or(&HashSet::new()))?;
        }
        self.store.flush()?;
        Ok(())
    }

    /// What this host holds staged and intact (a modified copy is left out, so the
    /// controller orders it staged again).
    pub fn inventory(&self) -> Vec<StagedArtifact> {
        self.store
            .all_staged()
            .unwrap_or_default()
            .into_iter()
            .filter(|(app, version, _)| matches!(self.intact(app, version), Some(Ok(_))))
            .map(|(app, version, r)| StagedArtifact { app, version, digest: r.digest })
            .collect()
    }

    /// Rule 5's input: the digest a version was staged with, if it is staged and intact,
    /// or why it is not. The seal makes the common case a few `stat`s; if it is broken the
    /// tree is read in full.
    pub fn intact(&self, app: &str, version: &str) -> Option<Result<Digest, String>> {
        let rec = self.store.staged(app, version).ok().flatten()?;
        let dir = self.layout.release_dir(app, version);
        if !dir.is_dir() {
            return None;
        }
        let changed = match self.ledger.check(app, &dir, &rec.seal) {
            Ok(()) => return Some(Ok(rec.digest)),
            Err(why) => why,
        };
        info!(%app, %version, %changed, "The seal of a staged version no longer holds; reading it in full.");
        let m = match self.layout.read_manifest(app, version) {
            Ok(m) if m.digest() == rec.digest => m,
            Ok(_) => {
                return Some(Err(format!(
                    "its manifest in {} was changed",
                    self.layout.manifest_file(app, version).display()
                )))
            }
            Err(e) => return Some(Err(format!("its manifest cannot be read: {e:#}"))),
        };
        match tree::verify(&dir, &m) {
            Ok(seal) => {
                if self.ledger.record_verified(app, &dir, &seal).is_ok() {
                    let _ = self.store.update_staged(app, version, |r| StagedRecord { seal: seal.clone(), ..r });
                }
                Some(Ok(rec.digest))
            }
            Err(damage) => {
                let why = format!("{damage}{}", self.shared_with(app, version, &dir, &damage.path));
                warn!(%app, %version, %why, "The staged tree no longer matches its digest.");
                Some(Err(why))
            }
        }
    }

    /// Tells the controller that a staged version was found modified: staged no more, as far
    /// as it is concerned, so that a deploy stages it afresh.
    pub fn report_damage(&self, app: &str, version: &str, why: &str) {
        let Some(rec) = self.store.staged(app, version).ok().flatten() else { return };
        self.send_deploy(DeployUp::StageReport {
            app: app.to_string(),
            version: version.to_string(),
            digest: rec.digest,
            outcome: StageOutcome::Failed { reason: format!("modified on this host: {why}") },
        });
    }

    /// For a damaged file that other versions hold too (a hard link): which, and what to do.
    fn shared_with(&self, app: &str, version: &str, dir: &Path, rel: &str) -> String {
        use std::os::unix::fs::MetadataExt;
        let Ok(md) = std::fs::symlink_metadata(stagehand_common::manifest::join(dir, rel)) else {
            return String::new();
        };
        if rel.is_empty() || !md.is_file() || md.nlink() < 2 {
            return String::new();
        }
        let mut others: Vec<String> = self
            .store
            .all_staged()
            .unwrap_or_default()
            .into_iter()
            .filter(|(a, v, r)| a == app && v != version && r.seal.iter().any(|s| s.ino == md.ino()))
            .map(|(_, v, _)| v)
            .collect();
        others.sort();
        let held =
            if others.is_empty() { "other versions".to_string() } else { format!("{app} {}", others.join(", ")) };
        format!(
            "; the file is one inode shared (hard-linked) with {held}, so a write through any of them changes them all; \
             an app that writes into its release tree needs `reuse = \"copy\"` under [apps.{app}] in agent.toml"
        )
    }

    /// The credentials to connect with now.
    pub fn credentials(&self) -> stagehand_common::tls::Credentials {
        self.credentials.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The key (and request) of the certificate asked for.
    pub fn set_pending(&self, key_pem: String, csr_der: Vec<u8>) {
        *self.pending_key.lock().unwrap_or_else(|p| p.into_inner()) = Some((key_pem, csr_der));
    }

    /// The request of a renewal not answered yet.
    pub fn pending_request(&self) -> Option<Vec<u8>> {
        self.pending_key.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(_, csr)| csr.clone())
    }

    /// Keeps a renewed certificate with the key it was asked for: durably, then for new
    /// connections.
    pub fn renewed(&self, cert_pem: String) -> Result<()> {
        let Some((key_pem, _)) = self.pending_key.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            anyhow::bail!("a certificate came that was not asked for");
        };
        stagehand_common::tls::validity(&cert_pem)?;
        let mut creds = self.credentials();
        creds.me = stagehand_common::tls::Pair { cert_pem, key_pem };
        crate::config::Identity::save_renewed(&self.layout.data_dir, &creds)?;
        *self.credentials.lock().unwrap_or_else(|p| p.into_inner()) = creds;
        Ok(())
    }

    /// The lock an activation or a retention pass of `app` holds.
    pub fn activation(&self, app: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.activations.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(app.to_string()).or_default().clone()
    }

    /// Marks (app, version) as being staged; false if it already is, in which case the
    /// running attempt is asked to go again if it fails (the order came on a newer session).
    pub fn begin_staging(&self, app: &str, version: &str) -> bool {
        let mut s = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        let key = (app.to_string(), version.to_string());
        if s.running.contains(&key) {
            s.again.insert(key);
            return false;
        }
        s.running.insert(key);
        true
    }

    /// Ends an attempt; true if it failed and should go again.
    pub fn end_staging(&self, app: &str, version: &str, failed: bool) -> bool {
        let mut s = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        let key = (app.to_string(), version.to_string());
        let again = s.again.remove(&key) && failed;
        if !again {
            s.running.remove(&key);
        }
        again
    }

    /// The deploy session now up: where stage reports go, and the connection to fetch on.
    pub fn set_deploy(&self, session: Option<(mpsc::UnboundedSender<DeployUp>, quinn::Connection)>) {
        *self.deploy.lock().unwrap_or_else(|p| p.into_inner()) = session;
    }

    pub fn deploy_conn(&self) -> Option<quinn::Connection> {
        self.deploy.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(_, c)| c.clone())
    }

    /// Sends a report on the current deploy session; a report with no session to carry it is
    /// dropped (the next session's inventory says what is staged).
    pub fn send_deploy(&self, msg: DeployUp) {
        if let Some((tx, _)) = self.deploy.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(msg);
        }
    }

    /// Where receipts go while the release channel is up.
    pub fn set_release_tx(&self, tx: Option<mpsc::UnboundedSender<ReleaseUp>>) {
        *self.release_tx.lock().unwrap_or_else(|p| p.into_inner()) = tx;
    }

    /// Where messages valid only later wait (the daemon's scheduler).
    pub fn set_scheduler(&self, tx: mpsc::UnboundedSender<(u64, SignedActivate)>) {
        *self.scheduler.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// Hands a message to the scheduler; false when there is none.
    pub fn schedule(&self, until: u64, msg: SignedActivate) -> bool {
        let target = Activate::decode_unverified(&msg.body).map(|b| (b.app, b.version));
        let sent = self
            .scheduler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|tx| tx.send((until, msg)).is_ok());
        if let (true, Some(t)) = (sent, target) {
            *self.scheduled.lock().unwrap_or_else(|p| p.into_inner()).entry(t).or_default() += 1;
        }
        sent
    }

    /// A scheduled message left the scheduler (it is being applied now).
    pub fn unschedule(&self, msg: &SignedActivate) {
        let Some(b) = Activate::decode_unverified(&msg.body) else { return };
        let mut s = self.scheduled.lock().unwrap_or_else(|p| p.into_inner());
        let key = (b.app, b.version);
        if let Some(n) = s.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                s.remove(&key);
            }
        }
    }

    /// Versions of `app` that a scheduled message will activate.
    pub fn scheduled_versions(&self, app: &str) -> HashSet<String> {
        let s = self.scheduled.lock().unwrap_or_else(|p| p.into_inner());
        s.keys().filter(|(a, _)| a == app).map(|(_, v)| v.clone()).collect()
    }

    /// Whether any version of `app` is being staged right now.
    pub fn is_staging_app(&self, app: &str) -> bool {
        let s = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        s.running.iter().any(|(a, _)| a == app)
    }

    /// Whether (app, version) is being staged right now.
    pub fn is_staging(&self, app: &str, version: &str) -> bool {
        let s = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        s.running.contains(&(app.to_string(), version.to_string()))
    }

    pub fn send_release(&self, msg: ReleaseUp) {
        if let Some(tx) = self.release_tx.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(msg);
        }
    }
}
