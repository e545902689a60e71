//! The release channel on the controller: signs activate messages, sends them to agents,
//! records receipts, and brings returning agents to the environment's desired version.

use crate::fleet::Channel;
use crate::plan::fleet::{self, CatchUp};
use crate::server::Controller;
use crate::store::{AppStateRecord, StageState};
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
    // The key changes before any message: one signed by a new key must find it pinned.
    if !ctl.key_chain.is_empty() {
        write_msg(&mut send, &ReleaseDown::KeyChanges(ctl.key_chain.clone())).await?;
    }
    // The environment's release policy before any message, too (SPEC §14).
    if let Some(env) = ctl.store.agent(&id)?.map(|a| a.env) {
        if let Some(p) = ctl.store.policy(&env)? {
            for m in crate::policy::messages(&p) {
                write_msg(&mut send, &m).await?;
            }
        }
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let token = ctl.fleet.attach_release(&id, tx, conn.clone());
    ctl.note_presence(&id);
    // A revocation between the role check and here would have found nothing to close.
    if !crate::server::active_agent(&ctl, &id)? {
        ctl.fleet.detach(&id, Channel::Release, token);
        ctl.note_presence(&id);
        conn.close(stagehand_common::protocol::CLOSE_REVOKED.into(), b"revoked");
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
    ctl.note_presence(&id);
    info!(agent = %id, "Release channel down.");
    match result {
        Err(e) if crate::deploy::is_disconnect(&e) => Ok(()),
        other => other,
    }
}

fn handle(ctl: &Controller, id: &AgentId, msg: ReleaseUp) -> Result<()> {
    match msg {
        ReleaseUp::State { apps } => {
            for a in &apps {
                crate::deploy::check_names(&[("app", &a.app)])?;
                if let Some(v) = &a.active {
                    crate::deploy::check_names(&[("version", v)])?;
                }
            }
            // Only apps the controller knows.
            for a in apps.into_iter().filter(|a| ctl.store.knows_app(&a.app).is_ok_and(|known| known)) {
                ctl.store.put_appstate(id, &a.app, &AppStateRecord { v: 1, active: a.active, last_seq: a.last_seq })?;
            }
            // Informational: the agent is the truth and re-sends its state on reconnect.
            ctl.fleet.bump();
            catch_up(ctl, id, false)?;
        }
        ReleaseUp::Receipt(mut r) => {
            if r.agent_id != *id {
                bail!("receipt names agent {} on the connection of {id}", r.agent_id);
            }
            if r.app.is_empty() {
                // The answer to a message the agent could not decode: nothing to record.
                warn!(agent = %id, outcome = ?r.outcome, "A receipt for an undecodable message.");
                return Ok(());
            }
            crate::deploy::check_names(&[("app", &r.app), ("version", &r.version)])?;
            if let Some(v) = &r.active {
                crate::deploy::check_names(&[("version", v)])?;
            }
            // Receipts answer messages this controller signed, for artifacts it holds.
            if ctl.store.artifact(&r.app, &r.version)?.is_none() {
                warn!(agent = %id, app = %r.app, version = %r.version, "A receipt for an unknown artifact; ignored.");
                return Ok(());
            }
            crate::rollout::truncate(&mut r.log, crate::deploy::PEER_TEXT_LIMIT * 8);
            let outcome = match &r.outcome {
                ReceiptOutcome::Committed => "committed".to_string(),
                ReceiptOutcome::Refused(why) => format!("refused: {}", why.code()),
                ReceiptOutcome::Scheduled { until } => format!("scheduled for {until}"),
            };
            let args = serde_json::json!({ "app": r.app, "version": r.version, "seq": r.seq, "receipt": outcome, "active": r.active });
            ctl.audit.record(&format!("agent:{id}"), "receipt", args, "ok")?;
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
            // Only what the agent says it applied moves its seq; a refusal before the intent
            // (not staged, expired, a host error…) leaves it, so the message can be offered again.
            if r.applied {
                state.last_seq = Some(state.last_seq.map_or(r.seq, |s| s.max(r.seq)));
            }
            ctl.store.put_appstate(id, &r.app, &state)?;
            // Counted once: agents re-send their last receipts on reconnect.
            let seen = ctl.store.receipt(id, &r.app)?.is_some_and(|old| old.seq == r.seq && old.outcome == r.outcome);
            if !seen {
                let outcome = match &r.outcome {
                    ReceiptOutcome::Committed => "committed",
                    ReceiptOutcome::Refused(why) => why.code(),
                    ReceiptOutcome::Scheduled { .. } => "scheduled",
                };
                ctl.metrics.releases.get_or_create(&crate::metrics::Outcome { outcome: outcome.into() }).inc();
            }
            // Not flushed: agents re-send their last receipts on reconnect.
            ctl.store.put_receipt(&r)?;
            ctl.store.put_recent_receipt(&r)?;
            ctl.fleet.bump();
        }
        ReleaseUp::Hello { .. } => bail!("second hello"),
        ReleaseUp::Policy { serial, approvals, mut refused } => {
            if let Some((_, why)) = refused.as_mut() {
                crate::rollout::truncate(why, crate::deploy::PEER_TEXT_LIMIT);
            }
            let record = crate::store::AgentPolicyRecord { v: 1, serial, approvals, refused };
            let old = ctl.store.agent_policy(id)?;
            if old.is_none_or(|o| {
                (o.serial, o.approvals, &o.refused) != (record.serial, record.approvals, &record.refused)
            }) {
                ctl.store.put_agent_policy(id, &record)?;
                ctl.fleet.bump();
            }
        }
        ReleaseUp::Preview { app, version, port, mut detail } => {
            crate::deploy::check_names(&[("app", &app)])?;
            if let Some(v) = &version {
                crate::deploy::check_names(&[("version", v)])?;
            }
            crate::rollout::truncate(&mut detail, crate::deploy::PEER_TEXT_LIMIT);
            let at = crate::rollout::now_ms();
            ctl.store.put_preview(id, &app, &crate::store::PreviewRecord { v: 1, version, port, detail, at })?;
            ctl.fleet.bump();
        }
    }
    Ok(())
}

/// Sends an agent what its environment should run, for every app where it is behind
/// (`plan::fleet::catch_up` decides): the environment's message if it names the agent and
/// is still valid, otherwise a fresh message for this agent alone with a new, higher seq.
/// `staged_now`: the agent has just staged something it may have lacked before.
///
/// Asked for here, done by the rollout driver on the blocking pool under the rollout lock
/// (a rollout starting or ending meanwhile is seen whole, and no async thread waits).
pub fn catch_up(ctl: &Controller, id: &AgentId, staged_now: bool) -> Result<()> {
    ctl.ask_catch_up(id, staged_now);
    Ok(())
}

/// [`catch_up`] for a caller that holds the rollout lock.
/// `relayed`: asked by the controller the agent is connected to, through the store (which may
/// not show the agent connected there yet).
pub fn catch_up_holding_lock(ctl: &Controller, id: &AgentId, staged_now: bool, relayed: bool) -> Result<()> {
    if !relayed && !ctl.connected(id) {
        return Ok(());
    }
    let Some(agent) = ctl.store.agent(id)? else {
        return Ok(());
    };
    let now = now_secs();
    for (app, desired) in ctl.store.desired_in(&agent.env)? {
        // A release to some hosts (selectors) is not what the others should run.
        if !desired.selectors.iter().all(|(k, v)| agent.labels.get(k) == Some(v)) {
            continue;
        }
        let state = ctl.store.appstate(id, &app)?;
        if state.active.as_deref() == Some(desired.version.as_str()) && desired.owed.contains(id) {
            let mut d = (*desired).clone();
            d.owed.retain(|x| x != id);
            ctl.store.put_desired(&agent.env, &app, &d)?;
        }
        let staged = ctl
            .store
            .stage(id, &app, &desired.version)?
            .is_some_and(|s| s.state == StageState::Staged && s.digest == desired.digest);
        let receipt = ctl.store.receipt(id, &app)?;
        let last_receipt = receipt.as_ref().map(|r| fleet::LastReceipt {
            seq: r.seq,
            version: &r.version,
            applied: r.applied,
            for_want_of_bytes: matches!(
                r.outcome,
                ReceiptOutcome::Refused(Refusal::NotStaged | Refusal::DigestMismatch | Refusal::Expired)
            ),
        });
        // Whether the environment's message can be sent as it is: only asked when it would be
        // (a signature check per reporting agent is what 10,000 agents' reports would cost).
        let usable = || {
            activate::verify(desired.message_for(id), &ctl.release_keys)
                .is_ok_and(|b| b.targets.includes(id) && b.expires_at > now + 60 && b.not_before <= now)
        };
        let decision = fleet::catch_up(
            &fleet::Desired {
                version: &desired.version,
                seq: desired.seq,
                since_seq: desired.since_seq,
                message_usable: true,
            },
            &fleet::AgentApp {
                active: state.active.as_deref(),
                last_seq: state.last_seq,
                staged,
                last_receipt,
                owed: desired.owed.contains(id),
            },
            ctl.store.active_rollout(&agent.env, &app)?.is_some(),
            staged_now,
        );
        // The planner resends a usable message and signs afresh otherwise.
        let decision = match decision {
            CatchUp::Resend if !usable() => CatchUp::SignFresh,
            d => d,
        };
        let message = match decision {
            CatchUp::Nothing => continue,
            CatchUp::Resend => desired.message_for(id).clone(),
            CatchUp::SignFresh => {
                let env_body = activate::verify(desired.message_for(id), &ctl.release_keys).ok();
                let seq = ctl.store.next_seq(&app)?;
                let rollout = format!("catch-up-{seq}");
                let ttl = ctl.config.message_ttl.as_secs();
                let mut msg = sign(
                    ctl,
                    &app,
                    &desired.version,
                    desired.digest,
                    &agent.env,
                    vec![vec![id.clone()]],
                    seq,
                    &rollout,
                    0,
                    ttl,
                    // What the environment's message gives the version (its share, its
                    // approvals), this host gets too.
                    env_body.as_ref().map_or(stagehand_common::activate::FULL_TRAFFIC, |b| b.traffic),
                    env_body.and_then(|b| b.approved),
                )?;
                ctl.store.flush()?;
                info!(agent = %id, %app, version = %desired.version, seq, "Catching up.");
                msg.remove(0)
            }
        };
        // Sent here, or left for the controller the agent is connected to.
        if !ctl.fleet.send_release(id, ReleaseDown::Activate(message.clone())) && ctl.store.shared() {
            ctl.store.put_outbox(id, &app, &message)?;
        }
    }
    Ok(())
}

/// Delivers the catch-up messages the driving controller left for agents connected here.
pub fn deliver_outbox(ctl: &Controller) -> Result<()> {
    for id in ctl.store.outbox_agents()? {
        if ctl.fleet.release_session(&id).is_none() {
            continue;
        }
        for (app, message, bytes) in ctl.store.outbox_of(&id)? {
            if ctl.store.take_outbox(&id, &app, &bytes)? {
                ctl.fleet.send_release(&id, ReleaseDown::Activate(message));
            }
        }
    }
    Ok(())
}

/// Signs one activate message per target list, all with the same body but for the targets
/// (one list for a message to name them all; `plan::rollout::parts` for a wave's parts),
/// with one audit entry for them all. The seq must be made durable before they leave.
#[allow(clippy::too_many_arguments)]
pub fn sign(
    ctl: &Controller,
    app: &str,
    version: &str,
    digest: stagehand_common::Digest,
    env: &str,
    lists: Vec<Vec<AgentId>>,
    seq: u64,
    rollout_id: &str,
    not_before: u64,
    ttl_secs: u64,
    traffic: u8,
    approved: Option<stagehand_common::policy::Approved>,
) -> Result<Vec<SignedActivate>> {
    let mut body = Activate {
        app: app.to_string(),
        version: version.to_string(),
        digest,
        env: env.to_string(),
        targets: Targets::Agents(vec![]),
        rollout_id: rollout_id.to_string(),
        seq,
        not_before,
        // A scheduled message lives its full lifetime from the time it may be applied.
        expires_at: now_secs().max(not_before) + ttl_secs.max(1),
        key_id: ctl.release_keys[0].key_id.clone(),
        traffic,
        approved,
    };
    audit_signed(ctl, &body, lists.len())?;
    Ok(lists
        .into_iter()
        .map(|targets| {
            body.targets = Targets::Agents(targets);
            activate::sign(&body, &ctl.release_key)
        })
        .collect())
}

/// Every seq signed is in the audit log, durably, before the message can leave.
fn audit_signed(ctl: &Controller, body: &Activate, parts: usize) -> Result<()> {
    let mut args = serde_json::json!({ "app": body.app, "env": body.env, "version": body.version, "seq": body.seq, "rollout": body.rollout_id, "traffic": body.traffic });
    if parts > 1 {
        args["parts"] = parts.into();
    }
    ctl.audit.record("controller", "signed", args, "ok")?;
    Ok(())
}

/// A signed message, its seq and its targets.
pub type Signed = (SignedActivate, u64, Vec<AgentId>);

/// An operator error with the next command to run.
#[derive(Debug)]
pub struct Refused {
    pub message: String,
    pub hint: String,
}

/// Signs a message for `version` naming every agent of `env`, to be carried by hand
/// (`release --export`, `stagehand-agent activate`). Nothing else changes: no rollout, no
/// released version; the seq is consumed so that no later message can reuse it.
pub fn export(
    ctl: &Controller,
    app: &str,
    version: &str,
    env: &str,
    ttl_secs: u64,
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
            hint: format!("stagehand agents list   (or enrol one: stagehand token create --env {env})"),
        }));
    }
    let targets: Vec<AgentId> = agents.iter().map(|a| a.id.clone()).collect();
    let seq = ctl.store.next_seq(app)?;
    let ttl = if ttl_secs == 0 { ctl.config.message_ttl.as_secs() } else { ttl_secs };
    let rollout = format!("export-{seq}");
    // The environment's released message carries the approvals of its rollout: a copy of the
    // same version, carried by hand, carries them too.
    let approved = ctl
        .store
        .desired(env, app)?
        .filter(|d| d.version == version && d.digest == artifact.digest)
        .and_then(|d| activate::verify(&d.message, &ctl.release_keys).ok())
        .and_then(|b| b.approved);
    let mut message = sign(
        ctl,
        app,
        version,
        artifact.digest,
        env,
        vec![targets.clone()],
        seq,
        &rollout,
        0,
        ttl,
        stagehand_common::activate::FULL_TRAFFIC,
        approved,
    )?;
    ctl.store.flush()?;
    info!(%app, %version, %env, seq, "Exported an activate message.");
    Ok(Ok((message.remove(0), seq, targets)))
}
