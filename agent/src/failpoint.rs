//! Test-only crash points: with the `failpoints` feature, `STAGEHAND_FAILPOINT=<name>` (or
//! `<name>:<n>` for counted points) makes the agent SIGKILL itself there, exactly as
//! `kill -9` would. Without the feature these compile to nothing, and so they do in every
//! build without debug assertions (the release profile: `cargo build --release`, `cargo
//! install`): a workspace build unifies features, and the tests' crate asks for this one,
//! so the feature alone would ship it.

/// Dies here if the failpoint `name` is armed.
pub fn hit(name: &str) {
    #[cfg(all(feature = "failpoints", debug_assertions))]
    if std::env::var("STAGEHAND_FAILPOINT").is_ok_and(|v| v == name) {
        die(name);
    }
    #[cfg(not(all(feature = "failpoints", debug_assertions)))]
    let _ = name;
}

/// Dies here if `name:<n>` is armed and this is the n-th time.
pub fn hit_n(name: &str, count: u64) {
    #[cfg(all(feature = "failpoints", debug_assertions))]
    if let Ok(v) = std::env::var("STAGEHAND_FAILPOINT") {
        if v.split_once(':').is_some_and(|(n, c)| n == name && c.parse() == Ok(count)) {
            die(name);
        }
    }
    #[cfg(not(all(feature = "failpoints", debug_assertions)))]
    let _ = (name, count);
}

#[cfg(all(feature = "failpoints", debug_assertions))]
fn die(name: &str) -> ! {
    eprintln!("failpoint {name}: killing myself with SIGKILL");
    let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
    // kill(1) is missing or failed: abort is the next best thing to a hard kill.
    std::process::abort()
}

/// Whether this build can crash on purpose.
pub const ARMABLE: bool = cfg!(all(feature = "failpoints", debug_assertions));
