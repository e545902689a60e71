//! The release channel and activation: every rule of SPEC §4 refused on a real agent, the
//! switch with health checks and revert, kill -9 at each step, environments kept apart.

use crate::AGENT;
use ed25519_dalek::SigningKey;
use stagehand_agent::host::Host;
use stagehand_common::activate::{self, Activate, Refusal, SignedActivate, Targets};
use stagehand_common::ids::now_secs;
use stagehand_common::protocol::{AdminRequest, AdminResponse, ReceiptOutcome, RolloutSpec};
use stagehand_common::{AgentId, Digest};
use stagehand_tests::{random_file, run_cli, wait_for, Fleet, Progress, TestAgent};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn release_key(fleet: &Fleet) -> SigningKey {
    stagehand_controller::init::load_release_key(&stagehand_controller::config::Layout::new(&fleet.ctl_dir)).unwrap()
}

fn version_tree(root: &Path, version: &str, toml: Option<&str>) -> PathBuf {
    let dir = root.join(format!("src-{version}"));
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(dir.join("VERSION"), version).unwrap();
    random_file(&dir.join("payload"), 256 << 10, version.len() as u64).unwrap();
    if let Some(t) = toml {
        std::fs::write(dir.join("stagehand.toml"), t).unwrap();
    }
    dir
}

async fn digest_of(fleet: &Fleet, app: &str, version: &str) -> Digest {
    let AdminResponse::Deployed { digest, .. } = fleet
        .call(AdminRequest::Deploy { app: app.into(), version: version.into(), env: "prod".into() })
        .await
        .unwrap()
    else {
        panic!()
    };
    digest
}

/// A prod agent with web v1 (live) and v2 staged, stopped, and its host opened here.
async fn staged_host(fleet: &Fleet) -> (TestAgent, Arc<Host>) {
    let mut agent = fleet.agent("prod", "p").await.unwrap();
    for v in ["v1", "v2"] {
        let src = version_tree(fleet.path(), v, None);
        fleet.push("web", v, &src).await.unwrap();
        assert!(fleet.deploy("web", v, "prod", 60).await.unwrap().all_done());
    }
    assert!(fleet.release("web", "v1", "prod").await.unwrap().all_done());
    agent.stop().await;
    let host = Arc::new(Host::open(&agent.dir).unwrap());
    (agent, host)
}

fn body(fleet_key: &SigningKey, me: &AgentId, version: &str, digest: Digest, seq: u64) -> Activate {
    Activate {
        app: "web".into(),
        version: version.into(),
        digest,
        env: "prod".into(),
        targets: Targets::Agents(vec![me.clone()]),
        rollout_id: "test".into(),
        seq,
        not_before: 0,
        expires_at: now_secs() + 600,
        key_id: activate::ReleaseKey::from_signing(fleet_key).key_id,
        traffic: stagehand_common::activate::FULL_TRAFFIC,
        approved: None,
    }
}

/// A release of web `version` to prod with the defaults.
fn spec(version: &str) -> RolloutSpec {
    RolloutSpec { app: "web".into(), version: Some(version.into()), env: "prod".into(), ..Default::default() }
}

async fn refused(host: &Arc<Host>, msg: SignedActivate) -> Refusal {
    let before = std::fs::read_link(host.layout.current("web")).ok();
    let r = stagehand_agent::activate::handle(host, msg).await;
    let after = std::fs::read_link(host.layout.current("web")).ok();
    assert_eq!(before, after, "a refused message changed current");
    // Every refusal before the intent says the seq was not applied: it may be offered again.
    assert!(!r.applied, "{r:?} claims its seq was applied");
    match r.outcome {
        ReceiptOutcome::Refused(why) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn every_rule_refuses_on_a_real_agent() {
    let fleet = Fleet::start().await.unwrap();
    let (agent, host) = staged_host(&fleet).await;
    let key = release_key(&fleet);
    let v2 = digest_of(&fleet, "web", "v2").await;
    let good = body(&key, &agent.id, "v2", v2, 10);

    // Rule 1: a bit flipped in the body, in the signature; another key; the CA key.
    let mut m = activate::sign(&good, &key);
    m.body[20] ^= 0x01;
    assert!(matches!(refused(&host, m).await, Refusal::BadSignature | Refusal::Malformed | Refusal::UnknownKey));
    let mut m = activate::sign(&good, &key);
    m.signature[5] ^= 0x80;
    assert_eq!(refused(&host, m).await, Refusal::BadSignature);
    let impostor = SigningKey::from_bytes(&[3u8; 32]);
    assert_eq!(refused(&host, activate::sign(&good, &impostor)).await, Refusal::BadSignature);
    let ca_key_pem = std::fs::read_to_string(fleet.ctl_dir.join("ca/ca.key")).unwrap();
    let ca_key: rustls::pki_types::PrivateKeyDer =
        rustls::pki_types::pem::PemObject::from_pem_slice(ca_key_pem.as_bytes()).unwrap();
    let signer = rustls::crypto::ring::sign::any_supported_type(&ca_key).unwrap();
    let signer = signer.choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256]).unwrap();
    let mut by_ca = activate::sign(&good, &key);
    by_ca.signature = signer.sign(&by_ca.body).unwrap();
    assert_eq!(refused(&host, by_ca).await, Refusal::BadSignature);

    // Rule 2: another environment; an agent that is not a target.
    let mut b = good.clone();
    b.env = "staging".into();
    assert_eq!(refused(&host, activate::sign(&b, &key)).await, Refusal::WrongEnvironment);
    let mut b = good.clone();
    b.targets = Targets::Agents(vec![AgentId("a-someoneelse".into())]);
    assert_eq!(refused(&host, activate::sign(&b, &key)).await, Refusal::NotTargeted);

    // Rule 4: expired.
    let mut b = good.clone();
    b.expires_at = now_secs() - 1;
    assert_eq!(refused(&host, activate::sign(&b, &key)).await, Refusal::Expired);

    // Rule 5: a version that is not staged.
    let mut b = good.clone();
    b.version = "v9".into();
    assert_eq!(refused(&host, activate::sign(&b, &key)).await, Refusal::NotStaged);
    let mut b = good.clone();
    b.digest = Digest::of(b"something else");
    assert_eq!(refused(&host, activate::sign(&b, &key)).await, Refusal::DigestMismatch);

    // The good message applies; replaying it is a no-op returning the same receipt.
    let msg = activate::sign(&good, &key);
    let first = stagehand_agent::activate::handle(&host, msg.clone()).await;
    assert_eq!(first.outcome, ReceiptOutcome::Committed);
    assert_eq!(agent.current("web").unwrap(), Path::new("releases/v2"));
    let again = stagehand_agent::activate::handle(&host, msg).await;
    assert_eq!(again, first);

    // Rule 3: a lower seq (a rollback must be a new, higher message).
    let v1 = digest_of(&fleet, "web", "v1").await;
    let old = body(&key, &agent.id, "v1", v1, 9);
    assert_eq!(refused(&host, activate::sign(&old, &key)).await, Refusal::StaleSeq);

    // Rule 5: a staged file modified after staging.
    let f = agent.release_dir("web", "v1").join("VERSION");
    std::fs::write(&f, "tampered").unwrap();
    let newer = body(&key, &agent.id, "v1", v1, 11);
    assert_eq!(refused(&host, activate::sign(&newer, &key)).await, Refusal::DigestMismatch);
    // Touching the bytes back does not fool it either: the check falls back to hashing.
    std::fs::write(&f, "v1").unwrap();
    let ok = stagehand_agent::activate::handle(&host, activate::sign(&body(&key, &agent.id, "v1", v1, 12), &key)).await;
    assert_eq!(ok.outcome, ReceiptOutcome::Committed, "identical bytes again are intact");
    assert!(ok.applied && first.applied);

    // A host error before the intent (the journal cannot be read) is not applied either,
    // and the same message applies once the host is repaired.
    let journal = host.layout.journal("web");
    let saved = journal.with_extension("saved");
    std::fs::rename(&journal, &saved).unwrap();
    std::fs::create_dir(&journal).unwrap();
    let msg = activate::sign(&body(&key, &agent.id, "v2", v2, 13), &key);
    assert_eq!(refused(&host, msg.clone()).await, Refusal::HostError);
    std::fs::remove_dir(&journal).unwrap();
    std::fs::rename(&saved, &journal).unwrap();
    let r = stagehand_agent::activate::handle(&host, msg).await;
    assert_eq!((r.outcome, r.applied), (ReceiptOutcome::Committed, true));
    // A message for later is not applied until it is: an offline `activate` refuses it.
    let mut later = body(&key, &agent.id, "v1", v1, 14);
    later.not_before = now_secs() + 3600;
    assert_eq!(refused(&host, activate::sign(&later, &key)).await, Refusal::NotYetValid);
}

#[tokio::test]
async fn release_switches_one_environment_and_rollback_switches_back() {
    let fleet = Fleet::start().await.unwrap();
    let p1 = fleet.agent("prod", "p1").await.unwrap();
    let p2 = fleet.agent("prod", "p2").await.unwrap();
    let s1 = fleet.agent("staging", "s1").await.unwrap();
    for v in ["v1", "v2"] {
        let src = version_tree(fleet.path(), v, None);
        fleet.push("web", v, &src).await.unwrap();
        for env in ["prod", "staging"] {
            assert!(fleet.deploy("web", v, env, 60).await.unwrap().all_done());
        }
    }
    // Not staged anywhere: refused, nothing sent.
    let src = version_tree(fleet.path(), "v3", None);
    fleet.push("web", "v3", &src).await.unwrap();
    // Staging has agents and never ran it: refused for prod unless forced.
    let force = |v: &str| RolloutSpec { force: true, ..spec(v) };
    let err = fleet.rollout(spec("v3")).await.unwrap_err();
    assert!(format!("{err:#}").contains("has not completed a rollout in staging"), "{err:#}");
    let err = fleet.rollout(force("v3")).await.unwrap_err();
    assert!(format!("{err:#}").contains("v3 not staged"), "{err:#}");

    for v in ["v1", "v2"] {
        let r = fleet.rollout(force(v)).await.unwrap();
        assert!(r.forced);
        assert!(Progress::of(&fleet.wait_rollout(&r.id).await.unwrap()).all_done());
        for a in [&p1, &p2] {
            assert_eq!(a.current("web").unwrap(), Path::new("releases").join(v));
        }
        assert!(s1.current("web").is_none(), "release to prod touched staging");
    }
    let (version, id) = fleet.rollback("web", "prod").await.unwrap();
    assert_eq!(version, "v1");
    assert!(Progress::of(&fleet.wait_rollout(&id).await.unwrap()).all_done());
    for a in [&p1, &p2] {
        assert_eq!(a.current("web").unwrap(), Path::new("releases/v1"));
    }
    let AdminResponse::Status { status } =
        fleet.call(AdminRequest::Status { app: "web".into(), env: "prod".into() }).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(status.desired.map(|d| d.0), Some("v1".into()));
    assert!(status.agents.iter().all(|a| a.active.as_deref() == Some("v1")));
}

#[tokio::test]
async fn an_unhealthy_release_switches_back_by_itself_and_says_why() {
    let fleet = Fleet::start().await.unwrap();
    let agent = fleet.agent("prod", "p").await.unwrap();
    let marker = fleet.path().join("hook-env");
    let good = version_tree(
        fleet.path(),
        "good",
        Some(&format!("[hooks]\npost_activate = \"env | grep ^STAGEHAND_ | sort > {}\"\n", marker.display())),
    );
    let bad = version_tree(
        fleet.path(),
        "bad",
        Some("[health]\ncommand = \"echo not today; exit 3\"\nretries = 2\ninterval = \"10ms\"\ntimeout = \"5s\"\n"),
    );
    fleet.push("web", "good", &good).await.unwrap();
    fleet.push("web", "bad", &bad).await.unwrap();
    for v in ["good", "bad"] {
        assert!(fleet.deploy("web", v, "prod", 60).await.unwrap().all_done());
    }
    assert!(fleet.release("web", "good", "prod").await.unwrap().all_done());
    let env = std::fs::read_to_string(&marker).unwrap();
    assert!(env.contains("STAGEHAND_VERSION=good") && env.contains("STAGEHAND_APP=web"), "{env}");

    let p = fleet.release("web", "bad", "prod").await.unwrap();
    assert_eq!(p.failed, vec![(agent.id.clone(), "unhealthy".to_string())]);
    assert_eq!(agent.current("web").unwrap(), Path::new("releases/good"), "must switch back by itself");
    // The previous version's post-activate hook ran again after the switch back.
    let env = std::fs::read_to_string(&marker).unwrap();
    assert!(env.contains("STAGEHAND_VERSION=good"), "{env}");
    let AdminResponse::Status { status } =
        fleet.call(AdminRequest::Status { app: "web".into(), env: "prod".into() }).await.unwrap()
    else {
        panic!()
    };
    let receipt = status.agents[0].last_receipt.clone().unwrap();
    assert!(receipt.log.contains("not today"), "{}", receipt.log);
    assert_eq!(status.agents[0].active.as_deref(), Some("good"));
}

#[tokio::test]
async fn an_agent_away_during_a_release_converges_when_it_returns() {
    let fleet = Fleet::start().await.unwrap();
    let mut away = fleet.agent("prod", "away").await.unwrap();
    let src = version_tree(fleet.path(), "v1", None);
    fleet.push("web", "v1", &src).await.unwrap();
    assert!(fleet.deploy("web", "v1", "prod", 60).await.unwrap().all_done());
    away.stop().await;
    // The rollout waits for the host that is away (--offline wait, the default).
    let spec = RolloutSpec { app: "web".into(), version: Some("v1".into()), env: "prod".into(), ..Default::default() };
    let r = fleet.rollout(spec).await.unwrap();
    assert!(away.current("web").is_none());
    away.start().await.unwrap();
    assert!(Progress::of(&fleet.wait_rollout(&r.id).await.unwrap()).all_done());
    assert_eq!(away.current("web").unwrap(), Path::new("releases/v1"));

    // A host that joins later stages and activates the desired version by itself.
    let late = fleet.agent("prod", "late").await.unwrap();
    wait_for("the late agent to go live", Duration::from_secs(60), || async { late.current("web").is_some() })
        .await
        .unwrap();
    assert_eq!(late.current("web").unwrap(), Path::new("releases/v1"));
}

/// kill -9 at each step of an activation, then restart: `current` is the old or the new
/// version, never missing or dangling, the applied seq is never forgotten, and the
/// interrupted activation is finished one way or the other.
#[tokio::test]
async fn kill_9_at_every_step_of_an_activation() {
    let fleet = Fleet::start().await.unwrap();
    let (agent, host) = staged_host(&fleet).await;
    drop(host);
    let dir = agent.dir.to_str().unwrap().to_string();
    let points = [
        "activate-after-intent",
        "activate-before-switch",
        "activate-after-switch",
        "activate-before-commit",
        "activate-after-commit",
    ];
    let mut live = "v1".to_string();
    for (i, point) in points.iter().enumerate() {
        let target = if live == "v1" { "v2" } else { "v1" };
        let file = fleet.path().join(format!("msg-{i}.json"));
        let out = fleet_export(&fleet, target, &file).await;
        let status = std::process::Command::new(AGENT)
            .args(["activate", "--data-dir", &dir, "--file", file.to_str().unwrap()])
            .env("STAGEHAND_FAILPOINT", point)
            .output()
            .unwrap();
        assert!(!status.status.success(), "{point}: the failpoint should have killed the agent");

        // Right after the kill: current is the old or the new version and resolves.
        let link = agent.current("web").expect("current must never be missing");
        let resolved = agent.app_root("web").join(&link);
        assert!(resolved.is_dir(), "{point}: current dangles: {link:?}");
        assert!(
            link == Path::new("releases").join(&live) || link == Path::new("releases").join(target),
            "{point}: {link:?}"
        );

        // Restart (the offline activate opens and recovers the host) with the same message:
        // the seq is remembered, so it is a no-op answering the earlier outcome.
        let again =
            run_cli(AGENT, None, &["activate", "--data-dir", &dir, "--file", file.to_str().unwrap(), "-o", "json"])
                .unwrap();
        let receipt = stagehand_tests::receipt_of(&again.stdout);
        assert_eq!(receipt.seq, out, "{point}");
        // Killed before the switch: the activation is recorded as interrupted and the old
        // version stays. Killed after it: start-up proves the new version again and commits.
        let switched = !matches!(*point, "activate-after-intent" | "activate-before-switch");
        if switched {
            assert_eq!(receipt.outcome, ReceiptOutcome::Committed, "{point}");
            live = target.to_string();
        } else {
            assert_eq!(receipt.outcome, ReceiptOutcome::Refused(Refusal::Interrupted), "{point}");
        }
        assert_eq!(agent.current("web").unwrap(), Path::new("releases").join(&live), "{point}");
        let status = run_cli(AGENT, None, &["status", "--data-dir", &dir, "-o", "json"]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(v["apps"][0]["last_seq"].as_u64(), Some(out), "{point}: the applied seq was forgotten");
        assert!(v["apps"][0]["activation_in_progress"].is_null());
    }
}

/// Exports a release of `version` to prod into `file`; returns its seq.
async fn fleet_export(fleet: &Fleet, version: &str, file: &Path) -> u64 {
    fleet_export_to(fleet, version, "prod", file).await
}

/// Exports a release of `version` to `env` into `file`, as `release --export` writes it.
async fn fleet_export_to(fleet: &Fleet, version: &str, env: &str, file: &Path) -> u64 {
    let AdminResponse::Exported { message, seq, key_changes, .. } = fleet
        .call(AdminRequest::Release {
            app: "web".into(),
            version: version.into(),
            env: env.into(),
            export: true,
            ttl_secs: 0,
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    let body = Activate::decode_unverified(&message.body).unwrap();
    std::fs::write(file, message.to_export_with(&body, &key_changes)).unwrap();
    seq
}

/// The key ids an agent pins, as its identity file says.
fn pinned(agent: &TestAgent) -> Vec<String> {
    let text = std::fs::read_to_string(agent.dir.join("identity/agent.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["release_keys"].as_array().unwrap().iter().map(|k| k["key_id"].as_str().unwrap().to_string()).collect()
}

/// Hardening (#9): `stagehand controller rotate-release-key` introduces a new key in a
/// change the old key signs, and retires the old key in a change the new one signs. An
/// agent online when the controller comes back, one away during the rotation, and one that
/// only ever sees export files all end up pinning the new key alone, and a message the old
/// key signs is refused after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_release_key_reaches_every_agent_and_the_old_key_is_refused() {
    let mut fleet = Fleet::start().await.unwrap();
    let online = fleet.agent("prod", "online").await.unwrap();
    let mut away = fleet.agent("prod", "away").await.unwrap();
    let mut gapped = fleet.agent("lab", "gapped").await.unwrap();
    for v in ["v1", "v2"] {
        let tree = version_tree(fleet.path(), v, None);
        fleet.push("web", v, &tree).await.unwrap();
        for env in ["prod", "lab"] {
            assert!(fleet.deploy("web", v, env, 60).await.unwrap().all_done());
        }
    }
    assert!(fleet.release("web", "v1", "prod").await.unwrap().all_done());
    let old = release_key(&fleet);
    let old_id = stagehand_common::activate::ReleaseKey::from_signing(&old).key_id;
    assert_eq!(pinned(&online), vec![old_id.clone()]);
    away.stop().await;
    gapped.stop().await;

    // While the controller runs, its data directory is not the rotation's to change.
    let ctl = fleet.ctl_dir.to_str().unwrap().to_string();
    let busy = run_cli(crate::STAGEHAND, None, &["controller", "rotate-release-key", "--data-dir", &ctl]).unwrap();
    assert_eq!(busy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("still running"), "{busy:?}");
    assert_eq!(release_key(&fleet).to_bytes(), old.to_bytes(), "a refused rotation changes nothing");

    fleet.stop_controller().await;
    let out = run_cli(crate::STAGEHAND, None, &["controller", "rotate-release-key", "--data-dir", &ctl, "-o", "json"])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let new_id = v["new_key_id"].as_str().unwrap().to_string();
    assert_eq!(v["old_key_id"], old_id.as_str());
    assert_ne!(new_id, old_id);
    assert!(v["messages_resigned"].as_u64().unwrap() >= 1, "prod's desired message: {v}");
    let audit = run_cli(crate::STAGEHAND, None, &["audit", "--data-dir", &ctl, "--verify"]).unwrap();
    assert!(audit.status.success(), "{audit:?}");
    fleet.restart_controller().await.unwrap();

    wait_for("the online agent to pin the new key alone", Duration::from_secs(30), || async {
        pinned(&online) == [new_id.clone()]
    })
    .await
    .unwrap();
    wait_for("the online agent to be connected", Duration::from_secs(30), || async {
        matches!(fleet.call(AdminRequest::ListAgents).await,
            Ok(AdminResponse::Agents { agents }) if agents.iter().any(|a| a.id == online.id && a.connected))
    })
    .await
    .unwrap();
    // Released while one agent is away (skipped: it catches up when it is back).
    let spec = RolloutSpec {
        app: "web".into(),
        version: Some("v2".into()),
        env: "prod".into(),
        offline: Some("skip".into()),
        ..Default::default()
    };
    let r = fleet.rollout(spec).await.unwrap();
    assert_eq!(Progress::of(&fleet.wait_rollout(&r.id).await.unwrap()).done, vec![online.id.clone()]);
    assert_eq!(online.current("web").unwrap(), Path::new("releases/v2"));

    // The agent that was away: the key changes come before the message the new key signed.
    away.start().await.unwrap();
    wait_for("the agent that was away to catch up", Duration::from_secs(60), || async {
        away.current("web").as_deref() == Some(Path::new("releases/v2"))
    })
    .await
    .unwrap();
    assert_eq!(pinned(&away), vec![new_id.clone()]);

    // An air-gapped agent: the export file carries the key changes.
    let file = fleet.path().join("lab-v2.json");
    fleet_export_to(&fleet, "v2", "lab", &file).await;
    let dir = gapped.dir.to_str().unwrap().to_string();
    let out = run_cli(AGENT, None, &["activate", "--data-dir", &dir, "--file", file.to_str().unwrap(), "-o", "json"])
        .unwrap();
    let receipt = stagehand_tests::receipt_of(&out.stdout);
    assert_eq!(receipt.outcome, ReceiptOutcome::Committed, "{out:?}");
    assert_eq!(pinned(&gapped), vec![new_id.clone()]);

    // The old key signs nothing any more: a message it signed, with a fresh seq, is refused.
    let body = Activate {
        app: "web".into(),
        version: "v1".into(),
        digest: digest_of(&fleet, "web", "v1").await,
        env: "prod".into(),
        targets: Targets::Agents(vec![online.id.clone()]),
        rollout_id: "old-key".into(),
        seq: 1_000,
        not_before: 0,
        expires_at: now_secs() + 600,
        key_id: old_id.clone(),
        traffic: stagehand_common::activate::FULL_TRAFFIC,
        approved: None,
    };
    let forged = fleet.path().join("old-key.json");
    std::fs::write(&forged, activate::sign(&body, &old).to_export(&body)).unwrap();
    let online_dir = online.dir.to_str().unwrap().to_string();
    let out = run_cli(
        AGENT,
        None,
        &["activate", "--data-dir", &online_dir, "--file", forged.to_str().unwrap(), "-o", "json"],
    )
    .unwrap();
    let receipt = stagehand_tests::receipt_of(&out.stdout);
    assert_eq!(receipt.outcome, ReceiptOutcome::Refused(Refusal::UnknownKey), "{out:?}");
    assert_eq!(online.current("web").unwrap(), Path::new("releases/v2"));
}

#[tokio::test]
async fn a_failing_pre_activate_hook_refuses_without_switching() {
    let fleet = Fleet::start().await.unwrap();
    let agent = fleet.agent("prod", "p").await.unwrap();
    let good = version_tree(fleet.path(), "good", None);
    let blocked = version_tree(
        fleet.path(),
        "blocked",
        Some("[hooks]\npre_activate = \"echo migrations pending >&2; exit 1\"\n"),
    );
    fleet.push("web", "good", &good).await.unwrap();
    fleet.push("web", "blocked", &blocked).await.unwrap();
    for v in ["good", "blocked"] {
        assert!(fleet.deploy("web", v, "prod", 60).await.unwrap().all_done());
    }
    assert!(fleet.release("web", "good", "prod").await.unwrap().all_done());
    let p = fleet.release("web", "blocked", "prod").await.unwrap();
    assert_eq!(p.failed, vec![(agent.id.clone(), "pre-activate-failed".to_string())]);
    assert_eq!(agent.current("web").unwrap(), Path::new("releases/good"));
    let AdminResponse::Status { status } =
        fleet.call(AdminRequest::Status { app: "web".into(), env: "prod".into() }).await.unwrap()
    else {
        panic!()
    };
    assert!(status.agents[0].last_receipt.as_ref().unwrap().log.contains("migrations pending"));
}

/// A post-activate hook that starts a daemon in the background (which inherits the hook's
/// output) is done when the hook exits, not when the daemon closes its output.
#[tokio::test]
async fn a_hook_that_starts_a_daemon_does_not_hang_the_release() {
    let fleet = Fleet::start().await.unwrap();
    let agent = fleet.agent("prod", "p").await.unwrap();
    let src = version_tree(
        fleet.path(),
        "daemon",
        Some("[hooks]\npost_activate = \"sleep 20 & echo started\"\ntimeout = \"2s\"\n"),
    );
    fleet.push("web", "daemon", &src).await.unwrap();
    assert!(fleet.deploy("web", "daemon", "prod", 60).await.unwrap().all_done());
    let p = fleet.release("web", "daemon", "prod").await.unwrap();
    assert!(p.all_done(), "{p:?}");
    assert_eq!(agent.current("web").unwrap(), Path::new("releases/daemon"));
    let AdminResponse::Status { status } =
        fleet.call(AdminRequest::Status { app: "web".into(), env: "prod".into() }).await.unwrap()
    else {
        panic!()
    };
    assert!(status.agents[0].last_receipt.as_ref().unwrap().log.contains("started"));
}

/// Hardening (#9, finding 7): with an app's journal deleted, an old exported message (a lower
/// seq) was applied over a newer one. Now, while `current` exists and the journal does not,
/// every message is refused, saying how to repair; after the repair the old one is stale.
#[tokio::test]
async fn a_missing_journal_refuses_every_message_until_it_is_repaired() {
    let fleet = Fleet::start().await.unwrap();
    let (agent, host) = staged_host(&fleet).await;
    drop(host);
    let dir = agent.dir.to_str().unwrap().to_string();
    let (old, new) = (fleet.path().join("old.json"), fleet.path().join("new.json"));
    fleet_export(&fleet, "v1", &old).await;
    let new_seq = fleet_export(&fleet, "v2", &new).await;
    let apply = |file: &Path| {
        let out =
            run_cli(AGENT, None, &["activate", "--data-dir", &dir, "--file", file.to_str().unwrap(), "-o", "json"])
                .unwrap();
        stagehand_tests::receipt_of(&out.stdout)
    };
    assert_eq!(apply(&new).outcome, ReceiptOutcome::Committed);

    std::fs::remove_file(agent.dir.join("journal/web.journal")).unwrap();
    for file in [&old, &new] {
        let r = apply(file);
        assert_eq!(r.outcome, ReceiptOutcome::Refused(Refusal::HostError), "{file:?}");
        assert!(r.log.contains("stagehand-agent repair-journal"), "{}", r.log);
        assert_eq!(agent.current("web").unwrap(), Path::new("releases/v2"));
    }

    let seq = new_seq.to_string();
    let repair = || {
        let out = run_cli(AGENT, None, &["repair-journal", "--data-dir", &dir, "--app", "web", "--seq", &seq]).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    repair();
    assert_eq!(apply(&old).outcome, ReceiptOutcome::Refused(Refusal::StaleSeq));
    assert_eq!(agent.current("web").unwrap(), Path::new("releases/v2"));

    // A journal zeroed in place holds no seq either: refused the same way, then repaired.
    let journal = agent.dir.join("journal/web.journal");
    let len = std::fs::metadata(&journal).unwrap().len() as usize;
    std::fs::write(&journal, vec![0u8; len]).unwrap();
    let r = apply(&old);
    assert_eq!(r.outcome, ReceiptOutcome::Refused(Refusal::HostError), "{}", r.log);
    repair();
    assert_eq!(apply(&old).outcome, ReceiptOutcome::Refused(Refusal::StaleSeq));
}

/// Hardening (#9, finding 4): an unreadable seq counter was read as 0, so the next release
/// reused seq 1. Now the controller refuses to start on it, since its audit log says what was
/// signed, and names the repair, which sets the counter from the log; the next release gets a
/// seq above every one signed before.
#[tokio::test]
async fn an_unreadable_seq_counter_fails_closed_and_is_repaired_from_the_audit_log() {
    let mut fleet = Fleet::start().await.unwrap();
    let (mut agent, host) = staged_host(&fleet).await;
    drop(host);
    agent.start().await.unwrap();
    fleet.stop_controller().await;
    {
        let db = sled::open(fleet.ctl_dir.join("state")).unwrap();
        db.open_tree("meta").unwrap().insert(b"seq\0web", &[0xff, 0x01, 0x02][..]).unwrap();
        db.flush().unwrap();
    }
    let err = format!("{:#}", fleet.restart_controller().await.expect_err("started on an unreadable seq counter"));
    assert!(err.contains("seq counter of web is unreadable") && err.contains("stagehand controller repair"), "{err}");
    let dir = fleet.ctl_dir.to_str().unwrap().to_string();
    let out = run_cli(crate::STAGEHAND, None, &["controller", "repair", "--data-dir", &dir]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("seq counter of web raised to 1"), "{out:?}");
    fleet.restart_controller().await.unwrap();
    assert!(fleet.release("web", "v2", "prod").await.unwrap().all_done());
    assert_eq!(agent.current("web").unwrap(), Path::new("releases/v2"));
}

/// #11 (health checks through a maintained HTTP client): an `https://` health URL is
/// verified against the CA agent.toml names (`health_ca`), `expect_body` must be found in the
/// response, and a host that does not trust the server's certificate counts it unhealthy.
/// The server is a real `openssl s_server` on a loopback port of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_health_check_is_verified_and_reads_the_body() {
    let fleet = Fleet::start().await.unwrap();
    let t = fleet.path().join("tls");
    std::fs::create_dir_all(&t).unwrap();
    let p = |n: &str| t.join(n).to_str().unwrap().to_string();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    std::fs::write(t.join("leaf.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", &p("ca.key"), "-out", &p("ca.pem"), "-days", "1", "-subj", "/CN=test-ca"],
        ]
        .concat(),
    );
    openssl(
        &[&["req"][..], &ec, &["-keyout", &p("leaf.key"), "-out", &p("leaf.csr"), "-subj", "/CN=localhost"]].concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("leaf.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-out",
        &p("leaf.pem"),
        "-days",
        "1",
        "-extfile",
        &p("leaf.ext"),
    ]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _server = stagehand_tests::Proc::spawn(
        "openssl",
        &[
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-cert",
            &p("leaf.pem"),
            "-key",
            &p("leaf.key"),
            "-www",
            "-quiet",
        ],
        &[],
        t.join("server.log"),
    )
    .unwrap();
    wait_for("openssl s_server to listen", Duration::from_secs(20), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await
    .unwrap();

    // One agent trusts the test CA; one (in lab) does not.
    let mut trusting = fleet.enrol("prod", "trusting").await.unwrap();
    let config = trusting.dir.join("agent.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("health_ca = \"{}\"\n{text}", p("ca.pem"))).unwrap();
    trusting.start().await.unwrap();
    let _wary = fleet.agent("lab", "wary").await.unwrap();
    let health = |expect: &str| {
        format!("[health]\nurl = \"https://localhost:{port}/\"\nexpect_body = \"{expect}\"\nretries = 1\ntimeout = \"5s\"\n")
    };
    let good = version_tree(fleet.path(), "good", Some(&health("Ciphers")));
    let wrong = version_tree(fleet.path(), "wrong", Some(&health("no such text")));
    fleet.push("web", "good", &good).await.unwrap();
    fleet.push("web", "wrong", &wrong).await.unwrap();
    for (v, env) in [("good", "prod"), ("wrong", "prod"), ("good", "lab")] {
        assert!(fleet.deploy("web", v, env, 60).await.unwrap().all_done());
    }
    let force = |version: &str, env: &str| RolloutSpec {
        app: "web".into(),
        version: Some(version.into()),
        env: env.into(),
        force: true,
        ..Default::default()
    };
    let done = |r: &stagehand_common::protocol::RolloutView| Progress::of(r);
    let r = fleet.rollout(force("good", "prod")).await.unwrap();
    let view = fleet.wait_rollout(&r.id).await.unwrap();
    assert!(done(&view).all_done(), "{view:#?}");
    assert_eq!(trusting.current("web").unwrap(), Path::new("releases/good"));

    let r = fleet.rollout(force("wrong", "prod")).await.unwrap();
    let p = done(&fleet.wait_rollout(&r.id).await.unwrap());
    assert_eq!(p.failed.len(), 1, "{p:?}");
    assert_eq!(trusting.current("web").unwrap(), Path::new("releases/good"));
    let AdminResponse::Status { status } =
        fleet.call(AdminRequest::Status { app: "web".into(), env: "prod".into() }).await.unwrap()
    else {
        panic!()
    };
    let log = &status.agents[0].last_receipt.as_ref().unwrap().log;
    assert!(log.contains("does not contain \"no such text\""), "{log}");

    let r = fleet.rollout(force("good", "lab")).await.unwrap();
    let p = done(&fleet.wait_rollout(&r.id).await.unwrap());
    assert_eq!(p.failed.len(), 1, "a certificate it does not trust is unhealthy: {p:?}");
    let AdminResponse::Status { status } =
        fleet.call(AdminRequest::Status { app: "web".into(), env: "lab".into() }).await.unwrap()
    else {
        panic!()
    };
    let log = &status.agents[0].last_receipt.as_ref().unwrap().log;
    assert!(log.to_lowercase().contains("issuer") || log.to_lowercase().contains("certificate"), "{log}");
}
