//! Hardening (#9): each finding of the adversarial review, reproduced as it was done.

use stagehand_agent::config::AgentConfig;
use stagehand_tests::{assert_same_tree, versioned_tree, Fleet};
use std::os::unix::fs::PermissionsExt;

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
