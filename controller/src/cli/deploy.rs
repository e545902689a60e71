//! `stagehand deploy APP VERSION --env ENV [--wait] [--timeout DUR]`.

use super::Ctx;
use crate::client::Client;
use anyhow::{bail, Result};
use clap::Args;
use stagehand_common::protocol::{AdminRequest, AdminResponse};
use stagehand_common::AgentId;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// The app, as pushed.
    #[arg(value_parser = super::app_name)]
    pub app: String,
    /// The version (as given to `stagehand push`).
    #[arg(id = "artifact_version", value_name = "VERSION", value_parser = super::version_name)]
    pub version: String,
    /// Environment whose agents stage it.
    #[arg(long, value_parser = super::env_name)]
    pub env: String,
    /// Exit only when every agent reports it staged (0) or something failed (1).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub async fn run(a: DeployArgs, ctx: &Ctx) -> Result<i32> {
    let client = ctx.client().await?;
    let resp = client
        .call(&AdminRequest::Deploy { app: a.app.clone(), version: a.version.clone(), env: a.env.clone() })
        .await?;
    let AdminResponse::Deployed { digest, targets } = resp else { bail!("unexpected answer: {resp:?}") };
    if !a.wait {
        client.close().await;
        if ctx.json() {
            super::print_json(
                &serde_json::json!({ "app": a.app, "version": a.version, "env": a.env, "digest": digest.to_string(), "targets": targets }),
            );
        } else {
            outln!(
                "Staging {} {} on {} agent(s) of {}. Follow with: stagehand status {} --env {}",
                a.app,
                a.version,
                targets.len(),
                a.env,
                a.app,
                a.env
            );
        }
        return Ok(0);
    }
    let req = AdminRequest::WaitStaged {
        app: a.app.clone(),
        version: a.version.clone(),
        env: a.env.clone(),
        timeout_secs: a.timeout.as_secs(),
    };
    let code = wait_and_report(&client, &req, ctx, "staged", &format!("{} {} in {}", a.app, a.version, a.env)).await?;
    client.close().await;
    Ok(code)
}

/// Waits on the controller and prints per-agent results; 0 only if every agent is done.
pub async fn wait_and_report(
    client: &Client,
    req: &AdminRequest,
    ctx: &Ctx,
    done_word: &str,
    what: &str,
) -> Result<i32> {
    let resp = client.call(req).await?;
    let AdminResponse::Waited { done, failed, pending } = resp else { bail!("unexpected answer: {resp:?}") };
    let ok = failed.is_empty() && pending.is_empty();
    if ctx.json() {
        let failed: Vec<_> = failed.iter().map(|(id, why)| serde_json::json!({ "agent": id, "reason": why })).collect();
        super::print_json(&serde_json::json!({ "ok": ok, done_word: done, "failed": failed, "pending": pending }));
    } else {
        let ids = |v: &[AgentId]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>().join(", ");
        if ok {
            outln!("{what}: {done_word} on all {} agent(s).", done.len());
        } else {
            outln!(
                "{what}: {done_word} on {} agent(s), failed on {}, still pending on {}.",
                done.len(),
                failed.len(),
                pending.len()
            );
            for (id, why) in &failed {
                outln!("  failed  {id}: {why}");
            }
            if !pending.is_empty() {
                outln!("  pending {}", ids(&pending));
            }
        }
    }
    if !ok && !ctx.json() {
        eprintln!("error: not every agent finished; see `stagehand status APP --env ENV` and the agents' logs");
    }
    Ok(if ok { 0 } else { 1 })
}
