//! Hardening (#9): each finding of the adversarial review, reproduced as it was done.

use crate::STAGEHAND;
use stagehand_agent::config::AgentConfig;
use stagehand_common::activate::Refusal;
use stagehand_common::protocol::{
    AdminRequest, AdminResponse, DeployDown, DeployUp, Receipt, ReceiptOutcome, ReleaseDown, ReleaseUp, RolloutSpec,
    StageOutcome, ALPN_DEPLOY, ALPN_RELEASE, PROTOCOL_VERSION,
};
use stagehand_common::tls::Credentials;
use stagehand_common::{frame, net};
use stagehand_tests::{assert_same_tree, is_final, random_file, run_cli, versioned_tree, wait_for, Fleet, TestAgent};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// Finding 3: a local user who can write to an app root planted a symlink where the root
/// agent stages, and got a file of their choice overwritten and chmod-ed as root. Now an
/// app root (or what the agent keeps under it) that others can change is refused, saying
/// what to fix; once fixed, staging works and the victim was never touched.
#[tokio::test]
async fn an_app_root_others_can_write_is_refused_and_nothing_is_redirected() {
    let fleet = Fleet::start().await.unwrap();
    let mut agent = fleet.enrol("prod", "p").await.unwrap();
    let (root, victim) = (fleet.path().join("srv-web"), fleet.path().join("victim"));
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("f0"), "precious").unwrap();
    std::fs::set_permissions(victim.join("f0"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut c = AgentConfig::load(&agent.dir).unwrap();
    c.apps.entry("web".into()).or_default().root = Some(root.clone());
    c.save(&agent.dir).unwrap();
    agent.start().await.unwrap();

    let src = fleet.path().join("src");
    versioned_tree(&src, 4, 100 << 10, 3).unwrap();
    let pushed = fleet.push("web", "1", &src).await.unwrap();
    // The attacker's moves: a root anyone can write, a staging directory of their own, and
    // in it a symlink where the agent will write version 1 (its digest is no secret).
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::create_dir(root.join(".staging")).unwrap();
    std::fs::set_permissions(root.join(".staging"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let planted = root.join(format!(".staging/1-{}", pushed.digest.short()));
    std::os::unix::fs::symlink(victim.join("d0"), &planted).unwrap();
    std::fs::create_dir(victim.join("d0")).unwrap();
    std::fs::write(victim.join("d0/f0"), "precious").unwrap();

    let refused = |p: &stagehand_tests::Progress, what: &str| {
        let why = &p.failed.first().unwrap_or_else(|| panic!("staged with {what} writable by others: {p:?}")).1;
        assert!(why.contains(what) && why.contains("can be changed by users other than the agent's"), "{why}");
    };
    let p = fleet.deploy("web", "1", "prod", 60).await.unwrap();
    refused(&p, root.to_str().unwrap());
    // The root is fixed; what was planted under it is not.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = fleet.deploy("web", "1", "prod", 60).await.unwrap();
    refused(&p, ".staging");
    assert_eq!(std::fs::read_to_string(victim.join("d0/f0")).unwrap(), "precious");

    std::fs::remove_file(&planted).unwrap();
    std::fs::set_permissions(root.join(".staging"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = fleet.deploy("web", "1", "prod", 60).await.unwrap();
    assert!(p.all_done(), "{p:?}");
    assert_same_tree(&src, &root.join("releases/1"));
    assert_eq!(std::fs::read_to_string(victim.join("d0/f0")).unwrap(), "precious");
    assert_eq!(std::fs::metadata(victim.join("f0")).unwrap().permissions().mode() & 0o777, 0o600);
}

/// A session on one of an enrolled agent's channels, past the hello: its control stream
/// (the receiving side is kept open, as an agent's is, unread).
async fn session(
    fleet: &Fleet,
    agent: &TestAgent,
    alpn: &[u8],
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let creds = Credentials::load(&agent.dir.join("identity")).unwrap();
    let ep = net::client_endpoint(fleet.addr).unwrap();
    let cfg = net::client_config(creds.client_config(alpn).unwrap()).unwrap();
    let conn = net::connect(&ep, fleet.addr, cfg).await.unwrap();
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    if alpn == ALPN_DEPLOY {
        frame::write_msg(&mut s, &DeployUp::Hello { protocol_version: PROTOCOL_VERSION }).await.unwrap();
        let _: Option<DeployDown> = frame::read_msg::<_, _, 1024>(&mut r).await.unwrap();
    } else {
        frame::write_msg(&mut s, &ReleaseUp::Hello { protocol_version: PROTOCOL_VERSION }).await.unwrap();
        let _: Option<ReleaseDown> = frame::read_msg::<_, _, 1024>(&mut r).await.unwrap();
    }
    (conn, s, r)
}

/// An honest agent in prod, and an attacker enrolled in lab whose deploy session has fetched
/// the manifest of a 64 MiB artifact deployed to lab (which makes its chunks the attacker's
/// to fetch).
struct Attacker {
    good: TestAgent,
    conn: quinn::Connection,
    _session: (quinn::SendStream, quinn::RecvStream),
    manifest: stagehand_common::manifest::Manifest,
}

async fn attacker(fleet: &Fleet) -> Attacker {
    let good = fleet.agent("prod", "good").await.unwrap();
    let bad = fleet.enrol("lab", "bad").await.unwrap();
    let src = fleet.path().join("src-1");
    std::fs::create_dir_all(&src).unwrap();
    random_file(&src.join("data"), 64 << 20, 7).unwrap();
    let pushed = fleet.push("web", "1", &src).await.unwrap();
    fleet.call(AdminRequest::Deploy { app: "web".into(), version: "1".into(), env: "lab".into() }).await.unwrap();
    let (conn, control, orders) = session(fleet, &bad, ALPN_DEPLOY).await;
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    frame::write_msg(&mut s, &DeployUp::FetchManifest { digest: pushed.digest }).await.unwrap();
    s.finish().unwrap();
    let bytes = frame::read_blob::<_, { frame::MANIFEST_LIMIT }>(&mut r).await.unwrap().unwrap().unwrap();
    let manifest = stagehand_common::manifest::Manifest::decode(&bytes).unwrap();
    Attacker { good, conn, _session: (control, orders), manifest }
}

/// Finding 2: one enrolled agent sent 76 stage reports for versions nobody ordered, each
/// with a reason of about 1 MiB; they were all kept, and `agents list` and `status` broke
/// for every operator, for good. Names with escape sequences reached operators' terminals.
/// Revoked agents stayed listed forever. Now: reports for nothing ordered are ignored,
/// reasons are capped, a peer reporting a name that is no name is dropped, every text
/// output escapes control characters, and `agents remove` forgets a revoked agent.
// Several threads: the CLI runs as a process and waits while the controller serves it here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_flood_or_garble_what_operators_see() {
    let fleet = Fleet::start().await.unwrap();
    let good = fleet.agent("prod", "good").await.unwrap();
    let src = fleet.path().join("src");
    versioned_tree(&src, 2, 70 << 10, 4).unwrap();
    let pushed = fleet.push("web", "1", &src).await.unwrap();
    assert!(fleet.deploy("web", "1", "prod", 60).await.unwrap().all_done());
    let bad = fleet.enrol("prod", "bad").await.unwrap();

    let (deploy, mut control, _orders) = session(&fleet, &bad, ALPN_DEPLOY).await;
    // As an agent does: what it holds (nothing), so the controller orders version 1.
    frame::write_msg(&mut control, &DeployUp::Inventory { staged: vec![] }).await.unwrap();
    for i in 0..76 {
        let report = DeployUp::StageReport {
            app: "web".into(),
            version: format!("junk-{i}"),
            digest: pushed.digest,
            outcome: StageOutcome::Failed { reason: "x".repeat((1 << 20) - 200) },
        };
        frame::write_msg(&mut control, &report).await.unwrap();
    }
    // A report for the version that was ordered, with a reason of 1 MiB: kept, but cut.
    let report = DeployUp::StageReport {
        app: "web".into(),
        version: "1".into(),
        digest: pushed.digest,
        outcome: StageOutcome::Failed { reason: format!("\x1b[31mred{}", "y".repeat((1 << 20) - 200)) },
    };
    frame::write_msg(&mut control, &report).await.unwrap();
    // And a name that is no name: the peer is dropped.
    let junk = DeployUp::Pruned { app: "web".into(), version: "\x1b]0;pwned\x07".into() };
    frame::write_msg(&mut control, &junk).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), deploy.closed()).await.expect("the lying peer is dropped");

    // On the release channel, a receipt whose `active` is an escape sequence: dropped too.
    let (release, mut control, _messages) = session(&fleet, &bad, ALPN_RELEASE).await;
    let receipt = Receipt {
        agent_id: bad.id.clone(),
        app: "web".into(),
        version: "1".into(),
        seq: 1,
        outcome: ReceiptOutcome::Refused(Refusal::HostError),
        active: Some("\x1b[2J".into()),
        log: String::new(),
        check_us: 0,
        switch_us: 0,
        total_us: 0,
        at: 0,
        applied: false,
    };
    frame::write_msg(&mut control, &ReleaseUp::Receipt(receipt)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), release.closed()).await.expect("the lying peer is dropped");

    let AdminResponse::Agents { agents } = fleet.call(AdminRequest::ListAgents).await.unwrap() else { panic!() };
    let seen = agents.iter().find(|a| a.id == bad.id).unwrap();
    let reported: Vec<String> = seen.apps.iter().flat_map(|a| a.staged.clone()).collect();
    assert!(reported.iter().all(|v| !v.starts_with("junk")), "{reported:?}");
    for args in [&["agents", "list"][..], &["status", "web", "--env", "prod"][..]] {
        let out = run_cli(STAGEHAND, Some(&fleet), args).unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!out.stdout.contains(&0x1b), "{args:?} printed an escape sequence");
        assert!(out.stdout.len() < 64 << 10, "{args:?} printed {} bytes", out.stdout.len());
    }
    let out = run_cli(STAGEHAND, Some(&fleet), &["status", "web", "--env", "prod"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\\u{1b}[31mred"), "the reason, escaped");

    // Revoked, then removed: gone from the list, and its certificate is still refused.
    for (cmd, want) in [("revoke", "Revoked"), ("remove", "Removed")] {
        let out = run_cli(STAGEHAND, Some(&fleet), &["agents", cmd, &bad.id.0]).unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains(want), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = run_cli(STAGEHAND, Some(&fleet), &["agents", "list"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(&bad.id.0) && text.contains(&good.id.0), "{text}");
    let creds = Credentials::load(&bad.dir.join("identity")).unwrap();
    let ep = net::client_endpoint(fleet.addr).unwrap();
    let cfg = net::client_config(creds.client_config(ALPN_DEPLOY).unwrap()).unwrap();
    let refused = match net::connect(&ep, fleet.addr, cfg).await {
        Err(_) => true,
        Ok(conn) => tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.is_ok(),
    };
    assert!(refused, "a removed agent's certificate was accepted");
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb << 10
}

/// Finding 1: one enrolled agent opened 250 fetch streams, each asking 64 times for the
/// largest chunk, and never read them: the controller grew from 247 MB to 2.34 GB in 8 s.
/// Now an agent's session serves a few fetch streams at once with a bounded read-ahead:
/// the controller (a process of its own) grows by less than 256 MiB while the streams stay
/// open, and another agent stages meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_unread_fetch_streams_from_one_agent_cannot_exhaust_the_controller() {
    let ctl = crate::rollout::CtlProc::start().await;
    let fleet = &ctl.fleet;
    let Attacker { good, conn, manifest, _session } = attacker(fleet).await;
    let largest = manifest.files().flat_map(|(_, _, _, c)| c.iter()).max_by_key(|c| c.len).unwrap();
    assert!(largest.len > 512 << 10, "a large chunk to ask for");

    let before = rss(ctl.proc.child.id());
    let (keep_tx, mut keep_rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..250 {
        let (conn, keep_tx, digest) = (conn.clone(), keep_tx.clone(), largest.digest);
        tokio::spawn(async move {
            let Ok((mut s, r)) = conn.open_bi().await else { return };
            let ask = DeployUp::FetchChunks { digests: vec![digest; 64] };
            if frame::write_msg(&mut s, &ask).await.is_ok() {
                let _ = keep_tx.send((s, r));
            }
        });
    }
    drop(keep_tx);

    // Meanwhile another agent stages a new version.
    let src2 = fleet.path().join("src-2");
    std::fs::create_dir_all(&src2).unwrap();
    random_file(&src2.join("data"), 32 << 20, 8).unwrap();
    fleet.push("web", "2", &src2).await.unwrap();
    let p = fleet.deploy("web", "2", "prod", 120).await.unwrap();
    assert!(p.all_done(), "{p:?}");
    assert_same_tree(&src2, &good.release_dir("web", "2"));

    // The streams stay open, unread: watch the controller for three seconds more.
    let mut peak = rss(ctl.proc.child.id());
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss(ctl.proc.child.id()));
    }
    let grew = peak.saturating_sub(before);
    assert!(grew < 256 << 20, "the controller grew by {} MiB", grew >> 20);
    assert!(keep_rx.try_recv().is_ok(), "the attacker's streams were opened");
    eprintln!("controller RSS: {} MiB before, {} MiB at the peak", before >> 20, peak >> 20);
}

/// The controller serves a bounded number of chunk streams across all agents
/// (`fetch_streams`), so a peer that asks for chunks and reads none could hold every slot and
/// stall staging for the whole fleet. A stream that takes nothing for `FETCH_STALL` (30 s) is
/// dropped with its connection: here the attacker holds both of two slots, and another agent
/// still stages, after the stall is noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_reads_nothing_cannot_hold_the_fleets_fetch_slots() {
    let mut fleet = Fleet::start().await.unwrap();
    let config = fleet.ctl_dir.join("controller.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace("fetch_streams = 32", "fetch_streams = 2");
    std::fs::write(&config, format!("http = \"127.0.0.1:0\"\n{text}")).unwrap();
    fleet.restart_controller().await.unwrap();
    let http = fleet.controller.as_ref().unwrap().http.unwrap();
    let Attacker { good, conn, manifest, _session } = attacker(&fleet).await;
    let digests: Vec<_> = manifest.files().flat_map(|(_, _, _, c)| c.iter().map(|c| c.digest)).collect();
    let mut unread = Vec::new();
    for _ in 0..2 {
        let (mut s, r) = conn.open_bi().await.unwrap();
        frame::write_msg(&mut s, &DeployUp::FetchChunks { digests: digests.clone() }).await.unwrap();
        unread.push((s, r));
    }
    let serving = || async {
        let (_, m) = stagehand_tests::http_get(http, "/metrics").await.unwrap();
        stagehand_tests::metric(&m, "stagehand_fetch_streams{state=\"serving\"}")
    };
    wait_for("the attacker to hold both slots", Duration::from_secs(10), || async { serving().await == Some(2.0) })
        .await
        .unwrap();

    let src2 = fleet.path().join("src-2");
    std::fs::create_dir_all(&src2).unwrap();
    random_file(&src2.join("data"), 8 << 20, 8).unwrap();
    fleet.push("web", "2", &src2).await.unwrap();
    let p = fleet.deploy("web", "2", "prod", 120).await.unwrap();
    assert!(p.all_done(), "{p:?}");
    assert_same_tree(&src2, &good.release_dir("web", "2"));
    assert!(conn.close_reason().is_some(), "the peer that read nothing is dropped");
}

/// An agent with `apps.<app>` settings, staged with one version of each app carrying
/// `stagehand.toml`; returns its directory's agent, not started.
async fn hooked_agent(fleet: &Fleet, apps: &[(&str, &str)], f: impl FnOnce(&mut AgentConfig)) -> TestAgent {
    let agent = fleet.enrol("prod", "p").await.unwrap();
    let mut c = AgentConfig::load(&agent.dir).unwrap();
    f(&mut c);
    c.save(&agent.dir).unwrap();
    for (app, toml) in apps {
        let src = fleet.path().join(format!("src-{app}"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("stagehand.toml"), toml).unwrap();
        fleet.push(app, "1", &src).await.unwrap();
        fleet
            .call(AdminRequest::Deploy { app: app.to_string(), version: "1".into(), env: "prod".into() })
            .await
            .unwrap();
    }
    agent
}

fn env_of(c: &mut AgentConfig, app: &str, vars: &[(&str, &Path)]) {
    let a = c.apps.entry(app.into()).or_default();
    for (k, v) in vars {
        a.env.insert(k.to_string(), v.display().to_string());
    }
}

/// Finding 6, hooks: a hook's timeout killed only its direct child (its subshell's children
/// lived on), and hooks saw the agent's whole environment (`STAGEHAND_CREDENTIALS`
/// included). Now the whole process group dies, and a hook sees only the SPEC's variables,
/// `PATH` and the app's `env`.
#[tokio::test]
async fn a_timed_out_hook_takes_its_process_group_along_and_hooks_see_only_their_environment() {
    let fleet = Fleet::start().await.unwrap();
    let (out, pidfile) = (fleet.path().join("env.txt"), fleet.path().join("pid"));
    let toml = "[hooks]\npre_activate = \"env > \\\"$OUT\\\"; sh -c 'sleep 300 & echo $! > \\\"$PIDFILE\\\"; wait'\"\ntimeout = \"1s\"\n";
    let agent =
        hooked_agent(&fleet, &[("web", toml)], |c| env_of(c, "web", &[("OUT", &out), ("PIDFILE", &pidfile)])).await;
    let dir = agent.dir.to_str().unwrap();
    let env = [("STAGEHAND_CREDENTIALS", "/root/.stagehand/admin"), ("AWS_SECRET_ACCESS_KEY", "hunter2")];
    let _proc =
        stagehand_tests::Proc::spawn(crate::AGENT, &["run", "--data-dir", dir], &env, fleet.path().join("agent.log"))
            .unwrap();
    assert!(fleet.wait_staged("web", "1", "prod", 60).await.unwrap().all_done());

    let p = fleet.release("web", "1", "prod").await.unwrap();
    assert!(p.failed.first().is_some_and(|(_, why)| why.starts_with("pre-activate-failed")), "{p:?}");
    let seen = std::fs::read_to_string(&out).unwrap();
    for want in ["STAGEHAND_APP=web", "STAGEHAND_VERSION=1", "PATH=", "OUT="] {
        assert!(seen.contains(want), "{want} missing from the hook's environment:\n{seen}");
    }
    for secret in ["STAGEHAND_CREDENTIALS", "AWS_SECRET_ACCESS_KEY"] {
        assert!(!seen.contains(secret), "the hook saw {secret}:\n{seen}");
    }
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    let gone = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.is_empty() || stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'))
    };
    wait_for("the hook's grandchild to be killed", Duration::from_secs(10), || async { gone() }).await.unwrap();
}

/// Finding 6, ceilings and locks: an artifact set its own timeouts and retries without a
/// ceiling, while a host-wide lock was held, so one app could block every app's releases
/// on the host. Now `[limits]` in agent.toml caps them, and each app has its own lock.
#[tokio::test]
async fn host_limits_cap_an_artifact_and_one_apps_slow_check_does_not_hold_back_another() {
    let fleet = Fleet::start().await.unwrap();
    let go = fleet.path().join("go");
    let greedy = "[health]\ncommand = \"exit 1\"\nretries = 100000\ninterval = \"10ms\"\n";
    let slow =
        "[health]\ncommand = \"while [ ! -f \\\"$GO\\\" ]; do sleep 0.05; done\"\nretries = 1\ntimeout = \"60s\"\n";
    let apps = [("greedy", greedy), ("slow", slow), ("fast", "")];
    let mut agent = hooked_agent(&fleet, &apps, |c| {
        c.limits.health_retries = Some(2);
        env_of(c, "slow", &[("GO", &go)]);
    })
    .await;
    agent.start().await.unwrap();
    for (app, _) in apps {
        assert!(fleet.wait_staged(app, "1", "prod", 60).await.unwrap().all_done());
    }

    let p = fleet.release("greedy", "1", "prod").await.unwrap();
    let why = &p.failed.first().expect("an unhealthy release").1;
    assert!(why.starts_with("unhealthy"), "{why}");

    // `slow` waits in its health check until `go` exists; `fast` is released meanwhile.
    let slow_rollout = fleet
        .rollout(RolloutSpec {
            app: "slow".into(),
            version: Some("1".into()),
            env: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for("slow to switch and wait in its check", Duration::from_secs(30), || async {
        agent.current("slow").is_some()
    })
    .await
    .unwrap();
    let fast = fleet
        .rollout(RolloutSpec {
            app: "fast".into(),
            version: Some("1".into()),
            env: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let fast = fleet.wait_rollout_until(&fast.id, "succeeded", Duration::from_secs(30), is_final).await.unwrap();
    assert_eq!(fast.state, "succeeded", "{fast:?}");
    assert_eq!(fleet.rollout_status(&slow_rollout.id).await.unwrap().state, "running", "slow is still checking");
    std::fs::write(&go, "").unwrap();
    assert_eq!(fleet.wait_rollout(&slow_rollout.id).await.unwrap().state, "succeeded");
}

/// Finding 6, `user`: an app's hooks run as the user agent.toml names.
#[tokio::test]
async fn hooks_run_as_the_apps_user() {
    let Ok((uid, _)) = stagehand_agent::config::lookup_user("nobody") else { return };
    if !std::fs::read_to_string("/proc/self/status").unwrap().lines().any(|l| l.starts_with("Uid:\t0")) {
        eprintln!("skipped: needs root to change users");
        return;
    }
    let fleet = Fleet::start().await.unwrap();
    let root = fleet.path().join("srv/web");
    let shared = fleet.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    // The test's temporary directory is private: let `nobody` reach the shared one.
    std::fs::set_permissions(fleet.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let out = shared.join("uid");
    let toml = "[hooks]\npost_activate = \"id -u > \\\"$OUT\\\"\"\n";
    let mut agent = hooked_agent(&fleet, &[("web", toml)], |c| {
        env_of(c, "web", &[("OUT", &out)]);
        let web = c.apps.entry("web".into()).or_default();
        web.user = Some("nobody".into());
        // Where `nobody` can reach the release directory (the agent's data directory is private).
        web.root = Some(root.clone());
    })
    .await;
    agent.start().await.unwrap();
    assert!(fleet.wait_staged("web", "1", "prod", 60).await.unwrap().all_done());
    let p = fleet.release("web", "1", "prod").await.unwrap();
    assert!(p.all_done(), "{p:?}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), uid.to_string());
}

/// Finding 5, identities: there was exactly one admin identity, and it could not be revoked,
/// rotated or limited. Now an owner issues identities with roles, every request is
/// authorised against the role, and a revoked identity is refused at once, open
/// connections included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_identities_have_roles_and_a_revoked_one_is_refused_at_once() {
    let fleet = Fleet::start().await.unwrap();
    let (viewer, releaser) = (fleet.path().join("vera"), fleet.path().join("rex"));
    for (name, role, dir, extra) in
        [("vera", "viewer", &viewer, &[][..]), ("rex", "releaser", &releaser, &["--env", "staging"][..])]
    {
        let mut args = vec!["admin", "add", name, "--role", role, "--out", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = run_cli(STAGEHAND, Some(&fleet), &args).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let as_who = |dir: &Path, args: &[&str]| {
        let out = std::process::Command::new(STAGEHAND)
            .args(args)
            .env("STAGEHAND_CONTROLLER", fleet.addr.to_string())
            .env("STAGEHAND_CREDENTIALS", dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let src = fleet.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "x").unwrap();

    let (ok, text) = as_who(&viewer, &["agents", "list"]);
    assert!(ok, "a viewer lists: {text}");
    let (ok, text) = as_who(&viewer, &["push", "web", "1", src.to_str().unwrap()]);
    assert!(!ok && text.contains("may not push or deploy"), "a viewer pushed: {text}");
    let (ok, text) = as_who(&viewer, &["token", "create", "--env", "prod"]);
    assert!(!ok && text.contains("may not manage tokens"), "{text}");
    fleet.push("web", "1", &src).await.unwrap();
    let (ok, text) = as_who(&releaser, &["release", "web", "1", "--env", "prod"]);
    assert!(!ok && text.contains("may not release in prod"), "{text}");
    let (ok, text) = as_who(&releaser, &["admin", "list"]);
    assert!(!ok, "{text}");
    let out = run_cli(STAGEHAND, Some(&fleet), &["admin", "list"]).unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("vera") && list.contains("viewer") && list.contains("staging"), "{list}");

    // An open connection of the viewer's, working; then the identity is revoked.
    let open =
        stagehand_controller::client::Client::connect(Some(&fleet.addr.to_string()), Some(&viewer)).await.unwrap();
    assert!(open.call(&AdminRequest::ListAgents).await.is_ok());
    let out = run_cli(STAGEHAND, Some(&fleet), &["admin", "revoke", "vera"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(open.call(&AdminRequest::ListAgents).await.is_err(), "a revoked identity's open connection still served");
    let (ok, text) = as_who(&viewer, &["agents", "list"]);
    assert!(!ok && text.contains("revoked"), "{text}");
}

/// Finding 4 and the audit log: byte flips in the controller's database silently brought a
/// revoked agent back. Now every revocation, used token, signed seq and receipt is in a
/// hash-chained audit log, durable before it is acknowledged; the controller refuses to start
/// while its database disagrees with the log, naming the repair, which restores the
/// revocation from the log. `stagehand audit --verify` exits 0 on an intact log and 1 once
/// any byte of it is altered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_lost_a_revocation_is_refused_and_repaired_from_the_audit_log() {
    let mut fleet = Fleet::start().await.unwrap();
    let mut agent = fleet.agent("prod", "p").await.unwrap();
    let src = fleet.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "x").unwrap();
    fleet.push("web", "1", &src).await.unwrap();
    assert!(fleet.deploy("web", "1", "prod", 60).await.unwrap().all_done());
    assert!(fleet.release("web", "1", "prod").await.unwrap().all_done());
    let out = run_cli(STAGEHAND, Some(&fleet), &["agents", "revoke", &agent.id.0]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    agent.stop().await;

    let dir = fleet.ctl_dir.to_str().unwrap().to_string();
    let out = run_cli(STAGEHAND, None, &["audit", "--data-dir", &dir]).unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    for what in [
        "enrolled",
        "create-token",
        "push-begin",
        "push-commit",
        "deploy",
        "rollout",
        "signed",
        "receipt",
        "revoke-agent",
    ] {
        assert!(log.contains(what), "no {what} in the audit log:\n{log}");
    }
    assert!(
        log.contains("manifest_bytes") && log.len() < 64 << 10,
        "a push records its manifest's digest, not its bytes"
    );
    let verify = || run_cli(STAGEHAND, None, &["audit", "--data-dir", &dir, "--verify"]).unwrap();
    assert!(verify().status.success(), "{}", String::from_utf8_lossy(&verify().stderr));

    // The database loses the flushed revocation.
    fleet.stop_controller().await;
    {
        let store = stagehand_controller::store::Store::open(&fleet.ctl_dir.join("state")).unwrap();
        let mut rec = store.agent(&agent.id).unwrap().unwrap();
        rec.revoked = false;
        store.put_agent(&rec).unwrap();
        store.flush().unwrap();
    }
    let err = fleet.restart_controller().await.expect_err("a controller that disagrees with its audit log started");
    let err = format!("{err:#}");
    assert!(
        err.contains("revoked in the log but not in the database") && err.contains("stagehand controller repair"),
        "{err}"
    );
    let out = run_cli(STAGEHAND, None, &["controller", "repair", "--data-dir", &dir]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked again"), "{out:?}");
    fleet.restart_controller().await.unwrap();
    let AdminResponse::Agents { agents } = fleet.call(AdminRequest::ListAgents).await.unwrap() else { panic!() };
    assert!(agents.iter().find(|a| a.id == agent.id).unwrap().revoked, "the revocation is back");

    // One byte of the log altered: the chain no longer holds.
    let path = fleet.ctl_dir.join("audit/audit.log");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.iter().position(|b| *b == b'"').unwrap() + 1;
    bytes[at] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let out = verify();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("entry 1"), "{out:?}");
}

/// After the review of finding 3: a root reached through a symlink in a directory others can
/// write is refused too (they could point the link elsewhere), though its target is safe.
#[tokio::test]
async fn a_root_behind_a_symlink_in_a_writable_directory_is_refused() {
    let fleet = Fleet::start().await.unwrap();
    let mut agent = fleet.enrol("prod", "p").await.unwrap();
    let (shared, real) = (fleet.path().join("shared"), fleet.path().join("opt/web"));
    std::fs::create_dir_all(&real).unwrap();
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink(&real, shared.join("web")).unwrap();
    let mut c = AgentConfig::load(&agent.dir).unwrap();
    c.apps.entry("web".into()).or_default().root = Some(shared.join("web"));
    c.save(&agent.dir).unwrap();
    agent.start().await.unwrap();
    let src = fleet.path().join("src");
    versioned_tree(&src, 2, 70 << 10, 5).unwrap();
    fleet.push("web", "1", &src).await.unwrap();
    let p = fleet.deploy("web", "1", "prod", 60).await.unwrap();
    let why = &p.failed.first().unwrap_or_else(|| panic!("staged under a swappable root: {p:?}")).1;
    assert!(why.contains(shared.to_str().unwrap()) && why.contains("can be changed by users other"), "{why}");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(fleet.deploy("web", "1", "prod", 60).await.unwrap().all_done());
    assert_same_tree(&src, &real.join("releases/1"));
}
