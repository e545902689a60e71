//! `stagehand status APP --env ENV`.

use super::{clean, Ctx};
use anyhow::{bail, Result};
use clap::Args;
use stagehand_common::activate::Refusal;
use stagehand_common::protocol::{AdminRequest, AdminResponse, ReceiptOutcome};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The app, as pushed.
    #[arg(value_parser = super::app_name)]
    pub app: String,
    /// The environment to show (default: every environment that has agents).
    #[arg(long, value_parser = super::env_name)]
    pub env: Option<String>,
}

pub async fn run(a: StatusArgs, ctx: &Ctx) -> Result<i32> {
    let client = ctx.client().await?;
    let envs = match &a.env {
        Some(env) => vec![env.clone()],
        None => {
            let resp = client.call(&AdminRequest::ListAgents).await?;
            let AdminResponse::Agents { agents } = resp else { bail!("{}", super::unexpected(&resp)) };
            let envs: std::collections::BTreeSet<String> = agents.into_iter().map(|a| a.env).collect();
            envs.into_iter().collect()
        }
    };
    let mut all = Vec::new();
    for env in envs {
        let resp = client.call(&AdminRequest::Status { app: a.app.clone(), env }).await?;
        let AdminResponse::Status { status } = resp else { bail!("{}", super::unexpected(&resp)) };
        all.push(status);
    }
    client.close().await;
    if ctx.json() {
        match (&a.env, all.as_slice()) {
            (Some(_), [one]) => super::print_json(&one.to_json()),
            _ => super::print_json(&serde_json::Value::Array(all.iter().map(|s| s.to_json()).collect())),
        }
        return Ok(0);
    }
    if all.is_empty() {
        outln!("No agents yet. Enrol one: stagehand token create --env ENV, then stagehand-agent join on the host.");
    }
    for (i, status) in all.iter().enumerate() {
        if i > 0 {
            outln!("");
        }
        print_one(status);
    }
    Ok(0)
}

fn print_one(status: &stagehand_common::protocol::AppStatus) {
    // What runs where, beside what should.
    let mut live: std::collections::BTreeMap<&str, usize> = Default::default();
    for ag in &status.agents {
        *live.entry(ag.active.as_deref().unwrap_or("nothing")).or_default() += 1;
    }
    let live = live.iter().map(|(v, n)| format!("{} on {n}", clean(v))).collect::<Vec<_>>().join(", ");
    match &status.desired {
        Some((v, seq)) => outln!("{} in {}: released {} (seq {seq}); live: {live}", status.app, status.env, clean(v)),
        None => outln!("{} in {}: never released; live: {live}", status.app, status.env),
    }
    if status.agents.is_empty() {
        outln!("No agents in {}. Enrol one: stagehand token create --env {}", status.env, status.env);
        return;
    }
    let now = stagehand_common::ids::now_secs();
    outln!("{:<20} {:<16} {:<10} {:<12} {:<26} LAST RECEIPT", "ID", "NAME", "CONNECTED", "ACTIVE", "STAGED");
    for ag in &status.agents {
        let receipt = match &ag.last_receipt {
            None => "-".to_string(),
            Some(r) => {
                let what = match &r.outcome {
                    ReceiptOutcome::Committed => format!("committed in {}", ms(r.total_us)),
                    // Switched, found unhealthy, switched back by itself.
                    ReceiptOutcome::Refused(why @ (Refusal::Unhealthy | Refusal::Interrupted)) => {
                        format!("switched back: {}", why.code())
                    }
                    ReceiptOutcome::Refused(why) => format!("refused: {}", why.code()),
                    ReceiptOutcome::Scheduled { until } => format!("scheduled for {}", ago(now, *until)),
                };
                // The agent's own account (a health check's output, what was modified).
                let detail = r.log.lines().rev().find(|l| !l.trim().is_empty()).map(|l| format!(" ({})", l.trim()));
                format!("{} seq {} {what}, {}{}", r.version, r.seq, ago(now, r.at), detail.unwrap_or_default())
            }
        };
        // The newest versions, so that the column keeps its width.
        let mut staged: Vec<String> = ag.staged.iter().rev().take(3).rev().cloned().collect();
        if ag.staged.len() > 3 {
            staged.insert(0, format!("+{}", ag.staged.len() - 3));
        }
        let mut staged = staged.join(",");
        for (v, _) in &ag.staging_failed {
            staged.push_str(&format!(" {v}:failed"));
        }
        // Everything an agent reported is printed escaped: it may carry control characters.
        outln!(
            "{:<20} {:<16} {:<10} {:<12} {:<26} {}",
            ag.id,
            clean(&ag.name),
            if ag.connected { "yes" } else { "no" },
            clean(ag.active.as_deref().unwrap_or("-")),
            if staged.is_empty() { "-".into() } else { clean(&staged) },
            clean(&receipt)
        );
        for (v, why) in &ag.staging_failed {
            outln!("{:<20} staging {} failed: {}", "", clean(v), clean(why));
        }
        for (v, what) in ag.verify.iter().filter(|(_, w)| w != "passed") {
            outln!("{:<20} [verify] of {}: {}", "", clean(v), clean(what));
        }
        if let Some((v, port)) = &ag.preview {
            outln!(
                "{:<20} preview: {} on port {port} (no traffic; stagehand preview stop APP --env ENV ends it)",
                "",
                clean(v)
            );
        }
    }
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

/// A time as operators read it in a table: how long ago, or from now.
pub fn ago(now: u64, at: u64) -> String {
    if at == 0 {
        return "at an unknown time".into();
    }
    let (d, past) = if at <= now { (now - at, true) } else { (at - now, false) };
    let text = match d {
        0..60 => format!("{d}s"),
        60..3600 => format!("{}m", d / 60),
        3600..86400 => format!("{}h{}m", d / 3600, d % 3600 / 60),
        _ => format!("{}d", d / 86400),
    };
    if past {
        format!("{text} ago")
    } else {
        format!("in {text}")
    }
}
