//! Replays every saved input of every fuzz target (`fuzz/corpus/<target>/`) through its
//! oracle, on stable: a crash the fuzzer once found stays fixed. The fuzzing itself runs on
//! nightly (`cargo +nightly fuzz run TARGET`, see FUZZING.md).

use std::path::Path;

#[test]
fn every_saved_fuzz_input_passes_its_oracle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (name, oracle) in stagehand_agent::fuzz::TARGETS {
        let dir = root.join(name);
        let mut inputs = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| oracle(&data));
            assert!(outcome.is_ok(), "{name}: {} fails its oracle", path.display());
            inputs += 1;
        }
        assert!(inputs > 0, "no saved inputs for {name} in {}", dir.display());
    }
}

/// The activate seed verifies: the oracle's interesting half (`check`) is reachable.
#[test]
fn the_activate_seed_is_a_valid_message() {
    let seed = stagehand_agent::fuzz::activate_seed();
    let msg: stagehand_common::activate::SignedActivate =
        stagehand_common::frame::decode::<_, { stagehand_common::frame::CONTROL_LIMIT }>(&seed).unwrap();
    let key = stagehand_common::activate::ReleaseKey::from_signing(&ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]));
    assert!(stagehand_common::activate::verify(&msg, &[key]).is_ok());
    stagehand_agent::fuzz::activate(&seed);
}

/// Writes the hand-made seed inputs of every target (`cargo test -p stagehand-agent --test
/// fuzz_corpus -- --ignored`), from which the fuzzer starts.
#[test]
#[ignore]
fn write_seeds() {
    use stagehand_common::protocol::{DeployUp, StageOutcome};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        std::fs::create_dir_all(root.join(target)).unwrap();
        std::fs::write(root.join(target).join(format!("seed-{name}")), bytes).unwrap();
    };
    let report = DeployUp::StageReport {
        app: "web".into(),
        version: "1".into(),
        digest: stagehand_common::Digest::of(b"x"),
        outcome: StageOutcome::Staged { fetched_bytes: 1, reused_bytes: 2, millis: 3 },
    };
    put("frames", "stage-report", &stagehand_common::frame::encode(&report));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("bin")).unwrap();
    std::fs::write(dir.path().join("bin/run"), "#!/bin/sh\n").unwrap();
    std::os::unix::fs::symlink("bin/run", dir.path().join("start")).unwrap();
    let (m, _) = stagehand_common::manifest::build(dir.path()).unwrap();
    put("manifest", "tree", &m.encode());
    let seed = stagehand_agent::fuzz::activate_seed();
    put("activate", "valid", &seed);
    let msg: stagehand_common::activate::SignedActivate =
        stagehand_common::frame::decode::<_, { stagehand_common::frame::CONTROL_LIMIT }>(&seed).unwrap();
    let body = stagehand_common::activate::Activate::decode_unverified(&msg.body).unwrap();
    put("export", "valid", msg.to_export(&body).as_bytes());
    let mut j = stagehand_agent::journal::Journal::default();
    j.last_seq = Some(3);
    let path = dir.path().join("j");
    j.save_durable(&path).unwrap();
    put("journal", "valid", &std::fs::read(&path).unwrap());
    let t = stagehand_common::token::JoinToken::generate(&"ab".repeat(32), &"cd".repeat(32));
    put("token", "valid", t.to_string().as_bytes());
    for (name, bytes) in stagehand_agent::fuzz::policy_seeds() {
        put("policy", name, &bytes);
    }
}
