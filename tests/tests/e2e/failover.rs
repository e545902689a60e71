//! High availability, the agent's side (#14, SPEC §13): an agent given several controller
//! addresses holds both channels to one and moves to the next when it stops answering.

use stagehand_common::protocol::{AdminRequest, AdminResponse};
use stagehand_tests::{wait_for, Fleet, TestAgent};
use std::net::SocketAddr;
use std::time::Duration;

async fn connected(fleet: &Fleet, name: &str) -> bool {
    matches!(fleet.call(AdminRequest::ListAgents).await,
        Ok(AdminResponse::Agents { agents }) if agents.iter().any(|a| a.name == name && a.connected))
}

/// A loopback UDP address nothing answers on: bound here and never read, so the agent's
/// packets vanish as they would towards a controller host that is down.
fn silent() -> (std::net::UdpSocket, SocketAddr) {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    (sock, addr)
}

/// Rewrites agent.toml's `controller` (the address `join` wrote) to this list.
pub fn controllers(agent: &TestAgent, list: &[SocketAddr]) {
    let path = agent.dir.join("agent.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let list: Vec<String> = list.iter().map(|a| format!("\"{a}\"")).collect();
    let lines: Vec<String> = text
        .lines()
        .map(|l| if l.starts_with("controller = ") { format!("controller = [{}]", list.join(", ")) } else { l.into() })
        .collect();
    assert_ne!(lines.join("\n"), text.trim_end(), "join wrote a controller line:\n{text}");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
}

async fn release(fleet: &Fleet, agent: &TestAgent, version: &str) {
    let src = fleet.path().join(format!("src-{version}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("VERSION"), version).unwrap();
    fleet.push("web", version, &src).await.unwrap();
    assert!(fleet.deploy("web", version, "prod", 60).await.unwrap().all_done());
    let p = fleet.release("web", version, "prod").await.unwrap();
    assert!(p.all_done(), "{p:?}");
    assert_eq!(agent.current("web").unwrap(), std::path::Path::new("releases").join(version));
}

/// The first controller listed does not know the agent (a copy of the data directory from
/// before it enrolled: same CA, state of its own) and the second does not answer: the agent
/// moves on to the third and is served there. Then that controller goes away and comes back
/// on the agent's fourth address (as a second controller would take over): both channels
/// follow, and releases go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_between_its_controllers_and_keeps_receiving_releases() {
    let mut fleet = Fleet::start().await.unwrap();
    fleet.stop_controller().await;
    let stranger_dir = fleet.path().join("stranger");
    let copied = std::process::Command::new("cp").arg("-a").arg(&fleet.ctl_dir).arg(&stranger_dir).status().unwrap();
    assert!(copied.success());
    fleet.restart_controller().await.unwrap();
    let stranger =
        stagehand_controller::server::start(&stranger_dir, Some("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let (_down, down) = silent();
    // Where the controller will serve next: held until then, so that nothing else takes it.
    let (hold, next) = silent();
    let mut agent = fleet.enrol("prod", "ha").await.unwrap();
    controllers(&agent, &[stranger.addr, down, fleet.addr, next]);
    agent.start().await.unwrap();
    wait_for("the agent to pass the stranger and the silent one", Duration::from_secs(90), || connected(&fleet, "ha"))
        .await
        .unwrap();
    release(&fleet, &agent, "1").await;
    let config = stagehand_agent::config::AgentConfig::load(&agent.dir).unwrap();
    let listed =
        serde_json::json!([stranger.addr.to_string(), down.to_string(), fleet.addr.to_string(), next.to_string()]);
    assert_eq!(serde_json::to_value(&config.controller).unwrap(), listed, "status -o json shows the list");

    fleet.stop_controller().await;
    drop(hold);
    fleet.addr = next;
    fleet.restart_controller().await.unwrap();
    wait_for("the agent to follow the controller", Duration::from_secs(90), || connected(&fleet, "ha")).await.unwrap();
    release(&fleet, &agent, "2").await;
    agent.stop().await;
    stranger.stop().await;
}
