//! Testing before the change is visible (SPEC §14): an artifact's `[verify] command` runs
//! against its staged, not-live tree right after staging, exactly as a hook runs
//! (`hooks::run`: the same environment allow-list, limits, process group and bounded output).
//! Its result is recorded in the store for the digest it was staged with, reported on the
//! deploy channel after the stage report, and reported again after every reconnection. The
//! activation path asks [`verified`]. It runs only where the environment's signed policy
//! says `verify` (it runs the artifact's code before anything is approved or released).

use crate::hooks::{self, ArtifactConfig};
use crate::host::Host;
use crate::store::VerifyRecord;
use stagehand_common::protocol::{DeployUp, VerifyOutcome};
use stagehand_common::Digest;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tracing::{debug, info, warn};

/// The recorded outcome of `app` `version`'s verify, if it was recorded for `digest` (the
/// content now staged).
pub fn verified(host: &Host, app: &str, version: &str, digest: &Digest) -> Option<VerifyOutcome> {
    let r = host.store.verify_result(app, version).ok().flatten()?;
    (r.digest == *digest).then(|| r.outcome())
}

/// After a version was staged (or ordered again while staged): sends its recorded result,
/// or runs its verify in the background and sends that. Returns at once: the stage report
/// never waits for a verify.
pub fn after_staging(host: &Arc<Host>, app: &str, version: &str, digest: Digest) {
    // Only where the environment's signed policy asks for it: a verify runs the artifact's
    // code at deploy time, before any release or approval.
    if !host.policy.get().verify {
        return;
    }
    let (host, app, version) = (Arc::downgrade(host), app.to_string(), version.to_string());
    tokio::spawn(async move { verify(host, &app, &version, digest).await });
}

/// After a deploy session is up (its inventory sent): sends the recorded result of every
/// staged version, then runs, one after another, the verify of those that have none (staged
/// before verify existed, or interrupted by a restart). Returns at once.
pub fn after_connect(host: &Arc<Host>) {
    if !host.policy.get().verify {
        return;
    }
    let weak = Arc::downgrade(host);
    let h = host.clone();
    tokio::spawn(async move {
        let Ok(missing) = tokio::task::spawn_blocking(move || report_all(&h)).await else {
            return;
        };
        for (app, version, digest) in missing {
            verify(weak.clone(), &app, &version, digest).await;
        }
    });
}

/// Verifies running in this process, by data directory (tests run several agents in one
/// process), app and version. Recording a result and looking for results to report both
/// hold it, so a new session finds each result either recorded or still to come on it.
/// Never taken by the activation path.
static RUNNING: Mutex<BTreeSet<Running>> = Mutex::new(BTreeSet::new());

type Running = (PathBuf, String, String);

fn running() -> MutexGuard<'static, BTreeSet<Running>> {
    RUNNING.lock().unwrap_or_else(|p| p.into_inner())
}

/// A verify this task runs; let go of when dropped (the task ended or was cancelled
/// without a result), so that the next session runs it again.
struct Claim {
    key: Running,
    done: bool,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.done {
            running().remove(&self.key);
        }
    }
}

/// Sends the recorded result, or runs the verify if none is recorded and none runs. Holds
/// the host only around the store and the configuration, not while the command runs: an
/// agent that stops is not held up by it.
async fn verify(host: Weak<Host>, app: &str, version: &str, digest: Digest) {
    let Some(h) = host.upgrade() else { return };
    let (a, v) = (app.to_string(), version.to_string());
    let prepared = tokio::task::spawn_blocking(move || {
        let claim = claim(&h, &a, &v, digest)?;
        Some((claim, prepare(&h, &a, &v)))
    })
    .await;
    let Ok(Some((claim, prepared))) = prepared else { return };
    let outcome = match prepared {
        Ok(None) => VerifyOutcome::NotDeclared,
        Ok(Some(p)) => match hooks::run(&p.command, &p.dir, &p.exec, p.timeout).await {
            Ok(out) => {
                debug!(app = %app, version, output = %out, "Verify output.");
                VerifyOutcome::Passed
            }
            Err(log) => VerifyOutcome::Failed { log: bounded(log) },
        },
        Err(why) => VerifyOutcome::Failed { log: bounded(why) },
    };
    let Some(h) = host.upgrade() else { return };
    let (a, v) = (app.to_string(), version.to_string());
    let _ = tokio::task::spawn_blocking(move || record(&h, claim, &a, &v, digest, outcome)).await;
}

/// Takes (app, version) for this task, unless a verify of it runs already (its result
/// comes when it is done) or its result is recorded (sent now instead).
fn claim(host: &Host, app: &str, version: &str, digest: Digest) -> Option<Claim> {
    let mut running = running();
    let key = (host.layout.data_dir.clone(), app.to_string(), version.to_string());
    if running.contains(&key) {
        return None;
    }
    match host.store.verify_result(app, version) {
        Ok(Some(r)) if r.digest == digest => {
            send(host, app, version, digest, r.outcome());
            return None;
        }
        Ok(_) => {}
        // Run it: recording the result may work, and the controller hears it either way.
        Err(e) => warn!(app = %app, version, error = %e, "Cannot read the verify record; verifying again."),
    }
    running.insert(key.clone());
    Some(Claim { key, done: false })
}

/// What a verify runs: its command, directory, environment and timeout.
struct Prepared {
    command: String,
    dir: PathBuf,
    exec: hooks::Exec,
    timeout: Duration,
}

/// Reads `[verify]` from the staged tree; `None` when it declares none. The environment is a
/// pre-activate hook's, with what is live now as the previous version.
fn prepare(host: &Host, app: &str, version: &str) -> Result<Option<Prepared>, String> {
    let dir = host.layout.release_dir(app, version);
    let config = ArtifactConfig::load(&dir)?;
    let Some(verify) = &config.verify else {
        return Ok(None);
    };
    let timeout = config.verify_timeout()?;
    let previous = host.layout.active(app);
    let exec = crate::activate::hook_exec(&host.layout, app, version, previous.as_deref())?;
    Ok(Some(Prepared { command: verify.command.clone(), dir, exec, timeout }))
}

/// Records a result (only while the version is still staged with `digest`), makes it
/// durable, and reports it.
fn record(host: &Host, mut claim: Claim, app: &str, version: &str, digest: Digest, outcome: VerifyOutcome) {
    let mut running = running();
    match &outcome {
        VerifyOutcome::Passed => info!(app = %app, version, "Verified."),
        VerifyOutcome::Failed { log } => warn!(app = %app, version, %log, "Verify failed."),
        VerifyOutcome::NotDeclared => debug!(app = %app, version, "No [verify] declared."),
    }
    let kept = host.store.put_verify(app, version, &VerifyRecord::new(digest, &outcome)).and_then(|kept| {
        if kept {
            host.store.flush()?;
        }
        Ok(kept)
    });
    match kept {
        Ok(true) => send(host, app, version, digest, outcome),
        Ok(false) => debug!(app = %app, version, "No longer staged; its verify result is dropped."),
        Err(e) => {
            // The next session verifies again; this one hears the result now.
            warn!(app = %app, version, error = %e, "Cannot record the verify result.");
            send(host, app, version, digest, outcome);
        }
    }
    running.remove(&claim.key);
    claim.done = true;
}

fn send(host: &Host, app: &str, version: &str, digest: Digest, outcome: VerifyOutcome) {
    host.send_deploy(DeployUp::Verified { app: app.to_string(), version: version.to_string(), digest, outcome });
}

/// Sends the recorded result of every staged version and forgets results of versions no
/// longer staged (a crash between the two removals); returns the staged versions with no
/// result and no verify running. A version being staged is left to its staging, which
/// verifies it after its stage report.
fn report_all(host: &Host) -> Vec<(String, String, Digest)> {
    let running = running();
    let (staged, results) = match (host.store.all_staged(), host.store.all_verify()) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "Cannot read the staged versions; their verify results are not reported.");
            return Vec::new();
        }
    };
    let held: HashMap<(&str, &str), Digest> =
        staged.iter().map(|(a, v, r)| ((a.as_str(), v.as_str()), r.digest)).collect();
    let mut recorded = HashMap::new();
    for (app, version, r) in &results {
        match r.as_ref().filter(|r| held.get(&(app.as_str(), version.as_str())) == Some(&r.digest)) {
            Some(r) => {
                recorded.insert((app.as_str(), version.as_str()), r);
            }
            None => {
                if let Err(e) = host.store.remove_verify(app, version) {
                    warn!(app = %app, version, error = %e, "Cannot remove a stale verify result.");
                }
            }
        }
    }
    let mut missing = Vec::new();
    for (app, version, r) in &staged {
        match recorded.get(&(app.as_str(), version.as_str())) {
            Some(result) => send(host, app, version, r.digest, result.outcome()),
            None => {
                let key = (host.layout.data_dir.clone(), app.clone(), version.clone());
                if !running.contains(&key) && !host.is_staging(app, version) {
                    missing.push((app.clone(), version.clone(), r.digest));
                }
            }
        }
    }
    missing
}

/// At most twice the hooks' output limit, keeping the end (where the failure is).
fn bounded(mut log: String) -> String {
    let max = 2 * hooks::OUTPUT_LIMIT;
    if log.len() > max {
        let mut cut = log.len() - max;
        while !log.is_char_boundary(cut) {
            cut += 1;
        }
        log.replace_range(..cut, "…");
    }
    log
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_log_keeps_its_end() {
        assert_eq!(bounded("short".into()), "short");
        let long = format!("{}the end", "é".repeat(hooks::OUTPUT_LIMIT));
        let b = bounded(long);
        assert!(b.len() <= 2 * hooks::OUTPUT_LIMIT + "…".len(), "{}", b.len());
        assert!(b.starts_with('…') && b.ends_with("the end"));
    }

    /// A claim dropped without a result lets the next session run the verify.
    #[test]
    fn a_dropped_claim_is_let_go() {
        let key: Running = (PathBuf::from("/nonexistent/claim-test"), "web".into(), "1".into());
        running().insert(key.clone());
        drop(Claim { key: key.clone(), done: false });
        assert!(!running().contains(&key));
        running().insert(key.clone());
        drop(Claim { key: key.clone(), done: true });
        assert!(running().remove(&key), "a claim done leaves the set to its recorder");
    }
}
