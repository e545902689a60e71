//! The deploy channel on the controller: tells agents what to stage, serves manifests and
//! chunks, records stage reports. Nothing here can change what is live on a host.

use crate::fleet::Channel;
use crate::server::Controller;
use crate::store::{StageRecord, StageState};
use anyhow::{bail, Result};
use stagehand_common::frame::{self, read_msg, write_blob, write_msg};
use stagehand_common::ids::{check_name, now_secs};
use stagehand_common::manifest::Manifest;
use stagehand_common::protocol::{DeployDown, DeployUp, StageOutcome, StagedArtifact, PROTOCOL_VERSION};
use stagehand_common::tls::Role;
use stagehand_common::{AgentId, Digest};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Largest number of chunks one fetch request may name.
pub const MAX_FETCH_BATCH: usize = 8192;
/// Fetch streams served at once per agent session (an agent fetches on two, plus a
/// manifest). With the read-ahead below, what one agent can make the controller hold is
/// bounded: FETCH_STREAMS × READ_AHEAD chunks, plus the connection's send window. Across
/// agents, chunk streams also wait for one of the controller's `fetch_streams` slots.
pub const FETCH_STREAMS: usize = 4;
/// Chunks read ahead of the wire per fetch stream.
const READ_AHEAD: usize = 4;
/// A chunk stream holds one of the controller's `fetch_streams` slots, which other agents
/// wait for: one whose peer takes no chunk (at most 1 MiB) for this long, or takes them
/// slower on average than [`FETCH_MIN_RATE`] after it, is dropped with its connection.
pub const FETCH_STALL: Duration = Duration::from_secs(30);
/// Bytes a second a chunk stream must average, beyond its first [`FETCH_STALL`].
pub const FETCH_MIN_RATE: u64 = 64 << 10;

pub async fn serve(ctl: Arc<Controller>, conn: quinn::Connection, id: AgentId) -> Result<()> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    match read_msg::<_, DeployUp, { frame::CONTROL_LIMIT }>(&mut recv).await? {
        Some(DeployUp::Hello { protocol_version: PROTOCOL_VERSION }) => {}
        Some(DeployUp::Hello { protocol_version }) => {
            let reason =
                format!("protocol version {protocol_version} is not supported (controller speaks {PROTOCOL_VERSION})");
            write_msg(&mut send, &DeployDown::Goodbye { reason }).await?;
            return Ok(());
        }
        other => bail!("expected hello, got {other:?}"),
    }
    write_msg(&mut send, &DeployDown::Hello { protocol_version: PROTOCOL_VERSION }).await?;

    let Some(agent) = ctl.store.agent(&id)? else { bail!("unknown agent {id}") };
    let allowed = Arc::new(Allowed { env: agent.env, chunks: Default::default() });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let token = ctl.fleet.attach_deploy(&id, tx, conn.clone());
    ctl.note_presence(&id);
    // A revocation between the role check and here would have found nothing to close.
    if !crate::server::active_agent(&ctl, &id)? {
        ctl.fleet.detach(&id, Channel::Deploy, token);
        ctl.note_presence(&id);
        ctl.note_presence(&id);
        conn.close(stagehand_common::protocol::CLOSE_REVOKED.into(), b"revoked");
        return Ok(());
    }
    info!(agent = %id, "Deploy channel up.");
    let writer = async {
        while let Some(msg) = rx.recv().await {
            write_msg(&mut send, &msg).await?;
        }
        anyhow::Ok(())
    };
    // At most FETCH_STREAMS fetches of this session at once: the next stream is accepted
    // only when one ends, and the peer waits (QUIC limits how many it may open).
    let slots = Arc::new(tokio::sync::Semaphore::new(FETCH_STREAMS));
    let fetches = async {
        loop {
            let slot = slots.clone().acquire_owned().await?;
            let (send, recv) = conn.accept_bi().await?;
            let (ctl, conn, allowed) = (ctl.clone(), conn.clone(), allowed.clone());
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = serve_fetch(&ctl, &allowed, send, recv).await {
                    debug!(error = %e, "Fetch stream failed; dropping the peer.");
                    conn.close(crate::server::CLOSE_PROTOCOL.into(), b"bad fetch request");
                }
            });
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    };
    let reader = async {
        while let Some(msg) = read_msg::<_, DeployUp, { frame::CONTROL_LIMIT }>(&mut recv).await? {
            // Store writes and their flush (an fsync) block: on the blocking pool, one
            // message of this session at a time, in order.
            let (ctl, id) = (ctl.clone(), id.clone());
            tokio::task::spawn_blocking(move || handle(&ctl, &id, msg)).await??;
        }
        anyhow::Ok(())
    };
    let result = tokio::select! {
        r = writer => r,
        r = fetches => r,
        r = reader => r,
    };
    ctl.fleet.detach(&id, Channel::Deploy, token);
    ctl.note_presence(&id);
    // The session is over: so are its fetch streams (they hold slots others wait for).
    conn.close(0u32.into(), b"deploy session over");
    if let Err(e) = ctl.store.put_last_seen(&id, now_secs()) {
        warn!(agent = %id, error = %e, "Could not record when the agent was last seen.");
    }
    info!(agent = %id, "Deploy channel down.");
    match result {
        Err(e) if is_disconnect(&e) => Ok(()),
        other => other,
    }
}

/// A peer going away is not an error worth reporting.
pub fn is_disconnect(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<quinn::ConnectionError>().is_some()
            || matches!(c.downcast_ref::<quinn::ReadError>(), Some(quinn::ReadError::ConnectionLost(_)))
            || matches!(c.downcast_ref::<quinn::WriteError>(), Some(quinn::WriteError::ConnectionLost(_)))
    })
}

/// Bytes of peer text (a staging failure's reason, a receipt's log) the controller keeps.
pub const PEER_TEXT_LIMIT: usize = 1024;

/// What an agent reports is checked before anything is kept: names must be names (a peer
/// that sends others is dropped), and only artifacts the controller knows are recorded.
pub fn check_names(what: &[(&str, &str)]) -> Result<()> {
    for (kind, name) in what {
        if let Err(e) = check_name(kind, name) {
            bail!("the agent reported an invalid {kind}: {e}");
        }
    }
    Ok(())
}

fn handle(ctl: &Controller, id: &AgentId, msg: DeployUp) -> Result<()> {
    match msg {
        DeployUp::About { version } => {
            if version.len() > 64 || version.chars().any(|c| c.is_control()) {
                bail!("agent {id} reports an unreadable version");
            }
            ctl.store.put_agent_about(id, &version)?;
        }
        DeployUp::Inventory { staged } => {
            for s in &staged {
                check_names(&[("app", &s.app), ("version", &s.version)])?;
            }
            // Only artifacts pushed here, with the digest they were pushed with.
            let known: Vec<StagedArtifact> = staged
                .into_iter()
                .filter(|s| ctl.store.artifact(&s.app, &s.version).ok().flatten().is_some_and(|a| a.digest == s.digest))
                .collect();
            reconcile(ctl, id, &known)?;
        }
        DeployUp::StageReport { app, version, digest, mut outcome } => {
            check_names(&[("app", &app), ("version", &version)])?;
            // Only for what the controller ordered (or recorded as staged) here.
            if ctl.store.stage(id, &app, &version)?.is_none() {
                warn!(agent = %id, %app, %version, "A stage report for nothing ordered; ignored.");
                return Ok(());
            }
            if let StageOutcome::Failed { reason } = &mut outcome {
                crate::rollout::truncate(reason, PEER_TEXT_LIMIT);
            }
            let state = match &outcome {
                StageOutcome::Staged { fetched_bytes, reused_bytes, millis } => {
                    info!(agent = %id, %app, %version, fetched_bytes, reused_bytes, millis, "Staged.");
                    ctl.metrics.staging_bytes.observe(*fetched_bytes as f64);
                    ctl.metrics.staging_seconds.observe(*millis as f64 / 1000.0);
                    StageState::Staged
                }
                StageOutcome::Failed { reason } => {
                    warn!(agent = %id, %app, %version, %reason, "Staging failed.");
                    StageState::Failed(reason.clone())
                }
            };
            let outcome = if state == StageState::Staged { "staged" } else { "failed" };
            ctl.metrics.stagings.get_or_create(&crate::metrics::Outcome { outcome: outcome.into() }).inc();
            ctl.store.put_stage(
                id,
                &app,
                &version,
                &StageRecord { v: 1, digest, state: state.clone(), at: now_secs() },
            )?;
            ctl.store.flush()?;
            ctl.fleet.bump();
            if state == StageState::Staged {
                crate::release::catch_up(ctl, id, true)?;
            }
        }
        DeployUp::Renew { csr_der } => {
            // The agent is who its current certificate says: the new one names the same id.
            let lifetime = ctl.config.agent_cert_lifetime;
            let cert_pem =
                stagehand_common::tls::issue_for_csr(&ctl.ca, &Role::Agent(id.0.clone()), &csr_der, lifetime)?;
            let fingerprint = stagehand_common::tls::fingerprint(&stagehand_common::tls::cert_der(&cert_pem)?);
            // Only the fingerprint changes, atomically: a revocation meanwhile stands, and a
            // revoked agent gets nothing.
            let updated = ctl.store.update_agent(id, |rec| {
                if rec.revoked {
                    return Err(());
                }
                Ok(crate::store::AgentRecord { cert_fingerprint: fingerprint.clone(), ..rec })
            })?;
            if updated.is_err() {
                bail!("a renewal for {id}, which is revoked or unknown");
            }
            ctl.store.flush()?;
            info!(agent = %id, "Certificate renewed.");
            ctl.fleet.send_deploy(id, DeployDown::Renewed { cert_pem });
        }
        DeployUp::Pruned { app, version } => {
            check_names(&[("app", &app), ("version", &version)])?;
            info!(agent = %id, %app, %version, "Removed an old release (agent retention).");
            ctl.store.remove_stage(id, &app, &version)?;
            ctl.store.flush()?;
            ctl.fleet.bump();
        }
        DeployUp::Verified { app, version, digest, mut outcome } => {
            check_names(&[("app", &app), ("version", &version)])?;
            if ctl.store.stage(id, &app, &version)?.is_none_or(|s| s.digest != digest) {
                warn!(agent = %id, %app, %version, "A verify report for nothing staged here; ignored.");
                return Ok(());
            }
            if let stagehand_common::protocol::VerifyOutcome::Failed { log } = &mut outcome {
                crate::rollout::truncate(log, PEER_TEXT_LIMIT);
                warn!(agent = %id, %app, %version, "[verify] failed.");
            }
            ctl.store.put_verify(id, &app, &version, &crate::store::VerifyRecord { v: 1, digest, outcome })?;
            ctl.fleet.bump();
        }
        other => bail!("unexpected message on the control stream: {other:?}"),
    }
    Ok(())
}

/// What an agent of `env` should hold (`plan::fleet::wanted` decides): (app, version,
/// digest, size).
pub fn wanted(ctl: &Controller, env: &str) -> Result<Vec<(String, String, Digest, u64)>> {
    let deploys: Vec<_> =
        ctl.store.deploys_in(env)?.into_iter().map(|(a, v, d)| (a, v, d.at, (d.digest, d.size))).collect();
    let desired: HashSet<(String, String)> =
        ctl.store.desired_in(env)?.into_iter().map(|(app, d)| (app, d.version.clone())).collect();
    Ok(crate::plan::fleet::wanted(deploys, &desired, ctl.config.catch_up_versions)
        .into_iter()
        .map(|(app, version, (digest, size))| (app, version, digest, size))
        .collect())
}

/// Brings the controller's records in line with what an agent holds, then sends it the
/// stage orders it is missing.
fn reconcile(ctl: &Controller, id: &AgentId, staged: &[StagedArtifact]) -> Result<()> {
    let Some(agent) = ctl.store.agent(id)? else {
        return Ok(());
    };
    let held: HashSet<(&str, &str, Digest)> =
        staged.iter().map(|s| (s.app.as_str(), s.version.as_str(), s.digest)).collect();
    let now = now_secs();
    let wanted = wanted(ctl, &agent.env)?;
    let is_wanted: HashSet<(&str, &str)> = wanted.iter().map(|(a, v, _, _)| (a.as_str(), v.as_str())).collect();
    for (app, version, rec) in ctl.store.stages_of(id, None)? {
        // Gone from the agent (retention, or by hand) and no longer wanted; what is still
        // wanted is ordered again below.
        if rec.state == StageState::Staged
            && !held.contains(&(app.as_str(), version.as_str(), rec.digest))
            && !is_wanted.contains(&(app.as_str(), version.as_str()))
        {
            ctl.store.remove_stage(id, &app, &version)?;
        }
    }
    for s in staged {
        ctl.store.put_stage(
            id,
            &s.app,
            &s.version,
            &StageRecord { v: 1, digest: s.digest, state: StageState::Staged, at: now },
        )?;
    }
    let mut orders = Vec::new();
    for (app, version, digest, size) in wanted {
        if !held.contains(&(app.as_str(), version.as_str(), digest)) {
            ctl.store.put_stage(
                id,
                &app,
                &version,
                &StageRecord { v: 1, digest, state: StageState::Pending, at: now },
            )?;
            orders.push(DeployDown::Stage { app, version, digest, size });
        }
    }
    ctl.store.flush()?;
    for o in orders {
        ctl.fleet.send_deploy(id, o);
    }
    ctl.fleet.bump();
    crate::release::catch_up(ctl, id, false)
}

/// Sends a connected agent the stage orders for what its environment wants and it is not
/// known to hold: after a deploy made through another controller. An agent ignores an order
/// it is already carrying out, and answers one for something it holds by reporting it staged.
pub fn order_pending(ctl: &Controller, id: &AgentId) -> Result<()> {
    let Some(agent) = ctl.store.agent(id)? else { return Ok(()) };
    for (app, version, digest, size) in wanted(ctl, &agent.env)? {
        let staged =
            ctl.store.stage(id, &app, &version)?.is_some_and(|s| s.state != StageState::Pending && s.digest == digest);
        if !staged {
            ctl.fleet.send_deploy(id, DeployDown::Stage { app, version, digest, size });
        }
    }
    Ok(())
}

/// Answers one fetch stream: a manifest, or chunks in the order asked.
/// What one agent's session may fetch: manifests of artifacts deployed to its environment,
/// and the chunks of manifests it fetched on this connection.
pub struct Allowed {
    env: String,
    chunks: std::sync::Mutex<HashSet<Digest>>,
}

impl Allowed {
    fn manifest(&self, ctl: &Controller, digest: &Digest) -> Result<bool> {
        Ok(ctl.store.deploys_in(&self.env)?.iter().any(|(_, _, d)| d.digest == *digest))
    }

    fn add(&self, digests: impl Iterator<Item = Digest>) {
        self.chunks.lock().unwrap_or_else(|p| p.into_inner()).extend(digests);
    }

    fn chunk(&self, d: &Digest) -> bool {
        self.chunks.lock().unwrap_or_else(|p| p.into_inner()).contains(d)
    }
}

async fn serve_fetch(
    ctl: &Controller,
    allowed: &Allowed,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<()> {
    let req = read_msg::<_, DeployUp, { frame::CONTROL_LIMIT }>(&mut recv).await?;
    match req {
        Some(DeployUp::FetchManifest { digest }) => {
            let mut bytes = None;
            if allowed.manifest(ctl, &digest)? {
                if let Ok(b) = ctl.chunks.manifest(&digest) {
                    // Decoding a large manifest is work for the blocking pool.
                    let (b, digests) = tokio::task::spawn_blocking(move || {
                        let m = Manifest::decode(&b)?;
                        let digests: Vec<Digest> =
                            m.files().flat_map(|(_, _, _, c)| c.iter().map(|c| c.digest)).collect();
                        anyhow::Ok((b, digests))
                    })
                    .await??;
                    allowed.add(digests.into_iter());
                    bytes = Some(b);
                }
            } else {
                warn!(env = %allowed.env, %digest, "Refused a manifest not deployed to the agent's environment.");
            }
            write_blob(&mut send, bytes.as_deref()).await?;
        }
        Some(DeployUp::FetchChunks { digests }) => {
            if digests.len() > MAX_FETCH_BATCH {
                bail!("fetch of {} chunks exceeds the batch limit of {MAX_FETCH_BATCH}", digests.len());
            }
            // Its turn among every agent's chunk streams (first come, first served): the
            // memory of a fan-out is bounded by the slots, not by the number of agents.
            let _slot = match ctl.fetch_slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    ctl.metrics.fetch_streams_queued.inc();
                    let _waiting = ctl.metrics.fetch_streams_waiting.track();
                    // A stream its peer gave up (or a connection lost) while it waited
                    // takes no slot.
                    tokio::select! {
                        slot = ctl.fetch_slots.clone().acquire_owned() => slot?,
                        _ = send.stopped() => bail!("the agent gave up a fetch stream while it waited for a slot"),
                    }
                }
            };
            let _serving = ctl.metrics.fetch_streams_serving.track();
            // Read ahead on a blocking thread while the previous chunk is on the wire.
            let (tx, mut rx) = mpsc::channel::<Option<Vec<u8>>>(READ_AHEAD);
            let store = ctl.chunks.clone();
            let permitted: Vec<bool> = digests.iter().map(|d| allowed.chunk(d)).collect();
            let reader = tokio::task::spawn_blocking(move || {
                for (d, ok) in digests.iter().zip(permitted) {
                    let chunk = if ok { store.get(d).ok() } else { None };
                    if tx.blocking_send(chunk).is_err() {
                        break;
                    }
                }
            });
            let (started, mut sent) = (Instant::now(), 0u64);
            while let Some(chunk) = rx.recv().await {
                let allowed = FETCH_STALL + Duration::from_secs(sent / FETCH_MIN_RATE);
                let Some(left) = allowed.checked_sub(started.elapsed()) else {
                    bail!("the agent took {sent} bytes in {:?}, under 64 KiB/s", started.elapsed());
                };
                sent += chunk.as_ref().map_or(0, |c| c.len() as u64);
                // The length through the framing, the bytes handed to quinn without a copy.
                let write = async {
                    match chunk {
                        Some(bytes) => {
                            send.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
                            send.write_chunk(bytes::Bytes::from(bytes)).await?;
                        }
                        None => write_blob(&mut send, None).await?,
                    }
                    anyhow::Ok(())
                };
                match tokio::time::timeout(left.min(FETCH_STALL), write).await {
                    Ok(written) => written?,
                    Err(_) => bail!("the agent took no chunk for {:?} of its fetch", left.min(FETCH_STALL)),
                }
            }
            reader.await?;
            // The slot is held until the peer has every byte: what quinn still buffers for
            // this stream counts against the slots, not beside them.
            send.finish()?;
            match tokio::time::timeout(FETCH_STALL, send.stopped()).await {
                Ok(_) => return Ok(()),
                Err(_) => bail!("the agent acknowledged nothing of its fetch for {FETCH_STALL:?}"),
            }
        }
        other => bail!("unexpected fetch request {other:?}"),
    }
    send.finish()?;
    Ok(())
}
