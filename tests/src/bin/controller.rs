//! The `stagehand` binary, built inside the tests crate so integration tests can run it as a
//! process (`CARGO_BIN_EXE_stagehand-under-test`).

fn main() {
    std::process::exit(stagehand_controller::cli::main());
}
