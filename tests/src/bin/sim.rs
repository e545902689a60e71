//! `stagehand-sim --agents N`: N simulated agents (`stagehand_tests::sim`) in this process
//! against a real controller in another (`stagehand-under-test controller serve`, the real
//! `main`), on loopback. Measures enrolment, connection, the controller's memory and CPU at
//! rest, a release to all, a 4-wave rollout, `agents list` and `status`, and a `kill -9`
//! and restart of the controller. Prints one Markdown table.
//!
//! cargo build --release -p stagehand-tests --bins
//! target/release/stagehand-sim --agents 1000

use anyhow::{bail, Context, Result};
use stagehand_common::protocol::{AdminRequest, AdminResponse, RolloutSpec, RolloutView};
use stagehand_controller::client::Client;
use stagehand_tests::sim::{enrol_many, Stats};
use stagehand_tests::{http_get, metric, Proc};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The value after `name`, if given; a value that does not parse is an error, not a default.
fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Result<Option<T>> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => match args.get(i + 1).map(|v| v.parse()) {
            Some(Ok(v)) => Ok(Some(v)),
            _ => bail!("{name} takes a number, for example `{name} 100`"),
        },
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// (RSS bytes, CPU seconds so far) of a process.
fn usage(pid: u32) -> Result<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .context("no VmRSS")?
        * 1024;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat")?.1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok((rss, ticks as f64 / 100.0))
}

/// The kernel's count of UDP datagrams dropped for want of receive buffer, on every socket.
fn udp_drops() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

struct Controller {
    proc: Proc,
    listen: SocketAddr,
    http: SocketAddr,
}

fn serve(bin: &Path, data: &Path, listen: SocketAddr, http: SocketAddr, log: &Path) -> Result<Proc> {
    Proc::spawn(
        bin.to_str().context("path")?,
        &[
            "controller",
            "serve",
            "--data-dir",
            data.to_str().context("path")?,
            "--listen",
            &listen.to_string(),
            "--http",
            &http.to_string(),
        ],
        &[("STAGEHAND_LOG", &std::env::var("SIM_CONTROLLER_LOG").unwrap_or_else(|_| "warn".into()))],
        log.to_path_buf(),
    )
}

async fn connected(http: SocketAddr) -> f64 {
    match http_get(http, "/metrics").await {
        Ok((200, body)) => metric(&body, "stagehand_agents_connected{env=\"prod\"}").unwrap_or(0.0),
        _ => 0.0,
    }
}

/// Waits until `cond`, checking every 50 ms; returns how long it took.
async fn until<F, Fut>(what: &str, timeout: Duration, cond: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    until_every(what, timeout, Duration::from_millis(50), cond).await
}

/// How often a condition that asks the controller (`/metrics` reads every agent's record)
/// is checked: often enough for the figures, rarely enough not to load the controller.
const SCRAPE: Duration = Duration::from_millis(500);

/// [`until`], checking every `every`.
async fn until_every<F, Fut>(what: &str, timeout: Duration, every: Duration, mut cond: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !cond().await {
        if t0.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
    Ok(t0.elapsed())
}

/// Staging fan-out: every agent fetches an artifact of `mib` MiB (random, so nothing is
/// shared between its chunks) for real, all at once; what the controller sends and spends.
/// Two rounds, two artifacts: the second shows whether memory the first took is reused.
async fn fan_out(
    client: &Client,
    stats: &Stats,
    agents: &[Arc<stagehand_tests::sim::SimAgent>],
    pid: u32,
    tmp: &Path,
    size_mib: u64,
) -> Result<()> {
    for a in agents {
        a.fetch_for_real();
    }
    let n = agents.len();
    println!(
        "\n| {n} agents fetching {size_mib} MiB each for real | first artifact | second artifact |\n|---|---|---|"
    );
    let mut rows: Vec<(&str, Vec<String>)> = vec![
        ("staged on all (makespan)", vec![]),
        ("bytes sent by the controller", vec![]),
        ("controller egress", vec![]),
        ("controller CPU during the fan-out", vec![]),
        ("simulator CPU (receiving, hashing)", vec![]),
        ("controller RSS: before, peak, after", vec![]),
    ];
    for version in ["1", "2"] {
        let figures = fan_out_once(client, stats, pid, tmp, size_mib, version).await?;
        for (row, figure) in rows.iter_mut().zip(figures) {
            row.1.push(figure);
        }
    }
    for (name, figures) in rows {
        println!("| {name} | {} |", figures.join(" | "));
    }
    Ok(())
}

/// One round of [`fan_out`]: its figures, in the order of the table's rows.
async fn fan_out_once(
    client: &Client,
    stats: &Stats,
    pid: u32,
    tmp: &Path,
    size_mib: u64,
    version: &str,
) -> Result<Vec<String>> {
    use rand::RngCore;
    let src = tmp.join(format!("big-{version}"));
    std::fs::create_dir_all(&src)?;
    let mut bytes = vec![0u8; (size_mib << 20) as usize];
    rand::thread_rng().fill_bytes(&mut bytes);
    std::fs::write(src.join("blob"), &bytes)?;
    drop(bytes);
    stagehand_controller::cli::push::upload(client, "big", version, &src).await?;
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            while let Ok((rss, _)) = usage(pid) {
                peak.fetch_max(rss, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let (before, cpu0) = usage(pid)?;
    let me0 = usage(std::process::id())?.1;
    let fetched0 = stats.fetched.load(Ordering::Relaxed);
    let t0 = Instant::now();
    client.call(&AdminRequest::Deploy { app: "big".into(), version: version.into(), env: "prod".into() }).await?;
    let resp = client
        .call(&AdminRequest::WaitStaged {
            app: "big".into(),
            version: version.into(),
            env: "prod".into(),
            timeout_secs: 3600,
        })
        .await?;
    let took = t0.elapsed().as_secs_f64();
    let (rss, cpu1) = usage(pid)?;
    let me1 = usage(std::process::id())?.1;
    sampler.abort();
    let AdminResponse::Waited { pending, failed, .. } = resp else { bail!("wait staged") };
    if !pending.is_empty() || !failed.is_empty() {
        bail!("staging: {} pending, {} failed: {failed:?}", pending.len(), failed.len());
    }
    let fetched = stats.fetched.load(Ordering::Relaxed) - fetched0;
    Ok(vec![
        format!("{took:.1} s"),
        format!("{:.2} GiB", fetched as f64 / (1u64 << 30) as f64),
        format!("{:.0} MiB/s", fetched as f64 / took / (1u64 << 20) as f64),
        format!("{:.0} % of one core", (cpu1 - cpu0) / took * 100.0),
        format!("{:.0} % of one core", (me1 - me0) / took * 100.0),
        format!("{}, {}, {}", mib(before), mib(peak.load(Ordering::Relaxed)), mib(rss)),
    ])
}

async fn rollout(client: &Client, spec: RolloutSpec) -> Result<RolloutView> {
    let AdminResponse::Rollout { mut rollout, .. } = client.call(&AdminRequest::Rollout(spec)).await? else {
        bail!("unexpected answer to a rollout")
    };
    while !matches!(rollout.state.as_str(), "succeeded" | "failed" | "aborted") {
        let req =
            AdminRequest::RolloutStatus { id: rollout.id.clone(), after_revision: rollout.revision, timeout_secs: 60 };
        let AdminResponse::Rollout { rollout: next, .. } = client.call(&req).await? else { bail!("rollout status") };
        rollout = next;
    }
    if rollout.state != "succeeded" {
        bail!("rollout {} {}: {}", rollout.id, rollout.state, rollout.reason);
    }
    Ok(rollout)
}

fn p(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
}

fn timed_cli(bin: &Path, listen: SocketAddr, admin: &Path, args: &[&str]) -> Result<(Duration, usize)> {
    let t0 = Instant::now();
    let out = std::process::Command::new(bin)
        .args(args)
        .env("STAGEHAND_CONTROLLER", listen.to_string())
        .env("STAGEHAND_CREDENTIALS", admin)
        .env("STAGEHAND_CONNECT_TIMEOUT", "60s")
        .output()?;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((took, out.stdout.len()))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    const FLAGS: [&str; 3] = ["--agents", "--enrol-parallel", "--fetch-mib"];
    if let Some(bad) = args.iter().skip(1).step_by(2).find(|a| !FLAGS.contains(&a.as_str())) {
        bail!("unknown argument {bad:?}; usage: stagehand-sim [--agents N] [--enrol-parallel N] [--fetch-mib MIB]");
    }
    let n: usize = arg(&args, "--agents")?.unwrap_or(1000);
    let parallel: usize = arg(&args, "--enrol-parallel")?.unwrap_or(32);
    let fetch_mib: Option<u64> = arg(&args, "--fetch-mib")?;
    raise_nofile();
    let bin = std::env::current_exe()?.with_file_name("stagehand-under-test");
    let tmp = tempfile::Builder::new().prefix("stagehand-sim-").tempdir()?;
    let data = tmp.path().join("controller");
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let init = std::process::Command::new(&bin)
        .args(["controller", "init", "--data-dir", data.to_str().context("path")?, "--listen", &listen.to_string()])
        .output()?;
    if !init.status.success() {
        bail!("controller init: {}", String::from_utf8_lossy(&init.stderr));
    }
    let log = std::env::var_os("SIM_LOG_FILE").map(PathBuf::from).unwrap_or_else(|| tmp.path().join("controller.log"));
    let mut ctl = Controller { proc: serve(&bin, &data, listen, http, &log)?, listen, http };
    until("the controller to serve", Duration::from_secs(30), || async { http_get(http, "/metrics").await.is_ok() })
        .await?;
    let admin = data.join("admin");
    let client = Client::connect(Some(&listen.to_string()), Some(&admin)).await?;
    let AdminResponse::Token { token, .. } = client
        .call(&AdminRequest::CreateToken {
            env: "prod".into(),
            ttl_secs: 3600,
            labels: Default::default(),
            uses: n as u32,
        })
        .await?
    else {
        bail!("token")
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| {
        eprintln!("{k}: {v}");
        rows.push((k.to_string(), v));
    };

    let stats = Arc::new(Stats::default());
    let t0 = Instant::now();
    let agents = enrol_many(listen, &token, "sim", n, parallel, stats.clone()).await?;
    let took = t0.elapsed();
    row("enrolment", format!("{:.1} s, {:.0} agents/s", took.as_secs_f64(), n as f64 / took.as_secs_f64()));

    let t0 = Instant::now();
    let drops = udp_drops();
    let _tasks: Vec<_> = agents.iter().map(|a| a.spawn(listen)).collect();
    until_every("every agent connected", Duration::from_secs(600), SCRAPE, || async {
        stats.deploy_up.load(Ordering::Relaxed) == n
            && stats.release_up.load(Ordering::Relaxed) == n
            && connected(http).await as usize == n
    })
    .await?;
    row(
        "all connected",
        format!("{:.1} s ({} UDP datagrams dropped)", t0.elapsed().as_secs_f64(), udp_drops() - drops),
    );

    let pid = ctl.proc.child.id();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, cpu0) = usage(pid)?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (rest_rss, cpu1) = usage(pid)?;
    row("controller at rest", format!("RSS {}, CPU {:.1} %", mib(rest_rss), (cpu1 - cpu0) * 10.0));

    if let Some(mib_each) = fetch_mib {
        return fan_out(&client, &stats, &agents, pid, tmp.path(), mib_each).await;
    }

    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src)?;
    for v in ["1", "2", "3"] {
        std::fs::write(src.join("VERSION"), v)?;
        stagehand_controller::cli::push::upload(&client, "web", v, &src).await?;
    }
    let t0 = Instant::now();
    for v in ["1", "2", "3"] {
        client.call(&AdminRequest::Deploy { app: "web".into(), version: v.into(), env: "prod".into() }).await?;
        let resp = client
            .call(&AdminRequest::WaitStaged {
                app: "web".into(),
                version: v.into(),
                env: "prod".into(),
                timeout_secs: 600,
            })
            .await?;
        let AdminResponse::Waited { pending, failed, .. } = resp else { bail!("wait staged") };
        if !pending.is_empty() || !failed.is_empty() {
            bail!("staging {v}: {} pending, {} failed", pending.len(), failed.len());
        }
    }
    row("3 versions staged on all (acknowledged)", format!("{:.1} s", t0.elapsed().as_secs_f64()));

    let spec = |v: &str, waves: Option<&str>| RolloutSpec {
        app: "web".into(),
        version: Some(v.into()),
        env: "prod".into(),
        waves: waves.map(str::to_string),
        timeout_secs: 600,
        ..Default::default()
    };
    stats.take_acks();
    let t0 = Instant::now();
    rollout(&client, spec("1", None)).await?;
    let makespan = t0.elapsed();
    let mut acks: Vec<Duration> = stats.take_acks().into_iter().map(|t| t.duration_since(t0)).collect();
    acks.sort();
    if acks.len() != n {
        bail!("{} of {n} agents acknowledged the release", acks.len());
    }
    row(
        "release to all",
        format!(
            "makespan {:.2} s; acks p50 {:.2} s, p99 {:.2} s, last {:.2} s",
            makespan.as_secs_f64(),
            p(&acks, 0.5).as_secs_f64(),
            p(&acks, 0.99).as_secs_f64(),
            p(&acks, 1.0).as_secs_f64()
        ),
    );
    let t0 = Instant::now();
    rollout(&client, spec("2", Some("1%,10%,50%,100%"))).await?;
    row("4-wave rollout (1%,10%,50%,100%, no bake)", format!("{:.2} s", t0.elapsed().as_secs_f64()));

    let (took, bytes) = timed_cli(&bin, listen, &admin, &["agents", "list", "-o", "json"])?;
    row("`agents list -o json`", format!("{:.2} s ({} KiB)", took.as_secs_f64(), bytes >> 10));
    let (took, bytes) = timed_cli(&bin, listen, &admin, &["status", "web", "--env", "prod", "-o", "json"])?;
    row("`status web --env prod -o json`", format!("{:.2} s ({} KiB)", took.as_secs_f64(), bytes >> 10));
    let (after_rss, _) = usage(pid)?;
    row(
        "controller after staging and 2 releases",
        format!("RSS {} ({:.2}× at rest)", mib(after_rss), after_rss as f64 / rest_rss as f64),
    );

    // kill -9 and restart: until every agent is back, in the controller's view and ours.
    client.close().await;
    let ended = stats.ended.load(Ordering::Relaxed);
    ctl.proc.kill9();
    let t0 = Instant::now();
    let drops = udp_drops();
    ctl.proc = serve(&bin, &data, ctl.listen, ctl.http, &log)?;
    let stats2 = stats.clone();
    // When half, 90 % and all of the sessions had noticed.
    let noticed = tokio::spawn(async move {
        let mut at = vec![];
        for share in [0.5, 0.9, 1.0] {
            let want = (2.0 * n as f64 * share).ceil() as usize;
            until("sessions to notice", Duration::from_secs(600), || async {
                stats2.ended.load(Ordering::Relaxed) - ended >= want
            })
            .await?;
            at.push(t0.elapsed());
        }
        anyhow::Ok(at)
    });
    let up = until("the controller to serve", Duration::from_secs(600), || async {
        http_get(ctl.http, "/metrics").await.is_ok()
    })
    .await?;
    // Our own count first: the controller is asked only once every session is back.
    until_every("every agent back", Duration::from_secs(600), SCRAPE, || async {
        stats.deploy_up.load(Ordering::Relaxed) == n
            && stats.release_up.load(Ordering::Relaxed) == n
            && connected(ctl.http).await as usize == n
    })
    .await?;
    if let Ok(Ok(at)) = noticed.await {
        row(
            "kill -9, restart: sessions that noticed the loss",
            format!(
                "controller up in {:.1} s; half {:.1} s, 90 % {:.1} s, all {:.1} s",
                up.as_secs_f64(),
                at[0].as_secs_f64(),
                at[1].as_secs_f64(),
                at[2].as_secs_f64()
            ),
        );
    }
    row(
        "kill -9, restart: all reconnected",
        format!("{:.1} s ({} UDP datagrams dropped)", t0.elapsed().as_secs_f64(), udp_drops() - drops),
    );
    let client = Client::connect(Some(&listen.to_string()), Some(&admin)).await?;
    stats.take_acks();
    let t0 = Instant::now();
    rollout(&client, spec("3", None)).await?;
    row("release to all after the restart", format!("makespan {:.2} s", t0.elapsed().as_secs_f64()));
    client.close().await;
    let refused = stats.refused();
    if !refused.is_empty() {
        row("refused messages", format!("{refused:?}"));
    }

    println!("\n| {n} simulated agents | |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    Ok(())
}

fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}
