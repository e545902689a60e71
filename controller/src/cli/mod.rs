//! The `stagehand` command line: the controller daemon and the operator's client commands.

/// `println!` for command output: a reader that goes away (`stagehand agents list | head -1`)
/// ends the command quietly instead of a panic.
macro_rules! outln {
    ($($t:tt)*) => { $crate::cli::write_out(format_args!("{}\n", format_args!($($t)*))) };
}

/// `print!` for command output, as [`outln!`].
macro_rules! out {
    ($($t:tt)*) => { $crate::cli::write_out(format_args!($($t)*)) };
}

mod admin;
mod agents;
mod apps;
mod audit;
mod controller;
mod deploy;
mod dev;
mod install;
mod policy;
pub mod push;
mod release;
mod rollout;
pub mod status;
mod token;
mod ui;

use crate::client::{Client, OpError};
use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Stagehand: ship software to fleets; stage everywhere first, release with one signed
/// message per host.
#[derive(Parser, Debug)]
#[command(
    name = "stagehand",
    version,
    propagate_version = true,
    after_help = "Environment: STAGEHAND_CONTROLLER, STAGEHAND_CREDENTIALS and STAGEHAND_CONNECT_TIMEOUT stand in for \
                  the options of the same name. STAGEHAND_LOG sets what is logged on stderr: error, warn (the default \
                  for client commands), info (for the daemon), debug, trace, or a filter such as \
                  stagehand_controller=debug."
)]
pub struct Cli {
    /// Controller address (HOST:PORT) for client commands.
    #[arg(long, global = true, env = "STAGEHAND_CONTROLLER")]
    pub controller: Option<String>,
    /// Admin credentials directory (cert.pem, key.pem, ca.pem).
    #[arg(long, global = true, env = "STAGEHAND_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// How long client commands wait for the controller to answer (e.g. 5s, 500ms).
    #[arg(long, global = true, env = "STAGEHAND_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: std::time::Duration,
    /// Output format for commands that print data.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Set up or run the controller daemon.
    #[command(subcommand)]
    Controller(controller::ControllerCommand),
    /// A local fleet on loopback, no set-up: a controller and one agent per environment.
    Dev(dev::DevArgs),
    /// Join tokens for new agents.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// The fleet's agents.
    #[command(subcommand)]
    Agents(agents::AgentsCommand),
    /// Operator identities and their roles: add, list, revoke.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// The controller's audit log, read on its host: every entry, or --verify its hash chain.
    Audit(audit::AuditArgs),
    /// Upload a file or directory as an artifact (app, version).
    Push(push::PushArgs),
    /// Stage a version on every agent of an environment.
    Deploy(deploy::DeployArgs),
    /// Make a staged version live across an environment, as a rollout in waves gated by health.
    Release(release::ReleaseArgs),
    /// A rollout back to the previous (or a named) staged version; one wave by default.
    Rollback(release::RollbackArgs),
    /// Per agent: staged versions, active version, last receipt.
    Status(status::StatusArgs),
    /// Print a one-time link that signs a browser in to the fleet page (served under --http).
    Ui,
    /// Follow and steer rollouts: list, status [--watch], pause, resume, abort.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// What was pushed: apps, their versions, where they are released.
    #[command(subcommand)]
    Apps(apps::AppsCommand),
    /// An app's pushed versions: digest, size, when, where deployed and released.
    Versions(apps::VersionsArgs),
    /// An app's releases and rollbacks in an environment: when, by whom, with what outcome.
    History(apps::HistoryArgs),
    /// Pushed versions: rm.
    #[command(subcommand)]
    Artifact(apps::ArtifactCommand),
    /// Approve a rollout awaiting approval (or a policy change) with your own approval key.
    Approve(policy::ApproveArgs),
    /// End a rollout awaiting approval or its release window; nothing is sent.
    Reject(policy::RejectArgs),
    /// Stop new releases to an environment (rollbacks stay allowed), with a reason.
    Freeze(policy::FreezeArgs),
    /// End an environment's freeze.
    Unfreeze(policy::UnfreezeArgs),
    /// Release policy: show what applies to each environment and where it comes from.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Start a staged version beside the live one on traffic-mode hosts, without traffic
    /// (`preview APP VERSION --env ENV`); `preview stop APP --env ENV` ends it.
    Preview(policy::PreviewArgs),
    /// Print a shell completion script: bash, zsh or fish (e.g. `stagehand completion bash >
    /// /etc/bash_completion.d/stagehand`).
    Completion { shell: clap_complete::Shell },
    /// Write man pages (stagehand.1 and one per subcommand) into a directory.
    #[command(hide = true)]
    Man {
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

/// Global options client commands need.
pub struct Ctx {
    pub controller: Option<String>,
    pub credentials: Option<PathBuf>,
    pub output: Output,
    pub connect_timeout: std::time::Duration,
}

impl Ctx {
    pub async fn client(&self) -> Result<Client> {
        Client::connect_within(self.controller.as_deref(), self.credentials.as_deref(), self.connect_timeout).await
    }

    pub fn json(&self) -> bool {
        self.output == Output::Json
    }
}

/// Writes command output; when stdout's reader is gone (a closed pipe), the command has done
/// its work and nobody reads the rest: exit 0 quietly.
pub fn write_out(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// Prints a JSON value on stdout.
pub fn print_json(v: &serde_json::Value) {
    outln!("{}", serde_json::to_string_pretty(v).expect("JSON values serialise"));
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let daemon = matches!(cli.command, Command::Controller(controller::ControllerCommand::Serve(_)) | Command::Dev(_));
    init_logging(if daemon { "info" } else { "warn" });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    let ctx = Ctx {
        controller: cli.controller,
        credentials: cli.credentials,
        output: cli.output,
        connect_timeout: cli.connect_timeout,
    };
    let json = ctx.json();
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Controller(c) => controller::run(c, &ctx).await,
            Command::Dev(a) => dev::run(a, &ctx).await,
            Command::Token(c) => token::run(c, &ctx).await,
            Command::Agents(c) => agents::run(c, &ctx).await,
            Command::Admin(c) => admin::run(c, &ctx).await,
            Command::Audit(a) => Ok(audit::run(&a, ctx.json())),
            Command::Push(a) => push::run(a, &ctx).await,
            Command::Deploy(a) => deploy::run(a, &ctx).await,
            Command::Release(a) => release::run_release(a, &ctx).await,
            Command::Rollback(a) => release::run_rollback(a, &ctx).await,
            Command::Status(a) => status::run(a, &ctx).await,
            Command::Rollout(c) => rollout::run(c, &ctx).await,
            Command::Ui => ui::run(&ctx).await,
            Command::Apps(apps::AppsCommand::List) => apps::list(&ctx).await,
            Command::Versions(a) => apps::show_versions(a, &ctx).await,
            Command::History(a) => apps::history(a, &ctx).await,
            Command::Artifact(c) => apps::artifact(c, &ctx).await,
            Command::Approve(a) => policy::approve(a, &ctx).await,
            Command::Reject(a) => policy::reject(a, &ctx).await,
            Command::Freeze(a) => policy::freeze(a, &ctx).await,
            Command::Unfreeze(a) => policy::unfreeze(a, &ctx).await,
            Command::Policy(c) => policy::policy(c, &ctx).await,
            Command::Preview(a) => policy::preview(a, &ctx).await,
            Command::Completion { shell } => {
                use clap::CommandFactory;
                let mut out = Vec::new();
                clap_complete::generate(shell, &mut Cli::command(), "stagehand", &mut out);
                out!("{}", String::from_utf8_lossy(&out));
                Ok(0)
            }
            Command::Man { out } => man_pages(&out),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            if json {
                report_json(&e);
            } else {
                report(&e);
            }
            1
        }
    }
}

/// Writes `stagehand.1` and `stagehand-SUBCOMMAND.1` (nested ones too) into `dir`.
fn man_pages(dir: &std::path::Path) -> Result<i32> {
    use clap::CommandFactory;
    fn write(cmd: clap::Command, name: String, dir: &std::path::Path, n: &mut usize) -> Result<()> {
        let cmd = cmd.name(name.clone());
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
        stagehand_common::fsx::write_atomic(&dir.join(format!("{name}.1")), &page, 0o644)?;
        *n += 1;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub.clone(), format!("{name}-{}", sub.get_name()), dir, n)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut n = 0;
    write(Cli::command(), "stagehand".into(), dir, &mut n)?;
    outln!("Wrote {n} man pages to {}.", dir.display());
    Ok(0)
}

/// An error's text: each cause once (a cause that repeats the text before it is dropped).
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if c.contains(&text) {
            // The cause repeats what was said and adds to it.
            text = c;
        } else if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    // Errors may quote what a peer sent (an agent's staging failure): never printed raw.
    clean(&text)
}

/// Prints an error: what failed, why, and what to run next.
pub fn report(e: &anyhow::Error) {
    eprintln!("error: {}", error_text(e));
    if let Some(op) = e.chain().find_map(|c| c.downcast_ref::<OpError>()) {
        eprintln!("  next: {}", clean(&op.hint));
    }
}

/// Prints an error as `-o json` asks: `{"error": …, "next": …}` on stdout.
pub fn report_json(e: &anyhow::Error) {
    let next = e.chain().find_map(|c| c.downcast_ref::<OpError>()).map(|op| op.hint.clone());
    print_json(&serde_json::json!({ "error": error_text(e), "next": next }));
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STAGEHAND_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

/// Escapes control characters (what a peer sent is never printed raw).
pub fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// An app name on the command line: a bad one is a usage error (exit 2).
pub fn app_name(s: &str) -> Result<String, String> {
    stagehand_common::ids::check_name("app", s).map(|()| s.to_string()).map_err(|e| e.to_string())
}

/// A version on the command line.
pub fn version_name(s: &str) -> Result<String, String> {
    stagehand_common::ids::check_name("version", s).map(|()| s.to_string()).map_err(|e| e.to_string())
}

/// An environment name on the command line.
pub fn env_name(s: &str) -> Result<String, String> {
    stagehand_common::ids::check_name("environment", s).map(|()| s.to_string()).map_err(|e| e.to_string())
}

/// The name of an answer's kind, for an error (never its Rust debug form).
pub fn describe(resp: &stagehand_common::protocol::AdminResponse) -> String {
    match serde_json::to_value(resp) {
        Ok(serde_json::Value::String(kind)) => kind,
        Ok(serde_json::Value::Object(m)) => m.keys().next().cloned().unwrap_or_default(),
        _ => "an answer".into(),
    }
}

/// The error for an answer a command did not expect (a controller of another version).
pub fn unexpected(resp: &stagehand_common::protocol::AdminResponse) -> String {
    format!(
        "the controller answered with {} where this command expected something else; are `stagehand` and the \
         controller the same version? (`stagehand --version`)",
        describe(resp)
    )
}

/// Parses `K=V`.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
