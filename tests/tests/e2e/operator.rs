//! The operator's experience (#10): what an operator sees when things go wrong, and agents
//! that stop for good when the controller no longer wants them.

use crate::{AGENT, STAGEHAND};
use stagehand_common::protocol::{AdminRequest, AdminResponse};
use stagehand_tests::{run_cli, wait_for, Fleet, Proc};
use std::time::Duration;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

async fn connected(fleet: &Fleet, name: &str) -> bool {
    matches!(fleet.call(AdminRequest::ListAgents).await,
        Ok(AdminResponse::Agents { agents }) if agents.iter().any(|a| a.name == name && a.connected))
}

/// #10 item 2: a revoked agent logged `Channel lost … certificate not allowed on this
/// channel` about 20 times a second, for ever, and never said "revoked". Now it is told, says
/// so once, and exits with status 3 (which its unit does not restart); started again, it
/// stops again at once. Revoked by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_says_so_and_exits_with_status_3() {
    let fleet = Fleet::start().await.unwrap();
    let agent = fleet.enrol("prod", "gone").await.unwrap();
    let dir = agent.dir.to_str().unwrap().to_string();
    let env = [("STAGEHAND_LOG", "info"), ("NO_COLOR", "1")];
    let mut proc = Proc::spawn(AGENT, &["run", "--data-dir", &dir], &env, fleet.path().join("gone.log")).unwrap();
    wait_for("the agent to connect", Duration::from_secs(30), || connected(&fleet, "gone")).await.unwrap();

    // agents list says which version each agent runs, and when a disconnected one was last seen.
    wait_for("the agent to say its version", Duration::from_secs(30), || async {
        matches!(fleet.call(AdminRequest::ListAgents).await,
            Ok(AdminResponse::Agents { agents }) if agents[0].version.as_deref() == Some(env!("CARGO_PKG_VERSION")))
    })
    .await
    .unwrap();

    let out = run_cli(STAGEHAND, Some(&fleet), &["agents", "revoke", "gone"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let status = proc.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(3), "{}", proc.log_text());
    let log = proc.log_text();
    assert!(log.contains("revoked agent") && log.contains("stagehand token create"), "{log}");
    assert!(log.matches("Channel lost").count() <= 2, "a flood:\n{log}");

    let AdminResponse::Agents { agents } = fleet.call(AdminRequest::ListAgents).await.unwrap() else { panic!() };
    assert!(!agents[0].connected && agents[0].last_seen > 0, "{agents:?}");
    let out = run_cli(STAGEHAND, Some(&fleet), &["agents", "list"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked"), "{}", text(&out));

    let mut again = Proc::spawn(AGENT, &["run", "--data-dir", &dir], &env, fleet.path().join("again.log")).unwrap();
    assert_eq!(again.wait_exit(Duration::from_secs(20)).await.unwrap().code(), Some(3), "{}", again.log_text());

    // A certificate of this CA the controller does not know (a state database restored from
    // before a renewal) is refused, but never told "revoked": its agent keeps trying.
    let ca = stagehand_controller::init::load_ca(&stagehand_controller::config::Layout::new(&fleet.ctl_dir)).unwrap();
    let stranger = stagehand_common::tls::Credentials {
        me: stagehand_common::tls::issue_with_key(
            &ca,
            &stagehand_common::tls::Role::Agent("a-0000000000000000".into()),
            stagehand_common::tls::AGENT_LIFETIME,
        )
        .unwrap(),
        ca_pem: ca.cert_pem.clone(),
    };
    let ep = stagehand_common::net::client_endpoint(fleet.addr).unwrap();
    let cfg =
        stagehand_common::net::client_config(stranger.client_config(stagehand_common::protocol::ALPN_DEPLOY).unwrap())
            .unwrap();
    let conn = stagehand_common::net::connect(&ep, fleet.addr, cfg).await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.unwrap();
    assert!(format!("{reason}").contains("not allowed") && !format!("{reason}").contains("code 3"), "{reason}");

    // A name two agents share is not enough to revoke either: the command lists them.
    for env in ["prod", "lab"] {
        let token = fleet.token(env, 600).await.unwrap();
        let dir = fleet.path().join(format!("twin-{env}"));
        stagehand_agent::join::join(&fleet.addr.to_string(), &token, &dir, Some("twin".into()), Default::default())
            .await
            .unwrap();
    }
    let out = run_cli(STAGEHAND, Some(&fleet), &["agents", "revoke", "twin"]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("2 agents are named \"twin\""), "{}", text(&out));
}

/// SPEC §11: an agent whose certificate expired while it was away cannot renew it; it says
/// so and exits with status 3 instead of knocking for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_certificate_expired_exits_with_status_3() {
    let mut fleet = Fleet::start().await.unwrap();
    let config = fleet.ctl_dir.join("controller.toml");
    let toml = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, toml.replace("agent_cert_lifetime = \"30days\"", "agent_cert_lifetime = \"1s\"")).unwrap();
    fleet.restart_controller().await.unwrap();
    let agent = fleet.enrol("prod", "late").await.unwrap();
    let cert = std::fs::read_to_string(agent.dir.join("identity/cert.pem")).unwrap();
    let (_, until) = stagehand_common::tls::validity(&cert).unwrap();
    wait_for("the certificate to expire", Duration::from_secs(30), || async {
        stagehand_common::ids::now_secs() as i64 > until
    })
    .await
    .unwrap();
    let dir = agent.dir.to_str().unwrap().to_string();
    let mut proc =
        Proc::spawn(AGENT, &["run", "--data-dir", &dir], &[("NO_COLOR", "1")], fleet.path().join("late.log")).unwrap();
    assert_eq!(proc.wait_exit(Duration::from_secs(20)).await.unwrap().code(), Some(3), "{}", proc.log_text());
    assert!(proc.log_text().contains("expired"), "{}", proc.log_text());
}

/// #10 items 5 and 8: errors say what failed and what to run next, in one piece, as JSON
/// with `-o json`; a bad name is a usage error (2); an unreachable controller is given up
/// on after --connect-timeout; a second controller on a data directory says it is in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_failed_and_what_to_run_next() {
    let fleet = Fleet::start().await.unwrap();
    let missing = fleet.path().join("nope");
    let out = run_cli(STAGEHAND, Some(&fleet), &["push", "web", "1", missing.to_str().unwrap()]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("No such file").count(), 1, "doubled: {err}");

    // A stagehand.toml the agents would refuse is refused at push, naming the key.
    let typo = fleet.path().join("typo");
    std::fs::create_dir_all(&typo).unwrap();
    std::fs::write(typo.join("stagehand.toml"), "[hooks]\npost_activate = \"true\"\ntimeout = \"10 minutez\"\n")
        .unwrap();
    let out = run_cli(STAGEHAND, Some(&fleet), &["push", "web", "1", typo.to_str().unwrap()]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("[hooks] timeout") && text(&out).contains("next:"), "{}", text(&out));

    let out = run_cli(STAGEHAND, Some(&fleet), &["deploy", "web", "9", "--env", "prod", "-o", "json"]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("has not been pushed"), "{v}");
    assert_eq!(v["next"], "stagehand push web 9 PATH");

    let out = run_cli(STAGEHAND, Some(&fleet), &["status", "web site", "--env", "prod"]).unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    let out = run_cli(STAGEHAND, Some(&fleet), &["agents", "list", "--controller", "127.0.0.1"]).unwrap();
    assert!(text(&out).contains("has no port") && text(&out).contains("127.0.0.1:7443"), "{}", text(&out));

    // Nothing answers on this port (a UDP socket that never replies).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let args = ["agents", "list", "--controller", &addr, "--connect-timeout", "300ms"];
    let out = run_cli(STAGEHAND, Some(&fleet), &args).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("no answer within 300ms"), "{}", text(&out));

    let dir = fleet.ctl_dir.to_str().unwrap().to_string();
    let out =
        run_cli(STAGEHAND, None, &["controller", "serve", "--data-dir", &dir, "--listen", "127.0.0.1:0"]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("in use by another process"), "{}", text(&out));
    assert!(!text(&out).contains("WouldBlock"), "{}", text(&out));
}

/// SPEC §10: operator certificates expire (90 days by default). The CLI renews its own
/// certificate two thirds in, over the admin channel, and keeps the new one in its
/// credentials directory, so an operator who uses it is never locked out: shown with
/// certificates that live nine seconds, used again after the first one has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_certificate_is_renewed_before_it_expires() {
    let mut fleet = Fleet::start().await.unwrap();
    let config = fleet.ctl_dir.join("controller.toml");
    let toml = std::fs::read_to_string(&config).unwrap();
    assert!(toml.contains("admin_cert_lifetime = \"90days\""), "{toml}");
    std::fs::write(&config, toml.replace("admin_cert_lifetime = \"90days\"", "admin_cert_lifetime = \"9s\"")).unwrap();
    fleet.restart_controller().await.unwrap();
    let creds = fleet.path().join("vera");
    let out = run_cli(
        STAGEHAND,
        Some(&fleet),
        &["admin", "add", "vera", "--role", "viewer", "--out", creds.to_str().unwrap()],
    )
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let cert = || std::fs::read_to_string(creds.join("cert.pem")).unwrap();
    let first = cert();
    let (_, until) = stagehand_common::tls::validity(&first).unwrap();
    let renew_at = stagehand_common::tls::renew_at(&first).unwrap();
    let now = || stagehand_common::ids::now_secs() as i64;
    let as_vera = |fleet: &Fleet| {
        let mut cmd = std::process::Command::new(STAGEHAND);
        cmd.args(["agents", "list", "-o", "json"])
            .env("STAGEHAND_CONTROLLER", fleet.addr.to_string())
            .env("STAGEHAND_CREDENTIALS", &creds);
        cmd.output().unwrap()
    };
    wait_for("two thirds of the lifetime", Duration::from_secs(30), || async { now() >= renew_at }).await.unwrap();
    let out = as_vera(&fleet);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("renewed the certificate"), "{}", text(&out));
    assert_ne!(cert(), first);
    assert!(!creds.join("renewed").exists());
    wait_for("the first certificate to expire", Duration::from_secs(30), || async { now() > until }).await.unwrap();
    let out = as_vera(&fleet);
    assert!(out.status.success(), "locked out: {}", text(&out));
    let audit =
        run_cli(STAGEHAND, None, &["audit", "--data-dir", fleet.ctl_dir.to_str().unwrap(), "--last", "20"]).unwrap();
    assert!(String::from_utf8_lossy(&audit.stdout).contains("renew-certificate"), "{}", text(&audit));
}

/// Kills what a test started detached (outside any `Proc`), on the way out.
struct KillOnDrop(String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill").args(["-f", &self.0]).status();
    }
}

/// SPEC §11, #10: `stagehand agents install --ssh root@127.0.0.1 --env prod --prefix DIR`
/// through a real sshd on a loopback port of its own: the agent is copied, joins, starts
/// detached (under a prefix) and shows as connected; a second run leaves it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_install_over_ssh_enrols_a_running_agent_once() {
    if !std::path::Path::new("/usr/sbin/sshd").exists() {
        eprintln!("note: no /usr/sbin/sshd (apt-get install openssh-server); skipped");
        return;
    }
    let fleet = Fleet::start().await.unwrap();
    let t = fleet.path().join("ssh");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    for key in ["host_key", "id"] {
        let path = t.join(key);
        let ok = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f", path.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    std::fs::copy(t.join("id.pub"), t.join("authorized_keys")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let p = |name: &str| t.join(name).to_str().unwrap().to_string();
    std::fs::write(
        t.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\nPidFile {}\n",
            p("host_key"),
            p("authorized_keys"),
            p("sshd.pid")
        ),
    )
    .unwrap();
    std::fs::write(
        t.join("ssh_config"),
        format!(
            "Host *\n  Port {port}\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile /dev/null\n  \
             StrictHostKeyChecking no\n  LogLevel ERROR\n",
            p("id")
        ),
    )
    .unwrap();
    let _sshd = Proc::spawn("/usr/sbin/sshd", &["-D", "-e", "-f", &p("sshd_config")], &[], t.join("sshd.log")).unwrap();
    wait_for("sshd to listen", Duration::from_secs(20), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await
    .unwrap();

    let prefix = fleet.path().join("host");
    let _agent = KillOnDrop(format!("{}/bin/stagehand-agent", prefix.display()));
    let install = || {
        std::process::Command::new(STAGEHAND)
            .args(["agents", "install", "--ssh", "root@127.0.0.1", "--env", "prod"])
            .args(["--prefix", prefix.to_str().unwrap(), "--agent-binary", AGENT])
            .env("STAGEHAND_CONTROLLER", fleet.addr.to_string())
            .env("STAGEHAND_CREDENTIALS", &fleet.admin)
            .env("STAGEHAND_SSH", format!("ssh -F {}", p("ssh_config")))
            .output()
            .unwrap()
    };
    let out = install();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("root@127.0.0.1  enrolled as a-") && stdout.contains("detached"), "{}", text(&out));
    let host = String::from_utf8(std::process::Command::new("hostname").output().unwrap().stdout).unwrap();
    let AdminResponse::Agents { agents } = fleet.call(AdminRequest::ListAgents).await.unwrap() else { panic!() };
    assert_eq!(agents.len(), 1);
    assert!(agents[0].connected && agents[0].env == "prod", "{agents:?}");
    assert_eq!(agents[0].name, host.trim());
    assert!(prefix.join("etc/systemd/system/stagehand-agent.service").exists());

    let again = install();
    assert!(again.status.success(), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("already enrolled"), "{}", text(&again));
    let AdminResponse::Agents { agents } = fleet.call(AdminRequest::ListAgents).await.unwrap() else { panic!() };
    assert_eq!(agents.len(), 1, "a second run enrols nothing");
}

fn du(dir: &std::path::Path) -> u64 {
    walk(dir).iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// #10 item 12: the controller's store only grew (one 400 MiB push left 404 MB for ever).
/// `artifact rm` deletes a version no agent needs and the chunks no other version uses; it
/// refuses a released version; a push in flight keeps the chunks it counted on; apps,
/// versions and history say what was pushed and released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifact_rm_frees_what_only_that_version_used() {
    use stagehand_common::protocol::RolloutSpec;
    let fleet = Fleet::start().await.unwrap();
    let _agent = fleet.agent("prod", "p").await.unwrap();
    let tree = |name: &str, unique: u64| {
        let dir = fleet.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        stagehand_tests::random_file(&dir.join("shared"), 2 << 20, 1).unwrap();
        stagehand_tests::random_file(&dir.join("own"), 3 << 20, unique).unwrap();
        dir
    };
    fleet.push("web", "1", &tree("v1", 11)).await.unwrap();
    assert!(fleet.deploy("web", "1", "prod", 60).await.unwrap().all_done());
    let spec = RolloutSpec { app: "web".into(), version: Some("1".into()), env: "prod".into(), ..Default::default() };
    let r = fleet.rollout(spec).await.unwrap();
    assert!(stagehand_tests::Progress::of(&fleet.wait_rollout(&r.id).await.unwrap()).all_done());
    let v3 = tree("v3", 33);
    fleet.push("web", "3", &v3).await.unwrap();

    let out = run_cli(STAGEHAND, Some(&fleet), &["artifact", "rm", "web", "1"]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("released version in prod"), "{}", text(&out));

    // A push in flight that counts on version 3's chunks: begun, not committed.
    let c = tree("c", 33);
    std::fs::write(c.join("extra"), "one more file").unwrap();
    let (manifest, _) = stagehand_common::manifest::build(&c).unwrap();
    let client = fleet.client().await.unwrap();
    let AdminResponse::PushNeed { digest, missing, .. } = client
        .call(&AdminRequest::PushBegin { app: "web".into(), version: "c".into(), manifest: manifest.encode() })
        .await
        .unwrap()
    else {
        panic!()
    };
    let extra = std::fs::read(c.join("extra")).unwrap();
    assert_eq!(missing, vec![stagehand_common::Digest::of(&extra)], "only the new file's chunk is sent");
    client.push_chunks(vec![(missing[0], extra)]).await.unwrap();

    let store = fleet.ctl_dir.join("store");
    let before = du(&store);
    let out = run_cli(STAGEHAND, Some(&fleet), &["artifact", "rm", "web", "3", "-o", "json"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Version 3's own file is kept while the push in flight counts on it.
    assert_eq!(v["bytes_freed"], 0, "{v}");
    let AdminResponse::Pushed { .. } =
        client.call(&AdminRequest::PushCommit { app: "web".into(), version: "c".into(), digest }).await.unwrap()
    else {
        panic!("the push in flight lost a chunk")
    };
    client.close().await;
    assert!(fleet.deploy("web", "c", "prod", 60).await.unwrap().all_done());

    // Nothing references version 3's content but c now; remove c too: its own chunks go,
    // version 1's stay.
    let out = run_cli(STAGEHAND, Some(&fleet), &["artifact", "rm", "web", "c"]).unwrap();
    assert_eq!(out.status.code(), Some(1), "ordered to hold: {}", text(&out));
    assert!(text(&out).contains("ordered to hold"), "{}", text(&out));
    fleet.push("web", "4", &tree("v4", 44)).await.unwrap();
    let out = run_cli(STAGEHAND, Some(&fleet), &["versions", "web", "-o", "json"]).unwrap();
    let versions: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = versions.as_array().unwrap().iter().map(|v| v["version"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 3, "{versions}");
    let one = versions.as_array().unwrap().iter().find(|v| v["version"] == "1").unwrap();
    assert_eq!(one["released_in"], serde_json::json!(["prod"]));
    let out = run_cli(STAGEHAND, Some(&fleet), &["artifact", "rm", "web", "4", "-o", "json"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bytes_freed"], 3 << 20, "version 4's own file, not the shared one: {v}");
    assert!(du(&store) < before, "the store shrank");
    // Version 1 is whole: a new agent stages it from the store.
    let _late = fleet.agent("prod", "late").await.unwrap();
    assert!(fleet.wait_staged("web", "1", "prod", 60).await.unwrap().all_done());

    let out = run_cli(STAGEHAND, Some(&fleet), &["history", "web", "--env", "prod", "-o", "json"]).unwrap();
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(h[0]["version"], "1");
    assert_eq!(h[0]["state"], "succeeded");
    assert_eq!(h[0]["by"], "admin");
    let out = run_cli(STAGEHAND, Some(&fleet), &["apps", "list"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("prod=1"), "{}", text(&out));
    // Without --env, status shows every environment that has agents.
    let out = run_cli(STAGEHAND, Some(&fleet), &["status", "web", "-o", "json"]).unwrap();
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all[0]["env"], "prod", "{all}");
    // What a rollback would go back to is kept too.
    let spec = RolloutSpec {
        app: "web".into(),
        version: Some("c".into()),
        env: "prod".into(),
        force: true,
        ..Default::default()
    };
    let r = fleet.rollout(spec).await.unwrap();
    assert!(stagehand_tests::Progress::of(&fleet.wait_rollout(&r.id).await.unwrap()).all_done());
    let out = run_cli(STAGEHAND, Some(&fleet), &["artifact", "rm", "web", "1"]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("goes back to"), "{}", text(&out));
    let out = run_cli(STAGEHAND, None, &["completion", "bash"]).unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("_stagehand"));
}
