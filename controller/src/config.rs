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
}

fn default_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_catch_up() -> usize {
    3
}

impl ControllerConfig {
    pub fn new(listen: SocketAddr) -> Self {
        ControllerConfig { listen, message_ttl: default_ttl(), catch_up_versions: default_catch_up() }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("cannot read {}: {e}; run `stagehand controller init --data-dir DIR` first", path.display())
        })?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

/// Durations as humans write them ("1h", "90s").
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
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
