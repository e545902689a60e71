//! What the fuzz targets check, as plain functions of the fuzzer's bytes: `fuzz/` (cargo-fuzz,
//! nightly) calls them, and `agent/tests/fuzz_corpus.rs` replays every saved input on stable
//! in `.ci/run`, so a crash once found stays fixed. Each one panics when its oracle fails;
//! an input that is merely refused is fine.

use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use stagehand_common::activate::{self, Activate, AgentView, ReleaseKey, SignedActivate, Targets, Verdict};
use stagehand_common::frame::{self, decode, encode, ADMIN_LIMIT, CONTROL_LIMIT};
use stagehand_common::manifest::{EntryKind, Manifest};
use stagehand_common::protocol::{
    AdminRequest, AdminResponse, DeployDown, DeployUp, JoinDown, JoinUp, ReleaseDown, ReleaseUp,
};
use stagehand_common::token::JoinToken;
use stagehand_common::{AgentId, Digest};
use std::collections::HashMap;

/// An oracle: panics when its property fails for these bytes.
pub type Oracle = fn(&[u8]);

/// The targets by name, as `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/` call them.
pub const TARGETS: [(&str, Oracle); 7] = [
    ("frames", frames),
    ("manifest", manifest),
    ("activate", activate),
    ("journal", journal),
    ("export", export),
    ("token", token),
    ("policy", policy),
];

/// Decodes `data` as `T`; what decodes must encode back to something that decodes the same.
fn round_trip<T, const LIMIT: usize>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = decode::<T, LIMIT>(data) {
        let again = decode::<T, LIMIT>(&encode(&v)).expect("an encoded value decodes");
        assert_eq!(again, v, "a value changed through encode and decode");
    }
}

/// Frame decoding of every protocol enum: never a panic, and a faithful round trip.
pub fn frames(data: &[u8]) {
    round_trip::<DeployUp, CONTROL_LIMIT>(data);
    round_trip::<DeployDown, CONTROL_LIMIT>(data);
    round_trip::<ReleaseUp, CONTROL_LIMIT>(data);
    round_trip::<ReleaseDown, CONTROL_LIMIT>(data);
    round_trip::<AdminRequest, ADMIN_LIMIT>(data);
    round_trip::<AdminResponse, ADMIN_LIMIT>(data);
    round_trip::<JoinUp, CONTROL_LIMIT>(data);
    round_trip::<JoinDown, CONTROL_LIMIT>(data);
}

/// The manifest decoder and `validate`: an accepted tree never resolves outside its root,
/// whatever its symlinks point at.
pub fn manifest(data: &[u8]) {
    let Ok(m) = Manifest::decode(data) else { return };
    let links: HashMap<&str, &str> = m
        .entries
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::Symlink { target } => Some((e.path.as_str(), target.as_str())),
            _ => None,
        })
        .collect();
    for e in &m.entries {
        let parts: Vec<&str> = e.path.split('/').collect();
        assert!(parts.iter().all(|p| !p.is_empty() && *p != "." && *p != ".."), "unsafe path {:?} accepted", e.path);
        if let Some(target) = links.get(e.path.as_str()) {
            assert!(!target.starts_with('/'), "absolute symlink {:?} -> {target:?} accepted", e.path);
            let dir = &parts[..parts.len() - 1];
            let mut seen = 0;
            assert!(resolves_inside(dir, target, &links, &mut seen), "{:?} -> {target:?} escapes the root", e.path);
        }
    }
    assert_eq!(Manifest::decode(&m.encode()).expect("an encoded manifest decodes"), m);
}

/// Whether `target`, relative to the directory `dir` (components under the root), stays
/// under the root, following the tree's own symlinks as the kernel would (a loop resolves
/// to nothing, as ELOOP).
fn resolves_inside(dir: &[&str], target: &str, links: &HashMap<&str, &str>, seen: &mut usize) -> bool {
    let mut at: Vec<String> = dir.iter().map(|s| s.to_string()).collect();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if at.pop().is_none() {
                    return false;
                }
            }
            name => {
                at.push(name.to_string());
                let here = at.join("/");
                if let Some(next) = links.get(here.as_str()) {
                    *seen += 1;
                    if *seen > 40 {
                        return true;
                    }
                    at.pop();
                    let base: Vec<&str> = at.iter().map(String::as_str).collect();
                    if next.starts_with('/') || !resolves_inside(&base, next, links, seen) {
                        return false;
                    }
                    // Where the link led, lexically, for what follows it.
                    at = resolve_lexically(&base, next);
                }
            }
        }
    }
    true
}

fn resolve_lexically(dir: &[&str], target: &str) -> Vec<String> {
    let mut at: Vec<String> = dir.iter().map(|s| s.to_string()).collect();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                at.pop();
            }
            name => at.push(name.to_string()),
        }
    }
    at
}

/// The release key the activate target pins; the fuzzer never has its private half.
fn pinned() -> (SigningKey, ReleaseKey) {
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let public = ReleaseKey::from_signing(&key);
    (key, public)
}

/// `activate::verify` and `check`: only a message whose signature verifies under the pinned
/// key passes rule 1, and `check` says apply only when every other rule holds.
pub fn activate(data: &[u8]) {
    let (_, key) = pinned();
    let Ok(msg) = decode::<SignedActivate, CONTROL_LIMIT>(data) else { return };
    let Ok(body) = activate::verify(&msg, std::slice::from_ref(&key)) else { return };
    let public = VerifyingKey::from_bytes(&key.public).expect("a valid key");
    let sig = Signature::from_slice(&msg.signature).expect("verify accepted the signature's shape");
    assert!(public.verify_strict(&msg.body, &sig).is_ok(), "a message passed rule 1 without a valid signature");
    let me = AgentId("a-1".into());
    let digest = Digest::of(b"staged");
    for (last_seq, staged) in [(None, Some(Ok(digest))), (Some(5), Some(Ok(digest))), (Some(5), None)] {
        let view = AgentView { agent_id: &me, env: "prod", last_seq, staged };
        if let Ok(Verdict::Apply) = activate::check(&body, &view, 1000) {
            assert_eq!(body.env, "prod");
            assert!(
                matches!(&body.targets, Targets::All) || matches!(&body.targets, Targets::Agents(a) if a.contains(&me))
            );
            assert!(last_seq.is_none_or(|s| body.seq > s), "a stale seq applied");
            assert!(body.not_before <= 1000 && 1000 < body.expires_at, "outside its validity");
            assert_eq!(view.staged, Some(Ok(body.digest)), "applied without the staged digest");
        }
    }
}

/// A seed input for `activate`: a message that verifies, so that the fuzzer explores `check`.
pub fn activate_seed() -> Vec<u8> {
    let (key, public) = pinned();
    let body = Activate {
        app: "web".into(),
        version: "1".into(),
        digest: Digest::of(b"staged"),
        env: "prod".into(),
        targets: Targets::All,
        rollout_id: "r-1".into(),
        seq: 6,
        not_before: 0,
        expires_at: 2000,
        key_id: public.key_id,
        traffic: stagehand_common::activate::FULL_TRAFFIC,
        approved: None,
    };
    encode(&activate::sign(&body, &key))
}

/// The journal loader: never a panic; what it loads has a slot's worth of state.
pub fn journal(data: &[u8]) {
    if data.len() > 64 << 10 {
        return;
    }
    let _ = crate::journal::Journal::parse(data);
}

/// Export files (`release --export`): never a panic, and a parsed message frames back.
pub fn export(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(m) = SignedActivate::from_export(text) {
        let _ = frame::encode(&m);
    }
}

/// Join tokens: never a panic, and a parsed token prints back to itself.
pub fn token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(t) = JoinToken::parse(text) {
        assert_eq!(JoinToken::parse(&t.to_string()), Ok(t));
    }
}

/// The approver whose approvals the `policy` target's policy in force requires; the fuzzer
/// never has its private half.
fn approver() -> SigningKey {
    SigningKey::from_bytes(&[8u8; 32])
}

/// The policy in force for the `policy` target: one approval, from the fixed approver.
fn policy_in_force() -> stagehand_common::policy::Policy {
    use stagehand_common::policy::{Approver, Policy};
    let (_, key) = pinned();
    let approvers = vec![Approver { name: "alice".into(), key: approver().verifying_key().to_bytes() }];
    Policy { serial: 5, approvals: 1, approvers, key_id: key.key_id, ..Policy::none("prod") }
}

/// Release policy: an update is taken only signed by the pinned release key, and one that
/// loosens the policy in force only with the approver's signature over it; an activate body
/// has one encoding; a message the release key signed applies under the policy only with a
/// valid approval of its plan (which the fuzzer cannot make).
pub fn policy(data: &[u8]) {
    use stagehand_common::policy::{self as pol, SignedPolicy, Update};
    let (_, key) = pinned();
    let current = policy_in_force();
    if let Ok(update) = decode::<SignedPolicy, CONTROL_LIMIT>(data) {
        if let Ok(Update::Enforce(p)) = pol::accept(&current, &update, std::slice::from_ref(&key), "prod") {
            assert!(p.serial > current.serial && p.env == "prod");
            if current.loosened_by(&p) {
                let alice = approver().verifying_key().to_bytes();
                assert!(
                    update
                        .approvals
                        .iter()
                        .any(|a| a.approver == "alice" && pol::policy_approval_verifies(&update.body, &alice, a)),
                    "a loosening was taken without the approval of the policy in force"
                );
            }
        }
    }
    if let Some(body) = Activate::decode(data) {
        assert_eq!(body.encode(), data, "an activate body with two encodings");
        assert!(pol::approvals_hold(&current, &body, true).is_ok());
        if pol::approvals_hold(&current, &body, false).is_ok() {
            let a = body.approved.as_ref().expect("approvals held without any");
            let plan = a.plan(&body);
            let alice = approver().verifying_key().to_bytes();
            assert!(a.requester != "alice");
            assert!(a.approvals.iter().any(|x| x.approver == "alice" && pol::plan_approval_verifies(&plan, &alice, x)));
        }
    }
}

/// Seed inputs for `policy`: a policy update that tightens, one that loosens with its
/// approval, and an approved activate body.
pub fn policy_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use stagehand_common::policy::{self as pol, Approved, Policy};
    let (release, _) = pinned();
    let tighter = pol::sign(Policy { serial: 6, approvals: 2, ..policy_in_force() }, &release);
    let mut looser = pol::sign(Policy { serial: 7, approvals: 0, ..policy_in_force() }, &release);
    looser.approvals = vec![pol::approve_policy(&looser.body, "alice", &approver())];
    let mut body =
        Activate::decode(&decode::<SignedActivate, CONTROL_LIMIT>(&activate_seed()).expect("the seed decodes").body)
            .expect("the seed's body decodes");
    let mut approved = Approved {
        rollout_id: "r-1".into(),
        requester: "bob".into(),
        targets: 1,
        hosts: Digest([0; 32]),
        approvals: vec![],
    };
    let plan = approved.plan(&body);
    approved.approvals = vec![pol::approve_plan(&plan, "alice", &approver())];
    body.approved = Some(approved);
    vec![("tighter", encode(&tighter)), ("looser", encode(&looser)), ("approved-body", body.encode())]
}
