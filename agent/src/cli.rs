//! The `stagehand-agent` command line.

use crate::host::{Host, Layout};
use crate::journal::Journal;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use stagehand_common::activate::{SignedActivate, EXPORT_LIMIT};
use stagehand_common::frame::{read_msg, write_blob};
use stagehand_common::fsx;
use stagehand_common::protocol::{Receipt, ReceiptOutcome};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The Stagehand agent: stages artifacts and applies signed activate messages on this host.
#[derive(Parser, Debug)]
#[command(name = "stagehand-agent", version)]
pub struct Cli {
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
    /// Enrol with a controller using a join token.
    Join(JoinArgs),
    /// Run the agent until SIGINT or SIGTERM.
    Run(DataDir),
    /// The local view: apps, staged versions, active version, last seq.
    Status(DataDir),
    /// Apply a signed activate message from a file (offline or air-gapped release).
    Activate(ActivateArgs),
    /// Show the output of an app's service (the live version's, or --version's).
    Logs(LogsArgs),
    /// Recreate an app's missing activation journal with the last seq the controller issued
    /// for it (activation refuses while it is missing and `current` exists).
    RepairJournal(RepairArgs),
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// The app, as in agent.toml or `stagehand-agent status`.
    pub app: String,
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The version whose service output to show (default: the live one).
    #[arg(long = "version", id = "service_version", value_name = "VERSION")]
    pub version: Option<String>,
    /// How many lines from the end.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub lines: usize,
}

#[derive(Args, Debug)]
pub struct RepairArgs {
    #[arg(long)]
    pub data_dir: PathBuf,
    #[arg(long)]
    pub app: String,
    /// The app's last seq: `stagehand status APP --env ENV` shows it. Messages up to it are
    /// refused from now on.
    #[arg(long)]
    pub seq: u64,
}

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// The controller, HOST:PORT.
    #[arg(long)]
    pub controller: String,
    /// A token from `stagehand token create` (or in STAGEHAND_TOKEN, which keeps it out of
    /// process listings).
    #[arg(long, env = "STAGEHAND_TOKEN", hide_env_values = true)]
    pub token: String,
    #[arg(long)]
    pub data_dir: PathBuf,
    /// This agent's name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Labels (repeatable): --label zone=eu1
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
}

#[derive(Args, Debug)]
pub struct DataDir {
    #[arg(long)]
    pub data_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct ActivateArgs {
    #[arg(long)]
    pub data_dir: PathBuf,
    /// A file written by `stagehand release --export`.
    #[arg(long)]
    pub file: PathBuf,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Runs the CLI; returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let daemon = matches!(cli.command, Command::Run(_));
    let filter = tracing_subscriber::EnvFilter::try_from_env("STAGEHAND_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(if daemon { "info" } else { "warn" }));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    let json = cli.output == Output::Json;
    match runtime.block_on(run(cli.command, json)) {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<crate::run::StoppedForGood>().is_some() => {
            eprintln!("error: {e:#}");
            crate::run::EXIT_STOPPED_FOR_GOOD
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

async fn run(cmd: Command, json: bool) -> Result<i32> {
    match cmd {
        Command::Join(a) => {
            let id =
                crate::join::join(&a.controller, &a.token, &a.data_dir, a.name, a.labels.into_iter().collect()).await?;
            if json {
                let v = serde_json::json!({ "id": id.id, "name": id.name, "env": id.env, "labels": id.labels });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("Joined as {} ({}) in environment {}.", id.id, id.name, id.env);
                println!("Next: stagehand-agent run --data-dir {}", a.data_dir.display());
            }
            Ok(0)
        }
        Command::Run(a) => {
            crate::run::run(&a.data_dir, shutdown_signal()).await?;
            Ok(0)
        }
        Command::Status(a) => status(&a.data_dir, json),
        Command::Activate(a) => activate(&a.data_dir, &a.file, json).await,
        Command::RepairJournal(a) => repair_journal(&a),
        Command::Logs(a) => logs(&a),
    }
}

/// Prints the tail of a version's service log (rotated part first).
fn logs(a: &LogsArgs) -> Result<i32> {
    stagehand_common::ids::check_name("app", &a.app).map_err(anyhow::Error::msg)?;
    let layout = Layout::load(&a.data_dir)?;
    let version = match a.version.clone().or_else(|| layout.active(&a.app)) {
        Some(v) => v,
        None => bail!(
            "{} has no live version on this host; name one with --version (stagehand-agent status --data-dir {} lists them)",
            a.app,
            a.data_dir.display()
        ),
    };
    stagehand_common::ids::check_name("version", &version).map_err(anyhow::Error::msg)?;
    let log = crate::service::Services::new(&a.data_dir).log_path(&a.app, &version);
    match crate::service::tail(&log, a.lines) {
        Ok(text) => {
            if !text.is_empty() {
                println!("{text}");
            }
            Ok(0)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} {version} has no service log ({} does not exist): its artifact has no [service], or it never ran here",
            a.app,
            log.display()
        ),
        Err(e) => Err(anyhow::Error::new(e).context(format!("reading {}", log.display()))),
    }
}

/// Writes the journal of an app with `last_seq` raised to the given seq; never lowers it.
fn repair_journal(a: &RepairArgs) -> Result<i32> {
    stagehand_common::ids::check_name("app", &a.app).map_err(anyhow::Error::msg)?;
    let layout = crate::host::Layout::load(&a.data_dir)?;
    let path = layout.journal(&a.app);
    let mut journal = match crate::journal::Journal::load(&path) {
        Ok(j) => j,
        Err(e) => {
            // Unreadable: kept aside for a look, and replaced.
            let aside = path.with_extension(format!("corrupt-{}", stagehand_common::ids::now_secs()));
            std::fs::rename(&path, &aside)?;
            println!("The journal of {} was unreadable ({e:#}); moved to {}.", a.app, aside.display());
            crate::journal::Journal::default()
        }
    };
    if let Some(last) = journal.last_seq.filter(|last| *last >= a.seq) {
        println!("The journal of {} already has seq {last}; nothing changed.", a.app);
        return Ok(0);
    }
    journal.last_seq = Some(a.seq);
    stagehand_common::fsx::create_dir_all_durable(path.parent().expect("journal files have a parent"))?;
    journal.save_durable(&path)?;
    println!("The journal of {} now has seq {}: messages up to it are refused.", a.app, a.seq);
    Ok(0)
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Reads the filesystem and the journals only, so it works while the agent runs.
fn status(data_dir: &Path, json: bool) -> Result<i32> {
    let layout = Layout::load(data_dir)?;
    let identity = crate::config::Identity::load(data_dir)?;
    let mut apps = Vec::new();
    for app in layout.apps() {
        let journal = Journal::load(&layout.journal(&app))?;
        apps.push(serde_json::json!({
            "app": app,
            "root": layout.app_root(&app),
            "active": layout.active(&app),
            "staged": layout.release_versions(&app),
            "last_seq": journal.last_seq,
            "activation_in_progress": journal.intent.as_ref().map(|i| &i.version),
            "last_receipt": journal.last_receipt,
            "listen": layout.app_config(&app).listen,
            "traffic": crate::switch::load_route(&layout, &app).map(|r| r.versions),
        }));
    }
    let policy = crate::policy::Enforced::load(data_dir, &identity.env)?.get();
    let approvers: Vec<&str> = policy.approvers.iter().map(|a| a.name.as_str()).collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "id": identity.id, "name": identity.name, "env": identity.env,
                "controller": layout.config.controller, "apps": apps,
                "policy": { "serial": policy.serial, "approvals": policy.approvals, "approvers": approvers, "verify": policy.verify },
            }))?
        );
        return Ok(0);
    }
    println!("agent {} ({}) in {}, controller {}", identity.id, identity.name, identity.env, layout.config.controller);
    if policy.serial > 0 {
        println!(
            "release policy {}: {} approval(s) from [{}]{}",
            policy.serial,
            policy.approvals,
            approvers.join(", "),
            if policy.verify { ", verified versions only" } else { "" }
        );
    }
    if apps.is_empty() {
        println!("No apps staged yet.");
    }
    for a in &apps {
        println!(
            "{:<16} active={:<12} last_seq={:<6} staged=[{}]",
            a["app"].as_str().unwrap_or("?"),
            a["active"].as_str().unwrap_or("-"),
            a["last_seq"].as_u64().map_or("-".to_string(), |s| s.to_string()),
            a["staged"]
                .as_array()
                .map(|v| v.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
                .unwrap_or_default()
        );
        if let Some(route) = a["traffic"].as_array() {
            let shares: Vec<String> = route
                .iter()
                .filter_map(|e| Some(format!("{} {}%", e.get(0)?.as_str()?, e.get(1)?.as_u64()?)))
                .collect();
            let listen =
                a["listen"].as_str().map_or("no listener (services only)".to_string(), |l| format!("listen {l}"));
            println!(
                "{:<16} {listen}: {}",
                "",
                if shares.is_empty() { "no service runs".into() } else { shares.join(", ") }
            );
        }
    }
    Ok(0)
}

/// Applies a message from a file: through the running agent if there is one, else here.
async fn activate(data_dir: &Path, file: &Path, json: bool) -> Result<i32> {
    let bytes = fsx::read_limited(file, EXPORT_LIMIT).with_context(|| format!("reading {}", file.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{} is not a text file", file.display()))?;
    let (msg, chain) = SignedActivate::from_export_with(&text).map_err(anyhow::Error::msg)?;
    let layout = Layout::load(data_dir)?;
    let receipt = match tokio::net::UnixStream::connect(layout.socket()).await {
        Ok(mut stream) => {
            write_blob(&mut stream, Some(text.as_bytes())).await?;
            let reply: Option<Result<Receipt, String>> = read_msg::<_, _, { 1 << 20 }>(&mut stream).await?;
            match reply {
                Some(Ok(r)) => r,
                Some(Err(e)) => bail!("the running agent refused the file: {e}"),
                None => bail!("the running agent closed the socket without answering"),
            }
        }
        Err(_) => {
            let host = Arc::new(Host::open(data_dir)?);
            host.apply_key_changes(&chain)?;
            crate::policy::offer_from_export(&host, &text)?;
            // The services the routes name, as the daemon would have them (adopted).
            crate::switch::restore(&host).await;
            crate::activate::recover(&host).await;
            let r = crate::activate::handle(&host, msg).await;
            host.store.flush()?;
            r
        }
    };
    let ok =
        receipt.outcome == ReceiptOutcome::Committed || matches!(receipt.outcome, ReceiptOutcome::Scheduled { .. });
    if json {
        println!("{}", serde_json::to_string_pretty(&receipt.to_json())?);
    } else {
        match &receipt.outcome {
            ReceiptOutcome::Committed => println!("{} {} is live (seq {}).", receipt.app, receipt.version, receipt.seq),
            ReceiptOutcome::Scheduled { until } => {
                println!("{} {} will be activated at {until} (seq {}).", receipt.app, receipt.version, receipt.seq)
            }
            ReceiptOutcome::Refused(why) => {
                eprintln!("error: refused ({}): {} {} seq {}", why.code(), receipt.app, receipt.version, receipt.seq);
                if !receipt.log.is_empty() {
                    eprintln!("{}", receipt.log);
                }
                eprintln!("  next: {}", next_after(why, &receipt.app));
            }
        }
    }
    Ok(if ok { 0 } else { 1 })
}

/// What to do after a refusal of a message from a file.
fn next_after(why: &stagehand_common::activate::Refusal, app: &str) -> String {
    use stagehand_common::activate::Refusal::*;
    match why {
        StaleSeq => format!(
            "this host already applied a later message for {app}; export a new one: stagehand release {app} VERSION \
             --env ENV --export FILE"
        ),
        Expired => format!("the message expired; export a new one: stagehand release {app} VERSION --env ENV --export FILE"),
        NotStaged => "stage the version on this host first (stagehand deploy APP VERSION --env ENV), then apply the file again".into(),
        DigestMismatch => "the staged files were changed on this host; stage the version again (stagehand deploy), then apply the file".into(),
        UnknownKey | BadSignature => "the file was not signed by a release key this agent pins; export it again from this agent's controller".into(),
        WrongEnvironment | NotTargeted => "the file is for other hosts; export one for this host's environment (stagehand-agent status shows it)".into(),
        PreActivateFailed => {
            "the pre-activate hook failed and nothing was switched; the log above says why. Fix it, then export a new \
             message (this one's seq is used)"
                .into()
        }
        Unhealthy | Interrupted => {
            "the version was switched back: what was live before is live again; the log above says why. Fix it, \
             then export a new message (this one's seq is used)"
                .into()
        }
        NotYetValid => "the message is for later; apply it then, or run it through the running agent, which waits".into(),
        HostError => {
            "fix what the log above names on this host; if the message's seq was used, export a new message".into()
        }
        Malformed => "the file is damaged or not an activate message; export it again".into(),
        NotTrafficMode => format!(
            "{app} is not in traffic mode here, or the version has no [service]: put `listen` under [apps.{app}] in \
             agent.toml and restart the agent (it reads listen at start), give the artifact a [service], or release \
             without --traffic"
        ),
        ApprovalsMissing => format!(
            "this environment's policy requires approvals the message does not carry: release through the controller \
             (stagehand release {app} VERSION --env ENV), have it approved (stagehand approve ROLLOUT), then export it"
        ),
        NotVerified => format!(
            "the version's [verify] has not passed on this host: `stagehand status {app} --env ENV` shows why; fix it, \
             push and deploy a new version"
        ),
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
