//! The admin channel: one request per stream from the operator CLI.

use crate::release::Refused;
use crate::server::Controller;
use crate::store::{AdminRecord, ArtifactRecord, DeployRecord, StageRecord, StageState, TokenRecord};
use anyhow::{bail, Result};
use stagehand_common::frame::{self, read_blob, read_msg, write_msg};
use stagehand_common::ids::{check_name, now_secs};
use stagehand_common::manifest::Manifest;
use stagehand_common::protocol::{
    AdminInfo, AdminRequest, AdminResponse, AgentAppInfo, AgentAppStatus, AgentInfo, AppStatus, DeployDown, Receipt,
    ReceiptOutcome, RolloutSpec, PROTOCOL_VERSION,
};
use stagehand_common::token::JoinToken;
use stagehand_common::{AgentId, Digest};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info};

pub async fn serve(ctl: Arc<Controller>, conn: quinn::Connection, admin: String) -> Result<()> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    match read_msg::<_, AdminRequest, { frame::CONTROL_LIMIT }>(&mut recv).await? {
        Some(AdminRequest::Hello { protocol_version: PROTOCOL_VERSION }) => {}
        other => bail!("expected hello, got {other:?}"),
    }
    // A revoked (or unknown) identity is refused here, and its connections are closed when it
    // is revoked later.
    if let Err(why) = identity(&ctl, &admin) {
        write_msg(&mut send, &error(why, "ask an owner: stagehand admin list")).await?;
        send.finish()?;
        // Time for the client to read why before the connection goes.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        conn.close(crate::server::CLOSE_UNAUTHORISED.into(), b"identity refused");
        return Ok(());
    }
    write_msg(&mut send, &AdminResponse::Hello { protocol_version: PROTOCOL_VERSION }).await?;
    send.finish()?;
    ctl.admin_conns.lock().unwrap_or_else(|p| p.into_inner()).entry(admin.clone()).or_default().push(conn.clone());
    debug!(%admin, "Admin connected.");
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return Ok(()),
        };
        let ctl = ctl.clone();
        let conn = conn.clone();
        let admin = admin.clone();
        tokio::spawn(async move {
            if let Err(e) = request(&ctl, send, recv, &admin).await {
                debug!(error = %format!("{e:#}"), "Admin request failed; dropping the connection.");
                conn.close(crate::server::CLOSE_PROTOCOL.into(), b"bad request");
            }
        });
    }
}

fn error(message: impl Into<String>, hint: impl Into<String>) -> AdminResponse {
    AdminResponse::Error { message: message.into(), hint: hint.into() }
}

impl From<Refused> for AdminResponse {
    fn from(r: Refused) -> Self {
        error(r.message, r.hint)
    }
}

async fn request(
    ctl: &Controller,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    admin: &str,
) -> Result<()> {
    let Some(req) = read_msg::<_, AdminRequest, { frame::ADMIN_LIMIT }>(&mut recv).await? else {
        return Ok(());
    };
    let resp = answer(ctl, req, admin, Some(&mut recv)).await?;
    write_msg(&mut send, &resp).await?;
    send.finish()?;
    Ok(())
}

/// Authorises, performs and records one request of the identity `admin`: the one path of
/// the admin channel and of the fleet page's buttons. `recv` carries a chunk upload's bytes
/// (the admin channel only).
pub async fn answer(
    ctl: &Controller,
    req: AdminRequest,
    admin: &str,
    recv: Option<&mut quinn::RecvStream>,
) -> Result<AdminResponse> {
    // Every request is authorised against the identity's role, as it is now.
    // A rollout's environment, or a policy change's (`policy-ENV-SERIAL`).
    let need = crate::access::Need::of(&req, |id| {
        ctl.store
            .rollout(id)
            .ok()
            .flatten()
            .map(|r| r.env)
            .or_else(|| crate::policy::parse_policy_id(id).map(|(env, _)| env))
    });
    // What changes anything is recorded in the audit log, with its outcome, before the answer;
    // so are renewals and login links, which only read but grant access.
    let granted = matches!(
        req,
        AdminRequest::RenewCertificate { .. } | AdminRequest::UiLogin | AdminRequest::SetApprovalKey { .. }
    );
    let audited = (need != crate::access::Need::Read || granted).then(|| audit_entry(&req)).flatten();
    if let Err(why) = identity(ctl, admin).and_then(|who| crate::access::check(&who, &need)) {
        tracing::warn!(%admin, %why, "Refused an admin request.");
        if let Some((what, args)) = audited {
            ctl.audit.record(admin, &what, args, &format!("refused: {why}"))?;
        }
        return Ok(error(why, "an owner can grant a role: stagehand admin add NAME --role ROLE"));
    }
    // Shared state that cannot be written now: a change is refused before it starts, while
    // what only reads is still answered from what this controller holds.
    if need != crate::access::Need::Read || matches!(req, AdminRequest::SetApprovalKey { .. }) {
        if let Err(e) = ctl.store.writable() {
            let resp = error(
                format!("{e}; nothing was changed"),
                "try again once etcd answers (this controller's log says when); reads still work",
            );
            if let Some((what, args)) = audited {
                ctl.audit.record(admin, &what, args, "refused: the shared state is unavailable")?;
            }
            return Ok(resp);
        }
    }
    let resp = match req {
        AdminRequest::PushChunks { digests } => match recv {
            Some(recv) => push_chunks(ctl, &digests, recv).await?,
            None => error("chunks travel on the admin channel only", "stagehand push APP VERSION PATH"),
        },
        AdminRequest::WaitStaged { app, version, env, timeout_secs } => {
            wait(ctl, timeout_secs, || staged_progress(ctl, &app, &version, &env)).await?
        }
        AdminRequest::WaitRelease { app, env, seq, timeout_secs } => {
            wait(ctl, timeout_secs, || release_progress(ctl, &app, &env, seq)).await?
        }
        AdminRequest::RolloutStatus { id, after_revision, timeout_secs } => {
            rollout_status(ctl, &id, after_revision, timeout_secs).await?
        }
        AdminRequest::Preview { app, env, version } => crate::policy::preview(ctl, &app, &env, version).await?,
        other => match handle(ctl, other, admin) {
            Ok(r) => r,
            Err(e) => error(format!("{e:#}"), "see the controller's log for details"),
        },
    };
    let mut resp = resp;
    if let Some((what, mut args)) = audited {
        let outcome = match &resp {
            AdminResponse::Error { message, .. } => format!("error: {message}"),
            AdminResponse::Token { token, .. } => {
                // The token's id (never its secret): what an enrolment names.
                if let (Ok(t), Some(obj)) = (JoinToken::parse(token), args.as_object_mut()) {
                    obj.insert("id".into(), serde_json::Value::String(t.id));
                }
                "ok".to_string()
            }
            _ => "ok".to_string(),
        };
        if let Err(e) = ctl.audit.record(admin, &what, args, &outcome) {
            tracing::error!(error = %format!("{e:#}"), "Could not write the audit log.");
            resp = error(
                format!("done, but it could not be recorded in the audit log: {e:#}"),
                "check the controller's disk; every action is refused an acknowledgement until it can be recorded",
            );
        }
    }
    Ok(resp)
}

/// A request as the audit log records it: its name (kebab-case) and its arguments. Chunk
/// uploads are not recorded one by one (their push's begin and commit are).
fn audit_entry(req: &AdminRequest) -> Option<(String, serde_json::Value)> {
    match req {
        // Uploads are recorded at their begin and commit; a listing changes nothing.
        AdminRequest::PushChunks { .. } | AdminRequest::ListAdmins => return None,
        // The manifest itself is in the chunk store; the log names it.
        AdminRequest::PushBegin { app, version, manifest } => {
            let args = serde_json::json!({ "app": app, "version": version, "manifest": Digest::of(manifest).to_hex(), "manifest_bytes": manifest.len() });
            return Some(("push-begin".into(), args));
        }
        // The request, not the bytes: the new certificate's fingerprint is in the store.
        AdminRequest::RenewCertificate { .. } => return Some(("renew-certificate".into(), serde_json::json!({}))),
        _ => {}
    }
    let (name, args) = match serde_json::to_value(req).ok()? {
        serde_json::Value::String(name) => (name, serde_json::json!({})),
        serde_json::Value::Object(map) => map.into_iter().next()?,
        _ => return None,
    };
    let mut kebab = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            kebab.push('-');
        }
        kebab.push(c.to_ascii_lowercase());
    }
    Some((kebab, args))
}

/// The identity behind an admin certificate, if it may act at all.
pub fn identity(ctl: &Controller, name: &str) -> std::result::Result<AdminRecord, String> {
    match ctl.store.admin(name) {
        Ok(Some(a)) if !a.revoked => Ok(a),
        Ok(Some(_)) => Err(format!("the identity {name} is revoked")),
        Ok(None) => Err(format!("no identity {name}")),
        Err(e) => Err(format!("reading the identity {name}: {e}")),
    }
}

fn admin_info(a: &AdminRecord) -> AdminInfo {
    AdminInfo {
        name: a.name.clone(),
        role: a.role.clone(),
        envs: a.envs.clone(),
        revoked: a.revoked,
        created_at: a.created_at,
        expires_at: a.expires_at,
    }
}

fn names(pairs: &[(&str, &str)]) -> Option<AdminResponse> {
    pairs
        .iter()
        .find_map(|(kind, v)| check_name(kind, v).err())
        .map(|e| error(e, "fix the name and run the command again"))
}

/// A rollout as it is now, or once its revision moves past `after` (or at the timeout).
async fn rollout_status(ctl: &Controller, id: &str, after: u64, timeout_secs: u64) -> Result<AdminResponse> {
    let mut changes = ctl.fleet.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs.min(600));
    loop {
        changes.borrow_and_update();
        let Some(r) = ctl.store.rollout(id)? else {
            return Ok(error(format!("no rollout {id}"), "stagehand rollout list"));
        };
        if r.revision > after || r.state.is_final() || tokio::time::Instant::now() >= deadline {
            return Ok(AdminResponse::Rollout { rollout: crate::rollout::view(ctl, &r), notes: vec![] });
        }
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
}

/// An exported message with what the agent may lack: the release key changes and the
/// environment's chain of policies.
fn exported(
    ctl: &Controller,
    env: &str,
    message: stagehand_common::activate::SignedActivate,
    version: String,
    seq: u64,
    targets: Vec<AgentId>,
) -> Result<AdminResponse> {
    let policies = ctl.store.policy(env)?.map(|p| crate::policy::chain(&p)).unwrap_or_default();
    Ok(AdminResponse::Exported { message, version, seq, targets, key_changes: ctl.key_chain.clone(), policies })
}

pub(crate) fn started(r: std::result::Result<crate::rollout::Started, Refused>) -> AdminResponse {
    match r {
        Ok((rollout, notes)) => AdminResponse::Rollout { rollout, notes },
        Err(r) => r.into(),
    }
}

fn handle(ctl: &Controller, req: AdminRequest, admin: &str) -> Result<AdminResponse> {
    Ok(match req {
        AdminRequest::CreateToken { env, ttl_secs, labels, uses } => {
            if let Some(e) = names(&[("environment", &env)]) {
                return Ok(e);
            }
            let token = JoinToken::generate(&ctl.ca_fingerprint, &ctl.release_keys[0].fingerprint());
            let expires_at = now_secs() + ttl_secs.max(1);
            ctl.store.put_token(
                &token.id,
                &TokenRecord {
                    v: 1,
                    secret_hash: JoinToken::secret_hash(&token.secret),
                    env: env.clone(),
                    labels,
                    expires_at,
                    uses_left: uses.max(1),
                },
            )?;
            ctl.store.flush()?;
            info!(%env, token = %token.id, "Join token created.");
            AdminResponse::Token { token: token.to_string(), expires_at }
        }
        AdminRequest::ListAgents => AdminResponse::Agents { agents: list_agents(ctl)? },
        AdminRequest::PushBegin { app, version, manifest } => push_begin(ctl, &app, &version, &manifest)?,
        AdminRequest::PushCommit { app, version, digest } => push_commit(ctl, &app, &version, digest)?,
        AdminRequest::Deploy { app, version, env } => deploy(ctl, &app, &version, &env)?,
        AdminRequest::Status { app, env } => AdminResponse::Status { status: status(ctl, &app, &env)? },
        // Without `export`, the requests of protocol 1 start a rollout with the defaults.
        AdminRequest::Release { app, version, env, export, ttl_secs } => {
            if let Some(e) = names(&[("app", &app), ("version", &version), ("environment", &env)]) {
                return Ok(e);
            }
            if !export {
                let spec = RolloutSpec { app, version: Some(version), env, ttl_secs, ..RolloutSpec::default() };
                return Ok(started(crate::rollout::start(ctl, spec, admin)?));
            }
            // A message carried by hand cannot wait for a window; a freeze stops it as any release.
            if let Some(why) = crate::policy::holds_release(ctl, &env)? {
                return Ok(error(format!("{why}; nothing was exported"), format!("stagehand policy show --env {env}")));
            }
            match crate::release::export(ctl, &app, &version, &env, ttl_secs)? {
                Ok((message, seq, targets)) => exported(ctl, &env, message, version, seq, targets)?,
                Err(r) => r.into(),
            }
        }
        AdminRequest::Rollback { app, env, to, export, ttl_secs } => {
            if let Some(e) = names(&[("app", &app), ("environment", &env)]) {
                return Ok(e);
            }
            if !export {
                let spec = RolloutSpec { app, version: to, env, rollback: true, ttl_secs, ..RolloutSpec::default() };
                return Ok(started(crate::rollout::start(ctl, spec, admin)?));
            }
            let desired = ctl.store.desired(&env, &app)?;
            let version = match to {
                Some(v) => v,
                None => match crate::plan::fleet::rollback_target(
                    &app,
                    &env,
                    desired.as_ref().map(|d| d.version.as_str()),
                    desired.as_ref().map(|d| d.history.as_slice()).unwrap_or_default(),
                ) {
                    Ok(v) => v,
                    Err(why) => return Ok(error(why, format!("stagehand rollback {app} --env {env} --to VERSION"))),
                },
            };
            match crate::release::export(ctl, &app, &version, &env, ttl_secs)? {
                Ok((message, seq, targets)) => exported(ctl, &env, message, version, seq, targets)?,
                Err(r) => r.into(),
            }
        }
        AdminRequest::Rollout(spec) => started(crate::rollout::start(ctl, spec, admin)?),
        AdminRequest::ListRollouts { app, env } => {
            let mut rollouts: Vec<_> = ctl
                .store
                .rollouts()?
                .iter()
                .rev()
                .filter(|r| app.as_ref().is_none_or(|a| *a == r.app) && env.as_ref().is_none_or(|e| *e == r.env))
                .take(200)
                .map(|r| crate::rollout::view(ctl, r))
                .collect();
            // The list shows rollouts, not every host's receipt.
            for r in &mut rollouts {
                for h in r.waves.iter_mut().flat_map(|w| w.hosts.iter_mut()) {
                    h.receipt = None;
                }
            }
            AdminResponse::Rollouts { rollouts }
        }
        AdminRequest::ControlRollout { id, action } => started(crate::rollout::control(ctl, &id, action, admin)?),
        AdminRequest::RevokeAgent { agent } => {
            let id = AgentId(agent);
            let revoked =
                ctl.store.update_agent::<()>(&id, |rec| Ok(crate::store::AgentRecord { revoked: true, ..rec }))?;
            if revoked.is_err() {
                return Ok(error(format!("no agent {id}"), "stagehand agents list"));
            }
            ctl.store.flush()?;
            ctl.fleet.kick(&id);
            info!(agent = %id, "Agent revoked.");
            AdminResponse::Revoked { agent: id }
        }
        AdminRequest::RemoveAgent { agent } => {
            let id = AgentId(agent);
            match ctl.store.agent(&id)? {
                None => return Ok(error(format!("no agent {id}"), "stagehand agents list")),
                Some(rec) if !rec.revoked => {
                    return Ok(error(
                        format!("{id} is not revoked; only a revoked agent can be removed"),
                        format!("stagehand agents revoke {id}, then stagehand agents remove {id}"),
                    ))
                }
                Some(_) => {}
            }
            ctl.store.remove_agent(&id)?;
            ctl.store.flush()?;
            ctl.fleet.bump();
            info!(agent = %id, "Revoked agent removed.");
            AdminResponse::Removed { agent: id }
        }
        AdminRequest::AddAdmin { name, role, envs, approval_key } => {
            if let Some(e) = names(&[("name", &name)]) {
                return Ok(e);
            }
            if let Some(e) = envs.iter().find_map(|env| names(&[("environment", env)])) {
                return Ok(e);
            }
            if !crate::access::ROLES.contains(&role.as_str()) {
                return Ok(error(format!("no role {role:?}"), format!("one of: {}", crate::access::ROLES.join(", "))));
            }
            if ctl.store.admin(&name)?.is_some() {
                return Ok(error(format!("an identity {name} exists already"), "stagehand admin list"));
            }
            let lifetime = ctl.config.admin_cert_lifetime;
            let pair = stagehand_common::tls::issue_with_key(
                &ctl.ca,
                &stagehand_common::tls::Role::Admin(name.clone()),
                lifetime,
            )?;
            let (_, expires_at) = stagehand_common::tls::validity(&pair.cert_pem)?;
            let record = AdminRecord {
                v: 1,
                name: name.clone(),
                role,
                envs,
                revoked: false,
                created_at: now_secs(),
                expires_at: expires_at.max(0) as u64,
            };
            ctl.store.put_admin(&record)?;
            ctl.store.put_admin_cert(
                &stagehand_common::tls::fingerprint(&stagehand_common::tls::cert_der(&pair.cert_pem)?),
                &name,
            )?;
            if let Some(key) = approval_key {
                ctl.store.put_approval_key(&name, &key)?;
            }
            ctl.store.flush()?;
            info!(%admin, %name, role = %record.role, "Identity added.");
            // A new approver changes what agents enforce.
            crate::policy::sync_all(ctl)?;
            AdminResponse::AdminAdded {
                admin: admin_info(&record),
                cert_pem: pair.cert_pem,
                key_pem: pair.key_pem,
                ca_pem: ctl.ca.cert_pem.clone(),
            }
        }
        AdminRequest::RenewCertificate { csr_der } => {
            let lifetime = ctl.config.admin_cert_lifetime;
            let role = stagehand_common::tls::Role::Admin(admin.to_string());
            let cert_pem = stagehand_common::tls::issue_for_csr(&ctl.ca, &role, &csr_der, lifetime)?;
            let (_, expires_at) = stagehand_common::tls::validity(&cert_pem)?;
            let Some(mut record) = ctl.store.admin(admin)? else {
                return Ok(error(format!("no identity {admin}"), "ask an owner: stagehand admin add"));
            };
            record.expires_at = expires_at.max(0) as u64;
            ctl.store.put_admin(&record)?;
            // The old certificate stays valid until it expires: a CLI that dies before
            // keeping the new one is not locked out.
            ctl.store.put_admin_cert(
                &stagehand_common::tls::fingerprint(&stagehand_common::tls::cert_der(&cert_pem)?),
                admin,
            )?;
            ctl.store.flush()?;
            info!(%admin, "Identity's certificate renewed.");
            AdminResponse::CertificateRenewed { cert_pem, expires_at: record.expires_at }
        }
        AdminRequest::ListApps => AdminResponse::Apps { versions: list_apps(ctl)? },
        AdminRequest::UiLogin => ctl.web.issue_login(admin),
        AdminRequest::RemoveArtifact { app, version } => remove_artifact(ctl, &app, &version)?,
        AdminRequest::ListAdmins => {
            AdminResponse::Admins { admins: ctl.store.admins()?.iter().map(admin_info).collect() }
        }
        AdminRequest::RevokeAdmin { name } => {
            let Some(mut record) = ctl.store.admin(&name)? else {
                return Ok(error(format!("no identity {name}"), "stagehand admin list"));
            };
            if name == admin {
                return Ok(error("an identity cannot revoke itself", "ask another owner"));
            }
            record.revoked = true;
            ctl.store.put_admin(&record)?;
            ctl.store.flush()?;
            for conn in ctl.admin_conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&name).unwrap_or_default() {
                conn.close(crate::server::CLOSE_UNAUTHORISED.into(), b"identity revoked");
            }
            // Open fleet pages look at their session again, and end.
            ctl.fleet.bump();
            info!(%admin, %name, "Identity revoked.");
            // An approver gone loosens the policy: agents take it only with approvals.
            crate::policy::sync_all(ctl)?;
            AdminResponse::AdminRevoked { name }
        }
        AdminRequest::ToApprove { id } => crate::policy::to_approve(ctl, &id, admin)?,
        AdminRequest::Approve { id, approval } => crate::policy::approve(ctl, &id, admin, approval)?,
        AdminRequest::Reject { id, reason } => crate::policy::reject(ctl, &id, admin, &reason)?,
        AdminRequest::Freeze { env, until, reason } => {
            if let Some(e) = names(&[("environment", &env)]) {
                return Ok(e);
            }
            crate::policy::freeze(ctl, &env, until, &reason, admin)?
        }
        AdminRequest::Unfreeze { env } => crate::policy::unfreeze(ctl, &env, admin)?,
        AdminRequest::ShowPolicy { env } => crate::policy::show(ctl, env.as_deref())?,
        AdminRequest::ResetPolicy { env } => crate::policy::reset(ctl, &env, admin)?,
        AdminRequest::SetApprovalKey { public } => {
            if ed25519_dalek::VerifyingKey::from_bytes(&public).is_err() {
                return Ok(error("that is not an Ed25519 public key", "stagehand admin approval-key"));
            }
            ctl.store.put_approval_key(admin, &public)?;
            ctl.store.flush()?;
            info!(%admin, "Approval key registered.");
            // A new or re-keyed approver changes what agents enforce (a change that needs the
            // approvals of the policy in force where approvals are required).
            crate::policy::sync_all(ctl)?;
            AdminResponse::ApprovalKeySet { name: admin.to_string() }
        }
        AdminRequest::Hello { .. }
        | AdminRequest::Preview { .. }
        | AdminRequest::PushChunks { .. }
        | AdminRequest::WaitStaged { .. }
        | AdminRequest::WaitRelease { .. }
        | AdminRequest::RolloutStatus { .. } => bail!("unexpected request"),
    })
}

fn push_begin(ctl: &Controller, app: &str, version: &str, bytes: &[u8]) -> Result<AdminResponse> {
    if let Some(e) = names(&[("app", app), ("version", version)]) {
        return Ok(e);
    }
    let manifest = match Manifest::decode(bytes) {
        Ok(m) => m,
        Err(e) => return Ok(error(format!("the artifact is not acceptable: {e}"), "fix the tree and push again")),
    };
    let digest = Digest::of(bytes);
    if let Some(existing) = ctl.store.artifact(app, version)? {
        if existing.digest == digest {
            return Ok(AdminResponse::PushNeed { digest, missing: vec![], already_present: true });
        }
        return Ok(conflict(app, version, &existing.digest));
    }
    // Registered before the missing chunks are decided: a collection from now on keeps them.
    let mut pushes = ctl.pushes.lock();
    pushes.insert(digest, std::time::Instant::now());
    // Controllers sharing a chunk directory keep it too (their collections read the store).
    if ctl.store.shared() {
        ctl.store.put_push(&digest, now_secs())?;
        ctl.store.flush()?;
    }
    ctl.chunks.put_manifest(&digest, bytes)?;
    let mut seen = HashSet::new();
    let missing = manifest
        .files()
        .flat_map(|(_, _, _, chunks)| chunks.iter().map(|c| c.digest))
        .filter(|d| seen.insert(*d) && !ctl.chunks.has(d))
        .collect();
    Ok(AdminResponse::PushNeed { digest, missing, already_present: false })
}

fn list_apps(ctl: &Controller) -> Result<Vec<stagehand_common::protocol::VersionInfo>> {
    let mut deployed: HashMap<(String, String), Vec<String>> = HashMap::new();
    let mut released: HashMap<(String, String), Vec<String>> = HashMap::new();
    for (env, app, d) in ctl.store.all_desired()? {
        released.entry((app, d.version)).or_default().push(env);
    }
    let envs: HashSet<String> = ctl.store.agents()?.into_iter().map(|a| a.env).collect();
    let envs = envs.into_iter().chain(ctl.config.environments.order.iter().cloned()).collect::<HashSet<_>>();
    for env in envs {
        for (app, version, _) in ctl.store.deploys_in(&env)? {
            deployed.entry((app, version)).or_default().push(env.clone());
        }
    }
    Ok(ctl
        .store
        .artifacts()?
        .into_iter()
        .map(|(app, version, a)| {
            let k = (app.clone(), version.clone());
            let mut deployed_to = deployed.remove(&k).unwrap_or_default();
            let mut released_in = released.remove(&k).unwrap_or_default();
            deployed_to.sort();
            released_in.sort();
            stagehand_common::protocol::VersionInfo {
                app,
                version,
                digest: a.digest,
                size: a.size,
                pushed_at: a.pushed_at,
                deployed_to,
                released_in,
            }
        })
        .collect())
}

/// Forgets a version no environment runs or is rolling out, then collects what only it used.
fn remove_artifact(ctl: &Controller, app: &str, version: &str) -> Result<AdminResponse> {
    if let Some(e) = names(&[("app", app), ("version", version)]) {
        return Ok(e);
    }
    if ctl.store.artifact(app, version)?.is_none() {
        return Ok(error(format!("{app} {version} has not been pushed"), format!("stagehand versions {app}")));
    }
    let _rollouts = ctl.rollout_lock();
    for (env, a, d) in ctl.store.all_desired()? {
        if a == app && d.version == version {
            return Ok(error(
                format!("{app} {version} is the released version in {env}; agents there may need it again"),
                format!("release another version first: stagehand release {app} VERSION --env {env}"),
            ));
        }
        // What `rollback` would go back to must stay whole.
        if a == app
            && crate::plan::fleet::rollback_target(app, &env, Some(&d.version), &d.history).ok().as_deref()
                == Some(version)
        {
            return Ok(error(
                format!("{app} {version} is what `stagehand rollback {app} --env {env}` goes back to"),
                format!("release a newer version to {env} first, so that {version} is no longer the rollback target"),
            ));
        }
    }
    for (env, a, id) in ctl.store.active_rollouts()? {
        if a == app && ctl.store.rollout(&id)?.is_some_and(|r| r.version == version) {
            return Ok(error(
                format!("rollout {id} is releasing {app} {version} in {env}"),
                format!("let it end, or: stagehand rollout abort {id}"),
            ));
        }
    }
    let agents = ctl.store.agents()?;
    let envs: HashSet<&str> = agents.iter().map(|a| a.env.as_str()).collect();
    for env in envs {
        if crate::deploy::wanted(ctl, env)?.iter().any(|(a, v, _, _)| a == app && v == version) {
            return Ok(error(
                format!("the agents of {env} are ordered to hold {app} {version} (a recent deploy)"),
                format!(
                    "deploy newer versions first (stagehand deploy {app} VERSION --env {env}); older ones drop out"
                ),
            ));
        }
    }
    if let Some(a) =
        agents.iter().find(|a| ctl.store.appstate(&a.id, app).is_ok_and(|s| s.active.as_deref() == Some(version)))
    {
        return Ok(error(
            format!("{app} {version} is live on {} ({}) in {}", a.id, a.name, a.env),
            format!("release another version there first: stagehand release {app} VERSION --env {}", a.env),
        ));
    }
    // The record goes first, durably: from here a crash leaves only garbage.
    ctl.store.remove_artifact(app, version)?;
    ctl.store.flush()?;
    let done = crate::gc::collect(ctl)?;
    info!(%app, %version, chunks = done.chunks, bytes = done.bytes, "Artifact removed.");
    ctl.fleet.bump();
    Ok(AdminResponse::ArtifactRemoved {
        app: app.into(),
        version: version.into(),
        chunks: done.chunks,
        bytes: done.bytes,
    })
}

fn conflict(app: &str, version: &str, existing: &Digest) -> AdminResponse {
    error(
        format!("{app} {version} already exists with other content ({existing}); versions are immutable"),
        format!("push the new content under a new version: stagehand push {app} NEW-VERSION PATH"),
    )
}

async fn push_chunks(ctl: &Controller, digests: &[Digest], recv: &mut quinn::RecvStream) -> Result<AdminResponse> {
    let mut stored = 0u64;
    for d in digests {
        let Some(Some(bytes)) = read_blob::<_, { frame::CHUNK_LIMIT }>(recv).await? else {
            bail!("push stream ended before chunk {}", d.short());
        };
        let store = ctl.chunks.clone();
        let d = *d;
        let result = tokio::task::spawn_blocking(move || store.put(&d, &bytes)).await?;
        if let Err(e) = result {
            return Ok(error(
                format!("chunk {} was refused: {e}", d.short()),
                "push again; if it repeats, the source changed while it was read",
            ));
        }
        stored += 1;
    }
    Ok(AdminResponse::PushChunksDone { stored })
}

fn push_commit(ctl: &Controller, app: &str, version: &str, digest: Digest) -> Result<AdminResponse> {
    // No collection between the check that every chunk is here and the artifact's record.
    let mut pushes = ctl.pushes.lock();
    let bytes = ctl.chunks.manifest(&digest)?;
    let manifest = Manifest::decode(&bytes)?;
    let chunks: Vec<Digest> = manifest.files().flat_map(|(_, _, _, c)| c.iter().map(|c| c.digest)).collect();
    if let Some(d) = chunks.iter().find(|d| !ctl.chunks.has(d)) {
        return Ok(error(
            format!("chunk {} of the artifact was never uploaded", d.short()),
            format!("stagehand push {app} {version} PATH"),
        ));
    }
    ctl.chunks.sync_dirs(chunks.iter())?;
    if let Some(existing) = ctl.store.artifact(app, version)? {
        if existing.digest != digest {
            return Ok(conflict(app, version, &existing.digest));
        }
    }
    let size = manifest.total_size();
    ctl.store.put_artifact(app, version, &ArtifactRecord { v: 1, digest, size, pushed_at: now_secs() })?;
    ctl.store.flush()?;
    pushes.remove(&digest);
    if ctl.store.shared() {
        ctl.store.remove_push(&digest)?;
    }
    info!(%app, %version, %digest, size, "Artifact pushed.");
    Ok(AdminResponse::Pushed { digest, size })
}

fn deploy(ctl: &Controller, app: &str, version: &str, env: &str) -> Result<AdminResponse> {
    if let Some(e) = names(&[("app", app), ("version", version), ("environment", env)]) {
        return Ok(e);
    }
    // No `artifact rm` between reading the artifact and recording the order to stage it.
    let _rm = ctl.rollout_lock();
    let Some(artifact) = ctl.store.artifact(app, version)? else {
        return Ok(error(
            format!("{app} {version} has not been pushed"),
            format!("stagehand push {app} {version} PATH"),
        ));
    };
    let agents = ctl.store.agents_in(env)?;
    if agents.is_empty() && !ctl.config.environments.knows(env) {
        return Ok(error(
            format!("environment {env:?} has no agents and is not configured; nothing was deployed"),
            format!("check the name with `stagehand agents list`, or enrol a host: stagehand token create --env {env}"),
        ));
    }
    let now = now_secs();
    ctl.store.put_deploy(
        env,
        app,
        version,
        &DeployRecord { v: 1, digest: artifact.digest, size: artifact.size, at: now },
    )?;
    let mut send_to = Vec::new();
    for a in &agents {
        let current = ctl.store.stage(&a.id, app, version)?;
        if current.is_some_and(|s| s.state == StageState::Staged && s.digest == artifact.digest) {
            continue;
        }
        ctl.store.put_stage(
            &a.id,
            app,
            version,
            &StageRecord { v: 1, digest: artifact.digest, state: StageState::Pending, at: now },
        )?;
        send_to.push(a.id.clone());
    }
    ctl.store.flush()?;
    for id in &send_to {
        ctl.fleet.send_deploy(
            id,
            DeployDown::Stage {
                app: app.into(),
                version: version.into(),
                digest: artifact.digest,
                size: artifact.size,
            },
        );
    }
    ctl.fleet.bump();
    info!(%app, %version, %env, agents = agents.len(), "Deploy ordered.");
    Ok(AdminResponse::Deployed { digest: artifact.digest, targets: agents.into_iter().map(|a| a.id).collect() })
}

type Progress = (Vec<AgentId>, Vec<(AgentId, String)>, Vec<AgentId>);

fn staged_progress(ctl: &Controller, app: &str, version: &str, env: &str) -> Result<Progress> {
    let (mut done, mut failed, mut pending) = (vec![], vec![], vec![]);
    let digest = ctl.store.artifact(app, version)?.map(|a| a.digest);
    for a in ctl.store.agents_in(env)? {
        match ctl.store.stage(&a.id, app, version)? {
            Some(s) if s.state == StageState::Staged && Some(s.digest) == digest => done.push(a.id),
            Some(StageRecord { state: StageState::Failed(why), .. }) => failed.push((a.id, why)),
            _ => pending.push(a.id),
        }
    }
    Ok((done, failed, pending))
}

fn release_progress(ctl: &Controller, app: &str, env: &str, seq: u64) -> Result<Progress> {
    let (mut done, mut failed, mut pending) = (vec![], vec![], vec![]);
    let Some(desired) = ctl.store.desired(env, app)? else {
        return Ok((done, failed, pending));
    };
    for id in desired.targets.iter().cloned() {
        match ctl.store.receipt(&id, app)? {
            Some(r) if r.seq >= seq && r.outcome == ReceiptOutcome::Committed && r.version == desired.version => {
                done.push(id)
            }
            Some(Receipt { seq: got, outcome: ReceiptOutcome::Refused(why), .. }) if got >= seq => {
                failed.push((id, why.code().to_string()))
            }
            _ => pending.push(id),
        }
    }
    Ok((done, failed, pending))
}

/// Answers when nothing is pending any more, or at the timeout, re-checking on every change.
async fn wait(ctl: &Controller, timeout_secs: u64, progress: impl Fn() -> Result<Progress>) -> Result<AdminResponse> {
    let mut changes = ctl.fleet.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        changes.borrow_and_update();
        let (done, failed, pending) = progress()?;
        if pending.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(AdminResponse::Waited { done, failed, pending });
        }
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
}

pub fn list_agents(ctl: &Controller) -> Result<Vec<AgentInfo>> {
    let mut out = ctl.store.agents()?.into_iter().map(|a| agent_info(ctl, a)).collect::<Result<Vec<_>>>()?;
    out.sort_by(|x, y| (&x.env, &x.name).cmp(&(&y.env, &y.name)));
    Ok(out)
}

/// One agent as `agents list` shows it: per app, what is live, staged and failed.
pub fn agent_info(ctl: &Controller, a: crate::store::AgentRecord) -> Result<AgentInfo> {
    let mut apps: BTreeMap<String, AgentAppInfo> = BTreeMap::new();
    fn entry<'m>(apps: &'m mut BTreeMap<String, AgentAppInfo>, app: &str) -> &'m mut AgentAppInfo {
        apps.entry(app.to_string()).or_insert_with(|| AgentAppInfo {
            app: app.to_string(),
            active: None,
            staged: vec![],
            failed: vec![],
        })
    }
    for (app, version, s) in ctl.store.stages_of(&a.id, None)? {
        let info = entry(&mut apps, &app);
        match s.state {
            StageState::Staged => info.staged.push(version),
            StageState::Failed(why) => info.failed.push((version, why)),
            StageState::Pending => {}
        }
    }
    for (app, st) in ctl.store.appstates_of(&a.id)? {
        entry(&mut apps, &app).active = st.active;
    }
    let connected = ctl.connected(&a.id);
    Ok(AgentInfo {
        version: ctl.store.agent_version(&a.id)?,
        last_seen: if connected { now_secs() } else { ctl.store.last_seen(&a.id)? },
        connected,
        id: a.id,
        name: a.name,
        env: a.env,
        labels: a.labels,
        own_labels: a.own_labels,
        revoked: a.revoked,
        apps: apps.into_values().collect(),
    })
}

fn status(ctl: &Controller, app: &str, env: &str) -> Result<AppStatus> {
    let desired = ctl.store.desired(env, app)?.map(|d| (d.version.clone(), d.seq));
    let mut agents = Vec::new();
    for a in ctl.store.agents_in(env)? {
        let (mut staged, mut staging_failed) = (vec![], vec![]);
        for (_, version, s) in ctl.store.stages_of(&a.id, Some(app))? {
            match s.state {
                StageState::Staged => staged.push(version),
                StageState::Failed(why) => staging_failed.push((version, why)),
                StageState::Pending => {}
            }
        }
        let st = ctl.store.appstate(&a.id, app)?;
        let preview = ctl.store.preview(&a.id, app)?.and_then(|p| Some((p.version?, p.port?)));
        let mut verify = Vec::new();
        for v in &staged {
            if let Some(r) = ctl.store.verify(&a.id, app, v)? {
                use stagehand_common::protocol::VerifyOutcome;
                let what = match r.outcome {
                    VerifyOutcome::Passed => "passed".to_string(),
                    VerifyOutcome::Failed { log } => format!("failed: {}", log.lines().last().unwrap_or("no output")),
                    VerifyOutcome::NotDeclared => "none declared".to_string(),
                };
                verify.push((v.clone(), what));
            }
        }
        agents.push(AgentAppStatus {
            preview,
            verify,
            connected: ctl.connected(&a.id),
            last_receipt: ctl.store.receipt(&a.id, app)?,
            id: a.id,
            name: a.name,
            staged,
            staging_failed,
            active: st.active,
            last_seq: st.last_seq,
        });
    }
    agents.sort_by(|x, y| x.name.cmp(&y.name));
    Ok(AppStatus { app: app.to_string(), env: env.to_string(), desired, agents })
}
