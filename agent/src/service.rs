//! Supervised services (SPEC §9): the process an artifact's `[service]` names, one per
//! (app, version), started from its release directory with `PORT` set to a free loopback
//! port. A crash is followed by a restart with backoff; a stop is SIGTERM to the service's
//! process group, then SIGKILL after `stop_grace`.
//!
//! Every running service has a record, `DATA/services/<app>/<version>.json` (pid, the
//! kernel's start time of that pid, port), written before the agent relies on it. The agent
//! can stop, crash or be killed while its services run on: the next agent adopts each one
//! the record still matches (same pid, same start time, not a zombie) and watches it
//! through a pidfd, and stops any that no longer has a place in the app's route. A service
//! is never started twice, nor left running unsupervised by a live agent.
//!
//! Output goes straight to `DATA/logs/<app>/<version>.log` (opened with O_APPEND, so it
//! survives the agent), kept under [`LOG_LIMIT`] by copying it to `.log.1` and truncating.

use crate::hooks::Exec;
use crate::traffic::Backend;
use serde::{Deserialize, Serialize};
use stagehand_common::fsx;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// A log file is rotated (copied to `.log.1`, truncated) past this size.
pub const LOG_LIMIT: u64 = 4 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The environment variable that marks a service's processes.
const MARK: &str = "STAGEHAND_SERVICE";
/// A run this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// How one version's service runs.
#[derive(Clone, Debug)]
pub struct Spec {
    pub dir: PathBuf,
    pub start: String,
    /// The hook environment (`STAGEHAND_*`, the app's `env`, `PATH`), the user, the limits;
    /// `PORT` is added here.
    pub exec: Exec,
    pub stop_grace: Duration,
}

/// What a record on disk says of a running service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub port: u16,
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat`: tells this process from a later one with the same pid.
    pub start_time: u64,
}

/// One version's running service.
pub struct Instance {
    pub app: String,
    pub version: String,
    pub port: u16,
    /// What the app's listener forwards to, and counts connections on.
    pub backend: Arc<Backend>,
    /// Set (with the grace) when a stop is asked for.
    stop: watch::Sender<Option<Duration>>,
    done: watch::Sender<bool>,
    pub restarts: AtomicU32,
}

impl Instance {
    /// Stops the service (SIGTERM to its group, SIGKILL after the grace) and waits until
    /// it is gone and its record removed.
    pub async fn stop(&self, grace: Duration) {
        self.begin_stop(grace);
        let _ = self.done.subscribe().wait_for(|d| *d).await;
        self.backend.cut();
    }

    fn begin_stop(&self, grace: Duration) {
        self.stop.send_if_modified(|s| {
            let first = s.is_none();
            if first {
                *s = Some(grace);
            }
            first
        });
    }

    fn stopping(&self) -> bool {
        self.stop.borrow().is_some()
    }
}

type Key = (String, String);

/// Every supervised service of this agent.
pub struct Services {
    dir: PathBuf,
    logs: PathBuf,
    inner: Mutex<Inner>,
    /// Set when this agent lets go of its services (they run on, for the next to adopt).
    detached: watch::Sender<bool>,
}

#[derive(Default)]
struct Inner {
    instances: HashMap<Key, Arc<Instance>>,
    /// Versions draining before their stop; the flag cancels the stop (the version is
    /// wanted again).
    retiring: HashMap<Key, Arc<AtomicBool>>,
}

impl Services {
    pub fn new(data_dir: &Path) -> Self {
        Services {
            dir: data_dir.join("services"),
            logs: data_dir.join("logs"),
            inner: Mutex::default(),
            detached: watch::Sender::new(false),
        }
    }

    /// Stops supervising without stopping anything: the records stay for the next agent.
    pub fn detach(&self) {
        self.detached.send_replace(true);
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a service's environment carries ([`MARK`]), so that its processes are found
    /// even without their record.
    fn mark(&self, app: &str, version: &str) -> String {
        format!("{}/{app}/{version}", self.dir.display())
    }

    fn record_path(&self, app: &str, version: &str) -> PathBuf {
        self.dir.join(app).join(format!("{version}.json"))
    }

    /// The log file of a version's service.
    pub fn log_path(&self, app: &str, version: &str) -> PathBuf {
        self.logs.join(app).join(format!("{version}.log"))
    }

    /// The running service of a version, if any (and not being stopped).
    pub fn get(&self, app: &str, version: &str) -> Option<Arc<Instance>> {
        self.inner().instances.get(&(app.to_string(), version.to_string())).filter(|i| !i.stopping()).cloned()
    }

    /// Versions of an app with a service running (or being stopped).
    pub fn running(&self, app: &str) -> Vec<String> {
        self.inner().instances.keys().filter(|(a, _)| a == app).map(|(_, v)| v.clone()).collect()
    }

    /// The version's service, started if it is not running: a running one is reused (and
    /// its retirement, if it was draining, called off), one being stopped is waited for
    /// first.
    pub async fn start(self: &Arc<Self>, app: &str, version: &str, spec: Spec) -> Result<Arc<Instance>, String> {
        let key = (app.to_string(), version.to_string());
        loop {
            let stopping = {
                let mut inner = self.inner();
                if let Some(cancel) = inner.retiring.remove(&key) {
                    cancel.store(true, Ordering::Release);
                }
                match inner.instances.get(&key) {
                    Some(i) if !i.stopping() => return Ok(i.clone()),
                    Some(i) => Some(i.done.subscribe()),
                    None => None,
                }
            };
            match stopping {
                Some(mut done) => {
                    let _ = done.wait_for(|d| *d).await;
                }
                None => break,
            }
        }
        let port = free_port().map_err(|e| format!("no free loopback port: {e}"))?;
        let proc = self.spawn(app, version, &spec, port)?;
        info!(%app, %version, port, pid = proc.pid, "Started the service.");
        Ok(self.supervise(app, version, spec, port, Some(proc)))
    }

    /// At start-up: each recorded service of `app` whose version is in `keep` is adopted if
    /// it still runs, or started again on its port (another when that one is taken); every
    /// other is stopped. Returns the instances of `keep` that are running, each with the
    /// port it had before when it has another now.
    pub async fn restore(
        self: &Arc<Self>,
        app: &str,
        keep: &[(String, Spec)],
        grace: Duration,
    ) -> Vec<(Arc<Instance>, Option<u16>)> {
        let mut out = Vec::new();
        let dir = self.dir.join(app);
        let records: Vec<(String, Option<Record>)> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let version = name.strip_suffix(".json")?.to_string();
                        let record = fsx::read_limited(&e.path(), 4096)
                            .ok()
                            .and_then(|b| serde_json::from_slice::<Record>(&b).ok());
                        if record.is_none() {
                            warn!(%app, %version, path = %e.path().display(), "An unreadable service record; its process (if any) is found by its mark.");
                        }
                        Some((version, record))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut adopted = Vec::new();
        for (version, record) in &records {
            let wanted = keep.iter().find(|(v, _)| v == version);
            let alive = record.as_ref().and_then(|r| Proc::adopt(r).ok());
            match (wanted, alive, record) {
                (Some((_, spec)), Some(proc), Some(r)) => {
                    info!(%app, %version, pid = r.pid, port = r.port, "Adopted the running service.");
                    adopted.push(r.pid);
                    let i = self.supervise(app, version, spec.clone(), r.port, Some(proc));
                    watch_port(&i, spec);
                    out.push((i, None));
                }
                (Some((_, spec)), None, Some(r)) => {
                    warn!(%app, %version, "The service was not running; starting it again.");
                    let port = if port_free(r.port) { r.port } else { free_port().unwrap_or(r.port) };
                    let proc = self.spawn(app, version, spec, port);
                    if let Err(e) = &proc {
                        error!(%app, %version, error = %e, "Cannot start the service; retrying with backoff.");
                    }
                    let i = self.supervise(app, version, spec.clone(), port, proc.ok());
                    watch_port(&i, spec);
                    out.push((i, (port != r.port).then_some(r.port)));
                }
                (None, Some(mut proc), _) => {
                    info!(%app, %version, pid = proc.pid, "Stopping a service no route needs.");
                    proc.terminate(grace).await;
                    let _ = std::fs::remove_file(self.record_path(app, version));
                }
                _ => {
                    let _ = std::fs::remove_file(self.record_path(app, version));
                }
            }
        }
        // Processes of this app's services that no record names (an agent killed between a
        // start and its record, a record lost): found by the mark in their environment.
        for pid in marked(&self.mark(app, "")) {
            if !adopted.contains(&pid) {
                warn!(%app, pid, "Stopping a service process no record names.");
                let _ = rustix::process::kill_process_group(
                    rustix::process::Pid::from_raw(pid).expect("a pid above 1"),
                    rustix::process::Signal::KILL,
                );
            }
        }
        for (version, spec) in keep {
            if records.iter().any(|(v, r)| v == version && r.is_some()) {
                continue;
            }
            match self.start(app, version, spec.clone()).await {
                Ok(i) => out.push((i, None)),
                Err(e) => error!(%app, %version, error = %e, "Cannot start the service."),
            }
        }
        out
    }

    /// Starts one process of a version's service and records it durably.
    fn spawn(&self, app: &str, version: &str, spec: &Spec, port: u16) -> Result<Proc, String> {
        let log = self.log_path(app, version);
        let open_log = || -> std::io::Result<std::fs::File> {
            fsx::create_dir_all_durable(log.parent().expect("a log has a directory"))?;
            std::fs::OpenOptions::new().create(true).append(true).open(&log)
        };
        let out = open_log().map_err(|e| format!("opening {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(&spec.start)
            .current_dir(&spec.dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| crate::hooks::DEFAULT_PATH.into()))
            .envs(&spec.exec.env)
            .env("PORT", port.to_string())
            .env(MARK, self.mark(app, version))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .kill_on_drop(false);
        if let Some((uid, gid)) = spec.exec.user {
            command.uid(uid).gid(gid);
        }
        let child = command.spawn().map_err(|e| format!("cannot start {:?}: {e}", spec.start))?;
        let proc = Proc::own(child).map_err(|e| format!("watching {:?}: {e}", spec.start))?;
        let record = Record { port, pid: proc.pid, start_time: start_time(proc.pid).unwrap_or(0) };
        let path = self.record_path(app, version);
        let written = fsx::create_dir_all_durable(path.parent().expect("a record has a directory"))
            .and_then(|()| fsx::write_atomic(&path, &serde_json::to_vec(&record).expect("a record encodes"), 0o600));
        if let Err(e) = written {
            // Unrecorded, it could be orphaned by a crash: do not let it run.
            let _ = rustix::process::kill_process_group(proc.group(), rustix::process::Signal::KILL);
            return Err(format!("recording the service in {}: {e}", path.display()));
        }
        Ok(proc)
    }

    /// Supervises a version's service from now on: restarts, rotation, stop.
    fn supervise(
        self: &Arc<Self>,
        app: &str,
        version: &str,
        spec: Spec,
        port: u16,
        proc: Option<Proc>,
    ) -> Arc<Instance> {
        let instance = Arc::new(Instance {
            app: app.to_string(),
            version: version.to_string(),
            port,
            backend: Backend::new(version, port),
            stop: watch::Sender::new(None),
            done: watch::Sender::new(false),
            restarts: AtomicU32::new(0),
        });
        self.inner().instances.insert((app.to_string(), version.to_string()), instance.clone());
        let (services, i) = (self.clone(), instance.clone());
        tokio::spawn(async move {
            services.run(&i, spec, proc).await;
            let key = (i.app.clone(), i.version.clone());
            let mut inner = services.inner();
            if inner.instances.get(&key).is_some_and(|x| Arc::ptr_eq(x, &i)) {
                inner.instances.remove(&key);
            }
            drop(inner);
            i.done.send_replace(true);
        });
        instance
    }

    /// Retires a version that no longer gets new connections: once its connections have
    /// ended (in traffic mode) or after `drain` (otherwise), it is stopped, unless it was
    /// started again meanwhile.
    pub fn retire(self: &Arc<Self>, i: Arc<Instance>, drain: Duration, grace: Duration, counted: bool) {
        let key = (i.app.clone(), i.version.clone());
        let cancel = Arc::new(AtomicBool::new(false));
        self.inner().retiring.insert(key.clone(), cancel.clone());
        let services = self.clone();
        tokio::spawn(async move {
            let drained = if counted {
                i.backend.drain(drain).await
            } else {
                tokio::time::sleep(drain).await;
                true
            };
            {
                let mut inner = services.inner();
                if cancel.load(Ordering::Acquire) {
                    return;
                }
                inner.retiring.remove(&key);
                i.begin_stop(grace);
            }
            if !drained {
                warn!(app = %i.app, version = %i.version, open = i.backend.connections(),
                    "Connections were still open at the drain deadline; stopping the version anyway.");
            }
            i.stop(grace).await;
        });
    }

    async fn run(&self, i: &Arc<Instance>, spec: Spec, mut proc: Option<Proc>) {
        let (app, version) = (i.app.as_str(), i.version.as_str());
        let mut stop = i.stop.subscribe();
        let mut detached = self.detached.subscribe();
        let mut backoff = BACKOFF_MIN;
        let log = self.log_path(app, version);
        let mut rotate = tokio::time::interval(Duration::from_secs(1));
        let mut since = Instant::now();
        let grace = loop {
            let Some(p) = proc.as_mut() else {
                // Not running: wait out the backoff, then start it again.
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    g = stop.wait_for(Option::is_some) => break g.ok().and_then(|g| *g),
                    _ = detached.wait_for(|d| *d) => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                match self.spawn(app, version, &spec, i.port) {
                    Ok(p) => {
                        i.restarts.fetch_add(1, Ordering::Relaxed);
                        info!(%app, %version, pid = p.pid, "Restarted the service.");
                        since = Instant::now();
                        proc = Some(p);
                        watch_port(i, &spec);
                    }
                    Err(e) => error!(%app, %version, error = %e, "Cannot restart the service."),
                }
                continue;
            };
            tokio::select! {
                status = p.exited() => {
                    // No connection goes to its port until a process of the service holds it.
                    i.backend.set_up(false);
                    // Whatever it left behind in its group goes too: it would hold the port.
                    let _ = rustix::process::kill_process_group(p.group(), rustix::process::Signal::KILL);
                    if since.elapsed() > STABLE_AFTER {
                        backoff = BACKOFF_MIN;
                    }
                    warn!(%app, %version, %status, backoff = ?backoff, "The service exited; restarting it.");
                    proc = None;
                }
                g = stop.wait_for(Option::is_some) => break g.ok().and_then(|g| *g),
                _ = rotate.tick() => {
                    // A copy of megabytes: off the runtime's threads.
                    let log = log.clone();
                    drop(tokio::task::spawn_blocking(move || rotate_log(&log)));
                }
                _ = detached.wait_for(|d| *d) => return,
            }
        };
        if let Some(mut p) = proc {
            p.terminate(grace.unwrap_or(spec.stop_grace)).await;
        }
        let _ = std::fs::remove_file(self.record_path(app, version));
        info!(%app, %version, "Stopped the service.");
    }
}

/// Copies the log to `.log.1` and truncates it once it is past [`LOG_LIMIT`]; the service
/// keeps writing (O_APPEND) from the start of the emptied file.
fn rotate_log(log: &Path) {
    let Ok(meta) = std::fs::metadata(log) else { return };
    if meta.len() <= LOG_LIMIT {
        return;
    }
    let old = log.with_extension("log.1");
    let copied = std::fs::copy(log, &old)
        .and_then(|_| std::fs::OpenOptions::new().write(true).open(log))
        .and_then(|f| f.set_len(0));
    if let Err(e) = copied {
        warn!(log = %log.display(), error = %e, "Cannot rotate a service log.");
    }
}

/// A process being watched: ours (a child, reaped when it exits) or adopted from an
/// earlier agent (watched through its pidfd only).
struct Proc {
    pid: i32,
    fd: AsyncFd<OwnedFd>,
    child: Option<tokio::process::Child>,
}

impl Proc {
    fn own(child: tokio::process::Child) -> std::io::Result<Proc> {
        let pid = child.id().ok_or_else(|| std::io::Error::other("the child has exited already"))? as i32;
        Ok(Proc { pid, fd: watch_fd(pidfd(pid)?)?, child: Some(child) })
    }

    /// The process a record names, if it is still that process and alive.
    fn adopt(r: &Record) -> std::io::Result<Proc> {
        if r.pid <= 1 || start_time(r.pid) != Some(r.start_time) || is_zombie(r.pid) {
            return Err(std::io::Error::other("not running"));
        }
        let fd = pidfd(r.pid)?;
        // Opened after the check: make sure it is still the same process.
        if start_time(r.pid) != Some(r.start_time) {
            return Err(std::io::Error::other("not running"));
        }
        Ok(Proc { pid: r.pid, fd: watch_fd(fd)?, child: None })
    }

    fn group(&self) -> rustix::process::Pid {
        rustix::process::Pid::from_raw(self.pid).expect("a pid above 1")
    }

    /// Waits until the process exits; says how.
    async fn exited(&mut self) -> String {
        if let Ok(mut ready) = self.fd.readable().await {
            ready.retain_ready();
        }
        match &mut self.child {
            Some(c) => match c.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            },
            None => "exited".into(),
        }
    }

    /// SIGTERM to the group, SIGKILL after `grace`.
    async fn terminate(&mut self, grace: Duration) {
        use rustix::process::{kill_process_group, Signal};
        let _ = kill_process_group(self.group(), Signal::TERM);
        if tokio::time::timeout(grace, self.exited()).await.is_err() {
            warn!(pid = self.pid, grace = ?grace, "The service outlived its stop grace; killing it.");
        }
        let _ = kill_process_group(self.group(), Signal::KILL);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.exited()).await;
    }
}

/// Registers a pidfd with the reactor. `AsyncFd::new` is deprecated for descriptors the
/// `AsyncFd` does not own; an `OwnedFd` it owns is the sound case, and the safe call.
#[allow(deprecated)]
fn watch_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::new(fd)
}

fn pidfd(pid: i32) -> std::io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid).ok_or_else(|| std::io::Error::other("bad pid"))?;
    Ok(rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?)
}

/// The fields of `/proc/PID/stat` after the command name.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// When the process started, in clock ticks since boot (field 22).
fn start_time(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

fn is_zombie(pid: i32) -> bool {
    stat_fields(pid).and_then(|f| f.first().cloned()).is_none_or(|s| s == "Z" || s == "X")
}

/// A loopback port nothing listens on now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The last `lines` lines of a version's service log (the rotated part first).
pub fn tail(log: &Path, lines: usize) -> std::io::Result<String> {
    let mut text = String::new();
    for p in [log.with_extension("log.1"), log.to_path_buf()] {
        match std::fs::read(&p) {
            Ok(b) => text.push_str(&String::from_utf8_lossy(&b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && p != log => {}
            Err(e) => return Err(e),
        }
    }
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    Ok(all[from..].join("\n"))
}

/// Pids of the processes whose environment carries a mark starting with `prefix`.
fn marked(prefix: &str) -> Vec<i32> {
    let want = format!("{MARK}={prefix}");
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid <= 1 {
            continue;
        }
        let Ok(env) = std::fs::read(e.path().join("environ")) else { continue };
        if env.split(|b| *b == 0).any(|var| var.starts_with(want.as_bytes())) && !is_zombie(pid) {
            out.push(pid);
        }
    }
    out
}

/// The uid a service's listening socket must belong to: the app's `user`, or the agent's.
pub fn service_uid(spec: &Spec) -> u32 {
    spec.exec.user.map_or_else(|| rustix::process::geteuid().as_raw(), |(uid, _)| uid)
}

/// Whether every socket listening on `port` (IPv4 loopback or any address, or IPv6)
/// belongs to `uid`: Ok once one does and none of another uid does.
pub fn port_owned(port: u16, uid: u32) -> Result<(), String> {
    let owners = listeners(port).map_err(|e| format!("cannot list the sockets listening on port {port}: {e}"))?;
    match owners.iter().find(|o| **o != uid) {
        Some(other) => Err(format!("port {port} is held by uid {other}, not by the service's uid {uid}")),
        None if owners.is_empty() => Err(format!("nothing listens on port {port}")),
        None => Ok(()),
    }
}

/// The uids of the TCP sockets listening on `port` that take connections to 127.0.0.1,
/// asked of the kernel through sock_diag: only listening sockets are walked, however many
/// connections the host has (reading `/proc/net/tcp` takes seconds with 100,000 of them).
fn listeners(port: u16) -> std::io::Result<Vec<u32>> {
    use rustix::net::{
        netlink, recv, sendto, socket_with, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType,
    };
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST_DUMP: u16 = 0x1 | 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const TCP_LISTEN: u32 = 10;
    let fd = socket_with(AddressFamily::NETLINK, SocketType::DGRAM, SocketFlags::CLOEXEC, Some(netlink::SOCK_DIAG))?;
    let kernel = netlink::SocketAddrNetlink::new(0, 0);
    let mut owners = Vec::new();
    for family in [2u8, 10u8] {
        // nlmsghdr (16) + inet_diag_req_v2 (56): family, TCP, no extensions, listening only.
        let mut req = Vec::with_capacity(72);
        req.extend_from_slice(&72u32.to_ne_bytes());
        req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req.extend_from_slice(&NLM_F_REQUEST_DUMP.to_ne_bytes());
        req.extend_from_slice(&u32::from(family).to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(&[family, 6, 0, 0]);
        req.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
        req.resize(72, 0);
        sendto(&fd, &req, SendFlags::empty(), &kernel)?;
        let mut buf = vec![0u8; 64 << 10];
        'dump: loop {
            let (_, n) = recv(&fd, &mut buf[..], RecvFlags::empty())?;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
                if len < 16 || at + len > n {
                    break 'dump;
                }
                match kind {
                    NLMSG_DONE => break 'dump,
                    NLMSG_ERROR => return Err(std::io::Error::other("sock_diag answered with an error")),
                    _ => {}
                }
                // inet_diag_msg: family, state, timer, retrans, id { sport (BE), dport,
                // src[16], dst[16], if, cookie }, expires, rqueue, wqueue, uid, inode.
                let m = &buf[at + 16..at + len];
                if m.len() >= 72 {
                    let sport = u16::from_be_bytes([m[4], m[5]]);
                    let src = &m[8..24];
                    let v4_reaches_loopback = src[..4] == [127, 0, 0, 1] || src[..4] == [0, 0, 0, 0];
                    if sport == port && (m[0] == 10 || v4_reaches_loopback) {
                        owners.push(u32::from_ne_bytes(m[64..68].try_into().expect("4 bytes")));
                    }
                }
                at += (len + 3) & !3;
            }
        }
    }
    Ok(owners)
}

/// Waits until the service holds its port, then lets the listener send it connections.
fn watch_port(i: &Arc<Instance>, spec: &Spec) {
    let (i, uid) = (i.clone(), service_uid(spec));
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut told = false;
        while Instant::now() < deadline && !i.stopping() {
            match port_owned(i.port, uid) {
                Ok(()) => {
                    i.backend.set_up(true);
                    return;
                }
                Err(e) if e.contains("held by") && !told => {
                    error!(app = %i.app, version = %i.version, error = %e, "The service's port is taken; no connection goes there.");
                    told = true;
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_port_is_owned_only_by_the_uid_that_listens_on_it() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(super::port_owned(port, me), Ok(()));
        let other = super::port_owned(port, me + 4242).unwrap_err();
        assert!(other.contains("held by uid"), "{other}");
        drop(l);
        assert!(super::port_owned(port, me).unwrap_err().contains("nothing listens"));
    }
}
