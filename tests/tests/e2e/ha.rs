//! High availability (#14, SPEC §13): three controllers sharing their state in one real
//! etcd, agents spread over them. The leader is killed with `kill -9` in the middle of a
//! 3-wave rollout; etcd goes away for a while and comes back.

use crate::failover::controllers;
use crate::rollout::{activations, current, tree};
use crate::STAGEHAND;
use stagehand_tests::etcd::Etcd;
use stagehand_tests::{wait_for, Fleet, Proc, TestAgent};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

struct Controller {
    proc: Proc,
    addr: SocketAddr,
}

/// Three controllers on one etcd, from one `controller init` and two copies of its data
/// directory, sharing one chunk directory; `fleet` speaks to the first.
struct Cluster {
    etcd: Etcd,
    ctls: Vec<Controller>,
    fleet: Fleet,
}

impl Cluster {
    async fn start(n: usize) -> Option<Cluster> {
        let dir = tempfile::Builder::new().prefix("stagehand-ha-").tempdir().unwrap();
        let etcd = Etcd::start(dir.path()).await.unwrap()?;
        let first = dir.path().join("c0");
        stagehand_controller::init::init(&first, "127.0.0.1:0".parse().unwrap()).unwrap();
        let toml = first.join("controller.toml");
        let text = std::fs::read_to_string(&toml).unwrap();
        let shared = dir.path().join("chunks");
        std::fs::write(&toml, format!("chunks = {:?}\n{text}", shared.display().to_string())).unwrap();
        let mut ctls = Vec::new();
        for i in 0..n {
            let d = dir.path().join(format!("c{i}"));
            if i > 0 {
                assert!(std::process::Command::new("cp").arg("-a").arg(&first).arg(&d).status().unwrap().success());
                std::fs::remove_file(d.join("controller.addr")).ok();
            }
            ctls.push(serve(&d, &etcd, 0).await);
        }
        let fleet = Fleet { admin: first.join("admin"), addr: ctls[0].addr, ctl_dir: first, dir, controller: None };
        Some(Cluster { etcd, ctls, fleet })
    }

    /// The index of the controller that drives, as its log says.
    async fn leader(&self) -> usize {
        let mut found = None;
        wait_for("a controller to drive", Duration::from_secs(30), || {
            found = self.ctls.iter().position(|c| c.proc.log_text().contains("now drives rollouts"));
            let f = found.is_some();
            async move { f }
        })
        .await
        .unwrap();
        found.unwrap()
    }

    fn logs(&self) -> String {
        self.ctls.iter().map(|c| c.proc.log_text()).collect()
    }
}

async fn serve(dir: &Path, etcd: &Etcd, n: usize) -> Controller {
    let addr_file = dir.join("controller.addr");
    std::fs::remove_file(&addr_file).ok();
    let d = dir.to_str().unwrap();
    let url = etcd.url();
    let args = ["controller", "serve", "--data-dir", d, "--listen", "127.0.0.1:0", "--store", &url];
    let env = [("STAGEHAND_LOG", "info")];
    let proc = Proc::spawn(STAGEHAND, &args, &env, dir.join(format!("serve-{n}.log"))).unwrap();
    let file = &addr_file;
    wait_for("the controller to listen", Duration::from_secs(30), || async move { file.exists() }).await.unwrap();
    let addr = std::fs::read_to_string(&addr_file).unwrap().trim().parse().unwrap();
    Controller { proc, addr }
}

/// Runs the CLI against controller `at`: (exit code, stdout, stderr).
fn cli(cluster: &Cluster, at: usize, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(STAGEHAND)
        .args(args)
        .env("STAGEHAND_CONTROLLER", cluster.ctls[at].addr.to_string())
        .env("STAGEHAND_CREDENTIALS", &cluster.fleet.admin)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// Agents enrolled through the first controller, each given every controller's address,
/// starting with a different one: agent i is served by controller i mod n.
async fn agents(cluster: &Cluster, n: usize) -> Vec<TestAgent> {
    let addrs: Vec<SocketAddr> = cluster.ctls.iter().map(|c| c.addr).collect();
    let mut agents = Vec::new();
    for i in 0..n {
        let mut a = cluster.fleet.enrol("prod", &format!("p{i}")).await.unwrap();
        let mut list = addrs.clone();
        list.rotate_left(i % addrs.len());
        controllers(&a, &list);
        a.start().await.unwrap();
        agents.push(a);
    }
    agents
}

/// Which controller etcd says each agent is connected to (for a failure's message).
fn presence(c: &Cluster) -> String {
    let names: Vec<String> = c.ctls.iter().map(|c| c.addr.to_string()).collect();
    std::process::Command::new("etcdctl")
        .args(["--endpoints", &c.etcd.client, "get", "--prefix", "/stagehand/presence/", "--keys-only"])
        .env("ETCDCTL_API", "3")
        .output()
        .map(|o| {
            let seen: Vec<String> = (0..c.ctls.len()).map(|i| cli(c, i, &["agents", "list"]).1).collect();
            format!(
                "controllers {names:?}; presence in etcd:\n{}\nagents list on each: {seen:#?}",
                String::from_utf8_lossy(&o.stdout)
            )
        })
        .unwrap_or_default()
}

/// How many agents `agents list` through controller `at` shows connected.
fn connected(cluster: &Cluster, at: usize) -> usize {
    let (code, out, _) = cli(cluster, at, &["agents", "list", "-o", "json"]);
    if code != 0 {
        return 0;
    }
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v.as_array().map_or(0, |a| a.iter().filter(|a| a["connected"] == serde_json::Value::Bool(true)).count())
}

/// The acceptance run of #14, through the CLI: a 3-wave release with a bake, whose leader
/// is killed with `kill -9` once the first wave has gone out, completes; `rollout status
/// --watch` against another controller exits 0; every agent ends on the new version,
/// activated once; no wave was sent twice. The leader had agents of its own: they fail
/// over, and a later release through a third controller reaches every agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_survives_the_leaders_kill_9_and_agents_fail_over() {
    let Some(mut cluster) = Cluster::start(3).await else { return };
    let agents = agents(&cluster, 4).await;
    let c = &cluster;
    wait_for("every controller to list every agent connected", Duration::from_secs(60), || async move {
        (0..3).all(|i| connected(c, i) == 4)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", (0..3).map(|i| connected(c, i)).collect::<Vec<_>>(), c.logs()));
    for v in ["v1", "v2"] {
        cluster.fleet.push("web", v, &tree(cluster.fleet.path(), v)).await.unwrap();
        assert!(cluster.fleet.deploy("web", v, "prod", 60).await.unwrap().all_done());
    }
    assert!(cluster.fleet.release("web", "v1", "prod").await.unwrap().all_done());

    let leader = cluster.leader().await;
    let other = (leader + 1) % 3;
    let (code, out, err) = cli(
        &cluster,
        leader,
        &["release", "web", "v2", "--env", "prod", "--waves", "1,2,100%", "--bake", "3s", "-o", "json"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let started: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = started["id"].as_str().unwrap().to_string();
    let first = Instant::now();
    // One second in, the first wave is out: the leader goes.
    let fleet = &cluster.fleet;
    fleet
        .wait_rollout_until(&id, "the first wave to be out", Duration::from_secs(30), |r| {
            r.wave > 0 || r.waves[0].state == "baking"
        })
        .await
        .unwrap();
    if let Some(left) = Duration::from_secs(1).checked_sub(first.elapsed()) {
        tokio::time::sleep(left).await;
    }
    cluster.ctls[leader].proc.kill9();
    let (code, out, err) = tokio::task::spawn_blocking({
        let args = ["rollout", "status", &id, "--watch"].map(str::to_string);
        let (addr, admin) = (cluster.ctls[other].addr.to_string(), cluster.fleet.admin.clone());
        move || {
            let out = std::process::Command::new(STAGEHAND)
                .args(&args)
                .env("STAGEHAND_CONTROLLER", addr)
                .env("STAGEHAND_CREDENTIALS", admin)
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "rollout status --watch through controller {other}:\n{out}{err}\n{}", cluster.logs());
    eprintln!("the rollout finished {:?} after it started, its leader killed", first.elapsed());
    for a in &agents {
        assert_eq!(current(a).as_deref(), Some("v2"), "{}", a.dir.display());
        assert_eq!(activations(a), "v1\nv2\n", "{} was activated more than once", a.dir.display());
    }
    let waves =
        cluster.logs().lines().filter(|l| l.contains("Wave started.") && l.contains(&format!("rollout={id}"))).count();
    assert_eq!(waves, 3, "each wave sent once:\n{}", cluster.logs());

    // The agents of the killed controller moved: a rollback through the third reaches all.
    let third = (leader + 2) % 3;
    let (code, out, err) = cli(&cluster, third, &["rollback", "web", "--env", "prod", "--wait", "--timeout", "60s"]);
    assert_eq!(code, 0, "{out}{err}\n{}\n{}", presence(&cluster), cluster.logs());
    for a in &agents {
        assert_eq!(current(a).as_deref(), Some("v1"), "{}", a.dir.display());
    }
    let c = &cluster;
    wait_for("the third controller to list every agent connected", Duration::from_secs(10), || async move {
        connected(c, third) == 4
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}\n{}\n{}", connected(c, third), presence(c), c.logs()));
    for mut a in agents {
        a.stop().await;
    }
    cluster.etcd.kill();
}

/// etcd goes away: every controller refuses changes with a clear error and keeps answering
/// what it holds; when etcd returns, changes are made again and seen by the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_refuse_changes_while_etcd_is_away_and_recover_when_it_returns() {
    let Some(mut cluster) = Cluster::start(2).await else { return };
    let mut agents = agents(&cluster, 2).await;
    let c = &cluster;
    wait_for("both agents to be listed connected", Duration::from_secs(60), || async move { connected(c, 1) == 2 })
        .await
        .unwrap();
    cluster.etcd.kill();
    let c = &cluster;
    wait_for("a controller to refuse a change", Duration::from_secs(30), || async move {
        let (code, out, err) = cli(c, 0, &["token", "create", "--env", "prod"]);
        code != 0 && format!("{out}{err}").contains("unavailable")
    })
    .await
    .unwrap();
    let (code, out, err) = cli(&cluster, 1, &["token", "create", "--env", "prod"]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("shared state store is unavailable") && err.contains("nothing was changed"), "{err}");
    // Reads are answered from what each controller holds.
    let (code, out, err) = cli(&cluster, 1, &["agents", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("p0") && out.contains("p1"), "{out}");

    cluster.etcd.restart().await.unwrap();
    let c = &cluster;
    let mut token = String::new();
    wait_for("a change to be made again", Duration::from_secs(60), || {
        let (code, out, _) = cli(c, 0, &["token", "create", "--env", "prod"]);
        if code == 0 {
            token = out.trim().to_string();
        }
        async move { code == 0 }
    })
    .await
    .unwrap();
    // The other controller knows the token made through the first: an agent joins with it there.
    let dir = cluster.fleet.path().join("agents").join("late");
    let joined = stagehand_agent::join::join(
        &cluster.ctls[1].addr.to_string(),
        &token,
        &dir,
        Some("late".into()),
        Default::default(),
    )
    .await;
    assert!(joined.is_ok(), "joining through the other controller with {token:?}: {joined:?}");
    for a in agents.iter_mut() {
        a.stop().await;
    }
}
