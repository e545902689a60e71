//! A real etcd (Debian's `etcd-server`) for a test: its own data directory and loopback
//! ports, stopped and removed on drop.

use crate::Proc;
use anyhow::{bail, Result};
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Etcd {
    pub proc: Proc,
    /// `HOST:PORT` of its client URL.
    pub client: String,
    peer: String,
    data: std::path::PathBuf,
}

/// A loopback TCP port nothing listens on now.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The etcd binary, if installed. Missing in CI (`.ci/run` installs it) is a failure; missing
/// elsewhere skips the test, saying so.
pub fn binary() -> Option<&'static str> {
    for bin in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if Path::new(bin).exists() {
            return Some(bin);
        }
    }
    assert!(std::env::var_os("STAGEHAND_CI").is_none(), "etcd is missing: .ci/run installs Debian's etcd-server");
    eprintln!("etcd is not installed (apt-get install etcd-server): skipping");
    None
}

impl Etcd {
    /// Starts etcd with its data in `dir`; None (the test skips) when it is not installed.
    pub async fn start(dir: &Path) -> Result<Option<Etcd>> {
        if binary().is_none() {
            return Ok(None);
        }
        let (client, peer) = (format!("127.0.0.1:{}", free_port()?), format!("127.0.0.1:{}", free_port()?));
        let data = dir.join("etcd");
        let mut etcd = Etcd { proc: Self::spawn(dir, &data, &client, &peer)?, client, peer, data };
        etcd.wait_ready().await?;
        Ok(Some(etcd))
    }

    fn spawn(dir: &Path, data: &Path, client: &str, peer: &str) -> Result<Proc> {
        let (c, p) = (format!("http://{client}"), format!("http://{peer}"));
        let cluster = format!("test={p}");
        Proc::spawn(
            binary().unwrap_or("etcd"),
            &[
                "--name",
                "test",
                "--data-dir",
                &data.display().to_string(),
                "--listen-client-urls",
                &c,
                "--advertise-client-urls",
                &c,
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
                "--initial-cluster",
                &cluster,
                // A rollout record of many hosts is one value.
                "--max-request-bytes",
                "33554432",
                // A rollout rewrites its record at every step: old revisions go.
                "--auto-compaction-retention",
                "1h",
                "--log-level",
                "warn",
            ],
            &[],
            dir.join("etcd.log"),
        )
    }

    /// The `--store` URL of this etcd.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.client)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Ok((200, body))) =
                tokio::time::timeout(Duration::from_secs(2), crate::http_get(self.client.parse()?, "/health")).await
            {
                if body.contains("true") {
                    return Ok(());
                }
            }
            if let Some(s) = self.proc.child.try_wait()? {
                bail!("etcd exited ({s}):\n{}", self.proc.log_text());
            }
            if Instant::now() > deadline {
                bail!("etcd did not become healthy in 30 s:\n{}", self.proc.log_text());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `kill -9`: etcd is unavailable until [`Etcd::restart`].
    pub fn kill(&mut self) {
        self.proc.kill9();
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) -> Result<()> {
        let dir = self.data.parent().unwrap_or(Path::new(".")).to_path_buf();
        self.proc = Self::spawn(&dir, &self.data, &self.client, &self.peer)?;
        self.wait_ready().await
    }
}
