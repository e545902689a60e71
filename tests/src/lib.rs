//! The test harness: a real controller and real agents on loopback, in temporary
//! directories, in-process or as processes. Nothing of ours is mocked.

pub mod browser;
pub mod etcd;
pub mod sim;

use anyhow::{bail, Context, Result};
use stagehand_agent::run::RunningAgent;
use stagehand_common::protocol::{AdminRequest, AdminResponse, RolloutSpec, RolloutView};
use stagehand_common::AgentId;
use stagehand_controller::client::Client;
use stagehand_controller::server::Running;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Logs to stderr once per test binary, if `STAGEHAND_LOG` is set.
pub fn init_logging() {
    if let Ok(filter) = std::env::var("STAGEHAND_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Polls `cond` until it holds or `timeout` passes; the error names what was awaited.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A controller in this process with its data directory.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub ctl_dir: PathBuf,
    pub admin: PathBuf,
    pub addr: SocketAddr,
    pub controller: Option<Running>,
}

/// An agent in this process.
pub struct TestAgent {
    pub dir: PathBuf,
    pub id: AgentId,
    pub running: Option<RunningAgent>,
}

impl TestAgent {
    pub fn app_root(&self, app: &str) -> PathBuf {
        self.dir.join("apps").join(app)
    }

    pub fn release_dir(&self, app: &str, version: &str) -> PathBuf {
        self.app_root(app).join("releases").join(version)
    }

    pub fn current(&self, app: &str) -> Option<PathBuf> {
        std::fs::read_link(self.app_root(app).join("current")).ok()
    }

    pub async fn start(&mut self) -> Result<()> {
        self.running = Some(stagehand_agent::run::start(&self.dir).await?);
        Ok(())
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }
}

impl Fleet {
    pub async fn start() -> Result<Fleet> {
        init_logging();
        let dir = tempfile::Builder::new().prefix("stagehand-test-").tempdir()?;
        let ctl_dir = dir.path().join("controller");
        stagehand_controller::init::init(&ctl_dir, "127.0.0.1:0".parse()?)?;
        let controller = stagehand_controller::server::start(&ctl_dir, None).await?;
        Ok(Fleet { admin: ctl_dir.join("admin"), addr: controller.addr, ctl_dir, dir, controller: Some(controller) })
    }

    /// A fleet whose controller serves `/metrics` on a loopback port of its own.
    pub async fn start_http() -> Result<Fleet> {
        init_logging();
        let dir = tempfile::Builder::new().prefix("stagehand-test-").tempdir()?;
        let ctl_dir = dir.path().join("controller");
        stagehand_controller::init::init(&ctl_dir, "127.0.0.1:0".parse()?)?;
        let controller = stagehand_controller::server::start_with(&ctl_dir, None, Some("127.0.0.1:0".parse()?)).await?;
        Ok(Fleet { admin: ctl_dir.join("admin"), addr: controller.addr, ctl_dir, dir, controller: Some(controller) })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub async fn client(&self) -> Result<Client> {
        Client::connect(Some(&self.addr.to_string()), Some(&self.admin)).await
    }

    /// Stops the controller and starts it again on the same address.
    pub async fn restart_controller(&mut self) -> Result<()> {
        if let Some(c) = self.controller.take() {
            c.stop().await;
        }
        // The old endpoint releases its UDP port asynchronously once its driver winds down.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match stagehand_controller::server::start(&self.ctl_dir, Some(self.addr)).await {
                Ok(c) => {
                    self.controller = Some(c);
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline && format!("{e:#}").contains("in use") => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn stop_controller(&mut self) {
        if let Some(c) = self.controller.take() {
            c.stop().await;
        }
    }

    pub async fn token(&self, env: &str, ttl_secs: u64) -> Result<String> {
        let client = self.client().await?;
        let resp = client
            .call(&AdminRequest::CreateToken { env: env.into(), ttl_secs, labels: Default::default(), uses: 1 })
            .await?;
        client.close().await;
        match resp {
            AdminResponse::Token { token, .. } => Ok(token),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    /// Enrols an agent (in this process) without starting it.
    pub async fn enrol(&self, env: &str, name: &str) -> Result<TestAgent> {
        let token = self.token(env, 600).await?;
        let dir = self.path().join("agents").join(name);
        let id =
            stagehand_agent::join::join(&self.addr.to_string(), &token, &dir, Some(name.into()), Default::default())
                .await?
                .id;
        Ok(TestAgent { dir, id, running: None })
    }

    /// Enrols and starts an agent in this process.
    pub async fn agent(&self, env: &str, name: &str) -> Result<TestAgent> {
        let mut a = self.enrol(env, name).await?;
        a.start().await?;
        Ok(a)
    }

    pub async fn push(&self, app: &str, version: &str, path: &Path) -> Result<stagehand_controller::cli::push::Pushed> {
        let client = self.client().await?;
        let r = stagehand_controller::cli::push::upload(&client, app, version, path).await;
        client.close().await;
        r
    }

    /// One admin request.
    pub async fn call(&self, req: AdminRequest) -> Result<AdminResponse> {
        let client = self.client().await?;
        let r = client.call(&req).await;
        client.close().await;
        r
    }

    /// Orders a deploy and waits; returns (done, failed, pending).
    pub async fn deploy(&self, app: &str, version: &str, env: &str, timeout_secs: u64) -> Result<Progress> {
        self.call(AdminRequest::Deploy { app: app.into(), version: version.into(), env: env.into() }).await?;
        self.wait_staged(app, version, env, timeout_secs).await
    }

    pub async fn wait_staged(&self, app: &str, version: &str, env: &str, timeout_secs: u64) -> Result<Progress> {
        match self
            .call(AdminRequest::WaitStaged { app: app.into(), version: version.into(), env: env.into(), timeout_secs })
            .await?
        {
            AdminResponse::Waited { done, failed, pending } => Ok(Progress { done, failed, pending }),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    /// Starts a rollout (errors when the controller refuses it).
    pub async fn rollout(&self, spec: RolloutSpec) -> Result<RolloutView> {
        match self.call(AdminRequest::Rollout(spec)).await? {
            AdminResponse::Rollout { rollout, .. } => Ok(rollout),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    /// A rollout as it is now.
    pub async fn rollout_status(&self, id: &str) -> Result<RolloutView> {
        match self.call(AdminRequest::RolloutStatus { id: id.into(), after_revision: 0, timeout_secs: 0 }).await? {
            AdminResponse::Rollout { rollout, .. } => Ok(rollout),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    /// Waits (on the controller's change notifications) until `cond` holds for the rollout.
    pub async fn wait_rollout_until(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&RolloutView) -> bool,
    ) -> Result<RolloutView> {
        let client = self.client().await?;
        let deadline = Instant::now() + timeout;
        let mut after = 0;
        let result = loop {
            let req = AdminRequest::RolloutStatus { id: id.into(), after_revision: after, timeout_secs: 5 };
            let r = match client.call(&req).await? {
                AdminResponse::Rollout { rollout, .. } => rollout,
                other => break Err(anyhow::anyhow!("unexpected answer {other:?}")),
            };
            if cond(&r) {
                break Ok(r);
            }
            if Instant::now() >= deadline {
                break Err(anyhow::anyhow!(
                    "timed out after {timeout:?} waiting for rollout {id} to be {what}; it is {r:#?}"
                ));
            }
            after = r.revision;
        };
        client.close().await;
        result
    }

    /// Waits until a rollout has ended.
    pub async fn wait_rollout(&self, id: &str) -> Result<RolloutView> {
        self.wait_rollout_until(id, "ended", Duration::from_secs(90), is_final).await
    }

    /// Releases (one wave, the defaults) and waits for the rollout to end.
    pub async fn release(&self, app: &str, version: &str, env: &str) -> Result<Progress> {
        let spec =
            RolloutSpec { app: app.into(), version: Some(version.into()), env: env.into(), ..Default::default() };
        let r = self.rollout(spec).await?;
        Ok(Progress::of(&self.wait_rollout(&r.id).await?))
    }

    /// Rolls back to the previous version; returns the version and the rollout's id.
    pub async fn rollback(&self, app: &str, env: &str) -> Result<(String, String)> {
        let spec = RolloutSpec { app: app.into(), env: env.into(), rollback: true, ..Default::default() };
        let r = self.rollout(spec).await?;
        Ok((r.version, r.id))
    }
}

/// A rollout that has ended.
pub fn is_final(r: &RolloutView) -> bool {
    matches!(r.state.as_str(), "succeeded" | "failed" | "aborted")
}

/// Per-agent outcome of a wait.
#[derive(Debug)]
pub struct Progress {
    pub done: Vec<AgentId>,
    pub failed: Vec<(AgentId, String)>,
    pub pending: Vec<AgentId>,
}

impl Progress {
    /// Per host of a rollout: committed, failed (with why), or anything else.
    pub fn of(r: &RolloutView) -> Progress {
        let (mut done, mut failed, mut pending) = (vec![], vec![], vec![]);
        for h in r.waves.iter().flat_map(|w| &w.hosts) {
            match h.state.as_str() {
                "committed" => done.push(h.id.clone()),
                "failed" | "no-answer" => failed.push((h.id.clone(), h.detail.clone())),
                _ => pending.push(h.id.clone()),
            }
        }
        Progress { done, failed, pending }
    }

    pub fn all_done(&self) -> bool {
        self.failed.is_empty() && self.pending.is_empty()
    }
}

/// Runs a binary to completion with the controller's address and admin credentials set.
pub fn run_cli(bin: &str, fleet: Option<&Fleet>, args: &[&str]) -> Result<std::process::Output> {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null());
    if let Some(f) = fleet {
        cmd.env("STAGEHAND_CONTROLLER", f.addr.to_string()).env("STAGEHAND_CREDENTIALS", &f.admin);
    }
    cmd.output().with_context(|| format!("running {bin}"))
}

/// An agent (or controller) running as a child process; killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(bin: &str, args: &[&str], env: &[(&str, &str)], log: PathBuf) -> Result<Proc> {
        let file = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawning {bin}"))?;
        Ok(Proc { child, log })
    }

    /// SIGKILL, as `kill -9` would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("process did not exit within {timeout:?}; log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `size` bytes of pseudo-random (incompressible, chunkable) data.
pub fn random_file(path: &Path, size: usize, seed: u64) -> Result<()> {
    use rand::{RngCore, SeedableRng};
    use std::io::Write;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n;
    }
    f.flush()?;
    Ok(())
}

/// Compares two trees: same entries, kinds, modes, link targets and bytes.
pub fn assert_same_tree(a: &Path, b: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let list = |root: &Path| {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let md = std::fs::symlink_metadata(e.path()).unwrap();
                if md.is_dir() {
                    stack.push(e.path());
                }
                out.push(e.path().strip_prefix(root).unwrap().to_path_buf());
            }
        }
        out.sort();
        out
    };
    let (la, lb) = (list(a), list(b));
    assert_eq!(la, lb, "entries differ between {} and {}", a.display(), b.display());
    for rel in la {
        let (pa, pb) = (a.join(&rel), b.join(&rel));
        let (ma, mb) = (std::fs::symlink_metadata(&pa).unwrap(), std::fs::symlink_metadata(&pb).unwrap());
        assert_eq!(ma.file_type(), mb.file_type(), "{rel:?}");
        if ma.file_type().is_symlink() {
            assert_eq!(std::fs::read_link(&pa).unwrap(), std::fs::read_link(&pb).unwrap(), "{rel:?}");
            continue;
        }
        assert_eq!(ma.permissions().mode() & 0o777, mb.permissions().mode() & 0o777, "mode of {rel:?}");
        if ma.is_file() {
            assert_eq!(ma.len(), mb.len(), "size of {rel:?}");
            assert!(same_bytes(&pa, &pb), "bytes of {rel:?} differ");
        }
    }
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = fa.read(&mut ba).unwrap();
        let mut nb = 0;
        while nb < na {
            let n = fb.read(&mut bb[nb..na]).unwrap();
            if n == 0 {
                return false;
            }
            nb += n;
        }
        if na == 0 {
            return fb.read(&mut bb).unwrap() == 0;
        }
        if ba[..na] != bb[..na] {
            return false;
        }
    }
}

/// A tree of `files` pseudo-random files of `size` bytes each, spread over a few
/// directories, with an executable and a symlink: a version 1.
pub fn versioned_tree(dir: &Path, files: usize, size: usize, seed: u64) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for i in 0..files {
        let path = dir.join(tree_file(i));
        std::fs::create_dir_all(path.parent().expect("files are in a directory"))?;
        random_file(&path, size, seed * 1_000_003 + i as u64)?;
    }
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::write(dir.join("bin/run"), "#!/bin/sh\nexit 0\n")?;
    std::fs::set_permissions(dir.join("bin/run"), std::fs::Permissions::from_mode(0o755))?;
    std::os::unix::fs::symlink("../d0/f0", dir.join("bin/data"))?;
    Ok(())
}

/// The path of the `i`-th file of a [`versioned_tree`].
pub fn tree_file(i: usize) -> String {
    format!("d{}/f{i}", i % 4)
}

/// The next version of a [`versioned_tree`] as its issue describes a 1% change: in `next`,
/// a tree whose files are hard links to `prev`'s, except four, counted from `first`: two
/// rewritten, one shifted by an insert at its start, one with four small edits in place.
/// The changed files are new files, so `prev` stays as it was.
pub fn next_version(prev: &Path, next: &Path, first: usize, files: usize, seed: u64) -> Result<Vec<String>> {
    use rand::{Rng, SeedableRng};
    copy_linked(prev, next)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut changed = Vec::new();
    for (k, i) in (first..first + 4).map(|i| i % files).enumerate() {
        let rel = tree_file(i);
        let path = next.join(&rel);
        let mut bytes = std::fs::read(&path)?;
        let mtime = std::fs::metadata(&path)?.modified()?;
        std::fs::remove_file(&path)?;
        match k {
            0 | 1 => rng.fill(&mut bytes[..]),
            2 => {
                let insert: Vec<u8> = (0..1000).map(|_| rng.gen()).collect();
                bytes.splice(0..0, insert);
            }
            _ => {
                for _ in 0..4 {
                    let at = rng.gen_range(0..bytes.len().saturating_sub(16).max(1));
                    let end = (at + 16).min(bytes.len());
                    rng.fill(&mut bytes[at..end]);
                }
            }
        }
        std::fs::write(&path, &bytes)?;
        // Newer by whole seconds, as a later build would be: rsync's quick check compares
        // sizes and mtimes to the second.
        std::fs::File::options().write(true).open(&path)?.set_modified(mtime + Duration::from_secs(2))?;
        changed.push(rel);
    }
    Ok(changed)
}

/// `cp -al`: the same tree, directories made anew, files hard-linked, symlinks copied.
pub fn copy_linked(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let kind = e.file_type()?;
        if kind.is_dir() {
            copy_linked(&src, &dst)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else {
            std::fs::hard_link(&src, &dst)?;
        }
    }
    Ok(())
}

/// Inode numbers of a tree's files by relative path.
pub fn inodes(root: &Path) -> std::collections::BTreeMap<String, u64> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let md = std::fs::symlink_metadata(e.path()).expect("listed just now");
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                let rel = e.path().strip_prefix(root).expect("under the root").to_string_lossy().into_owned();
                out.insert(rel, md.ino());
            }
        }
    }
    out
}

/// A receipt as `stagehand-agent activate -o json` prints it (the shared JSON vocabulary).
pub fn receipt_of(stdout: &[u8]) -> stagehand_common::protocol::Receipt {
    let v: serde_json::Value = serde_json::from_slice(stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(stdout)));
    stagehand_common::protocol::Receipt::from_json(&v).unwrap_or_else(|| panic!("not a receipt: {v}"))
}

/// `GET path` over HTTP/1.1 on a new connection: (status, body). For the daemons' HTTP side.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let (status, _, body) = http_request(addr, "GET", path, &[], "").await?;
    Ok((status, body))
}

/// One HTTP/1.1 request on a new connection, with extra headers and a form body (when
/// not empty): (status, headers lower-cased, body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    form: &str,
) -> Result<(u16, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !form.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n", form.len()));
    }
    req.push_str("\r\n");
    req.push_str(form);
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("no end of headers in {text:?}"))?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let head = head.to_ascii_lowercase();
    // A chunked body (axum streams): join its chunks.
    let body = if head.contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_string()
    };
    Ok((status, head, body))
}

/// The value of one sample line (`name{labels} value`) of a Prometheus text exposition.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}
