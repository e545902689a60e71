//! The release key and its rotations, under `DATA/release/`: `release.key` signs, and
//! `chain.json` holds every key change ever made (SPEC §10), which agents are sent on every
//! release channel and in every export file. A rotation runs with the controller stopped.

use crate::config::Layout;
use crate::store::Store;
use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use stagehand_common::activate::{self, Activate, ReleaseKey, SignedActivate};
use stagehand_common::fsx;
use stagehand_common::keychain::{self, HexKeyChange, KeyChange, SignedKeyChange};
use std::path::{Path, PathBuf};

const CHAIN_FORMAT: &str = "stagehand-key-chain/1";
/// The chain file is read whole; a rotation adds two statements of ~200 bytes.
const CHAIN_LIMIT: u64 = 1 << 20;

/// The key that signs, and the changes that lead agents to it.
pub struct ReleaseKeys {
    pub signing: SigningKey,
    pub public: ReleaseKey,
    pub chain: Vec<SignedKeyChange>,
}

#[derive(Serialize, Deserialize)]
struct ChainFile {
    format: String,
    changes: Vec<HexKeyChange>,
}

fn chain_path(layout: &Layout) -> PathBuf {
    layout.release_key().with_file_name("chain.json")
}

fn next_path(layout: &Layout) -> PathBuf {
    layout.release_key().with_file_name("release.next.key")
}

fn read_key(path: &Path) -> Result<SigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed).with_context(|| format!("{} is not a release key", path.display()))?;
    Ok(SigningKey::from_bytes(&seed))
}

fn write_key(path: &Path, key: &SigningKey) -> Result<()> {
    fsx::write_atomic(path, hex::encode(key.to_bytes()).as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))
}

fn read_chain(layout: &Layout) -> Result<Vec<SignedKeyChange>> {
    let path = chain_path(layout);
    let bytes = match fsx::read_limited(&path, CHAIN_LIMIT) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let file: ChainFile = serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    if file.format != CHAIN_FORMAT {
        bail!("{} has format {:?}, expected {CHAIN_FORMAT:?}", path.display(), file.format);
    }
    file.changes.iter().map(|h| SignedKeyChange::try_from(h).map_err(anyhow::Error::msg)).collect()
}

fn write_chain(layout: &Layout, chain: &[SignedKeyChange]) -> Result<()> {
    let file = ChainFile { format: CHAIN_FORMAT.into(), changes: chain.iter().map(Into::into).collect() };
    let path = chain_path(layout);
    fsx::write_atomic(&path, &serde_json::to_vec_pretty(&file)?, 0o644)
        .with_context(|| format!("writing {}", path.display()))
}

/// The key the chain ends with, if it has any change.
fn chain_head(chain: &[SignedKeyChange]) -> Option<String> {
    chain.iter().rev().filter_map(keychain::decode_unverified).find_map(|s| match s.change {
        KeyChange::Introduce(k) => Some(k.key_id),
        KeyChange::Retire(_) => None,
    })
}

/// Loads the signing key and the chain, finishing a rotation a crash interrupted: the new
/// key is written beside the old one first, then the chain that introduces it, then it
/// replaces the old one. So a new key the chain does not name never signed anything.
pub fn load(layout: &Layout) -> Result<ReleaseKeys> {
    let chain = read_chain(layout)?;
    let next = next_path(layout);
    if next.exists() {
        let key = read_key(&next)?;
        let dir = next.parent().expect("the key has a directory");
        if chain_head(&chain).as_deref() == Some(ReleaseKey::from_signing(&key).key_id.as_str()) {
            std::fs::rename(&next, layout.release_key()).context("finishing an interrupted key rotation")?;
        } else {
            std::fs::remove_file(&next).context("removing the key of a rotation that did not happen")?;
        }
        fsx::fsync_dir(dir)?;
    }
    let signing = read_key(&layout.release_key())?;
    let public = ReleaseKey::from_signing(&signing);
    if let Some(head) = chain_head(&chain) {
        if head != public.key_id {
            bail!(
                "{} signs as {} but {} ends with {head}: the release key was replaced by hand. Restore the key the \
                 chain names from a backup",
                layout.release_key().display(),
                public.key_id,
                chain_path(layout).display()
            );
        }
    }
    Ok(ReleaseKeys { signing, public, chain })
}

/// Replaces the release key: a new key, introduced by the current one and retiring it.
/// Returns (old, new) key ids. The old key's secret is gone afterwards.
pub fn rotate(layout: &Layout) -> Result<(String, String)> {
    let old = load(layout)?;
    let new = SigningKey::generate(&mut rand::rngs::OsRng);
    write_key(&next_path(layout), &new)?;
    let mut chain = old.chain;
    chain.extend(keychain::rotation(&old.signing, &new, stagehand_common::ids::now_secs()));
    write_chain(layout, &chain)?;
    let dir = layout.release_key().parent().expect("the key has a directory").to_path_buf();
    std::fs::rename(next_path(layout), layout.release_key()).context("putting the new release key in place")?;
    fsx::fsync_dir(&dir)?;
    Ok((old.public.key_id, ReleaseKey::from_signing(&new).key_id))
}

/// Signs again, with the current key, every stored message another key signed (the
/// environments' desired messages and those of running rollouts), so that what the
/// controller sends again after a rotation verifies on agents that retired the old key.
/// The bodies are unchanged but for the key id: the same seq, expiry and targets.
pub fn resign_stored(store: &Store, keys: &ReleaseKeys) -> Result<usize> {
    let resign = |m: &SignedActivate| -> Option<SignedActivate> {
        let mut body = Activate::decode_unverified(&m.body)?;
        if body.key_id == keys.public.key_id {
            return None;
        }
        body.key_id = keys.public.key_id.clone();
        Some(activate::sign(&body, &keys.signing))
    };
    let mut n = 0;
    for (env, app, mut d) in store.all_desired()? {
        let mut changed = false;
        for m in std::iter::once(&mut d.message).chain(d.more.iter_mut()) {
            if let Some(s) = resign(m) {
                *m = s;
                changed = true;
                n += 1;
            }
        }
        if changed {
            store.put_desired(&env, &app, &d)?;
        }
    }
    for (_, _, id) in store.active_rollouts()? {
        let Some(mut r) = store.rollout(&id)? else { continue };
        let mut changed = false;
        for m in &mut r.messages {
            if let Some(s) = resign(&m.message) {
                m.message = s;
                changed = true;
                n += 1;
            }
        }
        if changed {
            store.put_rollout(&r)?;
        }
    }
    if n > 0 {
        store.flush()?;
    }
    Ok(n)
}

/// Where an operator's approval key lives in its credentials directory (SPEC §14).
pub fn approval_key_path(credentials: &Path) -> PathBuf {
    credentials.join("approval.key")
}

/// Makes an operator's approval key; written with [`save_approval_key`] once the identity
/// exists. Only its public half ever leaves the operator's machine.
pub fn new_approval_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

pub fn save_approval_key(credentials: &Path, key: &SigningKey) -> Result<()> {
    let path = approval_key_path(credentials);
    fsx::write_atomic(&path, hex::encode(key.to_bytes()).as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))
}

/// The approval key of a credentials directory.
pub fn load_approval_key(credentials: &Path) -> Result<SigningKey> {
    let path = approval_key_path(credentials);
    let text = fsx::read_limited(&path, 1024).with_context(|| {
        format!(
            "reading {}: these credentials hold no approval key; make one with `stagehand admin approval-key` \
             (`controller init`'s admin has none)",
            path.display()
        )
    })?;
    let bytes: [u8; 32] = hex::decode(String::from_utf8_lossy(&text).trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("{} is not an approval key", path.display()))?;
    Ok(SigningKey::from_bytes(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("c");
        crate::init::init(&root, "127.0.0.1:0".parse().unwrap()).unwrap();
        (dir, Layout::new(&root))
    }

    /// `kill -9` between the steps of a rotation: before the chain names the new key it
    /// never happened; after, it is finished at the next load.
    #[test]
    fn an_interrupted_rotation_is_undone_or_finished() {
        let (_dir, l) = layout();
        let before = load(&l).unwrap().public;
        write_key(&next_path(&l), &SigningKey::generate(&mut rand::rngs::OsRng)).unwrap();
        assert_eq!(load(&l).unwrap().public, before);
        assert!(!next_path(&l).exists());

        let old = load(&l).unwrap();
        let new = SigningKey::generate(&mut rand::rngs::OsRng);
        write_key(&next_path(&l), &new).unwrap();
        let mut chain = old.chain;
        chain.extend(keychain::rotation(&old.signing, &new, 0));
        write_chain(&l, &chain).unwrap();
        let after = load(&l).unwrap();
        assert_eq!(after.public, ReleaseKey::from_signing(&new));
        assert_eq!(after.chain.len(), 2);
        assert_eq!(keychain::apply(std::slice::from_ref(&before), &after.chain), vec![after.public.clone()]);

        // A key put in place by hand, behind the chain's back, signs nothing.
        write_key(&l.release_key(), &SigningKey::generate(&mut rand::rngs::OsRng)).unwrap();
        assert!(format!("{:#}", load(&l).err().unwrap()).contains("replaced by hand"));
    }

    #[test]
    fn rotations_chain() {
        let (_dir, l) = layout();
        let first = load(&l).unwrap().public;
        let (a, b) = rotate(&l).unwrap();
        let (b2, c) = rotate(&l).unwrap();
        assert_eq!((a, b.clone()), (first.key_id.clone(), b2));
        let now = load(&l).unwrap();
        assert_eq!(now.public.key_id, c);
        assert_eq!(keychain::apply(&[first], &now.chain), vec![now.public]);
    }
}
