//! The agent's config file (`DATA/agent.toml`, written by `join`) and its identity.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use stagehand_common::activate::ReleaseKey;
use stagehand_common::fsx;
use stagehand_common::protocol::Labels;
use stagehand_common::tls::Credentials;
use stagehand_common::AgentId;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `agent.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The controller's address, HOST:PORT, or several (`["a:7443", "b:7443"]`), tried in
    /// turn: controllers that share their state (SPEC §13; not built yet).
    pub controller: Controllers,
    /// Staged versions each app keeps besides the live one; older ones are removed after a
    /// staging succeeds. 0 keeps everything.
    #[serde(default = "default_keep")]
    pub keep_releases: usize,
    /// Per-app settings of this host.
    #[serde(default)]
    pub apps: BTreeMap<String, AppConfig>,
    /// Ceilings on what an artifact's `stagehand.toml` may ask of this host.
    #[serde(default, skip_serializing_if = "Limits::is_default")]
    pub limits: Limits,
    /// CA certificates (PEM) that `https://` health checks trust, instead of the system's
    /// (`/etc/ssl/certs/ca-certificates.crt`, else the bundled Mozilla roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_ca: Option<PathBuf>,
    /// Serves `GET /metrics` (Prometheus text format) on this TCP address, e.g.
    /// "127.0.0.1:9101".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
}

/// The controllers an agent may hold its channels to: written as one address, or a list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "OneOrMany", into = "OneOrMany")]
pub struct Controllers(Vec<String>);

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl TryFrom<OneOrMany> for Controllers {
    type Error = String;

    fn try_from(v: OneOrMany) -> Result<Self, String> {
        let list = match v {
            OneOrMany::One(a) => vec![a],
            OneOrMany::Many(l) => l,
        };
        if list.is_empty() {
            return Err("controller = [] names no controller; give \"HOST:PORT\" or a list of them".into());
        }
        // HOST:PORT or [IPv6]:PORT.
        let has_port = |a: &str| {
            a.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok() && (!host.starts_with('[') || host.ends_with(']'))
            })
        };
        if let Some(a) = list.iter().find(|a| !has_port(a)) {
            return Err(format!("the controller address {a:?} has no port; give HOST:PORT, for example {a}:7443"));
        }
        Ok(Controllers(list))
    }
}

impl From<Controllers> for OneOrMany {
    fn from(c: Controllers) -> Self {
        match <[String; 1]>::try_from(c.0) {
            Ok([one]) => OneOrMany::One(one),
            Err(many) => OneOrMany::Many(many),
        }
    }
}

impl Controllers {
    pub fn one(addr: &str) -> Self {
        Controllers(vec![addr.to_string()])
    }

    /// In the order to try them.
    pub fn addrs(&self) -> &[String] {
        &self.0
    }
}

impl std::fmt::Display for Controllers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

/// `[limits]`: the most any artifact's hooks and health checks get on this host, whatever
/// they ask. Durations in humantime form ("90s", "5m").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Per hook (default 10m).
    pub hook_timeout: Option<String>,
    /// Per health-check try (default 1m).
    pub health_timeout: Option<String>,
    /// Health-check tries (default 10).
    pub health_retries: Option<u32>,
    /// Between tries (default 30s).
    pub health_interval: Option<String>,
}

impl Limits {
    /// Every duration must parse: a typo must not quietly become the default.
    pub fn check(&self) -> Result<()> {
        for (name, v) in [
            ("hook_timeout", &self.hook_timeout),
            ("health_timeout", &self.health_timeout),
            ("health_interval", &self.health_interval),
        ] {
            if let Some(v) = v {
                humantime::parse_duration(v)
                    .with_context(|| format!("{name} = {v:?} is not a duration (\"90s\", \"5m\")"))?;
            }
        }
        Ok(())
    }

    fn is_default(&self) -> bool {
        *self == Limits::default()
    }

    /// A duration `check` accepted, or the default.
    fn get(v: &Option<String>, default: u64) -> std::time::Duration {
        v.as_deref().and_then(|s| humantime::parse_duration(s).ok()).unwrap_or(std::time::Duration::from_secs(default))
    }

    pub fn hook_timeout(&self) -> std::time::Duration {
        Self::get(&self.hook_timeout, 600)
    }

    pub fn health_timeout(&self) -> std::time::Duration {
        Self::get(&self.health_timeout, 60)
    }

    pub fn health_interval(&self) -> std::time::Duration {
        Self::get(&self.health_interval, 30)
    }

    pub fn health_retries(&self) -> u32 {
        self.health_retries.unwrap_or(10).max(1)
    }
}

pub fn default_keep() -> usize {
    5
}

/// What a host says about one app.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// Where `releases/` and `current` live (default `DATA/apps/<app>`).
    pub root: Option<PathBuf>,
    /// Extra environment for hooks and health checks.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Overrides `keep_releases` for this app.
    pub keep_releases: Option<usize>,
    /// How files a new version has in common with a staged one are reused.
    #[serde(default)]
    pub reuse: Reuse,
    /// Runs the app's hooks and health checks as this user (a name from /etc/passwd)
    /// instead of the agent's.
    pub user: Option<String>,
    /// Traffic mode (SPEC §9): the agent listens on this address (`127.0.0.1:8080`) and
    /// forwards each connection to the service of the version that is live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
}

/// A user's uid and gid, from /etc/passwd.
pub fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("reading /etc/passwd: {e}"))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f[0] == name)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .ok_or_else(|| format!("no user {name:?} in /etc/passwd (the app's `user` in agent.toml)"))
}

/// How a new version reuses files it has in common with a staged version of the same app.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reuse {
    /// Share them: a reflink where the filesystem has them, else a hard link (one inode in
    /// several versions), else a copy.
    #[default]
    Share,
    /// Give every version files of its own, copied in the kernel (`copy_file_range`, which
    /// a filesystem with reflinks turns into one). For apps that write into their release
    /// tree, so that such a write stays in the version it was made in.
    Copy,
}

impl AgentConfig {
    pub fn load(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join("agent.toml");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("reading {}; has this agent joined? run `stagehand-agent join --controller ADDR --token TOKEN --data-dir {}`", path.display(), data_dir.display())
        })?;
        let config: AgentConfig = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        config.limits.check().with_context(|| format!("{}: [limits]", path.display()))?;
        if let Some(m) = &config.metrics_listen {
            m.parse::<std::net::SocketAddr>().with_context(|| {
                format!("{}: metrics_listen = {m:?} is not an address (\"127.0.0.1:9101\")", path.display())
            })?;
        }
        for (app, a) in &config.apps {
            if let Some(listen) = &a.listen {
                listen.parse::<std::net::SocketAddr>().with_context(|| {
                    format!(
                        "{}: [apps.{app}] listen = {listen:?} is not an address (\"127.0.0.1:8080\")",
                        path.display()
                    )
                })?;
            }
        }
        Ok(config)
    }

    pub fn save(&self, data_dir: &Path) -> Result<()> {
        let text = format!(
            "# Stagehand agent configuration, written by `stagehand-agent join`.\n\
             # keep_releases: staged versions each app keeps besides the live one (0 keeps all).\n\
             # Per-app settings go under [apps.<name>]: root = \"/srv/web\", env = {{ KEY = \"value\" }}, keep_releases = N,\n\
             # reuse = \"copy\" (files of its own for every version, for apps that write into their release tree),\n\
             # listen = \"127.0.0.1:8080\" (traffic mode: the agent forwards connections to the live version's service)\n{}",
            toml::to_string(self)?
        );
        fsx::write_atomic(&data_dir.join("agent.toml"), text.as_bytes(), 0o644)?;
        Ok(())
    }
}

/// Who this agent is: id, environment, labels, certificate, pinned CA and release keys.
#[derive(Clone)]
pub struct Identity {
    pub id: AgentId,
    pub name: String,
    pub env: String,
    pub labels: Labels,
    pub credentials: Credentials,
    pub release_keys: Vec<ReleaseKey>,
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    id: AgentId,
    name: String,
    env: String,
    labels: Labels,
    release_keys: Vec<ReleaseKey>,
}

impl Identity {
    pub fn dir(data_dir: &Path) -> PathBuf {
        data_dir.join("identity")
    }

    /// Keeps renewed credentials (see [`Credentials::save_renewed`]).
    pub fn save_renewed(data_dir: &Path, creds: &Credentials) -> Result<()> {
        Ok(creds.save_renewed(&Self::dir(data_dir))?)
    }

    pub fn load(data_dir: &Path) -> Result<Self> {
        let dir = Self::dir(data_dir);
        let path = dir.join("agent.json");
        let bytes = fsx::read_limited(&path, 1 << 20).with_context(|| {
            format!("reading {}; has this agent joined? run `stagehand-agent join`", path.display())
        })?;
        let f: IdentityFile = serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Identity {
            id: f.id,
            name: f.name,
            env: f.env,
            labels: f.labels,
            credentials: Credentials::load(&dir)?,
            release_keys: f.release_keys,
        })
    }

    /// Pins other release keys: `agent.json` rewritten whole, durably.
    pub fn save_release_keys(data_dir: &Path, keys: &[ReleaseKey]) -> Result<()> {
        let path = Self::dir(data_dir).join("agent.json");
        let bytes = fsx::read_limited(&path, 1 << 20).with_context(|| format!("reading {}", path.display()))?;
        let mut f: IdentityFile =
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
        f.release_keys = keys.to_vec();
        fsx::write_atomic(&path, &serde_json::to_vec_pretty(&f)?, 0o600)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn save(&self, data_dir: &Path) -> Result<()> {
        let dir = Self::dir(data_dir);
        self.credentials.save(&dir)?;
        let f = IdentityFile {
            id: self.id.clone(),
            name: self.name.clone(),
            env: self.env.clone(),
            labels: self.labels.clone(),
            release_keys: self.release_keys.clone(),
        };
        fsx::write_atomic(&dir.join("agent.json"), &serde_json::to_vec_pretty(&f)?, 0o600)?;
        Ok(())
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("Identity").field("id", &self.id).field("name", &self.name).field("env", &self.env).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample in deploy/ must stay a valid config.
    #[test]
    fn the_sample_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let c = AgentConfig::load(&dir).unwrap();
        assert_eq!(c.apps["web"].root.as_deref(), Some(Path::new("/srv/web")));
        assert_eq!(c.apps["web"].env["PORT"], "8080");
        assert_eq!(c.keep_releases, 5);
        assert_eq!(c.apps["billing-worker"].keep_releases, Some(10));
        assert_eq!(c.apps["billing-worker"].reuse, Reuse::Copy);
        assert_eq!(c.apps["web"].reuse, Reuse::Share);
        let typo = Limits { hook_timeout: Some("10 minutez".into()), ..Limits::default() };
        assert!(format!("{:#}", typo.check().unwrap_err()).contains("hook_timeout"));
        let unit = std::fs::read_to_string(dir.join("stagehand-agent.service")).unwrap();
        assert!(unit.contains("stagehand-agent run --data-dir"));
    }

    /// `controller` is one address or a list; either is written back as it was read, and a
    /// list that names nothing, or an address without a port, is refused with why.
    #[test]
    fn controller_is_one_address_or_a_list() {
        let parse = |line: &str| toml::from_str::<AgentConfig>(line).map(|c| c.controller);
        let one = parse("controller = \"a:7443\"").unwrap();
        assert_eq!(one.addrs(), ["a:7443"]);
        let many = parse("controller = [\"a:7443\", \"b:7443\"]").unwrap();
        assert_eq!(many.addrs(), ["a:7443", "b:7443"]);
        assert_eq!(many.to_string(), "a:7443, b:7443");
        for c in [one, many] {
            let config = AgentConfig {
                controller: c.clone(),
                keep_releases: 5,
                apps: Default::default(),
                limits: Default::default(),
                health_ca: None,
                metrics_listen: None,
            };
            assert_eq!(parse(&toml::to_string(&config).unwrap()).unwrap(), c);
        }
        assert!(toml::to_string(
            &AgentConfig::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").as_path()).unwrap()
        )
        .unwrap()
        .starts_with("controller = \"controller.example.internal:7443\""));
        assert!(parse("controller = []").unwrap_err().to_string().contains("names no controller"));
        assert!(parse("controller = [\"a:7443\", \"b\"]").unwrap_err().to_string().contains("\"b\" has no port"));
        assert!(parse("controller = \"[::1]\"").unwrap_err().to_string().contains("has no port"));
        assert_eq!(parse("controller = \"[::1]:7443\"").unwrap().addrs(), ["[::1]:7443"]);
    }
}
