//! `stagehand dev`: a controller and one agent per environment on loopback in a temporary
//! directory, a sample app pushed, staged everywhere and released to dev.

use super::{push, Ctx, Output};
use crate::client::Client;
use anyhow::{bail, Context, Result};
use clap::Args;
use stagehand_common::protocol::{AdminRequest, AdminResponse, RolloutSpec};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const ENVS: [&str; 3] = ["dev", "staging", "prod"];

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Keep everything in this directory instead of a temporary one (kept on exit).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

pub async fn run(a: DevArgs, ctx: &Ctx) -> Result<i32> {
    let temp;
    let root = match a.data_dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => {
            temp = tempfile::Builder::new().prefix("stagehand-dev-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let ctl_dir = root.join("controller");
    if !ctl_dir.join("controller.toml").exists() {
        crate::init::init(&ctl_dir, "127.0.0.1:0".parse().expect("literal address"))?;
    }
    // A kept fleet comes back on the port it had, if it is free; its agents are pointed at
    // whichever port it got.
    let before = std::fs::read_to_string(crate::config::Layout::new(&ctl_dir).addr_file())
        .ok()
        .and_then(|a| a.trim().parse::<std::net::SocketAddr>().ok());
    // The fleet page and metrics on a loopback port of their own.
    let http = Some("127.0.0.1:0".parse().expect("literal address"));
    let controller = match before {
        Some(addr) => match crate::server::start_with(&ctl_dir, Some(addr), http).await {
            Ok(c) => c,
            Err(_) => crate::server::start_with(&ctl_dir, None, http).await?,
        },
        None => crate::server::start_with(&ctl_dir, None, http).await?,
    };
    let metrics = controller.http.map(|a| format!("http://{a}/metrics")).unwrap_or_default();
    let addr = controller.addr.to_string();
    let admin = ctl_dir.join("admin");
    let client = Client::connect(Some(&addr), Some(&admin)).await?;

    let mut agents = Vec::new();
    for env in ENVS {
        let dir = root.join("agents").join(format!("{env}-1"));
        if !dir.join("agent.toml").exists() {
            let resp = client
                .call(&AdminRequest::CreateToken {
                    env: env.into(),
                    ttl_secs: 600,
                    labels: Default::default(),
                    uses: 1,
                })
                .await?;
            let AdminResponse::Token { token, .. } = resp else { bail!("{}", super::unexpected(&resp)) };
            stagehand_agent::join::join(&addr, &token, &dir, Some(format!("{env}-1")), Default::default()).await?;
        } else {
            let mut config = stagehand_agent::config::AgentConfig::load(&dir)?;
            let here = stagehand_agent::config::Controllers::one(&addr);
            if config.controller != here {
                config.controller = here;
                config.save(&dir)?;
            }
        }
        agents.push(stagehand_agent::run::start(&dir).await?);
    }
    client.close().await;

    let sample = root.join("sample-app");
    write_sample(&sample)?;
    let client = Client::connect(Some(&addr), Some(&admin)).await?;
    push::upload(&client, "hello", "1.0.0", &sample).await.context("pushing the sample app")?;
    for env in ENVS {
        client.call(&AdminRequest::Deploy { app: "hello".into(), version: "1.0.0".into(), env: env.into() }).await?;
        expect_all(
            &client,
            AdminRequest::WaitStaged {
                app: "hello".into(),
                version: "1.0.0".into(),
                env: env.into(),
                timeout_secs: 60,
            },
            "staging the sample app",
        )
        .await?;
    }
    // A fleet kept in --data-dir already runs the sample: it is not released again.
    let resp = client.call(&AdminRequest::Status { app: "hello".into(), env: "dev".into() }).await?;
    let AdminResponse::Status { status } = resp else { bail!("{}", super::unexpected(&resp)) };
    if status.desired.is_none_or(|(v, _)| v != "1.0.0") {
        let spec = RolloutSpec {
            app: "hello".into(),
            version: Some("1.0.0".into()),
            env: "dev".into(),
            ..RolloutSpec::default()
        };
        let resp = client.call(&AdminRequest::Rollout(spec)).await?;
        let AdminResponse::Rollout { mut rollout, .. } = resp else { bail!("{}", super::unexpected(&resp)) };
        while !matches!(rollout.state.as_str(), "succeeded" | "failed" | "aborted") {
            let req = AdminRequest::RolloutStatus {
                id: rollout.id.clone(),
                after_revision: rollout.revision,
                timeout_secs: 60,
            };
            let AdminResponse::Rollout { rollout: next, .. } = client.call(&req).await? else {
                bail!("unexpected answer while releasing the sample app")
            };
            rollout = next;
        }
        if rollout.state != "succeeded" {
            bail!("releasing the sample app to dev: rollout {} {}: {}", rollout.id, rollout.state, rollout.reason);
        }
    }
    let login = match client.call(&AdminRequest::UiLogin).await? {
        AdminResponse::UiLogin { secret, base_url: Some(base), .. } => super::ui::link(&base, &addr, &secret),
        other => bail!("a login link for the fleet page: unexpected answer {}", super::describe(&other)),
    };
    client.close().await;

    let exports = format!("export STAGEHAND_CONTROLLER={addr} STAGEHAND_CREDENTIALS={}", admin.display());
    if ctx.output == Output::Json {
        super::print_json(
            &serde_json::json!({ "controller": addr, "credentials": admin, "data_dir": root, "metrics": metrics, "ui": login }),
        );
    } else {
        outln!("Stagehand dev fleet is up in {}", root.display());
        outln!("  controller {addr}; agents dev-1, staging-1, prod-1 (one per environment)");
        outln!("  fleet page: open {login}");
        outln!("    (a one-time link, for 10 minutes; `stagehand ui` prints another)");
        outln!("  metrics {metrics}");
        outln!("  sample app hello 1.0.0: staged in every environment, live in dev\n");
        outln!("In another terminal:\n");
        // `cargo run` leaves the binaries where PATH does not look.
        if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
            let on_path = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d == dir));
            if !on_path {
                outln!("  export PATH=\"{}:$PATH\"", dir.display());
            }
        }
        outln!("  {exports}");
        outln!("  stagehand agents list");
        outln!("  stagehand status hello --env prod");
        outln!("  stagehand release hello 1.0.0 --env staging --wait");
        outln!("\nCtrl-C stops everything.");
    }
    super::controller::shutdown_signal().await;
    eprintln!("Stopping.");
    for a in agents {
        a.stop().await;
    }
    controller.stop().await;
    Ok(0)
}

async fn expect_all(client: &Client, req: AdminRequest, what: &str) -> Result<()> {
    match client.call(&req).await? {
        AdminResponse::Waited { failed, pending, .. } if failed.is_empty() && pending.is_empty() => Ok(()),
        AdminResponse::Waited { failed, pending, .. } => {
            let mut why: Vec<String> =
                failed.iter().map(|(id, r)| format!("{id} failed: {}", super::clean(r))).collect();
            why.extend(pending.iter().map(|id| format!("{id} did not answer")));
            Err(crate::client::OpError::new(
                format!("{what} did not finish: {}", why.join("; ")),
                "run `stagehand dev` again with STAGEHAND_LOG=info to see the agents' logs",
            )
            .into())
        }
        other => bail!("{what}: unexpected answer {}", super::describe(&other)),
    }
}

fn write_sample(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.join("bin")).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("index.html"), "<h1>Hello from Stagehand</h1>\n")?;
    std::fs::write(
        dir.join("stagehand.toml"),
        "[hooks]\npost_activate = \"bin/restart\"\n\n[health]\ncommand = \"bin/healthcheck\"\ntimeout = \"5s\"\nretries = 3\ninterval = \"1s\"\n",
    )?;
    for (name, body) in [
        ("restart", "#!/bin/sh\necho \"restarted $STAGEHAND_APP $STAGEHAND_VERSION (was ${STAGEHAND_PREVIOUS_VERSION:-nothing})\"\n"),
        ("healthcheck", "#!/bin/sh\ntest -f \"$STAGEHAND_RELEASE_DIR/index.html\"\n"),
    ] {
        let p = dir.join("bin").join(name);
        std::fs::write(&p, body)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}
