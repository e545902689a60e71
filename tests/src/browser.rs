//! A real browser for the fleet page's tests: Debian's headless Chromium, driven over
//! WebDriver by its `chromedriver` (both installed by `.ci/run`), through fantoccini.

use crate::wait_for;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A chromedriver and one browser session; the driver and its browsers are killed on drop.
pub struct Browser {
    pub client: fantoccini::Client,
    _driver: DriverGuard,
    _profile: tempfile::TempDir,
}

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

impl Browser {
    /// `None` (and a note on stderr) where Chromium or its driver is not installed.
    pub async fn start(log_dir: &Path) -> Result<Option<Browser>> {
        if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
            // In CI (`.ci/run` sets STAGEHAND_CI) a missing browser is a failure, not a skip.
            if std::env::var_os("STAGEHAND_CI").is_some() {
                bail!("chromium and chromium-driver are not installed, and .ci/run should have installed them");
            }
            eprintln!("note: chromium and chromium-driver are not installed (.ci/run installs them); skipping");
            return Ok(None);
        }
        let profile = tempfile::Builder::new().prefix("stagehand-chromium-").tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::fs::File::create(log_dir.join(format!("chromedriver-{port}.log")))?;
        let driver = {
            use std::os::unix::process::CommandExt;
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                // Its own process group: the browsers it starts go with it.
                .process_group(0)
                .spawn()
                .context("starting chromedriver")?
        };
        let driver = DriverGuard(Some(driver));
        let url = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver to listen", Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await?;
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1360,900", "--no-first-run", "--disable-extensions",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let client = fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .context("starting a Chromium session through chromedriver")?;
        Ok(Some(Browser { client, _driver: driver, _profile: profile }))
    }

    /// The visible text of the page.
    pub async fn text(&self) -> Result<String> {
        let v = self.client.execute("return document.body ? document.body.innerText : '';", vec![]).await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Waits until the page's visible text satisfies `ok`; the error shows the text.
    pub async fn wait_text(&self, what: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let text = self.text().await.unwrap_or_default();
            if ok(&text) {
                return Ok(text);
            }
            if std::time::Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}; the page reads:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs a script in the page and returns its value.
    pub async fn eval(&self, script: &str) -> Result<serde_json::Value> {
        Ok(self.client.execute(script, vec![]).await?)
    }

    /// Saves a PNG of the page where `STAGEHAND_SCREENSHOTS` names a directory.
    pub async fn screenshot(&self, name: &str) -> Result<()> {
        let Some(dir) = std::env::var_os("STAGEHAND_SCREENSHOTS") else { return Ok(()) };
        let png = self.client.screenshot().await?;
        std::fs::create_dir_all(&dir)?;
        std::fs::write(Path::new(&dir).join(format!("{name}.png")), png)?;
        Ok(())
    }

    /// Ends the session, then the driver.
    pub async fn close(self) {
        let Browser { client, _driver, _profile } = self;
        let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
    }
}

/// Kills chromedriver's process group (the driver and every browser it started).
struct DriverGuard(Option<Child>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
