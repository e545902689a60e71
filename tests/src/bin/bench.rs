//! Stagehand's benchmarks (not tests). Every figure is measured against a baseline taken in
//! the same run on the same machine, and reported as a ratio:
//!
//! - staging 1 GiB to 1 and 4 agents ÷ a bare quinn transfer of 1 GiB with the same socket
//!   and transport settings;
//! - releasing to 1, 10 and 100 staged agents: per-agent activation time and makespan as
//!   multiples of the floor (signature verify + symlink rename + directory fsync);
//! - the same release with a 1 KiB and a 1 GiB artifact, and during a 1 GiB transfer;
//! - a 3-wave rollout (no bake) to 100 agents ÷ one all-at-once rollout to the same agents,
//!   makespans and the controller's CPU-seconds per rollout (the controller runs as a
//!   process of its own, so its CPU is its own).
//!
//! `--rollout-only [--rollout-agents N] [--rollout-runs R]` runs only the last one.
//!
//! `--delta-only [--size-mib N] [--delta-files F]` stages four consecutive 1%-changed
//! versions of a tree onto an agent (a process of its own) holding the one before, each
//! paired with rsync over ssh moving the same change onto a copy of the previous tree
//! (needs rsync and sshd: `apt-get install rsync openssh-server`): times, bytes on the
//! loopback wire as a share of the full version, and `du` of the five staged versions.
//!
//! `--cli-only [--cli-runs N] [--cli-agents A]`: the CLI round trip, the median of
//! `stagehand agents list -o json` against a controller process with A agents, over N runs,
//! against the median of `stagehand --version` in the same run (goal: at most 3× that + 15 ms).
//!
//! `--traffic-only [--traffic-secs S] [--traffic-conns C]`: traffic mode's listener. An agent
//! (a process of its own) serves the test web service (`stagehand-test-web`, a process too)
//! through `[apps.web] listen`; C keep-alive connections send small requests for S seconds,
//! then 4 connections fetch 16 MiB bodies for S seconds, first straight to the service's
//! port, then through the listener (and through nginx's stream module as a reference proxy,
//! where it is installed), five runs each, interleaved: median requests/s, MiB/s and p50/p99
//! latency, and the ratios to direct (goal: throughput ≥ 0.8×, p99 ≤ 1.5×).
//!
//! `--restart-only [--restart-agents N]`: N real agent processes (default 250) connected to a
//! controller process, which is killed with `kill -9` and started again on the same address
//! and data directory: how long until it serves, and until every agent has both channels up
//! again in the controller's view (goal at 250: 15 s).
//!
//! Run: `cargo run --release -p stagehand-tests --bin stagehand-bench -- [--size-mib N]`

use anyhow::{bail, Result};
use stagehand_common::activate::{self, Activate, ReleaseKey, Targets};
use stagehand_common::protocol::{AdminRequest, AdminResponse, ReceiptOutcome, RolloutSpec, RolloutView};
use stagehand_common::tls::{self, Role};
use stagehand_common::{fsx, net, AgentId, Digest};
use stagehand_tests::{next_version, random_file, versioned_tree, Fleet, Proc};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let size_mib: u64 = args.windows(2).find(|w| w[0] == "--size-mib").and_then(|w| w[1].parse().ok()).unwrap_or(1024);
    let release_counts: Vec<usize> = args
        .windows(2)
        .find(|w| w[0] == "--release-agents")
        .map(|w| w[1].split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 10, 100]);
    if args.iter().any(|a| a == "--delta-only") {
        let files = args.windows(2).find(|w| w[0] == "--delta-files").and_then(|w| w[1].parse().ok()).unwrap_or(256);
        return delta_bench(size_mib, files).await;
    }
    if args.iter().any(|a| a == "--cli-only") {
        let runs = args.windows(2).find(|w| w[0] == "--cli-runs").and_then(|w| w[1].parse().ok()).unwrap_or(20);
        let agents = args.windows(2).find(|w| w[0] == "--cli-agents").and_then(|w| w[1].parse().ok()).unwrap_or(10);
        return cli_bench(runs, agents).await;
    }
    if args.iter().any(|a| a == "--traffic-only") {
        let secs = args.windows(2).find(|w| w[0] == "--traffic-secs").and_then(|w| w[1].parse().ok()).unwrap_or(3);
        let conns = args.windows(2).find(|w| w[0] == "--traffic-conns").and_then(|w| w[1].parse().ok()).unwrap_or(32);
        return traffic_bench(Duration::from_secs(secs), conns).await;
    }
    if args.iter().any(|a| a == "--restart-only") {
        let n = args.windows(2).find(|w| w[0] == "--restart-agents").and_then(|w| w[1].parse().ok()).unwrap_or(250);
        return restart_bench(n).await;
    }
    if args.iter().any(|a| a == "--rollout-only") {
        let n = args.windows(2).find(|w| w[0] == "--rollout-agents").and_then(|w| w[1].parse().ok()).unwrap_or(100);
        let runs = args.windows(2).find(|w| w[0] == "--rollout-runs").and_then(|w| w[1].parse().ok()).unwrap_or(5);
        return rollout_bench(n, runs).await;
    }
    let size = size_mib * MIB;
    println!(
        "# Stagehand benchmark ({} MiB artifact, {} cores)\n",
        size_mib,
        std::thread::available_parallelism()?.get()
    );

    // ---- Staging throughput against bare quinn, each run paired with its own baseline ----
    let stage_runs: usize =
        args.windows(2).find(|w| w[0] == "--stage-runs").and_then(|w| w[1].parse().ok()).unwrap_or(3);
    let mut big_fleet = None;
    let mut ratios = Vec::new();
    let stage_only = args.iter().any(|a| a == "--stage-only");
    let fanout: &[usize] = if stage_only { &[] } else { &[4] };
    let runs: Vec<usize> = std::iter::repeat_n(1, stage_runs).chain(fanout.iter().copied()).collect();
    for agents in runs {
        settle()?;
        let mut bare = Vec::new();
        // The baseline moves 1 GiB the way staging does: one connection, as many streams as
        // the agent fetches on. The one-stream figure is shown beside it.
        let mut bare_cpu = Cpu::now()?;
        for streams in [1usize, stagehand_agent::stage::LANES] {
            bare_cpu = Cpu::now()?;
            bare.push(mibps(size, bare_quinn(size, streams).await?));
        }
        let bare_cpu = Cpu::now()?.since(&bare_cpu);
        let baseline = bare[1];
        println!(
            "bare quinn: 1 stream {:.0} MiB/s, {} streams {:.0} MiB/s (baseline)",
            bare[0],
            stagehand_agent::stage::LANES,
            bare[1]
        );
        let fleet = Fleet::start().await?;
        let mut list = Vec::new();
        for i in 0..agents {
            list.push(fleet.agent("prod", &format!("a{i}")).await?);
        }
        let src = fleet.path().join("big");
        std::fs::create_dir_all(&src)?;
        random_file(&src.join("blob"), size as usize, 1)?;
        fleet.push("big", "1", &src).await?;
        settle()?;
        let start = Instant::now();
        let stage_cpu = Cpu::now()?;
        profile("enable");
        let p = fleet.deploy("big", "1", "prod", 600).await?;
        let t = start.elapsed();
        profile("disable");
        let stage_cpu = Cpu::now()?.since(&stage_cpu);
        if !p.all_done() {
            bail!("staging failed: {p:?}");
        }
        let per_agent = mibps(size, t);
        let total = mibps(size * agents as u64, t);
        println!(
            "stage {size_mib} MiB to {agents} agent(s): {:.2}s, {per_agent:.0} MiB/s per agent, {total:.0} MiB/s total; ratio to bare quinn {:.2} (to the better of the two: {:.2})",
            t.as_secs_f64(),
            per_agent / baseline,
            per_agent / bare[0].max(bare[1])
        );
        let gib = (size * agents as u64) as f64 / (1u64 << 30) as f64;
        println!(
            "  CPU-seconds per GiB moved: bare quinn {:.2} in this process, {:.2} machine-wide; staging {:.2} in this process, {:.2} machine-wide (stolen by the host during staging: {:.2} s)",
            bare_cpu.process / (size as f64 / (1u64 << 30) as f64),
            bare_cpu.machine / (size as f64 / (1u64 << 30) as f64),
            stage_cpu.process / gib,
            stage_cpu.machine / gib,
            stage_cpu.steal
        );
        if agents == 1 {
            ratios.push(per_agent / baseline);
        }
        if agents == 4 {
            big_fleet = Some((fleet, list));
        } else {
            // Nothing of a finished run may keep running into the next measurement.
            let mut fleet = fleet;
            for mut a in list {
                a.stop().await;
            }
            fleet.stop_controller().await;
        }
    }
    ratios.sort_by(|a, b| a.total_cmp(b));
    println!(
        "staging to 1 agent ÷ bare quinn, median of {}: {:.2} (runs: {:?})",
        ratios.len(),
        ratios[ratios.len() / 2],
        ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>()
    );
    println!();

    if stage_only {
        return Ok(());
    }
    rollout_bench(100, 5).await?;

    // ---- Release latency against the floor ----
    let floor = floor_us(300)?;
    println!("floor (verify + symlink rename + dir fsync), 300 runs: p50 {} us, p99 {} us\n", floor.0, floor.1);
    println!("| agents | activation p50 | p99 | p99 / floor p50 | floor of N at once p50 / p99 | p99 / that p99 | ack at controller p50 / p99 | makespan | makespan / floor p50 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for n in release_counts {
        let crowd = floor_concurrent(n, 3)?;
        let fleet = Fleet::start().await?;
        let mut agents = Vec::new();
        for i in 0..n {
            agents.push(fleet.agent("prod", &format!("r{i}")).await?);
        }
        stage_small(&fleet, "1", 2).await?;
        // The first activation of an app creates its journal: warm up, then measure three.
        stage_small(&fleet, "2", 3).await?;
        timed_release(&fleet, "small", "2").await?;
        let mut r = Timed { activation_us: vec![], ack_us: vec![], makespan: Duration::ZERO };
        let mut spans = Vec::new();
        for i in 0..3 {
            settle()?;
            let t = timed_release(&fleet, "small", if i % 2 == 0 { "1" } else { "2" }).await?;
            r.activation_us.extend(t.activation_us);
            r.ack_us.extend(t.ack_us);
            spans.push(t.makespan);
        }
        spans.sort();
        r.makespan = spans[1];
        println!(
            "| {n} | {} us | {} us | {:.1} | {} / {} us | {:.1} | {} / {} us | {:.1} ms | {:.1} |",
            pct(&r.activation_us, 50),
            pct(&r.activation_us, 99),
            pct(&r.activation_us, 99) as f64 / floor.0 as f64,
            crowd.0,
            crowd.1,
            pct(&r.activation_us, 99) as f64 / crowd.1 as f64,
            pct(&r.ack_us, 50),
            pct(&r.ack_us, 99),
            r.makespan.as_secs_f64() * 1e3,
            r.makespan.as_micros() as f64 / floor.0 as f64
        );
        for mut a in agents {
            a.stop().await;
        }
        let mut fleet = fleet;
        fleet.stop_controller().await;
    }
    println!();

    // ---- Release makespan: 1 KiB vs 1 GiB artifact, and during a transfer ----
    if let Some((fleet, agents)) = big_fleet {
        stage_small(&fleet, "1", 2).await?;
        let mut small_t = Vec::new();
        let mut big_t = Vec::new();
        for _ in 0..5 {
            small_t.push(timed_release(&fleet, "small", "1").await?.makespan);
            big_t.push(timed_release(&fleet, "big", "1").await?.makespan);
        }
        small_t.sort();
        big_t.sort();
        let (s, b) = (small_t[2], big_t[2]);
        println!(
            "release to {} agents, median of 5: 1 KiB artifact {:.2} ms, {size_mib} MiB artifact {:.2} ms; ratio {:.2}",
            agents.len(),
            s.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3,
            b.as_secs_f64() / s.as_secs_f64()
        );

        // A release while a new 1 GiB version is being staged on the same agents.
        let src2 = fleet.path().join("big2");
        std::fs::create_dir_all(&src2)?;
        random_file(&src2.join("blob"), size as usize, 99)?;
        fleet.push("big", "2", &src2).await?;
        fleet.call(AdminRequest::Deploy { app: "big".into(), version: "2".into(), env: "prod".into() }).await?;
        // Release once the transfer is under way on the first agent.
        let staging = agents[0].app_root("big").join(".staging");
        stagehand_tests::wait_for("the transfer to start", Duration::from_secs(60), || async {
            std::fs::read_dir(&staging).is_ok_and(|mut d| d.next().is_some())
        })
        .await?;
        let during = timed_release(&fleet, "small", "1").await?.makespan;
        let staged = fleet.wait_staged("big", "2", "prod", 600).await?;
        println!(
            "release to {} agents during a {size_mib} MiB transfer to them: {:.2} ms ({:.2}x the idle release); transfer {}",
            agents.len(),
            during.as_secs_f64() * 1e3,
            during.as_secs_f64() / s.as_secs_f64(),
            if staged.all_done() { "completed" } else { "did not complete" }
        );
        for mut a in agents {
            a.stop().await;
        }
    }
    Ok(())
}

/// Pushes a 1 KiB artifact `small VERSION` and stages it on every prod agent.
async fn stage_small(fleet: &Fleet, version: &str, seed: u64) -> Result<()> {
    let dir = fleet.path().join(format!("small-{version}"));
    std::fs::create_dir_all(&dir)?;
    random_file(&dir.join("blob"), 1024, seed)?;
    fleet.push("small", version, &dir).await?;
    if !fleet.deploy("small", version, "prod", 600).await?.all_done() {
        bail!("staging the small artifact failed");
    }
    Ok(())
}

/// Switches a profiler on and off around the staging phase alone: with
/// `STAGEHAND_BENCH_PERF_CTL=FIFO`, for `perf record --control=fifo:FIFO -D -1`.
fn profile(cmd: &str) {
    if let Some(fifo) = std::env::var_os("STAGEHAND_BENCH_PERF_CTL") {
        let _ = std::fs::OpenOptions::new().write(true).open(fifo).and_then(|mut f| {
            use std::io::Write;
            writeln!(f, "{cmd}")
        });
    }
}

/// CPU time used so far: by this process (controller and agents run in it), by the whole
/// machine (kernel writeback included), and stolen by the hypervisor.
struct Cpu {
    process: f64,
    machine: f64,
    steal: f64,
}

impl Cpu {
    fn now() -> Result<Cpu> {
        let tick = 1.0 / 100.0;
        let me = std::fs::read_to_string("/proc/self/stat")?;
        let fields: Vec<&str> = me.rsplit_once(')').map(|(_, r)| r).unwrap_or("").split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the file, 12 and 13 after the name.
        let process = (fields[11].parse::<f64>()? + fields[12].parse::<f64>()?) * tick;
        let stat = std::fs::read_to_string("/proc/stat")?;
        let cpu: Vec<f64> =
            stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal
        let busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6];
        Ok(Cpu { process, machine: busy * tick, steal: cpu.get(7).copied().unwrap_or(0.0) * tick })
    }

    fn since(&self, earlier: &Cpu) -> Cpu {
        Cpu {
            process: self.process - earlier.process,
            machine: self.machine - earlier.machine,
            steal: self.steal - earlier.steal,
        }
    }
}

/// Writes dirty pages back so that earlier set-up does not compete with what is measured.
fn settle() -> Result<()> {
    std::process::Command::new("sync").status()?;
    Ok(())
}

fn mibps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / MIB as f64 / t.as_secs_f64()
}

fn pct(v: &[u64], p: usize) -> u64 {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) * p).div_ceil(100)]
}

/// 1 GiB over one connection with `streams` streams, same socket and transport settings.
async fn bare_quinn(bytes: u64, streams: usize) -> Result<Duration> {
    let ca = tls::new_ca()?;
    let server = tls::issue_with_key(&ca, &Role::Controller, tls::CONTROLLER_LIFETIME)?;
    let client = tls::issue_with_key(&ca, &Role::Admin("bench".into()), tls::ADMIN_LIFETIME)?;
    let server_ep = net::server_endpoint(
        "127.0.0.1:0".parse()?,
        tls::server_config(&ca.cert_pem, &server, &[b"bench"])?,
        b"bench",
    )?;
    let addr = server_ep.local_addr()?;
    let receiver = tokio::spawn(async move {
        let conn = server_ep.accept().await.expect("incoming").await?;
        let mut readers = tokio::task::JoinSet::new();
        for _ in 0..streams {
            let mut s = conn.accept_uni().await?;
            readers.spawn(async move {
                let mut buf = vec![0u8; 256 << 10];
                let mut n = 0u64;
                while let Some(k) = s.read(&mut buf).await? {
                    n += k as u64;
                }
                anyhow::Ok(n)
            });
        }
        let mut total = 0;
        while let Some(r) = readers.join_next().await {
            total += r??;
        }
        anyhow::Ok(total)
    });
    let client_ep = net::client_endpoint(addr)?;
    let cfg = net::client_config(tls::client_config(&ca.cert_pem, &client, b"bench")?)?;
    let conn = net::connect(&client_ep, addr, cfg).await?;
    let start = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let conn = conn.clone();
        writers.spawn(async move {
            let mut s = conn.open_uni().await?;
            let buf = vec![7u8; 256 << 10];
            let mut left = bytes / streams as u64;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                s.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            s.finish()?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = writers.join_next().await {
        r??;
    }
    let got = receiver.await??;
    let t = start.elapsed();
    if got != bytes / streams as u64 * streams as u64 {
        bail!("bare quinn moved {got} bytes");
    }
    conn.close(0u32.into(), b"done");
    Ok(t)
}

/// A signed message like the ones releases carry, and the key that verifies it.
fn floor_message() -> (stagehand_common::activate::SignedActivate, Vec<ReleaseKey>) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]);
    let keys = vec![ReleaseKey::from_signing(&key)];
    let body = Activate {
        app: "web".into(),
        version: "a".into(),
        digest: Digest::of(b"x"),
        env: "prod".into(),
        targets: Targets::Agents(vec![AgentId("a-1".into())]),
        rollout_id: "r".into(),
        seq: 1,
        not_before: 0,
        expires_at: u64::MAX,
        key_id: keys[0].key_id.clone(),
        traffic: stagehand_common::activate::FULL_TRAFFIC,
        approved: None,
    };
    (activate::sign(&body, &key), keys)
}

/// The floor of an activation: verify a signed message, create a symlink under a temporary
/// name, rename it over `current`, fsync the directory. (p50, p99) in microseconds.
fn floor_us(runs: usize) -> Result<(u64, u64)> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("releases/a"))?;
    std::fs::create_dir_all(dir.path().join("releases/b"))?;
    let (msg, keys) = floor_message();
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs {
        let start = Instant::now();
        activate::verify(&msg, &keys).map_err(|r| anyhow::anyhow!("{r}"))?;
        let target = if i % 2 == 0 { "releases/a" } else { "releases/b" };
        fsx::switch_symlink(&dir.path().join("current"), Path::new(target))?;
        times.push(start.elapsed().as_micros() as u64);
    }
    Ok((pct(&times, 50), pct(&times, 99)))
}

/// The floor when `n` hosts' worth of activations share this machine: `n` threads each
/// verify and switch at the same instant, in their own directories. (p50, p99) in us.
fn floor_concurrent(n: usize, rounds: usize) -> Result<(u64, u64)> {
    let mut times = Vec::new();
    for _ in 0..rounds {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let barrier = barrier.clone();
                std::thread::spawn(move || -> Result<u64> {
                    let dir = tempfile::tempdir()?;
                    std::fs::create_dir_all(dir.path().join("releases/a"))?;
                    let (msg, keys) = floor_message();
                    barrier.wait();
                    let start = Instant::now();
                    activate::verify(&msg, &keys).map_err(|r| anyhow::anyhow!("{r}"))?;
                    fsx::switch_symlink(&dir.path().join("current"), Path::new("releases/a"))?;
                    Ok(start.elapsed().as_micros() as u64)
                })
            })
            .collect();
        for h in handles {
            times.push(h.join().map_err(|_| anyhow::anyhow!("floor thread panicked"))??);
        }
    }
    Ok((pct(&times, 50), pct(&times, 99)))
}

struct Timed {
    /// Agent side: message in → committed receipt ready.
    activation_us: Vec<u64>,
    /// Controller side: message sent → receipt recorded.
    ack_us: Vec<u64>,
    makespan: Duration,
}

/// Releases and watches receipts arrive at the controller.
async fn timed_release(fleet: &Fleet, app: &str, version: &str) -> Result<Timed> {
    let ctl = fleet.controller.as_ref().expect("running").controller.clone();
    let mut changes = ctl.fleet.subscribe();
    let client = fleet.client().await?;
    // Receipts newer than the ones agents hold now are this release's.
    let agents = ctl.store.agents_in("prod")?;
    let mut before = HashMap::new();
    for a in &agents {
        before.insert(a.id.clone(), ctl.store.receipt(&a.id, app)?.map_or(0, |r| r.seq));
    }
    let start = Instant::now();
    let spec = RolloutSpec { app: app.into(), version: Some(version.into()), env: "prod".into(), ..Default::default() };
    let resp = client.call(&AdminRequest::Rollout(spec)).await?;
    let AdminResponse::Rollout { rollout, .. } = resp else { bail!("unexpected {resp:?}") };
    let targets: Vec<AgentId> = rollout.waves.iter().flat_map(|w| w.hosts.iter().map(|h| h.id.clone())).collect();
    let mut seen: HashMap<AgentId, (u64, u64)> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < targets.len() {
        for id in &targets {
            if seen.contains_key(id) {
                continue;
            }
            if let Some(r) = ctl.store.receipt(id, app)? {
                if r.seq > before[id] {
                    if r.outcome != ReceiptOutcome::Committed {
                        bail!("{id} did not commit: {:?}", r.outcome);
                    }
                    seen.insert(id.clone(), (r.total_us, start.elapsed().as_micros() as u64));
                }
            }
        }
        if seen.len() == targets.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!("release timed out");
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), changes.changed()).await;
    }
    let makespan = start.elapsed();
    client.close().await;
    Ok(Timed {
        activation_us: seen.values().map(|v| v.0).collect(),
        ack_us: seen.values().map(|v| v.1).collect(),
        makespan,
    })
}

/// CPU-seconds (user + system) a process has used so far.
fn proc_cpu(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("").split_whitespace().collect();
    Ok((fields[11].parse::<f64>()? + fields[12].parse::<f64>()?) / 100.0)
}

/// A controller as a process of its own; agents in this process.
struct ControllerProc {
    child: std::process::Child,
    fleet: Fleet,
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn controller_process() -> Result<ControllerProc> {
    let bin = std::env::current_exe()?.with_file_name("stagehand-under-test");
    let dir = tempfile::Builder::new().prefix("stagehand-bench-").tempdir()?;
    let ctl_dir = dir.path().join("controller");
    let d = ctl_dir.to_str().unwrap_or_default().to_string();
    let ok = std::process::Command::new(&bin)
        .args(["controller", "init", "--data-dir", &d, "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .status()?;
    if !ok.success() {
        bail!("{} controller init failed (build it with: cargo build --release -p stagehand-tests)", bin.display());
    }
    let log = std::fs::File::create(dir.path().join("controller.log"))?;
    let child = std::process::Command::new(&bin)
        .args(["controller", "serve", "--data-dir", &d])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let addr_file = ctl_dir.join("controller.addr");
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        if let Some(a) = std::fs::read_to_string(&addr_file).ok().and_then(|s| s.trim().parse().ok()) {
            break a;
        }
        if Instant::now() > deadline {
            bail!("the controller process did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let fleet = Fleet { admin: ctl_dir.join("admin"), addr, ctl_dir, dir, controller: None };
    Ok(ControllerProc { child, fleet })
}

/// Starts a rollout and follows it to its end; returns the makespan.
async fn timed_rollout(fleet: &Fleet, version: &str, waves: Option<&str>) -> Result<Duration> {
    let client = fleet.client().await?;
    let spec = RolloutSpec {
        app: "small".into(),
        version: Some(version.into()),
        env: "prod".into(),
        waves: waves.map(str::to_string),
        ..Default::default()
    };
    let start = Instant::now();
    let resp = client.call(&AdminRequest::Rollout(spec)).await?;
    let AdminResponse::Rollout { mut rollout, .. } = resp else { bail!("unexpected {resp:?}") };
    while !stagehand_tests::is_final(&rollout) {
        let req =
            AdminRequest::RolloutStatus { id: rollout.id.clone(), after_revision: rollout.revision, timeout_secs: 60 };
        let AdminResponse::Rollout { rollout: next, .. } = client.call(&req).await? else { bail!("unexpected answer") };
        rollout = next;
    }
    let t = start.elapsed();
    client.close().await;
    check_succeeded(&rollout)?;
    let sizes: Vec<usize> = rollout.waves.iter().map(|w| w.hosts.len()).collect();
    if waves.is_some() && sizes.len() != 3 {
        bail!("expected 3 waves, got {sizes:?}");
    }
    Ok(t)
}

fn check_succeeded(r: &RolloutView) -> Result<()> {
    if r.state != "succeeded" {
        bail!("rollout {} {}: {}", r.id, r.state, r.reason);
    }
    Ok(())
}

/// A 3-wave rollout (no bake) against one all-at-once rollout to the same agents.
async fn rollout_bench(n: usize, runs: usize) -> Result<()> {
    println!("## Rollouts: 3 waves (1,10%,100%, no bake) ÷ all at once, {n} agents, {runs} runs each\n");
    let ctl = controller_process().await?;
    let pid = ctl.child.id();
    let fleet = &ctl.fleet;
    let mut agents = Vec::new();
    for i in 0..n {
        agents.push(fleet.agent("prod", &format!("w{i}")).await?);
    }
    stage_small(fleet, "1", 2).await?;
    stage_small(fleet, "2", 3).await?;
    // Warm up: the first activation of an app creates its journal.
    timed_rollout(fleet, "1", None).await?;
    let (mut once, mut waved, mut cpu_once, mut cpu_waved) = (vec![], vec![], vec![], vec![]);
    let mut version = "1";
    for _ in 0..runs {
        for waves in [None, Some("1,10%,100%")] {
            version = if version == "1" { "2" } else { "1" };
            settle()?;
            let cpu = proc_cpu(pid)?;
            let t = timed_rollout(fleet, version, waves).await?;
            let used = proc_cpu(pid)? - cpu;
            match waves {
                None => {
                    once.push(t);
                    cpu_once.push(used)
                }
                Some(_) => {
                    waved.push(t);
                    cpu_waved.push(used)
                }
            }
        }
    }
    once.sort();
    waved.sort();
    let med = |v: &Vec<Duration>| v[v.len() / 2];
    let medf = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!("| rollout | makespan p50 | min | max | controller CPU-s per rollout p50 |");
    println!("|---|---|---|---|---|");
    for (name, t, c) in [("all at once (1 wave)", &once, &mut cpu_once), ("3 waves, no bake", &waved, &mut cpu_waved)] {
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} ms | {:.2} |",
            med(t).as_secs_f64() * 1e3,
            t[0].as_secs_f64() * 1e3,
            t[t.len() - 1].as_secs_f64() * 1e3,
            medf(c)
        );
    }
    println!(
        "\n3 waves ÷ all at once, makespan p50: {:.2}× (goal: at most 3.5×)\n",
        med(&waved).as_secs_f64() / med(&once).as_secs_f64()
    );
    for mut a in agents {
        a.stop().await;
    }
    Ok(())
}

/// Agents with both channels up, in the controller's view; None while it does not answer.
async fn connected_agents(fleet: &Fleet) -> Option<usize> {
    let addr = fleet.addr.to_string();
    let connect =
        stagehand_controller::client::Client::connect_within(Some(&addr), Some(&fleet.admin), Duration::from_secs(2));
    let client = connect.await.ok()?;
    let n = match client.call(&AdminRequest::ListAgents).await {
        Ok(AdminResponse::Agents { agents }) => Some(agents.iter().filter(|a| a.connected).count()),
        _ => None,
    };
    client.close().await;
    n
}

/// `kill -9` of a controller process with `n` real agent processes connected, and a restart
/// on the same address: until it serves, and until every agent is back.
async fn restart_bench(n: usize) -> Result<()> {
    println!("## Controller `kill -9` and restart with {n} agent processes\n");
    let mut ctl = controller_process().await?;
    let bin = std::env::current_exe()?.with_file_name("stagehand-agent-under-test");
    let mut agents = Vec::new();
    for i in 0..n {
        let a = ctl.fleet.enrol("prod", &format!("r{i}")).await?;
        let dir = a.dir.to_str().unwrap_or_default().to_string();
        let log = ctl.fleet.path().join(format!("agent-{i}.log"));
        agents.push(Proc::spawn(bin.to_str().unwrap_or_default(), &["run", "--data-dir", &dir], &[], log)?);
    }
    let t0 = Instant::now();
    while connected_agents(&ctl.fleet).await != Some(n) {
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("only {:?} of {n} agents connected", connected_agents(&ctl.fleet).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("all {n} connected {:.1} s after the last was started", t0.elapsed().as_secs_f64());
    // Keep-alives in flight on every connection, as in a fleet at rest.
    tokio::time::sleep(Duration::from_secs(6)).await;
    ctl.child.kill()?;
    ctl.child.wait()?;
    let t0 = Instant::now();
    let bin = std::env::current_exe()?.with_file_name("stagehand-under-test");
    let d = ctl.fleet.ctl_dir.to_str().unwrap_or_default().to_string();
    let log = std::fs::File::create(ctl.fleet.path().join("controller-2.log"))?;
    ctl.child = std::process::Command::new(&bin)
        .args(["controller", "serve", "--data-dir", &d, "--listen", &ctl.fleet.addr.to_string()])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let mut up = None;
    loop {
        let back = connected_agents(&ctl.fleet).await;
        if up.is_none() && back.is_some() {
            up = Some(t0.elapsed());
        }
        if back == Some(n) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("only {back:?} of {n} agents back after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = t0.elapsed();
    println!("| {n} agent processes | |\n|---|---|");
    println!("| controller serving again (admin connection accepted) | {:.2} s |", up.unwrap_or(all).as_secs_f64());
    println!("| every agent back, both channels (goal: 15 s at 250) | {:.2} s |", all.as_secs_f64());
    drop(agents);
    Ok(())
}

/// Bytes received on the loopback interface so far: what crossed the wire, whoever sent it.
fn loopback_bytes() -> Result<u64> {
    let dev = std::fs::read_to_string("/proc/net/dev")?;
    let line = dev.lines().find(|l| l.trim_start().starts_with("lo:")).ok_or_else(|| anyhow::anyhow!("no lo"))?;
    Ok(line.split_once(':').map(|(_, r)| r).unwrap_or("").split_whitespace().next().unwrap_or("0").parse()?)
}

/// An sshd of its own on a loopback port, and the rsync command line that reaches it.
struct Sshd {
    _proc: Proc,
    ssh: String,
}

impl Sshd {
    async fn start(dir: &Path) -> Result<Sshd> {
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"].into_iter().find(|p| Path::new(p).exists());
        let (Some(sshd), true) = (sshd, std::process::Command::new("rsync").arg("--version").output().is_ok()) else {
            bail!("the delta benchmark needs rsync and sshd: apt-get install rsync openssh-server");
        };
        std::fs::create_dir_all(dir)?;
        for key in ["host", "client"] {
            let path = dir.join(key);
            let ok = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&path)
                .status()?;
            if !ok.success() {
                bail!("ssh-keygen failed");
            }
        }
        std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let d = dir.display();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\nStrictModes no\n\
             PidFile {d}/sshd.pid\n"
        );
        std::fs::write(dir.join("sshd_config"), config)?;
        std::fs::create_dir_all("/run/sshd")?;
        let cfg = dir.join("sshd_config");
        let proc = Proc::spawn(sshd, &["-D", "-e", "-f", cfg.to_str().unwrap_or_default()], &[], dir.join("sshd.log"))?;
        let ssh = format!(
            "ssh -p {port} -i {d}/client -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("sshd did not start: {}", proc.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Sshd { _proc: proc, ssh })
    }

    /// `rsync -a --delete` of `from/` onto `to/` over ssh; the time it took.
    fn rsync(&self, from: &Path, to: &Path) -> Result<Duration> {
        let start = Instant::now();
        let out = std::process::Command::new("rsync")
            .args(["-a", "--delete", "-e", &self.ssh])
            .arg(format!("{}/", from.display()))
            .arg(format!("root@127.0.0.1:{}/", to.display()))
            .output()?;
        if !out.status.success() {
            bail!("rsync failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(start.elapsed())
    }
}

/// `du -s` in bytes: hard links counted once.
fn du(path: &Path) -> Result<u64> {
    let out = std::process::Command::new("du").args(["-s", "-B1"]).arg(path).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().next().unwrap_or("0").parse()?)
}

/// Staging in proportion to what changed, against rsync over ssh in the same run.
async fn delta_bench(size_mib: u64, files: usize) -> Result<()> {
    let file_size = (size_mib * MIB) as usize / files;
    println!(
        "# Delta staging: {files} files of {} KiB ({size_mib} MiB), 1% changed per version, {} cores\n",
        file_size >> 10,
        std::thread::available_parallelism()?.get()
    );
    let fleet = Fleet::start().await?;
    let agent = fleet.enrol("prod", "delta").await?;
    let bin = std::env::current_exe()?.with_file_name("stagehand-agent-under-test");
    let agent_dir = agent.dir.to_str().unwrap_or_default().to_string();
    let log = fleet.path().join("agent.log");
    let proc = Proc::spawn(
        bin.to_str().unwrap_or_default(),
        &["run", "--data-dir", &agent_dir],
        &[("STAGEHAND_LOG", "info"), ("NO_COLOR", "1")],
        log,
    )?;
    let sshd = Sshd::start(&fleet.path().join("ssh")).await?;

    let src: Vec<std::path::PathBuf> = (1..=5).map(|v| fleet.path().join(format!("src-{v}"))).collect();
    versioned_tree(&src[0], files, file_size, 1)?;
    for v in 1..5 {
        next_version(&src[v - 1], &src[v], 4 * v, files, v as u64 + 1)?;
    }
    let full: u64 = stagehand_common::manifest::build(&src[0])?.0.total_size();
    fleet.push("web", "1", &src[0]).await?;
    if !fleet.deploy("web", "1", "prod", 600).await?.all_done() {
        bail!("staging version 1 failed:\n{}", proc.log_text());
    }
    let rsync_dst = fleet.path().join("rsync-dst");
    let ok = std::process::Command::new("cp").arg("-a").arg(&src[0]).arg(&rsync_dst).status()?;
    if !ok.success() {
        bail!("cp -a failed");
    }

    println!("| version | stagehand staging | wire (of full) | rsync over ssh | wire (of full) | time ratio |");
    println!("|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for v in 2..=5 {
        let version = v.to_string();
        fleet.push("web", &version, &src[v - 1]).await?;
        settle()?;
        let (lo, start) = (loopback_bytes()?, Instant::now());
        if !fleet.deploy("web", &version, "prod", 600).await?.all_done() {
            bail!("staging version {v} failed:\n{}", proc.log_text());
        }
        let (ours, our_wire) = (start.elapsed(), loopback_bytes()? - lo);
        settle()?;
        let lo = loopback_bytes()?;
        let theirs = sshd.rsync(&src[v - 1], &rsync_dst)?;
        let their_wire = loopback_bytes()? - lo;
        let ratio = ours.as_secs_f64() / theirs.as_secs_f64();
        ratios.push(ratio);
        println!(
            "| {v} | {:.0} ms | {:.1} MiB ({:.2}%) | {:.0} ms | {:.1} MiB ({:.2}%) | {ratio:.2}x |",
            ours.as_secs_f64() * 1000.0,
            our_wire as f64 / MIB as f64,
            our_wire as f64 * 100.0 / full as f64,
            theirs.as_secs_f64() * 1000.0,
            their_wire as f64 / MIB as f64,
            their_wire as f64 * 100.0 / full as f64,
        );
    }
    ratios.sort_by(f64::total_cmp);
    let releases = agent.app_root("web").join("releases");
    let disk = du(&releases)?;
    println!(
        "\nMedian staging time ÷ rsync's: {:.2}x. Five staged versions take {:.2} GiB on disk (du), one is {:.2} GiB: {:.2}x.",
        (ratios[1] + ratios[2]) / 2.0,
        disk as f64 / (1u64 << 30) as f64,
        full as f64 / (1u64 << 30) as f64,
        disk as f64 / full as f64
    );
    let fs = std::process::Command::new("findmnt").args(["-n", "-o", "FSTYPE", "-T"]).arg(&releases).output()?;
    println!("Filesystem of the agent's releases: {}", String::from_utf8_lossy(&fs.stdout).trim());
    Ok(())
}

/// The CLI round trip: `agents list -o json` against a running controller (a process of its
/// own, with `agents` connected agents) ÷ `--version` (process start, nothing else).
async fn cli_bench(runs: usize, agents: usize) -> Result<()> {
    let ctl = controller_process().await?;
    let fleet = &ctl.fleet;
    let mut running = Vec::new();
    for i in 0..agents {
        running.push(fleet.agent("prod", &format!("a{i}")).await?);
    }
    let bin = std::env::current_exe()?.with_file_name("stagehand-under-test");
    let time = |args: &[&str]| -> Result<Duration> {
        let started = Instant::now();
        let out = std::process::Command::new(&bin)
            .args(args)
            .env("STAGEHAND_CONTROLLER", fleet.addr.to_string())
            .env("STAGEHAND_CREDENTIALS", &fleet.admin)
            .stdout(std::process::Stdio::piped())
            .output()?;
        let took = started.elapsed();
        if !out.status.success() {
            bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(took)
    };
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    // Warm the page cache, then alternate the two so that drift hits both alike.
    time(&["--version"])?;
    time(&["agents", "list", "-o", "json"])?;
    let (mut list, mut version) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        version.push(time(&["--version"])?);
        list.push(time(&["agents", "list", "-o", "json"])?);
    }
    let (l, v) = (median(list), median(version));
    let goal = v * 3 + Duration::from_millis(15);
    println!(
        "# CLI round trip ({runs} runs, {agents} agents, {} cores)\n",
        std::thread::available_parallelism()?.get()
    );
    println!("| command | median |");
    println!("|---|---|");
    println!("| `stagehand --version` | {:.1} ms |", v.as_secs_f64() * 1e3);
    println!("| `stagehand agents list -o json` | {:.1} ms |", l.as_secs_f64() * 1e3);
    println!(
        "\nratio {:.2}× --version; goal ≤ 3× + 15 ms = {:.1} ms: {}",
        l.as_secs_f64() / v.as_secs_f64(),
        goal.as_secs_f64() * 1e3,
        if l <= goal { "met" } else { "NOT met" }
    );
    for mut a in running {
        a.stop().await;
    }
    Ok(())
}

/// What one load run measured.
struct Load {
    done: u64,
    bytes: u64,
    took: Duration,
    latencies_us: Vec<u64>,
}

/// `conns` keep-alive connections to `port`, each sending `GET path` in turn for `secs`.
async fn load(port: u16, path: &str, conns: usize, secs: Duration) -> Result<Load> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
        tasks.spawn(async move {
            let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            s.set_nodelay(true)?;
            let mut s = tokio::io::BufReader::with_capacity(256 << 10, s);
            let mut buf = vec![0u8; 256 << 10];
            let (mut done, mut bytes, mut lat) = (0u64, 0u64, Vec::new());
            while started.elapsed() < secs {
                let t = Instant::now();
                s.get_mut().write_all(request.as_bytes()).await?;
                let mut length = 0usize;
                let mut line = String::new();
                loop {
                    line.clear();
                    if s.read_line(&mut line).await? == 0 {
                        bail!("the connection closed");
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse()?;
                    }
                }
                let mut left = length;
                while left > 0 {
                    let n = s.read(&mut buf[..left.min(256 << 10)]).await?;
                    if n == 0 {
                        bail!("the connection closed in a body");
                    }
                    left -= n;
                }
                lat.push(t.elapsed().as_micros() as u64);
                done += 1;
                bytes += length as u64;
            }
            anyhow::Ok((done, bytes, lat))
        });
    }
    let mut out = Load { done: 0, bytes: 0, took: Duration::ZERO, latencies_us: Vec::new() };
    while let Some(r) = tasks.join_next().await {
        let (d, b, l) = r??;
        out.done += d;
        out.bytes += b;
        out.latencies_us.extend(l);
    }
    out.took = started.elapsed();
    out.latencies_us.sort_unstable();
    Ok(out)
}

/// nginx with its stream module forwarding `127.0.0.1:PORT` to `to`, if this machine has
/// both (Debian: `nginx`, `libnginx-mod-stream`): the config path and its port.
fn nginx_stream(dir: &Path, to: u16) -> Result<(std::path::PathBuf, u16)> {
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    if !module.exists() {
        bail!("no stream module");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let d = dir.join("nginx-stream");
    std::fs::create_dir_all(&d)?;
    let conf = d.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "load_module {};\ndaemon on;\nworker_processes auto;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\n\
             events {{ worker_connections 4096; }}\nstream {{ server {{ listen 127.0.0.1:{port}; proxy_pass 127.0.0.1:{to}; }} }}\n",
            module.display(),
            p = d.display()
        ),
    )?;
    let ok = std::process::Command::new("nginx").arg("-c").arg(&conf).arg("-p").arg(&d).status()?.success();
    if !ok {
        bail!("nginx did not start");
    }
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((conf, port));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nginx does not listen")
}

/// Traffic mode's listener against going straight to the service, in the same run.
async fn traffic_bench(secs: Duration, conns: usize) -> Result<()> {
    let web = std::env::current_exe()?.with_file_name("stagehand-test-web");
    let agent_bin = std::env::current_exe()?.with_file_name("stagehand-agent-under-test");
    let fleet = Fleet::start().await?;
    let agent = fleet.enrol("prod", "bench").await?;
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut toml = std::fs::read_to_string(agent.dir.join("agent.toml"))?;
    toml.push_str(&format!("\n[apps.web]\nlisten = \"127.0.0.1:{listen}\"\n"));
    std::fs::write(agent.dir.join("agent.toml"), toml)?;
    let dir = agent.dir.to_str().unwrap_or_default().to_string();
    let proc = Proc::spawn(
        agent_bin.to_str().unwrap_or_default(),
        &["run", "--data-dir", &dir],
        &[("STAGEHAND_LOG", "warn")],
        fleet.path().join("agent.log"),
    )?;
    let src = fleet.path().join("web");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("content"), "hello from the bench")?;
    std::fs::write(
        src.join("stagehand.toml"),
        format!("[service]\nstart = \"exec {}\"\n[health]\nurl = \"http://127.0.0.1:$PORT/health\"\ninterval = \"50ms\"\nretries = 100\n", web.display()),
    )?;
    fleet.push("web", "1", &src).await?;
    if !fleet.deploy("web", "1", "prod", 60).await?.all_done() {
        bail!("staging failed: {}", proc.log_text());
    }
    if !fleet.release("web", "1", "prod").await?.all_done() {
        bail!("the release failed: {}", proc.log_text());
    }
    let record = std::fs::read(agent.dir.join("services/web/1.json"))?;
    let direct: u16 = serde_json::from_slice::<serde_json::Value>(&record)?["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| anyhow::anyhow!("no port in the service record"))?;
    // A reference proxy on the same machine, where there is one: nginx's stream module.
    let nginx = nginx_stream(fleet.path(), direct).ok();
    let mib = |l: &Load| l.bytes as f64 / l.took.as_secs_f64() / MIB as f64;
    let rps = |l: &Load| l.done as f64 / l.took.as_secs_f64();
    let ms = |us: u64| us as f64 / 1000.0;
    let mut paths = vec![("direct", direct), ("listener", listen)];
    if let Some((_, port)) = &nginx {
        paths.push(("nginx stream", *port));
    }
    // Warm every path.
    for (_, port) in &paths {
        load(*port, "/", conns, Duration::from_millis(300)).await?;
    }
    const RUNS: usize = 5;
    println!(
        "# Traffic mode: the agent's listener against the service's own port ({} cores, {RUNS} runs of {} s, medians)\n",
        std::thread::available_parallelism()?.get(),
        secs.as_secs()
    );
    // (throughput, p50 ms, p99 ms) of each run, per (workload, path).
    type Runs = Vec<(f64, f64, f64)>;
    let mut results: HashMap<(&str, &str), Runs> = HashMap::new();
    // (name, path, connections, whether it counts requests rather than bytes)
    let workloads = [
        ("small", "/", conns, true),
        ("small, 50 µs of work each", "/work/50", conns, true),
        ("bulk 16 MiB", "/bytes/16777216", 4, false),
    ];
    for _ in 0..RUNS {
        for (workload, path, c, requests) in workloads {
            for (via, port) in &paths {
                let l = load(*port, path, c, secs).await?;
                let tput = if requests { rps(&l) } else { mib(&l) };
                let p50 = ms(pct(&l.latencies_us, 50));
                let p99 = ms(pct(&l.latencies_us, 99));
                results.entry((workload, via)).or_default().push((tput, p50, p99));
            }
        }
    }
    let median = |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(|a, b| a.total_cmp(b));
        x[x.len() / 2]
    };
    println!("| workload | path | throughput | p50 | p99 |");
    println!("|---|---|---|---|---|");
    for (workload, _, c, requests) in workloads {
        let unit = if requests { "req/s" } else { "MiB/s" };
        for (via, _) in &paths {
            let r = &results[&(workload, *via)];
            println!(
                "| {workload} ({c} keep-alive conns) | {via} | {:.0} {unit} | {:.2} ms | {:.2} ms |",
                median(r, |x| x.0),
                median(r, |x| x.1),
                median(r, |x| x.2)
            );
        }
    }
    println!();
    for (workload, ..) in workloads {
        let m = |via: &str, f: fn(&(f64, f64, f64)) -> f64| median(&results[&(workload, via)], f);
        let t = m("listener", |x| x.0) / m("direct", |x| x.0);
        let p = m("listener", |x| x.2) / m("direct", |x| x.2);
        print!(
            "{workload}: listener throughput {t:.2}× direct (goal ≥ 0.8: {}), p99 {p:.2}× direct (goal ≤ 1.5: {})",
            if t >= 0.8 { "met" } else { "NOT met" },
            if p <= 1.5 { "met" } else { "NOT met" }
        );
        if nginx.is_some() {
            let tn = m("nginx stream", |x| x.0) / m("direct", |x| x.0);
            let pn = m("nginx stream", |x| x.2) / m("direct", |x| x.2);
            print!("; nginx stream {tn:.2}× and {pn:.2}×");
        }
        println!();
    }
    if let Some((conf, _)) = &nginx {
        let _ = std::process::Command::new("nginx").arg("-c").arg(conf).args(["-s", "stop"]).status();
    }
    drop(proc);
    for pid in [record].iter().filter_map(|r| serde_json::from_slice::<serde_json::Value>(r).ok()?["pid"].as_i64()) {
        let _ = std::process::Command::new("kill").args(["-9", "--", &format!("-{pid}")]).status();
    }
    Ok(())
}
