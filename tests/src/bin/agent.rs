//! The `stagehand-agent` binary with failpoints compiled in, for process-level tests.

fn main() {
    std::process::exit(stagehand_agent::cli::main());
}
