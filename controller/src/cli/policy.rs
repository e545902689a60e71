//! Release policy from the command line (SPEC §14): `approve`, `reject`, `freeze`,
//! `unfreeze`, `policy show`, `preview`.

use super::{clean, Ctx};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use stagehand_common::policy::{approve_plan, approve_policy};
use stagehand_common::protocol::{AdminRequest, AdminResponse, ToSign};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ApproveArgs {
    /// The rollout (`r-N`) awaiting approval, or a policy change (`policy-ENV-N`).
    pub id: String,
    /// Sign without asking (on a terminal, `approve` shows what it signs and asks first).
    #[arg(long, short)]
    pub yes: bool,
}

#[derive(Args, Debug)]
pub struct RejectArgs {
    /// The rollout (`r-N`) awaiting approval or its window.
    pub id: String,
    /// Why, for the audit log and the rollout's record.
    #[arg(long, default_value = "")]
    pub reason: String,
}

#[derive(Args, Debug)]
pub struct FreezeArgs {
    #[arg(long, value_parser = super::env_name)]
    pub env: String,
    /// When the freeze ends by itself: RFC 3339 or `+DUR` (default: until `unfreeze`).
    #[arg(long)]
    pub until: Option<String>,
    /// Why, for the audit log and whoever's release it stops.
    #[arg(long)]
    pub reason: String,
}

#[derive(Args, Debug)]
pub struct UnfreezeArgs {
    #[arg(long, value_parser = super::env_name)]
    pub env: String,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// What applies to each environment (or one), and where each setting comes from.
    Show {
        #[arg(long, value_parser = super::env_name)]
        env: Option<String>,
    },
    /// Owner only, for when every approver of the policy agents enforce lost their key: sign
    /// the environment's policy anew with nothing before it. Agents that enforce a policy still
    /// refuse it; on each host, remove DATA/identity/policy (agent stopped) and start it again.
    Reset {
        #[arg(long, value_parser = super::env_name)]
        env: String,
    },
}

#[derive(Args, Debug)]
pub struct PreviewArgs {
    /// `APP VERSION` starts a preview; `stop APP` ends it.
    #[arg(num_args = 2, required = true, value_names = ["APP|stop", "VERSION|APP"])]
    pub args: Vec<String>,
    #[arg(long, value_parser = super::env_name)]
    pub env: String,
}

/// Parses `--until`: RFC 3339, or `+DUR` from now.
fn until(text: &str) -> Result<u64> {
    let now = stagehand_common::ids::now_secs();
    if let Some(d) = text.strip_prefix('+') {
        let d = humantime::parse_duration(d).with_context(|| format!("--until {text}: not a duration"))?;
        return Ok(now.saturating_add(d.as_secs().max(1)));
    }
    let t = humantime::parse_rfc3339_weak(text)
        .with_context(|| format!("--until {text}: expected RFC 3339 (2026-12-01T09:00:00Z) or +DUR (+2h)"))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs())
}

pub async fn approve(a: ApproveArgs, ctx: &Ctx) -> Result<i32> {
    let client = ctx.client().await?;
    let resp = client.call(&AdminRequest::ToApprove { id: a.id.clone() }).await?;
    let AdminResponse::ToApprove { sign, you: me, describe: said, .. } = resp else {
        bail!("{}", super::unexpected(&resp))
    };
    // What is signed is read here, from the bytes signed, and must be what was asked for: a
    // controller cannot turn the approval of one thing into the approval of another. What the
    // controller says of it follows, marked as such.
    let mut describe = what_is_signed(&a.id, &sign)?;
    describe.extend(said.iter().skip(1).map(|l| format!("(the controller says) {l}")));
    if !a.yes && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        for line in &describe {
            eprintln!("{}", clean(line));
        }
        eprint!("Approve this as {}? [y/N] ", clean(&me));
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("Not approved; nothing was signed.");
            return Ok(1);
        }
    }
    // `client()` found the credentials directory, so there is one.
    let key = crate::keys::load_approval_key(ctx.credentials.as_deref().unwrap_or(std::path::Path::new(".")))?;
    let approval = match &sign {
        ToSign::Plan(plan) => approve_plan(plan, &me, &key),
        ToSign::Policy(body) => approve_policy(body, &me, &key),
    };
    let resp = client.call(&AdminRequest::Approve { id: a.id.clone(), approval }).await?;
    client.close().await;
    match resp {
        AdminResponse::Rollout { rollout, notes } => {
            if ctx.json() {
                let mut v = super::rollout::json(&rollout);
                v["notes"] = serde_json::json!(notes);
                super::print_json(&v);
            } else {
                for line in &describe {
                    outln!("{}", clean(line));
                }
                outln!(
                    "{}: {}. Follow with: stagehand rollout status {} --watch",
                    a.id,
                    clean(&notes.join("; ")),
                    a.id
                );
            }
        }
        AdminResponse::PolicyApproved { id, have, need } => {
            if ctx.json() {
                super::print_json(&serde_json::json!({ "id": id, "approvals": have, "needed": need }));
            } else {
                for line in &describe {
                    outln!("{}", clean(line));
                }
                if have >= need {
                    outln!("{id}: approved ({have} of {need}); agents take it as it reaches them.");
                } else {
                    outln!("{id}: approved ({have} of {need}); it needs {} more.", need - have);
                }
            }
        }
        other => bail!("{}", super::unexpected(&other)),
    }
    Ok(0)
}

/// Describes what an approval of `id` signs, from the bytes themselves; an error if they are
/// not what `id` names.
fn what_is_signed(id: &str, sign: &ToSign) -> Result<Vec<String>> {
    match (crate::policy::parse_policy_id(id), sign) {
        (Some((env, serial)), ToSign::Policy(body)) => {
            let signed =
                stagehand_common::policy::SignedPolicy { body: body.clone(), signature: vec![], approvals: vec![] };
            let p = stagehand_common::policy::decode_unverified(&signed)
                .context("the controller sent an undecodable policy")?;
            if p.env != env || p.serial != serial {
                bail!("the controller sent policy {} of {} to sign for {id}; nothing was signed", p.serial, p.env);
            }
            let names: Vec<String> =
                p.approvers.iter().map(|a| format!("{} (key {})", a.name, &hex::encode(a.key)[..16])).collect();
            Ok(vec![format!(
                "policy {serial} of {env}: {} approval(s) from [{}], verify {}",
                p.approvals,
                names.join(", "),
                p.verify
            )])
        }
        (None, ToSign::Plan(plan)) if plan.rollout_id == id => Ok(vec![
            format!("rollout {id}: release {} {} ({}) to {}", plan.app, plan.version, plan.digest.short(), plan.env),
            format!("requested by {}, {} target(s)", plan.requester, plan.targets),
        ]),
        _ => bail!("the controller sent something else than {id} to sign; nothing was signed"),
    }
}

pub async fn reject(a: RejectArgs, ctx: &Ctx) -> Result<i32> {
    let client = ctx.client().await?;
    let resp = client.call(&AdminRequest::Reject { id: a.id.clone(), reason: a.reason }).await?;
    client.close().await;
    let AdminResponse::Rollout { rollout, notes } = resp else { bail!("{}", super::unexpected(&resp)) };
    if ctx.json() {
        super::print_json(&super::rollout::json(&rollout));
    } else {
        outln!("{}: {}", a.id, clean(&notes.join("; ")));
    }
    Ok(0)
}

fn print_freeze(ctx: &Ctx, env: &str, freeze: Option<stagehand_common::protocol::FreezeView>) {
    if ctx.json() {
        super::print_json(&serde_json::json!({ "env": env, "freeze": freeze }));
        return;
    }
    match freeze {
        Some(f) if f.until > 0 => outln!(
            "{env} is frozen until {} ({}): releases do not start; rollbacks do.",
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(f.until)),
            clean(&f.reason)
        ),
        Some(f) => outln!(
            "{env} is frozen until `stagehand unfreeze --env {env}` ({}): releases do not start; rollbacks do.",
            clean(&f.reason)
        ),
        None => outln!("{env} is no longer frozen: releases start again (within its windows)."),
    }
}

pub async fn freeze(a: FreezeArgs, ctx: &Ctx) -> Result<i32> {
    let until = a.until.as_deref().map(until).transpose()?.unwrap_or(0);
    let client = ctx.client().await?;
    let resp = client.call(&AdminRequest::Freeze { env: a.env.clone(), until, reason: a.reason }).await?;
    client.close().await;
    let AdminResponse::Frozen { env, freeze } = resp else { bail!("{}", super::unexpected(&resp)) };
    print_freeze(ctx, &env, freeze);
    Ok(0)
}

pub async fn unfreeze(a: UnfreezeArgs, ctx: &Ctx) -> Result<i32> {
    let client = ctx.client().await?;
    let resp = client.call(&AdminRequest::Unfreeze { env: a.env.clone() }).await?;
    client.close().await;
    let AdminResponse::Frozen { env, freeze } = resp else { bail!("{}", super::unexpected(&resp)) };
    print_freeze(ctx, &env, freeze);
    Ok(0)
}

pub async fn policy(c: PolicyCommand, ctx: &Ctx) -> Result<i32> {
    let client = ctx.client().await?;
    let req = match c {
        PolicyCommand::Show { env } => AdminRequest::ShowPolicy { env },
        PolicyCommand::Reset { env } => AdminRequest::ResetPolicy { env },
    };
    let resp = client.call(&req).await?;
    client.close().await;
    let AdminResponse::Policies { envs } = resp else { bail!("{}", super::unexpected(&resp)) };
    if ctx.json() {
        super::print_json(&serde_json::to_value(&envs)?);
        return Ok(0);
    }
    if envs.is_empty() {
        outln!("No environments yet: configure [environments.NAME] in controller.toml or enrol an agent.");
    }
    for p in &envs {
        outln!("{}:", clean(&p.env));
        for s in &p.settings {
            outln!("  {:<14} {:<40} ({})", s.name, clean(&s.value), clean(&s.source));
        }
        match &p.freeze {
            Some(f) => {
                let until = if f.until == 0 {
                    "until unfrozen".to_string()
                } else {
                    format!(
                        "until {}",
                        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(f.until))
                    )
                };
                outln!("  {:<14} {until}, by {}: {}", "frozen", clean(&f.by), clean(&f.reason));
            }
            None => outln!("  {:<14} no", "frozen"),
        }
        if p.serial > 0 {
            outln!(
                "  {:<14} policy {} signed for agents, approvers: [{}]",
                "agents",
                p.serial,
                clean(&p.approvers.join(", "))
            );
        } else {
            outln!("  {:<14} no policy signed (nothing required yet)", "agents");
        }
        if let Some((id, have, need)) = &p.pending {
            outln!(
                "  {:<14} {id} asks less than the policy agents enforce: they refuse it until {need} approval(s) ({have} so far): stagehand approve {id}",
                "pending"
            );
        }
        for (name, serial, approvals, refused) in &p.agents {
            let refused = if refused.is_empty() { String::new() } else { format!("; {}", clean(refused)) };
            outln!("    {:<20} enforces policy {serial} ({approvals} approval(s)){refused}", clean(name));
        }
    }
    Ok(0)
}

pub async fn preview(a: PreviewArgs, ctx: &Ctx) -> Result<i32> {
    let (app, version) = match a.args.as_slice() {
        [stop, app] if stop == "stop" => (app.clone(), None),
        [app, version] => (app.clone(), Some(version.clone())),
        _ => bail!("expected `preview APP VERSION --env ENV` or `preview stop APP --env ENV`"),
    };
    super::app_name(&app).map_err(anyhow::Error::msg)?;
    if let Some(v) = &version {
        super::version_name(v).map_err(anyhow::Error::msg)?;
    }
    let client = ctx.client().await?;
    let resp =
        client.call(&AdminRequest::Preview { app: app.clone(), env: a.env.clone(), version: version.clone() }).await?;
    client.close().await;
    let AdminResponse::Previews { hosts } = resp else { bail!("{}", super::unexpected(&resp)) };
    if ctx.json() {
        let hosts: Vec<_> = hosts.iter().map(|(h, d)| serde_json::json!({ "host": h, "detail": d })).collect();
        super::print_json(&serde_json::json!({ "app": app, "env": a.env, "version": version, "hosts": hosts }));
    } else {
        for (h, d) in &hosts {
            outln!("{:<20} {}", clean(h), clean(d));
        }
    }
    let ok = hosts.iter().all(|(_, d)| version.is_none() || d.contains(" on port "));
    Ok(if ok { 0 } else { 1 })
}
