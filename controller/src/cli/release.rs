//! `stagehand release` and `stagehand rollback`.

use super::deploy::wait_and_report;
use super::Ctx;
use anyhow::{bail, Context, Result};
use clap::Args;
use stagehand_common::activate::Activate;
use stagehand_common::protocol::{AdminRequest, AdminResponse};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ReleaseArgs {
    pub app: String,
    #[arg(id = "artifact_version", value_name = "VERSION")]
    pub version: String,
    #[arg(long)]
    pub env: String,
    #[command(flatten)]
    pub send: SendArgs,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    pub app: String,
    #[arg(long)]
    pub env: String,
    /// The staged version to go back to (default: the one released before the current).
    #[arg(long)]
    pub to: Option<String>,
    #[command(flatten)]
    pub send: SendArgs,
}

/// How a signed message leaves: sent (and waited for) or exported.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// Exit 0 only when every target has committed it.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Write the signed message to FILE instead of sending it (for `stagehand-agent activate`).
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// How long the message stays valid (default: the controller's message_ttl).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub valid_for: Option<Duration>,
}

pub async fn run_release(a: ReleaseArgs, ctx: &Ctx) -> Result<i32> {
    let req = AdminRequest::Release {
        app: a.app.clone(),
        version: a.version,
        env: a.env.clone(),
        export: a.send.export.is_some(),
        ttl_secs: a.send.valid_for.map_or(0, |d| d.as_secs()),
    };
    send(ctx, req, &a.app, &a.env, a.send).await
}

pub async fn run_rollback(a: RollbackArgs, ctx: &Ctx) -> Result<i32> {
    let req = AdminRequest::Rollback {
        app: a.app.clone(),
        env: a.env.clone(),
        to: a.to,
        export: a.send.export.is_some(),
        ttl_secs: a.send.valid_for.map_or(0, |d| d.as_secs()),
    };
    send(ctx, req, &a.app, &a.env, a.send).await
}

async fn send(ctx: &Ctx, req: AdminRequest, app: &str, env: &str, how: SendArgs) -> Result<i32> {
    let SendArgs { wait, timeout, export, .. } = how;
    let client = ctx.client().await?;
    let resp = client.call(&req).await?;
    let AdminResponse::Released { message, version, seq, targets } = resp else { bail!("unexpected answer: {resp:?}") };
    if let Some(path) = export {
        client.close().await;
        let body = Activate::decode_unverified(&message.body).context("the controller sent an undecodable message")?;
        stagehand_common::fsx::write_atomic(&path, message.to_export(&body).as_bytes(), 0o644)
            .with_context(|| format!("writing {}", path.display()))?;
        if ctx.json() {
            super::print_json(
                &serde_json::json!({ "app": app, "version": version, "env": env, "seq": seq, "file": path, "targets": targets }),
            );
        } else {
            println!(
                "Wrote the activate message for {app} {version} (seq {seq}, {} target(s)) to {}. Apply it on a host with: stagehand-agent activate --data-dir DIR --file {}",
                targets.len(),
                path.display(),
                path.display()
            );
        }
        return Ok(0);
    }
    if !wait {
        client.close().await;
        if ctx.json() {
            super::print_json(
                &serde_json::json!({ "app": app, "version": version, "env": env, "seq": seq, "targets": targets }),
            );
        } else {
            println!("Releasing {app} {version} to {} agent(s) of {env} (seq {seq}). Follow with: stagehand status {app} --env {env}", targets.len());
        }
        return Ok(0);
    }
    let req =
        AdminRequest::WaitRelease { app: app.to_string(), env: env.to_string(), seq, timeout_secs: timeout.as_secs() };
    let code =
        wait_and_report(&client, &req, ctx, "committed", &format!("{app} {version} in {env} (seq {seq})")).await?;
    client.close().await;
    Ok(code)
}
