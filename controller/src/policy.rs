//! Release policy on the controller (SPEC §14): what each environment's policy says and where
//! each setting comes from; the policy signed for agents (a new serial whenever it changes,
//! with the approvals a loosening needs); approvals and rejections of rollouts; freezes,
//! release windows and `[verify]` results; previews. Agents enforce approvals and
//! verification themselves (`common::policy`): what is decided here only saves an operator
//! from a release that agents would refuse.

use crate::plan::rollout::{Rollout, State};
use crate::plan::window::{self, Window};
use crate::release::Refused;
use crate::server::Controller;
use crate::store::{FreezeRecord, PolicyRecord};
use anyhow::Result;
use stagehand_common::ids::now_secs;
use stagehand_common::policy::{self, Approval, Approver, Plan, Policy};
use stagehand_common::protocol::{AdminResponse, FreezeView, PolicyView, ReleaseDown, Setting, ToSign};
use tracing::{info, warn};

/// An environment's policy settings, each with where it comes from.
pub struct Settings {
    pub approvals: (u32, String),
    pub windows: (Vec<Window>, String),
    pub verify: (bool, String),
}

/// What controller.toml says of `env`'s policy.
pub fn settings(ctl: &Controller, env: &str) -> Settings {
    let cfg = ctl.config.environments.envs.get(env);
    let from = |set: bool| {
        if set {
            format!("controller.toml [environments.{env}]")
        } else {
            "default".to_string()
        }
    };
    let approvals = cfg.and_then(|c| c.approvals);
    let windows = cfg.and_then(|c| c.windows.clone());
    let verify = cfg.and_then(|c| c.verify);
    Settings {
        approvals: (approvals.unwrap_or(0), from(approvals.is_some())),
        // Checked when the config was loaded.
        windows: (
            window::parse_all(windows.as_deref().unwrap_or_default()).unwrap_or_default(),
            from(windows.is_some()),
        ),
        verify: (verify.unwrap_or(false), from(verify.is_some())),
    }
}

/// The identities whose approvals count in `env`: owners and the environment's releasers,
/// not revoked, with an approval key.
pub fn approvers(ctl: &Controller, env: &str) -> Result<Vec<Approver>> {
    let mut out = Vec::new();
    for a in ctl.store.admins()? {
        let may = a.role == "owner" || (a.role == "releaser" && (a.envs.is_empty() || a.envs.iter().any(|e| e == env)));
        if a.revoked || !may {
            continue;
        }
        if let Some(key) = ctl.store.approval_key(&a.name)? {
            out.push(Approver { name: a.name, key });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The terms the policy of `env` should have now (no serial, key or time).
fn wanted(ctl: &Controller, env: &str) -> Result<Policy> {
    let s = settings(ctl, env);
    Ok(Policy { approvals: s.approvals.0, verify: s.verify.0, approvers: approvers(ctl, env)?, ..Policy::none(env) })
}

fn same_terms(a: &Policy, b: &Policy) -> bool {
    a.approvals == b.approvals && a.verify == b.verify && a.approvers == b.approvers
}

/// Whether agents enforcing the record's base take its policy (a loosening carries the
/// base's approvals).
pub fn complete(r: &PolicyRecord) -> bool {
    // Not its signature: one made with a release key retired since took all the same.
    policy::decode_unverified(&r.signed).is_some_and(|p| {
        let (have, need) = policy::approved_over(&r.base, &p, &r.signed);
        have >= need
    })
}

/// Every environment the controller knows: configured, or with agents.
pub fn environments(ctl: &Controller) -> Result<Vec<String>> {
    let mut envs: Vec<String> = ctl.config.environments.envs.keys().cloned().collect();
    envs.extend(ctl.store.agents()?.into_iter().filter(|a| !a.revoked).map(|a| a.env));
    envs.sort();
    envs.dedup();
    Ok(envs)
}

/// Signs a new policy for `env` when what it should say has changed, and sends it to the
/// environment's agents connected here. An environment that never required anything gets
/// no policy until it does.
pub fn sync(ctl: &Controller, env: &str) -> Result<Option<PolicyRecord>> {
    let want = wanted(ctl, env)?;
    loop {
        let current = ctl.store.policy(env)?;
        let signed = current.as_ref().and_then(|r| policy::decode_unverified(&r.signed));
        match (&current, &signed) {
            (None, _) if want.approvals == 0 && !want.verify => return Ok(None),
            // Signed by the current release key, too (after a rotation it is signed again).
            (Some(_), Some(p)) if same_terms(p, &want) && p.key_id == ctl.release_keys[0].key_id => return Ok(current),
            _ => {}
        }
        // The policy agents enforce, as far as is known: a loosening still short of its
        // approvals never took, so the next is measured against what came before it.
        let base = match (&current, &signed) {
            (Some(r), Some(p)) if complete(r) => p.clone(),
            (Some(r), _) => r.base.clone(),
            (None, _) => Policy::none(env),
        };
        if !want.well_formed() {
            // Agents would take it and then no release could ever be approved, nor the policy
            // changed again: it is not signed (`policy show` says why).
            warn!(%env, approvals = want.approvals, approvers = want.approvers.len(), "{}", unmeetable(env, &want));
            return Ok(current);
        }
        let serial = signed.as_ref().map_or(0, |p| p.serial) + 1;
        let new = Policy { serial, at: now_secs(), ..want.clone() };
        // The chain agents walk: every policy that took, the newest last.
        let mut chain = current.as_ref().map(|r| r.chain.clone()).unwrap_or_default();
        if let Some(r) = current.as_ref().filter(|r| complete(r)) {
            chain.push(r.signed.clone());
        }
        let drop = chain.len().saturating_sub(crate::store::POLICY_CHAIN);
        chain.drain(..drop);
        let record = PolicyRecord {
            v: 1,
            signed: policy::sign(new.clone(), &ctl.release_key),
            base: base.clone(),
            chain,
            at: crate::rollout::now_ms(),
        };
        if !ctl.store.swap_policy(env, current.as_ref(), &record)? {
            continue;
        }
        ctl.store.flush()?;
        let loosens = base.loosened_by(&new);
        let args = serde_json::json!({ "env": env, "serial": serial, "approvals": new.approvals, "verify": new.verify,
            "approvers": new.approvers.iter().map(|a| &a.name).collect::<Vec<_>>(), "loosens": loosens });
        ctl.audit.record("controller", "policy-signed", args, "ok")?;
        if loosens && base.approvals > 0 {
            warn!(%env, serial, needs = base.approvals, "The release policy asks less than before: agents take it once approved (stagehand approve {}).", policy_id(env, serial));
        } else {
            info!(%env, serial, approvals = new.approvals, verify = new.verify, "Release policy signed.");
        }
        push(ctl, env, &record)?;
        return Ok(Some(record));
    }
}

/// Why a policy cannot be met, for the log and `policy show`.
fn unmeetable(env: &str, p: &Policy) -> String {
    format!(
        "{env} requires {} approval(s) and {} identit(ies) can approve there (owners and its releasers with an approval \
         key); the policy is not signed until there are enough: stagehand admin add NAME --role releaser --env {env} \
         --out DIR, or stagehand admin approval-key (run by an owner or releaser)",
        p.approvals,
        p.approvers.len()
    )
}

/// What agents enforce as far as is known: the newest policy if it took, else its base.
pub fn enforced(r: &PolicyRecord) -> Policy {
    match policy::decode_unverified(&r.signed) {
        Some(p) if complete(r) => p,
        _ => r.base.clone(),
    }
}

/// The chain of earlier policies that took, then the newest: what agents walk.
pub fn chain(r: &PolicyRecord) -> Vec<policy::SignedPolicy> {
    r.chain.iter().chain(std::iter::once(&r.signed)).cloned().collect()
}

/// What an agent of `env` is sent: [`chain`], as messages.
pub fn messages(r: &PolicyRecord) -> Vec<ReleaseDown> {
    chain(r).into_iter().map(ReleaseDown::Policy).collect()
}

/// [`sync`] for every environment; an error in one does not stop the others.
pub fn sync_all(ctl: &Controller) -> Result<()> {
    let mut failed = None;
    for env in environments(ctl)? {
        if let Err(e) = sync(ctl, &env) {
            warn!(%env, error = %format!("{e:#}"), "Cannot sign the release policy.");
            failed = Some(e);
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Sends a policy to the environment's agents connected here, unless it was sent already
/// (a newly connected agent gets it when its release channel opens).
pub fn push(ctl: &Controller, env: &str, record: &PolicyRecord) -> Result<()> {
    let digest = stagehand_common::Digest::of(&stagehand_common::frame::encode(&record.signed));
    if ctl.policy_sent.lock().unwrap_or_else(|p| p.into_inner()).insert(env.to_string(), digest) == Some(digest) {
        return Ok(());
    }
    for id in ctl.fleet.agents() {
        if ctl.store.agent(&id)?.is_some_and(|a| a.env == env) {
            for m in messages(record) {
                ctl.fleet.send_release(&id, m);
            }
        }
    }
    Ok(())
}

/// The id an operator approves a policy change by.
pub fn policy_id(env: &str, serial: u64) -> String {
    format!("policy-{env}-{serial}")
}

/// The environment and serial a policy change's id names.
pub fn parse_policy_id(id: &str) -> Option<(String, u64)> {
    let rest = id.strip_prefix("policy-")?;
    let (env, serial) = rest.rsplit_once('-')?;
    Some((env.to_string(), serial.parse().ok()?))
}

/// The plan approvers of a rollout sign.
pub fn plan_of(r: &Rollout) -> Plan {
    Plan {
        app: r.app.clone(),
        version: r.version.clone(),
        digest: r.digest,
        env: r.env.clone(),
        rollout_id: r.id.clone(),
        requester: r.requested_by.clone(),
        targets: r.gate.plan_targets,
        hosts: r.gate.plan_hosts,
    }
}

/// What a rollout's wave messages carry of its approvals.
pub fn approved(r: &Rollout) -> Option<policy::Approved> {
    (!r.gate.approvals.is_empty()).then(|| policy::Approved {
        rollout_id: r.id.clone(),
        requester: r.requested_by.clone(),
        targets: r.gate.plan_targets,
        hosts: r.gate.plan_hosts,
        approvals: r
            .gate
            .approvals
            .iter()
            .map(|a| Approval { approver: a.by.clone(), signature: a.signature.clone() })
            .collect(),
    })
}

fn refused(message: impl Into<String>, hint: impl Into<String>) -> AdminResponse {
    Refused { message: message.into(), hint: hint.into() }.into()
}

/// What approving `id` signs, described for the approver.
pub fn to_approve(ctl: &Controller, id: &str, who: &str) -> Result<AdminResponse> {
    if let Some((env, serial)) = parse_policy_id(id) {
        let Some(r) = ctl.store.policy(&env)? else {
            return Ok(refused(format!("no release policy was signed for {env}"), "stagehand policy show"));
        };
        let Some(p) = policy::decode_unverified(&r.signed).filter(|p| p.serial == serial) else {
            return Ok(refused(format!("{id} is not the newest policy of {env}"), "stagehand policy show --env ENV"));
        };
        let names = |p: &Policy| p.approvers.iter().map(|a| a.name.clone()).collect::<Vec<_>>().join(", ");
        let describe = vec![
            format!("policy {serial} of {env}: {} approval(s) from [{}], verify {}", p.approvals, names(&p), p.verify),
            format!("replaces: {} approval(s) from [{}], verify {}", r.base.approvals, names(&r.base), r.base.verify),
        ];
        return Ok(AdminResponse::ToApprove {
            id: id.to_string(),
            describe,
            sign: ToSign::Policy(r.signed.body),
            you: who.to_string(),
        });
    }
    let Some(r) = ctl.store.rollout(id)? else {
        return Ok(refused(format!("no rollout {id}"), "stagehand rollout list"));
    };
    let plan = plan_of(&r);
    let names: Vec<&str> = r.hosts().chain(r.skipped.iter()).map(|h| h.name.as_str()).take(20).collect();
    let describe = vec![
        format!("rollout {}: release {} {} ({}) to {}", r.id, r.app, r.version, r.digest.short(), r.env),
        format!("requested by {}", r.requested_by),
        format!(
            "{} target(s): {}{}",
            plan.targets,
            names.join(", "),
            if plan.targets as usize > names.len() { ", …" } else { "" }
        ),
    ];
    Ok(AdminResponse::ToApprove { id: id.to_string(), describe, sign: ToSign::Plan(plan), you: who.to_string() })
}

/// Records an approval of a rollout or a policy change by `who`, whose signature it is.
pub fn approve(ctl: &Controller, id: &str, who: &str, approval: Approval) -> Result<AdminResponse> {
    if approval.approver != who {
        return Ok(refused(
            format!("the approval is signed as {}, and the request comes from {who}", approval.approver),
            "approve with your own credentials: stagehand approve ID",
        ));
    }
    if let Some((env, serial)) = parse_policy_id(id) {
        return approve_policy(ctl, &env, serial, id, who, approval);
    }
    let Some(key) = ctl.store.approval_key(who)? else {
        return Ok(refused(
            format!("{who} has no approval key"),
            "stagehand admin approval-key (with that identity's credentials); `controller init`'s admin has none",
        ));
    };
    // Only an approver of the policy agents enforce counts there.
    let mut enforced = None;
    if let Some(r) = ctl.store.rollout(id)? {
        enforced = ctl.store.policy(&r.env)?.map(|p| self::enforced(&p));
    }
    let changed = crate::rollout::change(ctl, id, who, |r| {
        let no = |why: String, hint: String| Refused { message: why, hint };
        if !policy::plan_approval_verifies(&plan_of(r), &key, &approval) {
            return Err(no(
                format!("the approval does not verify under {who}'s approval key for the plan of {id}"),
                format!("stagehand approve {id}   (with the credentials directory {who} was issued)"),
            ));
        }
        if r.state == State::AwaitingApproval
            && !enforced.as_ref().is_some_and(|p| p.approvers.iter().any(|a| a.name == who && a.key == key))
        {
            return Err(no(
                format!(
                    "{who} is not an approver in {}'s release policy (owners and the environment's releasers are)",
                    r.env
                ),
                "stagehand policy show --env ENV".into(),
            ));
        }
        r.approve(who, approval.signature.clone(), crate::rollout::now_ms())
            .map_err(|why| no(why, format!("stagehand rollout status {id}")))
    })?;
    Ok(crate::admin::started(changed))
}

fn approve_policy(
    ctl: &Controller,
    env: &str,
    serial: u64,
    id: &str,
    who: &str,
    approval: Approval,
) -> Result<AdminResponse> {
    loop {
        let Some(before) = ctl.store.policy(env)? else {
            return Ok(refused(format!("no release policy was signed for {env}"), "stagehand policy show"));
        };
        if policy::decode_unverified(&before.signed).is_none_or(|p| p.serial != serial) {
            return Ok(refused(format!("{id} is not the newest policy of {env}"), "stagehand policy show --env ENV"));
        }
        let need = before.base.approvals;
        if complete(&before) {
            return Ok(AdminResponse::PolicyApproved { id: id.to_string(), have: need, need });
        }
        let Some(key) = before.base.approvers.iter().find(|a| a.name == who).map(|a| a.key) else {
            return Ok(refused(
                format!(
                    "{who} is not an approver of the policy {env}'s agents enforce; only its approvers can loosen it"
                ),
                "stagehand policy show --env ENV",
            ));
        };
        if !policy::policy_approval_verifies(&before.signed.body, &key, &approval) {
            return Ok(refused(
                format!("the approval does not verify under {who}'s approval key for {id}"),
                format!("stagehand approve {id}   (with the credentials directory {who} was issued)"),
            ));
        }
        if before.signed.approvals.iter().any(|a| a.approver == who) {
            return Ok(refused(
                format!("{who} has already approved {id}; an identity counts once"),
                "stagehand policy show",
            ));
        }
        let mut r = before.clone();
        r.signed.approvals.push(approval.clone());
        r.at = crate::rollout::now_ms();
        if !ctl.store.swap_policy(env, Some(&before), &r)? {
            continue;
        }
        ctl.store.flush()?;
        let have = r.signed.approvals.len() as u32;
        info!(%env, serial, by = %who, have, need, "Release policy change approved.");
        push(ctl, env, &r)?;
        return Ok(AdminResponse::PolicyApproved { id: id.to_string(), have: have.min(need), need });
    }
}

/// Ends a rollout awaiting approval or a window.
pub fn reject(ctl: &Controller, id: &str, who: &str, reason: &str) -> Result<AdminResponse> {
    if reason.len() > REASON_LIMIT {
        return Ok(refused(format!("the reason is longer than {REASON_LIMIT} bytes"), "say it shorter"));
    }
    let changed = crate::rollout::change(ctl, id, who, |r| {
        r.reject(who, reason, crate::rollout::now_ms())
            .map_err(|why| Refused { message: why, hint: format!("stagehand rollout status {id}") })
    })?;
    Ok(crate::admin::started(changed))
}

/// The freeze of `env` in force at `now`, if any.
pub fn frozen(ctl: &Controller, env: &str, now: u64) -> Result<Option<FreezeRecord>> {
    Ok(ctl.store.freeze(env)?.filter(|f| f.until == 0 || f.until > now))
}

pub fn freeze_view(f: &FreezeRecord) -> FreezeView {
    FreezeView { reason: f.reason.clone(), by: f.by.clone(), at: f.at, until: f.until }
}

/// Why a release to `env` cannot start now because of a freeze, for the operator.
pub fn frozen_why(env: &str, f: &FreezeRecord) -> String {
    let until = if f.until == 0 {
        "until unfrozen".to_string()
    } else {
        format!(
            "until {}",
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(f.until.min(LATEST))
            )
        )
    };
    format!("{env} is frozen {until} by {} ({}); releases do not start, rollbacks do", f.by, f.reason)
}

/// The latest time a freeze may end at (9999-12-31): times print, and add, without overflow.
pub const LATEST: u64 = 253_402_300_799;
/// The longest reason kept (freeze, reject), in bytes.
pub const REASON_LIMIT: usize = 1024;

pub fn freeze(ctl: &Controller, env: &str, until: u64, reason: &str, who: &str) -> Result<AdminResponse> {
    if reason.trim().is_empty() || reason.len() > REASON_LIMIT {
        return Ok(refused(
            format!("a freeze needs a reason of 1 to {REASON_LIMIT} bytes"),
            format!("stagehand freeze --env {env} --reason TEXT"),
        ));
    }
    if until > LATEST {
        return Ok(refused(
            "--until is after 9999-12-31",
            format!("stagehand freeze --env {env} --reason TEXT   (without --until: until unfrozen)"),
        ));
    }
    if until != 0 && until <= now_secs() {
        return Ok(refused(
            "--until is in the past",
            format!("stagehand freeze --env {env} --until +2h --reason TEXT"),
        ));
    }
    let f = FreezeRecord { v: 1, reason: reason.to_string(), by: who.to_string(), at: now_secs(), until };
    ctl.store.put_freeze(env, Some(&f))?;
    ctl.store.flush()?;
    info!(%env, by = %who, until, reason, "Environment frozen.");
    ctl.fleet.bump();
    Ok(AdminResponse::Frozen { env: env.to_string(), freeze: Some(freeze_view(&f)) })
}

pub fn unfreeze(ctl: &Controller, env: &str, who: &str) -> Result<AdminResponse> {
    let Some(f) = ctl.store.freeze(env)? else {
        return Ok(refused(format!("{env} is not frozen"), "stagehand policy show --env ENV"));
    };
    // A freeze is lifted by whoever froze, or an owner: not by any releaser it holds back.
    let owner = ctl.store.admin(who)?.is_some_and(|a| a.role == "owner");
    if f.by != who && !owner {
        return Ok(refused(
            format!("{env} was frozen by {}; only they or an owner can unfreeze it", f.by),
            format!("ask {} or an owner: stagehand unfreeze --env {env}", f.by),
        ));
    }
    ctl.store.put_freeze(env, None)?;
    ctl.store.flush()?;
    info!(%env, by = %who, "Environment unfrozen.");
    ctl.fleet.bump();
    Ok(AdminResponse::Frozen { env: env.to_string(), freeze: None })
}

/// A rollout waiting for its window, due now: it stays while the environment is frozen or
/// outside every window (a controller that was down through the window waits for the next),
/// and is let go otherwise.
pub fn hold_for_window(ctl: &Controller, r: &mut Rollout, now_ms: u64) -> Result<()> {
    if r.state != State::AwaitingWindow || r.gate.window_opens.is_some_and(|t| t * 1000 > now_ms) {
        return Ok(());
    }
    // A rollback (one that needed approvals) is never held by a window or a freeze.
    if r.kind == crate::plan::rollout::Kind::Rollback {
        r.gate.window_opens = Some(0);
        return Ok(());
    }
    let now = now_ms / 1000;
    let windows = settings(ctl, &r.env).windows.0;
    if let Some(f) = frozen(ctl, &r.env, now)? {
        let after = if f.until == 0 { now + 30 } else { f.until };
        let at = window::wait_until(&windows, after as i64).map_or(after, |t| t.max(0) as u64);
        r.gate.window_opens = Some(at.max(now + 1));
        r.reason = frozen_why(&r.env, &f);
        return Ok(());
    }
    match window::wait_until(&windows, now as i64) {
        Some(t) => {
            r.gate.window_opens = Some((t.max(0) as u64).max(now + 1));
            r.reason = format!("waits for the release window opening {}", window::describe(&windows, t));
        }
        None => {
            r.gate.window_opens = Some(0);
            r.reason.clear();
        }
    }
    Ok(())
}

/// `policy show`: each environment's settings and where they come from, the policy signed
/// for agents and what they enforce.
pub fn show(ctl: &Controller, env: Option<&str>) -> Result<AdminResponse> {
    let envs = match env {
        Some(e) => vec![e.to_string()],
        None => environments(ctl)?,
    };
    let mut out = Vec::new();
    let agents = ctl.store.agents()?;
    for env in envs {
        let s = settings(ctl, &env);
        let cfg = ctl.config.environments.get(&env);
        let configured = ctl.config.environments.envs.contains_key(&env);
        let from =
            |set: bool| if set { format!("controller.toml [environments.{env}]") } else { "default".to_string() };
        let with_agents: std::collections::HashSet<String> =
            agents.iter().filter(|a| !a.revoked).map(|a| a.env.clone()).collect();
        let promotion = crate::plan::fleet::promoted_from(&ctl.config.environments.order, &with_agents, &env)
            .map_or("none (first with agents, or not in the order)".to_string(), |p| format!("after {p}"));
        let mut settings = vec![
            Setting { name: "approvals".into(), value: s.approvals.0.to_string(), source: s.approvals.1 },
            Setting {
                name: "windows".into(),
                value: if s.windows.0.is_empty() {
                    "any time".into()
                } else {
                    s.windows.0.iter().map(|w| w.text().to_string()).collect::<Vec<_>>().join("; ")
                },
                source: s.windows.1,
            },
            Setting { name: "verify".into(), value: s.verify.0.to_string(), source: s.verify.1 },
            Setting {
                name: "promotion".into(),
                value: promotion,
                source: "controller.toml [environments] order (default dev, test, staging, prod)".into(),
            },
        ];
        for (name, value) in [
            ("waves", cfg.waves.clone()),
            ("bake", cfg.bake.map(|b| humantime::format_duration(b).to_string())),
            ("max_unhealthy", cfg.max_unhealthy.clone()),
        ] {
            let set = value.is_some();
            settings.push(Setting {
                name: name.into(),
                value: value.unwrap_or_else(|| match name {
                    "waves" => "one wave".into(),
                    "bake" => "0s".into(),
                    _ => "0".into(),
                }),
                source: from(set && configured),
            });
        }
        let want = wanted(ctl, &env)?;
        if !want.well_formed() {
            settings.push(Setting { name: "problem".into(), value: unmeetable(&env, &want), source: String::new() });
        }
        let record = ctl.store.policy(&env)?;
        let signed = record.as_ref().and_then(|r| policy::decode_unverified(&r.signed));
        let pending = match (&record, &signed) {
            (Some(r), Some(p)) if !complete(r) => {
                Some((policy_id(&env, p.serial), r.signed.approvals.len() as u32, r.base.approvals))
            }
            _ => None,
        };
        let mut per_agent = Vec::new();
        for a in agents.iter().filter(|a| a.env == env && !a.revoked) {
            let p = ctl.store.agent_policy(&a.id)?.unwrap_or_default();
            let refused = p.refused.map(|(serial, why)| format!("refused policy {serial}: {why}")).unwrap_or_default();
            per_agent.push((a.name.clone(), p.serial, p.approvals, refused));
        }
        out.push(PolicyView {
            env: env.clone(),
            settings,
            freeze: frozen(ctl, &env, now_secs())?.as_ref().map(freeze_view),
            serial: signed.as_ref().map_or(0, |p| p.serial),
            approvers: record
                .as_ref()
                .map(|r| enforced(r).approvers.into_iter().map(|a| a.name).collect())
                .unwrap_or_default(),
            pending,
            agents: per_agent,
        });
    }
    Ok(AdminResponse::Policies { envs: out })
}

/// Starts `version` of `app` beside the live one on every traffic-mode host of `env` that is
/// connected here (or, with no version, stops the preview), and waits for their answers.
pub async fn preview(ctl: &Controller, app: &str, env: &str, version: Option<String>) -> Result<AdminResponse> {
    for (kind, v) in [("app", app), ("environment", env)].into_iter().chain(version.as_deref().map(|v| ("version", v)))
    {
        if let Err(e) = stagehand_common::ids::check_name(kind, v) {
            return Ok(refused(e, "fix the name and run the command again"));
        }
    }
    let digest = match &version {
        Some(v) => match ctl.store.artifact(app, v)? {
            Some(a) => Some(a.digest),
            None => {
                return Ok(refused(format!("{app} {v} has not been pushed"), format!("stagehand push {app} {v} PATH")))
            }
        },
        None => None,
    };
    let agents = ctl.store.agents_in(env)?;
    if agents.is_empty() {
        return Ok(refused(format!("environment {env:?} has no agents"), "stagehand agents list"));
    }
    if version.is_some() && settings(ctl, env).approvals.0 > 0 {
        return Ok(refused(
            format!(
                "{env} requires approvals, and a preview runs code nobody approved on its hosts (agents refuse it too)"
            ),
            "preview it in an earlier environment: stagehand preview APP VERSION --env staging",
        ));
    }
    let request = policy::Preview {
        app: app.to_string(),
        version: version.clone(),
        digest,
        env: env.to_string(),
        expires_at: now_secs() + 300,
        key_id: String::new(),
    };
    let signed = policy::sign_preview(request, &ctl.release_key);
    let sent_at = crate::rollout::now_ms();
    let mut changes = ctl.fleet.subscribe();
    let mut hosts = Vec::new();
    for a in &agents {
        let sent = ctl.fleet.send_release(&a.id, ReleaseDown::Preview(signed.clone()));
        hosts.push((a, sent));
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let answered =
            |a: &crate::store::AgentRecord| ctl.store.preview(&a.id, app).ok().flatten().filter(|p| p.at >= sent_at);
        if hosts.iter().all(|(a, sent)| !sent || answered(a).is_some()) || tokio::time::Instant::now() >= deadline {
            let out = hosts
                .iter()
                .map(|(a, sent)| {
                    let what = match (sent, answered(a)) {
                        (false, _) => "not connected to this controller; not asked".to_string(),
                        (true, None) => "no answer within 60 s".to_string(),
                        (true, Some(p)) => p.detail,
                    };
                    (a.name.clone(), what)
                })
                .collect();
            return Ok(AdminResponse::Previews { hosts: out });
        }
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
}

/// Why a release to `env` may not start now (a freeze, outside every window), if so.
pub fn holds_release(ctl: &Controller, env: &str) -> Result<Option<String>> {
    let now = now_secs();
    if let Some(f) = frozen(ctl, env, now)? {
        return Ok(Some(frozen_why(env, &f)));
    }
    let windows = settings(ctl, env).windows.0;
    Ok(window::wait_until(&windows, now as i64)
        .map(|t| format!("{env} is outside its release windows; the next opens {}", window::describe(&windows, t))))
}

/// `policy reset`: the environment's policy signed anew, with no chain and nothing before it.
/// Agents that enforce a policy refuse it as any loosening (it carries no approvals); one whose
/// `identity/policy` was removed on the host (every approver's key lost) takes it.
pub fn reset(ctl: &Controller, env: &str, who: &str) -> Result<AdminResponse> {
    let want = wanted(ctl, env)?;
    if !want.well_formed() {
        return Ok(refused(unmeetable(env, &want), "stagehand policy show --env ENV"));
    }
    let current = ctl.store.policy(env)?;
    let serial = current.as_ref().and_then(|r| policy::decode_unverified(&r.signed)).map_or(0, |p| p.serial) + 1;
    let new = Policy { serial, at: now_secs(), ..want };
    let record = PolicyRecord {
        v: 1,
        signed: policy::sign(new, &ctl.release_key),
        base: Policy::none(env),
        chain: vec![],
        at: crate::rollout::now_ms(),
    };
    if !ctl.store.swap_policy(env, current.as_ref(), &record)? {
        return Ok(refused("the policy changed meanwhile", format!("stagehand policy reset --env {env}")));
    }
    ctl.store.flush()?;
    warn!(%env, serial, by = %who, "Release policy reset: only agents that enforce none take it.");
    push(ctl, env, &record)?;
    show(ctl, Some(env))
}
