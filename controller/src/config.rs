//! The controller's configuration file, `DATA/controller.toml`, and its data-dir layout.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";

/// `controller.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// UDP address the controller listens on.
    pub listen: SocketAddr,
    /// How long a signed activate message stays valid.
    #[serde(with = "humantime_serde_compat", default = "default_ttl")]
    pub message_ttl: Duration,
    /// How many of the newest deployed versions per app an agent stages when it joins late
    /// or comes back (the released version is always included).
    #[serde(default = "default_catch_up")]
    pub catch_up_versions: usize,
    /// Chunk streams the controller serves at once, across every agent: what staging to many
    /// agents at once may hold in memory (each stream at most 4 chunks read ahead and its
    /// connection's 16 MiB send window). Further streams wait their turn, in order.
    #[serde(default = "default_fetch_streams")]
    pub fetch_streams: usize,
    /// How long an agent's certificate lives; agents renew theirs two thirds in.
    #[serde(with = "humantime_serde_compat", default = "default_agent_cert")]
    pub agent_cert_lifetime: Duration,
    /// How long an operator's certificate lives (`stagehand admin add`).
    #[serde(with = "humantime_serde_compat", default = "default_admin_cert")]
    pub admin_cert_lifetime: Duration,
    /// `[environments]`: the promotion order and per-environment rollout defaults.
    #[serde(default)]
    pub environments: Environments,
    /// TCP address for `/metrics` (`serve --http` overrides it); none: no HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    /// The fleet page's URL as browsers reach it (behind a TLS proxy, say
    /// `https://stagehand.example.com`); `stagehand ui` builds its links on it. None: `http://`
    /// and the address served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_url: Option<String>,
    /// Where artifacts' chunks are kept; none: `store/` in the data directory. Controllers
    /// sharing their state in etcd share this directory too (SPEC §13, ARCHITECTURE.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<std::path::PathBuf>,
}

fn default_agent_cert() -> Duration {
    stagehand_common::tls::AGENT_LIFETIME
}

fn default_admin_cert() -> Duration {
    stagehand_common::tls::ADMIN_LIFETIME
}

/// `[environments] order = [...]` and `[environments.NAME]` tables.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Environments {
    /// Promotion order: a release must have completed in the nearest earlier environment
    /// that has agents.
    #[serde(default = "default_order")]
    pub order: Vec<String>,
    /// Rollout defaults per environment.
    #[serde(flatten)]
    pub envs: std::collections::BTreeMap<String, EnvironmentConfig>,
}

impl Default for Environments {
    fn default() -> Self {
        Environments { order: default_order(), envs: Default::default() }
    }
}

fn default_order() -> Vec<String> {
    crate::plan::fleet::DEFAULT_ORDER.iter().map(|s| s.to_string()).collect()
}

/// Rollout defaults of one environment (flags override them).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentConfig {
    /// Cumulative wave sizes, `1,10%,50%,100%`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waves: Option<String>,
    /// How long each wave must stay healthy before the next starts.
    #[serde(default, with = "humantime_serde_opt", skip_serializing_if = "Option::is_none")]
    pub bake: Option<Duration>,
    /// `N` or `P%`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_unhealthy: Option<String>,
    /// `wait`, `skip` or `fail`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline: Option<String>,
    /// Distinct operator identities, other than the requester, that must approve a release
    /// (SPEC §14); agents enforce it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approvals: Option<u32>,
    /// Releases start only inside one of these (`Mon-Thu 09:00-16:00 Europe/Berlin`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<String>>,
    /// Every target must have passed the artifact's `[verify]`; agents enforce it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<bool>,
}

impl Environments {
    /// Whether the config names this environment (order or a table of its own).
    pub fn knows(&self, env: &str) -> bool {
        self.envs.contains_key(env) || self.order.iter().any(|e| e == env)
    }

    pub fn get(&self, env: &str) -> EnvironmentConfig {
        self.envs.get(env).cloned().unwrap_or_default()
    }
}

fn default_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_catch_up() -> usize {
    3
}

fn default_fetch_streams() -> usize {
    32
}

impl ControllerConfig {
    pub fn new(listen: SocketAddr) -> Self {
        ControllerConfig {
            listen,
            message_ttl: default_ttl(),
            catch_up_versions: default_catch_up(),
            fetch_streams: default_fetch_streams(),
            agent_cert_lifetime: default_agent_cert(),
            admin_cert_lifetime: default_admin_cert(),
            environments: Environments::default(),
            http: None,
            http_url: None,
            chunks: None,
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("cannot read {}: {e}; run `stagehand controller init --data-dir DIR` first", path.display())
        })?;
        let config: Self = toml::from_str(&text).map_err(|e| parse_error(path, &text, &e))?;
        if config.fetch_streams == 0 {
            anyhow::bail!("{}: fetch_streams must be at least 1 (the default is 32)", path.display());
        }
        for (env, e) in &config.environments.envs {
            if let Some(w) = &e.windows {
                crate::plan::window::parse_all(w)
                    .map_err(|why| anyhow::anyhow!("{}: [environments.{env}] windows: {why}", path.display()))?;
            }
        }
        Ok(config)
    }
}

/// A parse error on one line, with the line it is on: toml's own text draws the line on
/// several, which the CLI's error output (control characters escaped) would print as `\n`.
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> anyhow::Error {
    let at = e.span().map(|s| format!(", line {}", text[..s.start.min(text.len())].matches('\n').count() + 1));
    let why = e.message().trim().replace('\n', "; ");
    anyhow::anyhow!("{}{}: {why}", path.display(), at.unwrap_or_default())
}

/// Durations as humans write them ("1h", "90s").
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&text(*d))
    }

    /// Whole days as days: humantime would write 90 days as "2months 29days 2h 52m 48s".
    pub fn text(d: Duration) -> String {
        match d.as_secs() {
            secs if secs >= 86400 && secs % 86400 == 0 && d.subsec_nanos() == 0 => format!("{}days", secs / 86400),
            _ => humantime::format_duration(d).to_string(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::humantime_serde_compat::text(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Some).map_err(serde::de::Error::custom)
    }
}

/// Where things live under the controller's data directory.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Self {
        Layout { root: root.to_path_buf() }
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("controller.toml")
    }
    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }
    pub fn release_key(&self) -> PathBuf {
        self.root.join("release").join("release.key")
    }
    pub fn admin_dir(&self) -> PathBuf {
        self.root.join("admin")
    }
    pub fn state(&self) -> PathBuf {
        self.root.join("state")
    }
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }
    /// Written at start-up with the address actually bound (useful with port 0).
    pub fn addr_file(&self) -> PathBuf {
        self.root.join("controller.addr")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample in deploy/ must stay a valid config.
    #[test]
    fn the_sample_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/controller.toml");
        let c = ControllerConfig::load(&path).unwrap();
        assert_eq!(c.listen.port(), 7443);
        assert_eq!(c.message_ttl, Duration::from_secs(3600));
        assert_eq!(c.environments.order, ["dev", "test", "staging", "prod"]);
        let prod = c.environments.get("prod");
        assert_eq!(prod.waves.as_deref(), Some("1,10%,50%,100%"));
        assert_eq!(prod.bake, Some(Duration::from_secs(300)));
    }

    /// A mistake in controller.toml is told on one line, with where it is and what is known.
    #[test]
    fn a_bad_config_says_which_line_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\nbogus = 1\n").unwrap();
        let e = ControllerConfig::load(&path).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("controller.toml, line 2: unknown field `bogus`, expected one of `listen`"), "{e}");
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\nfetch_streams = 0\n").unwrap();
        let e = ControllerConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("fetch_streams must be at least 1"), "{e}");
    }

    #[test]
    fn the_sample_unit_runs_serve() {
        let unit = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/stagehand-controller.service"),
        )
        .unwrap();
        assert!(unit.contains("stagehand controller serve --data-dir"));
    }
}
