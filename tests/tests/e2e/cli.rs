//! The acceptance path driven only through the commands of SPEC §6, as an operator would:
//! every binary a real process.

use crate::{AGENT, STAGEHAND};
use stagehand_tests::{assert_same_tree, random_file, wait_for, Proc};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

struct Env {
    addr: String,
    creds: PathBuf,
}

fn sh(env: &Env, args: &[&str]) -> Output {
    std::process::Command::new(STAGEHAND)
        .args(args)
        .env("STAGEHAND_CONTROLLER", &env.addr)
        .env("STAGEHAND_CREDENTIALS", &env.creds)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(out: Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn agent(args: &[&str]) -> Output {
    std::process::Command::new(AGENT).args(args).output().unwrap()
}

fn current(dir: &Path) -> Option<PathBuf> {
    std::fs::read_link(dir.join("apps/web/current")).ok()
}

fn tree(root: &Path, version: &str) {
    std::fs::create_dir_all(root.join("bin/nested/deeper")).unwrap();
    std::fs::write(root.join("bin/run"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(root.join("bin/run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("bin/nested/deeper/empty"), "").unwrap();
    std::fs::write(root.join("VERSION"), version).unwrap();
    std::os::unix::fs::symlink("bin/run", root.join("run")).unwrap();
    random_file(&root.join("blob"), 8 << 20, version.len() as u64).unwrap();
}

#[tokio::test]
async fn an_operator_session_from_init_to_air_gapped_release() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ctl = t.join("ctl");
    let ctl_s = ctl.to_str().unwrap();
    ok(std::process::Command::new(STAGEHAND)
        .args(["controller", "init", "--data-dir", ctl_s, "--listen", "127.0.0.1:0"])
        .output()
        .unwrap());
    let _controller =
        Proc::spawn(STAGEHAND, &["controller", "serve", "--data-dir", ctl_s], &[], t.join("ctl.log")).unwrap();
    let addr_file = ctl.join("controller.addr");
    wait_for("the controller to listen", Duration::from_secs(30), || async { addr_file.exists() }).await.unwrap();
    let env = Env { addr: std::fs::read_to_string(&addr_file).unwrap(), creds: ctl.join("admin") };

    // Three agents in two environments, enrolled with tokens and run as processes.
    let mut agents = Vec::new();
    let mut procs = Vec::new();
    for (name, e) in [("p1", "prod"), ("p2", "prod"), ("s1", "staging")] {
        let token = ok(sh(&env, &["token", "create", "--env", e])).trim().to_string();
        let dir = t.join(name);
        let d = dir.to_str().unwrap();
        ok(agent(&["join", "--controller", &env.addr, "--token", &token, "--data-dir", d, "--name", name]));
        procs.push(Proc::spawn(AGENT, &["run", "--data-dir", d], &[], t.join(format!("{name}.log"))).unwrap());
        agents.push(dir);
    }
    let (p1, p2, s1) = (agents[0].clone(), agents[1].clone(), agents[2].clone());
    let listed: serde_json::Value = serde_json::from_str(&ok(sh(&env, &["agents", "list", "-o", "json"]))).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3);

    // Push, deploy --wait: prod holds an identical tree with modes and no current; staging nothing.
    let v1 = t.join("v1");
    tree(&v1, "1.0");
    let digest = ok(sh(&env, &["push", "web", "1.0", v1.to_str().unwrap()]));
    assert!(digest.starts_with("blake3:"), "{digest}");
    assert_eq!(ok(sh(&env, &["push", "web", "1.0", v1.to_str().unwrap()])), digest, "re-push is a no-op");
    ok(sh(&env, &["deploy", "web", "1.0", "--env", "prod", "--wait", "--timeout", "60s"]));
    for a in [&p1, &p2] {
        assert_same_tree(&v1, &a.join("apps/web/releases/1.0"));
        assert!(current(a).is_none());
    }
    assert!(!s1.join("apps/web").exists());

    // A release of something not staged is refused with exit 1 and changes nothing.
    let err = fails(sh(&env, &["release", "web", "1.0", "--env", "staging"]));
    assert!(err.contains("not staged") && err.contains("next: stagehand deploy web 1.0 --env staging"), "{err}");
    fails(sh(&env, &["release", "web", "9.9", "--env", "prod"]));
    assert!(current(&s1).is_none() && current(&p1).is_none());

    // Release, then a second version, then rollback.
    // Nothing went through staging: promotion refuses prod until forced.
    let err = fails(sh(&env, &["release", "web", "1.0", "--env", "prod", "--wait"]));
    assert!(err.contains("has not completed a rollout in staging") && err.contains("--force"), "{err}");
    let out = ok(sh(&env, &["release", "web", "1.0", "--env", "prod", "--wait", "--force"]));
    assert!(out.contains("forced past promotion") && out.contains("succeeded"), "{out}");
    assert_eq!(current(&p1).unwrap(), Path::new("releases/1.0"));
    assert_eq!(current(&p2).unwrap(), Path::new("releases/1.0"));
    assert!(current(&s1).is_none());
    let v2 = t.join("v2");
    tree(&v2, "2.0");
    ok(sh(&env, &["push", "web", "2.0", v2.to_str().unwrap()]));
    ok(sh(&env, &["deploy", "web", "2.0", "--env", "prod", "--wait"]));
    ok(sh(&env, &["release", "web", "2.0", "--env", "prod", "--wait", "--force"]));
    assert_eq!(current(&p2).unwrap(), Path::new("releases/2.0"));
    ok(sh(&env, &["rollback", "web", "--env", "prod", "--wait"]));
    assert_eq!(current(&p1).unwrap(), Path::new("releases/1.0"));
    assert_eq!(current(&p2).unwrap(), Path::new("releases/1.0"));
    let status: serde_json::Value =
        serde_json::from_str(&ok(sh(&env, &["status", "web", "--env", "prod", "-o", "json"]))).unwrap();
    assert_eq!(status["desired"]["version"], "1.0");
    assert_eq!(status["agents"][0]["last_receipt"]["outcome"], "committed");

    // Air-gapped: export (nothing changes), stop p1, apply the file offline.
    let older = t.join("older.activate");
    ok(sh(&env, &["release", "web", "2.0", "--env", "prod", "--export", older.to_str().unwrap()]));
    let file = t.join("web-2.0.activate");
    ok(sh(&env, &["release", "web", "2.0", "--env", "prod", "--export", file.to_str().unwrap()]));
    assert_eq!(current(&p1).unwrap(), Path::new("releases/1.0"), "--export must send nothing");
    procs[0].kill9();
    let p1s = p1.to_str().unwrap();
    let f = file.to_str().unwrap();
    ok(agent(&["activate", "--data-dir", p1s, "--file", f]));
    assert_eq!(current(&p1).unwrap(), Path::new("releases/2.0"));
    ok(agent(&["activate", "--data-dir", p1s, "--file", f]));
    assert_eq!(current(&p1).unwrap(), Path::new("releases/2.0"), "re-applying is a no-op");

    // A tampered copy, a lower seq, another environment: refused with exit 1, nothing changes.
    let text = std::fs::read_to_string(&file).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sig = v["signature"].as_str().unwrap().to_string();
    let flipped = format!("{}{}", if sig.starts_with('0') { "1" } else { "0" }, &sig[1..]);
    v["signature"] = flipped.into();
    let tampered = t.join("tampered.activate");
    std::fs::write(&tampered, v.to_string()).unwrap();
    assert!(
        fails(agent(&["activate", "--data-dir", p1s, "--file", tampered.to_str().unwrap()])).contains("bad-signature")
    );
    assert!(fails(agent(&["activate", "--data-dir", p1s, "--file", older.to_str().unwrap()])).contains("stale-seq"));
    ok(sh(&env, &["deploy", "web", "1.0", "--env", "staging", "--wait"]));
    let other = t.join("staging.activate");
    ok(sh(&env, &["release", "web", "1.0", "--env", "staging", "--export", other.to_str().unwrap()]));
    assert!(
        fails(agent(&["activate", "--data-dir", p1s, "--file", other.to_str().unwrap()])).contains("wrong-environment")
    );
    assert_eq!(current(&p1).unwrap(), Path::new("releases/2.0"));

    // A running agent takes the file through its local socket.
    ok(agent(&["activate", "--data-dir", p2.to_str().unwrap(), "--file", f]));
    assert_eq!(current(&p2).unwrap(), Path::new("releases/2.0"));

    // The local view.
    let local: serde_json::Value =
        serde_json::from_slice(&agent(&["status", "--data-dir", p1s, "-o", "json"]).stdout).unwrap();
    assert_eq!(local["apps"][0]["active"], "2.0");
    assert_eq!(local["env"], "prod");

    // A usage error exits 2.
    assert_eq!(sh(&env, &["release", "web"]).status.code(), Some(2));
}

/// The README's run command: `stagehand dev` starts a working fleet the CLI can talk to,
/// and Ctrl-C stops it cleanly.
#[tokio::test]
async fn stagehand_dev_starts_a_fleet_the_cli_can_use() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dev.out");
    let mut dev =
        Proc::spawn(STAGEHAND, &["dev", "--data-dir", tmp.path().join("fleet").to_str().unwrap()], &[], out.clone())
            .unwrap();
    wait_for("stagehand dev to print its exports", Duration::from_secs(120), || async {
        std::fs::read_to_string(&out).unwrap_or_default().contains("export STAGEHAND_CONTROLLER=")
    })
    .await
    .unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    let line = text.lines().find(|l| l.contains("export STAGEHAND_CONTROLLER=")).unwrap();
    let mut env = Env { addr: String::new(), creds: PathBuf::new() };
    for word in line.split_whitespace() {
        if let Some(v) = word.strip_prefix("STAGEHAND_CONTROLLER=") {
            env.addr = v.to_string();
        }
        if let Some(v) = word.strip_prefix("STAGEHAND_CREDENTIALS=") {
            env.creds = PathBuf::from(v);
        }
    }
    let agents: serde_json::Value = serde_json::from_str(&ok(sh(&env, &["agents", "list", "-o", "json"]))).unwrap();
    assert_eq!(agents.as_array().unwrap().len(), 3);
    let status: serde_json::Value =
        serde_json::from_str(&ok(sh(&env, &["status", "hello", "--env", "dev", "-o", "json"]))).unwrap();
    assert_eq!(status["agents"][0]["active"], "1.0.0");
    ok(sh(&env, &["release", "hello", "1.0.0", "--env", "staging", "--wait"]));
    ok(sh(&env, &["release", "hello", "1.0.0", "--env", "prod", "--wait"]));
    // It serves the controller's metrics on loopback, and says where.
    let url = text.lines().find_map(|l| l.trim().strip_prefix("metrics http://")).expect("dev prints its metrics URL");
    let addr: std::net::SocketAddr = url.trim_end_matches("/metrics").parse().unwrap();
    let (status, body) = stagehand_tests::http_get(addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(stagehand_tests::metric(&body, "stagehand_agents_connected{env=\"prod\"}"), Some(1.0), "{body}");
    // And the fleet page, with a one-time login link.
    let link = text.lines().find_map(|l| l.trim().strip_prefix("fleet page: open ")).expect("dev prints a login link");
    let (base, secret) = link.split_once("/login#").unwrap();
    assert_eq!(base, format!("http://{addr}"));
    let (status, head, _) =
        stagehand_tests::http_request(addr, "POST", "/login", &[], &format!("secret={secret}")).await.unwrap();
    assert_eq!(status, 303, "{head}");
    let cookie = head.lines().find_map(|l| l.strip_prefix("set-cookie: ")).unwrap().split(';').next().unwrap();
    let (status, _, page) = stagehand_tests::http_request(addr, "GET", "/", &[("Cookie", cookie)], "").await.unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("prod-1") && page.contains("1.0.0"), "{page}");

    std::process::Command::new("kill").args(["-INT", &dev.child.id().to_string()]).status().unwrap();
    let status = dev.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "{}", dev.log_text());

    // #10 item 1: a second run on the same directory took a new port, its agents kept the
    // old one, and it failed after a minute. Now it comes back (here, with its old port
    // taken, on a new one its agents are pointed at), and re-releases nothing.
    let old: std::net::SocketAddr = env.addr.parse().unwrap();
    let _taken = std::net::UdpSocket::bind(old).unwrap();
    let out2 = tmp.path().join("dev2.out");
    let mut dev =
        Proc::spawn(STAGEHAND, &["dev", "--data-dir", tmp.path().join("fleet").to_str().unwrap()], &[], out2.clone())
            .unwrap();
    wait_for("the second stagehand dev to print its exports", Duration::from_secs(120), || async {
        std::fs::read_to_string(&out2).unwrap_or_default().contains("export STAGEHAND_CONTROLLER=")
    })
    .await
    .unwrap();
    let text = std::fs::read_to_string(&out2).unwrap();
    let line = text.lines().find(|l| l.contains("export STAGEHAND_CONTROLLER=")).unwrap();
    env.addr = line.split_whitespace().find_map(|w| w.strip_prefix("STAGEHAND_CONTROLLER=")).unwrap().to_string();
    assert_ne!(env.addr, old.to_string());
    let agents: serde_json::Value = serde_json::from_str(&ok(sh(&env, &["agents", "list", "-o", "json"]))).unwrap();
    assert!(agents.as_array().unwrap().iter().all(|a| a["connected"] == true), "{agents}");
    let history: serde_json::Value =
        serde_json::from_str(&ok(sh(&env, &["history", "hello", "--env", "dev", "-o", "json"]))).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 1, "released again: {history}");
    std::process::Command::new("kill").args(["-INT", &dev.child.id().to_string()]).status().unwrap();
    assert!(dev.wait_exit(Duration::from_secs(30)).await.unwrap().success(), "{}", dev.log_text());
}
