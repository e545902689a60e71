//! Metrics (SPEC §12): the controller's `/metrics` under `--http` and the agent's under
//! `metrics_listen`, scraped and checked against what the test did.

use stagehand_tests::{http_get, metric, random_file, wait_for, Fleet};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_daemons_serve_metrics_that_match_the_fleet() {
    let fleet = Fleet::start_http().await.unwrap();
    let http = fleet.controller.as_ref().unwrap().http.expect("the controller serves HTTP");
    let mut agent = fleet.enrol("prod", "p").await.unwrap();
    let _idle = fleet.agent("lab", "s").await.unwrap();
    // A top-level key goes before any table of agent.toml.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let path = agent.dir.join("agent.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("metrics_listen = \"127.0.0.1:{port}\"\n{text}")).unwrap();
    agent.start().await.unwrap();
    let agent_http: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let src = fleet.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    random_file(&src.join("data"), 3 << 20, 7).unwrap();
    fleet.push("web", "1", &src).await.unwrap();
    assert!(fleet.deploy("web", "1", "prod", 60).await.unwrap().all_done());
    assert!(fleet.release("web", "1", "prod").await.unwrap().all_done());

    let (status, c) = http_get(http, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    if std::env::var_os("SHOW_METRICS").is_some() {
        eprintln!("{c}");
    }
    assert_eq!(metric(&c, "stagehand_agents_connected{env=\"prod\"}"), Some(1.0), "{c}");
    assert_eq!(metric(&c, "stagehand_agents_connected{env=\"lab\"}"), Some(1.0), "{c}");
    assert_eq!(metric(&c, "stagehand_agents{env=\"prod\"}"), Some(1.0), "{c}");
    assert_eq!(metric(&c, "stagehand_stagings_total{outcome=\"staged\"}"), Some(1.0), "{c}");
    assert_eq!(metric(&c, "stagehand_releases_total{outcome=\"committed\"}"), Some(1.0), "{c}");
    assert_eq!(metric(&c, "stagehand_rollouts{state=\"succeeded\"}"), Some(1.0), "{c}");
    assert_eq!(metric(&c, "stagehand_sessions{channel=\"release\"}"), Some(2.0), "{c}");
    assert_eq!(metric(&c, "stagehand_staging_fetched_bytes_count"), Some(1.0), "{c}");
    assert!(metric(&c, "stagehand_chunk_store_bytes").unwrap() >= (3 << 20) as f64, "{c}");

    let (status, a) = http_get(agent_http, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(metric(&a, "stagehand_agent_stagings_total{outcome=\"staged\"}"), Some(1.0), "{a}");
    assert_eq!(metric(&a, "stagehand_agent_activations_total{outcome=\"committed\"}"), Some(1.0), "{a}");
    assert_eq!(metric(&a, "stagehand_agent_fetched_bytes_total"), Some((3 << 20) as f64), "{a}");
    assert_eq!(metric(&a, "stagehand_agent_activation_duration_seconds_count"), Some(1.0), "{a}");
    assert!(metric(&a, "stagehand_agent_disk_free_bytes{app=\"web\"}").unwrap() > 0.0, "{a}");

    // A release the agent refuses (a version it never staged) is counted by its reason.
    let missing = fleet.path().join("src2");
    std::fs::create_dir_all(&missing).unwrap();
    random_file(&missing.join("data"), 1 << 20, 8).unwrap();
    fleet.push("web", "2", &missing).await.unwrap();
    let export = fleet
        .call(stagehand_common::protocol::AdminRequest::Release {
            app: "web".into(),
            version: "2".into(),
            env: "prod".into(),
            export: true,
            ttl_secs: 600,
        })
        .await
        .unwrap();
    let stagehand_common::protocol::AdminResponse::Exported { message, .. } = export else { panic!("{export:?}") };
    let host = agent.running.as_ref().unwrap().host.clone();
    let receipt = stagehand_agent::activate::handle(&host, message).await;
    assert!(matches!(receipt.outcome, stagehand_common::protocol::ReceiptOutcome::Refused(_)));
    let (_, a) = http_get(agent_http, "/metrics").await.unwrap();
    assert_eq!(metric(&a, "stagehand_agent_activations_total{outcome=\"not-staged\"}"), Some(1.0), "{a}");

    // The agent goes away: the controller's gauge follows.
    agent.stop().await;
    wait_for("the controller to count the agent gone", Duration::from_secs(20), || async {
        let (_, c) = http_get(http, "/metrics").await.unwrap();
        metric(&c, "stagehand_agents_connected{env=\"prod\"}") == Some(0.0)
    })
    .await
    .unwrap();
}
