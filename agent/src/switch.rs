//! Activation of an app with a `[service]` (SPEC §9): start the new version beside the
//! live one, prove it (health check against its own port), then move new connections to
//! it (the app's listener, in traffic mode) and `current` with them, run `[switch]
//! command`, and retire the versions that lost their share once their connections have
//! ended. A version that fails its check never receives a connection.
//!
//! The route, which versions run and with what share of new connections, is kept in
//! `DATA/services/<app>.route.json`; at start-up the agent brings back exactly the services
//! it names (adopting those still running) before anything else.

use crate::activate::{hook_exec, Activation};
use crate::hooks::{self, ArtifactConfig};
use crate::host::{Host, Layout};
use crate::service::{Instance, Spec};
use crate::traffic::{Listener, Route};
use serde::{Deserialize, Serialize};
use stagehand_common::activate::{Refusal, FULL_TRAFFIC};
use stagehand_common::fsx;
use stagehand_common::protocol::{Receipt, ReceiptOutcome};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// The versions of an app that run, with their shares of new connections.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteFile {
    pub versions: Vec<(String, u8)>,
}

/// What an activation in flight replaces, written before it changes `current` or the
/// route: an agent killed before the outcome puts this route back at start-up.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Pending {
    seq: u64,
    before: Vec<(String, u8)>,
}

fn pending_path(layout: &Layout, app: &str) -> PathBuf {
    layout.data_dir.join("services").join(format!("{app}.pending.json"))
}

fn route_path(layout: &Layout, app: &str) -> PathBuf {
    layout.data_dir.join("services").join(format!("{app}.route.json"))
}

pub fn load_route(layout: &Layout, app: &str) -> Option<RouteFile> {
    let path = route_path(layout, app);
    let bytes = fsx::read_limited(&path, 64 << 10).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            error!(%app, path = %path.display(), error = %e, "The route file is unreadable; the live version takes all traffic.");
            None
        }
    }
}

fn save_route(layout: &Layout, app: &str, route: &RouteFile) -> std::io::Result<()> {
    save_json(&route_path(layout, app), route)
}

/// How a version's service runs on this host.
pub fn spec(layout: &Layout, app: &str, version: &str, config: &ArtifactConfig) -> Result<Spec, String> {
    let svc = config.service.as_ref().ok_or("no [service] in stagehand.toml")?;
    Ok(Spec {
        dir: layout.release_dir(app, version),
        start: svc.start.clone(),
        exec: hook_exec(layout, app, version, None)?,
        stop_grace: svc.stop_grace(),
    })
}

/// An app's running versions and its listener, as the host holds them.
#[derive(Default)]
pub struct AppTraffic {
    pub listener: Option<Arc<Listener>>,
    pub route: Vec<(Arc<Instance>, u8)>,
}

impl AppTraffic {
    fn apply(&mut self, route: Vec<(Arc<Instance>, u8)>) {
        if let Some(l) = &self.listener {
            l.set(Route(route.iter().map(|(i, w)| (i.backend.clone(), *w)).collect()));
        }
        self.route = route;
    }

    fn file(&self) -> RouteFile {
        RouteFile { versions: self.route.iter().map(|(i, w)| (i.version.clone(), *w)).collect() }
    }
}

/// What the new route is when `version` gets `weight` of the connections: all of them, or
/// a share beside the version that has the most now.
fn next_route(
    now: &[(Arc<Instance>, u8)],
    new: &Arc<Instance>,
    weight: u8,
) -> (Vec<(Arc<Instance>, u8)>, Option<String>) {
    if weight >= FULL_TRAFFIC {
        return (vec![(new.clone(), FULL_TRAFFIC)], None);
    }
    let stable = now.iter().filter(|(i, _)| i.version != new.version).max_by_key(|(_, w)| *w);
    match stable {
        Some((s, _)) => (vec![(s.clone(), FULL_TRAFFIC - weight), (new.clone(), weight)], None),
        None => (
            vec![(new.clone(), FULL_TRAFFIC)],
            Some(format!("no other version runs to share with, so {} takes every connection", new.version)),
        ),
    }
}

/// Activates a version of an app with a `[service]`.
#[allow(clippy::result_large_err)]
pub(crate) async fn activate(mut a: Activation, config: ArtifactConfig, weight: u8) -> Receipt {
    let host = a.host.clone();
    let (app, version) = (a.app.clone(), a.version.clone());
    let configured = host.layout.app_config(&app).listen;
    let listen = host.listener(&app).is_some();
    if configured.is_some() && !listen {
        let why = format!(
            "agent.toml has listen = {:?} for {app}, and the agent could not listen there (its log says why); \
             nothing was switched",
            configured.unwrap_or_default()
        );
        a.note("traffic", &why);
        return a.finish(ReceiptOutcome::Refused(Refusal::HostError)).await;
    }
    if weight < FULL_TRAFFIC && !listen {
        a.note(
            "traffic",
            &format!("the message gives {version} {weight}% of the traffic, and {app} has no `listen` in agent.toml"),
        );
        return a.finish(ReceiptOutcome::Refused(Refusal::NotTrafficMode)).await;
    }
    if let Some(cmd) = config.hooks.pre_activate.clone() {
        if a.hook("pre_activate", &cmd, &config).await.is_err() {
            return a.finish(ReceiptOutcome::Refused(Refusal::PreActivateFailed)).await;
        }
    }
    // 1. The new version runs beside the old.
    let spec = match spec(&host.layout, &app, &version, &config) {
        Ok(s) => s,
        Err(e) => {
            a.note("service", &e);
            return a.finish(ReceiptOutcome::Refused(Refusal::HostError)).await;
        }
    };
    let svc = config.service.clone().expect("a service app");
    let was_running = host.route_of(&app).iter().any(|(i, _)| i.version == version);
    let instance = match host.services.start(&app, &version, spec).await {
        Ok(i) => i,
        Err(e) => {
            a.note("service", &e);
            return a.finish(ReceiptOutcome::Refused(Refusal::Unhealthy)).await;
        }
    };
    a.note("service", &format!("{version} runs on port {}", instance.port));
    // 2. Proven on its own port before it gets a connection.
    if prove(&mut a, &config, &instance).await.is_err() {
        if !was_running {
            instance.stop(svc.stop_grace()).await;
        }
        a.note("traffic", "left where it was");
        return a.finish(ReceiptOutcome::Refused(Refusal::Unhealthy)).await;
    }
    // 3. `current`, then the route (durable), then new connections move.
    let before = host.route_of(&app);
    let (route, note) = next_route(&before, &instance, weight);
    if let Some(n) = note {
        a.note("traffic", &n);
    }
    let pending = Pending { seq: a.seq, before: before.iter().map(|(i, w)| (i.version.clone(), *w)).collect() };
    if let Err(e) = save_json(&pending_path(&host.layout, &app), &pending) {
        a.note("traffic", &format!("cannot record the activation: {e}"));
        if !was_running {
            instance.stop(svc.stop_grace()).await;
        }
        return a.finish(ReceiptOutcome::Refused(Refusal::HostError)).await;
    }
    let a = match crate::activate::blocking(move || a.switch_now()).await {
        Ok(a) => a,
        Err(r) => {
            if !was_running {
                instance.stop(svc.stop_grace()).await;
            }
            clear_pending(&host.layout, &app);
            return r;
        }
    };
    let mut a = a;
    if let Err(e) = host.set_route(&app, route.clone()) {
        a.note("traffic", &format!("cannot record the route: {e}"));
        return undo(a, &config, &before, &instance, was_running, Refusal::HostError).await;
    }
    let shares: Vec<String> = route.iter().map(|(i, w)| format!("{} {w}%", i.version)).collect();
    a.note("traffic", &format!("new connections: {}", shares.join(", ")));
    // 4. The post-activate hook and the switch command must pass too.
    if let Some(cmd) = config.hooks.post_activate.clone() {
        if a.hook("post_activate", &cmd, &config).await.is_err() {
            return undo(a, &config, &before, &instance, was_running, Refusal::Unhealthy).await;
        }
    }
    if let Some(sw) = &config.switch {
        let previous = before.iter().max_by_key(|(_, w)| *w).map(|(i, _)| i.port);
        if let Err(e) = run_switch(&host, &app, &version, &sw.command, instance.port, previous).await {
            a.note("switch", &e);
            return undo(a, &config, &before, &instance, was_running, Refusal::Unhealthy).await;
        }
        a.note("switch", "ran");
        crate::failpoint::hit("activate-after-switch-command");
    }
    // 5. What lost its share drains, then stops, in the background.
    retire_dropped(&host, &before, &route, &svc, listen);
    let r = a.finish(ReceiptOutcome::Committed).await;
    clear_pending(&host.layout, &app);
    r
}

fn save_json<T: Serialize>(path: &std::path::Path, value: &T) -> std::io::Result<()> {
    fsx::create_dir_all_durable(path.parent().expect("a file in a directory"))?;
    fsx::write_atomic(path, &serde_json::to_vec(value).expect("it encodes"), 0o600)
}

/// Once the outcome is recorded (the journal's intent cleared), the pending record has no
/// more use; one left behind is ignored at start-up (its seq is no intent's).
fn clear_pending(layout: &Layout, app: &str) {
    let _ = std::fs::remove_file(pending_path(layout, app));
}

/// Health check against the version's own port: `[health]` with `PORT` set (and `$PORT`
/// in its url), or without one, the port accepting connections.
async fn prove(a: &mut Activation, config: &ArtifactConfig, instance: &Instance) -> Result<(), ()> {
    let mut exec = match hook_exec(&a.host.layout, &a.app, &a.version, a.previous.as_deref()) {
        Ok(e) => e,
        Err(e) => {
            a.note("health", &e);
            return Err(());
        }
    };
    exec.env.insert("PORT".into(), instance.port.to_string());
    let uid = exec.user.map_or_else(|| rustix::process::geteuid().as_raw(), |(u, _)| u);
    let within = exec.limits.health_timeout().min(Duration::from_secs(30));
    // The port must be the service's own before anything is asked of it: a process of
    // another user that took the port between its choice and the start gets no traffic.
    let checked = match listening(instance.port, uid, within).await {
        Err(e) => Err(e),
        Ok(held) => match &config.health {
            Some(h) => {
                let started = std::time::Instant::now();
                let checked = hooks::check_health(h, &a.release_dir(), &exec).await;
                a.host.metrics.health_check_seconds.observe(started.elapsed().as_secs_f64());
                checked
            }
            None => Ok(held),
        },
    };
    match checked {
        Ok(out) => {
            a.note("health", &out);
            Ok(())
        }
        Err(e) => {
            a.note("health", &e);
            Err(())
        }
    }
}

/// Waits until the service (a socket of its uid, and of no other) listens on the port.
async fn listening(port: u16, uid: u32, within: Duration) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let held = crate::service::port_owned(port, uid);
        match held {
            Ok(()) => return Ok(format!("port {port} is listened on by the service")),
            Err(e) if e.contains("held by") => return Err(e),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("{e} after {}", humantime::format_duration(within)))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Puts the route and `current` back as they were and stops the new version (unless it
/// ran before this activation).
async fn undo(
    mut a: Activation,
    config: &ArtifactConfig,
    before: &[(Arc<Instance>, u8)],
    instance: &Arc<Instance>,
    was_running: bool,
    why: Refusal,
) -> Receipt {
    let host = a.host.clone();
    let a_app = a.app.clone();
    if let Err(e) = host.set_route(&a.app, before.to_vec()) {
        a.note("revert", &format!("cannot record the route: {e}"));
    }
    let mut log = std::mem::take(&mut a.log);
    crate::activate::revert(&host, &a.app, a.previous.as_deref(), &mut log).await;
    a.log = log;
    if let (Some(sw), Some((old, _))) = (&config.switch, before.iter().max_by_key(|(_, w)| *w)) {
        if let Err(e) = run_switch(&host, &a.app, &old.version, &sw.command, old.port, Some(instance.port)).await {
            a.note("revert switch", &e);
        }
    }
    if !was_running {
        let grace = config.service.as_ref().map_or(Duration::from_secs(10), |s| s.stop_grace());
        instance.stop(grace).await;
    }
    let r = a.finish(ReceiptOutcome::Refused(why)).await;
    clear_pending(&host.layout, &a_app);
    r
}

/// Retires the versions of `before` that `after` no longer routes to.
fn retire_dropped(
    host: &Host,
    before: &[(Arc<Instance>, u8)],
    after: &[(Arc<Instance>, u8)],
    svc: &hooks::Service,
    counted: bool,
) {
    for (old, _) in before {
        if after.iter().any(|(i, _)| Arc::ptr_eq(i, old)) {
            continue;
        }
        info!(app = %old.app, version = %old.version, open = old.backend.connections(), "Draining the version.");
        host.services.retire(old.clone(), svc.drain(), svc.stop_grace(), counted);
    }
}

/// `[switch] command`, in the new version's directory, with its port.
async fn run_switch(
    host: &Host,
    app: &str,
    version: &str,
    cmd: &str,
    port: u16,
    previous_port: Option<u16>,
) -> Result<String, String> {
    let mut exec = hook_exec(&host.layout, app, version, None)?;
    exec.env.insert("PORT".into(), port.to_string());
    exec.env.insert("STAGEHAND_PORT".into(), port.to_string());
    exec.env.insert("STAGEHAND_PREVIOUS_PORT".into(), previous_port.map(|p| p.to_string()).unwrap_or_default());
    exec.env.insert("STAGEHAND_CURRENT".into(), host.layout.current(app).display().to_string());
    hooks::run(cmd, &host.layout.release_dir(app, version), &exec, Duration::from_secs(60)).await
}

/// At start-up, before any activation: binds every app's listener, and brings back the
/// services its route names (adopting those still running), or, for an app with a
/// service and no route yet, the live version's.
pub async fn restore(host: &Arc<Host>) {
    for app in host.layout.apps() {
        let cfg = host.layout.app_config(&app);
        let mut t = AppTraffic::default();
        if let Some(addr) = &cfg.listen {
            match addr.parse::<std::net::SocketAddr>() {
                Ok(addr) => match Listener::bind(&app, addr).await {
                    Ok(l) => t.listener = Some(l),
                    Err(e) => warn!(%app, %addr, error = %e, "Cannot listen for the app's traffic."),
                },
                Err(e) => warn!(%app, addr = %addr, error = %e, "`listen` is not an address."),
            }
        }
        // An activation the agent did not finish: the route it replaced comes back (and
        // `recover` puts `current` back and reports it interrupted).
        let in_flight = crate::journal::Journal::load(&host.layout.journal(&app)).ok().and_then(|j| j.intent);
        let pending = fsx::read_limited(&pending_path(&host.layout, &app), 64 << 10)
            .ok()
            .and_then(|b| serde_json::from_slice::<Pending>(&b).ok());
        let mut interrupted = false;
        let versions = match (pending, in_flight) {
            (Some(p), Some(i)) if p.seq == i.seq => {
                warn!(%app, seq = p.seq, "An activation was interrupted; its route is put back.");
                if let Err(e) = save_route(&host.layout, &app, &RouteFile { versions: p.before.clone() }) {
                    error!(%app, error = %e, "Cannot record the route.");
                }
                interrupted = true;
                p.before
            }
            _ => match load_route(&host.layout, &app) {
                Some(r) => r.versions,
                None => host.layout.active(&app).map(|v| vec![(v, FULL_TRAFFIC)]).unwrap_or_default(),
            },
        };
        clear_pending(&host.layout, &app);
        let mut keep = Vec::new();
        let mut grace = Duration::from_secs(10);
        for (v, w) in &versions {
            let Ok(config) = ArtifactConfig::load(&host.layout.release_dir(&app, v)) else { continue };
            let Some(svc) = &config.service else { continue };
            grace = svc.stop_grace();
            match spec(&host.layout, &app, v, &config) {
                Ok(s) => keep.push((v.clone(), s, *w)),
                Err(e) => warn!(%app, version = %v, error = %e, "Cannot start the service."),
            }
        }
        let specs: Vec<_> = keep.iter().map(|(v, s, _)| (v.clone(), s.clone())).collect();
        let running = host.services.restore(&app, &specs, grace).await;
        let route: Vec<_> = keep
            .iter()
            .filter_map(|(v, _, w)| running.iter().find(|(i, _)| &i.version == v).map(|(i, _)| (i.clone(), *w)))
            .collect();
        t.apply(route);
        if t.listener.is_some() || !t.route.is_empty() {
            host.set_traffic(&app, t);
        }
        // A proxy in front (`[switch] command`) must point at the version that is live once
        // start-up is done: the one an interrupted activation replaced (the proxy may have been
        // told of the new one already), or the live one when its service has another port now.
        let live = if interrupted {
            versions.iter().max_by_key(|(_, w)| *w).map(|(v, _)| v.clone())
        } else {
            host.layout.active(&app)
        };
        let target = running.iter().find(|(i, _)| live.as_deref() == Some(i.version.as_str()));
        if let Some((i, moved_from)) = target.filter(|(_, moved)| interrupted || moved.is_some()) {
            let switch = ArtifactConfig::load(&host.layout.release_dir(&app, &i.version)).ok().and_then(|c| c.switch);
            if let Some(sw) = switch {
                warn!(%app, version = %i.version, port = i.port, "Telling the proxy in front where the live version is ([switch] command).");
                if let Err(e) = run_switch(host, &app, &i.version, &sw.command, i.port, *moved_from).await {
                    error!(%app, version = %i.version, error = %e, "[switch] command failed: the proxy in front may point elsewhere.");
                }
            }
        }
    }
}

/// After a version without a `[service]` was committed: the services of the app's route,
/// if any, are retired and the route emptied.
pub(crate) fn leave_service_mode(host: &Host, app: &str, version: &str) {
    let before = host.route_of(app);
    if before.is_empty() || before.iter().any(|(i, _)| i.version == version) {
        return;
    }
    let service = ArtifactConfig::load(&host.layout.release_dir(app, version)).is_ok_and(|c| c.service.is_some());
    if service {
        return;
    }
    if let Err(e) = host.set_route(app, Vec::new()) {
        error!(%app, error = %e, "Cannot record the route.");
        return;
    }
    for (i, _) in before {
        info!(%app, version = %i.version, "The live version runs no service; stopping this one.");
        let grace = Duration::from_secs(10);
        host.services.retire(i, Duration::ZERO, grace, false);
    }
}

impl Host {
    /// The versions an app routes to now.
    pub fn route_of(&self, app: &str) -> Vec<(Arc<Instance>, u8)> {
        self.traffic().get(app).map(|t| t.route.clone()).unwrap_or_default()
    }

    /// Records the route durably, then moves new connections.
    pub fn set_route(&self, app: &str, route: Vec<(Arc<Instance>, u8)>) -> std::io::Result<()> {
        let mut all = self.traffic();
        let t = all.entry(app.to_string()).or_default();
        let before = std::mem::take(&mut t.route);
        t.route = route;
        if let Err(e) = save_route(&self.layout, app, &t.file()) {
            t.route = before;
            return Err(e);
        }
        let route = std::mem::take(&mut t.route);
        t.apply(route);
        Ok(())
    }

    /// Stops listening and supervising, leaving the services running (for the next agent
    /// to adopt).
    pub fn detach_traffic(&self) {
        for t in self.traffic().values() {
            if let Some(l) = &t.listener {
                l.close();
            }
        }
        self.services.detach();
    }

    /// The app's listener address, if it is in traffic mode here.
    pub fn listener(&self, app: &str) -> Option<std::net::SocketAddr> {
        self.traffic().get(app).and_then(|t| t.listener.as_ref().map(|l| l.addr))
    }
}
