//! Join tokens: `shj2.<id>.<secret>.<ca-fingerprint>.<release-key-fingerprint>`. The
//! controller keeps only a hash of the secret; the CA fingerprint lets a new agent trust the
//! right controller on first contact, and the release key fingerprint is the only release
//! key it will pin (whoever holds the controller later cannot slip in another).

use serde::{Deserialize, Serialize};

const PREFIX: &str = "shj2";

/// A parsed join token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    pub ca_fingerprint: String,
    /// BLAKE3 of the release public key, hex (`ReleaseKey::fingerprint`).
    pub release_fingerprint: String,
}

impl JoinToken {
    /// A fresh token for the CA and the release key with these fingerprints.
    pub fn generate(ca_fingerprint: &str, release_fingerprint: &str) -> Self {
        JoinToken {
            id: hex::encode(rand::random::<[u8; 6]>()),
            secret: hex::encode(rand::random::<[u8; 16]>()),
            ca_fingerprint: ca_fingerprint.to_string(),
            release_fingerprint: release_fingerprint.to_string(),
        }
    }

    /// The hash the controller stores instead of the secret.
    pub fn secret_hash(secret: &str) -> String {
        blake3::hash(secret.as_bytes()).to_hex().to_string()
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        let hexy = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        match parts[..] {
            [PREFIX, id, secret, ca, rk] if hexy(id, 12) && hexy(secret, 32) && hexy(ca, 64) && hexy(rk, 64) => {
                Ok(JoinToken {
                    id: id.to_string(),
                    secret: secret.to_string(),
                    ca_fingerprint: ca.to_ascii_lowercase(),
                    release_fingerprint: rk.to_ascii_lowercase(),
                })
            }
            ["shj1", ..] => Err("a join token of an older controller, which does not vouch for its release key; \
                 create a new one with `stagehand token create --env ENV`"
                .into()),
            _ => Err("not a Stagehand join token (expected shj2.<id>.<secret>.<ca-fingerprint>.<release-key>); \
                 create one with `stagehand token create --env ENV`"
                .into()),
        }
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}.{}", self.id, self.secret, self.ca_fingerprint, self.release_fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let t = JoinToken::generate(&"ab".repeat(32), &"cd".repeat(32));
        assert_eq!(JoinToken::parse(&t.to_string()).unwrap(), t);
        assert!(JoinToken::parse("shj1.x.y.z").is_err());
        assert!(JoinToken::parse("").is_err());
    }
}
