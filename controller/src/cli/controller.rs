//! `stagehand controller init|serve`.

use super::Ctx;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum ControllerCommand {
    /// Create the CA, the release key, the controller certificate and admin credentials.
    Init(InitArgs),
    /// Run the controller until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Bring the state database back in line with the audit log (revocations, used tokens,
    /// seq counters), when `serve` refuses to start because they disagree. Run it with the
    /// controller stopped.
    Repair(RepairArgs),
    /// Replace the release key. The new key is introduced by a change the current key signs,
    /// and the current key is retired by a change the new key signs; agents pin the new key
    /// when they next connect (or from an export file). Run it with the controller stopped.
    RotateReleaseKey(RepairArgs),
}

#[derive(Args, Debug)]
pub struct RepairArgs {
    /// Directory made by `stagehand controller init`.
    #[arg(long)]
    pub data_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory for the controller's keys and state.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// UDP address to listen on.
    #[arg(long, default_value = crate::config::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Directory made by `stagehand controller init`.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// UDP address to listen on (overrides controller.toml).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// TCP address to serve `/metrics` on, in the Prometheus text format (overrides
    /// controller.toml's `http`), e.g. 127.0.0.1:9100.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// Keep the state in etcd, shared with other controllers: etcd://HOST:PORT[,HOST:PORT…]
    /// (SPEC §13). Without it, the state stays in the data directory.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
}

pub async fn run(cmd: ControllerCommand, ctx: &Ctx) -> Result<i32> {
    match cmd {
        ControllerCommand::Init(a) => {
            let done = crate::init::init(&a.data_dir, a.listen)?;
            if ctx.json() {
                super::print_json(&serde_json::json!({
                    "config": done.config, "admin_credentials": done.admin_dir,
                    "ca_fingerprint": done.ca_fingerprint, "release_key_id": done.release_key_id,
                }));
            } else {
                outln!("Initialised controller in {}", a.data_dir.display());
                outln!("  config:            {}", done.config.display());
                outln!("  admin credentials: {}", done.admin_dir.display());
                outln!("  CA fingerprint:    {}", done.ca_fingerprint);
                outln!("  release key:       {}", done.release_key_id);
                outln!("Next: stagehand controller serve --data-dir {}", a.data_dir.display());
            }
            Ok(0)
        }
        ControllerCommand::Serve(a) => {
            crate::server::serve(&a.data_dir, a.listen, a.http, a.store.as_deref(), shutdown_signal()).await?;
            Ok(0)
        }
        ControllerCommand::Repair(a) => {
            let layout = crate::config::Layout::new(&a.data_dir);
            let entries = crate::audit::read(&crate::audit::path(&layout.root))?;
            let store = crate::store::Store::open(&layout.state())
                .context("opening the state database; is the controller still running?")?;
            let changed = crate::audit::repair(&store, &crate::audit::Facts::of(&entries))?;
            if changed.is_empty() {
                outln!("The state database agrees with the audit log ({} entries); nothing changed.", entries.len());
            }
            for c in &changed {
                outln!("Repaired: {c}.");
            }
            Ok(0)
        }
        ControllerCommand::RotateReleaseKey(a) => rotate_release_key(&a, ctx),
    }
}

fn rotate_release_key(a: &RepairArgs, ctx: &Ctx) -> Result<i32> {
    let layout = crate::config::Layout::new(&a.data_dir);
    if !layout.config().exists() {
        anyhow::bail!(
            "{} is not a controller's data directory; create one with `stagehand controller init --data-dir {}`",
            a.data_dir.display(),
            a.data_dir.display()
        );
    }
    // Holding the state database is holding the controller's data directory.
    let store = crate::store::Store::open(&layout.state()).with_context(|| {
        format!(
            "opening the state database; is the controller still running? Stop it first, then run \
             `stagehand controller rotate-release-key --data-dir {}` again",
            a.data_dir.display()
        )
    })?;
    let (audit, _) = crate::audit::Audit::open(&layout.root)?;
    let (old, new) = crate::keys::rotate(&layout)?;
    audit.record("local", "rotate-release-key", serde_json::json!({ "old": old, "new": new }), "ok")?;
    let resigned = crate::keys::resign_stored(&store, &crate::keys::load(&layout)?)?;
    if ctx.json() {
        super::print_json(&serde_json::json!({ "old_key_id": old, "new_key_id": new, "messages_resigned": resigned }));
    } else {
        outln!("Rotated the release key: {old} -> {new}.");
        outln!("  Agents pin {new} and retire {old} when they next connect, or from the next export file they apply.");
        outln!("  {resigned} stored message(s) signed again with {new}.");
        outln!("  Join tokens made before now vouch for {old} and will be refused: make new ones with `stagehand token create`.");
        outln!("Next: stagehand controller serve --data-dir {}", a.data_dir.display());
    }
    Ok(0)
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
