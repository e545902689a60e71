//! `stagehand audit --data-dir DIR [--verify]`: the controller's audit log, read on its host.

use crate::audit;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// The controller's data directory.
    #[arg(long, env = "STAGEHAND_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Only check the hash chain: exit 0 if every entry holds, 1 at the first that does not.
    #[arg(long)]
    pub verify: bool,
    /// Show only the last N entries.
    #[arg(long)]
    pub last: Option<usize>,
}

pub fn run(a: &AuditArgs, json: bool) -> i32 {
    let path = audit::path(&a.data_dir);
    let entries = match audit::read(&path) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e:#}");
            eprintln!("  next: the log is the record of who did what; restore {} from a backup", path.display());
            return 1;
        }
    };
    if a.verify {
        if json {
            super::print_json(&serde_json::json!({ "intact": true, "entries": entries.len() }));
        } else {
            outln!("{}: intact, {} entries, every hash holds.", path.display(), entries.len());
        }
        return 0;
    }
    let skip = a.last.map_or(0, |n| entries.len().saturating_sub(n));
    for e in &entries[skip..] {
        if json {
            outln!("{}", serde_json::to_string(e).unwrap_or_default());
        } else {
            outln!(
                "{:>6} {} {:<24} {:<16} {:<10} {}",
                e.n,
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.at)),
                super::clean(&e.who),
                e.what,
                super::clean(&e.outcome),
                super::clean(&e.args.to_string())
            );
        }
    }
    0
}
