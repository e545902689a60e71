//! Staging over the deploy channel: exact trees, immutability of versions, tampering,
//! catch-up of agents that were away or joined late.

use stagehand_common::protocol::{AdminRequest, AdminResponse};
use stagehand_tests::{assert_same_tree, random_file, wait_for, Fleet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// A tree with nested directories, an empty file, an executable, a symlink and a big file.
pub fn sample_tree(root: &Path, big: usize) {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("share/doc/deep")).unwrap();
    std::fs::write(root.join("bin/run"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("bin/run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("share/empty"), "").unwrap();
    std::fs::write(root.join("share/doc/deep/readme.txt"), "nested\n").unwrap();
    std::fs::set_permissions(root.join("share/doc"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("../bin/run", root.join("share/run-link")).unwrap();
    random_file(&root.join("big.bin"), big, 42).unwrap();
}

#[tokio::test]
async fn a_tree_arrives_byte_identical_only_in_its_environment() {
    let fleet = Fleet::start().await.unwrap();
    let src = fleet.path().join("src");
    sample_tree(&src, 100 << 20);
    let prod1 = fleet.agent("prod", "prod-1").await.unwrap();
    let prod2 = fleet.agent("prod", "prod-2").await.unwrap();
    let staging = fleet.agent("staging", "staging-1").await.unwrap();

    let pushed = fleet.push("web", "1.0", &src).await.unwrap();
    assert!(!pushed.already_present);
    let p = fleet.deploy("web", "1.0", "prod", 120).await.unwrap();
    assert!(p.all_done(), "{p:?}");
    assert_eq!(p.done.len(), 2);
    for a in [&prod1, &prod2] {
        assert_same_tree(&src, &a.release_dir("web", "1.0"));
        assert!(a.current("web").is_none(), "staging must not make anything live");
        // Nothing half-staged is left beside releases/.
        let staging_dir = a.app_root("web").join(".staging");
        assert_eq!(std::fs::read_dir(staging_dir).map(|d| d.count()).unwrap_or(0), 0);
    }
    assert!(!staging.app_root("web").exists(), "another environment must hold nothing");
}

#[tokio::test]
async fn pushes_are_idempotent_and_versions_immutable() {
    let fleet = Fleet::start().await.unwrap();
    let src = fleet.path().join("src");
    sample_tree(&src, 3 << 20);
    let first = fleet.push("web", "1.0", &src).await.unwrap();
    let again = fleet.push("web", "1.0", &src).await.unwrap();
    assert!(again.already_present);
    assert_eq!(first.digest, again.digest);

    // The same content under a new version uploads no chunk.
    let copy = fleet.push("web", "1.1", &src).await.unwrap();
    assert_eq!(copy.uploaded_chunks, 0);

    std::fs::write(src.join("bin/run"), "#!/bin/sh\necho changed\n").unwrap();
    let err = fleet.push("web", "1.0", &src).await.err().expect("other content under 1.0 must be refused");
    assert!(format!("{err:#}").contains("already exists with other content"), "{err:#}");
    // A small change uploads only the changed chunk.
    let next = fleet.push("web", "2.0", &src).await.unwrap();
    assert_eq!(next.uploaded_chunks, 1);
}

#[tokio::test]
async fn a_tampered_chunk_is_detected_and_nothing_is_staged() {
    let fleet = Fleet::start().await.unwrap();
    let src = fleet.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    random_file(&src.join("data"), 2 << 20, 7).unwrap();
    let agent = fleet.agent("prod", "p").await.unwrap();
    fleet.push("app", "1", &src).await.unwrap();

    // Flip one byte of one stored chunk.
    let chunks = fleet.ctl_dir.join("store/chunks");
    let shard = std::fs::read_dir(&chunks).unwrap().next().unwrap().unwrap().path();
    let chunk = std::fs::read_dir(shard).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&chunk).unwrap();
    bytes[100] ^= 0xFF;
    std::fs::write(&chunk, bytes).unwrap();

    let p = fleet.deploy("app", "1", "prod", 60).await.unwrap();
    assert_eq!(p.failed.len(), 1, "{p:?}");
    assert!(p.failed[0].1.contains("does not match its digest"), "{p:?}");
    assert!(!agent.release_dir("app", "1").exists());
    assert!(agent.current("app").is_none());
}

#[tokio::test]
async fn offline_and_late_agents_catch_up() {
    let fleet = Fleet::start().await.unwrap();
    let src = fleet.path().join("src");
    sample_tree(&src, 1 << 20);
    let mut away = fleet.agent("prod", "away").await.unwrap();
    away.stop().await;
    fleet.push("web", "1.0", &src).await.unwrap();
    let p = fleet.deploy("web", "1.0", "prod", 2).await.unwrap();
    assert_eq!(p.pending, vec![away.id.clone()], "an offline agent is pending, not failed");

    away.start().await.unwrap();
    let p = fleet.wait_staged("web", "1.0", "prod", 60).await.unwrap();
    assert!(p.all_done(), "{p:?}");
    assert_same_tree(&src, &away.release_dir("web", "1.0"));

    let late = fleet.agent("prod", "late").await.unwrap();
    let p = fleet.wait_staged("web", "1.0", "prod", 60).await.unwrap();
    assert!(p.all_done(), "{p:?}");
    assert_same_tree(&src, &late.release_dir("web", "1.0"));
}

#[tokio::test]
async fn the_controller_restarts_with_agents_tokens_and_artifacts() {
    let mut fleet = Fleet::start().await.unwrap();
    let src = fleet.path().join("src");
    sample_tree(&src, 1 << 20);
    let agent = fleet.agent("prod", "p").await.unwrap();
    fleet.push("web", "1.0", &src).await.unwrap();
    let token = fleet.token("prod", 600).await.unwrap();
    fleet.restart_controller().await.unwrap();

    // The artifact is still there: re-pushing is a no-op, deploying works.
    assert!(fleet.push("web", "1.0", &src).await.unwrap().already_present);
    // The agent reconnects by itself.
    let p = fleet.deploy("web", "1.0", "prod", 60).await.unwrap();
    assert!(p.all_done(), "{p:?}");
    assert_same_tree(&src, &agent.release_dir("web", "1.0"));
    // The token made before the restart still enrols.
    stagehand_agent::join::join(&fleet.addr.to_string(), &token, &fleet.path().join("new"), None, Default::default())
        .await
        .unwrap();
    let AdminResponse::Agents { agents } = fleet.call(AdminRequest::ListAgents).await.unwrap() else { panic!() };
    assert_eq!(agents.len(), 2);
}

#[tokio::test]
async fn a_staged_copy_modified_on_the_host_is_staged_again() {
    let fleet = Fleet::start().await.unwrap();
    let src = fleet.path().join("src");
    sample_tree(&src, 1 << 20);
    let mut agent = fleet.agent("prod", "p").await.unwrap();
    fleet.push("web", "1.0", &src).await.unwrap();
    assert!(fleet.deploy("web", "1.0", "prod", 60).await.unwrap().all_done());
    agent.stop().await;
    let victim = agent.release_dir("web", "1.0").join("share/doc/deep/readme.txt");
    std::fs::write(&victim, "scribbled on\n").unwrap();

    // Back online, the agent no longer counts the copy as staged; the controller orders it
    // again and the agent replaces it.
    agent.start().await.unwrap();
    wait_for("the copy to be repaired", Duration::from_secs(60), || async {
        std::fs::read_to_string(&victim).is_ok_and(|t| t == "nested\n")
    })
    .await
    .unwrap();
    let p = fleet.wait_staged("web", "1.0", "prod", 60).await.unwrap();
    assert!(p.all_done(), "{p:?}");
    assert_same_tree(&src, &agent.release_dir("web", "1.0"));
}

/// `fetch_streams` bounds the chunk streams served at once across every agent: with one slot,
/// three agents fetching on two lanes each take turns (the rest wait, and are counted), and
/// every one of them still stages the exact tree. A slot that was never given back would
/// hang here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_streams_wait_their_turn_for_the_controllers_fetch_slots() {
    let mut fleet = Fleet::start().await.unwrap();
    let config = fleet.ctl_dir.join("controller.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("fetch_streams = 32"), "init writes the default:\n{text}");
    let text = text.replace("fetch_streams = 32", "fetch_streams = 1");
    // A top-level key goes before any table.
    std::fs::write(&config, format!("http = \"127.0.0.1:0\"\n{text}")).unwrap();
    fleet.restart_controller().await.unwrap();
    let http = fleet.controller.as_ref().unwrap().http.expect("the controller serves HTTP");
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(fleet.agent("prod", &format!("p{i}")).await.unwrap());
    }
    let src = fleet.path().join("src");
    sample_tree(&src, 24 << 20);
    fleet.push("web", "1", &src).await.unwrap();
    let p = fleet.deploy("web", "1", "prod", 120).await.unwrap();
    assert!(p.all_done(), "{p:?}");
    for a in &agents {
        assert_same_tree(&src, &a.release_dir("web", "1"));
    }
    let scrape = || async { stagehand_tests::http_get(http, "/metrics").await.unwrap().1 };
    let m = scrape().await;
    let queued = stagehand_tests::metric(&m, "stagehand_fetch_streams_queued_total").unwrap_or(0.0);
    assert!(queued >= 1.0, "six lanes through one slot: some waited\n{m}");
    // Every slot is given back once the agents have acknowledged their last bytes.
    wait_for("every fetch stream to end", Duration::from_secs(10), || async {
        let m = scrape().await;
        let gauge = |state: &str| stagehand_tests::metric(&m, &format!("stagehand_fetch_streams{{state=\"{state}\"}}"));
        gauge("serving") == Some(0.0) && gauge("waiting") == Some(0.0)
    })
    .await
    .unwrap();

    // Zero slots would stage nothing, ever: refused when the controller starts.
    fleet.stop_controller().await;
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("fetch_streams = 1", "fetch_streams = 0")).unwrap();
    let err = stagehand_controller::server::start(&fleet.ctl_dir, Some(fleet.addr)).await.err().expect("refused");
    assert!(format!("{err:#}").contains("fetch_streams must be at least 1"), "{err:#}");
}
