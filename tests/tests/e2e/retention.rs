//! Retention on agents: old releases are removed after a staging, the live version and the
//! one to roll back to are kept, and the controller's view follows.

use stagehand_agent::config::AgentConfig;
use stagehand_common::protocol::{AdminRequest, AdminResponse};
use stagehand_tests::{random_file, wait_for, Fleet, TestAgent};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A tree with a read-only directory, which removal must still be able to empty.
fn tree(root: &Path, version: &str) -> PathBuf {
    let dir = root.join(format!("src-{version}"));
    std::fs::create_dir_all(dir.join("conf")).unwrap();
    std::fs::write(dir.join("VERSION"), version).unwrap();
    std::fs::write(dir.join("conf/app.toml"), format!("version = {version:?}")).unwrap();
    random_file(&dir.join("payload"), 64 << 10, version.len() as u64).unwrap();
    std::fs::set_permissions(dir.join("conf"), std::fs::Permissions::from_mode(0o555)).unwrap();
    dir
}

fn on_disk(agent: &TestAgent) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(agent.app_root("web").join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

async fn seen_by_controller(fleet: &Fleet) -> Vec<String> {
    let AdminResponse::Agents { agents } = fleet.call(AdminRequest::ListAgents).await.unwrap() else { panic!() };
    let mut v = agents[0].apps.iter().find(|a| a.app == "web").map(|a| a.staged.clone()).unwrap_or_default();
    v.sort();
    v
}

async fn settles(fleet: &Fleet, agent: &TestAgent, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    let settled = wait_for("retention to remove old releases", Duration::from_secs(30), || {
        let (disk, want) = (on_disk(agent), want.clone());
        async move { disk == want && seen_by_controller(fleet).await == want }
    })
    .await;
    if let Err(e) = settled {
        panic!("{e:#}: on disk {:?}, controller {:?}", on_disk(agent), seen_by_controller(fleet).await);
    }
}

#[tokio::test]
async fn old_releases_go_and_the_live_and_rollback_versions_stay() {
    let fleet = Fleet::start().await.unwrap();
    let mut agent = fleet.enrol("prod", "p").await.unwrap();
    let mut config = AgentConfig::load(&agent.dir).unwrap();
    assert_eq!(config.keep_releases, 5, "join writes the default");
    config.keep_releases = 3;
    config.save(&agent.dir).unwrap();
    // What a kill -9 in the middle of a removal leaves behind is removed at start-up.
    let leftover = agent.app_root("web").join(".staging/.pruned-0-0badc0de/conf");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("app.toml"), "x").unwrap();
    std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o555)).unwrap();
    let orphan = agent.app_root("web").join(".manifests/0");
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"manifest of a removed version").unwrap();
    agent.start().await.unwrap();
    assert!(!leftover.parent().unwrap().exists(), "a removal's leftover survived the start");
    assert!(!orphan.exists(), "a manifest without its version survived the start");

    for v in ["1", "2", "3", "4", "5", "6"] {
        fleet.push("web", v, &tree(fleet.path(), v)).await.unwrap();
        assert!(fleet.deploy("web", v, "prod", 60).await.unwrap().all_done());
        if v == "1" {
            assert!(fleet.release("web", "1", "prod").await.unwrap().all_done());
        }
    }
    // The live version and the three most recent others.
    settles(&fleet, &agent, &["1", "4", "5", "6"]).await;
    let staging = agent.app_root("web").join(".staging");
    wait_for("removed trees to be deleted", Duration::from_secs(30), || {
        let n = std::fs::read_dir(&staging).unwrap().count();
        async move { n == 0 }
    })
    .await
    .unwrap();
    let mut manifests: Vec<String> = std::fs::read_dir(agent.app_root("web").join(".manifests"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    manifests.sort();
    assert_eq!(manifests, ["1", "4", "5", "6"], "manifests of removed versions go with them");

    // A removed version is no longer staged: its release is refused and nothing changes.
    let err = fleet.release("web", "2", "prod").await.unwrap_err();
    assert!(format!("{err:#}").contains("not staged"), "{err:#}");
    assert_eq!(agent.current("web").unwrap(), Path::new("releases/1"));

    // 6 goes live; 1, the version to roll back to, is now the oldest deploy but stays,
    // and 4 goes when 7 arrives.
    assert!(fleet.release("web", "6", "prod").await.unwrap().all_done());
    fleet.push("web", "7", &tree(fleet.path(), "7")).await.unwrap();
    assert!(fleet.deploy("web", "7", "prod", 60).await.unwrap().all_done());
    settles(&fleet, &agent, &["1", "5", "6", "7"]).await;
    let (version, id) = fleet.rollback("web", "prod").await.unwrap();
    assert_eq!(version, "1");
    assert!(stagehand_tests::Progress::of(&fleet.wait_rollout(&id).await.unwrap()).all_done());
    assert_eq!(agent.current("web").unwrap(), Path::new("releases/1"));

    // A version removed here and deployed again comes back.
    assert!(fleet.deploy("web", "2", "prod", 60).await.unwrap().all_done());
    assert!(agent.release_dir("web", "2").join("conf/app.toml").is_file());
}
