//! The environment's release policy as this agent enforces it (SPEC §14): the newest signed
//! policy it accepted, kept in `identity/policy` (written durably before it counts), and the
//! last update it refused. Which update counts is `common::policy::accept`'s decision.

use anyhow::{Context, Result};
use stagehand_common::policy::{self, Policy, SignedPolicy, Update};
use stagehand_common::protocol::ReleaseUp;
use stagehand_common::{frame, fsx};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tracing::{info, warn};

/// The policy in force and the last refusal.
pub struct Enforced {
    path: PathBuf,
    env: String,
    state: Mutex<(Policy, Option<(u64, String)>)>,
}

fn path(data_dir: &Path) -> PathBuf {
    crate::config::Identity::dir(data_dir).join("policy")
}

impl Enforced {
    /// Loads the policy this agent accepted last; none yet is a policy that requires nothing.
    /// An unreadable file stops the agent: it cannot know what to enforce.
    pub fn load(data_dir: &Path, env: &str) -> Result<Enforced> {
        let path = path(data_dir);
        let policy = match fsx::read_limited(&path, frame::CONTROL_LIMIT as u64) {
            Ok(bytes) => {
                let signed: SignedPolicy = frame::decode::<_, { frame::CONTROL_LIMIT }>(&bytes)
                    .ok()
                    .with_context(|| format!("{} is not a release policy", path.display()))?;
                policy::decode_unverified(&signed)
                    .with_context(|| format!("{} holds an undecodable policy", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Policy::none(env),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Enforced { path, env: env.to_string(), state: Mutex::new((policy, None)) })
    }

    /// The policy in force.
    pub fn get(&self) -> Policy {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    /// What the controller is told: the serial in force and the last refusal.
    pub fn report(&self) -> ReleaseUp {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        ReleaseUp::Policy { serial: s.0.serial, approvals: s.0.approvals, refused: s.1.clone() }
    }

    /// Takes an update if the policy in force lets it (durably, before it counts); a refusal
    /// is kept for the report. Blocking file work: call it off the async threads.
    /// Returns whether what the controller is told changed.
    pub fn offer(&self, signed: &SignedPolicy, keys: &[stagehand_common::activate::ReleaseKey]) -> Result<bool> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match policy::accept(&s.0, signed, keys, &self.env) {
            Ok(Update::Same) => {
                let serial = s.0.serial;
                let before = s.1.take();
                s.1 = before.clone().filter(|(refused, _)| *refused > serial);
                Ok(s.1 != before)
            }
            Ok(Update::Enforce(p)) => {
                fsx::write_atomic(&self.path, &frame::encode(signed), 0o600)
                    .with_context(|| format!("writing {}", self.path.display()))?;
                info!(
                    serial = p.serial,
                    approvals = p.approvals,
                    approvers = p.approvers.len(),
                    verify = p.verify,
                    "Release policy in force."
                );
                s.1 = s.1.take().filter(|(serial, _)| *serial > p.serial);
                s.0 = p;
                Ok(true)
            }
            // An older policy (the controller sends the chain that leads to the newest): passed by.
            Err(policy::PolicyRefusal::Stale) => Ok(false),
            Err(why) => {
                let serial = policy::decode_unverified(signed).map_or(0, |p| p.serial);
                let refused = Some((serial, why.to_string()));
                if s.1 != refused {
                    warn!(serial, reason = %why, "Refused a release policy update.");
                }
                let changed = s.1 != refused;
                s.1 = refused;
                Ok(changed)
            }
        }
    }
}

/// Offers the policies an export file carries (the chain, then the newest), after its key
/// changes were pinned.
pub fn offer_from_export(host: &crate::host::Host, text: &str) -> Result<()> {
    let policies = stagehand_common::activate::SignedActivate::policies_of_export(text)
        .map_err(|e| anyhow::anyhow!("the file's release policy: {e}"))?;
    for p in &policies {
        host.policy.offer(p, &host.release_keys())?;
    }
    Ok(())
}
