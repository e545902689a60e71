//! `stagehand-agent`: the daemon on every host.

fn main() {
    std::process::exit(stagehand_agent::cli::main());
}
