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
    /// The environment to show.
    #[arg(long, value_parser = super::env_name)]
    pub env: String,
}

pub async fn run(a: StatusArgs, ctx: &Ctx) -> Result<i32> {
    let client = ctx.client().await?;
    let resp = client.call(&AdminRequest::Status { app: a.app.clone(), env: a.env.clone() }).await?;
    client.close().await;
    let AdminResponse::Status { status } = resp else { bail!("unexpected answer: {resp:?}") };
    if ctx.json() {
        super::print_json(&serde_json::to_value(&status)?);
        return Ok(0);
    }
    match &status.desired {
        Some((v, seq)) => outln!("{} in {}: desired {v} (seq {seq})", status.app, status.env),
        None => outln!("{} in {}: never released", status.app, status.env),
    }
    if status.agents.is_empty() {
        outln!("No agents in {}.", status.env);
    }
    outln!("{:<16} {:<20} {:<10} {:<12} {:<24} LAST RECEIPT", "NAME", "ID", "CONNECTED", "ACTIVE", "STAGED");
    for ag in &status.agents {
        let receipt = match &ag.last_receipt {
            None => "-".to_string(),
            Some(r) => match &r.outcome {
                ReceiptOutcome::Committed => {
                    format!("seq {} {} committed in {}us", r.seq, r.version, r.total_us)
                }
                ReceiptOutcome::Refused(why) => match r.log.lines().next() {
                    // The agent's account of what was modified in its staged copy.
                    Some(first) if *why == Refusal::DigestMismatch => {
                        format!("seq {} {} refused: {} ({first})", r.seq, r.version, why.code())
                    }
                    _ => format!("seq {} {} refused: {}", r.seq, r.version, why.code()),
                },
                ReceiptOutcome::Scheduled { until } => {
                    format!("seq {} {} scheduled for {until}", r.seq, r.version)
                }
            },
        };
        let mut staged = ag.staged.join(",");
        for (v, why) in &ag.staging_failed {
            staged.push_str(&format!(" {v}:FAILED({why})"));
        }
        // Everything an agent reported is printed escaped: it may carry control characters.
        outln!(
            "{:<16} {:<20} {:<10} {:<12} {:<24} {}",
            clean(&ag.name),
            ag.id,
            if ag.connected { "yes" } else { "no" },
            clean(ag.active.as_deref().unwrap_or("-")),
            if staged.is_empty() { "-".into() } else { clean(&staged) },
            clean(&receipt)
        );
    }
    Ok(0)
}
