//! `stagehand release` and `stagehand rollback`: each starts a rollout (or prints its plan,
//! or exports a signed message to carry by hand).

use super::rollout::{follow, print_started};
use super::Ctx;
use anyhow::{bail, Context, Result};
use clap::Args;
use stagehand_common::activate::Activate;
use stagehand_common::protocol::{AdminRequest, AdminResponse, Labels, RolloutSpec};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ReleaseArgs {
    /// The app, as pushed.
    #[arg(value_parser = super::app_name)]
    pub app: String,
    /// The version to make live; it must be staged on the targets (`stagehand deploy`).
    #[arg(id = "artifact_version", value_name = "VERSION", value_parser = super::version_name)]
    pub version: String,
    /// The environment whose agents it goes to.
    #[arg(long, value_parser = super::env_name)]
    pub env: String,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Release even though this artifact has not completed a rollout in the environment
    /// before this one (the promotion rule); the rollout records it.
    #[arg(long, conflicts_with = "export")]
    pub force: bool,
    /// On hosts where the app is in traffic mode (`listen` in agent.toml), give the new
    /// version this share of new connections, 1-100, with the old version still running
    /// for the rest; a later release at 100 completes the move, a rollback undoes it.
    #[arg(long, conflicts_with = "export", value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
    pub traffic: Option<u8>,
    /// Outside the environment's release windows, refuse instead of waiting for the next.
    #[arg(long, conflicts_with = "export")]
    pub no_wait_window: bool,
    #[command(flatten)]
    pub send: SendArgs,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// The app to roll back.
    #[arg(value_parser = super::app_name)]
    pub app: String,
    /// The environment to roll back.
    #[arg(long, value_parser = super::env_name)]
    pub env: String,
    /// The staged version to go back to (default: the one released before the current).
    #[arg(long)]
    pub to: Option<String>,
    /// Go back even to a version that never completed a rollout here nor in the environment
    /// before (with --to); the rollout records it.
    #[arg(long, conflicts_with = "export")]
    pub force: bool,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub send: SendArgs,
}

/// How a rollout is shaped.
#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Cumulative wave sizes, counts or percentages of the targets (rounded up), e.g.
    /// `1,25%,100%` (default: the environment's `waves`, or one wave).
    #[arg(long, value_parser = waves_arg)]
    pub waves: Option<String>,
    /// How long a wave stays healthy before the next starts (default: the environment's `bake`, or 0).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub bake: Option<Duration>,
    /// How many hosts (N) or what share (P%) may fail before the rollout stops and rolls back (default 0).
    #[arg(long, value_name = "N|P%", value_parser = max_unhealthy_arg)]
    pub max_unhealthy: Option<String>,
    /// Only agents whose join-token labels include K=V (repeatable).
    #[arg(long = "selector", value_name = "K=V", value_parser = super::parse_label)]
    pub selectors: Vec<(String, String)>,
    /// Targets that are offline: wait for them (up to --timeout), skip them, or fail.
    #[arg(long, value_parser = ["wait", "skip", "fail"])]
    pub offline: Option<String>,
    /// Switch at this time (RFC 3339 in UTC, e.g. 2026-11-26T18:00:00Z, or +DURATION):
    /// agents hold the signed messages and switch then, even if the controller is down.
    #[arg(long, value_name = "TIME", value_parser = parse_at)]
    pub at: Option<u64>,
    /// Print the plan (waves, hosts, who would refuse or is offline) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long a wave waits for its hosts to be staged, connected and to answer; --wait
    /// gives up after this long without any change (plus the bake).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// How the rollout is followed, or the message exported.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// Follow the rollout; exit 0 when it succeeded, 1 when it failed, was aborted or rolled back.
    #[arg(long)]
    pub wait: bool,
    /// Write one signed message for every agent of the environment to FILE instead of
    /// starting a rollout (for `stagehand-agent activate`).
    #[arg(long, conflicts_with_all = ["wait", "waves", "bake", "max_unhealthy", "selectors", "offline", "at", "dry_run"])]
    pub export: Option<PathBuf>,
    /// How long the signed messages stay valid (default: the controller's message_ttl).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub valid_for: Option<Duration>,
}

/// `--waves`, checked before anything is sent (a bad list is a usage error).
fn waves_arg(s: &str) -> Result<String, String> {
    crate::plan::rollout::parse_waves(s).map(|_| s.to_string())
}

/// `--max-unhealthy`, checked before anything is sent.
fn max_unhealthy_arg(s: &str) -> Result<String, String> {
    crate::plan::rollout::parse_max_unhealthy(s, 100).map(|_| s.to_string())
}

/// `--at`: RFC 3339 (UTC) or `+DURATION`, as Unix seconds.
fn parse_at(s: &str) -> Result<u64, String> {
    let now = std::time::SystemTime::now();
    let at = match s.strip_prefix('+') {
        Some(d) => now + humantime::parse_duration(d).map_err(|e| format!("{s:?}: {e}"))?,
        None => humantime::parse_rfc3339_weak(s)
            .map_err(|e| format!("{s:?} is neither RFC 3339 (2026-11-26T18:00:00Z) nor +DURATION: {e}"))?,
    };
    Ok(at.duration_since(std::time::UNIX_EPOCH).map_err(|_| format!("{s:?} is before 1970"))?.as_secs())
}

impl PlanArgs {
    fn spec(&self, app: &str, version: Option<String>, env: &str, rollback: bool, send: &SendArgs) -> RolloutSpec {
        RolloutSpec {
            app: app.to_string(),
            version,
            env: env.to_string(),
            rollback,
            waves: self.waves.clone(),
            bake_secs: self.bake.map(|d| d.as_secs()),
            max_unhealthy: self.max_unhealthy.clone(),
            selectors: self.selectors.iter().cloned().collect::<Labels>(),
            offline: self.offline.clone(),
            at: self.at.unwrap_or(0),
            force: false,
            dry_run: self.dry_run,
            ttl_secs: send.valid_for.map_or(0, |d| d.as_secs()),
            timeout_secs: self.timeout.as_secs(),
            traffic: 100,
            no_wait_window: false,
        }
    }
}

pub async fn run_release(a: ReleaseArgs, ctx: &Ctx) -> Result<i32> {
    if let Some(path) = &a.send.export {
        let req = AdminRequest::Release {
            app: a.app.clone(),
            version: a.version.clone(),
            env: a.env.clone(),
            export: true,
            ttl_secs: a.send.valid_for.map_or(0, |d| d.as_secs()),
        };
        return export(ctx, req, &a.app, &a.env, path).await;
    }
    let spec = RolloutSpec {
        force: a.force,
        traffic: a.traffic.unwrap_or(100),
        no_wait_window: a.no_wait_window,
        ..a.plan.spec(&a.app, Some(a.version.clone()), &a.env, false, &a.send)
    };
    start(ctx, spec, a.send.wait, a.plan.timeout).await
}

pub async fn run_rollback(a: RollbackArgs, ctx: &Ctx) -> Result<i32> {
    if let Some(path) = &a.send.export {
        let req = AdminRequest::Rollback {
            app: a.app.clone(),
            env: a.env.clone(),
            to: a.to.clone(),
            export: true,
            ttl_secs: a.send.valid_for.map_or(0, |d| d.as_secs()),
        };
        return export(ctx, req, &a.app, &a.env, path).await;
    }
    let spec = RolloutSpec { force: a.force, ..a.plan.spec(&a.app, a.to.clone(), &a.env, true, &a.send) };
    start(ctx, spec, a.send.wait, a.plan.timeout).await
}

async fn start(ctx: &Ctx, spec: RolloutSpec, wait: bool, timeout: Duration) -> Result<i32> {
    let dry_run = spec.dry_run;
    let client = ctx.client().await?;
    let resp = client.call(&AdminRequest::Rollout(spec)).await?;
    let AdminResponse::Rollout { rollout, notes } = resp else { bail!("{}", super::unexpected(&resp)) };
    if dry_run || !wait {
        client.close().await;
        print_started(ctx, &rollout, &notes);
        // A plan that a real release would refuse says so in its exit status.
        let refuses = notes.iter().any(|n| n.starts_with("would refuse"));
        return Ok(if dry_run && refuses { 1 } else { 0 });
    }
    if !ctx.json() {
        for n in &notes {
            outln!("note: {}", super::clean(n));
        }
    }
    let mut client = client;
    let code = follow(&mut client, ctx, rollout, timeout).await?;
    client.close().await;
    Ok(code)
}

async fn export(ctx: &Ctx, req: AdminRequest, app: &str, env: &str, path: &PathBuf) -> Result<i32> {
    let client = ctx.client().await?;
    let resp = client.call(&req).await?;
    client.close().await;
    let AdminResponse::Exported { message, version, seq, targets, key_changes, policies } = resp else {
        bail!("{}", super::unexpected(&resp))
    };
    let body = Activate::decode_unverified(&message.body).context("the controller sent an undecodable message")?;
    stagehand_common::fsx::write_atomic(path, message.to_export_full(&body, &key_changes, &policies).as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    if ctx.json() {
        super::print_json(
            &serde_json::json!({ "app": app, "version": version, "env": env, "seq": seq, "file": path, "targets": targets }),
        );
    } else {
        outln!(
            "Wrote the activate message for {app} {version} (seq {seq}, {} target(s)) to {}. Apply it on a host with: stagehand-agent activate --data-dir DIR --file {}",
            targets.len(),
            path.display(),
            path.display()
        );
    }
    Ok(0)
}
