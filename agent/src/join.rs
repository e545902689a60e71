//! `stagehand-agent join`: make a key, send a CSR with the token, pin what comes back.

use crate::config::{AgentConfig, Identity};
use anyhow::{bail, Context, Result};
use stagehand_common::frame::{self, read_msg, write_msg};
use stagehand_common::protocol::{JoinDown, JoinUp, Labels, ALPN_JOIN, PROTOCOL_VERSION};
use stagehand_common::tls::{self, Credentials, Pair};
use stagehand_common::token::JoinToken;
use stagehand_common::{fsx, net};
use std::path::Path;

/// How long `join` waits for the controller to answer.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn join(
    controller: &str,
    token: &str,
    data_dir: &Path,
    name: Option<String>,
    labels: Labels,
) -> Result<Identity> {
    let token = JoinToken::parse(token).map_err(anyhow::Error::msg)?;
    if !controller.contains(':') {
        bail!("the controller address {controller:?} has no port; give HOST:PORT, for example {controller}:7443");
    }
    if Identity::dir(data_dir).join("agent.json").exists() {
        bail!(
            "{} already holds an enrolled agent; to enrol again, stop it and remove {}",
            data_dir.display(),
            Identity::dir(data_dir).display()
        );
    }
    let (key_pem, csr_der) = tls::new_csr()?;
    let addr = net::resolve(controller).await?;
    let endpoint = net::client_endpoint(addr)?;
    let config = net::client_config(tls::join_client_config(&token.ca_fingerprint, ALPN_JOIN)?)?;
    let conn = match tokio::time::timeout(CONNECT_TIMEOUT, net::connect(&endpoint, addr, config)).await {
        Ok(r) => r.with_context(|| {
            format!("cannot enrol with {controller}: is it the controller this token was made for, and is it running?")
        })?,
        Err(_) => bail!(
            "no answer from {controller} within {}s: is the controller running there, and does UDP reach it?",
            CONNECT_TIMEOUT.as_secs()
        ),
    };
    let (mut send, mut recv) = conn.open_bi().await?;
    write_msg(&mut send, &JoinUp::Hello { protocol_version: PROTOCOL_VERSION }).await?;
    match read_msg::<_, JoinDown, { frame::CONTROL_LIMIT }>(&mut recv).await? {
        Some(JoinDown::Hello { .. }) => {}
        other => bail!("unexpected answer from the controller: {other:?}"),
    }
    let name = name.unwrap_or_else(default_name);
    write_msg(
        &mut send,
        &JoinUp::Join {
            token_id: token.id.clone(),
            token_secret: token.secret.clone(),
            csr_der,
            name: name.clone(),
            labels,
        },
    )
    .await?;
    send.finish()?;
    let reply = read_msg::<_, JoinDown, { frame::CONTROL_LIMIT }>(&mut recv).await?;
    conn.close(0u32.into(), b"enrolled");
    let _ = tokio::time::timeout(std::time::Duration::from_millis(5), endpoint.wait_idle()).await;
    let (agent_id, env, labels, cert_pem, ca_pem, release_keys) = match reply {
        Some(JoinDown::Joined { agent_id, env, labels, cert_pem, ca_pem, release_keys }) => {
            (agent_id, env, labels, cert_pem, ca_pem, release_keys)
        }
        Some(JoinDown::Refused { reason }) => {
            bail!("the controller refused to enrol this agent: {reason}")
        }
        other => bail!("unexpected answer from the controller: {other:?}"),
    };
    // The CA we were handed must be the one the token vouched for, and so must the release
    // key: the only one this agent will ever take a release from (until a rotation signed
    // by it).
    if tls::fingerprint(&tls::cert_der(&ca_pem)?) != token.ca_fingerprint {
        bail!("the controller sent a CA that does not match the token's fingerprint; refusing to trust it");
    }
    if release_keys.len() != 1 || release_keys[0].fingerprint() != token.release_fingerprint {
        bail!(
            "the controller offered a release key the token does not vouch for; refusing to pin it (was the \
             controller's release key replaced since the token was made? create a new token if that was intended)"
        );
    }
    fsx::create_private_dir(data_dir)?;
    let identity = Identity {
        id: agent_id,
        name,
        env,
        labels,
        credentials: Credentials { me: Pair { cert_pem, key_pem }, ca_pem },
        release_keys,
    };
    identity.save(data_dir)?;
    AgentConfig {
        controller: crate::config::Controllers::one(controller),
        keep_releases: crate::config::default_keep(),
        apps: Default::default(),
        limits: Default::default(),
        health_ca: None,
        metrics_listen: None,
    }
    .save(data_dir)?;
    Ok(identity)
}

fn default_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agent".into())
}
