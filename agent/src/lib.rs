//! The Stagehand agent: stages artifacts from the deploy channel and changes `current` only
//! on a signed activate message that passes every rule of SPEC §4.

pub mod activate;
pub mod cli;
pub mod config;
pub mod failpoint;
pub mod fuzz;
pub mod hooks;
pub mod host;
pub mod join;
pub mod journal;
pub mod metrics;
pub mod policy;
pub mod preview;
pub mod prune;
pub mod run;
pub mod service;
pub mod share;
pub mod sink;
pub mod stage;
pub mod store;
pub mod switch;
pub mod traffic;
pub mod tree;
pub mod verify;
