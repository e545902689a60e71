//! Previews (SPEC §14): a staged version's service started beside the live one, on a port of
//! its own, with no traffic moved. Asked for by a message the release key signed; nothing
//! live changes. A preview ends with `preview stop`, when its version goes live (the running
//! service is then the live one), or when the agent restarts (only routed versions are
//! restored, so a preview never outlives the agent that started it as an orphan).

use crate::hooks::{self, ArtifactConfig};
use crate::host::Host;
use stagehand_common::ids::{check_name, now_secs};
use stagehand_common::policy::{verify_preview, SignedPreview};
use stagehand_common::protocol::ReleaseUp;
use std::sync::Arc;
use tracing::{info, warn};

/// Handles one preview request and reports what happened.
pub async fn handle(host: &Arc<Host>, signed: SignedPreview) {
    let Some(p) = verify_preview(&signed, &host.release_keys(), &host.identity.env, now_secs()) else {
        warn!("Refused a preview request: not signed by a pinned release key, for another environment, or expired.");
        return;
    };
    if check_name("app", &p.app).is_err() || p.version.as_deref().is_some_and(|v| check_name("version", v).is_err()) {
        return;
    }
    let lock = host.activation(&p.app);
    let _one_at_a_time = lock.lock().await;
    let (version, port, detail) = match &p.version {
        None => {
            stop(host, &p.app).await;
            (None, None, "stopped".to_string())
        }
        Some(v) => match start(host, &p.app, v, p.digest).await {
            Ok(port) => (Some(v.clone()), Some(port), format!("{v} on port {port}")),
            Err(why) => (None, None, why),
        },
    };
    host.send_release(ReleaseUp::Preview { app: p.app, version, port, detail });
}

/// Stops the app's preview, unless its version is routed to (live) by now.
async fn stop(host: &Arc<Host>, app: &str) {
    let Some(version) = host.take_preview(app) else { return };
    if host.route_of(app).iter().any(|(i, _)| i.version == version) {
        return;
    }
    if let Some(i) = host.services.get(app, &version) {
        let grace = ArtifactConfig::load(&host.layout.release_dir(app, &version))
            .ok()
            .and_then(|c| c.service.map(|s| s.stop_grace()))
            .unwrap_or(std::time::Duration::from_secs(10));
        i.stop(grace).await;
        info!(%app, %version, "Preview stopped.");
    }
}

async fn start(
    host: &Arc<Host>,
    app: &str,
    version: &str,
    digest: Option<stagehand_common::Digest>,
) -> Result<u16, String> {
    let policy = host.policy.get();
    if policy.approvals > 0 {
        return Err(format!(
            "{} requires approvals (policy {}), and a preview runs code nobody approved: preview it in an earlier environment",
            policy.env, policy.serial
        ));
    }
    if host.listener(app).is_none() {
        return Err(format!("{app} is not in traffic mode on this host (no `listen` in agent.toml)"));
    }
    match host.intact(app, version) {
        Some(Ok(d)) if Some(d) == digest => {}
        Some(Ok(_)) | Some(Err(_)) => return Err(format!("{app} {version} here does not match the pushed content")),
        None => return Err(format!("{app} {version} is not staged here")),
    }
    let dir = host.layout.release_dir(app, version);
    let config = ArtifactConfig::load(&dir).map_err(|e| format!("stagehand.toml: {e}"))?;
    let spec = crate::switch::spec(&host.layout, app, version, &config)?;
    // One preview per app: another version's stops first.
    if host.preview_of(app).is_some_and(|v| v != version) {
        stop(host, app).await;
    }
    let instance = host.services.start(app, version, spec.clone()).await?;
    host.set_preview(app, version);
    if let Some(h) = &config.health {
        let mut exec = spec.exec.clone();
        exec.env.insert("PORT".into(), instance.port.to_string());
        if let Err(why) = hooks::check_health(h, &dir, &exec).await {
            return Err(format!("{version} started on port {} and its health check failed: {why}", instance.port));
        }
    }
    info!(%app, %version, port = instance.port, "Preview started.");
    Ok(instance.port)
}
