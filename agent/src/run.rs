//! The agent daemon: dials the controller on the deploy and release channels (separate QUIC
//! connections, reconnecting with backoff and jitter), and listens on a local socket for
//! `stagehand-agent activate`.

use crate::activate;
use crate::host::Host;
use crate::journal::Journal;
use crate::stage::{self, Order};
use anyhow::{bail, Context, Result};
use rand::Rng;
use stagehand_common::activate::{SignedActivate, EXPORT_LIMIT};
use stagehand_common::frame::{self, read_blob, read_msg, write_msg};
use stagehand_common::net;
use stagehand_common::protocol::{
    AppState, DeployDown, DeployUp, ReleaseDown, ReleaseUp, StageOutcome, ALPN_DEPLOY, ALPN_RELEASE, PROTOCOL_VERSION,
};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// An agent running in this process.
pub struct RunningAgent {
    pub host: Arc<Host>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningAgent {
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        // Services run on, to be adopted by the next agent (as after a crash); this one
        // stops watching them, and stops listening.
        self.host.detach_traffic();
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = std::fs::remove_file(self.host.layout.socket());
        if let Err(e) = self.host.store.flush() {
            warn!(error = %e, "Could not flush state at shutdown.");
        }
        // Work on the blocking pool (a removal, a fetch being written) cannot be aborted: the
        // data directory (and its database's lock) is free once it has let go of the host.
        let host = Arc::downgrade(&self.host);
        drop(self.host);
        let deadline = Instant::now() + Duration::from_secs(30);
        while host.strong_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Opens the data directory, recovers, and starts the channels and the local socket.
pub async fn start(data_dir: &Path) -> Result<RunningAgent> {
    raise_nofile();
    let host = Arc::new(Host::open(data_dir)?);
    // The services the routes name, and the listeners, before anything can activate.
    crate::switch::restore(&host).await;
    activate::recover(&host).await;
    {
        // Trees a crash left half-removed; after recovery, so that it is not delayed.
        let host = host.clone();
        tokio::task::spawn_blocking(move || crate::prune::leftovers(&host)).await?;
    }
    let socket = bind_socket(&host)?;
    let metrics = match host.layout.config.metrics_listen.as_deref().map(str::parse::<std::net::SocketAddr>) {
        Some(Ok(addr)) => {
            let h = Arc::downgrade(&host);
            let render = Arc::new(move || h.upgrade().map(|h| h.metrics.render(&h.layout)).unwrap_or_default());
            let (bound, task) = stagehand_common::http::serve_metrics(addr, render)
                .await
                .with_context(|| format!("listening for metrics on {addr} (metrics_listen in agent.toml)"))?;
            info!(addr = %bound, "Serving metrics.");
            Some(task)
        }
        _ => None,
    };
    let (sched_tx, mut sched_rx) = mpsc::unbounded_channel::<(u64, SignedActivate)>();
    host.set_scheduler(sched_tx);
    let scheduler = {
        let host = host.clone();
        tokio::spawn(async move {
            // Owned here: stopping the scheduler stops the messages it holds.
            let mut waiting = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    next = sched_rx.recv() => {
                        let Some((until, msg)) = next else { break };
                        let host = host.clone();
                        waiting.spawn(async move {
                            let wait = until.saturating_sub(stagehand_common::ids::now_secs());
                            tokio::time::sleep(Duration::from_secs(wait)).await;
                            // Signed by a key retired while it waited: the controller sends the
                            // message again, signed anew; this copy is dropped, unanswered.
                            if !host.signed_by_pinned(&msg) {
                                info!("A scheduled message's release key was retired meanwhile; dropped.");
                                host.unschedule(&msg);
                                return;
                            }
                            // Retention keeps the version until the activation is done with it.
                            activate::handle(&host, msg.clone()).await;
                            host.unschedule(&msg);
                        });
                    }
                    Some(_) = waiting.join_next(), if !waiting.is_empty() => {}
                }
            }
        })
    };
    info!(agent = %host.identity.id, env = %host.identity.env, controller = %host.layout.config.controller, "Agent starting.");
    let tasks = vec![
        tokio::spawn(channel_loop(host.clone(), ALPN_DEPLOY, |h, c| Box::pin(deploy_session(h, c)))),
        tokio::spawn(channel_loop(host.clone(), ALPN_RELEASE, |h, c| Box::pin(release_session(h, c)))),
        tokio::spawn(serve_socket(host.clone(), socket)),
        scheduler,
    ];
    let tasks = tasks.into_iter().chain(metrics).collect();
    Ok(RunningAgent { host, tasks })
}

/// Forwarded connections take six descriptors each: the soft limit goes up to the hard one.
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            debug!(error = %e, "Cannot raise the open-file limit.");
        }
    }
}

/// The agent stopped for good: revoked, removed, or its certificate expired. Its exit
/// status is 3, which the systemd unit does not restart (SPEC §11).
#[derive(Debug)]
pub struct StoppedForGood(pub String);

impl std::fmt::Display for StoppedForGood {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoppedForGood {}

/// The exit status of an agent that stopped for good.
pub const EXIT_STOPPED_FOR_GOOD: i32 = 3;

/// Runs until `shutdown` completes, or until the agent must stop for good
/// ([`StoppedForGood`]).
pub async fn run(data_dir: &Path, shutdown: impl Future<Output = ()>) -> Result<()> {
    let agent = start(data_dir).await?;
    let mut stop = agent.host.stopped_for_good();
    let why = tokio::select! {
        _ = shutdown => None,
        why = stop.wait_for(Option::is_some) => why.ok().and_then(|w| w.clone()),
    };
    match &why {
        None => info!("Shutting down."),
        Some(why) => error!("{why}"),
    }
    agent.stop().await;
    match why {
        None => Ok(()),
        Some(why) => Err(StoppedForGood(why).into()),
    }
}

/// Why this agent may never connect again, if so: told it is revoked, or its certificate
/// has expired (it cannot be renewed any more).
fn stop_reason(host: &Host, conn: Option<&quinn::Connection>) -> Option<String> {
    let me = format!("{} ({})", host.identity.id, host.identity.name);
    let next = format!(
        "to enrol this host again, create a token (`stagehand token create --env {}`) and run `stagehand-agent join` \
         with a new data directory",
        host.identity.env
    );
    if let Some(quinn::ConnectionError::ApplicationClosed(c)) = conn.and_then(|c| c.close_reason()) {
        if c.error_code == quinn::VarInt::from_u32(stagehand_common::protocol::CLOSE_REVOKED) {
            return Some(format!(
                "the controller revoked agent {me}; it stops and does not reconnect (exit status 3); {next}"
            ));
        }
    }
    let until = stagehand_common::tls::validity(&host.credentials().me.cert_pem).map(|(_, until)| until).ok()?;
    (until <= stagehand_common::ids::now_secs() as i64).then(|| {
        format!(
            "the certificate of agent {me} expired at {} (unix) before it could be renewed; it stops (exit status 3); \
             {next}",
            until
        )
    })
}

type Session = std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send>>;

async fn channel_loop(host: Arc<Host>, alpn: &'static [u8], session: fn(Arc<Host>, quinn::Connection) -> Session) {
    let name = String::from_utf8_lossy(alpn).into_owned();
    let mut backoff = BACKOFF_MIN;
    // Said once per outage (at warn), then at debug until a channel is up again.
    let mut told = false;
    loop {
        let started = Instant::now();
        if let Some(why) = stop_reason(&host, None) {
            host.stop_for_good(why);
            return;
        }
        let at = *host.controller_at.borrow();
        match connect(&host, alpn, at).await {
            Ok((conn, endpoint)) => {
                told = false;
                // The other channel moved both on to another controller: follow it.
                let mut moved = host.controller_at.subscribe();
                let result = tokio::select! {
                    r = session(host.clone(), conn.clone()) => r,
                    _ = moved.wait_for(|now| *now != at) => Err(anyhow::anyhow!("following the other channel to another controller")),
                };
                if let Some(why) = stop_reason(&host, Some(&conn)) {
                    host.stop_for_good(why);
                    return;
                }
                // A controller that does not know this agent (one that shares no state with
                // the others): the next one may.
                match conn.close_reason() {
                    Some(quinn::ConnectionError::ApplicationClosed(c))
                        if c.error_code == quinn::VarInt::from_u32(stagehand_common::protocol::CLOSE_UNAUTHORISED) =>
                    {
                        move_on(&host, at)
                    }
                    // It went silent for the whole idle timeout (a host down, a process killed):
                    // the next controller is tried at once rather than this one again.
                    Some(quinn::ConnectionError::TimedOut) => move_on(&host, at),
                    _ => {}
                }
                conn.close(0u32.into(), b"session over");
                match result {
                    Ok(()) => info!(channel = %name, "Channel closed."),
                    Err(e) => warn!(channel = %name, error = %format!("{e:#}"), "Channel lost."),
                }
                drop(endpoint);
            }
            Err(e) if !told => {
                told = true;
                warn!(channel = %name, controller = %host.layout.config.controller, error = %format!("{e:#}"),
                    "Cannot reach the controller; retrying every few seconds.")
            }
            Err(e) => {
                debug!(channel = %name, error = %format!("{e:#}"), "Cannot reach the controller.")
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

/// With several controllers, how long one may take to answer before the next is tried (a
/// host that is down sends nothing back; QUIC alone would wait out its 30 s idle timeout).
/// Longer than a controller keeps a connection in its handshake queue (15 s), so that
/// during a reconnect storm agents wait their turn instead of hopping between controllers.
pub const FAILOVER_AFTER: Duration = Duration::from_secs(20);

/// Moves both channels on from the controller at `at` to the next (once, whichever channel
/// finds it unreachable first).
fn move_on(host: &Host, at: u64) {
    if host.layout.config.controller.addrs().len() > 1 {
        host.controller_at.send_if_modified(|now| {
            let moved = *now == at;
            if moved {
                *now += 1;
            }
            moved
        });
    }
}

/// Connects to controller `at` (of agent.toml's, modulo their number). When it cannot be
/// reached, both channels move on to the next (the caller backs off before trying it); a
/// failure of this host's own (a socket, its credentials) moves nothing.
async fn connect(host: &Host, alpn: &[u8], at: u64) -> Result<(quinn::Connection, quinn::Endpoint)> {
    let all = host.layout.config.controller.addrs();
    let target = &all[(at % all.len() as u64) as usize];
    let reach = async {
        let addr = net::resolve(target).await.map_err(|e| (true, e.into()))?;
        let endpoint = net::client_endpoint(addr).map_err(|e| (false, e.into()))?;
        let config = host.credentials().client_config(alpn).map_err(|e| (false, e.into()))?;
        let config = net::client_config(config).map_err(|e| (false, e.into()))?;
        let conn = net::connect(&endpoint, addr, config).await.map_err(|e| (true, e.into()))?;
        Ok((conn, endpoint))
    };
    let result: Result<_, (bool, anyhow::Error)> = if all.len() > 1 {
        tokio::time::timeout(FAILOVER_AFTER, reach)
            .await
            .unwrap_or_else(|_| Err((true, anyhow::anyhow!("no answer from {target} within {FAILOVER_AFTER:?}"))))
    } else {
        reach.await
    };
    result.map_err(|(unreachable, e)| {
        if unreachable {
            move_on(host, at);
        }
        e
    })
}

async fn deploy_session(host: Arc<Host>, conn: quinn::Connection) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_msg(&mut send, &DeployUp::Hello { protocol_version: PROTOCOL_VERSION }).await?;
    match read_msg::<_, DeployDown, { frame::CONTROL_LIMIT }>(&mut recv).await? {
        Some(DeployDown::Hello { .. }) => {}
        Some(DeployDown::Goodbye { reason }) => {
            bail!("the controller refused the deploy channel: {reason}")
        }
        other => bail!("expected hello, got {other:?}"),
    }
    info!("Deploy channel up.");
    write_msg(&mut send, &DeployUp::Inventory { staged: host.inventory() }).await?;
    write_msg(&mut send, &DeployUp::About { version: env!("CARGO_PKG_VERSION").to_string() }).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<DeployUp>();
    host.set_deploy(Some((tx, conn.clone())));
    // Verify results go on this session, after the inventory.
    crate::verify::after_connect(&host);
    let writer = async {
        while let Some(msg) = rx.recv().await {
            write_msg(&mut send, &msg).await?;
        }
        anyhow::Ok(())
    };
    let reader = async {
        while let Some(msg) = read_msg::<_, DeployDown, { frame::CONTROL_LIMIT }>(&mut recv).await? {
            match msg {
                DeployDown::Stage { app, version, digest, .. } => {
                    if !host.begin_staging(&app, &version) {
                        continue;
                    }
                    let host = host.clone();
                    tokio::spawn(async move {
                        let order = Order { app: app.clone(), version: version.clone(), digest };
                        // Stage on whichever session is up; go again if it failed and the
                        // controller asked again meanwhile (a reconnect during the transfer).
                        loop {
                            let Some(conn) = host.deploy_conn() else {
                                host.end_staging(&app, &version, false);
                                return;
                            };
                            let outcome = stage::stage(host.clone(), conn, order.clone()).await;
                            let failed = matches!(outcome, StageOutcome::Failed { .. });
                            if host.end_staging(&app, &version, failed) {
                                continue;
                            }
                            host.metrics.staging(&outcome);
                            host.send_deploy(DeployUp::StageReport {
                                app: app.clone(),
                                version: version.clone(),
                                digest,
                                outcome,
                            });
                            if !failed {
                                // In the background, its result after the report (SPEC §14).
                                crate::verify::after_staging(&host, &app, &version, digest);
                                crate::prune::after_staging(&host, &app, &version).await;
                            }
                            return;
                        }
                    });
                }
                DeployDown::Renewed { cert_pem } => {
                    let host = host.clone();
                    tokio::task::spawn_blocking(move || match host.renewed(cert_pem) {
                        Ok(()) => info!("Certificate renewed; new connections use it."),
                        Err(e) => warn!(error = %format!("{e:#}"), "Could not keep the renewed certificate."),
                    })
                    .await?;
                }
                DeployDown::Goodbye { reason } => {
                    bail!("the controller closed the deploy channel: {reason}")
                }
                DeployDown::Hello { .. } => bail!("second hello"),
            }
        }
        anyhow::Ok(())
    };
    let result = tokio::select! {
        r = writer => r,
        r = reader => r,
        r = renewer(&host) => r,
    };
    host.set_deploy(None);
    result
}

/// Asks for a new certificate once two thirds of the current one's lifetime have passed
/// (and again a minute later while no answer came).
async fn renewer(host: &Host) -> Result<()> {
    loop {
        let at = stagehand_common::tls::renew_at(&host.credentials().me.cert_pem)?;
        let now = stagehand_common::ids::now_secs() as i64;
        if now < at {
            tokio::time::sleep(Duration::from_secs((at - now).clamp(1, 3600) as u64)).await;
            continue;
        }
        // The same key and request until an answer comes: whichever session carries the
        // answer, it is for this key.
        let csr_der = match host.pending_request() {
            Some(csr) => csr,
            None => {
                let (key_pem, csr_der) = stagehand_common::tls::new_csr()?;
                host.set_pending(key_pem, csr_der.clone());
                csr_der
            }
        };
        host.send_deploy(DeployUp::Renew { csr_der });
        info!("Asked the controller for a new certificate.");
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

/// Per app: what is live and the last seq applied.
pub fn app_states(host: &Host) -> Vec<AppState> {
    host.layout
        .apps()
        .into_iter()
        .map(|app| AppState {
            active: host.layout.active(&app),
            last_seq: Journal::load(&host.layout.journal(&app)).ok().and_then(|j| j.last_seq),
            app,
        })
        .collect()
}

async fn release_session(host: Arc<Host>, conn: quinn::Connection) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_msg(&mut send, &ReleaseUp::Hello { protocol_version: PROTOCOL_VERSION }).await?;
    match read_msg::<_, ReleaseDown, { frame::CONTROL_LIMIT }>(&mut recv).await? {
        Some(ReleaseDown::Hello { .. }) => {}
        Some(ReleaseDown::Goodbye { reason }) => {
            bail!("the controller refused the release channel: {reason}")
        }
        other => bail!("expected hello, got {other:?}"),
    }
    info!("Release channel up.");
    let (tx, mut rx) = mpsc::unbounded_channel::<ReleaseUp>();
    // Receipts the controller may have missed while we were apart, then our state.
    for app in host.layout.apps() {
        if let Some(r) = Journal::load(&host.layout.journal(&app)).ok().and_then(|j| j.last_receipt) {
            let _ = tx.send(ReleaseUp::Receipt(r));
        }
    }
    let _ = tx.send(ReleaseUp::State { apps: app_states(&host) });
    let _ = tx.send(host.policy.report());
    host.set_release_tx(Some(tx));
    let writer = async {
        while let Some(msg) = rx.recv().await {
            write_msg(&mut send, &msg).await?;
        }
        anyhow::Ok(())
    };
    let reader = async {
        while let Some(msg) = read_msg::<_, ReleaseDown, { frame::CONTROL_LIMIT }>(&mut recv).await? {
            match msg {
                ReleaseDown::Activate(m) => {
                    let host = host.clone();
                    tokio::spawn(async move {
                        activate::handle(&host, m).await;
                    });
                }
                ReleaseDown::Goodbye { reason } => {
                    bail!("the controller closed the release channel: {reason}")
                }
                ReleaseDown::Hello { .. } => bail!("second hello"),
                // Applied before the next message is read: a message the new key signed
                // finds it pinned.
                ReleaseDown::KeyChanges(chain) => {
                    let host = host.clone();
                    tokio::task::spawn_blocking(move || host.apply_key_changes(&chain))
                        .await
                        .context("applying release key changes")??;
                }
                // In force before the next message is read, as key changes are.
                ReleaseDown::Policy(signed) => {
                    let h = host.clone();
                    let verify_before = host.policy.get().verify;
                    let changed = tokio::task::spawn_blocking(move || h.policy.offer(&signed, &h.release_keys()))
                        .await
                        .context("applying a release policy")??;
                    if changed {
                        host.send_release(host.policy.report());
                    }
                    // Verification asked for from now on: what is staged is verified now.
                    if !verify_before && host.policy.get().verify {
                        crate::verify::after_connect(&host);
                    }
                }
                ReleaseDown::Preview(p) => {
                    let host = host.clone();
                    tokio::spawn(async move { crate::preview::handle(&host, p).await });
                }
            }
        }
        anyhow::Ok(())
    };
    let result = tokio::select! {
        r = writer => r,
        r = reader => r,
    };
    host.set_release_tx(None);
    result
}

fn bind_socket(host: &Host) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = host.layout.socket();
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The local socket: an export file's text in, `Result<Receipt, String>` out.
async fn serve_socket(host: Arc<Host>, listener: tokio::net::UnixListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let host = host.clone();
        tokio::spawn(async move {
            let reply = match read_blob::<_, { EXPORT_LIMIT as usize }>(&mut stream).await {
                Ok(Some(Some(bytes))) => match SignedActivate::from_export_with(&String::from_utf8_lossy(&bytes)) {
                    Ok((msg, chain)) => match host
                        .apply_key_changes(&chain)
                        .and_then(|_| crate::policy::offer_from_export(&host, &String::from_utf8_lossy(&bytes)))
                    {
                        Ok(_) => Ok(activate::handle(&host, msg).await),
                        Err(e) => Err(format!("pinning the release key changes the file carries: {e:#}")),
                    },
                    Err(e) => Err(e),
                },
                Ok(_) => Err("empty request".to_string()),
                Err(e) => Err(e.to_string()),
            };
            let _ = write_msg(&mut stream, &reply).await;
        });
    }
}
