//! Applying an activate message: the rules of SPEC §4 (`common::activate::check`), then
//! durable intent → pre-activate hook → atomic switch → post-activate hook → health check
//! → commit, or switch back by itself. One activation at a time per host.

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
    let _one_at_a_time = host.activation.lock().await;
    let receipt = apply(host, &msg, started).await;
    host.send_release(stagehand_common::protocol::ReleaseUp::Receipt(
        receipt.clone(),
    ));
    receipt
}

fn receipt(
    host: &Host,
    body: Option<&Activate>,
    outcome: ReceiptOutcome,
    started: Instant,
) -> Receipt {
    let app = body.map(|b| b.app.clone()).unwrap_or_default();
    Receipt {
        agent_id: host.identity.id.clone(),
        active: if app.is_empty() {
            None
        } else {
            host.layout.active(&app)
        },
        app,
        version: body.map(|b| b.version.clone()).unwrap_or_default(),
        seq: body.map_or(0, |b| b.seq),
        outcome,
        log: String::new(),
        check_us: started.elapsed().as_micros() as u64,
        switch_us: 0,
        total_us: started.elapsed().as_micros() as u64,
        at: now_secs(),
    }
}

async fn apply(host: &Arc<Host>, msg: &SignedActivate, started: Instant) -> Receipt {
    let refuse = |body: Option<&Activate>, r: Refusal| {
        let body_desc = body
            .map(|b| format!("{} {} seq {}", b.app, b.version, b.seq))
            .unwrap_or_else(|| "undecodable message".into());
        warn!(message = %body_desc, reason = %r, "Refused an activate message.");
        receipt(host, body, ReceiptOutcome::Refused(r), started)
    };
    // Rule 1, before anything else is read from the message.
    let body = match activate::verify(msg, &host.identity.release_keys) {
        Ok(b) => b,
        Err(r) => return refuse(Activate::decode_unverified(&msg.body).as_ref(), r),
    };
    if check_name("app", &body.app).is_err() || check_name("version", &body.version).is_err() {
        return refuse(Some(&body), Refusal::Malformed);
    }
    let layout = &host.layout;
    let journal_path = layout.journal(&body.app);
    let mut journal = match Journal::load(&journal_path) {
        Ok(j) => j,
        Err(e) => {
            error!(error = %format!("{e:#}"), "Cannot read the activation journal.");
            return refuse(Some(&body), Refusal::HostError);
        }
    };
    // A clock stepped backwards cannot revive an expired message.
    let now = now_secs().max(host.store.latest_time());
    let _ = host.store.set_latest_time(now);
    let view = AgentView {
        agent_id: &host.identity.id,
        env: &host.identity.env,
        last_seq: journal.last_seq,
        staged: host.intact(&body.app, &body.version),
    };
    match activate::check(&body, &view, now) {
        Err(r) => return refuse(Some(&body), r),
        Ok(Verdict::AlreadyApplied) => {
            return journal
                .last_receipt
                .clone()
                .filter(|r| r.seq == body.seq)
                .unwrap_or_else(|| receipt(host, Some(&body), ReceiptOutcome::Committed, started));
        }
        Ok(Verdict::Wait { until }) => {
            if !host.schedule(until, msg.clone()) {
                // No daemon here to wait (an offline `activate`): refuse, changing nothing.
                return refuse(Some(&body), Refusal::NotYetValid);
            }
            info!(app = %body.app, version = %body.version, until, "Activation scheduled.");
            return receipt(
                host,
                Some(&body),
                ReceiptOutcome::Scheduled { until },
                started,
            );
        }
        Ok(Verdict::Apply) => {}
    }
    let check_us = started.elapsed().as_micros() as u64;

    // Durable intent: the seq is recorded before the switch can be seen.
    let previous = layout.active(&body.app);
    journal.last_seq = Some(body.seq);
    journal.intent = Some(Intent {
        seq: body.seq,
        version: body.version.clone(),
        previous: previous.clone(),
    });
    if let Err(e) = journal.save(&journal_path) {
        error!(error = %format!("{e:#}"), "Cannot write the activation journal.");
        return refuse(Some(&body), Refusal::HostError);
    }
    failpoint::hit("activate-after-intent");

    let release_dir = layout.release_dir(&body.app, &body.version);
    let env = hook_env(layout, &body.app, &body.version, previous.as_deref());
    let mut log = String::new();
    let config = match ArtifactConfig::load(&release_dir) {
        Ok(c) => c,
        Err(e) => {
            log.push_str(&e);
            return finish(
                host,
                &body,
                &mut journal,
                ReceiptOutcome::Refused(Refusal::PreActivateFailed),
                log,
                started,
                check_us,
                0,
            );
        }
    };
    let hook_timeout = config
        .hook_timeout()
        .unwrap_or(std::time::Duration::from_secs(60));
    if let Some(cmd) = &config.hooks.pre_activate {
        match hooks::run(cmd, &release_dir, &env, hook_timeout).await {
            Ok(out) => append(&mut log, "pre_activate", &out),
            Err(e) => {
                append(&mut log, "pre_activate", &e);
                return finish(
                    host,
                    &body,
                    &mut journal,
                    ReceiptOutcome::Refused(Refusal::PreActivateFailed),
                    log,
                    started,
                    check_us,
                    0,
                );
            }
        }
    }
    failpoint::hit("activate-before-switch");

    if let Err(e) = switch(layout, &body.app, Some(&body.version)) {
        append(&mut log, "switch", &e.to_string());
        return finish(
            host,
            &body,
            &mut journal,
            ReceiptOutcome::Refused(Refusal::HostError),
            log,
            started,
            check_us,
            0,
        );
    }
    let switch_us = started.elapsed().as_micros() as u64;
    info!(app = %body.app, version = %body.version, seq = body.seq, "Switched current.");
    failpoint::hit("activate-after-switch");

    let mut healthy = Ok(());
    if let Some(cmd) = &config.hooks.post_activate {
        match hooks::run(cmd, &release_dir, &env, hook_timeout).await {
            Ok(out) => append(&mut log, "post_activate", &out),
            Err(e) => {
                append(&mut log, "post_activate", &e);
                healthy = Err(());
            }
        }
    }
    if healthy.is_ok() {
        if let Some(h) = &config.health {
            match hooks::check_health(h, &release_dir, &env).await {
                Ok(out) => append(&mut log, "health", &out),
                Err(e) => {
                    append(&mut log, "health", &e);
                    healthy = Err(());
                }
            }
        }
    }
    failpoint::hit("activate-before-commit");
    if healthy.is_err() {
        warn!(app = %body.app, version = %body.version, "Unhealthy after the switch; switching back.");
        revert(host, &body.app, previous.as_deref(), &mut log).await;
        return finish(
            host,
            &body,
            &mut journal,
            ReceiptOutcome::Refused(Refusal::Unhealthy),
            log,
            started,
            check_us,
            switch_us,
        );
    }
    let r = finish(
        host,
        &body,
        &mut journal,
        ReceiptOutcome::Committed,
        log,
        started,
        check_us,
        switch_us,
    );
    failpoint::hit("activate-after-commit");
    r
}

fn append(log: &mut String, what: &str, out: &str) {
    if out.is_empty() {
        return;
    }
    log.push_str(&format!("[{what}] {out}\n"));
    if log.len() > 2 * hooks::OUTPUT_LIMIT {
        let cut = log.len() - 2 * hooks::OUTPUT_LIMIT;
        let cut = (cut..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(log.len());
        log.replace_range(..cut, "");
    }
}

/// Records the outcome durably (clearing the intent) and builds the receipt.
#[allow(clippy::too_many_arguments)]
fn finish(
    host: &Host,
    body: &Activate,
    journal: &mut Journal,
    outcome: ReceiptOutcome,
    log: String,
    started: Instant,
    check_us: u64,
    switch_us: u64,
) -> Receipt {
    let r = Receipt {
        agent_id: host.identity.id.clone(),
        app: body.app.clone(),
        version: body.version.clone(),
        seq: body.seq,
        outcome,
        active: host.layout.active(&body.app),
        log,
        check_us,
        switch_us,
        total_us: started.elapsed().as_micros() as u64,
        at: now_secs(),
    };
    journal.intent = None;
    journal.last_receipt = Some(r.clone());
    if let Err(e) = journal.save(&host.layout.journal(&body.app)) {
        error!(error = %format!("{e:#}"), "Cannot write the activation journal.");
    }
    match &r.outcome {
        ReceiptOutcome::Committed => {
            info!(app = %r.app, version = %r.version, seq = r.seq, total_us = r.total_us, "Committed.")
        }
        other => {
            warn!(app = %r.app, version = %r.version, seq = r.seq, outcome = ?other, "Not committed.")
        }
    }
    r
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
async fn revert(host: &Host, app: &str, previous: Option<&str>, log: &mut String) {
    if let Err(e) = switch(&host.layout, app, previous) {
        error!(%app, error = %e, "Could not switch back.");
        append(log, "revert", &e.to_string());
        return;
    }
    append(
        log,
        "revert",
        &format!("switched back to {}", previous.unwrap_or("nothing")),
    );
    let Some(prev) = previous else { return };
    let dir = host.layout.release_dir(app, prev);
    if let Ok(config) = ArtifactConfig::load(&dir) {
        if let Some(cmd) = &config.hooks.post_activate {
            let env = hook_env(&host.layout, app, prev, None);
            let timeout = config
                .hook_timeout()
                .unwrap_or(std::time::Duration::from_secs(60));
            if let Err(e) = hooks::run(cmd, &dir, &env, timeout).await {
                append(log, "revert post_activate", &e);
            }
        }
    }
}

fn hook_env(
    layout: &Layout,
    app: &str,
    version: &str,
    previous: Option<&str>,
) -> BTreeMap<String, String> {
    let mut env = layout.app_config(app).env;
    env.insert("STAGEHAND_APP".into(), app.into());
    env.insert("STAGEHAND_VERSION".into(), version.into());
    env.insert(
        "STAGEHAND_RELEASE_DIR".into(),
        layout.release_dir(app, version).display().to_string(),
    );
    env.insert(
        "STAGEHAND_PREVIOUS_VERSION".into(),
        previous.unwrap_or("").into(),
    );
    env
}

/// At start-up: an activation that was interrupted (intent without outcome) is switched
/// back to what was live before it, and recorded as interrupted. The seq stays applied.
pub async fn recover(host: &Arc<Host>) {
    for app in host.layout.apps() {
        let path = host.layout.journal(&app);
        let mut journal = match Journal::load(&path) {
            Ok(j) => j,
            Err(e) => {
                error!(%app, error = %format!("{e:#}"), "Cannot read the activation journal.");
                continue;
            }
        };
        let Some(intent) = journal.intent.clone() else {
            continue;
        };
        warn!(%app, version = %intent.version, seq = intent.seq, "An activation was interrupted; switching back.");
        let mut log = String::new();
        revert(host, &app, intent.previous.as_deref(), &mut log).await;
        let r = Receipt {
            agent_id: host.identity.id.clone(),
            app: app.clone(),
            version: intent.version.clone(),
            seq: intent.seq,
            outcome: ReceiptOutcome::Refused(Refusal::Interrupted),
            active: host.layout.active(&app),
            log,
            check_us: 0,
            switch_us: 0,
            total_us: 0,
            at: now_secs(),
        };
        journal.intent = None;
        journal.last_seq = Some(journal.last_seq.unwrap_or(0).max(intent.seq));
        journal.last_receipt = Some(r);
        if let Err(e) = journal.save(&path) {
            error!(%app, error = %format!("{e:#}"), "Cannot write the activation journal.");
        }
    }
}
