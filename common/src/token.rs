//! Join tokens: `shj1.<id>.<secret>.<ca-fingerprint>`. The controller keeps only a hash of
//! the secret; the fingerprint lets a new agent trust the right controller on first contact.

use serde::{Deserialize, Serialize};

const PREFIX: &str = "shj1";

/// A parsed join token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    pub ca_fingerprint: String,
}

impl JoinToken {
    /// A fresh token for the CA with this fingerprint.
    pub fn generate(ca_fingerprint: &str) -> Self {
        JoinToken {
            id: hex::encode(rand::random::<[u8; 6]>()),
            secret: hex::encode(rand::random::<[u8; 16]>()),
            ca_fingerprint: ca_fingerprint.to_string(),
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
            [PREFIX, id, secret, fp] if hexy(id, 12) && hexy(secret, 32) && hexy(fp, 64) => Ok(JoinToken {
                id: id.to_string(),
                secret: secret.to_string(),
                ca_fingerprint: fp.to_ascii_lowercase(),
            }),
            _ => Err("not a Stagehand join token (expected shj1.<id>.<secret>.<ca-fingerprint>); \
                 create one with `stagehand token create --env ENV`"
                .into()),
        }
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.id, self.secret, self.ca_fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let t = JoinToken::generate(&"ab".repeat(32));
        assert_eq!(JoinToken::parse(&t.to_string()).unwrap(), t);
        assert!(JoinToken::parse("shj1.x.y.z").is_err());
        assert!(JoinToken::parse("").is_err());
    }
}
