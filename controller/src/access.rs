//! Who may do what on the admin channel (SPEC §10): every request is authorised against the
//! role of the operator identity that sent it. Pure: the caller looks the identity up.

use crate::store::AdminRecord;
use stagehand_common::protocol::AdminRequest;

/// The roles, from least to most.
pub const ROLES: [&str; 4] = ["viewer", "deployer", "releaser", "owner"];

/// What a request needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Reading the fleet's state.
    Read,
    /// Pushing and deploying artifacts.
    Deploy,
    /// Releasing, rolling back or steering a rollout in an environment.
    Release(String),
    /// Tokens, agents and identities.
    Own,
}

impl Need {
    /// What a request needs; `rollout_env` finds the environment of a rollout by id.
    pub fn of(req: &AdminRequest, rollout_env: impl Fn(&str) -> Option<String>) -> Need {
        match req {
            AdminRequest::Hello { .. }
            | AdminRequest::ListAgents
            | AdminRequest::Status { .. }
            | AdminRequest::WaitStaged { .. }
            | AdminRequest::WaitRelease { .. }
            | AdminRequest::ListRollouts { .. }
            | AdminRequest::RolloutStatus { .. }
            // Its own certificate: any identity that is not revoked.
            | AdminRequest::RenewCertificate { .. }
            | AdminRequest::ListApps
            // The page shows what a viewer may read; its buttons are authorised one by one.
            | AdminRequest::UiLogin
            | AdminRequest::ShowPolicy { .. }
            // Its own key: any identity that is not revoked (only owners' and releasers' count).
            | AdminRequest::SetApprovalKey { .. } => Need::Read,
            AdminRequest::PushBegin { .. }
            | AdminRequest::PushChunks { .. }
            | AdminRequest::PushCommit { .. }
            | AdminRequest::Deploy { .. }
            | AdminRequest::RemoveArtifact { .. } => Need::Deploy,
            AdminRequest::Release { env, .. } | AdminRequest::Rollback { env, .. } => Need::Release(env.clone()),
            AdminRequest::Rollout(spec) => Need::Release(spec.env.clone()),
            // An unknown rollout: the request fails anyway; only an owner learns that.
            AdminRequest::ControlRollout { id, .. }
            | AdminRequest::ToApprove { id }
            | AdminRequest::Approve { id, .. }
            | AdminRequest::Reject { id, .. } => rollout_env(id).map(Need::Release).unwrap_or(Need::Own),
            AdminRequest::Freeze { env, .. } | AdminRequest::Unfreeze { env } | AdminRequest::Preview { env, .. } => {
                Need::Release(env.clone())
            }
            AdminRequest::CreateToken { .. }
            | AdminRequest::RevokeAgent { .. }
            | AdminRequest::RemoveAgent { .. }
            | AdminRequest::AddAdmin { .. }
            | AdminRequest::ListAdmins
            | AdminRequest::RevokeAdmin { .. }
            | AdminRequest::ResetPolicy { .. } => Need::Own,
        }
    }
}

/// Whether `who` may do what `need` says; the error says why not.
pub fn check(who: &AdminRecord, need: &Need) -> Result<(), String> {
    if who.revoked {
        return Err(format!("the identity {} is revoked", who.name));
    }
    let ok = match (who.role.as_str(), need) {
        ("owner", _) => true,
        (_, Need::Read) => true,
        ("deployer", Need::Deploy) => true,
        ("releaser", Need::Release(env)) => who.envs.is_empty() || who.envs.contains(env),
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let what = match need {
        Need::Read => "read the fleet's state".to_string(),
        Need::Deploy => "push or deploy".to_string(),
        Need::Release(env) => format!("release in {env}"),
        Need::Own => "manage tokens, agents or identities".to_string(),
    };
    let scope = if who.envs.is_empty() { String::new() } else { format!(" in {}", who.envs.join(", ")) };
    Err(format!("{} (role {}{scope}) may not {what}", who.name, who.role))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(role: &str, envs: &[&str]) -> AdminRecord {
        AdminRecord {
            v: 1,
            name: "op".into(),
            role: role.into(),
            envs: envs.iter().map(|e| e.to_string()).collect(),
            revoked: false,
            created_at: 0,
            expires_at: 0,
        }
    }

    #[test]
    fn each_role_may_do_what_its_name_says_and_no_more() {
        let release = |env: &str| Need::Release(env.into());
        let table: &[(&str, &[&str], Need, bool)] = &[
            ("viewer", &[], Need::Read, true),
            ("viewer", &[], Need::Deploy, false),
            ("viewer", &[], release("prod"), false),
            ("viewer", &[], Need::Own, false),
            ("deployer", &[], Need::Deploy, true),
            ("deployer", &[], release("prod"), false),
            ("releaser", &["staging"], release("staging"), true),
            ("releaser", &["staging"], release("prod"), false),
            ("releaser", &[], release("prod"), true),
            ("releaser", &[], Need::Deploy, false),
            ("releaser", &[], Need::Own, false),
            ("owner", &[], Need::Own, true),
            ("owner", &[], release("prod"), true),
        ];
        for (role, envs, need, want) in table {
            assert_eq!(check(&who(role, envs), need).is_ok(), *want, "{role} {envs:?} {need:?}");
        }
        let revoked = AdminRecord { revoked: true, ..who("owner", &[]) };
        assert!(check(&revoked, &Need::Read).is_err());
    }
}
