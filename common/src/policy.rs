//! Release policy (SPEC §14) as agents enforce it: an environment's policy reaches agents in
//! a statement signed by the release key, and approvals are operators' own Ed25519
//! signatures over a rollout's plan, carried inside the activate messages. All checks are
//! pure functions.
//!
//! The policy rotates as TUF rotates its root: an update that loosens it (fewer approvals,
//! an approver removed or re-keyed, verification switched off) counts only with the
//! approvals the policy in force requires, from that policy's approvers. So neither an
//! admin credential nor the controller host alone can switch approvals off.

use crate::activate::{Activate, ReleaseKey};
use crate::frame;
use crate::ids::Digest;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// An operator identity whose approvals count, and its approval public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approver {
    pub name: String,
    pub key: [u8; 32],
}

/// An environment's policy as agents enforce it. Fields are only ever added at the end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub env: String,
    /// Increases with every policy the controller signs for the environment.
    pub serial: u64,
    /// Distinct approvers (not the requester) a release needs.
    pub approvals: u32,
    pub approvers: Vec<Approver>,
    /// A version is activated only where its `[verify]` passed.
    pub verify: bool,
    /// The release key that signed it.
    pub key_id: String,
    /// Unix seconds, for humans.
    pub at: u64,
}

impl Policy {
    /// What an agent enforces before any policy reached it: nothing.
    pub fn none(env: &str) -> Policy {
        Policy {
            env: env.to_string(),
            serial: 0,
            approvals: 0,
            approvers: vec![],
            verify: false,
            key_id: String::new(),
            at: 0,
        }
    }

    /// Whether `new` asks less than `self`: fewer approvals, verification off, or any change
    /// to who may approve (one added can approve as well as one re-keyed: as TUF's root, the
    /// approver set changes only with the approvals of the set in force).
    pub fn loosened_by(&self, new: &Policy) -> bool {
        new.approvals < self.approvals
            || (self.verify && !new.verify)
            || self.approvers.len() != new.approvers.len()
            || self.approvers.iter().any(|a| !new.approvers.contains(a))
    }

    /// Whether the policy can be met at all: approvers named and keyed once each, and at
    /// least as many as the approvals it requires.
    pub fn well_formed(&self) -> bool {
        let names: BTreeSet<&str> = self.approvers.iter().map(|a| a.name.as_str()).collect();
        let keys: BTreeSet<&[u8; 32]> = self.approvers.iter().map(|a| &a.key).collect();
        names.len() == self.approvers.len()
            && keys.len() == self.approvers.len()
            && self.approvals as usize <= self.approvers.len()
    }

    /// Counts the distinct approvers of this policy, other than `requester`, whose signature
    /// over `domain || bytes` verifies.
    fn count(&self, domain: &[u8], bytes: &[u8], approvals: &[Approval], requester: Option<&str>) -> u32 {
        let signed = [domain, bytes].concat();
        let mut seen = BTreeSet::new();
        for a in approvals {
            if Some(a.approver.as_str()) == requester || seen.contains(&a.approver) {
                continue;
            }
            let Some(who) = self.approvers.iter().find(|x| x.name == a.approver) else { continue };
            if verifies(&who.key, &signed, &a.signature) {
                seen.insert(a.approver.clone());
            }
        }
        seen.len() as u32
    }
}

/// One operator's signature, over a plan or a policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub approver: String,
    pub signature: Vec<u8>,
}

/// A policy signed by the release key, with the approvals a loosening needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPolicy {
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
    pub approvals: Vec<Approval>,
}

/// What an approver signs to let a rollout go: the plan. Fields are only ever added at the end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub app: String,
    pub version: String,
    pub digest: Digest,
    pub env: String,
    pub rollout_id: String,
    /// The identity that asked for the release: its own approval does not count.
    pub requester: String,
    /// How many hosts the rollout targets, and a digest of their sorted ids.
    pub targets: u32,
    pub hosts: Digest,
}

/// What an activate message carries of its rollout's approvals: enough to rebuild the plan
/// from the message's own app, version, digest and environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approved {
    pub rollout_id: String,
    pub requester: String,
    pub targets: u32,
    pub hosts: Digest,
    pub approvals: Vec<Approval>,
}

impl Approved {
    /// The plan the approvals signed, for the message that carries them.
    pub fn plan(&self, msg: &Activate) -> Plan {
        Plan {
            app: msg.app.clone(),
            version: msg.version.clone(),
            digest: msg.digest,
            env: msg.env.clone(),
            rollout_id: self.rollout_id.clone(),
            requester: self.requester.clone(),
            targets: self.targets,
            hosts: self.hosts,
        }
    }
}

/// The digest a plan names its hosts by: BLAKE3 over the sorted ids, each ended by a zero byte.
pub fn hosts_digest<'a>(ids: impl IntoIterator<Item = &'a str>) -> Digest {
    let mut ids: Vec<&str> = ids.into_iter().collect();
    ids.sort_unstable();
    let mut h = blake3::Hasher::new();
    for id in ids {
        h.update(id.as_bytes());
        h.update(&[0]);
    }
    Digest(*h.finalize().as_bytes())
}

/// Domain tags, signed before the bytes, so that no signature of one kind is valid as another.
const POLICY_DOMAIN: &[u8] = b"stagehand/policy/1\0";
const APPROVE_PLAN_DOMAIN: &[u8] = b"stagehand/approve-release/1\0";
const APPROVE_POLICY_DOMAIN: &[u8] = b"stagehand/approve-policy/1\0";

fn verifies(public: &[u8; 32], bytes: &[u8], signature: &[u8]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public) else { return false };
    let Ok(sig): Result<[u8; 64], _> = signature.try_into() else { return false };
    key.verify_strict(bytes, &ed25519_dalek::Signature::from_bytes(&sig)).is_ok()
}

fn sign_with(key: &SigningKey, domain: &[u8], bytes: &[u8]) -> Vec<u8> {
    key.sign(&[domain, bytes].concat()).to_bytes().to_vec()
}

/// Signs a policy with the release key (its `key_id` is set to the key's).
pub fn sign(mut policy: Policy, key: &SigningKey) -> SignedPolicy {
    policy.key_id = ReleaseKey::from_signing(key).key_id;
    let body = frame::encode(&policy);
    let signature = sign_with(key, POLICY_DOMAIN, &body);
    SignedPolicy { body, signature, approvals: vec![] }
}

/// The bytes of a plan, as an approver signs them (after the domain tag).
pub fn plan_bytes(plan: &Plan) -> Vec<u8> {
    frame::encode(plan)
}

/// An approver's signature over a plan.
pub fn approve_plan(plan: &Plan, approver: &str, key: &SigningKey) -> Approval {
    Approval { approver: approver.to_string(), signature: sign_with(key, APPROVE_PLAN_DOMAIN, &plan_bytes(plan)) }
}

/// An approver's signature over a signed policy's body (a loosening).
pub fn approve_policy(body: &[u8], approver: &str, key: &SigningKey) -> Approval {
    Approval { approver: approver.to_string(), signature: sign_with(key, APPROVE_POLICY_DOMAIN, body) }
}

/// Whether `approval` is `key`'s signature over the plan: the controller's check before it
/// records an approval.
pub fn plan_approval_verifies(plan: &Plan, key: &[u8; 32], approval: &Approval) -> bool {
    verifies(key, &[APPROVE_PLAN_DOMAIN, &plan_bytes(plan)].concat(), &approval.signature)
}

/// Whether `approval` is `key`'s signature over a policy body.
pub fn policy_approval_verifies(body: &[u8], key: &[u8; 32], approval: &Approval) -> bool {
    verifies(key, &[APPROVE_POLICY_DOMAIN, body].concat(), &approval.signature)
}

/// Decodes a policy body without checking it: for describing it, never for deciding.
pub fn decode_unverified(s: &SignedPolicy) -> Option<Policy> {
    frame::decode::<Policy, { frame::CONTROL_LIMIT }>(&s.body).ok()
}

/// A request to run a staged version beside the live one, without traffic (SPEC §14).
/// Signed by the release key: it starts code on hosts, though it changes nothing live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preview {
    pub app: String,
    /// None: stop the preview.
    pub version: Option<String>,
    pub digest: Option<Digest>,
    pub env: String,
    pub expires_at: u64,
    pub key_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPreview {
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
}

const PREVIEW_DOMAIN: &[u8] = b"stagehand/preview/1\0";

/// Signs a preview request with the release key.
pub fn sign_preview(mut p: Preview, key: &SigningKey) -> SignedPreview {
    p.key_id = ReleaseKey::from_signing(key).key_id;
    let body = frame::encode(&p);
    let signature = sign_with(key, PREVIEW_DOMAIN, &body);
    SignedPreview { body, signature }
}

/// Verifies a preview request for an agent of `env` at `now`; `None` if it does not hold.
pub fn verify_preview(s: &SignedPreview, keys: &[ReleaseKey], env: &str, now: u64) -> Option<Preview> {
    let p: Preview = frame::decode::<_, { frame::CONTROL_LIMIT }>(&s.body).ok()?;
    let key = keys.iter().find(|k| k.key_id == p.key_id)?;
    (verifies(&key.public, &[PREVIEW_DOMAIN, &s.body].concat(), &s.signature) && p.env == env && now < p.expires_at)
        .then_some(p)
}

/// Why an agent refused a policy update. Codes are stable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyRefusal {
    /// It could not be decoded.
    Malformed,
    /// No pinned release key signed it.
    BadSignature,
    /// It is another environment's.
    WrongEnvironment,
    /// Its serial is below the one in force.
    Stale,
    /// Its serial is the one in force, with other terms: the controller's state went back
    /// (restored from an older copy) and it signed that serial again.
    Fork,
    /// It loosens the policy in force without that policy's approvals: `have` of `need`.
    NotApproved { have: u32, need: u32 },
}

impl PolicyRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            PolicyRefusal::Malformed => "malformed",
            PolicyRefusal::BadSignature => "bad-signature",
            PolicyRefusal::WrongEnvironment => "wrong-environment",
            PolicyRefusal::Stale => "stale",
            PolicyRefusal::Fork => "conflicting-serial",
            PolicyRefusal::NotApproved { .. } => "loosened-without-approvals",
        }
    }
}

impl std::fmt::Display for PolicyRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyRefusal::NotApproved { have, need } => write!(
                f,
                "{}: it asks less than the policy in force and carries {have} of the {need} approval(s) that policy requires",
                self.code()
            ),
            other => f.write_str(other.code()),
        }
    }
}

/// What to do with a policy update that passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// Enforce this from now on.
    Enforce(Policy),
    /// The policy in force already (same serial).
    Same,
}

/// Decides whether an agent of `env` that enforces `current` takes `new`.
pub fn accept(current: &Policy, new: &SignedPolicy, keys: &[ReleaseKey], env: &str) -> Result<Update, PolicyRefusal> {
    let policy = decode_unverified(new).ok_or(PolicyRefusal::Malformed)?;
    if policy.env != env {
        return Err(PolicyRefusal::WrongEnvironment);
    }
    // Older than what is enforced: passed by before its signature is looked at (it may be
    // signed by a release key retired since), as nothing it says can count.
    if policy.serial == current.serial && current.serial > 0 {
        return if policy == *current { Ok(Update::Same) } else { Err(PolicyRefusal::Fork) };
    }
    if policy.serial < current.serial {
        return Err(PolicyRefusal::Stale);
    }
    let key = keys.iter().find(|k| k.key_id == policy.key_id).ok_or(PolicyRefusal::BadSignature)?;
    if !verifies(&key.public, &[POLICY_DOMAIN, &new.body].concat(), &new.signature) {
        return Err(PolicyRefusal::BadSignature);
    }
    if !policy.well_formed() {
        return Err(PolicyRefusal::Malformed);
    }
    let (have, need) = approved_over(current, &policy, new);
    if have < need {
        return Err(PolicyRefusal::NotApproved { have, need });
    }
    Ok(Update::Enforce(policy))
}

/// The approvals `new` (the policy `signed` carries) has and needs to replace `current`:
/// none needed unless it asks less, else the approvals `current` requires, from its approvers.
pub fn approved_over(current: &Policy, new: &Policy, signed: &SignedPolicy) -> (u32, u32) {
    if !current.loosened_by(new) {
        return (0, 0);
    }
    (current.count(APPROVE_POLICY_DOMAIN, &signed.body, &signed.approvals, None), current.approvals)
}

/// The approvals rule an agent adds to SPEC §4: under a policy that requires k approvals,
/// a message is applied only with k valid signatures of distinct approvers other than the
/// requester over its plan. `undo` (the message names, with its content, a version this host
/// ran, or its current one) is always allowed, as a rollback is: a change can be taken back
/// without a quorum, and nothing new can go live without one.
pub fn approvals_hold(policy: &Policy, msg: &Activate, undo: bool) -> Result<(), (u32, u32)> {
    if policy.approvals == 0 || undo {
        return Ok(());
    }
    let have = match &msg.approved {
        Some(a) => policy.count(APPROVE_PLAN_DOMAIN, &plan_bytes(&a.plan(msg)), &a.approvals, Some(&a.requester)),
        None => 0,
    };
    if have >= policy.approvals {
        Ok(())
    } else {
        Err((have, policy.approvals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activate::{Targets, FULL_TRAFFIC};

    struct Fixture {
        release: SigningKey,
        keys: Vec<ReleaseKey>,
        alice: SigningKey,
        bob: SigningKey,
        carol: SigningKey,
    }

    fn fixture() -> Fixture {
        let release = SigningKey::from_bytes(&[1; 32]);
        Fixture {
            keys: vec![ReleaseKey::from_signing(&release)],
            release,
            alice: SigningKey::from_bytes(&[2; 32]),
            bob: SigningKey::from_bytes(&[3; 32]),
            carol: SigningKey::from_bytes(&[4; 32]),
        }
    }

    fn approver(name: &str, key: &SigningKey) -> Approver {
        Approver { name: name.into(), key: key.verifying_key().to_bytes() }
    }

    fn policy(f: &Fixture, serial: u64, approvals: u32) -> Policy {
        Policy {
            env: "prod".into(),
            serial,
            approvals,
            approvers: vec![approver("alice", &f.alice), approver("bob", &f.bob), approver("carol", &f.carol)],
            verify: false,
            key_id: String::new(),
            at: 0,
        }
    }

    fn message() -> Activate {
        Activate {
            app: "web".into(),
            version: "2".into(),
            digest: Digest::of(b"tree"),
            env: "prod".into(),
            targets: Targets::All,
            rollout_id: "r-1".into(),
            seq: 3,
            not_before: 0,
            expires_at: 10,
            key_id: "rk".into(),
            traffic: FULL_TRAFFIC,
            approved: None,
        }
    }

    fn approved(msg: &Activate, by: &[(&str, &SigningKey)]) -> Activate {
        let mut a = Approved {
            rollout_id: "r-1".into(),
            requester: "alice".into(),
            targets: 1,
            hosts: Digest([0; 32]),
            approvals: vec![],
        };
        let plan = a.plan(msg);
        a.approvals = by.iter().map(|(n, k)| approve_plan(&plan, n, k)).collect();
        Activate { approved: Some(a), ..msg.clone() }
    }

    #[test]
    fn tightening_is_taken_and_loosening_needs_the_old_policys_approvals() {
        let f = fixture();
        let none = Policy::none("prod");
        let one = sign(policy(&f, 1, 1), &f.release);
        let Ok(Update::Enforce(p1)) = accept(&none, &one, &f.keys, "prod") else { panic!("tightening refused") };
        assert_eq!(accept(&p1, &one, &f.keys, "prod"), Ok(Update::Same));
        // Lowering approvals, unapproved, by another approver's key, by a non-approver.
        let mut zero = sign(policy(&f, 2, 0), &f.release);
        assert_eq!(accept(&p1, &zero, &f.keys, "prod"), Err(PolicyRefusal::NotApproved { have: 0, need: 1 }));
        let mallory = SigningKey::from_bytes(&[9; 32]);
        zero.approvals = vec![approve_policy(&zero.body, "bob", &mallory)];
        assert!(accept(&p1, &zero, &f.keys, "prod").is_err());
        zero.approvals = vec![approve_policy(&zero.body, "mallory", &mallory)];
        assert!(accept(&p1, &zero, &f.keys, "prod").is_err());
        // An approval of another policy body does not carry over.
        let other = sign(policy(&f, 3, 0), &f.release);
        zero.approvals = vec![approve_policy(&other.body, "bob", &f.bob)];
        assert!(accept(&p1, &zero, &f.keys, "prod").is_err());
        zero.approvals = vec![approve_policy(&zero.body, "bob", &f.bob)];
        assert!(matches!(accept(&p1, &zero, &f.keys, "prod"), Ok(Update::Enforce(p)) if p.approvals == 0));
        // Removing an approver is a loosening too.
        let mut fewer = policy(&f, 2, 1);
        fewer.approvers.pop();
        assert!(accept(&p1, &sign(fewer, &f.release), &f.keys, "prod").is_err());
        // Adding an approver, too: a new approver can approve alone.
        let mut more = policy(&f, 2, 1);
        more.approvers.push(approver("mallory", &SigningKey::from_bytes(&[9; 32])));
        assert!(p1.loosened_by(&more));
        assert!(accept(&p1, &sign(more, &f.release), &f.keys, "prod").is_err());
        // A name twice (a second key for alice), a key twice, more approvals than approvers:
        // refused whatever approvals they carry.
        let mut twice = policy(&f, 2, 1);
        twice.approvers.insert(0, approver("alice", &SigningKey::from_bytes(&[9; 32])));
        let mut twice = sign(twice, &f.release);
        twice.approvals = vec![approve_policy(&twice.body, "bob", &f.bob)];
        assert_eq!(accept(&p1, &twice, &f.keys, "prod"), Err(PolicyRefusal::Malformed));
        let mut same_key = policy(&f, 2, 1);
        same_key.approvers[1].key = same_key.approvers[0].key;
        assert_eq!(accept(&p1, &sign(same_key, &f.release), &f.keys, "prod"), Err(PolicyRefusal::Malformed));
        assert_eq!(accept(&p1, &sign(policy(&f, 2, 4), &f.release), &f.keys, "prod"), Err(PolicyRefusal::Malformed));
        // Turning verification off as well.
        let mut verifying = p1.clone();
        verifying.verify = true;
        assert!(!p1.loosened_by(&verifying) && verifying.loosened_by(&p1));
    }

    #[test]
    fn a_policy_must_be_signed_for_this_environment_and_newer() {
        let f = fixture();
        let p1 = Policy { key_id: ReleaseKey::from_signing(&f.release).key_id, ..policy(&f, 5, 1) };
        let forged = sign(policy(&f, 6, 2), &SigningKey::from_bytes(&[8; 32]));
        assert_eq!(accept(&p1, &forged, &f.keys, "prod"), Err(PolicyRefusal::BadSignature));
        let mut flipped = sign(policy(&f, 6, 2), &f.release);
        flipped.body[20] ^= 1;
        assert!(accept(&p1, &flipped, &f.keys, "prod").is_err());
        let mut staging = policy(&f, 6, 2);
        staging.env = "staging".into();
        assert_eq!(accept(&p1, &sign(staging, &f.release), &f.keys, "prod"), Err(PolicyRefusal::WrongEnvironment));
        assert_eq!(accept(&p1, &sign(policy(&f, 4, 3), &f.release), &f.keys, "prod"), Err(PolicyRefusal::Stale));
        assert_eq!(accept(&p1, &sign(policy(&f, 5, 3), &f.release), &f.keys, "prod"), Err(PolicyRefusal::Fork));
    }

    #[test]
    fn a_release_needs_distinct_approvers_other_than_the_requester() {
        let f = fixture();
        let p = policy(&f, 1, 2);
        let msg = message();
        assert_eq!(approvals_hold(&p, &msg, false), Err((0, 2)));
        assert_eq!(approvals_hold(&p, &msg, true), Ok(()));
        assert_eq!(approvals_hold(&policy(&f, 1, 0), &msg, false), Ok(()));
        // The requester's own approval and a second copy of one approver's count nothing.
        let m = approved(&msg, &[("alice", &f.alice), ("bob", &f.bob), ("bob", &f.bob)]);
        assert_eq!(approvals_hold(&p, &m, false), Err((1, 2)));
        let m = approved(&msg, &[("bob", &f.bob), ("carol", &f.carol)]);
        assert_eq!(approvals_hold(&p, &m, false), Ok(()));
        // Forged: carol's name, bob's key; and approvals moved to another version.
        let forged = approved(&msg, &[("bob", &f.bob), ("carol", &f.bob)]);
        assert_eq!(approvals_hold(&p, &forged, false), Err((1, 2)));
        let moved = Activate { version: "3".into(), ..m.clone() };
        assert_eq!(approvals_hold(&p, &moved, false), Err((0, 2)));
        let mut other_requester = m.clone();
        other_requester.approved.as_mut().unwrap().requester = "bob".into();
        assert_eq!(approvals_hold(&p, &other_requester, false), Err((0, 2)));
    }
}
