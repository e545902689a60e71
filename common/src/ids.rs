//! Identifiers and digests shared by every component.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A BLAKE3 digest: of a chunk, or of an encoded manifest (an artifact's digest).
#[derive(Default, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Hashes `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// The full lowercase hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits, for humans.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).ok()?;
        Some(Digest(out))
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Self {
        Digest(*h.as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

/// An agent's id, chosen by the controller at enrolment (`a-` and 16 hex digits).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct AgentId(pub String);

impl AgentId {
    /// A fresh random id.
    pub fn random() -> Self {
        AgentId(format!("a-{}", hex::encode(rand::random::<[u8; 8]>())))
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// Checks an app, version or environment name: 1–128 characters of `[A-Za-z0-9._+-]`,
/// not starting with a dot. These names become directory names on agents.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {kind} {name:?}: use 1-128 characters of letters, digits, '.', '_', '-', '+', not starting with '.'"
        ))
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tables pad ids to a column width (`agents list` was misaligned when they did not).
    #[test]
    fn agent_ids_honour_width() {
        let id = AgentId("a-0123456789abcdef".into());
        assert_eq!(format!("{id:<20}|"), "a-0123456789abcdef  |");
    }

    #[test]
    fn names() {
        assert!(check_name("app", "web").is_ok());
        assert!(check_name("version", "1.2.3+build-7").is_ok());
        for bad in ["", ".", "..", "a/b", ".hidden", "a b", &"x".repeat(129)] {
            assert!(check_name("app", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn digest_hex_round_trip() {
        let d = Digest::of(b"abc");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
    }
}
