//! Faults: an agent killed mid-transfer resumes; a peer that sends garbage is dropped while
//! others keep being served.

use crate::AGENT;
use stagehand_common::protocol::ALPN_DEPLOY;
use stagehand_common::tls::Credentials;
use stagehand_common::{frame, net};
use stagehand_tests::{assert_same_tree, random_file, wait_for, Fleet, Proc};
use std::time::Duration;

fn fetched_bytes(log: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains("Staged."))?;
    let field = line.split_whitespace().find_map(|w| w.strip_prefix("fetched_bytes="))?;
    field.parse().ok()
}

#[tokio::test]
async fn an_agent_killed_mid_transfer_resumes_with_what_it_has() {
    let fleet = Fleet::start().await.unwrap();
    let src = fleet.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let size = 100u64 << 20;
    random_file(&src.join("big.bin"), size as usize, 3).unwrap();
    let agent = fleet.enrol("prod", "p").await.unwrap();
    let dir = agent.dir.to_str().unwrap().to_string();
    fleet.push("app", "1", &src).await.unwrap();

    // The agent kills itself with SIGKILL after verifying its 250th chunk (of about 400).
    // Each fetch stream may lose the up to 9 MiB it had gathered and not yet written.
    let env = [("STAGEHAND_LOG", "info"), ("STAGEHAND_FAILPOINT", "stage-chunk:250"), ("NO_COLOR", "1")];
    let mut first = Proc::spawn(AGENT, &["run", "--data-dir", &dir], &env, fleet.path().join("agent-1.log")).unwrap();
    let client = fleet.client().await.unwrap();
    client
        .call(&stagehand_common::protocol::AdminRequest::Deploy {
            app: "app".into(),
            version: "1".into(),
            env: "prod".into(),
        })
        .await
        .unwrap();
    let status = first.wait_exit(Duration::from_secs(60)).await.unwrap();
    assert!(!status.success(), "the failpoint should have killed the agent");
    assert!(!agent.release_dir("app", "1").exists(), "a half-staged version must never appear");

    let env = [("STAGEHAND_LOG", "info"), ("NO_COLOR", "1")];
    let second = Proc::spawn(AGENT, &["run", "--data-dir", &dir], &env, fleet.path().join("agent-2.log")).unwrap();
    let p = fleet.wait_staged("app", "1", "prod", 60).await.unwrap();
    assert!(p.all_done(), "{p:?}\n{}", second.log_text());
    assert_same_tree(&src, &agent.release_dir("app", "1"));
    let fetched = fetched_bytes(&second.log_text()).expect("the agent logs what it fetched");
    assert!(fetched < size * 3 / 4, "fetched {fetched} of {size} bytes after restart");
    assert!(fetched > 0);
}

#[tokio::test]
async fn a_peer_sending_garbage_is_dropped_and_others_are_served() {
    let fleet = Fleet::start().await.unwrap();
    let src = fleet.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    random_file(&src.join("data"), 20 << 20, 9).unwrap();
    let good = fleet.agent("prod", "good").await.unwrap();
    // The bad peer belongs to another environment so that the deploy below waits only for `good`.
    let bad = fleet.enrol("lab", "bad").await.unwrap();
    fleet.push("app", "1", &src).await.unwrap();

    // The bad peer holds a real agent certificate and speaks nonsense on the deploy channel.
    let creds = Credentials::load(&bad.dir.join("identity")).unwrap();
    let ep = net::client_endpoint(fleet.addr).unwrap();
    let cfg = net::client_config(creds.client_config(ALPN_DEPLOY).unwrap()).unwrap();
    let garbage = net::connect(&ep, fleet.addr, cfg.clone()).await.unwrap();
    let (mut send, _recv) = garbage.open_bi().await.unwrap();
    // A length prefix of almost 4 GiB: refused before anything is allocated.
    send.write_all(&[0xFF, 0xFF, 0xFF, 0xF0, 1, 2, 3, 4]).await.unwrap();

    // Another connection with a valid hello and then a fetch request of a lying length.
    let liar = net::connect(&ep, fleet.addr, cfg).await.unwrap();
    let (mut s, mut r) = liar.open_bi().await.unwrap();
    frame::write_msg(
        &mut s,
        &stagehand_common::protocol::DeployUp::Hello { protocol_version: stagehand_common::protocol::PROTOCOL_VERSION },
    )
    .await
    .unwrap();
    let _: Option<stagehand_common::protocol::DeployDown> = frame::read_msg::<_, _, 1024>(&mut r).await.unwrap();
    let (mut s2, _r2) = liar.open_bi().await.unwrap();
    s2.write_all(&[0, 0, 0, 8, 0, 0, 0, 4, 0xFF, 0xFF, 0xFF, 0xFF]).await.unwrap();
    s2.finish().unwrap();

    let p = fleet.deploy("app", "1", "prod", 60).await;
    let reason = tokio::time::timeout(Duration::from_secs(10), garbage.closed()).await.expect("garbage peer dropped");
    assert!(format!("{reason}").contains("protocol error"), "{reason}");
    let reason = tokio::time::timeout(Duration::from_secs(10), liar.closed()).await.expect("lying peer dropped");
    assert!(format!("{reason}").contains("bad fetch request") || format!("{reason}").contains("protocol"), "{reason}");
    let p = p.unwrap();
    assert!(p.done.contains(&good.id), "{p:?}");
    assert_same_tree(&src, &good.release_dir("app", "1"));
    // And the controller still serves new work.
    wait_for("the controller to answer", Duration::from_secs(10), || async { fleet.client().await.is_ok() })
        .await
        .unwrap();
}

#[tokio::test]
async fn an_agent_fetches_only_what_its_environment_was_given() {
    use stagehand_common::protocol::{DeployDown, DeployUp};
    let fleet = Fleet::start().await.unwrap();
    let src = fleet.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    random_file(&src.join("data"), 1 << 20, 5).unwrap();
    let prod = fleet.agent("prod", "p").await.unwrap();
    let pushed = fleet.push("app", "1", &src).await.unwrap();
    assert!(fleet.deploy("app", "1", "prod", 60).await.unwrap().all_done());

    // A lab agent, with a valid certificate, asks for prod's manifest and one of its chunks.
    let lab = fleet.enrol("lab", "l").await.unwrap();
    let creds = Credentials::load(&lab.dir.join("identity")).unwrap();
    let ep = net::client_endpoint(fleet.addr).unwrap();
    let cfg = net::client_config(creds.client_config(ALPN_DEPLOY).unwrap()).unwrap();
    let conn = net::connect(&ep, fleet.addr, cfg).await.unwrap();
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    frame::write_msg(&mut s, &DeployUp::Hello { protocol_version: stagehand_common::protocol::PROTOCOL_VERSION })
        .await
        .unwrap();
    let _: Option<DeployDown> = frame::read_msg::<_, _, 1024>(&mut r).await.unwrap();
    let ask = |req: DeployUp| {
        let conn = conn.clone();
        async move {
            let (mut s, mut r) = conn.open_bi().await.unwrap();
            frame::write_msg(&mut s, &req).await.unwrap();
            s.finish().unwrap();
            frame::read_blob::<_, { frame::MANIFEST_LIMIT }>(&mut r).await.unwrap()
        }
    };
    assert_eq!(
        ask(DeployUp::FetchManifest { digest: pushed.digest }).await,
        Some(None),
        "another environment's manifest"
    );
    let manifest = stagehand_common::manifest::Manifest::decode(
        &std::fs::read(fleet.ctl_dir.join("store/manifests").join(pushed.digest.to_hex())).unwrap(),
    )
    .unwrap();
    let chunk = manifest.files().next().unwrap().3[0].digest;
    assert_eq!(ask(DeployUp::FetchChunks { digests: vec![chunk] }).await, Some(None), "a chunk it was never given");
    // The prod agent staged it all the same.
    assert!(prod.release_dir("app", "1").join("data").exists());
}

#[tokio::test]
async fn a_revoked_agent_is_refused_everywhere() {
    use stagehand_common::protocol::{AdminRequest, AdminResponse, ALPN_RELEASE};
    let fleet = Fleet::start().await.unwrap();
    let mut agent = fleet.agent("prod", "p").await.unwrap();
    let AdminResponse::Revoked { agent: id } =
        fleet.call(AdminRequest::RevokeAgent { agent: agent.id.0.clone() }).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(id, agent.id);
    agent.stop().await;
    let creds = Credentials::load(&agent.dir.join("identity")).unwrap();
    let ep = net::client_endpoint(fleet.addr).unwrap();
    for alpn in [ALPN_DEPLOY, ALPN_RELEASE] {
        let cfg = net::client_config(creds.client_config(alpn).unwrap()).unwrap();
        let conn = net::connect(&ep, fleet.addr, cfg).await.unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.unwrap();
        assert!(format!("{reason}").contains("revoked (code 3)"), "{reason}");
    }
    // Deploys no longer wait for it.
    let src = fleet.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "x").unwrap();
    fleet.push("app", "1", &src).await.unwrap();
    let p = fleet.deploy("app", "1", "prod", 5).await.unwrap();
    assert!(p.done.is_empty() && p.pending.is_empty(), "{p:?}");
}

/// A tree of more files than the agent may hold open at once still stages.
#[tokio::test]
async fn a_tree_of_many_files_stages_under_a_low_descriptor_limit() {
    let fleet = Fleet::start().await.unwrap();
    let src = fleet.path().join("src");
    for d in 0..8 {
        let dir = src.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..60 {
            std::fs::write(dir.join(format!("f{f}")), format!("{d}/{f}\n")).unwrap();
        }
    }
    let agent = fleet.enrol("prod", "p").await.unwrap();
    fleet.push("many", "1", &src).await.unwrap();
    let dir = agent.dir.to_str().unwrap().to_string();
    // 480 files, 128 descriptors.
    let _proc = Proc::spawn(
        "prlimit",
        &["--nofile=128:128", "--", AGENT, "run", "--data-dir", &dir],
        &[("STAGEHAND_LOG", "info")],
        fleet.path().join("agent.log"),
    )
    .unwrap();
    let p = fleet.deploy("many", "1", "prod", 60).await.unwrap();
    assert!(p.all_done(), "{p:?}\n{}", _proc.log_text());
    assert_same_tree(&src, &agent.release_dir("many", "1"));
}
