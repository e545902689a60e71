//! End-to-end tests: a real controller and real agents over QUIC on loopback, real files in
//! temporary directories, real processes where the behaviour is about processes.

mod cli;
mod enrol;
mod failover;
mod faults;
mod ha;
mod hardening;
mod metrics;
mod operator;
mod policy;
mod release;
mod retention;
mod reuse;
mod rollout;
mod sim;
mod stage;
mod store;
mod traffic;
mod ui;

pub const STAGEHAND: &str = env!("CARGO_BIN_EXE_stagehand-under-test");
pub const AGENT: &str = env!("CARGO_BIN_EXE_stagehand-agent-under-test");
