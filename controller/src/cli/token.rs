//! `stagehand token create`.

use super::Ctx;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use stagehand_common::protocol::{AdminRequest, AdminResponse};
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a join token for one environment (single use, expires).
    Create(CreateArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Environment the joining agent will belong to.
    #[arg(long, value_parser = super::env_name)]
    pub env: String,
    /// How long the token stays valid.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Labels the agent gets (repeatable): --label role=web
    #[arg(long = "label", value_parser = super::parse_label)]
    pub labels: Vec<(String, String)>,
    /// How many agents may join with it.
    #[arg(long, default_value_t = 1)]
    pub uses: u32,
}

pub async fn run(cmd: TokenCommand, ctx: &Ctx) -> Result<i32> {
    let TokenCommand::Create(a) = cmd;
    let client = ctx.client().await?;
    let resp = client
        .call(&AdminRequest::CreateToken {
            env: a.env.clone(),
            ttl_secs: a.ttl.as_secs(),
            labels: a.labels.into_iter().collect(),
            uses: a.uses,
        })
        .await?;
    // A new environment is often a typo: say so (on stderr; the token is made either way).
    if let Ok(AdminResponse::Agents { agents }) = client.call(&AdminRequest::ListAgents).await {
        let mut envs: Vec<&str> = agents.iter().map(|x| x.env.as_str()).collect();
        envs.sort_unstable();
        envs.dedup();
        if !envs.is_empty() && !envs.contains(&a.env.as_str()) {
            eprintln!(
                "note: no agent is in environment {:?} yet (environments with agents: {}); check the spelling",
                a.env,
                envs.join(", ")
            );
        }
    }
    client.close().await;
    let AdminResponse::Token { token, expires_at } = resp else { bail!("{}", super::unexpected(&resp)) };
    if ctx.json() {
        super::print_json(&serde_json::json!({ "token": token, "env": a.env, "expires_at": expires_at }));
    } else {
        outln!("{token}");
    }
    Ok(0)
}
