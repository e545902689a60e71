//! Applying an activate message: the rules of SPEC §4 (`common::activate::check`), then
//! durable intent → pre-activate hook → atomic switch → post-activate hook → health check
//! → commit, or switch back by itself. One activation at a time per app.

use crate::failpoint;
use crate::hooks::{self, ArtifactConfig};
use crate::host::{Host, Layout};
use crate::journal::{Intent, Journal};
use stagehand_common::activate::{self, Activate, AgentView, Refusal, SignedActivate, Verdict};
use stagehand_common::fsx;
use stagehand_common::ids::{check_name, now_secs};
use stagehand_common::protocol::{Receipt, ReceiptOutcome};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tracing::{error, info, warn};

/// Handles one message and returns the receipt (also kept in the journal when it changed
/// anything, and sent to the controller when the release channel is up).
pub async fn handle(host: &Arc<Host>, msg: SignedActivate) -> Receipt {
    let started = Instant::now();
    // One activation at a time per app: one app's slow health check holds back no other.
    let app = Activate::decode_unverified(&msg.body).map(|b| b.app).unwrap_or_default();
    let lock = host.activation(&app);
    let _one_at_a_time = lock.lock().await;
    let before = host.layout.active(&app);
    let receipt = apply(host, &msg, started).await;
    host.metrics.receipt(&receipt);
    if receipt.outcome == ReceiptOutcome::Committed {
        // What ran here, with the content it ran with (the version before too: it may have
        // been made live by an agent of before release policy).
        for v in before.iter().chain(std::iter::once(&receipt.version)) {
            let digest = host.store.staged(&app, v).ok().flatten().map(|r| r.digest);
            if let Err(e) = digest.map_or(Ok(()), |d| host.store.add_ran(&app, v, &d)) {
                warn!(error = %e, "Could not record the version that ran.");
            }
        }
        // A version without a service replaced one with: the services stop.
        crate::switch::leave_service_mode(host, &receipt.app, &receipt.version);
    }
    host.send_release(stagehand_common::protocol::ReleaseUp::Receipt(receipt.clone()));
    receipt
}

/// A receipt for a message answered before (or without) its intent being recorded:
/// `applied` says whether this seq is now the agent's last applied one.
fn receipt(host: &Host, body: Option<&Activate>, outcome: ReceiptOutcome, started: Instant, applied: bool) -> Receipt {
    let app = body.map(|b| b.app.clone()).unwrap_or_default();
    Receipt {
        agent_id: host.identity.id.clone(),
        active: if app.is_empty() { None } else { host.layout.active(&app) },
        app,
        version: body.map(|b| b.version.clone()).unwrap_or_default(),
        seq: body.map_or(0, |b| b.seq),
        outcome,
        log: String::new(),
        check_us: started.elapsed().as_micros() as u64,
        switch_us: 0,
        total_us: started.elapsed().as_micros() as u64,
        at: now_secs(),
        applied,
    }
}

/// What the checks decided. Built once per message and moved, never stored: size is fine.
#[allow(clippy::large_enum_variant)]
enum Prepared {
    /// Answer now (refused, replayed, scheduled).
    Answer(Receipt),
    /// Go ahead: the intent is durable.
    Go { body: Activate, journal: Journal, previous: Option<String>, check_us: u64 },
}

/// The rules, then the durable intent: synchronous file work, run off the async threads.
fn prepare(host: &Host, msg: &SignedActivate, started: Instant) -> Prepared {
    // A refusal, with what the operator should know (the receipt's log) when there is more
    // to say than its code.
    let refuse_why = |body: Option<&Activate>, r: Refusal, why: String| {
        let desc =
            body.map(|b| format!("{} {} seq {}", b.app, b.version, b.seq)).unwrap_or_else(|| "undecodable".into());
        warn!(message = %desc, reason = %r, %why, "Refused an activate message.");
        Prepared::Answer(Receipt { log: why, ..receipt(host, body, ReceiptOutcome::Refused(r), started, false) })
    };
    let refuse = |body: Option<&Activate>, r: Refusal| refuse_why(body, r, String::new());
    // Rule 1, before anything else is read from the message.
    let body = match activate::verify(msg, &host.release_keys()) {
        Ok(b) => b,
        Err(r) => return refuse(Activate::decode_unverified(&msg.body).as_ref(), r),
    };
    if check_name("app", &body.app).is_err() || check_name("version", &body.version).is_err() {
        return refuse(Some(&body), Refusal::Malformed);
    }
    let layout = &host.layout;
    if let Err(why) = layout.check_root(&body.app) {
        return refuse_why(Some(&body), Refusal::HostError, why);
    }
    let journal_path = layout.journal(&body.app);
    let mut journal = match Journal::load(&journal_path) {
        Ok(j) => j,
        Err(e) => {
            error!(error = %format!("{e:#}"), "Cannot read the activation journal.");
            return refuse(Some(&body), Refusal::HostError);
        }
    };
    // `current` exists, so this app was activated, and its journal is gone: the last applied
    // seq is unknown, and an old message could take the host back. Fail closed.
    // (An empty or zeroed file holds no seq either.)
    if journal.last_seq.is_none() && std::fs::symlink_metadata(layout.current(&body.app)).is_ok() {
        let why = format!(
            "the activation journal {} is missing while {} exists: the last applied seq is unknown, so no message \
             can be checked against it; repair it with `stagehand-agent repair-journal --data-dir {} --app {} --seq N` \
             (N: the last seq of {} in `stagehand status {} --env {}`)",
            journal_path.display(),
            layout.current(&body.app).display(),
            layout.data_dir.display(),
            body.app,
            body.app,
            body.app,
            body.env
        );
        error!(app = %body.app, "The activation journal is missing while current exists.");
        return refuse_why(Some(&body), Refusal::HostError, why);
    }
    // A clock stepped backwards cannot revive an expired message.
    let now = now_secs().max(host.store.latest_time());
    if let Err(e) = host.store.set_latest_time(now) {
        warn!(error = %e, "Could not record the latest time seen.");
    }
    let staged = host.intact(&body.app, &body.version);
    let damage = match &staged {
        Some(Err(why)) => {
            host.report_damage(&body.app, &body.version, why);
            Some(format!("{} {} was modified on this host: {why}", body.app, body.version))
        }
        _ => None,
    };
    let view = AgentView {
        agent_id: &host.identity.id,
        env: &host.identity.env,
        last_seq: journal.last_seq,
        staged: staged.map(|s| s.map_err(|_| ())),
    };
    let verdict = activate::check(&body, &view, now);
    if matches!(verdict, Ok(Verdict::Apply | Verdict::Wait { .. })) {
        if let Err((r, why)) = policy_allows(host, &body) {
            return refuse_why(Some(&body), r, why);
        }
    }
    match verdict {
        // What was modified, and where: the receipt says it to the operator.
        Err(Refusal::DigestMismatch) => {
            return refuse_why(Some(&body), Refusal::DigestMismatch, damage.unwrap_or_default());
        }
        Err(r) => return refuse(Some(&body), r),
        Ok(Verdict::AlreadyApplied) => {
            let earlier = journal.last_receipt.clone().filter(|r| r.seq == body.seq).unwrap_or_else(|| {
                // The receipt file did not survive (a power cut): say what is true now.
                let live = layout.active(&body.app).as_deref() == Some(body.version.as_str());
                let outcome =
                    if live { ReceiptOutcome::Committed } else { ReceiptOutcome::Refused(Refusal::Interrupted) };
                receipt(host, Some(&body), outcome, started, true)
            });
            return Prepared::Answer(earlier);
        }
        Ok(Verdict::Wait { until }) => {
            if !host.schedule(until, msg.clone()) {
                // No daemon here to wait (an offline `activate`): refuse, changing nothing.
                return refuse(Some(&body), Refusal::NotYetValid);
            }
            info!(app = %body.app, version = %body.version, until, "Activation scheduled.");
            return Prepared::Answer(receipt(host, Some(&body), ReceiptOutcome::Scheduled { until }, started, false));
        }
        Ok(Verdict::Apply) => {}
    }
    let check_us = started.elapsed().as_micros() as u64;

    // Durable intent: the seq is recorded before the switch can be seen.
    let previous = layout.active(&body.app);
    journal.last_seq = Some(body.seq);
    journal.intent = Some(Intent { seq: body.seq, version: body.version.clone(), previous: previous.clone() });
    if let Err(e) = journal.save_durable(&journal_path) {
        error!(error = %format!("{e:#}"), "Cannot write the activation journal.");
        return refuse(Some(&body), Refusal::HostError);
    }
    failpoint::hit("activate-after-intent");
    Prepared::Go { body, journal, previous, check_us }
}

/// The rules the environment's release policy adds (SPEC §14): approvals, and `[verify]`
/// passed here. Going back to a version that ran here, with the very content it ran with (or
/// staying on the current one), is always allowed, as rollbacks are: what an approval let go
/// live once may come back; nothing new goes live without one.
fn policy_allows(host: &Host, body: &Activate) -> Result<(), (Refusal, String)> {
    let policy = host.policy.get();
    let active = host.layout.active(&body.app);
    let undo = active.as_deref() == Some(body.version.as_str())
        || host.store.ran(&body.app).contains(&(body.version.clone(), body.digest));
    if let Err((have, need)) = stagehand_common::policy::approvals_hold(&policy, body, undo) {
        let why = format!(
            "{} requires {need} approval(s) of a release (policy {}); this message for {} {} carries {have} valid one(s)",
            policy.env, policy.serial, body.app, body.version
        );
        return Err((Refusal::ApprovalsMissing, why));
    }
    if policy.verify && !undo {
        use stagehand_common::protocol::VerifyOutcome;
        let why = match crate::verify::verified(host, &body.app, &body.version, &body.digest) {
            Some(VerifyOutcome::Passed) => return Ok(()),
            Some(VerifyOutcome::Failed { .. }) => "its [verify] failed on this host",
            Some(VerifyOutcome::NotDeclared) => "it declares no [verify]",
            None => "its [verify] has not run on this host",
        };
        return Err((
            Refusal::NotVerified,
            format!(
                "{} requires a verified version (policy {}); {} {}: {why}",
                policy.env, policy.serial, body.app, body.version
            ),
        ));
    }
    Ok(())
}

/// Runs synchronous file work on the blocking pool, off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("activation steps do not panic")
}

/// One activation in flight, from the durable intent to its receipt.
pub(crate) struct Activation {
    pub(crate) host: Arc<Host>,
    pub(crate) app: String,
    pub(crate) version: String,
    pub(crate) seq: u64,
    pub(crate) previous: Option<String>,
    journal: Journal,
    pub(crate) log: String,
    started: Instant,
    check_us: u64,
    switch_us: u64,
}

/// Where the synchronous first part of an activation got to.
#[allow(clippy::large_enum_variant)]
enum Stage {
    /// Done: the receipt.
    Answered(Receipt),
    /// A pre-activate hook must run before the switch.
    BeforeSwitch(Activation, ArtifactConfig),
    /// Switched; a post-activate hook or health check must prove it.
    Switched(Activation, ArtifactConfig),
    /// The artifact runs a service: started, proven, then given traffic (`switch.rs`).
    Service(Activation, ArtifactConfig, u8),
}

/// Everything up to the switch (and, without hooks or health checks, the commit) runs in
/// one go on the blocking pool: an activation without hooks costs one hop off the runtime.
fn begin(host: &Arc<Host>, msg: &SignedActivate, started: Instant) -> Stage {
    let (body, journal, previous, check_us) = match prepare(host, msg, started) {
        Prepared::Answer(r) => return Stage::Answered(r),
        Prepared::Go { body, journal, previous, check_us } => (body, journal, previous, check_us),
    };
    let mut a = Activation {
        host: host.clone(),
        app: body.app,
        version: body.version,
        seq: body.seq,
        previous,
        journal,
        log: String::new(),
        started,
        check_us,
        switch_us: 0,
    };
    let config = match ArtifactConfig::load(&a.release_dir()) {
        Ok(c) => c,
        Err(e) => {
            a.note("stagehand.toml", &e);
            return Stage::Answered(a.finish_now(ReceiptOutcome::Refused(Refusal::PreActivateFailed)));
        }
    };
    if config.service.is_some() {
        return Stage::Service(a, config, body.traffic);
    }
    if a.host.listener(&a.app).is_some() {
        a.note(
            "traffic",
            &format!(
                "{} is in traffic mode on this host (`listen` in agent.toml), and {} has no [service] to send connections to",
                a.app, a.version
            ),
        );
        return Stage::Answered(a.finish_now(ReceiptOutcome::Refused(Refusal::NotTrafficMode)));
    }
    if body.traffic < stagehand_common::activate::FULL_TRAFFIC {
        a.note(
            "traffic",
            &format!("the message gives {} {}% of the traffic, and it runs no [service]", a.version, body.traffic),
        );
        return Stage::Answered(a.finish_now(ReceiptOutcome::Refused(Refusal::NotTrafficMode)));
    }
    if config.hooks.pre_activate.is_some() {
        return Stage::BeforeSwitch(a, config);
    }
    let a = match a.switch_now() {
        Ok(a) => a,
        Err(r) => return Stage::Answered(r),
    };
    if config.hooks.post_activate.is_some() || config.health.is_some() {
        return Stage::Switched(a, config);
    }
    failpoint::hit("activate-before-commit");
    let r = a.finish_now(ReceiptOutcome::Committed);
    failpoint::hit("activate-after-commit");
    Stage::Answered(r)
}

#[allow(clippy::result_large_err)]
async fn apply(host: &Arc<Host>, msg: &SignedActivate, started: Instant) -> Receipt {
    let (h, m) = (host.clone(), msg.clone());
    match blocking(move || begin(&h, &m, started)).await {
        Stage::Answered(r) => r,
        Stage::Switched(a, config) => a.prove(&config).await,
        Stage::Service(a, config, weight) => crate::switch::activate(a, config, weight).await,
        Stage::BeforeSwitch(mut a, config) => {
            let cmd = config.hooks.pre_activate.clone().unwrap_or_default();
            if a.hook("pre_activate", &cmd, &config).await.is_err() {
                return a.finish(ReceiptOutcome::Refused(Refusal::PreActivateFailed)).await;
            }
            match blocking(move || a.switch_now()).await {
                Ok(a) => a.prove(&config).await,
                Err(r) => r,
            }
        }
    }
}

impl Activation {
    pub(crate) fn release_dir(&self) -> std::path::PathBuf {
        self.host.layout.release_dir(&self.app, &self.version)
    }

    pub(crate) fn note(&mut self, what: &str, out: &str) {
        append(&mut self.log, what, out);
    }

    pub(crate) async fn hook(&mut self, what: &str, cmd: &str, config: &ArtifactConfig) -> Result<(), ()> {
        let exec = match hook_exec(&self.host.layout, &self.app, &self.version, self.previous.as_deref()) {
            Ok(exec) => exec,
            Err(e) => {
                self.note(what, &e);
                return Err(());
            }
        };
        let timeout = config.hook_timeout().unwrap_or(std::time::Duration::from_secs(60));
        match hooks::run(cmd, &self.release_dir(), &exec, timeout).await {
            Ok(out) => {
                self.note(what, &out);
                Ok(())
            }
            Err(e) => {
                self.note(what, &e);
                Err(())
            }
        }
    }

    /// After the switch: post-activate hook and health check, then commit, or switch back.
    async fn prove(mut self, config: &ArtifactConfig) -> Receipt {
        let mut healthy = match &config.hooks.post_activate {
            Some(cmd) => self.hook("post_activate", cmd, config).await,
            None => Ok(()),
        };
        if let (Ok(()), Some(h)) = (healthy, &config.health) {
            let exec = hook_exec(&self.host.layout, &self.app, &self.version, self.previous.as_deref());
            let checked = match exec {
                Ok(exec) => {
                    let started = Instant::now();
                    let checked = hooks::check_health(h, &self.release_dir(), &exec).await;
                    self.host.metrics.health_check_seconds.observe(started.elapsed().as_secs_f64());
                    checked
                }
                Err(e) => Err(e),
            };
            healthy = match checked {
                Ok(out) => {
                    self.note("health", &out);
                    Ok(())
                }
                Err(e) => {
                    self.note("health", &e);
                    Err(())
                }
            };
        }
        failpoint::hit("activate-before-commit");
        if healthy.is_err() {
            warn!(app = %self.app, version = %self.version, "Unhealthy after the switch; switching back.");
            let mut log = std::mem::take(&mut self.log);
            revert(&self.host, &self.app, self.previous.as_deref(), &mut log).await;
            self.log = log;
            return self.finish(ReceiptOutcome::Refused(Refusal::Unhealthy)).await;
        }
        self.finish(ReceiptOutcome::Committed).await
    }

    /// The atomic switch; on failure, the receipt that says so.
    #[allow(clippy::result_large_err)]
    pub(crate) fn switch_now(mut self) -> Result<Activation, Receipt> {
        failpoint::hit("activate-before-switch");
        if let Err(e) = switch(&self.host.layout, &self.app, Some(&self.version)) {
            self.note("switch", &e.to_string());
            return Err(self.finish_now(ReceiptOutcome::Refused(Refusal::HostError)));
        }
        self.switch_us = self.started.elapsed().as_micros() as u64;
        info!(app = %self.app, version = %self.version, seq = self.seq, "Switched current.");
        failpoint::hit("activate-after-switch");
        Ok(self)
    }

    pub(crate) async fn finish(self, outcome: ReceiptOutcome) -> Receipt {
        blocking(move || self.finish_now(outcome)).await
    }

    /// Records the outcome (clearing the intent) and builds the receipt. The record is
    /// written without waiting for the disk: it survives `kill -9`, and after a power cut
    /// an intent found at start-up is proven again (see [`recover`]), never just assumed.
    fn finish_now(mut self, outcome: ReceiptOutcome) -> Receipt {
        let host = self.host.clone();
        let r = Receipt {
            agent_id: host.identity.id.clone(),
            app: self.app.clone(),
            version: self.version.clone(),
            seq: self.seq,
            outcome,
            active: host.layout.active(&self.app),
            log: std::mem::take(&mut self.log),
            check_us: self.check_us,
            switch_us: self.switch_us,
            total_us: self.started.elapsed().as_micros() as u64,
            at: now_secs(),
            // Every activation that got this far has its seq durable in the journal.
            applied: true,
        };
        self.journal.intent = None;
        self.journal.last_receipt = Some(r.clone());
        if let Err(e) = self.journal.save_outcome(&host.layout.journal(&self.app)) {
            error!(error = %format!("{e:#}"), "Cannot write the activation journal.");
        }
        if matches!(r.outcome, ReceiptOutcome::Committed) {
            // The new version and the one to roll back to are the last retention removes.
            for v in [Some(&self.version), self.previous.as_ref()].into_iter().flatten() {
                if let Err(e) = host.store.touch(&self.app, v) {
                    warn!(app = %self.app, version = %v, error = %e, "Cannot mark a version used; retention may remove it sooner.");
                }
            }
        }
        match &r.outcome {
            ReceiptOutcome::Committed => {
                info!(app = %r.app, version = %r.version, seq = r.seq, total_us = r.total_us, "Committed.")
            }
            other => warn!(app = %r.app, version = %r.version, seq = r.seq, outcome = ?other, "Not committed."),
        }
        r
    }
}

fn append(log: &mut String, what: &str, out: &str) {
    if out.is_empty() {
        return;
    }
    log.push_str(&format!("[{what}] {out}\n"));
    if log.len() > 2 * hooks::OUTPUT_LIMIT {
        let cut = log.len() - 2 * hooks::OUTPUT_LIMIT;
        let cut = (cut..log.len()).find(|&i| log.is_char_boundary(i)).unwrap_or(log.len());
        log.replace_range(..cut, "");
    }
}

/// Points `current` at a version (or removes it for `None`), atomically and durably.
fn switch(layout: &Layout, app: &str, version: Option<&str>) -> std::io::Result<()> {
    let link = layout.current(app);
    match version {
        Some(v) => fsx::switch_symlink(&link, &Path::new("releases").join(v)),
        None => match std::fs::remove_file(&link) {
            Ok(()) => fsx::fsync_dir(&layout.app_root(app)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        },
    }
}

/// Switches back to `previous` and lets it restart (its own post-activate hook).
pub(crate) async fn revert(host: &Arc<Host>, app: &str, previous: Option<&str>, log: &mut String) {
    let (l, a, p) = (host.layout.clone(), app.to_string(), previous.map(str::to_string));
    if let Err(e) = blocking(move || switch(&l, &a, p.as_deref())).await {
        error!(%app, error = %e, "Could not switch back.");
        append(log, "revert", &e.to_string());
        return;
    }
    append(log, "revert", &format!("switched back to {}", previous.unwrap_or("nothing")));
    let Some(prev) = previous else { return };
    let dir = host.layout.release_dir(app, prev);
    if let Ok(config) = ArtifactConfig::load(&dir) {
        if let Some(cmd) = &config.hooks.post_activate {
            let timeout = config.hook_timeout().unwrap_or(std::time::Duration::from_secs(60));
            let ran = match hook_exec(&host.layout, app, prev, None) {
                Ok(exec) => hooks::run(cmd, &dir, &exec, timeout).await,
                Err(e) => Err(e),
            };
            if let Err(e) = ran {
                append(log, "revert post_activate", &e);
            }
        }
    }
}

/// How an app's hooks run on this host: the SPEC's variables and the app's configured
/// `env` (with `PATH`, nothing else of the agent's), as the app's `user`, under the
/// host's `[limits]`.
pub(crate) fn hook_exec(
    layout: &Layout,
    app: &str,
    version: &str,
    previous: Option<&str>,
) -> Result<hooks::Exec, String> {
    let config = layout.app_config(app);
    let mut env: BTreeMap<String, String> = config.env;
    env.insert("STAGEHAND_APP".into(), app.into());
    env.insert("STAGEHAND_VERSION".into(), version.into());
    env.insert("STAGEHAND_RELEASE_DIR".into(), layout.release_dir(app, version).display().to_string());
    env.insert("STAGEHAND_PREVIOUS_VERSION".into(), previous.unwrap_or("").into());
    let user = config.user.as_deref().map(crate::config::lookup_user).transpose()?;
    Ok(hooks::Exec { env, user, limits: layout.config.limits.clone(), health_ca: layout.config.health_ca.clone() })
}

/// At start-up, an activation that was interrupted (an intent with no outcome) is finished:
/// if `current` already points at the new version it is proven again (post-activate hook,
/// health check) and committed or switched back; if not, `current` is left on (or put back
/// to) the previous version and the activation is recorded as interrupted. Either way the
/// seq stays applied.
pub async fn recover(host: &Arc<Host>) {
    for app in host.layout.apps() {
        let path = host.layout.journal(&app);
        let journal = match Journal::load(&path) {
            Ok(j) => j,
            Err(e) => {
                error!(%app, error = %format!("{e:#}"), "Cannot read the activation journal.");
                continue;
            }
        };
        let Some(intent) = journal.intent.clone() else { continue };
        let mut a = Activation {
            host: host.clone(),
            app: app.clone(),
            version: intent.version.clone(),
            seq: intent.seq,
            previous: intent.previous.clone(),
            journal,
            log: String::new(),
            started: Instant::now(),
            check_us: 0,
            switch_us: 0,
        };
        let config = ArtifactConfig::load(&a.release_dir());
        // A service's activation interrupted anywhere is undone (`switch::restore` put its
        // route back before this runs): it never commits without its own health check.
        let service = config.as_ref().is_ok_and(|c| c.service.is_some());
        let live = host.layout.active(&app).as_deref() == Some(intent.version.as_str());
        if live && !service {
            warn!(%app, version = %intent.version, seq = intent.seq, "An activation was interrupted after the switch; proving it again.");
            a.note(
                "recover",
                "the agent stopped after the switch; running the post-activate hook and health check again",
            );
            match config {
                Ok(config) => {
                    a.prove(&config).await;
                }
                Err(e) => {
                    // Nothing to prove it with: it cannot stay live.
                    a.note("stagehand.toml", &e);
                    let mut log = std::mem::take(&mut a.log);
                    revert(host, &app, intent.previous.as_deref(), &mut log).await;
                    a.log = log;
                    a.finish(ReceiptOutcome::Refused(Refusal::Unhealthy)).await;
                }
            }
        } else {
            warn!(%app, version = %intent.version, seq = intent.seq, "An activation was interrupted before the switch.");
            let mut log = String::new();
            if host.layout.active(&app) != intent.previous {
                revert(host, &app, intent.previous.as_deref(), &mut log).await;
            }
            a.log = log;
            a.finish(ReceiptOutcome::Refused(Refusal::Interrupted)).await;
        }
    }
}
