//! The fleet simulator (`stagehand_tests::sim`, `stagehand-sim`) at a small size, so that it
//! cannot rot: simulated agents enrol, connect on both channels, stage, take a release,
//! and come back after a controller restart, all through the real controller.

use stagehand_common::protocol::{AdminRequest, AdminResponse};
use stagehand_tests::sim::{enrol_many, Stats};
use stagehand_tests::{wait_for, Fleet};
use std::sync::Arc;
use std::time::Duration;

const N: usize = 200;

async fn connected(fleet: &Fleet) -> usize {
    match fleet.call(AdminRequest::ListAgents).await {
        Ok(AdminResponse::Agents { agents }) => agents.iter().filter(|a| a.connected).count(),
        _ => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_agents_enrol_stage_release_and_come_back_after_a_restart() {
    let mut fleet = Fleet::start().await.unwrap();
    let token = match fleet
        .call(AdminRequest::CreateToken {
            env: "prod".into(),
            ttl_secs: 600,
            labels: Default::default(),
            uses: N as u32,
        })
        .await
        .unwrap()
    {
        AdminResponse::Token { token, .. } => token,
        other => panic!("{other:?}"),
    };
    let stats = Arc::new(Stats::default());
    let agents = enrol_many(fleet.addr, &token, "sim", N, 16, stats.clone()).await.unwrap();
    assert_eq!(agents.len(), N);
    let tasks: Vec<_> = agents.iter().map(|a| a.spawn(fleet.addr)).collect();
    wait_for("every simulated agent to connect", Duration::from_secs(60), || async { connected(&fleet).await == N })
        .await
        .unwrap();

    let src = fleet.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for v in ["1", "2"] {
        std::fs::write(src.join("VERSION"), v).unwrap();
        fleet.push("web", v, &src).await.unwrap();
        assert!(fleet.deploy("web", v, "prod", 60).await.unwrap().all_done());
    }
    assert!(fleet.release("web", "1", "prod").await.unwrap().all_done());
    assert_eq!(stats.take_acks().len(), N, "every agent committed once");
    assert!(agents.iter().all(|a| a.active("web").as_deref() == Some("1")));
    // The controller sees agents like any other: their version, what they staged and run.
    let AdminResponse::Agents { agents: seen } = fleet.call(AdminRequest::ListAgents).await.unwrap() else { panic!() };
    assert_eq!(seen.len(), N);
    for a in &seen {
        assert_eq!(a.version.as_deref(), Some(env!("CARGO_PKG_VERSION")), "{a:?}");
        assert_eq!(a.apps[0].active.as_deref(), Some("1"), "{a:?}");
        assert_eq!(a.apps[0].staged, ["1", "2"], "{a:?}");
    }

    // A restarted controller: every agent comes back and takes the next release.
    fleet.restart_controller().await.unwrap();
    wait_for("every simulated agent to reconnect", Duration::from_secs(60), || async { connected(&fleet).await == N })
        .await
        .unwrap();
    assert!(fleet.release("web", "2", "prod").await.unwrap().all_done());
    assert_eq!(stats.take_acks().len(), N);
    assert!(agents.iter().all(|a| a.active("web").as_deref() == Some("2")));
    assert!(stats.refused().is_empty(), "{:?}", stats.refused());
    for t in tasks {
        t.abort();
    }
}
