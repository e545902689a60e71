//! Traffic mode (SPEC §9): supervised services, the agent's listener moving new connections
//! between versions, weights, adoption after `kill -9`, and `[switch] command` with a real
//! nginx. The service is `stagehand-test-web` (tests/src/bin/web.rs), a real HTTP/1.1 server.

use crate::{AGENT, STAGEHAND};
use stagehand_common::protocol::{ReceiptOutcome, RolloutSpec};
use stagehand_tests::{run_cli, wait_for, Fleet, Proc, TestAgent};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

pub const WEB: &str = env!("CARGO_BIN_EXE_stagehand-test-web");

/// An artifact whose service is the test web server, serving `version` as its content.
pub fn web_artifact(root: &Path, version: &str, extra: &str) -> PathBuf {
    let dir = root.join(format!("web-{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("content"), format!("web {version}")).unwrap();
    std::fs::write(
        dir.join("stagehand.toml"),
        format!(
            "[service]\nstart = \"exec {WEB}\"\nstop_grace = \"3s\"\ndrain = \"3s\"\n\n\
             [health]\nurl = \"http://127.0.0.1:$PORT/health\"\ninterval = \"200ms\"\nretries = 10\ntimeout = \"2s\"\n{extra}"
        ),
    )
    .unwrap();
    dir
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Puts `app` in traffic mode on an enrolled (stopped) agent.
pub fn listen(agent_dir: &Path, app: &str, port: u16) {
    let path = agent_dir.join("agent.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!("\n[apps.{app}]\nlisten = \"127.0.0.1:{port}\"\n"));
    std::fs::write(path, text).unwrap();
}

/// One GET on a new connection; the body.
pub async fn get(port: u16, path: &str) -> anyhow::Result<String> {
    let s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(("127.0.0.1", port))).await??;
    let mut s = BufReader::new(s);
    s.get_mut().write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).await?;
    read_response(&mut s).await
}

async fn read_response(s: &mut BufReader<tokio::net::TcpStream>) -> anyhow::Result<String> {
    let fut = async {
        let mut status = String::new();
        s.read_line(&mut status).await?;
        anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "status line {status:?}");
        let mut length = 0;
        loop {
            let mut h = String::new();
            anyhow::ensure!(s.read_line(&mut h).await? > 0, "connection closed in the headers");
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse()?;
            }
        }
        let mut body = vec![0; length];
        s.read_exact(&mut body).await?;
        Ok(String::from_utf8(body)?)
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await?
}

/// Kills every service an agent directory recorded, when the test ends however it ends.
pub struct Reaper(pub PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in service_pids(&self.0) {
            let _ = std::process::Command::new("kill").args(["-9", "--", &format!("-{pid}")]).status();
        }
    }
}

/// The pids the agent's service records name.
fn service_pids(agent_dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(apps) = std::fs::read_dir(agent_dir.join("services")) else { return out };
    for app in apps.flatten().filter(|e| e.path().is_dir()) {
        for rec in std::fs::read_dir(app.path()).into_iter().flatten().flatten() {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(rec.path()).unwrap_or_default()).unwrap_or_default();
            if let Some(pid) = v["pid"].as_i64() {
                out.push(pid as i32);
            }
        }
    }
    out
}

/// Live processes of the test web server started from this agent's releases.
pub fn web_processes(agent_dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        let cwd = std::fs::read_link(e.path().join("cwd")).unwrap_or_default();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if exe == Path::new(WEB) && cwd.starts_with(agent_dir) && !zombie {
            out.push(pid);
        }
    }
    out
}

/// Requests in a steady loop, each on a new connection: what it saw, and what failed.
struct Loop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    last: Arc<Mutex<String>>,
    /// Every body answered, with how often.
    seen: Arc<Mutex<std::collections::BTreeMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Loop {
    fn start(port: u16) -> Loop {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let last = Arc::new(Mutex::new(String::new()));
        let seen = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let (s, o, f, l, n) = (stop.clone(), ok.clone(), failures.clone(), last.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::SeqCst) {
                match get(port, "/").await {
                    Ok(body) => {
                        o.fetch_add(1, Ordering::SeqCst);
                        *n.lock().unwrap().entry(body.clone()).or_insert(0) += 1;
                        *l.lock().unwrap() = body;
                    }
                    Err(e) => f.lock().unwrap().push(format!("{e:#}")),
                }
            }
        });
        Loop { stop, ok, failures, last, seen, task }
    }

    fn last(&self) -> String {
        self.last.lock().unwrap().clone()
    }

    async fn sees(&self, body: &str) {
        let want = body.to_string();
        wait_for(&format!("the loop to see {body:?}"), Duration::from_secs(30), || {
            let seen = self.last();
            let w = want.clone();
            async move { seen == w }
        })
        .await
        .unwrap();
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        (self.ok.load(Ordering::SeqCst), self.failures.lock().unwrap().clone())
    }
}

/// A fleet with one prod agent (in this process) serving `web` on a port of its own.
pub async fn traffic_fleet() -> (Fleet, TestAgent, u16, Reaper) {
    let fleet = Fleet::start().await.unwrap();
    let mut agent = fleet.enrol("prod", "p").await.unwrap();
    let port = free_port();
    listen(&agent.dir, "web", port);
    let reaper = Reaper(agent.dir.clone());
    agent.start().await.unwrap();
    (fleet, agent, port, reaper)
}

pub async fn push_and_stage(fleet: &Fleet, version: &str, extra: &str) {
    let src = web_artifact(fleet.path(), version, extra);
    fleet.push("web", version, &src).await.unwrap();
    assert!(fleet.deploy("web", version, "prod", 60).await.unwrap().all_done());
}

pub async fn release(fleet: &Fleet, version: &str, traffic: u8) -> stagehand_common::protocol::RolloutView {
    let spec = RolloutSpec {
        app: "web".into(),
        version: Some(version.into()),
        env: "prod".into(),
        force: true,
        traffic,
        ..RolloutSpec::default()
    };
    let r = fleet.rollout(spec).await.unwrap();
    fleet.wait_rollout(&r.id).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_the_listener_never_fail_across_twenty_switches() {
    let (fleet, agent, port, _reaper) = traffic_fleet().await;
    for v in ["1.0.0", "2.0.0"] {
        push_and_stage(&fleet, v, "").await;
    }
    // As an operator would: release from the command line.
    let out = run_cli(STAGEHAND, Some(&fleet), &["release", "web", "1.0.0", "--env", "prod", "--wait"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(get(port, "/").await.unwrap(), "web 1.0.0");

    let requests = Loop::start(port);
    requests.sees("web 1.0.0").await;
    let out = run_cli(STAGEHAND, Some(&fleet), &["release", "web", "2.0.0", "--env", "prod", "--wait"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    requests.sees("web 2.0.0").await;
    // 19 more switches, back and forth: each starts the version again beside the live one.
    for i in 0..19 {
        let v = if i % 2 == 0 { "1.0.0" } else { "2.0.0" };
        let r = release(&fleet, v, 100).await;
        assert_eq!(r.state, "succeeded", "{r:?}");
        requests.sees(&format!("web {v}")).await;
    }
    let (ok, failures) = requests.finish().await;
    assert!(failures.is_empty(), "{} of {} requests failed: {:?}", failures.len(), ok + failures.len(), failures);
    assert!(ok > 40, "the loop ran only {ok} requests");
    assert_eq!(get(port, "/").await.unwrap(), "web 1.0.0");
    // The versions that lost their traffic are stopped once drained: one service runs.
    wait_for("the old version to stop", Duration::from_secs(20), || async { web_processes(&agent.dir).len() == 1 })
        .await
        .unwrap();
    assert_eq!(agent.current("web").unwrap(), Path::new("releases/1.0.0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_fails_its_health_check_never_receives_traffic() {
    let (fleet, agent, port, _reaper) = traffic_fleet().await;
    push_and_stage(&fleet, "1", "").await;
    // Version 2 answers /health with 503; its / would say "web 2".
    let src = web_artifact(fleet.path(), "2", "");
    std::fs::write(src.join("unhealthy"), "").unwrap();
    std::fs::write(
        src.join("stagehand.toml"),
        std::fs::read_to_string(src.join("stagehand.toml")).unwrap().replace("retries = 10", "retries = 3"),
    )
    .unwrap();
    fleet.push("web", "2", &src).await.unwrap();
    assert!(fleet.deploy("web", "2", "prod", 60).await.unwrap().all_done());
    assert_eq!(release(&fleet, "1", 100).await.state, "succeeded");

    let requests = Loop::start(port);
    requests.sees("web 1").await;
    let r = release(&fleet, "2", 100).await;
    assert_eq!(r.state, "failed", "{r:?}");
    let receipt = r.waves[0].hosts[0].receipt.clone().unwrap();
    assert_eq!(receipt.outcome, ReceiptOutcome::Refused(stagehand_common::activate::Refusal::Unhealthy));
    assert!(receipt.log.contains("503"), "{}", receipt.log);
    let seen = requests.seen.lock().unwrap().clone();
    let (ok, failures) = requests.finish().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok > 0);
    // Nothing but version 1 ever answered, and version 2's process is gone.
    assert_eq!(seen.keys().collect::<Vec<_>>(), vec!["web 1"], "{seen:?}");
    assert_eq!(get(port, "/").await.unwrap(), "web 1");
    wait_for("version 2 to be stopped", Duration::from_secs(10), || async { web_processes(&agent.dir).len() == 1 })
        .await
        .unwrap();
    assert_eq!(agent.current("web").unwrap(), Path::new("releases/1"));
}

/// How many of `n` new connections each version answered.
async fn split(port: u16, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        *seen.entry(get(port, "/").await.unwrap()).or_insert(0) += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_new_connections_and_a_rollback_returns_to_zero() {
    let (fleet, agent, port, _reaper) = traffic_fleet().await;
    for v in ["1", "2"] {
        push_and_stage(&fleet, v, "").await;
    }
    assert_eq!(release(&fleet, "1", 100).await.state, "succeeded");
    let r = release(&fleet, "2", 10).await;
    assert_eq!(r.state, "succeeded", "{r:?}");
    assert_eq!(r.traffic, 10);
    // Both run; 10% of new connections go to 2.
    let seen = split(port, 300).await;
    let two = seen.get("web 2").copied().unwrap_or(0);
    assert!((20..=40).contains(&two), "version 2 got {two} of 300 connections: {seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 300);
    assert_eq!(web_processes(&agent.dir).len(), 2);

    // A later release at 100 completes the move.
    assert_eq!(release(&fleet, "2", 100).await.state, "succeeded");
    assert_eq!(split(port, 50).await.get("web 2"), Some(&50));
    wait_for("version 1 to stop", Duration::from_secs(20), || async { web_processes(&agent.dir).len() == 1 })
        .await
        .unwrap();

    // 2 at 100%, then 1 back at 30%, then a rollback: 1 returns to 0.
    assert_eq!(release(&fleet, "1", 30).await.state, "succeeded");
    let seen = split(port, 100).await;
    assert_eq!(seen.get("web 1"), Some(&30), "{seen:?}");
    let out = run_cli(STAGEHAND, Some(&fleet), &["rollback", "web", "--env", "prod", "--wait"]).unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(split(port, 50).await.get("web 2"), Some(&50));
    wait_for("version 1 to stop again", Duration::from_secs(20), || async { web_processes(&agent.dir).len() == 1 })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_on_a_host_not_in_traffic_mode_is_refused() {
    let fleet = Fleet::start().await.unwrap();
    let agent = fleet.agent("prod", "p").await.unwrap();
    let _reaper = Reaper(agent.dir.clone());
    for v in ["1", "2"] {
        push_and_stage(&fleet, v, "").await;
    }
    assert_eq!(release(&fleet, "1", 100).await.state, "succeeded");
    let r = release(&fleet, "2", 10).await;
    assert_eq!(r.state, "failed");
    let receipt = r.waves[0].hosts[0].receipt.clone().unwrap();
    assert_eq!(receipt.outcome, ReceiptOutcome::Refused(stagehand_common::activate::Refusal::NotTrafficMode));
    assert_eq!(agent.current("web").unwrap(), Path::new("releases/1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_adopted_after_the_agent_is_killed_and_restarted_after_a_crash() {
    let fleet = Fleet::start().await.unwrap();
    let agent = fleet.enrol("prod", "p").await.unwrap();
    let _reaper = Reaper(agent.dir.clone());
    let port = free_port();
    listen(&agent.dir, "web", port);
    let dir = agent.dir.to_str().unwrap().to_string();
    let env = [("STAGEHAND_LOG", "info"), ("NO_COLOR", "1")];
    let mut first = Proc::spawn(AGENT, &["run", "--data-dir", &dir], &env, fleet.path().join("agent-1.log")).unwrap();
    for v in ["1", "2"] {
        push_and_stage(&fleet, v, "").await;
    }
    assert_eq!(release(&fleet, "1", 100).await.state, "succeeded");
    assert_eq!(release(&fleet, "2", 50).await.state, "succeeded");
    let before = web_processes(&agent.dir);
    assert_eq!(before.len(), 2, "{before:?}");

    // kill -9 the agent: its services run on, and the next agent adopts them.
    first.kill9();
    let second = Proc::spawn(AGENT, &["run", "--data-dir", &dir], &env, fleet.path().join("agent-2.log")).unwrap();
    let seen = {
        let mut seen = None;
        for _ in 0..200 {
            if let Ok(s) = get(port, "/").await {
                seen = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    };
    assert!(seen.is_some(), "the new agent never served traffic: {}", second.log_text());
    let after = {
        let mut a = web_processes(&agent.dir);
        a.sort();
        a
    };
    let mut b = before.clone();
    b.sort();
    assert_eq!(after, b, "services must be adopted, not restarted nor duplicated:\n{}", second.log_text());
    assert!(second.log_text().contains("Adopted the running service"), "{}", second.log_text());
    let counts = split(port, 100).await;
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![50, 50], "{counts:?}");

    // A crashed service is restarted (with backoff), on its port.
    let victim = service_pids(&agent.dir)[0];
    std::process::Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap();
    wait_for("the service to be restarted", Duration::from_secs(20), || async {
        let now = service_pids(&agent.dir);
        now.len() == 2 && !now.contains(&victim) && web_processes(&agent.dir).len() == 2
    })
    .await
    .unwrap();
    assert_eq!(split(port, 100).await.values().sum::<usize>(), 100);

    // Its output is kept per version, and `stagehand-agent logs` shows it.
    let out = run_cli(AGENT, None, &["logs", "web", "--data-dir", &dir, "--version", "1"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("listening on 127.0.0.1:"), "{out:?}");

    // A rollback to 1 retires 2 once its connections are done.
    let out = run_cli(STAGEHAND, Some(&fleet), &["release", "web", "1", "--env", "prod", "--wait"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("only version 1 to run", Duration::from_secs(20), || async { web_processes(&agent.dir).len() == 1 })
        .await
        .unwrap();
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_survives_silent_clients_and_a_thousand_concurrent_connections() {
    let (fleet, _agent, port, _reaper) = traffic_fleet().await;
    push_and_stage(&fleet, "1", "").await;
    assert_eq!(release(&fleet, "1", 100).await.state, "succeeded");
    // Clients that connect and say nothing hold a connection each, and nothing else.
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    assert_eq!(get(port, "/").await.unwrap(), "web 1");
    // 1,000 connections open at once, each with a request in flight.
    let mut conns = Vec::new();
    for _ in 0..1000 {
        let mut s = BufReader::new(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        s.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        conns.push(s);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in conns {
        tasks.spawn(async move { read_response(&mut s).await.map(|b| (b, s)) });
    }
    let mut ok = 0;
    let mut open = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (body, s) = r.unwrap().unwrap();
        assert_eq!(body, "web 1");
        open.push(s);
        ok += 1;
    }
    assert_eq!(ok, 1000);
    // All 1,000 still open, and the listener still answers.
    assert_eq!(get(port, "/").await.unwrap(), "web 1");
    drop(open);
    drop(silent);
}

/// Live (not zombie) children of a process.
fn children(parent: i32) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
            fields.first() != Some(&"Z") && fields.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(parent)
        })
        .count()
}

/// nginx in front: `[switch] command` points its upstream at the new version's port and
/// reloads it (the example in deploy/nginx).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_command_moves_a_real_nginx_to_the_new_version() {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| Path::new(p).exists());
    let Some(nginx) = nginx else {
        eprintln!("note: nginx is not installed (.ci/run installs it); skipping");
        return;
    };
    let fleet = Fleet::start().await.unwrap();
    let mut agent = fleet.enrol("prod", "p").await.unwrap();
    let _reaper = Reaper(agent.dir.clone());
    // nginx on a port of its own, with the example's site file.
    let ngx = fleet.path().join("nginx");
    std::fs::create_dir_all(ngx.join("logs")).unwrap();
    let port = free_port();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nginx");
    let site = std::fs::read_to_string(example.join("stagehand-web.conf"))
        .unwrap()
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
        .replace("/var/lib/stagehand-nginx/web-upstream.conf", ngx.join("upstream.conf").to_str().unwrap());
    std::fs::write(ngx.join("upstream.conf"), "upstream stagehand_web { server 127.0.0.1:9; }\n").unwrap();
    std::fs::write(
        ngx.join("nginx.conf"),
        format!(
            "daemon on;\npid {p}/nginx.pid;\nerror_log {p}/logs/error.log notice;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {p}/tmp;\n  proxy_temp_path {p}/tmp;\n\
             fastcgi_temp_path {p}/tmp;\n  uwsgi_temp_path {p}/tmp;\n  scgi_temp_path {p}/tmp;\n{site}\n}}\n",
            p = ngx.display()
        ),
    )
    .unwrap();
    let conf = ngx.join("nginx.conf");
    let started = std::process::Command::new(nginx).arg("-c").arg(&conf).arg("-p").arg(&ngx).output().unwrap();
    assert!(started.status.success(), "nginx: {}", String::from_utf8_lossy(&started.stderr));
    struct StopNginx(String, PathBuf);
    impl Drop for StopNginx {
        fn drop(&mut self) {
            let _ = std::process::Command::new(&self.0).arg("-c").arg(&self.1).arg("-s").arg("stop").status();
        }
    }
    let _stop = StopNginx(nginx.to_string(), conf.clone());
    // The host says where nginx's upstream file is and how to reload it.
    let mut text = std::fs::read_to_string(agent.dir.join("agent.toml")).unwrap();
    text.push_str(&format!(
        "\n[apps.web.env]\nNGINX_UPSTREAM = \"{}\"\nNGINX_RELOAD = \"{nginx} -c {} -s reload\"\nNGINX_PID = \"{}\"\n",
        ngx.join("upstream.conf").display(),
        conf.display(),
        ngx.join("nginx.pid").display()
    ));
    std::fs::write(agent.dir.join("agent.toml"), text).unwrap();
    agent.start().await.unwrap();
    let switch = std::fs::read_to_string(example.join("switch.sh")).unwrap();
    for v in ["1", "2"] {
        let src = web_artifact(fleet.path(), v, "\n[switch]\ncommand = \"sh bin/switch.sh\"\n");
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::write(src.join("bin/switch.sh"), &switch).unwrap();
        fleet.push("web", v, &src).await.unwrap();
        assert!(fleet.deploy("web", v, "prod", 60).await.unwrap().all_done());
    }
    assert_eq!(release(&fleet, "1", 100).await.state, "succeeded");
    // `want`, or `want x20`: twenty answers in a row.
    let via_nginx = |want: &'static str| async move {
        let (body, times) = want.split_once(" x").map_or((want, 1), |(b, n)| (b, n.parse().unwrap()));
        wait_for(&format!("nginx to serve {want}"), Duration::from_secs(20), || async move {
            for _ in 0..times {
                if !get(port, "/").await.is_ok_and(|b| b == body) {
                    return false;
                }
            }
            true
        })
        .await
    };
    via_nginx("web 1").await.unwrap();
    // nginx's reload is asynchronous: its worker of the placeholder config (a port nothing
    // listens on) takes connections until it handled its signal, which a loaded machine may
    // delay past any number of good answers. Start once it is gone: one worker left.
    let master: i32 = std::fs::read_to_string(ngx.join("nginx.pid")).unwrap().trim().parse().unwrap();
    wait_for("nginx's old worker to exit", Duration::from_secs(30), || {
        let workers = children(master);
        async move { workers == 1 }
    })
    .await
    .unwrap();
    via_nginx("web 1 x20").await.unwrap();
    let requests = Loop::start(port);
    requests.sees("web 1").await;
    let r = release(&fleet, "2", 100).await;
    assert_eq!(r.state, "succeeded", "{r:?}");
    let log = &r.waves[0].hosts[0].receipt.as_ref().unwrap().log;
    assert!(log.contains("[switch] ran"), "{log}");
    requests.sees("web 2").await;
    let (_, failures) = requests.finish().await;
    let errors = std::fs::read_to_string(ngx.join("logs/error.log")).unwrap_or_default();
    assert!(failures.is_empty(), "{} failed: {:?}\nnginx: {errors}\nreceipt: {log}", failures.len(), failures.first());
    // A weight needs the agent's listener: nginx alone cannot split.
    let r = release(&fleet, "1", 20).await;
    assert_eq!(r.state, "failed");
    via_nginx("web 2").await.unwrap();
}

/// A `[switch] command` that writes where it was told to point (`PORT`, then
/// `STAGEHAND_PREVIOUS_PORT`) to the file `PROXY_FILE` names: a proxy in front, as a file.
const TELL_PROXY: &str = "\n[switch]\ncommand = \"echo $PORT $STAGEHAND_PREVIOUS_PORT > $PROXY_FILE\"\n";

/// Sets `PROXY_FILE` for the agent's `web` and returns it.
fn proxy_file(fleet: &Fleet, agent: &TestAgent) -> PathBuf {
    let told = fleet.path().join("proxy-port");
    let mut text = std::fs::read_to_string(agent.dir.join("agent.toml")).unwrap();
    text.push_str(&format!("\n[apps.web.env]\nPROXY_FILE = \"{}\"\n", told.display()));
    std::fs::write(agent.dir.join("agent.toml"), text).unwrap();
    told
}

/// What the last `[switch] command` wrote to the proxy file.
fn told_ports(told: &Path) -> Vec<String> {
    std::fs::read_to_string(told).unwrap_or_default().split_whitespace().map(String::from).collect()
}

/// kill -9 after `[switch] command` told the proxy of the new version, before the outcome: at
/// start-up the activation is undone and the proxy is told of the version it replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_killed_after_its_switch_command_points_the_proxy_back_at_start_up() {
    let fleet = Fleet::start().await.unwrap();
    let agent = fleet.enrol("prod", "p").await.unwrap();
    let _reaper = Reaper(agent.dir.clone());
    let told = proxy_file(&fleet, &agent);
    let dir = agent.dir.to_str().unwrap().to_string();
    let env = [("STAGEHAND_LOG", "info"), ("NO_COLOR", "1")];
    let first = Proc::spawn(AGENT, &["run", "--data-dir", &dir], &env, fleet.path().join("agent-1.log")).unwrap();
    for v in ["1", "2"] {
        push_and_stage(&fleet, v, TELL_PROXY).await;
    }
    assert_eq!(release(&fleet, "1", 100).await.state, "succeeded", "{}", first.log_text());
    let p1 = told_ports(&told)[0].clone();
    drop(first);
    let r = release_2_dying_at(&fleet, &dir, "activate-after-switch-command").await;
    let p2 = told_ports(&told)[0].clone();
    assert_ne!(p2, p1, "the proxy was told of version 2 before the agent died");
    let third = Proc::spawn(AGENT, &["run", "--data-dir", &dir], &env, fleet.path().join("agent-3.log")).unwrap();
    let r = fleet.wait_rollout(&r.id).await.unwrap();
    let receipt = r.waves[0].hosts[0].receipt.clone().unwrap();
    assert_eq!(receipt.outcome, ReceiptOutcome::Refused(stagehand_common::activate::Refusal::Interrupted), "{r:?}");
    assert_eq!(told_ports(&told)[0], p1, "the proxy points at version 1 again:\n{}", third.log_text());
    assert_eq!(agent.current("web").unwrap(), Path::new("releases/1"));
    assert_eq!(get(p1.parse().unwrap(), "/").await.unwrap(), "web 1");
}

/// Starts an agent on `dir` armed to die at `failpoint`, releases web 2 to it, and returns
/// the rollout once the agent has died there.
async fn release_2_dying_at(fleet: &Fleet, dir: &str, failpoint: &str) -> stagehand_common::protocol::RolloutView {
    let fail = [("STAGEHAND_LOG", "info"), ("NO_COLOR", "1"), ("STAGEHAND_FAILPOINT", failpoint)];
    let mut dying = Proc::spawn(AGENT, &["run", "--data-dir", dir], &fail, fleet.path().join("agent-2.log")).unwrap();
    let spec = RolloutSpec {
        app: "web".into(),
        version: Some("2".into()),
        env: "prod".into(),
        force: true,
        ..RolloutSpec::default()
    };
    let r = fleet.rollout(spec).await.unwrap();
    let status = dying.wait_exit(Duration::from_secs(60)).await.unwrap();
    assert!(!status.success(), "the failpoint {failpoint} should have killed the agent");
    r
}

/// A restart that has to give the live version's service another port (the process died
/// with the agent and something else took its port) runs `[switch] command` again: a proxy
/// in front must not be left pointing at the old port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_that_moves_the_service_to_another_port_runs_the_switch_command_again() {
    let fleet = Fleet::start().await.unwrap();
    let agent = fleet.enrol("prod", "p").await.unwrap();
    let _reaper = Reaper(agent.dir.clone());
    let told = proxy_file(&fleet, &agent);
    let dir = agent.dir.to_str().unwrap().to_string();
    let env = [("STAGEHAND_LOG", "info"), ("NO_COLOR", "1")];
    let mut first = Proc::spawn(AGENT, &["run", "--data-dir", &dir], &env, fleet.path().join("agent-1.log")).unwrap();
    push_and_stage(&fleet, "1", TELL_PROXY).await;
    assert_eq!(release(&fleet, "1", 100).await.state, "succeeded", "{}", first.log_text());
    let told_port = || told_ports(&told);
    let p1: u16 = told_port()[0].parse().unwrap();
    assert_eq!(get(p1, "/").await.unwrap(), "web 1");

    // The agent and its service die; another process takes the service's port.
    first.kill9();
    for pid in service_pids(&agent.dir) {
        std::process::Command::new("kill").args(["-9", "--", &format!("-{pid}")]).status().unwrap();
    }
    wait_for("the service to be gone", Duration::from_secs(10), || async { web_processes(&agent.dir).is_empty() })
        .await
        .unwrap();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", p1)).unwrap();
    let second = Proc::spawn(AGENT, &["run", "--data-dir", &dir], &env, fleet.path().join("agent-2.log")).unwrap();
    wait_for("the switch command to name a new port", Duration::from_secs(30), || {
        let now = told_port();
        async move { now.first().is_some_and(|p| p != &p1.to_string()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", told_port(), second.log_text()));
    let now = told_port();
    assert_eq!(now[1], p1.to_string(), "STAGEHAND_PREVIOUS_PORT is the old port: {now:?}");
    let p2: u16 = now[0].parse().unwrap();
    wait_for("the service to answer on its new port", Duration::from_secs(20), || async move {
        get(p2, "/").await.is_ok_and(|b| b == "web 1")
    })
    .await
    .unwrap();
    assert!(second.log_text().contains("Telling the proxy in front"), "{}", second.log_text());
    drop(squatter);
}

/// kill -9 of the agent after `current` moved and before the outcome: at start-up the route
/// it replaced comes back, `current` goes back, the new version is stopped, and the
/// activation is reported interrupted; nothing commits without its health check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_killed_after_the_switch_is_undone_at_start_up() {
    let fleet = Fleet::start().await.unwrap();
    let agent = fleet.enrol("prod", "p").await.unwrap();
    let _reaper = Reaper(agent.dir.clone());
    let port = free_port();
    listen(&agent.dir, "web", port);
    let dir = agent.dir.to_str().unwrap().to_string();
    let env = [("STAGEHAND_LOG", "info"), ("NO_COLOR", "1")];
    let first = Proc::spawn(AGENT, &["run", "--data-dir", &dir], &env, fleet.path().join("agent-1.log")).unwrap();
    for v in ["1", "2"] {
        push_and_stage(&fleet, v, "").await;
    }
    assert_eq!(release(&fleet, "1", 100).await.state, "succeeded");
    drop(first);
    // The next agent dies right after switching `current` to 2.
    let r = release_2_dying_at(&fleet, &dir, "activate-after-switch").await;
    assert_eq!(agent.current("web").unwrap(), Path::new("releases/2"));
    let third = Proc::spawn(AGENT, &["run", "--data-dir", &dir], &env, fleet.path().join("agent-3.log")).unwrap();
    let r = fleet.wait_rollout(&r.id).await.unwrap();
    let receipt = r.waves[0].hosts[0].receipt.clone().unwrap();
    assert_eq!(
        receipt.outcome,
        ReceiptOutcome::Refused(stagehand_common::activate::Refusal::Interrupted),
        "{r:?}\n{}",
        third.log_text()
    );
    assert_eq!(agent.current("web").unwrap(), Path::new("releases/1"));
    assert_eq!(get(port, "/").await.unwrap(), "web 1");
    wait_for("version 2 to be stopped", Duration::from_secs(20), || async { web_processes(&agent.dir).len() == 1 })
        .await
        .unwrap();
    assert!(!agent.dir.join("services/web.pending.json").exists());
}
