//! Release key rotation (SPEC §10): a chain of signed statements. A new key is introduced
//! by a statement signed with a key the agent already pins; the old key is retired by a
//! statement signed with the new one. An agent walks the chain in order and applies only
//! what a key it pins at that point signed, so a statement it cannot verify changes
//! nothing, and a retired key can never come back (it was introduced by a key retired
//! before it).

use crate::activate::ReleaseKey;
use crate::frame;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// What one statement changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyChange {
    /// Pin this key beside the signer's.
    Introduce(ReleaseKey),
    /// Stop trusting this key (never the signer's own).
    Retire(ReleaseKey),
}

/// The signed body of a statement. Fields are only ever added at the end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatement {
    pub change: KeyChange,
    /// The key id of the key that signed it.
    pub signer: String,
    /// Unix seconds, for humans.
    pub at: u64,
}

/// An encoded statement and the Ed25519 signature over the domain tag and those bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedKeyChange {
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Signed before the body, so that no key-change signature is ever a valid activate
/// signature or the other way round.
const DOMAIN: &[u8] = b"stagehand/release-key-change/1\0";
/// The most keys an agent pins at once (a rotation pins two for a moment).
pub const MAX_PINNED: usize = 4;

fn signed_bytes(body: &[u8]) -> Vec<u8> {
    [DOMAIN, body].concat()
}

/// Signs a statement.
pub fn sign(change: KeyChange, key: &SigningKey, at: u64) -> SignedKeyChange {
    let signer = ReleaseKey::from_signing(key).key_id;
    let body = frame::encode(&KeyStatement { change, signer, at });
    let signature = key.sign(&signed_bytes(&body)).to_bytes().to_vec();
    SignedKeyChange { body, signature }
}

/// Decodes a statement without checking it: for describing it, never for deciding.
pub fn decode_unverified(s: &SignedKeyChange) -> Option<KeyStatement> {
    frame::decode::<_, { frame::CONTROL_LIMIT }>(&s.body).ok()
}

/// Verifies a statement under the keys pinned now.
fn verify(s: &SignedKeyChange, pinned: &[ReleaseKey]) -> Option<KeyStatement> {
    let stmt = decode_unverified(s)?;
    let key = pinned.iter().find(|k| k.key_id == stmt.signer)?;
    let public = VerifyingKey::from_bytes(&key.public).ok()?;
    let signature: [u8; 64] = s.signature.as_slice().try_into().ok()?;
    public.verify_strict(&signed_bytes(&s.body), &ed25519_dalek::Signature::from_bytes(&signature)).ok()?;
    Some(stmt)
}

/// Walks the chain from the keys pinned now and returns the keys to pin after it. Only
/// statements signed by a key pinned at their point of the chain count; the result is
/// never empty.
pub fn apply(pinned: &[ReleaseKey], chain: &[SignedKeyChange]) -> Vec<ReleaseKey> {
    let mut keys = pinned.to_vec();
    for s in chain {
        let Some(stmt) = verify(s, &keys) else { continue };
        match stmt.change {
            KeyChange::Introduce(k) => {
                let well_formed = k.key_id == ReleaseKey::id_of(&k.public);
                if well_formed && !keys.iter().any(|p| p.key_id == k.key_id) && keys.len() < MAX_PINNED {
                    keys.push(k);
                }
            }
            KeyChange::Retire(k) => {
                if k.key_id != stmt.signer && keys.len() > 1 {
                    keys.retain(|p| p.key_id != k.key_id);
                }
            }
        }
    }
    keys
}

/// The statements that rotate from `old` to `new`: introduced by the old, the old retired
/// by the new.
pub fn rotation(old: &SigningKey, new: &SigningKey, at: u64) -> [SignedKeyChange; 2] {
    [
        sign(KeyChange::Introduce(ReleaseKey::from_signing(new)), old, at),
        sign(KeyChange::Retire(ReleaseKey::from_signing(old)), new, at),
    ]
}

/// A statement as text files carry it (the controller's chain file, export files).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HexKeyChange {
    pub body: String,
    pub signature: String,
}

impl From<&SignedKeyChange> for HexKeyChange {
    fn from(s: &SignedKeyChange) -> Self {
        HexKeyChange { body: hex::encode(&s.body), signature: hex::encode(&s.signature) }
    }
}

impl TryFrom<&HexKeyChange> for SignedKeyChange {
    type Error = String;
    fn try_from(h: &HexKeyChange) -> Result<Self, String> {
        Ok(SignedKeyChange {
            body: hex::decode(h.body.trim()).map_err(|e| format!("a key change's body is not hex: {e}"))?,
            signature: hex::decode(h.signature.trim())
                .map_err(|e| format!("a key change's signature is not hex: {e}"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn public(n: u8) -> ReleaseKey {
        ReleaseKey::from_signing(&key(n))
    }

    fn chain(rotations: u8) -> Vec<SignedKeyChange> {
        (0..rotations).flat_map(|n| rotation(&key(n), &key(n + 1), 0)).collect()
    }

    #[test]
    fn a_rotation_moves_the_pin_to_the_new_key() {
        assert_eq!(apply(&[public(0)], &chain(1)), vec![public(1)]);
        // Offline through three rotations: the whole chain, in order.
        assert_eq!(apply(&[public(0)], &chain(3)), vec![public(3)]);
        // Joined after the first rotation: the statements before it are not its to apply.
        assert_eq!(apply(&[public(1)], &chain(3)), vec![public(3)]);
        // Applying again changes nothing.
        assert_eq!(apply(&[public(3)], &chain(3)), vec![public(3)]);
    }

    #[test]
    fn only_a_pinned_key_changes_the_pins() {
        // An introduction signed by a key nobody pinned.
        let stranger = sign(KeyChange::Introduce(public(9)), &key(8), 0);
        assert_eq!(apply(&[public(0)], &[stranger]), vec![public(0)]);
        // A retired key cannot come back: its introduction was signed by a key retired before.
        let replay = chain(2)[0].clone();
        assert_eq!(apply(&[public(2)], &[replay]), vec![public(2)]);
        // A forged signature.
        let mut forged = sign(KeyChange::Introduce(public(9)), &key(0), 0);
        forged.signature[0] ^= 1;
        assert_eq!(apply(&[public(0)], &[forged]), vec![public(0)]);
        // A key cannot retire itself, and the last key is never retired.
        let suicide = sign(KeyChange::Retire(public(0)), &key(0), 0);
        assert_eq!(apply(&[public(0)], &[suicide]), vec![public(0)]);
        // An introduction whose id does not belong to its key.
        let mut odd = public(5);
        odd.key_id = public(6).key_id;
        let mislabelled = sign(KeyChange::Introduce(odd), &key(0), 0);
        assert_eq!(apply(&[public(0)], &[mislabelled]), vec![public(0)]);
    }

    #[test]
    fn an_activate_signature_is_not_a_key_change_signature() {
        let k = key(0);
        let s = sign(KeyChange::Introduce(public(1)), &k, 0);
        // The same body signed as an activate body would be (no domain tag).
        let raw = SignedKeyChange { body: s.body.clone(), signature: k.sign(&s.body).to_bytes().to_vec() };
        assert_eq!(apply(&[public(0)], &[raw]), vec![public(0)]);
    }

    #[test]
    fn pins_are_bounded() {
        let many: Vec<_> = (1..10).map(|n| sign(KeyChange::Introduce(public(n)), &key(0), 0)).collect();
        assert_eq!(apply(&[public(0)], &many).len(), MAX_PINNED);
    }
}
