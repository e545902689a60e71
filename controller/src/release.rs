//! The release channel on the controller: signs activate messages, sends them to agents,
//! records receipts, and brings returning agents to the environment's desired version.

use crate::fleet::Channel;
use crate::server::Controller;
use crate::store::{AppStateRecord, DesiredRecord, StageState};
use anyhow::{bail, Result};
use stagehand_common::activate::{self, Activate, Refusal, SignedActivate, Targets};
use stagehand_common::frame::{self, read_msg, write_msg};
use stagehand_common::ids::now_secs;
use stagehand_common::protocol::{ReceiptOutcome, ReleaseDown, ReleaseUp, PROTOCOL_VERSION};
use stagehand_common::AgentId;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{info, warn};

pub async fn serve(ctl: Arc<Controller>, conn: quinn::Connection, id: AgentId) -> Result<()> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    match read_msg::<_, ReleaseUp, { frame::CONTROL_LIMIT }>(&mut recv).await? {
        Some(ReleaseUp::Hello { protocol_version: PROTOCOL_VERSION }) => {}
        Some(ReleaseUp::Hello { protocol_version }) => {
            let reason =
                format!("protocol version {protocol_version} is not supported (controller speaks {PROTOCOL_VERSION})");
            write_msg(&mut send, &ReleaseDown::Goodbye { reason }).await?;
            return Ok(());
        }
        other => bail!("expected hello, got {other:?}"),
    }
    write_msg(&mut send, &ReleaseDown::Hello { protocol_version: PROTOCOL_VERSION }).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let token = ctl.fleet.attach_release(&id, tx, conn.clone());
    // A revocation between the role check and here would have found nothing to close.
    if !crate::server::active_agent(&ctl, &id)? {
        ctl.fleet.detach(&id, Channel::Release, token);
        conn.close(crate::server::CLOSE_UNAUTHORISED.into(), b"revoked");
        return Ok(());
    }
    info!(agent = %id, "Release channel up.");
    let writer = async {
        while let Some(msg) = rx.recv().await {
            write_msg(&mut send, &msg).await?;
        }
        anyhow::Ok(())
    };
    let reader = async {
        while let Some(msg) = read_msg::<_, ReleaseUp, { frame::CONTROL_LIMIT }>(&mut recv).await? {
            handle(&ctl, &id, msg)?;
        }
        anyhow::Ok(())
    };
    let result = tokio::select! {
        r = writer => r,
        r = reader => r,
    };
    ctl.fleet.detach(&id, Channel::Release, token);
    info!(agent = %id, "Release channel down.");
    match result {
        Err(e) if crate::deploy::is_disconnect(&e) => Ok(()),
        other => other,
    }
}

fn handle(ctl: &Controller, id: &AgentId, msg: ReleaseUp) -> Result<()> {
    match msg {
        ReleaseUp::State { apps } => {
            for a in apps {
                ctl.store.put_appstate(id, &a.app, &AppStateRecord { v: 1, active: a.active, last_seq: a.last_seq })?;
            }
            // Informational: the agent is the truth and re-sends its state on reconnect.
            ctl.fleet.bump();
            catch_up(ctl, id, false)?;
        }
        ReleaseUp::Receipt(r) => {
            if r.agent_id != *id {
                bail!("receipt names agent {} on the connection of {id}", r.agent_id);
            }
            match &r.outcome {
                ReceiptOutcome::Committed => {
                    info!(agent = %id, app = %r.app, version = %r.version, seq = r.seq, total_us = r.total_us, "Committed.")
                }
                ReceiptOutcome::Refused(why) => {
                    warn!(agent = %id, app = %r.app, version = %r.version, seq = r.seq, reason = %why, "Refused.")
                }
                ReceiptOutcome::Scheduled { until } => {
                    info!(agent = %id, app = %r.app, seq = r.seq, until, "Scheduled.")
                }
            }
            let mut state = ctl.store.appstate(id, &r.app)?;
            state.active = r.active.clone();
            // Only outcomes the agent recorded as applied move its seq; a refusal before the
            // intent (not staged, expired…) leaves it, so the message can be offered again.
            let applied = matches!(
                r.outcome,
                ReceiptOutcome::Committed
                    | ReceiptOutcome::Refused(
                        Refusal::PreActivateFailed | Refusal::Unhealthy | Refusal::Interrupted | Refusal::HostError
                    )
            );
            if applied {
                state.last_seq = Some(state.last_seq.map_or(r.seq, |s| s.max(r.seq)));
            }
            ctl.store.put_appstate(id, &r.app, &state)?;
            // Not flushed: agents re-send their last receipts on reconnect.
            ctl.store.put_receipt(&r)?;
            ctl.fleet.bump();
        }
        ReleaseUp::Hello { .. } => bail!("second hello"),
    }
    Ok(())
}

/// Sends an agent what its environment should run, for every app where it is behind:
/// the environment-wide message if it is a target and it is still valid, otherwise a
/// fresh message for this agent alone with a new, higher seq. Never a lower seq than the
/// agent has applied; never for a version it has not staged.
pub fn catch_up(ctl: &Controller, id: &AgentId, force: bool) -> Result<()> {
    if !ctl.fleet.is_connected(id) {
        return Ok(());
    }
    let Some(agent) = ctl.store.agent(id)? else {
        return Ok(());
    };
    let now = now_secs();
    for (app, desired) in ctl.store.desired_in(&agent.env)? {
        let state = ctl.store.appstate(id, &app)?;
        if state.last_seq.is_some_and(|s| s >= desired.seq) {
            continue;
        }
        let staged = ctl
            .store
            .stage(id, &app, &desired.version)?
            .is_some_and(|s| s.state == StageState::Staged && s.digest == desired.digest);
        if !staged {
            continue;
        }
        // An agent that already answered this seq is not pestered again, unless it refused
        // for want of the bytes and has just staged them (`force`).
        let retry = |r: &stagehand_common::protocol::Receipt| {
            force
                && matches!(
                    r.outcome,
                    ReceiptOutcome::Refused(Refusal::NotStaged | Refusal::DigestMismatch | Refusal::Expired)
                )
        };
        if ctl.store.receipt(id, &app)?.is_some_and(|r| r.seq >= desired.seq && !retry(&r)) {
            continue;
        }
        let body = activate::verify(&desired.message, &ctl.release_keys).ok();
        let message = match body {
            Some(b) if b.targets.includes(id) && b.expires_at > now + 60 => desired.message.clone(),
            _ => {
                let seq = ctl.store.next_seq(&app)?;
                let (msg, _) = sign_for(
                    ctl,
                    &app,
                    &desired.version,
                    desired.digest,
                    &agent.env,
                    vec![id.clone()],
                    seq,
                    "catch-up",
                    ctl.config.message_ttl.as_secs(),
                )?;
                ctl.store.flush()?;
                info!(agent = %id, %app, version = %desired.version, seq, "Catching up.");
                msg
            }
        };
        ctl.fleet.send_release(id, ReleaseDown::Activate(message));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn sign_for(
    ctl: &Controller,
    app: &str,
    version: &str,
    digest: stagehand_common::Digest,
    env: &str,
    targets: Vec<AgentId>,
    seq: u64,
    kind: &str,
    ttl_secs: u64,
) -> Result<(SignedActivate, Activate)> {
    let now = now_secs();
    let body = Activate {
        app: app.to_string(),
        version: version.to_string(),
        digest,
        env: env.to_string(),
        targets: Targets::Agents(targets),
        rollout_id: format!("{kind}-{seq}-{}", hex::encode(rand::random::<[u8; 4]>())),
        seq,
        not_before: 0,
        expires_at: now + ttl_secs.max(1),
        key_id: ctl.release_keys[0].key_id.clone(),
    };
    Ok((activate::sign(&body, &ctl.release_key), body))
}

/// A signed release: the message, its seq and its targets.
pub type Signed = (SignedActivate, u64, Vec<AgentId>);

/// An operator error with the next command to run.
#[derive(Debug)]
pub struct Refused {
    pub message: String,
    pub hint: String,
}

/// Signs a release of `version` to every agent of `env`, after checking it is staged on
/// all of them. With `export` the message is returned and nothing else changes (the seq is
/// still consumed so that no later message can reuse it).
pub fn release(
    ctl: &Controller,
    app: &str,
    version: &str,
    env: &str,
    export: bool,
    ttl_secs: u64,
    rollback: bool,
) -> Result<std::result::Result<Signed, Refused>> {
    let Some(artifact) = ctl.store.artifact(app, version)? else {
        return Ok(Err(Refused {
            message: format!("{app} {version} has not been pushed"),
            hint: format!("stagehand push {app} {version} PATH"),
        }));
    };
    let agents = ctl.store.agents_in(env)?;
    if agents.is_empty() {
        return Ok(Err(Refused {
            message: format!("environment {env:?} has no agents"),
            hint: format!("stagehand token create --env {env}   (then stagehand-agent join on each host)"),
        }));
    }
    let mut missing = Vec::new();
    for a in &agents {
        let ok = ctl
            .store
            .stage(&a.id, app, version)?
            .is_some_and(|s| s.state == StageState::Staged && s.digest == artifact.digest);
        if !ok {
            missing.push(format!("{} ({})", a.name, a.id));
        }
    }
    if !missing.is_empty() {
        return Ok(Err(Refused {
            message: format!(
                "{app} {version} is not staged on every agent of {env}; nothing was sent. Not staged on: {}",
                missing.join(", ")
            ),
            hint: format!("stagehand deploy {app} {version} --env {env} --wait"),
        }));
    }
    let targets: Vec<AgentId> = agents.iter().map(|a| a.id.clone()).collect();
    let seq = ctl.store.next_seq(app)?;
    let ttl = if ttl_secs == 0 { ctl.config.message_ttl.as_secs() } else { ttl_secs };
    let (message, _) = sign_for(ctl, app, version, artifact.digest, env, targets.clone(), seq, "release", ttl)?;
    if export {
        ctl.store.flush()?;
        info!(%app, %version, %env, seq, "Exported an activate message.");
        return Ok(Ok((message, seq, targets)));
    }
    let previous = ctl.store.desired(env, app)?;
    let mut history = previous.as_ref().map(|p| p.history.clone()).unwrap_or_default();
    match (&previous, rollback) {
        // Rolling back walks the history backwards: what came after the target is dropped.
        (_, true) => {
            if let Some(i) = history.iter().rposition(|v| v == version) {
                history.truncate(i);
            }
        }
        (Some(p), false) if p.version != version => {
            history.retain(|v| v != &p.version);
            history.push(p.version.clone());
        }
        _ => {}
    }
    history.retain(|v| v != version);
    ctl.store.put_desired(
        env,
        app,
        &DesiredRecord {
            v: 1,
            version: version.to_string(),
            digest: artifact.digest,
            seq,
            message: message.clone(),
            targets: targets.clone(),
            history,
        },
    )?;
    ctl.store.flush()?;
    for id in &targets {
        ctl.fleet.send_release(id, ReleaseDown::Activate(message.clone()));
    }
    ctl.fleet.bump();
    info!(%app, %version, %env, seq, targets = targets.len(), "Released.");
    Ok(Ok((message, seq, targets)))
}

/// The version a rollback goes to: the named one, or the one released before the current.
pub fn rollback_target(
    ctl: &Controller,
    app: &str,
    env: &str,
    to: Option<String>,
) -> Result<std::result::Result<String, Refused>> {
    if let Some(v) = to {
        return Ok(Ok(v));
    }
    let Some(desired) = ctl.store.desired(env, app)? else {
        return Ok(Err(Refused {
            message: format!("{app} has never been released to {env}, so there is nothing to roll back to"),
            hint: format!("stagehand release {app} VERSION --env {env}"),
        }));
    };
    match desired.history.last() {
        Some(v) => Ok(Ok(v.clone())),
        None => Ok(Err(Refused {
            message: format!("{app} {} is the only version ever released to {env}", desired.version),
            hint: format!("stagehand rollback {app} --env {env} --to VERSION"),
        })),
    }
}
