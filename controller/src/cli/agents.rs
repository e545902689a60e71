//! `stagehand agents list|revoke|remove`.

use super::Ctx;
use crate::client::OpError;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use stagehand_common::protocol::{AdminRequest, AdminResponse};

#[derive(Subcommand, Debug)]
pub enum AgentsCommand {
    /// Every agent: id, name, environment, labels (`own:` marks labels the agent asked for
    /// itself, which rollout selectors never match), connected, versions per app.
    List,
    /// Refuse an agent everywhere from now on and close its connections.
    Revoke(RevokeArgs),
    /// Forget a revoked agent: it leaves `agents list` and `status`; its certificate stays
    /// refused.
    Remove(RevokeArgs),
    /// Install, enrol and start agents on hosts over ssh: `--ssh [USER@]HOST… --env ENV`.
    /// Hosts already enrolled are left alone; one summary line per host.
    Install(super::install::InstallArgs),
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// The agent's id, or its name if no other agent has that name (see `stagehand agents list`).
    #[arg(value_name = "ID|NAME")]
    pub agent: String,
}

/// The id of the agent an operator named: an id as is, else a name that only one agent has.
async fn resolve(client: &crate::client::Client, given: &str, cmd: &str) -> Result<String> {
    let resp = client.call(&AdminRequest::ListAgents).await?;
    let AdminResponse::Agents { agents } = resp else { bail!("{}", super::unexpected(&resp)) };
    if agents.iter().any(|a| a.id.0 == given) {
        return Ok(given.to_string());
    }
    let named: Vec<_> = agents.iter().filter(|a| a.name == given).collect();
    match named.as_slice() {
        [one] => Ok(one.id.0.clone()),
        [] => Err(OpError::new(
            format!("no agent has the id or name {:?}", super::clean(given)),
            "stagehand agents list   (to see every agent's id and name)",
        )
        .into()),
        many => {
            let list: Vec<String> = many
                .iter()
                .map(|a| format!("{} ({}, {})", a.id, a.env, if a.revoked { "revoked" } else { "enrolled" }))
                .collect();
            Err(OpError::new(
                format!("{} agents are named {:?}: {}", many.len(), super::clean(given), list.join(", ")),
                format!("stagehand agents {cmd} ID   (one of the ids above)"),
            )
            .into())
        }
    }
}

pub async fn run(cmd: AgentsCommand, ctx: &Ctx) -> Result<i32> {
    let cmd = match cmd {
        AgentsCommand::Install(a) => return super::install::run(a, ctx).await,
        other => other,
    };
    let client = ctx.client().await?;
    match cmd {
        AgentsCommand::List => {
            let resp = client.call(&AdminRequest::ListAgents).await?;
            client.close().await;
            let AdminResponse::Agents { agents } = resp else { bail!("{}", super::unexpected(&resp)) };
            if ctx.json() {
                super::print_json(&serde_json::Value::Array(agents.iter().map(|a| a.to_json()).collect()));
                return Ok(0);
            }
            if agents.is_empty() {
                outln!("No agents yet. Enrol one: stagehand token create --env ENV, then stagehand-agent join on the host.");
                return Ok(0);
            }
            let now = stagehand_common::ids::now_secs();
            outln!(
                "{:<20} {:<16} {:<10} {:<16} {:<8} {:<20} APPS",
                "ID",
                "NAME",
                "ENV",
                "CONNECTED",
                "VERSION",
                "LABELS"
            );
            for a in agents {
                // Token labels select the agent; the ones it asked for itself are marked `own:`.
                let labels: Vec<String> = a
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .chain(
                        a.own_labels
                            .iter()
                            .filter(|(k, _)| !a.labels.contains_key(*k))
                            .map(|(k, v)| format!("own:{k}={v}")),
                    )
                    .map(|l| super::clean(&l))
                    .collect();
                let apps: Vec<String> = a
                    .apps
                    .iter()
                    .map(|x| {
                        format!(
                            "{}: active={} staged=[{}]",
                            super::clean(&x.app),
                            super::clean(x.active.as_deref().unwrap_or("-")),
                            super::clean(&x.staged.join(","))
                        )
                    })
                    .collect();
                let connected = if a.revoked {
                    "revoked".to_string()
                } else if a.connected {
                    "yes".to_string()
                } else if a.last_seen == 0 {
                    "no (never)".to_string()
                } else {
                    format!("no ({})", super::status::ago(now, a.last_seen))
                };
                outln!(
                    "{:<20} {:<16} {:<10} {:<16} {:<8} {:<20} {}",
                    a.id,
                    super::clean(&a.name),
                    a.env,
                    connected,
                    super::clean(a.version.as_deref().unwrap_or("-")),
                    if labels.is_empty() { "-".into() } else { labels.join(",") },
                    apps.join("; ")
                );
            }
        }
        AgentsCommand::Revoke(a) => {
            let agent = resolve(&client, &a.agent, "revoke").await?;
            let resp = client.call(&AdminRequest::RevokeAgent { agent }).await?;
            client.close().await;
            let AdminResponse::Revoked { agent } = resp else { bail!("{}", super::unexpected(&resp)) };
            if ctx.json() {
                super::print_json(&serde_json::json!({ "revoked": agent }));
            } else {
                outln!("Revoked {agent}.");
                outln!("It stays listed as revoked; `stagehand agents remove {agent}` forgets it.");
            }
        }
        AgentsCommand::Install(_) => unreachable!("handled above"),
        AgentsCommand::Remove(a) => {
            let agent = resolve(&client, &a.agent, "remove").await?;
            let resp = client.call(&AdminRequest::RemoveAgent { agent }).await?;
            client.close().await;
            let AdminResponse::Removed { agent } = resp else { bail!("{}", super::unexpected(&resp)) };
            if ctx.json() {
                super::print_json(&serde_json::json!({ "removed": agent }));
            } else {
                outln!("Removed {agent}.");
            }
        }
    }
    Ok(0)
}
