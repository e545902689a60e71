//! The Stagehand controller: fleet registry, artifact store, deploys, rollouts and release
//! signing, and the operator CLI that talks to it. `plan` decides; the rest does.

pub mod access;
pub mod admin;
pub mod audit;
pub mod chunks;
pub mod cli;
pub mod client;
pub mod config;
pub mod deploy;
pub mod enrol;
pub mod fleet;
pub mod gc;
pub mod init;
pub mod keys;
pub mod metrics;
pub mod plan;
pub mod policy;
pub mod release;
pub mod rollout;
pub mod server;
pub mod store;
pub mod web;
