//! The activate message (SPEC §4): the only thing that may change what is live on a host.
//! Its signature covers the exact encoded body; [`verify`] and [`check`] are pure
//! functions so every rule is tested without sockets or disks.

use crate::frame;
use crate::ids::{AgentId, Digest};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The body of an activate message. Fields are only ever added at the end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activate {
    pub app: String,
    pub version: String,
    pub digest: Digest,
    pub env: String,
    pub targets: Targets,
    pub rollout_id: String,
    /// Per-app sequence number; an agent applies only a higher one than it last applied.
    pub seq: u64,
    /// Unix seconds before which the message must not be applied.
    pub not_before: u64,
    /// Unix seconds from which the message is refused.
    pub expires_at: u64,
    /// Which pinned release key signed it.
    pub key_id: String,
    /// The share of new connections (percent) the named version gets on a host in traffic
    /// mode (SPEC §9); the rest stay with the version that had them. 100 moves them all.
    /// Encoded only below 100 or when `approved` follows (see [`Activate::encode`]).
    pub traffic: u8,
    /// The approvals of the rollout's plan (SPEC §14), where the environment requires them.
    /// Encoded only when present.
    pub approved: Option<crate::policy::Approved>,
}

/// Every connection.
pub const FULL_TRAFFIC: u8 = 100;

/// Which agents of the environment a message is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Targets {
    /// Every agent of the environment.
    All,
    /// Exactly these agents.
    Agents(Vec<AgentId>),
}

impl Targets {
    pub fn includes(&self, id: &AgentId) -> bool {
        match self {
            Targets::All => true,
            Targets::Agents(ids) => ids.contains(id),
        }
    }
}

/// An encoded body and the Ed25519 signature over exactly those bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedActivate {
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
}

/// A pinned release public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseKey {
    pub key_id: String,
    pub public: [u8; 32],
}

impl ReleaseKey {
    /// The key id of a public key: `rk-` and the first 8 bytes of its BLAKE3, in hex.
    pub fn id_of(public: &[u8; 32]) -> String {
        format!("rk-{}", hex::encode(&blake3::hash(public).as_bytes()[..8]))
    }

    /// What a join token carries to vouch for this key: BLAKE3 of the public key, hex.
    pub fn fingerprint(&self) -> String {
        blake3::hash(&self.public).to_hex().to_string()
    }

    pub fn from_signing(key: &SigningKey) -> Self {
        let public = key.verifying_key().to_bytes();
        ReleaseKey { key_id: Self::id_of(&public), public }
    }
}

/// Why an agent refused an activate message. The codes are stable: they cross the wire,
/// land in receipts and in scripts that read `-o json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The message could not be decoded.
    Malformed,
    /// No pinned release key has this id.
    UnknownKey,
    /// The signature does not verify under the pinned key.
    BadSignature,
    /// The message is for another environment.
    WrongEnvironment,
    /// The agent is not among the targets.
    NotTargeted,
    /// `seq` is lower than the last applied for this app.
    StaleSeq,
    /// The message has expired.
    Expired,
    /// The named version is not staged here.
    NotStaged,
    /// The staged tree no longer matches the message's digest.
    DigestMismatch,
    /// The artifact's pre-activate hook failed; nothing was switched.
    PreActivateFailed,
    /// After the switch the post-activate hook or health check failed; switched back.
    Unhealthy,
    /// The agent stopped in the middle of this activation; on restart it switched back.
    Interrupted,
    /// Something on the host failed (disk, permissions).
    HostError,
    /// `not_before` is in the future; the message waits.
    NotYetValid,
    /// The message splits traffic (`--traffic` below 100) and the app is not in traffic
    /// mode on this host (no `listen` in agent.toml, or no `[service]` in the artifact).
    NotTrafficMode,
    /// The environment's policy requires approvals the message does not carry (SPEC §14).
    ApprovalsMissing,
    /// The environment's policy requires `[verify]` to have passed here, and it did not.
    NotVerified,
}

impl Refusal {
    /// The stable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::UnknownKey => "unknown-key",
            Refusal::BadSignature => "bad-signature",
            Refusal::WrongEnvironment => "wrong-environment",
            Refusal::NotTargeted => "not-targeted",
            Refusal::StaleSeq => "stale-seq",
            Refusal::Expired => "expired",
            Refusal::NotStaged => "not-staged",
            Refusal::DigestMismatch => "digest-mismatch",
            Refusal::PreActivateFailed => "pre-activate-failed",
            Refusal::Unhealthy => "unhealthy",
            Refusal::Interrupted => "interrupted",
            Refusal::HostError => "host-error",
            Refusal::NotYetValid => "not-yet-valid",
            Refusal::NotTrafficMode => "not-traffic-mode",
            Refusal::ApprovalsMissing => "approvals-missing",
            Refusal::NotVerified => "not-verified",
        }
    }
}

impl Refusal {
    /// Every refusal, in code order.
    pub const ALL: [Refusal; 17] = [
        Refusal::Malformed,
        Refusal::UnknownKey,
        Refusal::BadSignature,
        Refusal::WrongEnvironment,
        Refusal::NotTargeted,
        Refusal::StaleSeq,
        Refusal::Expired,
        Refusal::NotStaged,
        Refusal::DigestMismatch,
        Refusal::PreActivateFailed,
        Refusal::Unhealthy,
        Refusal::Interrupted,
        Refusal::HostError,
        Refusal::NotYetValid,
        Refusal::NotTrafficMode,
        Refusal::ApprovalsMissing,
        Refusal::NotVerified,
    ];

    /// The refusal a stable code names (as `-o json` prints it).
    pub fn from_code(code: &str) -> Option<Refusal> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl Activate {
    /// The bytes that are signed. The two last fields are left out while they say nothing:
    /// `approved` when absent (its `None` is one byte), then `traffic` at 100 (a `u8` is one
    /// byte). So a message that moves all traffic without approvals is byte for byte the
    /// message of protocol 2, which agents of before traffic mode still accept; a weighted or
    /// approved message is refused by them as malformed: it fails closed.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = frame::encode(self);
        if self.approved.is_none() {
            bytes.pop();
            if self.traffic == FULL_TRAFFIC {
                bytes.pop();
            }
        }
        bytes
    }

    /// The inverse of [`Activate::encode`], accepting exactly one encoding per message: with
    /// approvals, every field; without, the weight only when it is 1 to 99.
    pub fn decode(body: &[u8]) -> Option<Activate> {
        if let Ok(a) = frame::decode::<Activate, { frame::CONTROL_LIMIT }>(body) {
            return (a.approved.is_some() && a.traffic > 0 && a.traffic <= FULL_TRAFFIC).then_some(a);
        }
        if body.len() + 2 > frame::CONTROL_LIMIT {
            return None;
        }
        let with = |tail: &[u8]| {
            let mut full = Vec::with_capacity(body.len() + tail.len());
            full.extend_from_slice(body);
            full.extend_from_slice(tail);
            frame::decode::<Activate, { frame::CONTROL_LIMIT }>(&full).ok()
        };
        // The byte put back is `approved`'s `None`; it may also complete a message that has
        // approvals and lacks its last byte (a zero), which is not an encoding of it.
        if let Some(a) = with(&[0]) {
            return (a.approved.is_none() && a.traffic > 0 && a.traffic < FULL_TRAFFIC).then_some(a);
        }
        with(&[FULL_TRAFFIC, 0]).filter(|a| a.traffic == FULL_TRAFFIC && a.approved.is_none())
    }

    /// Decodes a body without checking its signature: for describing a message to a
    /// human, never for deciding anything.
    pub fn decode_unverified(body: &[u8]) -> Option<Activate> {
        Self::decode(body)
    }
}

/// Signs a body with a release key.
pub fn sign(body: &Activate, key: &SigningKey) -> SignedActivate {
    let body = body.encode();
    let signature = key.sign(&body).to_bytes().to_vec();
    SignedActivate { body, signature }
}

/// Rule 1: decodes the body and verifies its signature under a pinned key.
pub fn verify(msg: &SignedActivate, keys: &[ReleaseKey]) -> Result<Activate, Refusal> {
    let body = Activate::decode(&msg.body).ok_or(Refusal::Malformed)?;
    let key = keys.iter().find(|k| k.key_id == body.key_id).ok_or(Refusal::UnknownKey)?;
    let public = VerifyingKey::from_bytes(&key.public).map_err(|_| Refusal::UnknownKey)?;
    let signature: [u8; 64] = msg.signature.as_slice().try_into().map_err(|_| Refusal::BadSignature)?;
    public
        .verify_strict(&msg.body, &ed25519_dalek::Signature::from_bytes(&signature))
        .map_err(|_| Refusal::BadSignature)?;
    Ok(body)
}

/// What an agent knows that the rules need, for the app and version a message names.
#[derive(Clone, Debug)]
pub struct AgentView<'a> {
    pub agent_id: &'a AgentId,
    pub env: &'a str,
    /// The last `seq` applied for the message's app, if any.
    pub last_seq: Option<u64>,
    /// The digest the named version was staged with, if it is staged and still intact;
    /// `Err(())` if it is staged but its content no longer matches.
    pub staged: Option<Result<Digest, ()>>,
}

/// What to do with a message that passed the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it.
    Apply,
    /// Already applied (equal `seq`): answer with the earlier receipt.
    AlreadyApplied,
    /// Valid, but not before this Unix second.
    Wait { until: u64 },
}

/// Rules 2–5 over a verified body. `now` is the agent's clock (never earlier than the
/// latest time it has seen).
pub fn check(msg: &Activate, view: &AgentView<'_>, now: u64) -> Result<Verdict, Refusal> {
    if msg.env != view.env {
        return Err(Refusal::WrongEnvironment);
    }
    if !msg.targets.includes(view.agent_id) {
        return Err(Refusal::NotTargeted);
    }
    match view.last_seq {
        Some(last) if msg.seq == last => return Ok(Verdict::AlreadyApplied),
        Some(last) if msg.seq < last => return Err(Refusal::StaleSeq),
        _ => {}
    }
    if now >= msg.expires_at {
        return Err(Refusal::Expired);
    }
    match view.staged {
        None => return Err(Refusal::NotStaged),
        Some(Err(())) => return Err(Refusal::DigestMismatch),
        Some(Ok(d)) if d != msg.digest => return Err(Refusal::DigestMismatch),
        Some(Ok(_)) => {}
    }
    if now < msg.not_before {
        return Ok(Verdict::Wait { until: msg.not_before });
    }
    Ok(Verdict::Apply)
}

/// The file format of an exported message: JSON with the signed bytes in hex and, for
/// humans only, the decoded body (never trusted: the agent decodes `body` itself).
#[derive(Serialize, Deserialize)]
pub struct ExportFile {
    pub format: String,
    pub body: String,
    pub signature: String,
    #[serde(default)]
    pub describe: Option<serde_json::Value>,
    /// Release key changes the agent may not have seen yet (a rotation while it was away),
    /// applied in order before the message is checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_changes: Vec<crate::keychain::HexKeyChange>,
    /// The environment's release policies (SPEC §14), the chain that took and then the
    /// newest, hex of their encodings: offered to the agent in order (it takes each only as
    /// the policy in force allows) before the message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
}

pub const EXPORT_FORMAT: &str = "stagehand-activate/1";
/// Largest export file an agent reads.
pub const EXPORT_LIMIT: u64 = 1 << 20;

impl SignedActivate {
    /// The JSON text of an export file.
    pub fn to_export(&self, describe: &Activate) -> String {
        self.to_export_with(describe, &[])
    }

    /// The JSON text of an export file that also carries the release key changes.
    pub fn to_export_with(&self, describe: &Activate, key_changes: &[crate::keychain::SignedKeyChange]) -> String {
        self.to_export_full(describe, key_changes, &[])
    }

    /// The JSON text of an export file that carries key changes and the release policy.
    pub fn to_export_full(
        &self,
        describe: &Activate,
        key_changes: &[crate::keychain::SignedKeyChange],
        policies: &[crate::policy::SignedPolicy],
    ) -> String {
        let file = ExportFile {
            policies: policies.iter().map(|p| hex::encode(frame::encode(p))).collect(),
            key_changes: key_changes.iter().map(Into::into).collect(),
            format: EXPORT_FORMAT.into(),
            body: hex::encode(&self.body),
            signature: hex::encode(&self.signature),
            describe: Some(serde_json::json!({
                "app": describe.app, "version": describe.version,
                "digest": describe.digest.to_hex(), "env": describe.env,
                "seq": describe.seq, "expires_at": describe.expires_at,
                "key_id": describe.key_id,
            })),
        };
        serde_json::to_string_pretty(&file).expect("serialising to a string cannot fail") + "\n"
    }

    /// Parses an export file's text (the caller bounds its size).
    pub fn from_export(text: &str) -> Result<Self, String> {
        Self::from_export_with(text).map(|(m, _)| m)
    }

    /// Parses an export file's text: the message and the key changes it carries.
    pub fn from_export_with(text: &str) -> Result<(Self, Vec<crate::keychain::SignedKeyChange>), String> {
        let file: ExportFile = serde_json::from_str(text).map_err(|e| format!("not an activate message file: {e}"))?;
        if file.format != EXPORT_FORMAT {
            return Err(format!("unknown format {:?}, expected {EXPORT_FORMAT:?}", file.format));
        }
        let message = SignedActivate {
            body: hex::decode(file.body.trim()).map_err(|e| format!("body is not hex: {e}"))?,
            signature: hex::decode(file.signature.trim()).map_err(|e| format!("signature is not hex: {e}"))?,
        };
        let changes = file.key_changes.iter().map(TryInto::try_into).collect::<Result<_, _>>()?;
        Ok((message, changes))
    }

    /// The release policies an export file carries, in order.
    pub fn policies_of_export(text: &str) -> Result<Vec<crate::policy::SignedPolicy>, String> {
        let file: ExportFile = serde_json::from_str(text).map_err(|e| format!("not an activate message file: {e}"))?;
        file.policies
            .iter()
            .map(|h| {
                let bytes = hex::decode(h.trim()).map_err(|e| format!("policy is not hex: {e}"))?;
                frame::decode::<_, { frame::CONTROL_LIMIT }>(&bytes).map_err(|e| format!("policy: {e}"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    struct Fixture {
        key: SigningKey,
        keys: Vec<ReleaseKey>,
        me: AgentId,
        body: Activate,
    }

    fn fixture() -> Fixture {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let keys = vec![ReleaseKey::from_signing(&key)];
        let me = AgentId("a-1".into());
        let body = Activate {
            app: "web".into(),
            version: "v2".into(),
            digest: Digest::of(b"tree"),
            env: "prod".into(),
            targets: Targets::Agents(vec![me.clone()]),
            rollout_id: "r1".into(),
            seq: 5,
            not_before: 0,
            expires_at: 2000,
            key_id: keys[0].key_id.clone(),
            traffic: crate::activate::FULL_TRAFFIC,
            approved: None,
        };
        Fixture { key, keys, me, body }
    }

    fn view<'a>(f: &'a Fixture) -> AgentView<'a> {
        AgentView { agent_id: &f.me, env: "prod", last_seq: Some(4), staged: Some(Ok(Digest::of(b"tree"))) }
    }

    fn accepts(f: &Fixture, msg: &SignedActivate, view: &AgentView<'_>, now: u64) -> Result<Verdict, Refusal> {
        let body = verify(msg, &f.keys)?;
        check(&body, view, now)
    }

    #[test]
    fn a_full_traffic_body_is_the_body_of_protocol_2_and_a_weight_is_its_last_byte() {
        let f = fixture();
        let full = f.body.encode();
        // Protocol 2 had no weight: its body is the struct's encoding minus the last byte.
        assert_eq!(full, frame::encode(&f.body)[..full.len()]);
        assert_eq!(Activate::decode(&full), Some(f.body.clone()));
        let weighted = Activate { traffic: 10, ..f.body.clone() };
        let bytes = weighted.encode();
        assert_eq!(bytes.len(), full.len() + 1);
        assert_eq!(Activate::decode(&bytes), Some(weighted));
        // 0 (a version nobody reaches), 100 written out, or above 100, has no meaning: one
        // encoding per message.
        assert_eq!(Activate::decode(&Activate { traffic: 0, ..f.body.clone() }.encode()), None);
        let mut spelled = full.clone();
        spelled.push(100);
        assert_eq!(Activate::decode(&spelled), None);
        spelled.pop();
        spelled.push(101);
        assert_eq!(Activate::decode(&spelled), None);
    }

    /// Found by the `policy` fuzz target: an approved body whose last byte (a zero: here the
    /// length of an empty signature) was cut off decoded, with the cut byte read back as
    /// `approved`'s absent `None`, to the same message: two encodings of one message.
    #[test]
    fn an_approved_body_cut_short_by_a_zero_byte_is_not_an_encoding_of_it() {
        use crate::policy::{Approval, Approved};
        let f = fixture();
        for traffic in [54, FULL_TRAFFIC] {
            let approved = Approved {
                rollout_id: "r-1".into(),
                requester: "bob".into(),
                targets: 1,
                hosts: f.body.digest,
                approvals: vec![Approval { approver: "alice".into(), signature: Vec::new() }],
            };
            let body = Activate { traffic, approved: Some(approved), ..f.body.clone() };
            let bytes = body.encode();
            assert_eq!(bytes.last(), Some(&0));
            assert_eq!(Activate::decode(&bytes), Some(body.clone()));
            assert_eq!(Activate::decode(&bytes[..bytes.len() - 1]), None, "traffic {traffic}");
        }
    }

    #[test]
    fn a_good_message_applies() {
        let f = fixture();
        let msg = sign(&f.body, &f.key);
        assert_eq!(accepts(&f, &msg, &view(&f), 1000), Ok(Verdict::Apply));
    }

    #[test]
    fn rule1_flipped_body_bit_is_refused() {
        let f = fixture();
        let mut msg = sign(&f.body, &f.key);
        for i in 0..msg.body.len() * 8 {
            let mut m = msg.clone();
            m.body[i / 8] ^= 1 << (i % 8);
            assert!(accepts(&f, &m, &view(&f), 1000).is_err(), "bit {i}");
        }
        // One more byte reads as a weight, which the signature does not cover; two are
        // trailing garbage.
        msg.body.push(1);
        assert_eq!(accepts(&f, &msg, &view(&f), 1000), Err(Refusal::BadSignature));
        msg.body.push(1);
        assert_eq!(accepts(&f, &msg, &view(&f), 1000), Err(Refusal::Malformed));
    }

    #[test]
    fn rule1_flipped_signature_bit_is_refused() {
        let f = fixture();
        let msg = sign(&f.body, &f.key);
        for i in 0..512 {
            let mut m = msg.clone();
            m.signature[i / 8] ^= 1 << (i % 8);
            assert_eq!(accepts(&f, &m, &view(&f), 1000), Err(Refusal::BadSignature), "bit {i}");
        }
    }

    #[test]
    fn rule1_other_key_is_refused() {
        let f = fixture();
        // Signed by another key that claims the pinned key's id.
        let other = SigningKey::from_bytes(&[9u8; 32]);
        let msg = sign(&f.body, &other);
        assert_eq!(accepts(&f, &msg, &view(&f), 1000), Err(Refusal::BadSignature));
        // Signed by another key under its own id.
        let mut body = f.body.clone();
        body.key_id = ReleaseKey::from_signing(&other).key_id;
        assert_eq!(accepts(&f, &sign(&body, &other), &view(&f), 1000), Err(Refusal::UnknownKey));
    }

    #[test]
    fn rule2_environment_and_targets() {
        let f = fixture();
        let mut body = f.body.clone();
        body.env = "staging".into();
        assert_eq!(accepts(&f, &sign(&body, &f.key), &view(&f), 1000), Err(Refusal::WrongEnvironment));
        let mut body = f.body.clone();
        body.targets = Targets::Agents(vec![AgentId("a-2".into())]);
        assert_eq!(accepts(&f, &sign(&body, &f.key), &view(&f), 1000), Err(Refusal::NotTargeted));
        body.targets = Targets::All;
        assert_eq!(accepts(&f, &sign(&body, &f.key), &view(&f), 1000), Ok(Verdict::Apply));
    }

    #[test]
    fn rule3_seq_replay_and_lower() {
        let f = fixture();
        let msg = sign(&f.body, &f.key);
        let mut v = view(&f);
        v.last_seq = Some(5);
        assert_eq!(accepts(&f, &msg, &v, 1000), Ok(Verdict::AlreadyApplied));
        v.last_seq = Some(6);
        assert_eq!(accepts(&f, &msg, &v, 1000), Err(Refusal::StaleSeq));
        v.last_seq = None;
        assert_eq!(accepts(&f, &msg, &v, 1000), Ok(Verdict::Apply));
    }

    #[test]
    fn rule4_expiry_and_not_before() {
        let f = fixture();
        let msg = sign(&f.body, &f.key);
        assert_eq!(accepts(&f, &msg, &view(&f), 2000), Err(Refusal::Expired));
        let mut body = f.body.clone();
        body.not_before = 1500;
        let msg = sign(&body, &f.key);
        assert_eq!(accepts(&f, &msg, &view(&f), 1000), Ok(Verdict::Wait { until: 1500 }));
        assert_eq!(accepts(&f, &msg, &view(&f), 1500), Ok(Verdict::Apply));
    }

    #[test]
    fn rule5_staged_and_intact() {
        let f = fixture();
        let msg = sign(&f.body, &f.key);
        let mut v = view(&f);
        v.staged = None;
        assert_eq!(accepts(&f, &msg, &v, 1000), Err(Refusal::NotStaged));
        v.staged = Some(Err(()));
        assert_eq!(accepts(&f, &msg, &v, 1000), Err(Refusal::DigestMismatch));
        v.staged = Some(Ok(Digest::of(b"other")));
        assert_eq!(accepts(&f, &msg, &v, 1000), Err(Refusal::DigestMismatch));
    }

    /// Property: no mutation of a valid message (bytes flipped, truncated, extended,
    /// spliced from another message) is ever accepted as anything but itself.
    #[test]
    fn mutated_messages_are_never_accepted() {
        let f = fixture();
        let msg = sign(&f.body, &f.key);
        let mut other_body = f.body.clone();
        other_body.version = "v3".into();
        let other = sign(&other_body, &f.key);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for round in 0..20_000 {
            let mut m = msg.clone();
            match rng.gen_range(0..6) {
                0 => {
                    let i = rng.gen_range(0..m.body.len());
                    m.body[i] = m.body[i].wrapping_add(rng.gen_range(1..=255));
                }
                1 => {
                    let i = rng.gen_range(0..m.signature.len());
                    m.signature[i] = m.signature[i].wrapping_add(rng.gen_range(1..=255));
                }
                2 => {
                    let n = rng.gen_range(0..m.body.len());
                    m.body.truncate(n);
                }
                3 => m.body.extend((0..rng.gen_range(1..16)).map(|_| rng.gen::<u8>())),
                4 => m.signature = other.signature.clone(),
                _ => {
                    let i = rng.gen_range(0..m.body.len());
                    m.body[i] ^= 0xFF;
                    let j = rng.gen_range(0..m.signature.len());
                    m.signature[j] ^= 0x01;
                }
            }
            assert!(m != msg);
            assert!(accepts(&f, &m, &view(&f), 1000).is_err(), "round {round} accepted a mutation");
        }
    }

    #[test]
    fn export_round_trip() {
        let f = fixture();
        let msg = sign(&f.body, &f.key);
        let text = msg.to_export(&f.body);
        assert_eq!(SignedActivate::from_export(&text).unwrap(), msg);
        assert!(SignedActivate::from_export("{}").is_err());
    }
}
