//! Release policy (SPEC §14) through the commands an operator runs: approvals that agents
//! check (and a loosened policy they refuse), a tampered controller and forged approvals
//! refused by the agent, windows and freezes that hold back releases but not rollbacks,
//! `[verify]` gating a release, and a preview beside the live version.

use crate::rollout::{current, tree};
use crate::traffic::{get, push_and_stage, traffic_fleet};
use crate::{AGENT, STAGEHAND};
use ed25519_dalek::SigningKey;
use stagehand_common::activate::{self, Activate, SignedActivate, Targets, FULL_TRAFFIC};
use stagehand_common::policy::{self as pol, Approved, Plan, Policy};
use stagehand_common::Digest;
use stagehand_tests::{wait_for, Fleet, TestAgent};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Runs `stagehand` with the fleet's address and `creds` (default: the first admin's).
async fn cli(fleet: &Fleet, creds: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    let (addr, creds) = (fleet.addr, creds.map_or(fleet.admin.clone(), Path::to_path_buf));
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    run(
        STAGEHAND,
        args,
        vec![
            ("STAGEHAND_CONTROLLER".into(), addr.to_string()),
            ("STAGEHAND_CREDENTIALS".into(), creds.display().to_string()),
        ],
    )
    .await
}

async fn run(bin: &'static str, args: Vec<String>, env: Vec<(String, String)>) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin).args(&args).envs(env).stdin(std::process::Stdio::null()).output()
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

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Restarts the controller with `extra` appended to the config `controller init` wrote.
async fn configure(fleet: &mut Fleet, base: &str, extra: &str) {
    fleet.stop_controller().await;
    std::fs::write(fleet.ctl_dir.join("controller.toml"), format!("{base}\n{extra}")).unwrap();
    fleet.restart_controller().await.unwrap();
}

/// A releaser of prod with its own credentials (and approval key).
async fn releaser(fleet: &Fleet, name: &str) -> PathBuf {
    let dir = fleet.path().join(name);
    let (code, out, err) = cli(
        fleet,
        None,
        &["admin", "add", name, "--role", "releaser", "--env", "prod", "--out", dir.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(dir.join("approval.key").exists());
    dir
}

/// Pushes and stages each version on prod; their digests.
async fn stage(fleet: &Fleet, versions: &[&str]) -> Vec<Digest> {
    let mut digests = Vec::new();
    for v in versions {
        digests.push(fleet.push("web", v, &tree(fleet.path(), v)).await.unwrap().digest);
        assert!(fleet.deploy("web", v, "prod", 60).await.unwrap().all_done());
    }
    digests
}

/// `policy show -o json` of prod.
async fn policy_of_prod(fleet: &Fleet) -> serde_json::Value {
    let (code, out, err) = cli(fleet, None, &["policy", "show", "--env", "prod", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    json(&out)[0].clone()
}

/// Waits until every prod agent reports what `ok` accepts of (serial, approvals, refused).
async fn agents_report(fleet: &Fleet, what: &str, ok: impl Fn(u64, u64, &str) -> bool) {
    wait_for(what, Duration::from_secs(30), || async {
        let p = policy_of_prod(fleet).await;
        let agents = p["agents"].as_array().cloned().unwrap_or_default();
        !agents.is_empty()
            && agents.iter().all(|a| ok(a[1].as_u64().unwrap(), a[2].as_u64().unwrap(), a[3].as_str().unwrap()))
    })
    .await
    .unwrap();
}

/// Applies a message from a file on an agent (through the running agent's socket).
async fn apply(agent: &TestAgent, file: &Path) -> (i32, String) {
    let args = ["activate", "--data-dir", agent.dir.to_str().unwrap(), "--file", file.to_str().unwrap(), "-o", "json"];
    let (code, out, err) = run(AGENT, args.iter().map(|s| s.to_string()).collect(), vec![]).await;
    (code, format!("{out}{err}"))
}

fn reason(out: &str) -> String {
    let start = out.find('{').unwrap_or(0);
    let v: serde_json::Value = serde_json::Deserializer::from_str(&out[start..]).into_iter().next().unwrap().unwrap();
    v["reason"].as_str().unwrap_or(v["outcome"].as_str().unwrap_or_default()).to_string()
}

#[tokio::test]
async fn approvals_are_checked_by_agents_and_a_loosened_policy_is_refused_without_them() {
    let mut fleet = Fleet::start().await.unwrap();
    let base = std::fs::read_to_string(fleet.ctl_dir.join("controller.toml")).unwrap();
    // Approvers first: a policy that requires more approvals than there are approvers is
    // never signed (and `admin`, whose credentials sit on the controller host, has no key).
    let alice = releaser(&fleet, "alice").await;
    let bob = releaser(&fleet, "bob").await;
    configure(&mut fleet, &base, "[environments.prod]\napprovals = 1\n").await;
    let agents = [fleet.agent("prod", "p1").await.unwrap(), fleet.agent("prod", "p2").await.unwrap()];
    stage(&fleet, &["v1", "v2", "v3"]).await;
    agents_report(&fleet, "agents enforcing one approval", |serial, approvals, _| serial > 0 && approvals == 1).await;

    // The release waits for approval; nothing switches.
    let (code, out, err) = cli(&fleet, Some(&alice), &["release", "web", "v1", "--env", "prod", "-o", "json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let r = json(&out);
    let id = r["rollout"].as_str().unwrap().to_string();
    assert_eq!(r["state"], "awaiting-approval", "{r}");
    let (_, list, _) = cli(&fleet, None, &["rollout", "list"]).await;
    assert!(list.contains(&id) && list.contains("awaiting-approval"), "{list}");
    assert!(list.contains(&format!("0 of 1 approval(s): stagehand approve {id}")), "{list}");

    // Its requester cannot approve it, nor can an identity without an approval key.
    let (code, _, err) = cli(&fleet, Some(&alice), &["approve", &id]).await;
    assert_eq!(code, 1);
    assert!(err.contains("alice requested rollout") && err.contains("another identity"), "{err}");
    let (code, _, err) = cli(&fleet, None, &["approve", &id]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no approval key"), "{err}");
    assert!(agents.iter().all(|a| current(a).is_none()));

    // A second identity approves it: it runs to the end, and says who approved.
    let (code, out, err) = cli(&fleet, Some(&bob), &["approve", &id]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli(&fleet, None, &["rollout", "status", &id, "--watch"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(agents.iter().all(|a| current(a).as_deref() == Some("v1")));
    let (_, out, _) = cli(&fleet, None, &["rollout", "status", &id, "-o", "json"]).await;
    assert_eq!(json(&out)["approvals"][0]["by"], "bob", "{out}");
    let (_, out, _) = cli(&fleet, None, &["rollout", "status", &id]).await;
    assert!(out.contains("approvals: 1 of 1 (bob at "), "{out}");
    let (_, list, _) = cli(&fleet, None, &["rollout", "list"]).await;
    assert!(list.contains("approved by bob at "), "{list}");

    // The controller's config says approvals = 0 now: agents refuse that loosening.
    configure(&mut fleet, &base, "[environments.prod]\napprovals = 0\n").await;
    agents_report(&fleet, "agents refusing the loosened policy", |_, approvals, refused| {
        approvals == 1 && refused.contains("loosened-without-approvals")
    })
    .await;
    let p = policy_of_prod(&fleet).await;
    let pending = p["pending"][0].as_str().unwrap().to_string();
    let (_, shown, _) = cli(&fleet, None, &["policy", "show", "--env", "prod"]).await;
    assert!(shown.contains("approvals") && shown.contains("controller.toml [environments.prod]"), "{shown}");
    assert!(shown.contains(&format!("stagehand approve {pending}")), "{shown}");

    // A release that controller writes is refused by every prod agent; nothing switches.
    let (code, out, _) = cli(&fleet, None, &["release", "web", "v2", "--env", "prod", "--wait", "-o", "json"]).await;
    assert_eq!(code, 1, "{out}");
    let r = json(&out);
    assert!(r["reason"].as_str().unwrap().contains("approvals-missing"), "{r}");
    // (A host still to answer when the first refused is sent back to v1, which it runs.)
    assert!(agents.iter().all(|a| !crate::rollout::activations(a).contains("v2")), "v2 was never activated");
    // So is the same release exported and carried by hand.
    let file = fleet.path().join("v2.json");
    let (code, _, err) =
        cli(&fleet, None, &["release", "web", "v2", "--env", "prod", "--export", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out) = apply(&agents[0], &file).await;
    assert_eq!(code, 1, "{out}");
    assert_eq!(reason(&out), "approvals-missing", "{out}");
    assert!(agents.iter().all(|a| current(a).as_deref() == Some("v1")));

    // An approver of the policy in force approves the change: agents take it.
    let (code, out, err) = cli(&fleet, Some(&alice), &["approve", &pending]).await;
    assert_eq!(code, 0, "{out}{err}");
    agents_report(&fleet, "agents taking the approved policy", |_, approvals, refused| {
        approvals == 0 && refused.is_empty()
    })
    .await;
    let (code, out, err) = cli(&fleet, None, &["release", "web", "v3", "--env", "prod", "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(agents.iter().all(|a| current(a).as_deref() == Some("v3")));
}

/// A message the release key signed, as a tampered controller could write it.
fn message(version: &str, digest: Digest, seq: u64, approved: Option<Approved>, key: &SigningKey) -> SignedActivate {
    let body = Activate {
        app: "web".into(),
        version: version.into(),
        digest,
        env: "prod".into(),
        targets: Targets::All,
        rollout_id: "r-forged".into(),
        seq,
        not_before: 0,
        expires_at: stagehand_common::ids::now_secs() + 600,
        key_id: activate::ReleaseKey::from_signing(key).key_id,
        traffic: FULL_TRAFFIC,
        approved,
    };
    activate::sign(&body, key)
}

fn approved_by(plan_for: (&str, Digest), requester: &str, by: &[(&str, &SigningKey)]) -> Approved {
    let plan = Plan {
        app: "web".into(),
        version: plan_for.0.into(),
        digest: plan_for.1,
        env: "prod".into(),
        rollout_id: "r-forged".into(),
        requester: requester.into(),
        targets: 1,
        hosts: Digest([0; 32]),
    };
    let approvals = by.iter().map(|(n, k)| pol::approve_plan(&plan, n, k)).collect();
    Approved { rollout_id: plan.rollout_id, requester: requester.into(), targets: 1, hosts: plan.hosts, approvals }
}

fn write(dir: &Path, name: &str, m: &SignedActivate, policy: Option<&pol::SignedPolicy>) -> PathBuf {
    let body = Activate::decode_unverified(&m.body).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, m.to_export_full(&body, &[], &policy.cloned().into_iter().collect::<Vec<_>>())).unwrap();
    path
}

#[tokio::test]
async fn a_tampered_controller_and_forged_approvals_are_refused_by_the_agent() {
    let mut fleet = Fleet::start().await.unwrap();
    let base = std::fs::read_to_string(fleet.ctl_dir.join("controller.toml")).unwrap();
    let alice_dir = releaser(&fleet, "alice").await;
    configure(&mut fleet, &base, "[environments.prod]\napprovals = 1\n").await;
    let agent = fleet.agent("prod", "p1").await.unwrap();
    let digests = stage(&fleet, &["v1", "v2"]).await;
    let (d1, d2) = (digests[0], digests[1]);
    agents_report(&fleet, "the agent enforcing one approval", |_, approvals, _| approvals == 1).await;
    let key = stagehand_controller::init::load_release_key(&stagehand_controller::config::Layout::new(&fleet.ctl_dir))
        .unwrap();
    let alice = stagehand_controller::keys::load_approval_key(&alice_dir).unwrap();
    let mallory = SigningKey::from_bytes(&[9; 32]);
    let dir = fleet.path();

    // The controller skips the approval step: no approvals at all.
    let (code, out) = apply(&agent, &write(dir, "a", &message("v1", d1, 100, None, &key), None)).await;
    assert_eq!((code, reason(&out)), (1, "approvals-missing".into()), "{out}");
    // Forged: alice's name, another key.
    let forged = approved_by(("v1", d1), "admin", &[("alice", &mallory)]);
    let (code, out) = apply(&agent, &write(dir, "b", &message("v1", d1, 101, Some(forged), &key), None)).await;
    assert_eq!((code, reason(&out)), (1, "approvals-missing".into()), "{out}");
    // The requester approving itself.
    let own = approved_by(("v1", d1), "alice", &[("alice", &alice)]);
    let (code, out) = apply(&agent, &write(dir, "c", &message("v1", d1, 102, Some(own), &key), None)).await;
    assert_eq!((code, reason(&out)), (1, "approvals-missing".into()), "{out}");
    // A real approval of another version, moved onto this one.
    let moved = approved_by(("v2", d2), "admin", &[("alice", &alice)]);
    let (code, out) = apply(&agent, &write(dir, "d", &message("v1", d1, 103, Some(moved), &key), None)).await;
    assert_eq!((code, reason(&out)), (1, "approvals-missing".into()), "{out}");
    // A policy the release key signed that lowers approvals, carried without approvals.
    let loosened = pol::sign(Policy { serial: 1000, ..Policy::none("prod") }, &key);
    let (code, out) = apply(&agent, &write(dir, "e", &message("v1", d1, 104, None, &key), Some(&loosened))).await;
    assert_eq!((code, reason(&out)), (1, "approvals-missing".into()), "{out}");
    // One that adds the controller's own approver, carried without approvals; then that
    // approver's approval.
    let alice_public = pol::Approver { name: "alice".into(), key: alice.verifying_key().to_bytes() };
    let mallory_public = pol::Approver { name: "mallory".into(), key: mallory.verifying_key().to_bytes() };
    let widened =
        Policy { serial: 1001, approvals: 1, approvers: vec![alice_public, mallory_public], ..Policy::none("prod") };
    let widened = pol::sign(widened, &key);
    let by_mallory = approved_by(("v1", d1), "admin", &[("mallory", &mallory)]);
    let m = message("v1", d1, 105, Some(by_mallory), &key);
    let (code, out) = apply(&agent, &write(dir, "e2", &m, Some(&widened))).await;
    assert_eq!((code, reason(&out)), (1, "approvals-missing".into()), "{out}");
    assert_eq!(current(&agent), None, "nothing switched");

    // With alice's approval of this plan, the same message applies.
    let good = approved_by(("v1", d1), "admin", &[("alice", &alice)]);
    let (code, out) = apply(&agent, &write(dir, "f", &message("v1", d1, 106, Some(good), &key), None)).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(current(&agent).as_deref(), Some("v1"));
    // And the loosened policy with alice's approval is taken: no approvals needed after it.
    let mut approved_policy = loosened.clone();
    approved_policy.approvals = vec![pol::approve_policy(&loosened.body, "alice", &alice)];
    let (code, out) =
        apply(&agent, &write(dir, "g", &message("v2", d2, 107, None, &key), Some(&approved_policy))).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(current(&agent).as_deref(), Some("v2"));
}

/// The day after tomorrow's weekday (UTC), for a window that is certainly closed now.
fn later_day() -> &'static str {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    DAYS[((stagehand_common::ids::now_secs() / 86_400 + 2) % 7) as usize]
}

#[tokio::test]
async fn windows_and_freezes_hold_back_releases_and_never_rollbacks() {
    let mut fleet = Fleet::start().await.unwrap();
    let base = std::fs::read_to_string(fleet.ctl_dir.join("controller.toml")).unwrap();
    let agent = fleet.agent("prod", "p1").await.unwrap();
    stage(&fleet, &["v1", "v2", "v3"]).await;
    for v in ["v1", "v2"] {
        let (code, _, err) = cli(&fleet, None, &["release", "web", v, "--env", "prod", "--wait"]).await;
        assert_eq!(code, 0, "{err}");
    }
    configure(&mut fleet, &base, &format!("[environments.prod]\nwindows = [\"{} 00:00-00:01 UTC\"]\n", later_day()))
        .await;

    // Outside the window: refused with --no-wait-window, else it waits and says until when.
    let (code, _, err) = cli(&fleet, None, &["release", "web", "v3", "--env", "prod", "--no-wait-window"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("outside its release windows; the next opens"), "{err}");
    let (code, out, err) = cli(&fleet, None, &["release", "web", "v3", "--env", "prod", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let id = json(&out)["rollout"].as_str().unwrap().to_string();
    assert_eq!(json(&out)["state"], "awaiting-window", "{out}");
    let (_, out, _) = cli(&fleet, None, &["rollout", "status", &id]).await;
    assert!(out.contains("waits for its release window, opening"), "{out}");
    // A rollback goes ahead of it, and it ends having sent nothing.
    let (code, out, err) = cli(&fleet, None, &["rollback", "web", "--env", "prod", "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(current(&agent).as_deref(), Some("v1"));
    let (_, out, _) = cli(&fleet, None, &["rollout", "status", &id, "-o", "json"]).await;
    assert_eq!(json(&out)["state"], "aborted", "{out}");

    // A freeze: releases refused, a rollback runs; unfreeze and the release runs.
    configure(&mut fleet, &base, "").await;
    let (code, out, err) =
        cli(&fleet, None, &["freeze", "--env", "prod", "--until", "+1h", "--reason", "incident 42"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = cli(&fleet, None, &["release", "web", "v3", "--env", "prod"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("prod is frozen until") && err.contains("incident 42") && err.contains("unfreeze"), "{err}");
    let (code, out, err) = cli(&fleet, None, &["rollback", "web", "--env", "prod", "--to", "v2", "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(current(&agent).as_deref(), Some("v2"));
    let (_, shown, _) = cli(&fleet, None, &["policy", "show", "--env", "prod"]).await;
    assert!(shown.contains("incident 42"), "{shown}");
    // Lifted by whoever froze it or an owner, not by a releaser it holds back.
    let alice = releaser(&fleet, "alice").await;
    let (code, _, err) = cli(&fleet, Some(&alice), &["unfreeze", "--env", "prod"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("frozen by admin; only they or an owner"), "{err}");
    let (code, _, err) = cli(&fleet, None, &["unfreeze", "--env", "prod"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli(&fleet, None, &["release", "web", "v3", "--env", "prod", "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(current(&agent).as_deref(), Some("v3"));

    // `admin`, made by `controller init`, has no approval key; it makes one away from the
    // controller's data directory, once.
    assert!(!fleet.admin.join("approval.key").exists());
    let (code, _, err) = cli(&fleet, None, &["admin", "approval-key"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("inside a controller's data directory"), "{err}");
    let own = fleet.path().join("admin-elsewhere");
    std::fs::create_dir_all(&own).unwrap();
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        std::fs::copy(fleet.admin.join(f), own.join(f)).unwrap();
    }
    let (code, out, err) = cli(&fleet, Some(&own), &["admin", "approval-key"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(own.join("approval.key").exists() && !fleet.admin.join("approval.key").exists());
    let (code, _, err) = cli(&fleet, Some(&own), &["admin", "approval-key"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("holds an approval key already"), "{err}");

    // All of it is in the audit log.
    let (_, log, _) =
        run(STAGEHAND, vec!["audit".into(), "--data-dir".into(), fleet.ctl_dir.display().to_string()], vec![]).await;
    for what in ["freeze", "unfreeze", "rollback", "incident 42"] {
        assert!(log.contains(what), "the audit log lacks {what}:\n{log}");
    }
}

#[tokio::test]
async fn with_verify_a_version_whose_verify_failed_on_a_host_is_refused_naming_it() {
    let mut fleet = Fleet::start().await.unwrap();
    let base = std::fs::read_to_string(fleet.ctl_dir.join("controller.toml")).unwrap();
    configure(&mut fleet, &base, "[environments.prod]\nverify = true\n").await;
    let mut digests = Vec::new();
    let agents = [fleet.agent("prod", "p1").await.unwrap(), fleet.agent("prod", "p2").await.unwrap()];
    std::fs::create_dir_all(agents[1].app_root("web")).unwrap();
    std::fs::write(agents[1].app_root("web").join("noverify"), "").unwrap();
    for v in ["v1", "v2"] {
        let src = tree(fleet.path(), v);
        let mut toml = std::fs::read_to_string(src.join("stagehand.toml")).unwrap();
        toml.push_str("\n[verify]\ncommand = \"echo checking $STAGEHAND_VERSION; test ! -e ../../noverify\"\n");
        std::fs::write(src.join("stagehand.toml"), toml).unwrap();
        digests.push(fleet.push("web", v, &src).await.unwrap().digest);
        if v == "v2" {
            std::fs::remove_file(agents[1].app_root("web").join("noverify")).unwrap();
        }
        assert!(fleet.deploy("web", v, "prod", 60).await.unwrap().all_done());
    }
    // Every host's verify of both versions has reported.
    wait_for("verify results", Duration::from_secs(30), || async {
        let (_, out, _) = cli(&fleet, None, &["status", "web", "--env", "prod", "-o", "json"]).await;
        json(&out)["agents"].as_array().unwrap().iter().all(|a| a["verify"].as_array().is_some_and(|v| v.len() == 2))
    })
    .await
    .unwrap();
    let (_, out, _) = cli(&fleet, None, &["status", "web", "--env", "prod"]).await;
    assert!(out.contains("[verify] of v1: failed"), "{out}");

    let (code, _, err) = cli(&fleet, None, &["release", "web", "v1", "--env", "prod"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("p2: v1 [verify] failed") && !err.contains("p1:"), "{err}");
    assert!(agents.iter().all(|a| current(a).is_none()));
    let (code, out, err) = cli(&fleet, None, &["release", "web", "v2", "--env", "prod", "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");

    // The agent enforces it too: a message for v1 that skips the controller's check.
    agents_report(&fleet, "agents enforcing verify", |serial, _, _| serial > 0).await;
    let key = stagehand_controller::init::load_release_key(&stagehand_controller::config::Layout::new(&fleet.ctl_dir))
        .unwrap();
    let file = write(fleet.path(), "v1.json", &message("v1", digests[0], 1000, None, &key), None);
    let (code, out) = apply(&agents[1], &file).await;
    assert_eq!((code, reason(&out)), (1, "not-verified".into()), "{out}");
    assert_eq!(current(&agents[1]).as_deref(), Some("v2"));
}

#[tokio::test]
async fn a_preview_runs_the_staged_version_beside_the_live_one_without_traffic() {
    let (fleet, agent, port, _reaper) = traffic_fleet().await;
    push_and_stage(&fleet, "1.0.0", "").await;
    crate::traffic::release(&fleet, "1.0.0", 100).await;
    push_and_stage(&fleet, "2.0.0", "").await;

    let (code, out, err) = cli(&fleet, None, &["preview", "web", "2.0.0", "--env", "prod"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let preview: u16 = out.split("on port ").nth(1).unwrap().trim().parse().unwrap();
    assert_eq!(get(preview, "/").await.unwrap(), "web 2.0.0");
    assert_eq!(get(port, "/").await.unwrap(), "web 1.0.0", "traffic stays with the live version");
    let (_, status, _) = cli(&fleet, None, &["status", "web", "--env", "prod"]).await;
    assert!(status.contains(&format!("preview: 2.0.0 on port {preview}")), "{status}");

    let (code, out, err) = cli(&fleet, None, &["preview", "stop", "web", "--env", "prod"]).await;
    assert_eq!(code, 0, "{out}{err}");
    wait_for("the preview to stop", Duration::from_secs(10), || async { get(preview, "/").await.is_err() })
        .await
        .unwrap();
    assert_eq!(get(port, "/").await.unwrap(), "web 1.0.0");
    assert_eq!(current(&agent).as_deref(), Some("1.0.0"));
}

#[tokio::test]
async fn rollbacks_to_versions_that_ran_need_no_approvals_however_many() {
    let mut fleet = Fleet::start().await.unwrap();
    let base = std::fs::read_to_string(fleet.ctl_dir.join("controller.toml")).unwrap();
    let alice = releaser(&fleet, "alice").await;
    let bob = releaser(&fleet, "bob").await;
    configure(&mut fleet, &base, "[environments.prod]\napprovals = 1\n").await;
    let agent = fleet.agent("prod", "p1").await.unwrap();
    stage(&fleet, &["v1", "v2", "v3"]).await;
    agents_report(&fleet, "the agent enforcing one approval", |_, approvals, _| approvals == 1).await;
    for v in ["v1", "v2", "v3"] {
        let (code, out, err) = cli(&fleet, Some(&alice), &["release", "web", v, "--env", "prod", "-o", "json"]).await;
        assert_eq!(code, 0, "{out}{err}");
        let id = json(&out)["rollout"].as_str().unwrap().to_string();
        let (code, out, err) = cli(&fleet, Some(&bob), &["approve", &id]).await;
        assert_eq!(code, 0, "{out}{err}");
        let (code, out, err) = cli(&fleet, None, &["rollout", "status", &id, "--watch"]).await;
        assert_eq!(code, 0, "{out}{err}");
    }
    // Back twice, then forward again to one that ran: no approvals, no waiting.
    for (args, want) in [
        (vec!["rollback", "web", "--env", "prod", "--wait"], "v2"),
        (vec!["rollback", "web", "--env", "prod", "--wait"], "v1"),
        (vec!["rollback", "web", "--env", "prod", "--to", "v3", "--wait"], "v3"),
    ] {
        let (code, out, err) = cli(&fleet, None, &args).await;
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        assert_eq!(current(&agent).as_deref(), Some(want));
    }
}
