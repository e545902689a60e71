//! Rollouts (SPEC §8) on real agents: waves in order with their bake, a failed wave sending
//! every switched host back while later waves stay untouched, pause/resume/abort, the
//! controller killed mid-rollout, offline hosts under each policy, scheduled cutover with
//! the controller stopped, selectors on token labels, and the acceptance run through the CLI.

use crate::STAGEHAND;
use stagehand_common::protocol::{AdminRequest, AdminResponse, Labels, RolloutAction, RolloutSpec, RolloutView};
use stagehand_common::AgentId;
use stagehand_tests::{wait_for, Fleet, Proc, TestAgent};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Health fails on a host whose app root holds a file `unhealthy`; every activation
/// (including a switch back, which runs the old version's hook) is appended to `activations`.
const TOML: &str = r#"
[hooks]
post_activate = "echo $STAGEHAND_VERSION >> ../../activations"
[health]
command = "test ! -e ../../unhealthy"
retries = 1
interval = "10ms"
timeout = "5s"
"#;

pub fn tree(root: &Path, version: &str) -> PathBuf {
    let dir = root.join(format!("src-{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("VERSION"), version).unwrap();
    std::fs::write(dir.join("stagehand.toml"), TOML).unwrap();
    dir
}

fn spec(version: &str) -> RolloutSpec {
    RolloutSpec { app: "web".into(), version: Some(version.into()), env: "prod".into(), ..Default::default() }
}

pub fn current(a: &TestAgent) -> Option<String> {
    a.current("web").map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
}

pub fn activations(a: &TestAgent) -> String {
    std::fs::read_to_string(a.app_root("web").join("activations")).unwrap_or_default()
}

fn hosts(r: &RolloutView, wave: usize) -> Vec<(String, String)> {
    r.waves[wave].hosts.iter().map(|h| (h.name.clone(), h.state.clone())).collect()
}

/// Pushes `versions` and stages them on every agent of `env`.
async fn stage(fleet: &Fleet, env: &str, versions: &[&str]) {
    for v in versions {
        fleet.push("web", v, &tree(fleet.path(), v)).await.unwrap();
        assert!(fleet.deploy("web", v, env, 60).await.unwrap().all_done());
    }
}

/// `n` prod agents with v1 live and v2 staged.
async fn prod(fleet: &Fleet, n: usize) -> Vec<TestAgent> {
    let mut agents = Vec::new();
    for i in 1..=n {
        agents.push(fleet.agent("prod", &format!("p{i}")).await.unwrap());
    }
    stage(fleet, "prod", &["v1", "v2"]).await;
    assert!(fleet.release("web", "v1", "prod").await.unwrap().all_done());
    agents
}

#[tokio::test]
async fn a_failed_wave_sends_every_switched_host_back_and_later_waves_stay_untouched() {
    let fleet = Fleet::start().await.unwrap();
    let agents = prod(&fleet, 4).await;
    std::fs::write(agents[1].app_root("web").join("unhealthy"), "").unwrap();
    let r = fleet.rollout(RolloutSpec { waves: Some("1,50%,100%".into()), ..spec("v2") }).await.unwrap();
    assert_eq!(r.waves.iter().map(|w| w.hosts.len()).collect::<Vec<_>>(), vec![1, 1, 2]);
    let r = fleet.wait_rollout(&r.id).await.unwrap();
    assert_eq!(r.state, "failed", "{r:#?}");
    assert!(r.reason.contains("p2: unhealthy"), "{}", r.reason);
    assert_eq!(hosts(&r, 0), [("p1".to_string(), "reverted".to_string())]);
    assert_eq!(hosts(&r, 1), [("p2".to_string(), "failed".to_string())]);
    assert_eq!(r.waves[2].state, "untouched");
    assert!(hosts(&r, 2).iter().all(|(_, s)| s == "waiting"));
    for a in &agents {
        assert_eq!(current(a).as_deref(), Some("v1"), "{} is not back on v1", a.dir.display());
    }
    // p1 switched and was sent back; p2 switched and went back by itself; p3, p4 never moved.
    assert_eq!(activations(&agents[0]), "v1\nv2\nv1\n");
    assert_eq!(activations(&agents[1]), "v1\nv2\nv1\n", "p2 switched back by itself");
    assert_eq!(activations(&agents[2]), "v1\n");
    assert_eq!(activations(&agents[3]), "v1\n");
    // The environment still runs v1: nothing was promoted, nothing changed the desired version.
    let AdminResponse::Status { status } =
        fleet.call(AdminRequest::Status { app: "web".into(), env: "prod".into() }).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(status.desired.map(|d| d.0).as_deref(), Some("v1"));
}

#[tokio::test]
async fn a_host_a_failed_rollout_could_not_send_back_returns_to_the_released_version() {
    let fleet = Fleet::start().await.unwrap();
    let mut agents = prod(&fleet, 3).await;
    std::fs::write(agents[2].app_root("web").join("unhealthy"), "").unwrap();
    let r = fleet
        .rollout(RolloutSpec { waves: Some("1,2,3".into()), bake_secs: Some(1), timeout_secs: 3, ..spec("v2") })
        .await
        .unwrap();
    // p2 switches, then goes away before the last wave fails.
    fleet
        .wait_rollout_until(&r.id, "baking wave 2", Duration::from_secs(30), |r| r.waves[1].state == "baking")
        .await
        .unwrap();
    agents[1].stop().await;
    let done = fleet.wait_rollout(&r.id).await.unwrap();
    assert_eq!(done.state, "failed");
    assert_eq!(hosts(&done, 0)[0].1, "reverted");
    assert_eq!(
        (hosts(&done, 1)[0].1.as_str(), done.waves[1].hosts[0].detail.as_str()),
        ("not-reverted", "no answer within the timeout")
    );
    assert_eq!(current(&agents[1]).as_deref(), Some("v2"));
    // When it returns, catch-up brings it back to what the environment runs.
    agents[1].start().await.unwrap();
    let p2 = &agents[1];
    wait_for("p2 back on v1", Duration::from_secs(30), || async { current(p2).as_deref() == Some("v1") })
        .await
        .unwrap();
    assert!(agents.iter().all(|a| current(a).as_deref() == Some("v1")));
}

#[tokio::test]
async fn a_healthy_rollout_passes_its_waves_in_order_after_each_bake() {
    let fleet = Fleet::start().await.unwrap();
    let agents = prod(&fleet, 3).await;
    let r = fleet.rollout(RolloutSpec { waves: Some("1,2,3".into()), bake_secs: Some(1), ..spec("v2") }).await.unwrap();
    let r = fleet.wait_rollout(&r.id).await.unwrap();
    assert_eq!(r.state, "succeeded", "{r:#?}");
    assert!(agents.iter().all(|a| current(a).as_deref() == Some("v2")));
    assert!(agents.iter().all(|a| activations(a) == "v1\nv2\n"));
    // The stored rollout: each wave started only after the one before passed and baked.
    let ctl = &fleet.controller.as_ref().unwrap().controller;
    let stored = ctl.store.rollout(&r.id).unwrap().unwrap();
    for pair in stored.waves.windows(2) {
        let (before, next) = (&pair[0], &pair[1]);
        assert!(next.started.unwrap() >= before.passed.unwrap() + 1000, "{:?} then {:?}", before, next);
    }
    assert_eq!(stored.messages.len(), 3, "one signed message per wave");
}

#[tokio::test]
async fn pause_holds_resume_goes_on_and_abort_sends_back() {
    let fleet = Fleet::start().await.unwrap();
    let agents = prod(&fleet, 3).await;
    let r =
        fleet.rollout(RolloutSpec { waves: Some("1,100%".into()), bake_secs: Some(2), ..spec("v2") }).await.unwrap();
    fleet
        .wait_rollout_until(&r.id, "baking wave 1", Duration::from_secs(30), |r| r.waves[0].state == "baking")
        .await
        .unwrap();
    control(&fleet, &r.id, RolloutAction::Pause).await;
    let paused =
        fleet.wait_rollout_until(&r.id, "paused", Duration::from_secs(30), |r| r.state == "paused").await.unwrap();
    assert_eq!(paused.waves[1].state, "waiting");
    assert_eq!(current(&agents[1]).as_deref(), Some("v1"));
    control(&fleet, &r.id, RolloutAction::Resume).await;
    let done = fleet.wait_rollout(&r.id).await.unwrap();
    assert_eq!(done.state, "succeeded");
    assert!(agents.iter().all(|a| current(a).as_deref() == Some("v2")));

    // Abort in the middle: the canary goes back, the rest never move.
    let r =
        fleet.rollout(RolloutSpec { waves: Some("1,100%".into()), bake_secs: Some(600), ..spec("v1") }).await.unwrap();
    fleet
        .wait_rollout_until(&r.id, "baking wave 1", Duration::from_secs(30), |r| r.waves[0].state == "baking")
        .await
        .unwrap();
    assert_eq!(current(&agents[0]).as_deref(), Some("v1"));
    control(&fleet, &r.id, RolloutAction::Abort).await;
    let aborted = fleet.wait_rollout(&r.id).await.unwrap();
    assert_eq!(aborted.state, "aborted");
    assert!(aborted.reason.contains("aborted by"), "{}", aborted.reason);
    assert_eq!(hosts(&aborted, 0)[0].1, "reverted");
    assert!(agents.iter().all(|a| current(a).as_deref() == Some("v2")));
    // An ended rollout cannot be steered.
    let err = fleet.call(AdminRequest::ControlRollout { id: r.id.clone(), action: RolloutAction::Resume }).await;
    assert!(format!("{:#}", err.unwrap_err()).contains("already aborted"));
}

async fn control(fleet: &Fleet, id: &str, action: RolloutAction) {
    match fleet.call(AdminRequest::ControlRollout { id: id.into(), action }).await.unwrap() {
        AdminResponse::Rollout { .. } => {}
        other => panic!("unexpected {other:?}"),
    }
}

/// A controller run as a process (so it can be killed with SIGKILL), agents in this process.
/// A controller running as a process of its own.
pub struct CtlProc {
    pub proc: Proc,
    pub fleet: Fleet,
    n: usize,
}

impl CtlProc {
    pub async fn start() -> CtlProc {
        let dir = tempfile::Builder::new().prefix("stagehand-test-").tempdir().unwrap();
        let ctl_dir = dir.path().join("controller");
        stagehand_controller::init::init(&ctl_dir, "127.0.0.1:0".parse().unwrap()).unwrap();
        let proc = serve(&ctl_dir, None, dir.path().join("ctl-0.log"));
        let addr_file = ctl_dir.join("controller.addr");
        wait_for("the controller to listen", Duration::from_secs(30), || async { addr_file.exists() }).await.unwrap();
        let addr = std::fs::read_to_string(&addr_file).unwrap().trim().parse().unwrap();
        let fleet = Fleet { admin: ctl_dir.join("admin"), addr, ctl_dir, dir, controller: None };
        CtlProc { proc, fleet, n: 0 }
    }

    /// `kill -9`, then start again on the same address.
    async fn kill9_and_restart(&mut self) {
        self.proc.kill9();
        self.n += 1;
        let log = self.fleet.path().join(format!("ctl-{}.log", self.n));
        self.proc = serve(&self.fleet.ctl_dir, Some(&self.fleet.addr.to_string()), log);
        let fleet = &self.fleet;
        wait_for("the controller to answer again", Duration::from_secs(30), || async {
            fleet.client().await.map(drop).is_ok()
        })
        .await
        .unwrap();
    }
}

fn serve(ctl_dir: &Path, listen: Option<&str>, log: PathBuf) -> Proc {
    let d = ctl_dir.to_str().unwrap();
    let mut args = vec!["controller", "serve", "--data-dir", d];
    if let Some(l) = listen {
        args.extend(["--listen", l]);
    }
    Proc::spawn(STAGEHAND, &args, &[], log).unwrap()
}

#[tokio::test]
async fn a_rollout_survives_kill_9_of_the_controller_and_activates_no_host_twice() {
    let mut ctl = CtlProc::start().await;
    let agents = prod(&ctl.fleet, 3).await;
    // Started and followed by the CLI, which waits the restarts out.
    let addr = ctl.fleet.addr.to_string();
    let admin = ctl.fleet.admin.to_str().unwrap().to_string();
    let env = [("STAGEHAND_CONTROLLER", addr.as_str()), ("STAGEHAND_CREDENTIALS", admin.as_str())];
    let args = ["release", "web", "v2", "--env", "prod", "--waves", "1,2,3", "--bake", "2s", "--wait"];
    let mut cli = Proc::spawn(STAGEHAND, &args, &env, ctl.fleet.path().join("cli.log")).unwrap();
    let fleet = &ctl.fleet;
    wait_for("the rollout to start", Duration::from_secs(30), || async { fleet.rollout_status("r-2").await.is_ok() })
        .await
        .unwrap();
    let r = ctl.fleet.rollout_status("r-2").await.unwrap();
    assert_eq!(r.version, "v2");
    // Killed at once (the first wave being signed or sent), then while the second wave bakes.
    ctl.kill9_and_restart().await;
    let fleet = &ctl.fleet;
    fleet
        .wait_rollout_until(&r.id, "baking wave 2", Duration::from_secs(60), |r| r.waves[1].state == "baking")
        .await
        .unwrap();
    ctl.kill9_and_restart().await;
    let done = ctl.fleet.wait_rollout(&r.id).await.unwrap();
    assert_eq!(done.state, "succeeded", "{done:#?}");
    for a in &agents {
        assert_eq!(current(a).as_deref(), Some("v2"));
        assert_eq!(activations(a), "v1\nv2\n", "{} was activated more than once", a.dir.display());
    }
    // No wave was skipped or repeated: one message per wave, each after the one before.
    let stored = ctl.fleet.rollout_status(&r.id).await.unwrap();
    assert!(stored.waves.iter().all(|w| w.state == "passed"));
    let log: String = (0..=ctl.n)
        .map(|i| std::fs::read_to_string(ctl.fleet.path().join(format!("ctl-{i}.log"))).unwrap_or_default())
        .collect();
    let waves = log.lines().filter(|l| l.contains("Wave started.") && l.contains(&format!("rollout={}", r.id))).count();
    assert_eq!(waves, 3, "{log}");
    let status = cli.wait_exit(Duration::from_secs(60)).await.unwrap();
    assert!(status.success(), "release --wait did not see the rollout through: {}", cli.log_text());
    assert!(cli.log_text().contains("Rollout r-2 succeeded"), "{}", cli.log_text());
}

#[tokio::test]
async fn an_offline_host_waits_is_skipped_or_fails_the_rollout_as_asked() {
    let fleet = Fleet::start().await.unwrap();
    let mut agents = prod(&fleet, 3).await;
    agents[2].stop().await;
    let offline = |r: &RolloutView| r.waves.iter().flat_map(|w| &w.hosts).any(|h| h.name == "p3" && !h.connected);
    wait_for("p3 to be offline", Duration::from_secs(30), || async {
        fleet.rollout(RolloutSpec { dry_run: true, ..spec("v2") }).await.is_ok_and(|r| offline(&r))
    })
    .await
    .unwrap();

    // fail: refused up front, nothing sent.
    let err = fleet.rollout(RolloutSpec { offline: Some("fail".into()), ..spec("v2") }).await.unwrap_err();
    assert!(format!("{err:#}").contains("p3: offline (--offline fail)"), "{err:#}");
    assert!(agents[..2].iter().all(|a| current(a).as_deref() == Some("v1")));

    // skip: the others go ahead; p3 takes the released version when it returns.
    let r = fleet.rollout(RolloutSpec { offline: Some("skip".into()), ..spec("v2") }).await.unwrap();
    assert_eq!(r.skipped.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["p3"]);
    let r = fleet.wait_rollout(&r.id).await.unwrap();
    assert_eq!(r.state, "succeeded");
    assert!(agents[..2].iter().all(|a| current(a).as_deref() == Some("v2")));
    assert_eq!(current(&agents[2]).as_deref(), Some("v1"));
    agents[2].start().await.unwrap();
    let p3 = &agents[2];
    wait_for("p3 to catch up to v2", Duration::from_secs(30), || async { current(p3).as_deref() == Some("v2") })
        .await
        .unwrap();

    // wait (the default): the wave holds at the staged gate until p3 is back.
    agents[2].stop().await;
    let r = fleet.rollout(spec("v1")).await.unwrap();
    let gate = fleet
        .wait_rollout_until(&r.id, "at the gate", Duration::from_secs(30), |r| r.waves[0].state == "staging-gate")
        .await
        .unwrap();
    assert!(gate.waves[0].hosts.iter().all(|h| h.state == "waiting"), "{gate:#?}");
    assert!(agents[..2].iter().all(|a| current(a).as_deref() == Some("v2")), "nothing moves while the gate waits");
    agents[2].start().await.unwrap();
    let r = fleet.wait_rollout(&r.id).await.unwrap();
    assert_eq!(r.state, "succeeded");
    assert!(agents.iter().all(|a| current(a).as_deref() == Some("v1")));
}

#[tokio::test]
async fn a_scheduled_cutover_fires_while_the_controller_is_stopped() {
    let mut fleet = Fleet::start().await.unwrap();
    let agents = prod(&fleet, 2).await;
    let at = stagehand_common::ids::now_secs() + 3;
    let r = fleet.rollout(RolloutSpec { at, ..spec("v2") }).await.unwrap();
    let scheduled = |r: &RolloutView| r.waves[0].hosts.iter().all(|h| h.state == "scheduled");
    fleet.wait_rollout_until(&r.id, "scheduled on every host", Duration::from_secs(30), scheduled).await.unwrap();
    assert!(agents.iter().all(|a| current(a).as_deref() == Some("v1")), "switched before its time");
    fleet.stop_controller().await;
    for a in &agents {
        wait_for("the switch at its time", Duration::from_secs(30), || async { current(a).as_deref() == Some("v2") })
            .await
            .unwrap();
    }
    assert!(stagehand_common::ids::now_secs() >= at);
    // The receipts reach the controller when it returns, and the rollout completes.
    fleet.restart_controller().await.unwrap();
    let r = fleet.wait_rollout(&r.id).await.unwrap();
    assert_eq!(r.state, "succeeded", "{r:#?}");
}

/// Enrols an agent with a token that binds `token_labels`, asking for `own` labels itself.
async fn labelled(fleet: &Fleet, name: &str, token_labels: &[(&str, &str)], own: &[(&str, &str)]) -> TestAgent {
    let labels = |l: &[(&str, &str)]| l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Labels>();
    let req = AdminRequest::CreateToken { env: "prod".into(), ttl_secs: 600, labels: labels(token_labels), uses: 1 };
    let AdminResponse::Token { token, .. } = fleet.call(req).await.unwrap() else { panic!() };
    let dir = fleet.path().join("agents").join(name);
    let id = stagehand_agent::join::join(&fleet.addr.to_string(), &token, &dir, Some(name.into()), labels(own))
        .await
        .unwrap()
        .id;
    let mut a = TestAgent { dir, id, running: None };
    a.start().await.unwrap();
    a
}

#[tokio::test]
async fn selectors_choose_exactly_the_hosts_their_tokens_labelled() {
    let fleet = Fleet::start().await.unwrap();
    let web1 = labelled(&fleet, "web1", &[("role", "web")], &[]).await;
    let web2 = labelled(&fleet, "web2", &[("role", "web"), ("zone", "eu1")], &[]).await;
    // An agent cannot choose the labels that select it: asking for role=web does not make it one.
    let db = labelled(&fleet, "db", &[("role", "db")], &[("role", "web"), ("tier", "gold")]).await;
    let sneaky = labelled(&fleet, "sneaky", &[], &[("role", "web")]).await;
    stage(&fleet, "prod", &["v1"]).await;
    let web = Labels::from([("role".to_string(), "web".to_string())]);
    let r = fleet.rollout(RolloutSpec { selectors: web.clone(), ..spec("v1") }).await.unwrap();
    let mut targets: Vec<AgentId> = r.waves.iter().flat_map(|w| w.hosts.iter().map(|h| h.id.clone())).collect();
    targets.sort();
    let mut want = vec![web1.id.clone(), web2.id.clone()];
    want.sort();
    assert_eq!(targets, want);
    assert_eq!(fleet.wait_rollout(&r.id).await.unwrap().state, "succeeded");
    assert!([&web1, &web2].iter().all(|a| current(a).as_deref() == Some("v1")));
    assert!([&db, &sneaky].iter().all(|a| current(a).is_none()));
    // Two selectors must both match.
    let both = Labels::from([("role".into(), "web".into()), ("zone".into(), "eu1".into())]);
    let plan = fleet.rollout(RolloutSpec { selectors: both, dry_run: true, ..spec("v1") }).await.unwrap();
    assert_eq!(plan.waves.iter().flat_map(|w| &w.hosts).map(|h| h.name.as_str()).collect::<Vec<_>>(), ["web2"]);
    // The agent's own labels are shown as such.
    let AdminResponse::Agents { agents } = fleet.call(AdminRequest::ListAgents).await.unwrap() else { panic!() };
    let d = agents.iter().find(|a| a.name == "db").unwrap();
    assert_eq!(d.labels.get("role").map(String::as_str), Some("db"));
    assert_eq!(d.own_labels.get("tier").map(String::as_str), Some("gold"));
    // A selector nobody matches is an error, not an empty success.
    let none = Labels::from([("role".into(), "cache".into())]);
    let err = fleet.rollout(RolloutSpec { selectors: none, ..spec("v1") }).await.unwrap_err();
    assert!(format!("{err:#}").contains("no agent of prod carries the labels role=cache"), "{err:#}");
}

/// Runs the `stagehand` binary off the runtime (the controller runs in this process).
async fn cli(fleet: &Fleet, args: &[&str]) -> (i32, String, String) {
    let (addr, admin) = (fleet.addr, fleet.admin.clone());
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(STAGEHAND)
            .args(&args)
            .env("STAGEHAND_CONTROLLER", addr.to_string())
            .env("STAGEHAND_CREDENTIALS", admin)
            .stdin(std::process::Stdio::null())
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The issue's acceptance, through the commands of SPEC §6/§8 only: one staging agent and
/// four prod agents.
#[tokio::test]
async fn acceptance_through_the_cli() {
    let fleet = Fleet::start().await.unwrap();
    let staging = fleet.agent("staging", "s1").await.unwrap();
    let mut prod = Vec::new();
    for i in 1..=4 {
        prod.push(fleet.agent("prod", &format!("p{i}")).await.unwrap());
    }
    for v in ["good", "bad", "good2"] {
        let src = tree(fleet.path(), v);
        if v == "bad" {
            std::fs::write(src.join("stagehand.toml"), TOML.replace("test ! -e ../../unhealthy", "exit 1")).unwrap();
        }
        let (code, out, err) = cli(&fleet, &["push", "web", v, src.to_str().unwrap()]).await;
        assert_eq!(code, 0, "{out}{err}");
        for env in ["staging", "prod"] {
            let (code, _, err) = cli(&fleet, &["deploy", "web", v, "--env", env, "--wait"]).await;
            assert_eq!(code, 0, "{err}");
        }
    }
    for env in ["staging", "prod"] {
        let (code, out, err) = cli(&fleet, &["release", "web", "good", "--env", env, "--wait"]).await;
        assert_eq!(code, 0, "{out}{err}");
    }

    // The staging agent reverts the bad version by itself, and the rollout says it failed.
    let (code, out, _) = cli(&fleet, &["release", "web", "bad", "--env", "staging", "--wait"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("s1 failed (unhealthy)") && out.contains("failed"), "{out}");
    assert_eq!(current(&staging).as_deref(), Some("good"));

    // Not promoted from staging: refused for prod, nothing sent.
    let (code, _, err) = cli(&fleet, &["release", "web", "bad", "--env", "prod", "--wait"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("has not completed a rollout in staging") && err.contains("next:"), "{err}");

    // Forced, in waves: only the canary runs it, reverts; exit 1; all four on the previous version.
    let (code, out, err) = cli(
        &fleet,
        &["release", "web", "bad", "--env", "prod", "--force", "--waves", "1,50%,100%", "--wait", "-o", "json"],
    )
    .await;
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for field in ["rollout", "app", "version", "digest", "env", "state"] {
        assert!(!v[field].is_null(), "-o json lacks {field}: {v}");
    }
    assert_eq!(v["state"], "failed");
    assert_eq!(v["forced"], true);
    let states: Vec<Vec<String>> = v["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["hosts"].as_array().unwrap().iter().map(|h| h["state"].as_str().unwrap().to_string()).collect())
        .collect();
    assert_eq!(states, vec![vec!["failed"], vec!["waiting"], vec!["waiting", "waiting"]]);
    assert_eq!(v["waves"][0]["hosts"][0]["receipt"]["outcome"], "refused");
    assert_eq!(v["waves"][0]["hosts"][0]["receipt"]["reason"], "unhealthy");
    for a in &prod {
        assert_eq!(current(a).as_deref(), Some("good"));
        let want = if a.dir.ends_with("p1") { "good\nbad\ngood\n" } else { "good\n" };
        assert_eq!(activations(a), want, "{}", a.dir.display());
    }

    // One prod agent stopped: the dry run shows it offline and changes nothing…
    prod[3].stop().await;
    let p4 = prod[3].id.clone();
    wait_for("p4 to be seen offline", Duration::from_secs(30), || async {
        let (_, out, _) = cli(&fleet, &["agents", "list", "-o", "json"]).await;
        serde_json::from_str::<serde_json::Value>(&out)
            .is_ok_and(|v| v.as_array().unwrap().iter().any(|a| a["id"] == p4.0 && a["connected"] == false))
    })
    .await
    .unwrap();
    // good2 is staged everywhere but has not been through staging: the plan says it would be
    // refused (exit 1), and runs with --force.
    let (code, out, _) = cli(&fleet, &["release", "web", "good2", "--env", "prod", "--dry-run"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("would refuse: web good2") && out.contains("has not completed a rollout in staging"), "{out}");
    let (code, out, err) = cli(&fleet, &["release", "web", "good2", "--env", "prod", "--force", "--dry-run"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("planned") && out.contains("p4: offline; its wave waits for it"), "{out}");
    let (_, list, _) = cli(&fleet, &["rollout", "list", "--env", "prod", "-o", "json"]).await;
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert!(list.as_array().unwrap().iter().all(|r| r["version"] != "good2"), "a dry run started a rollout");
    // …and --offline skip releases to the three others, listing the fourth.
    let (code, out, err) =
        cli(&fleet, &["release", "web", "good2", "--env", "prod", "--force", "--offline", "skip", "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("p4: offline, skipped"), "{out}");
    assert!(prod[..3].iter().all(|a| current(a).as_deref() == Some("good2")));
    assert_eq!(current(&prod[3]).as_deref(), Some("good"));

    // A reader that goes away early (`| head -1`) ends the command quietly, not with a panic.
    for args in [&["rollout", "list"][..], &["agents", "list"][..], &["rollout", "status", "r-1", "-o", "json"][..]] {
        let (addr, admin) = (fleet.addr.to_string(), fleet.admin.clone());
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = tokio::task::spawn_blocking(move || {
            let mut child = std::process::Command::new(STAGEHAND)
                .args(&args)
                .env("STAGEHAND_CONTROLLER", addr)
                .env("STAGEHAND_CREDENTIALS", admin)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            drop(child.stdout.take());
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }

    // A rollback says what it does; a second one says why it cannot go further back.
    let (code, out, err) = cli(&fleet, &["rollback", "web", "--env", "prod", "--offline", "skip", "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rollback of web good to prod") && out.contains("succeeded"), "{out}");
    let (code, _, err) = cli(&fleet, &["rollback", "web", "--env", "prod", "--offline", "skip", "--wait"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("prod has no version of web released before good") && err.contains("--to"), "{err}");
}
