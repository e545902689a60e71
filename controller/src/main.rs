//! `stagehand`: the controller daemon and the operator CLI.

fn main() {
    std::process::exit(stagehand_controller::cli::main());
}
