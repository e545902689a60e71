//! The rollout driver: plans a rollout from the registry, persists it, and performs what the
//! planner (`plan::rollout`) decides: signs messages, sends them, feeds receipts back, and
//! records the environment's released version when a rollout succeeds. Every decision is
//! the planner's; this module only reads, writes and sends.
//!
//! Durability: a message's seq and bytes are flushed inside the rollout record before the
//! message leaves, and a host is only ever sent a message the record holds. After a
//! restart the driver sends the same messages again (an agent that applied one answers
//! with its earlier receipt), so no host is activated twice by one rollout and no wave is
//! skipped or repeated.

use crate::plan::fleet::{promoted_from, rollback_target};
use crate::plan::rollout::parts;
use crate::plan::rollout::{
    parse_max_unhealthy, parse_waves, split, Action, Control, Host, HostObs, HostState, Kind, Observed, Offline,
    Purpose, Rollout, Staging, State, Wave, DEFAULT_TIMEOUT_MS, RECORD_VERSION,
};
use crate::release::{sign, Refused};
use crate::server::Controller;
use crate::store::{DesiredRecord, Ends, StageState};
use anyhow::Result;
use stagehand_common::activate::FULL_TRAFFIC;
use stagehand_common::ids::check_name;
use stagehand_common::protocol::{HostView, ReleaseDown, RolloutAction, RolloutSpec, RolloutView, WaveView};
use stagehand_common::AgentId;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Bounds what a rollout keeps of each receipt's hook output (the full last receipt of
/// every agent is kept apart).
const RECEIPT_LOG_LIMIT: usize = 512;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A rollout started (or planned) and what the operator should know about it.
pub type Started = (RolloutView, Vec<String>);

fn refused(message: impl Into<String>, hint: impl Into<String>) -> Refused {
    Refused { message: message.into(), hint: hint.into() }
}

/// Plans a rollout from `spec`; unless it is a dry run, stores it for the driver. Refuses,
/// changing nothing and consuming no seq, when it cannot start.
pub fn start(ctl: &Controller, spec: RolloutSpec, who: &str) -> Result<std::result::Result<Started, Refused>> {
    let (app, env) = (spec.app.as_str(), spec.env.as_str());
    for (kind, v) in
        [("app", app), ("environment", env)].into_iter().chain(spec.version.as_deref().map(|v| ("version", v)))
    {
        if let Err(e) = check_name(kind, v) {
            return Ok(Err(refused(e, "fix the name and run the command again")));
        }
    }
    let agents = ctl.store.agents_in(env)?;
    if agents.is_empty() {
        let why =
            if ctl.config.environments.knows(env) { "has no agents" } else { "has no agents and is not configured" };
        return Ok(Err(refused(
            format!("environment {env:?} {why}; nothing was released"),
            format!("check the name with `stagehand agents list`, or enrol a host: stagehand token create --env {env}"),
        )));
    }
    let _one_at_a_time = ctl.rollout_lock();
    // A rollback goes ahead of a release that has sent nothing yet (awaiting approval or its
    // window): rollbacks are always allowed (SPEC §14). That one ends once this one is planned.
    let mut superseded = None;
    if let Some(id) = ctl.store.active_rollout(env, app)?.filter(|id| {
        let waiting = spec.rollback && ctl.store.rollout(id).ok().flatten().is_some_and(|r| r.state.is_awaiting());
        if waiting {
            superseded = Some(id.clone());
        }
        !waiting
    }) {
        return Ok(Err(refused(
            format!("rollout {id} of {app} in {env} has not ended; one rollout per app and environment runs at a time"),
            format!("stagehand rollout status {id} --watch   (or stagehand rollout abort {id})"),
        )));
    }
    let desired = ctl.store.desired(env, app)?;
    let version = match (&spec.version, spec.rollback) {
        (Some(v), _) => v.clone(),
        (None, true) => {
            let current = desired.as_ref().map(|d| d.version.as_str());
            let history = desired.as_ref().map(|d| d.history.as_slice()).unwrap_or_default();
            match rollback_target(app, env, current, history) {
                Ok(v) => v,
                Err(why) => {
                    return Ok(Err(refused(why, format!("stagehand rollback {app} --env {env} --to VERSION"))));
                }
            }
        }
        (None, false) => {
            return Ok(Err(refused("no version named", format!("stagehand release {app} VERSION --env {env}"))))
        }
    };
    let Some(artifact) = ctl.store.artifact(app, &version)? else {
        return Ok(Err(refused(
            format!("{app} {version} has not been pushed"),
            format!("stagehand push {app} {version} PATH"),
        )));
    };
    let mut notes = Vec::new();
    // Release policy (SPEC §14): a freeze or a window holds back releases, never rollbacks.
    let policy = crate::policy::settings(ctl, env);
    let now = now_ms() / 1000;
    let mut window_opens = None;
    if !spec.rollback {
        if let Some(f) = crate::policy::frozen(ctl, env, now)? {
            let why = crate::policy::frozen_why(env, &f);
            if !spec.dry_run {
                return Ok(Err(refused(
                    format!("{why}; nothing was released"),
                    format!("stagehand unfreeze --env {env}   (or roll back: stagehand rollback {app} --env {env})"),
                )));
            }
            notes.push(format!("would refuse: {why}"));
        }
        if let Some(t) = crate::plan::window::wait_until(&policy.windows.0, now as i64) {
            let when = crate::plan::window::describe(&policy.windows.0, t);
            if spec.no_wait_window && !spec.dry_run {
                return Ok(Err(refused(
                    format!("{env} is outside its release windows; the next opens {when}; nothing was released (--no-wait-window)"),
                    format!("release without --no-wait-window to wait for it (stagehand policy show --env {env})"),
                )));
            }
            notes.push(format!("outside {env}'s release windows: it waits for the next, opening {when}"));
            window_opens = Some(t.max(0) as u64);
        }
    }
    // Approvals: every release, and a rollback to a version that was never live here (agents
    // take back what they ran, with the content it ran with, without approvals).
    let was_live_here = desired
        .as_ref()
        .is_some_and(|d| (d.version == version && d.digest == artifact.digest) || d.history.contains(&version))
        || ctl.store.promoted(env, app, &artifact.digest)?.is_some();
    let approvals_needed = if spec.rollback && was_live_here { 0 } else { policy.approvals.0 };
    let mut forced = false;
    // Promotion: a rollback to a version that was live here is always allowed.
    let was_live = ctl.store.promoted(env, app, &artifact.digest)?.is_some()
        || desired.as_ref().is_some_and(|d| d.version == version || d.history.contains(&version));
    if !(spec.rollback && was_live) {
        let with_agents: HashSet<String> =
            ctl.store.agents()?.into_iter().filter(|a| !a.revoked).map(|a| a.env).collect();
        if let Some(from) = promoted_from(&ctl.config.environments.order, &with_agents, env) {
            if ctl.store.promoted(from, app, &artifact.digest)?.is_none() {
                let why = format!(
                    "{app} {version} ({}) has not completed a rollout in {from}, which comes before {env}",
                    artifact.digest.short()
                );
                if !spec.force && spec.dry_run {
                    notes.push(format!("would refuse: {why} (--force releases anyway)"));
                } else if !spec.force {
                    return Ok(Err(refused(
                        format!("{why}; nothing was released"),
                        format!(
                            "stagehand release {app} {version} --env {from} --wait   (or add --force to release anyway; it is recorded)"
                        ),
                    )));
                } else {
                    forced = true;
                    notes.push(format!("forced past promotion: {why}"));
                }
            }
        }
    }
    let mut targets: Vec<_> =
        agents.into_iter().filter(|a| spec.selectors.iter().all(|(k, v)| a.labels.get(k) == Some(v))).collect();
    if targets.is_empty() {
        let sel: Vec<String> = spec.selectors.iter().map(|(k, v)| format!("{k}={v}")).collect();
        return Ok(Err(refused(
            format!("no agent of {env} carries the labels {}; nothing was released", sel.join(", ")),
            "stagehand agents list   (selectors match the labels bound by join tokens)",
        )));
    }
    targets.sort_by(|a, b| (&a.name, &a.id.0).cmp(&(&b.name, &b.id.0)));
    let env_cfg = ctl.config.environments.get(env);
    // A rollback is one wave by default, and takes only what its own flags say.
    let defaults = if spec.rollback { Default::default() } else { env_cfg };
    let offline = match spec.offline.as_deref().or(defaults.offline.as_deref()).map(Offline::parse).transpose() {
        Ok(o) => o.unwrap_or(Offline::Wait),
        Err(e) => return Ok(Err(refused(e, "stagehand release --help"))),
    };
    let mut planned = Vec::new();
    let mut skipped = Vec::new();
    let mut refusing = Vec::new();
    for a in targets {
        let connected = ctl.connected(&a.id);
        let stage = ctl.store.stage(&a.id, app, &version)?;
        let staged = stage.as_ref().is_some_and(|s| s.state == StageState::Staged && s.digest == artifact.digest);
        let host = Host::new(a.id.clone(), a.name.clone());
        if !connected {
            match offline {
                Offline::Skip => {
                    notes.push(format!("{}: offline, skipped (--offline skip)", a.name));
                    skipped.push(Host { state: HostState::Skipped("offline".into()), ..host });
                    continue;
                }
                Offline::Fail => refusing.push(format!("{}: offline (--offline fail)", a.name)),
                Offline::Wait => notes.push(format!("{}: offline; its wave waits for it (--offline wait)", a.name)),
            }
        } else if !staged {
            let why = match stage.map(|s| s.state) {
                Some(StageState::Failed(why)) => format!("staging failed: {why}"),
                Some(StageState::Pending) => "still staging".to_string(),
                _ => "not staged".to_string(),
            };
            refusing.push(format!("{}: {version} {why}", a.name));
        } else if policy.verify.0 && !spec.rollback {
            use stagehand_common::protocol::VerifyOutcome;
            let why = match ctl.store.verify(&a.id, app, &version)?.filter(|v| v.digest == artifact.digest) {
                Some(v) => match v.outcome {
                    VerifyOutcome::Passed => None,
                    VerifyOutcome::Failed { log } => {
                        Some(format!("[verify] failed: {}", log.lines().last().unwrap_or("no output")))
                    }
                    VerifyOutcome::NotDeclared => Some("declares no [verify], and verify = true".to_string()),
                },
                None => Some("[verify] has not run yet".to_string()),
            };
            if let Some(why) = why {
                refusing.push(format!("{}: {version} {why}", a.name));
            }
        }
        planned.push(host);
    }
    let sizes = match spec.waves.as_deref().or(defaults.waves.as_deref()).map(parse_waves).transpose() {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => return Ok(Err(refused(e, "stagehand release --help"))),
    };
    let max_unhealthy = match parse_max_unhealthy(
        spec.max_unhealthy.as_deref().or(defaults.max_unhealthy.as_deref()).unwrap_or("0"),
        planned.len(),
    ) {
        Ok(n) => n,
        Err(e) => return Ok(Err(refused(e, "stagehand release --help"))),
    };
    let bake_ms = spec.bake_secs.map(|s| s * 1000).or(defaults.bake.map(|d| d.as_millis() as u64)).unwrap_or(0);
    let plan_ids: Vec<&str> = planned.iter().chain(skipped.iter()).map(|h| h.id.0.as_str()).collect();
    let gate = crate::plan::rollout::Gate {
        approvals_needed,
        approvals: vec![],
        plan_targets: plan_ids.len() as u32,
        plan_hosts: stagehand_common::policy::hosts_digest(plan_ids),
        window_opens,
    };
    let mut hosts = planned.into_iter();
    let waves = split(hosts.len(), &sizes)
        .into_iter()
        .map(|n| Wave { hosts: hosts.by_ref().take(n).collect(), ..Wave::default() })
        .collect();
    // A rollback moves every connection back.
    let traffic = match spec.traffic {
        _ if spec.rollback => FULL_TRAFFIC,
        0 => FULL_TRAFFIC,
        t @ 1..=FULL_TRAFFIC => t,
        t => return Ok(Err(refused(format!("--traffic {t} is above 100"), "stagehand release --help"))),
    };
    let mut rollout = Rollout {
        v: RECORD_VERSION,
        id: String::new(),
        app: app.to_string(),
        version: version.clone(),
        digest: artifact.digest,
        env: env.to_string(),
        kind: if spec.rollback { Kind::Rollback } else { Kind::Release },
        requested_by: who.to_string(),
        forced,
        created: now_ms(),
        ended: None,
        not_before: spec.at,
        selectors: spec.selectors.clone(),
        bake_ms,
        max_unhealthy,
        offline,
        timeout_ms: if spec.timeout_secs == 0 { DEFAULT_TIMEOUT_MS } else { spec.timeout_secs * 1000 },
        ttl_secs: if spec.ttl_secs == 0 { ctl.config.message_ttl.as_secs() } else { spec.ttl_secs },
        reason: String::new(),
        pause_requested: false,
        wave: 0,
        waves,
        skipped,
        rollback_since: None,
        messages: vec![],
        revision: 1,
        traffic,
        state: if approvals_needed > 0 {
            State::AwaitingApproval
        } else if window_opens.is_some() {
            State::AwaitingWindow
        } else {
            State::Running
        },
        gate,
    };
    if spec.dry_run {
        for r in &refusing {
            notes.push(format!("would refuse: {r}"));
        }
        rollout.id = "dry-run".into();
        let mut view = view(ctl, &rollout);
        view.state = "planned".into();
        return Ok(Ok((view, notes)));
    }
    if !refusing.is_empty() {
        return Ok(Err(refused(
            format!("{app} {version} cannot be released to every target of {env}; nothing was sent: {}", refusing.join("; ")),
            format!(
                "stagehand deploy {app} {version} --env {env} --wait   (offline hosts: --offline skip; see the plan with --dry-run)"
            ),
        )));
    }
    if rollout.waves.is_empty() {
        return Ok(Err(refused(
            format!("every target of {env} is offline; nothing was released"),
            "stagehand agents list   (or --offline wait to wait for them)",
        )));
    }
    if let Some(id) = &superseded {
        if !supersede(ctl, id, who)? {
            return Ok(Err(refused(
                format!("rollout {id} of {app} in {env} started meanwhile; one rollout per app and environment runs at a time"),
                format!("stagehand rollout abort {id}, then roll back"),
            )));
        }
        notes.push(format!("{id}, which had sent nothing yet, ends: this rollback goes first"));
    }
    rollout.id = ctl.store.next_rollout_id()?;
    if rollout.state == State::AwaitingApproval {
        notes.push(format!(
            "awaiting {approvals_needed} approval(s) by other identities than {who}: stagehand approve {}",
            rollout.id
        ));
    }
    // Another controller may start one at the same moment: one of the two holds the mark.
    if let Some(other) = ctl.store.start_rollout(&rollout)? {
        return Ok(Err(refused(
            format!("rollout {other} of {app} in {env} has just started; one rollout per app and environment runs at a time"),
            format!("stagehand rollout status {other} --watch   (or stagehand rollout abort {other})"),
        )));
    }
    ctl.store.flush()?;
    if forced {
        warn!(rollout = %rollout.id, %app, %version, %env, by = %who, "Released past the promotion rule (--force).");
    }
    info!(rollout = %rollout.id, %app, %version, %env, waves = rollout.waves.len(), by = %who, "Rollout started.");
    ctl.fleet.bump();
    Ok(Ok((view(ctl, &rollout), notes)))
}

/// Ends a rollout that has sent nothing yet, for a rollback; false if it is under way.
fn supersede(ctl: &Controller, id: &str, who: &str) -> Result<bool> {
    let Some(before) = ctl.store.rollout(id)?.filter(|r| r.state.is_awaiting()) else { return Ok(false) };
    let mut r = before.clone();
    r.state = State::Aborted;
    r.ended = Some(now_ms());
    r.reason = format!("superseded by a rollback {who} asked for before it started; nothing was sent");
    r.revision += 1;
    if !ctl.store.replace_rollout(&before, &r, Default::default())? {
        return Ok(false);
    }
    info!(rollout = %id, by = %who, "Superseded by a rollback before it started.");
    Ok(true)
}

/// Pause, resume or abort.
pub fn control(
    ctl: &Controller,
    id: &str,
    action: RolloutAction,
    who: &str,
) -> Result<std::result::Result<Started, Refused>> {
    let action = match action {
        RolloutAction::Pause => Control::Pause,
        RolloutAction::Resume => Control::Resume,
        RolloutAction::Abort => Control::Abort,
    };
    change(ctl, id, who, |r| {
        r.control(action, who, now_ms())
            .map(str::to_string)
            .map_err(|why| refused(why, format!("stagehand rollout status {id}")))
    })
}

/// Changes a rollout as an operator asks (control, approve, reject): `f` decides on the
/// record as it is and says what it did. The driver may step it on another controller
/// meanwhile: it is changed only as it was read, and `f` decides again on a newer record.
pub fn change(
    ctl: &Controller,
    id: &str,
    who: &str,
    f: impl Fn(&mut Rollout) -> std::result::Result<String, Refused>,
) -> Result<std::result::Result<Started, Refused>> {
    let _one_at_a_time = ctl.rollout_lock();
    for _ in 0..20 {
        let Some(before) = ctl.store.rollout(id)? else {
            return Ok(Err(refused(format!("no rollout {id}"), "stagehand rollout list")));
        };
        let mut r = before.clone();
        let said = match f(&mut r) {
            Ok(said) => said,
            Err(refused) => return Ok(Err(refused)),
        };
        r.revision += 1;
        if ctl.store.replace_rollout(&before, &r, Default::default())? {
            ctl.store.flush()?;
            info!(rollout = %id, by = %who, "{said}");
            ctl.fleet.bump();
            return Ok(Ok((view(ctl, &r), vec![said])));
        }
    }
    anyhow::bail!("rollout {id} kept changing while it was being changed; try again")
}

/// What the CLI shows of a rollout.
pub fn view(ctl: &Controller, r: &Rollout) -> RolloutView {
    let host = |h: &Host| {
        let scheduled = matches!(h.state, HostState::Sent { .. })
            && h.receipt
                .as_ref()
                .is_some_and(|r| matches!(r.outcome, stagehand_common::protocol::ReceiptOutcome::Scheduled { .. }));
        HostView {
            id: h.id.clone(),
            name: h.name.clone(),
            state: if scheduled { "scheduled".into() } else { h.state.name().into() },
            detail: h.state.detail().to_string(),
            previous: h.previous.clone(),
            connected: ctl.connected(&h.id),
            receipt: h.receipt.clone(),
        }
    };
    let last = r.waves.len().saturating_sub(1);
    let waves = r
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let state = match (w.started, w.passed) {
                (None, _) if r.state.is_final() || matches!(r.state, State::RollingBack(_)) => "untouched",
                (None, _) if i == r.wave && w.gate_since.is_some() => "staging-gate",
                (None, _) => "waiting",
                (Some(_), None) if r.state.is_final() => "stopped",
                (Some(_), None) => "in-progress",
                (Some(_), Some(_)) if i == r.wave && i != last && !r.state.is_final() => "baking",
                (Some(_), Some(_)) => "passed",
            };
            WaveView { state: state.into(), hosts: w.hosts.iter().map(host).collect() }
        })
        .collect();
    RolloutView {
        id: r.id.clone(),
        app: r.app.clone(),
        version: r.version.clone(),
        digest: r.digest,
        env: r.env.clone(),
        kind: match r.kind {
            Kind::Release => "release".into(),
            Kind::Rollback => "rollback".into(),
        },
        state: r.state.name().into(),
        reason: match ctl.stalled.lock().unwrap_or_else(|p| p.into_inner()).get(&r.id) {
            Some(why) if !r.state.is_final() => format!("stalled, trying again every second: {why}"),
            _ => r.reason.clone(),
        },
        requested_by: r.requested_by.clone(),
        forced: r.forced,
        created_at: r.created / 1000,
        ended_at: r.ended.map(|e| e / 1000),
        not_before: r.not_before,
        bake_secs: r.bake_ms / 1000,
        max_unhealthy: r.max_unhealthy,
        offline: r.offline.name().into(),
        pause_requested: r.pause_requested,
        wave: r.wave as u32,
        waves,
        skipped: r.skipped.iter().map(host).collect(),
        revision: r.revision,
        traffic: r.traffic,
        approvals_needed: r.gate.approvals_needed,
        approvals: r
            .gate
            .approvals
            .iter()
            .map(|a| stagehand_common::protocol::ApprovalView { by: a.by.clone(), at: a.at })
            .collect(),
        window_opens: r.gate.window_opens.filter(|_| r.state == State::AwaitingWindow),
    }
}

/// What is known of a rollout's hosts right now.
fn observe(ctl: &Controller, r: &Rollout, grace_until: u64) -> Result<Observed> {
    let mut obs = Observed { hosts: HashMap::new(), grace_until };
    for h in r.hosts() {
        let Some(agent) = ctl.store.agent(&h.id)? else { continue };
        let staging = match ctl.store.stage(&h.id, &r.app, &r.version)? {
            Some(s) if s.digest != r.digest => Staging::Missing,
            Some(s) => match s.state {
                StageState::Staged => Staging::Staged,
                StageState::Pending => Staging::Pending,
                StageState::Failed(why) => Staging::Failed(why),
            },
            None => Staging::Missing,
        };
        obs.insert(
            h.id.clone(),
            HostObs {
                connected: ctl.connected(&h.id),
                revoked: agent.revoked,
                staging,
                active: ctl.store.appstate(&h.id, &r.app)?.active,
                // The answer to the message it waits on, if it came; else its latest.
                receipt: match h.state.awaited_seq() {
                    Some(seq) => ctl.store.receipt_for(&h.id, &r.app, seq)?,
                    None => None,
                }
                .map_or_else(|| ctl.store.receipt(&h.id, &r.app), |r| Ok(Some(r)))?,
            },
        );
    }
    Ok(obs)
}

/// Which session each awaited message was last sent on: (agent, app, seq) → session
/// token. Seqs are per app: two apps' rollouts may await the same seq from one host.
type SentOn = HashMap<(AgentId, String, u64), u64>;

/// After the controller starts, how long hosts get to reconnect (and re-send the receipts
/// it may have missed) before offline policies and timeouts apply to them.
pub const RECONNECT_GRACE_MS: u64 = 20_000;

/// Runs every rollout that has not ended until the task is aborted.
pub async fn drive(ctl: Arc<Controller>) {
    let mut changes = ctl.fleet.subscribe();
    let mut sent_on = SentOn::new();
    let mut grace_until = now_ms() + RECONNECT_GRACE_MS;
    let mut leading = ctl.store.is_leader();
    loop {
        changes.borrow_and_update();
        // A controller that takes over gives the agents of the one that died time to move.
        let leads = ctl.store.is_leader();
        if leads && !leading {
            grace_until = now_ms() + RECONNECT_GRACE_MS;
        }
        leading = leads;
        let c = ctl.clone();
        let (wake, back) = match tokio::task::spawn_blocking(move || {
            let wake = tick(&c, &mut sent_on, grace_until);
            (wake, sent_on)
        })
        .await
        {
            Ok((Ok(wake), back)) => (wake, back),
            Ok((Err(e), back)) => {
                warn!(error = %format!("{e:#}"), "Rollout step failed; trying again shortly.");
                (Some(now_ms() + 1000), back)
            }
            Err(e) => {
                // A panic is a bug; the next step starts from the stored records again.
                warn!(error = %e, "Rollout step panicked; trying again shortly.");
                (Some(now_ms() + 1000), SentOn::new())
            }
        };
        sent_on = back;
        // Timers of the planner, and a slow heartbeat so that nothing waits on a lost wake-up.
        let sleep = wake.map_or(5000, |at| at.saturating_sub(now_ms())).clamp(1, 5000);
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(sleep)) => {}
        }
    }
}

/// One step of every running rollout; returns when the planner next needs to look. One
/// rollout's failure is logged and does not hold up the others.
fn tick(ctl: &Controller, sent_on: &mut SentOn, grace_until: u64) -> Result<Option<u64>> {
    let _one_at_a_time = ctl.rollout_lock();
    let mut wake: Option<u64> = None;
    let mut awaited = HashSet::new();
    if ctl.store.shared() {
        crate::release::deliver_outbox(ctl)?;
    }
    if !ctl.store.is_leader() {
        // Another controller drives: this one asks it to catch its agents up, and hands
        // them the messages the driver recorded.
        for (id, staged_now) in ctl.take_catch_ups() {
            ctl.store.ask_catch_up(&id, staged_now)?;
        }
        for (_, _, id) in ctl.store.active_rollouts()? {
            if let Some(r) = ctl.store.rollout(&id)?.filter(|r| !r.state.is_final()) {
                deliver(ctl, &r, sent_on, &mut awaited);
            }
        }
        sent_on.retain(|k, _| awaited.contains(k));
        // Looks again soon: it may be the one to drive next.
        return Ok(Some(now_ms() + 500));
    }
    let mut catch_ups: Vec<(AgentId, bool, bool)> =
        ctl.take_catch_ups().into_iter().map(|(id, staged_now)| (id, staged_now, false)).collect();
    if ctl.store.shared() {
        catch_ups.extend(ctl.store.take_catch_ups()?.into_iter().map(|(id, staged_now)| (id, staged_now, true)));
    }
    for (id, staged_now, relayed) in catch_ups {
        if let Err(e) = crate::release::catch_up_holding_lock(ctl, &id, staged_now, relayed) {
            warn!(agent = %id, error = %format!("{e:#}"), "Catch-up failed; it is tried again when the agent reconnects.");
        }
    }
    for (env, app, id) in ctl.store.active_rollouts()? {
        if !ctl.store.is_leader() {
            break;
        }
        let step = step_one(ctl, &env, &app, &id, sent_on, &mut awaited, grace_until);
        let mut stalled = ctl.stalled.lock().unwrap_or_else(|p| p.into_inner());
        let was_stalled = match &step {
            Ok(_) => stalled.remove(&id).is_some(),
            Err(e) => stalled.insert(id.clone(), format!("{e:#}")).is_none(),
        };
        drop(stalled);
        if was_stalled {
            ctl.fleet.bump();
        }
        match step {
            Ok(Some(at)) => wake = Some(wake.map_or(at, |w: u64| w.min(at))),
            Ok(None) => {}
            Err(e) => {
                warn!(rollout = %id, error = %format!("{e:#}"), "Rollout step failed; trying again shortly.");
                let again = now_ms() + 1000;
                wake = Some(wake.map_or(again, |w: u64| w.min(again)));
                // What it was waiting on stays awaited: nothing is sent twice on a session.
                awaited.extend(sent_on.keys().cloned());
            }
        }
    }
    sent_on.retain(|k, _| awaited.contains(k));
    Ok(wake)
}

#[allow(clippy::too_many_arguments)]
fn step_one(
    ctl: &Controller,
    env: &str,
    app: &str,
    id: &str,
    sent_on: &mut SentOn,
    awaited: &mut HashSet<(AgentId, String, u64)>,
    grace_until: u64,
) -> Result<Option<u64>> {
    let Some(mut r) = ctl.store.rollout(id)?.filter(|r| !r.state.is_final()) else {
        ctl.store.clear_active_rollout_of(env, app, id)?;
        return Ok(None);
    };
    let before = r.clone();
    // Only a rollout that was under way when the controller started needs the grace: one
    // started since sees every host as it is.
    let grace_until = if r.created + RECONNECT_GRACE_MS >= grace_until { 0 } else { grace_until };
    crate::policy::hold_for_window(ctl, &mut r, now_ms())?;
    let step = r.advance(&observe(ctl, &r, grace_until)?, now_ms());
    let mut signed = Vec::new();
    for Action::Send { purpose, version, hosts, not_before } in step.actions {
        let digest = match ctl.store.artifact(&r.app, &version)? {
            Some(a) => a.digest,
            None => anyhow::bail!("{} {version} is no longer in the artifact store", r.app),
        };
        let seq = ctl.store.next_seq(&r.app)?;
        // A revert moves every connection back (and needs no approvals: agents take back the
        // version they ran before); a wave gives the new version its share, with its approvals.
        let (traffic, approved) = match purpose {
            Purpose::Wave(_) => (r.traffic, crate::policy::approved(&r)),
            Purpose::Revert => (FULL_TRAFFIC, None),
        };
        let lists = parts(&hosts);
        let parts =
            sign(ctl, &r.app, &version, digest, &r.env, lists, seq, &r.id, not_before, r.ttl_secs, traffic, approved)?;
        r.record_sent(purpose, &hosts, seq, &version, parts);
        signed.push((purpose, version, hosts.len(), seq));
    }
    for h in r.hosts_mut() {
        if let Some(rec) = h.receipt.as_mut() {
            truncate(&mut rec.log, RECEIPT_LOG_LIMIT);
        }
    }
    if r != before {
        r.revision += 1;
        // An operator's control through another controller came first: step again from it.
        if ctl.store.rollout(&r.id)?.as_ref() != Some(&before) {
            return Ok(Some(now_ms()));
        }
        let ends = if r.state == State::Succeeded {
            complete(ctl, &r)?
        } else if r.state.is_final() {
            owe(ctl, &r)?
        } else {
            Default::default()
        };
        if !ctl.store.replace_rollout(&before, &r, ends)? {
            return Ok(Some(now_ms()));
        }
    }
    // Messages leave only after the record that holds them is durable: flushed now, even
    // when nothing changed in this step (an earlier flush may have failed).
    let to_send = awaiting(ctl, &r, sent_on, awaited);
    if r != before || !to_send.is_empty() {
        ctl.store.flush()?;
    }
    for (purpose, version, hosts, seq) in signed {
        match purpose {
            Purpose::Wave(w) => info!(rollout = %r.id, wave = w + 1, hosts, seq, "Wave started."),
            Purpose::Revert => info!(rollout = %r.id, %version, hosts, seq, "Sending hosts back."),
        }
    }
    if r != before {
        if r.state != before.state {
            info!(rollout = %r.id, state = r.state.name(), reason = %r.reason, "Rollout {}.", r.state.name());
        }
        if r.state.is_final() {
            // Hosts it skipped, or could not put back, are brought to the released version.
            catch_up_env(ctl, &r.env);
        }
        ctl.fleet.bump();
    }
    send(ctl, &r, to_send, sent_on);
    Ok(step.wake_at)
}

/// The hosts of `r` waiting on a message that have a release session here it was not sent
/// on yet: (host, seq). Every awaited message goes into `awaited`.
fn awaiting(
    ctl: &Controller,
    r: &Rollout,
    sent_on: &SentOn,
    awaited: &mut HashSet<(AgentId, String, u64)>,
) -> Vec<(AgentId, u64)> {
    let mut to_send = Vec::new();
    for h in r.hosts() {
        let Some(seq) = h.state.awaited_seq() else { continue };
        let key = (h.id.clone(), r.app.clone(), seq);
        awaited.insert(key.clone());
        let session = ctl.fleet.release_session(&h.id);
        if session.is_some() && sent_on.get(&key) != session.as_ref() {
            to_send.push((h.id.clone(), seq));
        }
    }
    to_send
}

/// Every host waiting on a message gets it once per session (again after a reconnect or a
/// controller restart: the same seq, so an agent that applied it changes nothing).
fn send(ctl: &Controller, r: &Rollout, to_send: Vec<(AgentId, u64)>, sent_on: &mut SentOn) {
    for (host, seq) in to_send {
        let Some(m) = r.message_for(seq, &host) else { continue };
        if let Some(token) = ctl.fleet.send_release_on(&host, ReleaseDown::Activate(m.message.clone())) {
            sent_on.insert((host, r.app.clone(), seq), token);
        }
    }
}

/// Hands the agents connected here the messages of a rollout another controller drives
/// (its record holds them, durable in the shared state before it is seen here).
fn deliver(ctl: &Controller, r: &Rollout, sent_on: &mut SentOn, awaited: &mut HashSet<(AgentId, String, u64)>) {
    let to_send = awaiting(ctl, r, sent_on, awaited);
    send(ctl, r, to_send, sent_on);
}

/// A rollout succeeded: its version is the environment's released version (catch-up brings
/// skipped and new agents to it) and its digest is promoted from this environment.
fn complete(ctl: &Controller, r: &Rollout) -> Result<Ends> {
    let previous = ctl.store.desired(&r.env, &r.app)?;
    let history = crate::plan::fleet::next_history(
        previous.as_ref().map(|p| p.history.as_slice()).unwrap_or_default(),
        previous.as_ref().map(|p| p.version.as_str()),
        &r.version,
        r.kind == Kind::Rollback,
    );
    let targets: Vec<AgentId> = r.hosts().map(|h| h.id.clone()).collect();
    let (seq, mut parts) = match r.last_wave_message() {
        Some(last) => last,
        None => {
            // Every host was skipped: a message for all of them, for catch-up to hand out.
            let seq = ctl.store.next_seq(&r.app)?;
            let all: Vec<AgentId> = r.skipped.iter().map(|h| h.id.clone()).chain(targets.clone()).collect();
            let approved = crate::policy::approved(r);
            (
                seq,
                sign(
                    ctl,
                    &r.app,
                    &r.version,
                    r.digest,
                    &r.env,
                    parts(&all),
                    seq,
                    &r.id,
                    0,
                    r.ttl_secs,
                    r.traffic,
                    approved,
                )?,
            )
        }
    };
    let message = parts.remove(0);
    Ok(Ends {
        desired: Some(DesiredRecord {
            v: crate::store::DESIRED_VERSION,
            version: r.version.clone(),
            digest: r.digest,
            seq,
            message,
            more: parts,
            targets,
            history,
            selectors: r.selectors.clone(),
            since_seq: r.messages.first().map_or(seq, |m| m.seq),
            owed: vec![],
        }),
        // Promotion needs the artifact to have run somewhere here, not only a rollout of skips.
        promoted: r.hosts().any(|h| h.state == crate::plan::rollout::HostState::Committed),
    })
}

/// A rollout that failed or was aborted left hosts on its version: the environment's
/// released version is owed to them (catch-up brings them back when they return).
fn owe(ctl: &Controller, r: &Rollout) -> Result<Ends> {
    let stranded: Vec<AgentId> = r
        .hosts()
        .filter(|h| matches!(h.state, crate::plan::rollout::HostState::NotReverted(_)))
        .map(|h| h.id.clone())
        .collect();
    let Some(mut desired) = ctl.store.desired(&r.env, &r.app)?.filter(|_| !stranded.is_empty()).map(|d| (*d).clone())
    else {
        return Ok(Ends::default());
    };
    for id in stranded {
        if !desired.owed.contains(&id) {
            desired.owed.push(id);
        }
    }
    Ok(Ends { desired: Some(desired), promoted: false })
}

/// Cuts `s` to at most `limit` bytes (at a character boundary), marking the cut.
pub fn truncate(s: &mut String, limit: usize) {
    if s.len() > limit {
        let cut = (0..=limit).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
        s.push('…');
    }
}

/// Brings every agent of `env` that is behind to its released version, after a rollout
/// ended (hosts it skipped, or a host a failed rollout could not put back).
/// The caller holds the rollout lock. One agent's failure does not hold up the others.
fn catch_up_env(ctl: &Controller, env: &str) {
    let agents = match ctl.store.agents_in(env) {
        Ok(a) => a,
        Err(e) => {
            warn!(%env, error = %e, "Cannot list agents to catch up.");
            return;
        }
    };
    for a in agents {
        if let Err(e) = crate::release::catch_up_holding_lock(ctl, &a.id, false, false) {
            warn!(agent = %a.id, error = %format!("{e:#}"), "Catch-up failed; it is tried again when the agent reconnects.");
        }
    }
}
