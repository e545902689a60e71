//! `stagehand rollout list|status|pause|resume|abort`, and how a rollout is shown and
//! followed (`release --wait` follows the same way as `rollout status --watch`).

use super::{clean, Ctx};
use crate::client::Client;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use stagehand_common::protocol::{AdminRequest, AdminResponse, ReceiptOutcome, RolloutAction, RolloutView};
use std::io::IsTerminal;
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// Rollouts, newest first.
    List(ListArgs),
    /// One rollout: its waves and hosts; `--watch` follows it to the end.
    Status(StatusArgs),
    /// Finish the current wave, then hold.
    Pause(IdArg),
    /// Go on after a pause.
    Resume(IdArg),
    /// Stop, and send every host this rollout switched back to what it ran before.
    Abort(IdArg),
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only rollouts of this app.
    #[arg(long, value_parser = super::app_name)]
    pub app: Option<String>,
    /// Only rollouts in this environment.
    #[arg(long, value_parser = super::env_name)]
    pub env: Option<String>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The rollout id (`r-N`), as `release` and `rollout list` print it.
    pub id: String,
    /// Follow it: exit 0 when it succeeded, 1 when it failed, was aborted or rolled back.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: give up when nothing changed for this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct IdArg {
    /// The rollout id (`r-N`).
    pub id: String,
}

pub async fn run(c: RolloutCommand, ctx: &Ctx) -> Result<i32> {
    let client = ctx.client().await?;
    let code = match c {
        RolloutCommand::List(a) => {
            let resp = client.call(&AdminRequest::ListRollouts { app: a.app, env: a.env }).await?;
            let AdminResponse::Rollouts { rollouts } = resp else { bail!("{}", super::unexpected(&resp)) };
            if ctx.json() {
                super::print_json(&serde_json::Value::Array(rollouts.iter().map(json).collect()));
            } else if rollouts.is_empty() {
                outln!("No rollouts yet. Start one with: stagehand release APP VERSION --env ENV");
            } else {
                outln!(
                    "{:<8} {:<14} {:<14} {:<10} {:<9} {:<17} {:<7} REASON",
                    "ID",
                    "APP",
                    "VERSION",
                    "ENV",
                    "KIND",
                    "STATE",
                    "WAVE"
                );
                for r in &rollouts {
                    outln!(
                        "{:<8} {:<14} {:<14} {:<10} {:<9} {:<17} {:<7} {}",
                        r.id,
                        clean(&r.app),
                        clean(&r.version),
                        clean(&r.env),
                        r.kind,
                        r.state,
                        format!("{}/{}", (r.wave as usize + 1).min(r.waves.len()), r.waves.len()),
                        list_note(r)
                    );
                }
            }
            0
        }
        RolloutCommand::Status(a) => {
            let resp =
                client.call(&AdminRequest::RolloutStatus { id: a.id, after_revision: 0, timeout_secs: 0 }).await?;
            let AdminResponse::Rollout { rollout, .. } = resp else { bail!("{}", super::unexpected(&resp)) };
            if a.watch {
                let mut client = client;
                let code = follow(&mut client, ctx, rollout, a.timeout).await?;
                client.close().await;
                return Ok(code);
            } else {
                if ctx.json() {
                    super::print_json(&json(&rollout));
                } else {
                    out!("{}", render(&rollout));
                }
                exit_code(&rollout)
            }
        }
        RolloutCommand::Pause(a) => control(&client, ctx, a.id, RolloutAction::Pause).await?,
        RolloutCommand::Resume(a) => control(&client, ctx, a.id, RolloutAction::Resume).await?,
        RolloutCommand::Abort(a) => control(&client, ctx, a.id, RolloutAction::Abort).await?,
    };
    client.close().await;
    Ok(code)
}

async fn control(client: &Client, ctx: &Ctx, id: String, action: RolloutAction) -> Result<i32> {
    let resp = client.call(&AdminRequest::ControlRollout { id: id.clone(), action }).await?;
    let AdminResponse::Rollout { rollout, notes } = resp else { bail!("{}", super::unexpected(&resp)) };
    if ctx.json() {
        let mut v = json(&rollout);
        v["notes"] = serde_json::json!(notes);
        super::print_json(&v);
    } else {
        outln!("{id}: {}. Follow with: stagehand rollout status {id} --watch", notes.join("; "));
    }
    Ok(0)
}

/// Exit status of a rollout: 0 succeeded (or still going), 1 failed, aborted or rolled back.
fn exit_code(r: &RolloutView) -> i32 {
    match r.state.as_str() {
        "failed" | "aborted" | "rolling-back" | "rejected" => 1,
        _ => 0,
    }
}

fn is_final(r: &RolloutView) -> bool {
    matches!(r.state.as_str(), "succeeded" | "failed" | "aborted" | "rejected")
}

/// A rollout for `-o json`: the view, with `rollout` (its id) and the digest in hex.
pub fn json(r: &RolloutView) -> serde_json::Value {
    let mut v = serde_json::to_value(r).expect("views serialise");
    v["rollout"] = serde_json::Value::String(r.id.clone());
    v["digest"] = serde_json::Value::String(r.digest.to_hex());
    // Receipts in the shared vocabulary.
    for (w, wave) in r.waves.iter().enumerate() {
        for (h, host) in wave.hosts.iter().enumerate() {
            v["waves"][w]["hosts"][h]["receipt"] =
                host.receipt.as_ref().map_or(serde_json::Value::Null, |x| x.to_json());
        }
    }
    v
}

/// Prints what `release`/`rollback` started (or planned with --dry-run).
pub fn print_started(ctx: &Ctx, r: &RolloutView, notes: &[String]) {
    if ctx.json() {
        let mut v = json(r);
        v["notes"] = serde_json::json!(notes);
        super::print_json(&v);
        return;
    }
    out!("{}", render(r));
    for n in notes {
        outln!("note: {}", clean(n));
    }
    if r.state != "planned" {
        outln!("Follow with: stagehand rollout status {} --watch", r.id);
    }
}

/// Follows a rollout until it ends: a live table on a terminal, a line per change
/// otherwise, the final view with `-o json`. Exit status as [`exit_code`].
pub async fn follow(client: &mut Client, ctx: &Ctx, mut r: RolloutView, timeout: Duration) -> Result<i32> {
    let live = !ctx.json() && std::io::stdout().is_terminal();
    let mut drawn = 0usize;
    let mut last: Option<RolloutView> = None;
    // Gives up only after `timeout` without any change (beyond a bake or a scheduled time).
    let quiet_limit = |r: &RolloutView| {
        let until_at = r.not_before.saturating_sub(stagehand_common::ids::now_secs());
        timeout + Duration::from_secs(r.bake_secs.max(until_at))
    };
    let mut deadline = tokio::time::Instant::now() + quiet_limit(&r);
    loop {
        if live {
            let table = render(&r);
            if drawn > 0 {
                // Up over the previous table, and clear to the end of the screen.
                out!("\x1b[{drawn}A\x1b[J");
            }
            out!("{table}");
            drawn = table.lines().count();
        } else if !ctx.json() {
            for line in changes(last.as_ref(), &r) {
                outln!("{line}");
            }
        }
        if is_final(&r) {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            if ctx.json() {
                super::print_json(&json(&r));
            }
            eprintln!(
                "error: rollout {} is still {} and nothing changed for {}; it goes on without you",
                r.id,
                r.state,
                humantime::format_duration(timeout)
            );
            eprintln!("  next: stagehand rollout status {} --watch", r.id);
            return Ok(1);
        }
        let req = AdminRequest::RolloutStatus { id: r.id.clone(), after_revision: r.revision, timeout_secs: 30 };
        let resp = match client.call(&req).await {
            Ok(resp) => resp,
            // The rollout goes on in the controller: a restart of it (or a lost connection)
            // is waited out, not reported as the rollout's failure.
            Err(e) if e.downcast_ref::<crate::client::OpError>().is_none() => {
                if !ctx.json() {
                    eprintln!("warning: lost the controller ({e:#}); reconnecting…");
                }
                *client = reconnect(ctx, deadline).await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let AdminResponse::Rollout { rollout, .. } = resp else { bail!("{}", super::unexpected(&resp)) };
        if rollout.revision != r.revision {
            deadline = tokio::time::Instant::now() + quiet_limit(&rollout);
        }
        last = Some(std::mem::replace(&mut r, rollout));
    }
    if ctx.json() {
        super::print_json(&json(&r));
    } else {
        let verdict = match r.state.as_str() {
            "succeeded" if r.traffic < 100 => format!(
                "Rollout {} succeeded: {} {} takes {}% of new connections in {} (hosts in traffic mode); \
                 release it again without --traffic to move them all, or roll back.",
                r.id,
                clean(&r.app),
                clean(&r.version),
                r.traffic,
                clean(&r.env)
            ),
            "succeeded" => format!(
                "Rollout {} succeeded: {} {} is live in {}.",
                r.id,
                clean(&r.app),
                clean(&r.version),
                clean(&r.env)
            ),
            _ => format!("Rollout {} {}: {}", r.id, r.state, clean(&r.reason)),
        };
        outln!("{verdict}");
        let stranded: Vec<String> = r
            .waves
            .iter()
            .flat_map(|w| &w.hosts)
            .filter(|h| h.state == "not-reverted")
            .map(|h| format!("{} ({})", clean(&h.name), clean(&h.detail)))
            .collect();
        if !stranded.is_empty() {
            eprintln!(
                "error: rollout {} {}; these hosts could not be sent back: {}",
                r.id,
                r.state,
                stranded.join(", ")
            );
            eprintln!(
                "  next: stagehand status {} --env {}   (they are brought back when they return; or stagehand rollback {} --env {} --to VERSION)",
                clean(&r.app),
                clean(&r.env),
                clean(&r.app),
                clean(&r.env)
            );
        } else if r.state != "succeeded" {
            eprintln!(
                "error: rollout {} {}; every host it switched was sent back to what it ran before",
                r.id, r.state
            );
            eprintln!(
                "  next: stagehand rollout status {}   (each host's receipt), stagehand status {} --env {}",
                r.id,
                clean(&r.app),
                clean(&r.env)
            );
        }
    }
    Ok(exit_code(&r))
}

/// Connects again, with backoff, until `deadline`.
async fn reconnect(ctx: &Ctx, deadline: tokio::time::Instant) -> Result<Client> {
    let mut pause = Duration::from_millis(200);
    loop {
        match ctx.client().await {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() + pause >= deadline => return Err(e),
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Lines for what changed between two views of a rollout (plain output).
fn changes(before: Option<&RolloutView>, now: &RolloutView) -> Vec<String> {
    let mut out = Vec::new();
    let id = &now.id;
    if before.is_none_or(|b| b.state != now.state) {
        let why = if now.reason.is_empty() { String::new() } else { format!(": {}", clean(&now.reason)) };
        out.push(format!(
            "{id}: {} of {} {} to {}: {}{why}",
            now.kind,
            clean(&now.app),
            clean(&now.version),
            clean(&now.env),
            now.state
        ));
    }
    for (i, w) in now.waves.iter().enumerate() {
        let old = before.and_then(|b| b.waves.get(i));
        if old.is_none_or(|o| o.state != w.state) {
            out.push(format!("{id} wave {}/{} ({} host(s)): {}", i + 1, now.waves.len(), w.hosts.len(), w.state));
        }
        for (j, h) in w.hosts.iter().enumerate() {
            let was = old.and_then(|o| o.hosts.get(j));
            if was.is_none_or(|x| x.state != h.state) {
                let detail = if h.detail.is_empty() { String::new() } else { format!(" ({})", clean(&h.detail)) };
                out.push(format!("{id}   {} {}{detail}", clean(&h.name), h.state));
            }
        }
    }
    out
}

/// A rollout as a table.
pub fn render(r: &RolloutView) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let at = if r.not_before > 0 {
        format!(
            ", switches at {}",
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(r.not_before))
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        "rollout {}: {} {} {} to {} ({}): {}{}",
        r.id,
        r.kind,
        clean(&r.app),
        clean(&r.version),
        clean(&r.env),
        r.digest.short(),
        r.state,
        if r.pause_requested { " (pausing after this wave)" } else { "" }
    );
    let _ = writeln!(
        s,
        "  {} wave(s), bake {}, max unhealthy {}, offline {}{}{}{}",
        r.waves.len(),
        humantime::format_duration(Duration::from_secs(r.bake_secs)),
        r.max_unhealthy,
        r.offline,
        at,
        if r.forced { ", forced past promotion" } else { "" },
        if r.traffic < 100 {
            format!(", {}% of new connections on traffic-mode hosts", r.traffic)
        } else {
            String::new()
        }
    );
    if !r.reason.is_empty() {
        let _ = writeln!(s, "  reason: {}", clean(&r.reason));
    }
    let _ = write!(s, "{}", gate_lines(r));
    let _ = writeln!(
        s,
        "  {:<6} {:<12} {:<20} {:<13} {:<10} {:<10} DETAIL",
        "WAVE", "STATE", "HOST", "HOST STATE", "PREVIOUS", "ONLINE"
    );
    for (i, w) in r.waves.iter().enumerate() {
        for (j, h) in w.hosts.iter().enumerate() {
            let (wave, state) = if j == 0 { (format!("{}", i + 1), w.state.as_str()) } else { (String::new(), "") };
            let mut detail = clean(&h.detail);
            if let Some(rc) = &h.receipt {
                if let ReceiptOutcome::Refused(why) = &rc.outcome {
                    if detail.is_empty() {
                        detail = why.code().to_string();
                    }
                }
            }
            let _ = writeln!(
                s,
                "  {:<6} {:<12} {:<20} {:<13} {:<10} {:<10} {}",
                wave,
                state,
                clean(&h.name),
                h.state,
                clean(h.previous.as_deref().unwrap_or("-")),
                if h.connected { "yes" } else { "no" },
                detail
            );
        }
    }
    for h in &r.skipped {
        let _ = writeln!(
            s,
            "  {:<6} {:<12} {:<20} {:<13} {:<10} {:<10} {}",
            "-",
            "skipped",
            clean(&h.name),
            h.state,
            "-",
            if h.connected { "yes" } else { "no" },
            clean(&h.detail)
        );
    }
    s
}

/// What a rollout waits for, or was let through by: approvals, a release window.
pub fn gate_lines(r: &RolloutView) -> String {
    let mut s = String::new();
    let time = |t: u64| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t)).to_string();
    if r.approvals_needed > 0 || !r.approvals.is_empty() {
        let by: Vec<String> =
            r.approvals.iter().map(|a| format!("{} at {}", clean(&a.by), time(a.at / 1000))).collect();
        s.push_str(&format!(
            "  approvals: {} of {}{}{}\n",
            r.approvals.len(),
            r.approvals_needed,
            if by.is_empty() { String::new() } else { format!(" ({})", by.join(", ")) },
            if r.state == "awaiting-approval" {
                format!("; another identity than {} runs: stagehand approve {}", clean(&r.requested_by), r.id)
            } else {
                String::new()
            }
        ));
    }
    if let (Some(t), "awaiting-window") = (r.window_opens, r.state.as_str()) {
        if t > 0 {
            s.push_str(&format!(
                "  waits for its release window, opening {} (stagehand policy show --env {})\n",
                time(t),
                clean(&r.env)
            ));
        }
    }
    s
}

/// The last column of `rollout list`: why it failed or what it waits for, and who approved it.
fn list_note(r: &RolloutView) -> String {
    let time = |t: u64| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t)).to_string();
    let mut parts = Vec::new();
    match r.state.as_str() {
        "awaiting-approval" => parts.push(format!(
            "{} of {} approval(s): stagehand approve {}",
            r.approvals.len(),
            r.approvals_needed,
            r.id
        )),
        "awaiting-window" => {
            if let Some(t) = r.window_opens.filter(|t| *t > 0) {
                parts.push(format!("window opens {}", time(t)));
            }
        }
        _ => {}
    }
    if !r.reason.is_empty() {
        parts.push(clean(&r.reason));
    }
    if !r.approvals.is_empty() {
        let by: Vec<String> =
            r.approvals.iter().map(|a| format!("{} at {}", clean(&a.by), time(a.at / 1000))).collect();
        parts.push(format!("approved by {}", by.join(", ")));
    }
    parts.join("; ")
}
