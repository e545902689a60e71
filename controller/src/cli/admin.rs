//! `stagehand admin add|list|revoke`: operator identities and their roles (SPEC §10).

use super::Ctx;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use stagehand_common::protocol::{AdminInfo, AdminRequest, AdminResponse};
use stagehand_common::tls::{Credentials, Pair};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Issue a new identity and write its credentials directory.
    Add(AddArgs),
    /// Every identity: role, environments, revoked, certificate expiry.
    List,
    /// Refuse an identity from now on and close its connections.
    Revoke(RevokeArgs),
    /// Make an approval key for the identity of --credentials, in that directory, and register
    /// its public half (SPEC §14). `controller init`'s `admin` has none: its credentials sit
    /// on the controller host, and approvals are what that host alone must not be able to give.
    ApprovalKey,
}

#[derive(Args, Debug)]
pub struct AddArgs {
    /// The identity's name, as the audit and logs will show it.
    pub name: String,
    /// viewer (read), deployer (push, deploy), releaser (release, rollback, rollout control),
    /// owner (all, including tokens, agents and identities).
    #[arg(long)]
    pub role: String,
    /// A releaser's environments (repeatable; none: every environment).
    #[arg(long = "env")]
    pub envs: Vec<String>,
    /// Where to write the credentials (default: ./stagehand-NAME).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    pub name: String,
}

fn describe(a: &AdminInfo) -> String {
    let envs = if a.envs.is_empty() { "all".to_string() } else { a.envs.join(",") };
    let state = if a.revoked { "revoked" } else { "active" };
    let expires = match a.expires_at {
        0 => "-".to_string(),
        at => humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(at)).to_string(),
    };
    format!("{:<16} {:<10} {:<16} {:<8} {expires}", super::clean(&a.name), a.role, envs, state)
}

pub async fn run(cmd: AdminCommand, ctx: &Ctx) -> Result<i32> {
    let client = ctx.client().await?;
    // The new identity's approval key is made here: only its public half is sent.
    let approval = crate::keys::new_approval_key();
    let resp = match &cmd {
        AdminCommand::Add(a) => {
            let request = AdminRequest::AddAdmin {
                name: a.name.clone(),
                role: a.role.clone(),
                envs: a.envs.clone(),
                approval_key: Some(approval.verifying_key().to_bytes()),
            };
            client.call(&request).await
        }
        AdminCommand::List => client.call(&AdminRequest::ListAdmins).await,
        AdminCommand::Revoke(a) => client.call(&AdminRequest::RevokeAdmin { name: a.name.clone() }).await,
        AdminCommand::ApprovalKey => {
            let dir = ctx.credentials.clone().unwrap_or_default();
            // A key kept beside the controller's own keys is one the controller host holds:
            // approvals are what that host alone must not be able to give.
            if dir.parent().is_some_and(|p| p.join("controller.toml").exists()) {
                client.close().await;
                return Err(crate::client::OpError::new(
                    format!("{} is inside a controller's data directory; an approval key there is one the controller host holds", dir.display()),
                    format!("copy the credentials to your own machine (cp -r {} ~/stagehand-creds), then run it there: stagehand --credentials ~/stagehand-creds admin approval-key", dir.display()),
                )
                .into());
            }
            if crate::keys::approval_key_path(&dir).exists() {
                client.close().await;
                return Err(crate::client::OpError::new(
                    format!("{} holds an approval key already", crate::keys::approval_key_path(&dir).display()),
                    "to replace it, move it away first (a new key changes the approvers agents know: where approvals are required, that needs them)",
                )
                .into());
            }
            // Kept first, so that a registered key is never one nobody holds.
            crate::keys::save_approval_key(&dir, &approval)?;
            let resp = client.call(&AdminRequest::SetApprovalKey { public: approval.verifying_key().to_bytes() }).await;
            if !matches!(resp, Ok(AdminResponse::ApprovalKeySet { .. })) {
                let _ = std::fs::remove_file(crate::keys::approval_key_path(&dir));
            }
            resp
        }
    };
    client.close().await;
    match (cmd, resp?) {
        (AdminCommand::Add(a), AdminResponse::AdminAdded { admin, cert_pem, key_pem, ca_pem }) => {
            let dir = a.out.unwrap_or_else(|| PathBuf::from(format!("stagehand-{}", admin.name)));
            Credentials { me: Pair { cert_pem, key_pem }, ca_pem }.save(&dir)?;
            crate::keys::save_approval_key(&dir, &approval)?;
            if ctx.json() {
                super::print_json(&serde_json::json!({ "admin": admin, "credentials": dir }));
            } else {
                outln!("Added {} ({}); its credentials are in {}.", admin.name, admin.role, dir.display());
                outln!("Give that directory to its holder: stagehand --credentials {} …", dir.display());
            }
        }
        (AdminCommand::List, AdminResponse::Admins { admins }) => {
            if ctx.json() {
                super::print_json(&serde_json::to_value(&admins)?);
            } else {
                outln!("{:<16} {:<10} {:<16} {:<8} CERTIFICATE EXPIRES", "NAME", "ROLE", "ENVIRONMENTS", "STATE");
                for a in &admins {
                    outln!("{}", describe(a));
                }
            }
        }
        (AdminCommand::ApprovalKey, AdminResponse::ApprovalKeySet { name }) => {
            let dir = ctx.credentials.clone().unwrap_or_default();
            if ctx.json() {
                super::print_json(
                    &serde_json::json!({ "name": name, "approval_key": crate::keys::approval_key_path(&dir) }),
                );
            } else {
                outln!(
                    "{name}'s approval key is in {}; `stagehand policy show` lists the approvers agents know.",
                    crate::keys::approval_key_path(&dir).display()
                );
            }
        }
        (AdminCommand::Revoke(_), AdminResponse::AdminRevoked { name }) => {
            if ctx.json() {
                super::print_json(&serde_json::json!({ "revoked": name }));
            } else {
                outln!("Revoked {name}: refused from now on; its open connections were closed.");
            }
        }
        (_, other) => bail!("{}", super::unexpected(&other)),
    }
    Ok(0)
}
