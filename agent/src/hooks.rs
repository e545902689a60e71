//! What an artifact says about itself (`stagehand.toml`, SPEC §5b and §14) and running it: hooks,
//! health checks with timeouts, their output bounded for the receipt. A hook runs in its own
//! process group (the whole group is killed at its timeout), with an allow-listed
//! environment, under the host's ceilings on timeouts and tries, and as the app's `user`
//! when agent.toml names one.

use serde::Deserialize;
use stagehand_common::fsx;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Most output kept from one hook or check.
pub const OUTPUT_LIMIT: usize = 4096;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactConfig {
    #[serde(default)]
    pub hooks: Hooks,
    pub health: Option<Health>,
    /// A long-running process the agent supervises (SPEC §9).
    pub service: Option<Service>,
    /// Runs after a switch, for apps behind a proxy the agent does not run (nginx, HAProxy).
    pub switch: Option<Switch>,
    /// Run against the staged, not-live tree right after staging (SPEC §14).
    pub verify: Option<Verify>,
}

/// `[verify]`: a test of the staged tree, run like a hook before anything can make it live.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    /// Run with `sh -c` in the release directory.
    pub command: String,
    /// Default: `[hooks] timeout`, else the hooks' default (60s).
    pub timeout: Option<String>,
}

/// `[service]`: what the agent starts from the release directory, with `PORT` set.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Run with `sh -c` in the release directory.
    pub start: String,
    /// SIGTERM, then SIGKILL after this long (default 10s).
    pub stop_grace: Option<String>,
    /// How long connections to the version being replaced may take to finish before it
    /// is stopped (default 30s; in traffic mode it is stopped as soon as none is left).
    pub drain: Option<String>,
}

impl Service {
    pub fn stop_grace(&self) -> Duration {
        duration(&self.stop_grace, Duration::from_secs(10)).unwrap_or(Duration::from_secs(10))
    }

    pub fn drain(&self) -> Duration {
        duration(&self.drain, Duration::from_secs(30)).unwrap_or(Duration::from_secs(30))
    }
}

/// `[switch]`: a command run after each switch with the live version's `PORT`, so a proxy
/// in front can follow it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Switch {
    pub command: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    pub pre_activate: Option<String>,
    pub post_activate: Option<String>,
    /// Per hook (default 60s).
    pub timeout: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub command: Option<String>,
    pub url: Option<String>,
    /// Per try (default 10s).
    pub timeout: Option<String>,
    /// Tries before the release counts as unhealthy (default 3).
    pub retries: Option<u32>,
    /// Between tries (default 1s).
    pub interval: Option<String>,
    /// For `url`: the status that counts as healthy (default: any 2xx).
    pub expect_status: Option<u16>,
    /// For `url`: text the response body must contain.
    pub expect_body: Option<String>,
}

fn duration(s: &Option<String>, default: Duration) -> Result<Duration, String> {
    match s {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s).map_err(|e| format!("bad duration {s:?}: {e}")),
    }
}

impl ArtifactConfig {
    /// Reads `stagehand.toml` from a release directory; none means no hooks and no checks.
    pub fn load(release_dir: &Path) -> Result<Self, String> {
        let path = release_dir.join("stagehand.toml");
        match fsx::read_limited(&path, 64 << 10) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| "stagehand.toml is not UTF-8".to_string())?;
                Self::parse(&text)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ArtifactConfig::default()),
            Err(e) => Err(format!("stagehand.toml: {e}")),
        }
    }

    /// Parses and checks `stagehand.toml`: a duration that does not parse is an error here,
    /// naming the key, never a default in its place (`stagehand push` checks it too).
    pub fn parse(text: &str) -> Result<Self, String> {
        let c: ArtifactConfig = toml::from_str(text).map_err(|e| format!("stagehand.toml: {e}"))?;
        let key = |k: &str, r: Result<Duration, String>| r.map(|_| ()).map_err(|e| format!("stagehand.toml: {k}: {e}"));
        key("[hooks] timeout", c.hook_timeout())?;
        if let Some(h) = &c.health {
            key("[health] timeout", duration(&h.timeout, Duration::ZERO))?;
            key("[health] interval", duration(&h.interval, Duration::ZERO))?;
            if h.command.is_none() && h.url.is_none() {
                return Err("stagehand.toml: [health] needs a command or a url".into());
            }
        }
        if let Some(s) = &c.service {
            key("[service] stop_grace", duration(&s.stop_grace, Duration::ZERO))?;
            key("[service] drain", duration(&s.drain, Duration::ZERO))?;
            if s.start.trim().is_empty() {
                return Err("stagehand.toml: [service] start is empty".into());
            }
        }
        if let Some(v) = &c.verify {
            key("[verify] timeout", c.verify_timeout())?;
            if v.command.trim().is_empty() {
                return Err("stagehand.toml: [verify] command is empty".into());
            }
        }
        if c.switch.is_some() && c.service.is_none() {
            return Err("stagehand.toml: [switch] needs a [service] (it is told the service's PORT)".into());
        }
        Ok(c)
    }

    pub fn hook_timeout(&self) -> Result<Duration, String> {
        duration(&self.hooks.timeout, Duration::from_secs(60))
    }

    /// `[verify] timeout`, else the hooks' (a verify is a hook run early).
    pub fn verify_timeout(&self) -> Result<Duration, String> {
        match self.verify.as_ref().map(|v| &v.timeout) {
            Some(t @ Some(_)) => duration(t, Duration::ZERO),
            _ => self.hook_timeout(),
        }
    }
}

/// How a hook runs: its whole environment, and the user it runs as (uid, gid).
#[derive(Clone, Debug, Default)]
pub struct Exec {
    pub env: BTreeMap<String, String>,
    pub user: Option<(u32, u32)>,
    pub limits: crate::config::Limits,
    /// The CA file `https://` health checks trust (agent.toml `health_ca`).
    pub health_ca: Option<std::path::PathBuf>,
}

/// `PATH` for hooks when the agent has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs `sh -c cmd` in `dir` as `exec` says; Ok(output) on exit 0, Err(why and output)
/// otherwise. The hook is done when its process exits: a daemon it started in the
/// background may keep the output pipes open, so output is collected until the exit and
/// briefly after, not to the end of the pipes. At the timeout its whole process group is
/// killed. `timeout` is capped by the host's ceiling.
pub async fn run(cmd: &str, dir: &Path, exec: &Exec, timeout: Duration) -> Result<String, String> {
    let timeout = timeout.min(exec.limits.hook_timeout());
    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()))
        .envs(&exec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some((uid, gid)) = exec.user {
        command.uid(uid).gid(gid);
    }
    let mut child = command.spawn().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let group = child.id().and_then(|id| rustix::process::Pid::from_raw(id as i32));
    let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    let pipes: [Box<dyn tokio::io::AsyncRead + Unpin + Send>; 2] =
        [Box::new(child.stdout.take().expect("piped")), Box::new(child.stderr.take().expect("piped"))];
    for mut pipe in pipes {
        let output = output.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let mut out = output.lock().unwrap_or_else(|p| p.into_inner());
                out.extend_from_slice(&buf[..n]);
                // Keep only the tail.
                if out.len() > 2 * OUTPUT_LIMIT {
                    let cut = out.len() - OUTPUT_LIMIT;
                    out.drain(..cut);
                }
            }
        }));
    }
    let status = tokio::time::timeout(timeout, child.wait()).await;
    if status.is_err() {
        // The hook and everything it started: subshells, their children.
        if let Some(group) = group {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = child.kill().await;
    }
    // Whatever the hook wrote before it exited is in the pipes already: a short grace.
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        for r in &mut readers {
            let _ = r.await;
        }
    })
    .await;
    for r in &readers {
        r.abort();
    }
    let out = tail(&output.lock().unwrap_or_else(|p| p.into_inner()));
    match status {
        Ok(Ok(s)) if s.success() => Ok(out),
        Ok(Ok(s)) => Err(format!("{cmd:?} failed ({s}): {out}")),
        Ok(Err(e)) => Err(format!("{cmd:?}: {e}")),
        Err(_) => Err(format!("{cmd:?} timed out after {}: {out}", humantime::format_duration(timeout))),
    }
}

/// The last `OUTPUT_LIMIT` bytes, as text.
fn tail(out: &[u8]) -> String {
    let start = out.len().saturating_sub(OUTPUT_LIMIT);
    String::from_utf8_lossy(&out[start..]).trim_end().to_string()
}

/// Runs the health check until it passes or its tries run out (both capped by the host).
pub async fn check_health(h: &Health, dir: &Path, exec: &Exec) -> Result<String, String> {
    let l = &exec.limits;
    let timeout = duration(&h.timeout, Duration::from_secs(10))?.min(l.health_timeout());
    let interval = duration(&h.interval, Duration::from_secs(1))?.min(l.health_interval());
    let tries = h.retries.unwrap_or(3).clamp(1, l.health_retries());
    let mut last = String::new();
    for attempt in 1..=tries {
        let result = match (&h.command, &h.url) {
            (Some(cmd), _) => run(cmd, dir, exec, timeout).await,
            (None, Some(url)) => {
                // A service's check names its port as `$PORT`.
                let url = match exec.env.get("PORT") {
                    Some(port) => url.replace("${PORT}", port).replace("$PORT", port),
                    None => url.clone(),
                };
                http_check(&url, h, exec.health_ca.as_deref(), timeout).await
            }
            (None, None) => return Err("[health] needs `command` or `url`".into()),
        };
        match result {
            Ok(out) => return Ok(out),
            Err(e) => last = format!("try {attempt}/{tries}: {e}"),
        }
        if attempt < tries {
            tokio::time::sleep(interval).await;
        }
    }
    Err(last)
}

/// A GET of `url` (`http://` or `https://`, through ureq: HTTP/1.1, TLS verified against
/// `ca` or the system's roots) on the blocking pool: healthy on the expected status (any 2xx
/// by default) with the expected text in the body, if one is asked for.
async fn http_check(url: &str, h: &Health, ca: Option<&Path>, timeout: Duration) -> Result<String, String> {
    let (url, expect_status, expect_body, ca) =
        (url.to_string(), h.expect_status, h.expect_body.clone(), ca.map(Path::to_path_buf));
    let check = tokio::task::spawn_blocking(move || {
        let roots = roots(ca.as_deref()).map_err(|e| format!("{url}: {e}"))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent("stagehand-agent")
            .tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build())
            .build()
            .into();
        let mut resp = agent.get(&url).call().map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status().as_u16();
        // The first OUTPUT_LIMIT bytes are what `expect_body` is looked for in.
        let mut head = Vec::new();
        let _ = std::io::Read::read_to_end(
            &mut std::io::Read::take(resp.body_mut().as_reader(), OUTPUT_LIMIT as u64),
            &mut head,
        );
        let body = String::from_utf8_lossy(&head);
        let status_ok = match expect_status {
            Some(s) => status == s,
            None => (200..300).contains(&status),
        };
        if !status_ok {
            let want = expect_status.map_or("2xx".to_string(), |s| s.to_string());
            return Err(format!("{url}: status {status}, expected {want}"));
        }
        if let Some(text) = expect_body.filter(|t| !body.contains(t.as_str())) {
            return Err(format!("{url}: status {status}, but the body does not contain {text:?}"));
        }
        Ok(format!("{url}: {status}"))
    });
    match tokio::time::timeout(timeout + Duration::from_secs(1), check).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(format!("{e}")),
        Err(_) => Err(format!("no answer within {}", humantime::format_duration(timeout))),
    }
}

/// What `https://` checks trust: the named CA file, else the system's bundle, else the
/// bundled Mozilla roots.
fn roots(ca: Option<&Path>) -> Result<ureq::tls::RootCerts, String> {
    const SYSTEM: &str = "/etc/ssl/certs/ca-certificates.crt";
    let path = match ca {
        Some(p) => p.to_path_buf(),
        None if Path::new(SYSTEM).exists() => std::path::PathBuf::from(SYSTEM),
        None => return Ok(ureq::tls::RootCerts::WebPki),
    };
    let pem = fsx::read_limited(&path, 4 << 20).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let certs: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(ureq::tls::RootCerts::new_with_certs(&certs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_is_read_with_its_timeout() {
        let c = ArtifactConfig::parse("[verify]\ncommand = \"bin/test\"\ntimeout = \"5m\"\n").unwrap();
        assert_eq!(c.verify.as_ref().map(|v| v.command.as_str()), Some("bin/test"));
        assert_eq!(c.verify_timeout(), Ok(Duration::from_secs(300)));
    }

    /// Without its own timeout a verify has the hooks': the artifact's, else 60s.
    #[test]
    fn verify_timeout_defaults_to_the_hooks() {
        let c = ArtifactConfig::parse("[verify]\ncommand = \"true\"\n").unwrap();
        assert_eq!(c.verify_timeout(), Ok(Duration::from_secs(60)));
        let c = ArtifactConfig::parse("[hooks]\ntimeout = \"7s\"\n[verify]\ncommand = \"true\"\n").unwrap();
        assert_eq!(c.verify_timeout(), Ok(Duration::from_secs(7)));
        assert!(ArtifactConfig::parse("").unwrap().verify.is_none());
    }

    #[test]
    fn a_bad_verify_is_refused_naming_the_key() {
        let e = ArtifactConfig::parse("[verify]\ncommand = \"true\"\ntimeout = \"soon\"\n").unwrap_err();
        assert!(e.contains("[verify] timeout"), "{e}");
        let e = ArtifactConfig::parse("[verify]\ncommand = \"  \"\n").unwrap_err();
        assert!(e.contains("[verify] command is empty"), "{e}");
        assert!(ArtifactConfig::parse("[verify]\ntimeout = \"1s\"\n").is_err(), "command is required");
        assert!(ArtifactConfig::parse("[verify]\ncommand = \"true\"\nretries = 2\n").is_err(), "unknown key");
    }
}
