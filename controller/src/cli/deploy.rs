//! `stagehand deploy APP VERSION --env ENV [--wait] [--timeout DUR]`.

use super::Ctx;
use crate::client::Client;
use anyhow::{bail, Result};
use clap::Args;
use stagehand_common::protocol::{AdminRequest, AdminResponse};
use stagehand_common::AgentId;
use std::io::IsTerminal;
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
    let AdminResponse::Deployed { digest, targets } = resp else { bail!("{}", super::unexpected(&resp)) };
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
    let code = wait_and_report(&client, &req, ctx, &a).await?;
    client.close().await;
    Ok(code)
}

/// Waits on the controller and prints per-agent results; 0 only if every agent is done.
/// On a terminal, a line per agent on stderr shows where each one is meanwhile.
async fn wait_and_report(client: &Client, req: &AdminRequest, ctx: &Ctx, a: &DeployArgs) -> Result<i32> {
    let live = !ctx.json() && std::io::stderr().is_terminal();
    let resp = if live {
        let progress = progress(client, a);
        tokio::pin!(progress);
        let wait = client.call(req);
        tokio::pin!(wait);
        let resp = tokio::select! {
            r = &mut wait => r,
            _ = &mut progress => wait.await,
        };
        resp?
    } else {
        client.call(req).await?
    };
    let AdminResponse::Waited { done, failed, pending } = resp else { bail!("{}", super::unexpected(&resp)) };
    let ok = failed.is_empty() && pending.is_empty();
    if ctx.json() {
        let failed: Vec<_> = failed.iter().map(|(id, why)| serde_json::json!({ "agent": id, "reason": why })).collect();
        super::print_json(&serde_json::json!({
            "app": a.app, "version": a.version, "env": a.env, "ok": ok,
            "staged": done, "failed": failed, "pending": pending,
        }));
    } else {
        let what = format!("{} {} in {}", a.app, a.version, a.env);
        let ids = |v: &[AgentId]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>().join(", ");
        if ok && done.is_empty() {
            outln!("{what}: no agents to stage on.");
        } else if ok {
            outln!("{what}: staged on all {} agent(s).", done.len());
        } else {
            outln!(
                "{what}: staged on {} agent(s), failed on {}, still pending on {}.",
                done.len(),
                failed.len(),
                pending.len()
            );
            for (id, why) in &failed {
                outln!("  failed  {id}: {}", super::clean(why));
            }
            if !pending.is_empty() {
                outln!("  pending {}", ids(&pending));
            }
        }
    }
    if !ok && !ctx.json() {
        eprintln!("error: not every agent staged {} {}", a.app, a.version);
        eprintln!("  next: stagehand status {} --env {}   (and the logs of the agents above)", a.app, a.env);
    }
    Ok(if ok { 0 } else { 1 })
}

/// Redraws, every half second until dropped, one line per agent on stderr: staged, failed
/// (why), staging, or offline. Ends (and leaves the last drawing) if status cannot be read.
async fn progress(client: &Client, a: &DeployArgs) {
    let mut drawn = 0usize;
    loop {
        let req = AdminRequest::Status { app: a.app.clone(), env: a.env.clone() };
        let Ok(AdminResponse::Status { status }) = client.call(&req).await else { return };
        let mut text = String::new();
        for ag in &status.agents {
            let state = if ag.staged.contains(&a.version) {
                "staged".to_string()
            } else if let Some((_, why)) = ag.staging_failed.iter().find(|(v, _)| *v == a.version) {
                format!("failed: {why}")
            } else if !ag.connected {
                "waiting: offline".to_string()
            } else {
                "staging…".to_string()
            };
            text.push_str(&format!("  {:<16} {}\n", super::clean(&ag.name), super::clean(&state)));
        }
        if drawn > 0 {
            // Up over the previous lines, and clear to the end of the screen.
            eprint!("\x1b[{drawn}A\x1b[J");
        }
        eprint!("{text}");
        drawn = text.lines().count();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
