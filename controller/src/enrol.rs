//! Enrolment on `stagehand-join/1`: a token and a CSR in, a certificate naming an agent id
//! the controller chose out. The token is consumed (and flushed) before anything is issued.

use crate::server::Controller;
use crate::store::AgentRecord;
use anyhow::{bail, Result};
use stagehand_common::frame::{self, read_msg, write_msg};
use stagehand_common::ids::{check_name, now_secs};
use stagehand_common::protocol::{JoinDown, JoinUp, PROTOCOL_VERSION};
use stagehand_common::tls::{self, Role};
use stagehand_common::token::JoinToken;
use stagehand_common::AgentId;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

pub async fn serve(ctl: Arc<Controller>, conn: quinn::Connection) -> Result<()> {
    // An enrolling peer has no certificate yet: give it little time and one exchange.
    tokio::time::timeout(Duration::from_secs(30), exchange(&ctl, &conn))
        .await
        .map_err(|_| anyhow::anyhow!("enrolment timed out"))??;
    Ok(())
}

async fn exchange(ctl: &Arc<Controller>, conn: &quinn::Connection) -> Result<()> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    match read_msg::<_, JoinUp, { frame::CONTROL_LIMIT }>(&mut recv).await? {
        Some(JoinUp::Hello { protocol_version: PROTOCOL_VERSION }) => {}
        other => bail!("expected hello, got {other:?}"),
    }
    write_msg(&mut send, &JoinDown::Hello { protocol_version: PROTOCOL_VERSION }).await?;
    let Some(JoinUp::Join { token_id, token_secret, csr_der, name, labels }) =
        read_msg::<_, JoinUp, { frame::CONTROL_LIMIT }>(&mut recv).await?
    else {
        bail!("expected a join request");
    };
    // Durable writes (token use, the agent, the audit entry): on the blocking pool.
    let admitted = {
        let (ctl, token_id) = (ctl.clone(), token_id.clone());
        tokio::task::spawn_blocking(move || admit(&ctl, &token_id, &token_secret, &csr_der, &name, labels)).await?
    };
    let reply = match admitted {
        Ok(joined) => joined,
        Err(reason) => {
            warn!(remote = %conn.remote_address(), token = %token_id, %reason, "Refused an enrolment.");
            JoinDown::Refused { reason }
        }
    };
    write_msg(&mut send, &reply).await?;
    send.finish()?;
    // Let the reply reach the agent before the connection goes.
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    Ok(())
}

fn admit(
    ctl: &Controller,
    token_id: &str,
    secret: &str,
    csr_der: &[u8],
    name: &str,
    mut labels: stagehand_common::protocol::Labels,
) -> std::result::Result<JoinDown, String> {
    let internal = |e: &dyn std::fmt::Display| format!("controller error: {e}");
    let hash = JoinToken::secret_hash(secret);
    let now = now_secs();
    let used = ctl
        .store
        .consume_token(token_id, |t| {
            // Compare hashes in constant time.
            let ok = blake3::Hash::from_hex(&t.secret_hash).ok() == blake3::Hash::from_hex(&hash).ok();
            if !ok {
                Err("unknown join token: create one with `stagehand token create --env ENV`".to_string())
            } else if now >= t.expires_at {
                Err(format!(
                    "join token expired {}s ago: create a new one with `stagehand token create --env {}`",
                    now - t.expires_at,
                    t.env
                ))
            } else {
                Ok(())
            }
        })
        .map_err(|e| internal(&e))?;
    let token = match used {
        Ok(t) => t,
        Err(Some(reason)) => return Err(reason),
        Err(None) => {
            return Err("unknown or already used join token: tokens are single-use; create a new one with `stagehand token create --env ENV`".into())
        }
    };
    ctl.store.flush().map_err(|e| internal(&e))?;

    let id = AgentId::random();
    let cert_pem = tls::issue_for_csr(&ctl.ca, &Role::Agent(id.0.clone()), csr_der, ctl.config.agent_cert_lifetime)
        .map_err(|e| format!("bad certificate request: {e}"))?;
    let fingerprint = tls::fingerprint(&tls::cert_der(&cert_pem).map_err(|e| internal(&e))?);
    // Token labels are what the operator bound: the only ones a rollout selects on. What the
    // agent asked for is kept apart, as its own; the agent is told both, token labels winning.
    let own_labels = labels.clone();
    labels.extend(token.labels.clone());
    let name = if name.is_empty() || check_name("name", name).is_err() { id.0.clone() } else { name.to_string() };
    let record = AgentRecord {
        v: 2,
        id: id.clone(),
        name,
        env: token.env.clone(),
        labels: token.labels.clone(),
        cert_fingerprint: fingerprint,
        revoked: false,
        joined_at: now,
        own_labels,
    };
    ctl.store.put_agent(&record).map_err(|e| internal(&e))?;
    ctl.store.flush().map_err(|e| internal(&e))?;
    let args = serde_json::json!({ "token": token_id, "agent": id, "name": record.name, "env": record.env });
    ctl.audit.record(&format!("agent:{id}"), "enrolled", args, "ok").map_err(|e| internal(&e))?;
    ctl.fleet.bump();
    info!(agent = %id, name = %record.name, env = %token.env, "Agent enrolled.");
    Ok(JoinDown::Joined {
        agent_id: id,
        env: token.env,
        labels,
        cert_pem,
        ca_pem: ctl.ca.cert_pem.clone(),
        release_keys: ctl.release_keys.clone(),
    })
}
