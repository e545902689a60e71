//! Test-only crash points: with the `failpoints` feature, `STAGEHAND_FAILPOINT=<name>` (or
//! `<name>:<n>` for counted points) makes the agent SIGKILL itself there, exactly as
//! `kill -9` would. Without the feature these compile to nothing.

/// Dies here if the failpoint `name` is armed.
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var("STAGEHAND_FAILPOINT").is_ok_and(|v| v == name) {
        die(name);
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Dies here if `name:<n>` is armed and this is the n-th time.
pub fn hit_n(name: &str, count: u64) {
    #[cfg(feature = "failpoints")]
    if let Ok(v) = std::env::var("STAGEHAND_FAILPOINT") {
        if v.split_once(':').is_some_and(|(n, c)| n == name && c.parse() == Ok(count)) {
            die(name);
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = (name, count);
}

#[cfg(feature = "failpoints")]
fn die(name: &str) -> ! {
    eprintln!("failpoint {name}: killing myself with SIGKILL");
    let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
    // kill(1) is missing or failed: abort is the next best thing to a hard kill.
    std::process::abort()
}
