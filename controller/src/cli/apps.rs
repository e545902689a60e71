//! `stagehand apps list`, `versions APP`, `history APP --env ENV`, `artifact rm APP VERSION`:
//! what was pushed, where it is deployed and released, what happened to it, and removing it.

use super::status::ago;
use super::{clean, Ctx};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use stagehand_common::protocol::{AdminRequest, AdminResponse, VersionInfo};

#[derive(Subcommand, Debug)]
pub enum AppsCommand {
    /// Every app: how many versions, the newest, where each environment's release is.
    List,
}

#[derive(Args, Debug)]
pub struct VersionsArgs {
    /// The app, as pushed.
    #[arg(value_parser = super::app_name)]
    pub app: String,
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// The app, as pushed.
    #[arg(value_parser = super::app_name)]
    pub app: String,
    /// The environment whose releases to show.
    #[arg(long, value_parser = super::env_name)]
    pub env: String,
}

#[derive(Subcommand, Debug)]
pub enum ArtifactCommand {
    /// Delete a pushed version, and the chunks no other version uses. Refused while agents
    /// are ordered to hold it, run it, or a rollout names it.
    Rm(RmArgs),
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// The app, as pushed.
    #[arg(value_parser = super::app_name)]
    pub app: String,
    /// The version to delete.
    #[arg(id = "artifact_version", value_name = "VERSION", value_parser = super::version_name)]
    pub version: String,
}

fn size(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
        _ => format!("{:.2} GiB", bytes as f64 / 1_073_741_824.0),
    }
}

async fn versions(ctx: &Ctx) -> Result<Vec<VersionInfo>> {
    let client = ctx.client().await?;
    let resp = client.call(&AdminRequest::ListApps).await?;
    client.close().await;
    let AdminResponse::Apps { versions } = resp else { bail!("{}", super::unexpected(&resp)) };
    Ok(versions)
}

fn version_json(v: &VersionInfo) -> serde_json::Value {
    serde_json::json!({
        "app": v.app, "version": v.version, "digest": v.digest.to_hex(), "size": v.size,
        "pushed_at": v.pushed_at, "deployed_to": v.deployed_to, "released_in": v.released_in,
    })
}

pub async fn list(ctx: &Ctx) -> Result<i32> {
    let all = versions(ctx).await?;
    let mut apps: std::collections::BTreeMap<&str, Vec<&VersionInfo>> = Default::default();
    for v in &all {
        apps.entry(v.app.as_str()).or_default().push(v);
    }
    if ctx.json() {
        let rows: Vec<_> = apps
            .iter()
            .map(|(app, vs)| {
                let newest = vs.iter().max_by_key(|v| v.pushed_at).map(|v| v.version.clone());
                let released: std::collections::BTreeMap<&str, &str> =
                    vs.iter().flat_map(|v| v.released_in.iter().map(|e| (e.as_str(), v.version.as_str()))).collect();
                serde_json::json!({
                    "app": app, "versions": vs.len(), "newest": newest,
                    "size": vs.iter().map(|v| v.size).sum::<u64>(), "released": released,
                })
            })
            .collect();
        super::print_json(&serde_json::Value::Array(rows));
        return Ok(0);
    }
    if apps.is_empty() {
        outln!("Nothing pushed yet: stagehand push APP VERSION PATH");
        return Ok(0);
    }
    outln!("{:<24} {:>8} {:<16} RELEASED", "APP", "VERSIONS", "NEWEST");
    for (app, vs) in &apps {
        let newest = vs.iter().max_by_key(|v| v.pushed_at).map_or("-", |v| v.version.as_str());
        let mut released: Vec<String> =
            vs.iter().flat_map(|v| v.released_in.iter().map(move |e| format!("{e}={}", clean(&v.version)))).collect();
        released.sort();
        outln!(
            "{:<24} {:>8} {:<16} {}",
            clean(app),
            vs.len(),
            clean(newest),
            if released.is_empty() { "-".into() } else { released.join(" ") }
        );
    }
    Ok(0)
}

pub async fn show_versions(a: VersionsArgs, ctx: &Ctx) -> Result<i32> {
    let mut vs: Vec<VersionInfo> = versions(ctx).await?.into_iter().filter(|v| v.app == a.app).collect();
    vs.sort_by_key(|v| std::cmp::Reverse(v.pushed_at));
    if ctx.json() {
        super::print_json(&serde_json::Value::Array(vs.iter().map(version_json).collect()));
        return Ok(0);
    }
    if vs.is_empty() {
        bail!(crate::client::OpError::new(format!("no version of {} was pushed", a.app), "stagehand apps list"));
    }
    let now = stagehand_common::ids::now_secs();
    outln!("{:<16} {:<14} {:>10} {:<12} {:<20} RELEASED IN", "VERSION", "DIGEST", "SIZE", "PUSHED", "DEPLOYED TO");
    for v in &vs {
        let list = |l: &[String]| if l.is_empty() { "-".to_string() } else { l.join(",") };
        outln!(
            "{:<16} {:<14} {:>10} {:<12} {:<20} {}",
            clean(&v.version),
            v.digest.short(),
            size(v.size),
            ago(now, v.pushed_at),
            list(&v.deployed_to),
            list(&v.released_in)
        );
    }
    Ok(0)
}

pub async fn history(a: HistoryArgs, ctx: &Ctx) -> Result<i32> {
    let client = ctx.client().await?;
    let resp = client.call(&AdminRequest::ListRollouts { app: Some(a.app.clone()), env: Some(a.env.clone()) }).await?;
    client.close().await;
    let AdminResponse::Rollouts { rollouts } = resp else { bail!("{}", super::unexpected(&resp)) };
    if ctx.json() {
        let rows: Vec<_> = rollouts
            .iter()
            .map(|r| {
                serde_json::json!({
                    "rollout": r.id, "kind": r.kind, "version": r.version, "state": r.state, "reason": r.reason,
                    "by": r.requested_by, "forced": r.forced, "created_at": r.created_at, "ended_at": r.ended_at,
                    "hosts": r.waves.iter().map(|w| w.hosts.len()).sum::<usize>(),
                })
            })
            .collect();
        super::print_json(&serde_json::Value::Array(rows));
        return Ok(0);
    }
    if rollouts.is_empty() {
        outln!("{} was never released in {}.", a.app, a.env);
        return Ok(0);
    }
    let now = stagehand_common::ids::now_secs();
    outln!(
        "{:<8} {:<10} {:<16} {:<10} {:<12} {:<12} {:>5} REASON",
        "ROLLOUT",
        "KIND",
        "VERSION",
        "STATE",
        "WHEN",
        "BY",
        "HOSTS"
    );
    for r in &rollouts {
        outln!(
            "{:<8} {:<10} {:<16} {:<10} {:<12} {:<12} {:>5} {}",
            r.id,
            r.kind,
            clean(&r.version),
            r.state,
            ago(now, r.created_at),
            clean(&r.requested_by),
            r.waves.iter().map(|w| w.hosts.len()).sum::<usize>(),
            if r.reason.is_empty() { "-".into() } else { clean(&r.reason) }
        );
    }
    Ok(0)
}

pub async fn artifact(cmd: ArtifactCommand, ctx: &Ctx) -> Result<i32> {
    let ArtifactCommand::Rm(a) = cmd;
    let client = ctx.client().await?;
    let resp = client.call(&AdminRequest::RemoveArtifact { app: a.app.clone(), version: a.version.clone() }).await?;
    client.close().await;
    let AdminResponse::ArtifactRemoved { app, version, chunks, bytes } = resp else {
        bail!("{}", super::unexpected(&resp))
    };
    if ctx.json() {
        super::print_json(&serde_json::json!({
            "app": app, "version": version, "chunks_removed": chunks, "bytes_freed": bytes,
        }));
    } else {
        outln!(
            "Removed {} {}: freed {} in {chunks} chunk(s) no other version uses.",
            clean(&app),
            clean(&version),
            size(bytes)
        );
    }
    Ok(0)
}
