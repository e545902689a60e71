//! The Stagehand controller: fleet registry, artifact store, deploys, release signing, and
//! the operator CLI that talks to it.

pub mod admin;
pub mod chunks;
pub mod cli;
pub mod client;
pub mod config;
pub mod deploy;
pub mod enrol;
pub mod fleet;
pub mod init;
pub mod release;
pub mod server;
pub mod store;
