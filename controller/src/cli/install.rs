//! `stagehand agents install --ssh HOST…` (SPEC §11): per host, through the system `ssh`
//! (so `~/.ssh/config`, agents and jump hosts work): is it enrolled already? a fresh
//! single-use token; copy the agent; join (the agent takes the host's name); install and
//! start the service (or start it detached where there is no systemd, or under --prefix);
//! wait until it is connected. In parallel, a progress line per step on stderr, one summary
//! line per host on stdout, exit 1 if any host failed.

use super::Ctx;
use crate::client::{Client, OpError};
use anyhow::{bail, Context, Result};
use clap::Args;
use stagehand_common::protocol::{AdminRequest, AdminResponse};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// Hosts to install on, as ssh takes them: HOST or USER@HOST (repeatable, or several
    /// after one --ssh).
    #[arg(long = "ssh", value_name = "[USER@]HOST", num_args = 1.., required = true)]
    pub hosts: Vec<String>,
    /// The environment the new agents belong to.
    #[arg(long, value_parser = super::env_name)]
    pub env: String,
    /// Labels bound to the agents by their tokens (repeatable): --label zone=eu1
    #[arg(long = "label", value_parser = super::parse_label)]
    pub labels: Vec<(String, String)>,
    /// The agent binary to copy (default: the `stagehand-agent` beside this `stagehand`).
    #[arg(long)]
    pub agent_binary: Option<PathBuf>,
    /// Put everything (binary, data directory, unit, log) under this directory on the host,
    /// for unprivileged installs and tests; the agent is then started detached.
    #[arg(long, value_name = "DIR")]
    pub prefix: Option<String>,
    /// Hosts installed at once.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// The controller address the agents dial (default: the one this command uses).
    #[arg(long, value_name = "HOST:PORT")]
    pub agent_controller: Option<String>,
}

/// Where things go on a host.
struct Paths {
    bin: String,
    data: String,
    unit: String,
    log: String,
    /// Under a prefix: never systemd.
    prefixed: bool,
}

impl Paths {
    fn of(prefix: Option<&str>) -> Paths {
        match prefix {
            None => Paths {
                bin: "/usr/local/bin/stagehand-agent".into(),
                data: "/var/lib/stagehand-agent".into(),
                unit: "/etc/systemd/system/stagehand-agent.service".into(),
                log: "/var/log/stagehand-agent.log".into(),
                prefixed: false,
            },
            Some(p) => {
                let p = p.trim_end_matches('/');
                Paths {
                    bin: format!("{p}/bin/stagehand-agent"),
                    data: format!("{p}/var/lib/stagehand-agent"),
                    unit: format!("{p}/etc/systemd/system/stagehand-agent.service"),
                    log: format!("{p}/var/log/stagehand-agent.log"),
                    prefixed: true,
                }
            }
        }
    }
}

/// What happened on one host.
#[derive(Debug)]
enum Outcome {
    Enrolled { id: String, name: String, detached: bool },
    AlreadyEnrolled { id: String, name: String },
    Failed(String),
}

/// Quotes a word for a POSIX shell.
fn sh(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The ssh command: `STAGEHAND_SSH` (for example `ssh -F ./ssh_config`) or `ssh`.
fn ssh_command() -> Vec<String> {
    let configured = std::env::var("STAGEHAND_SSH").unwrap_or_default();
    let words: Vec<String> = configured.split_whitespace().map(str::to_string).collect();
    if words.is_empty() {
        vec!["ssh".into()]
    } else {
        words
    }
}

/// Runs `script` on `host` with `sh -c`, feeding `stdin`; returns stdout, or an error with
/// what ssh and the script said.
async fn remote(host: &str, script: &str, stdin: Option<Vec<u8>>) -> Result<String> {
    use tokio::io::AsyncWriteExt;
    let ssh = ssh_command();
    let mut cmd = tokio::process::Command::new(&ssh[0]);
    cmd.args(&ssh[1..])
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "--", host])
        .arg(format!("sh -c {}", sh(script)))
        .stdin(if stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("running {}", ssh[0]))?;
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(&bytes).await.context("sending the agent binary")?;
        drop(pipe);
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim().lines().last().unwrap_or("no output");
        bail!("{} (exit {})", super::clean(err), out.status.code().unwrap_or(-1));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(host: &str, what: &str) {
    eprintln!("{host}: {what}");
}

pub async fn run(a: InstallArgs, ctx: &Ctx) -> Result<i32> {
    let binary = match &a.agent_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("finding this program")?
            .parent()
            .map(|d| d.join("stagehand-agent"))
            .context("finding the agent binary")?,
    };
    let bytes = std::fs::read(&binary).map_err(|e| {
        OpError::new(
            format!("cannot read the agent binary {}: {e}", binary.display()),
            "pass --agent-binary PATH (a stagehand-agent built for the hosts' platform)",
        )
    })?;
    let controller = a.agent_controller.clone().or_else(|| ctx.controller.clone()).ok_or_else(|| {
        OpError::new("no controller address for the agents", "pass --controller HOST:PORT or --agent-controller")
    })?;
    if a.prefix.as_deref().is_some_and(|p| p.chars().any(char::is_control) || !p.starts_with('/')) {
        return Err(OpError::new(
            "--prefix must be an absolute path without control characters",
            "--prefix /opt/stagehand",
        )
        .into());
    }
    let client = Arc::new(ctx.client().await?);
    let shared = Arc::new((bytes, controller, a.env.clone(), a.labels.clone(), Paths::of(a.prefix.as_deref())));
    let limit = Arc::new(tokio::sync::Semaphore::new(a.parallel.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, host) in a.hosts.iter().enumerate() {
        let (host, client, shared, limit) = (host.clone(), client.clone(), shared.clone(), limit.clone());
        tasks.spawn(async move {
            let _slot = limit.acquire_owned().await;
            let (bytes, controller, env, labels, paths) = &*shared;
            let outcome = match install(&host, &client, bytes, controller, env, labels, paths).await {
                Ok(o) => o,
                Err(e) => Outcome::Failed(super::error_text(&e)),
            };
            if let Outcome::Failed(why) = &outcome {
                step(&host, &format!("failed: {why}"));
            }
            (i, host, outcome)
        });
    }
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r?);
    }
    results.sort_by_key(|(i, ..)| *i);
    if let Ok(c) = Arc::try_unwrap(client) {
        c.close().await;
    }
    let failed = results.iter().filter(|(_, _, o)| matches!(o, Outcome::Failed(_))).count();
    if ctx.json() {
        let rows: Vec<_> = results
            .iter()
            .map(|(_, host, o)| match o {
                Outcome::Enrolled { id, name, detached } => serde_json::json!({
                    "host": host, "outcome": "enrolled", "agent": id, "name": name, "detached": detached,
                }),
                Outcome::AlreadyEnrolled { id, name } => serde_json::json!({
                    "host": host, "outcome": "already-enrolled", "agent": id, "name": name,
                }),
                Outcome::Failed(why) => serde_json::json!({ "host": host, "outcome": "failed", "error": why }),
            })
            .collect();
        super::print_json(&serde_json::Value::Array(rows));
    } else {
        for (_, host, o) in &results {
            match o {
                Outcome::Enrolled { id, name, detached: false } => {
                    outln!("{host}  enrolled as {id} ({name}), running under systemd")
                }
                Outcome::Enrolled { id, name, detached: true } => {
                    outln!("{host}  enrolled as {id} ({name}), started detached (no systemd service)")
                }
                Outcome::AlreadyEnrolled { id, name } => {
                    outln!("{host}  already enrolled as {id} ({name}); left alone")
                }
                Outcome::Failed(why) => outln!("{host}  FAILED: {why}"),
            }
        }
    }
    if failed > 0 {
        eprintln!("error: {failed} of {} host(s) failed", results.len());
        eprintln!("  next: fix what each line says, then run the same command again (enrolled hosts are left alone)");
        return Ok(1);
    }
    Ok(0)
}

/// The agent's identity file on a host, if it has one: (id, name).
async fn enrolled(host: &str, paths: &Paths) -> Result<Option<(String, String)>> {
    let file = format!("{}/identity/agent.json", paths.data);
    let out = remote(host, &format!("if [ -f {f} ]; then cat {f}; fi", f = sh(&file)), None).await?;
    if out.trim().is_empty() {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("{file} on {host} is not an agent's identity"))?;
    let text = |k: &str| v[k].as_str().unwrap_or("?").to_string();
    Ok(Some((text("id"), text("name"))))
}

async fn install(
    host: &str,
    client: &Client,
    binary: &[u8],
    controller: &str,
    env: &str,
    labels: &[(String, String)],
    paths: &Paths,
) -> Result<Outcome> {
    step(host, "checking");
    if let Some((id, name)) = enrolled(host, paths).await? {
        let resp = client.call(&AdminRequest::ListAgents).await?;
        let AdminResponse::Agents { agents } = resp else { bail!("{}", super::unexpected(&resp)) };
        return match agents.iter().find(|a| a.id.0 == id) {
            Some(a) if a.connected => {
                step(host, &format!("already enrolled as {id} ({name}), connected"));
                Ok(Outcome::AlreadyEnrolled { id, name })
            }
            Some(a) if a.revoked => {
                bail!("enrolled as {id}, which is revoked; to enrol the host again, remove {} on it first", paths.data)
            }
            Some(_) => bail!(
                "enrolled as {id} ({name}) but not connected; start it (systemctl start stagehand-agent, or {} run \
                 --data-dir {}) and see its log",
                paths.bin,
                paths.data
            ),
            None => bail!(
                "enrolled as {id}, which this controller does not know (another controller's agent?); remove {} on \
                 the host to enrol it here",
                paths.data
            ),
        };
    }
    step(host, &format!("copying the agent to {}", paths.bin));
    let copy = format!(
        "set -e; umask 022; mkdir -p \"$(dirname {bin})\"; cat > {bin}.new; chmod 755 {bin}.new; mv -f {bin}.new {bin}",
        bin = sh(&paths.bin)
    );
    remote(host, &copy, Some(binary.to_vec())).await.context("copying the agent")?;

    let resp = client
        .call(&AdminRequest::CreateToken {
            env: env.to_string(),
            ttl_secs: 600,
            labels: labels.iter().cloned().collect(),
            uses: 1,
        })
        .await?;
    let AdminResponse::Token { token, .. } = resp else { bail!("{}", super::unexpected(&resp)) };
    step(host, "joining");
    let unit = include_str!("../../../deploy/stagehand-agent.service")
        .replace("/usr/bin/stagehand-agent", &paths.bin)
        .replace("/var/lib/stagehand-agent", &paths.data);
    let start = if paths.prefixed {
        "false".to_string()
    } else {
        format!(
            "[ -d /run/systemd/system ] && command -v systemctl >/dev/null && {{ cat > {unit} <<'STAGEHAND_UNIT'\n{text}\nSTAGEHAND_UNIT\n systemctl daemon-reload && systemctl enable --now stagehand-agent >/dev/null 2>&1; }}",
            unit = sh(&paths.unit),
            text = unit.trim_end()
        )
    };
    // The unit is kept beside everything else under a prefix, for reference.
    let keep_unit = format!(
        "mkdir -p \"$(dirname {u})\" && cat > {u} <<'STAGEHAND_UNIT'\n{text}\nSTAGEHAND_UNIT\n",
        u = sh(&paths.unit),
        text = unit.trim_end()
    );
    // The token comes on stdin and goes to `join` in its environment: never in an argument
    // list any user of either machine could read.
    let script = format!(
        "set -e\nIFS= read -r STAGEHAND_TOKEN\nexport STAGEHAND_TOKEN\n\
         {bin} join --controller {controller} --data-dir {data} -o json\nunset STAGEHAND_TOKEN\n\
         if {start}\nthen echo mode=systemd\nelse\n{keep}\
         mkdir -p \"$(dirname {log})\"\n\
         (setsid {bin} run --data-dir {data} >> {log} 2>&1 < /dev/null &)\necho mode=detached\nfi\n",
        bin = sh(&paths.bin),
        controller = sh(controller),
        data = sh(&paths.data),
        start = start,
        keep = if paths.prefixed { keep_unit } else { String::new() },
        log = sh(&paths.log),
    );
    let out = remote(host, &script, Some(format!("{token}\n").into_bytes()))
        .await
        .context("joining and starting the agent")?;
    let detached = out.contains("mode=detached");
    let json_end = out.rfind('}').map_or(0, |i| i + 1);
    let joined: serde_json::Value = serde_json::from_str(&out[..json_end])
        .with_context(|| format!("the agent's join printed {:?}", super::clean(out.trim())))?;
    let id = joined["id"].as_str().unwrap_or_default().to_string();
    let name = joined["name"].as_str().unwrap_or_default().to_string();
    step(host, &format!("joined as {id} ({name}); waiting for it to connect"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let AdminResponse::Agents { agents } = client.call(&AdminRequest::ListAgents).await? {
            if agents.iter().any(|x| x.id.0 == id && x.connected) {
                break;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "enrolled as {id}, but it has not connected within 60 s; see {} on the host (or `journalctl -u stagehand-agent`)",
                paths.log
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    step(host, "connected");
    Ok(Outcome::Enrolled { id, name, detached })
}
