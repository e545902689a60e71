//! `controller init`: the CA, the controller's certificate, the release key (distinct from
//! the CA key) and the first admin credentials.

use crate::config::{ControllerConfig, Layout};
use crate::store::Store;
use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use stagehand_common::activate::ReleaseKey;
use stagehand_common::fsx;
use stagehand_common::tls::{self, Credentials, Pair, Role};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// What `init` made, for printing.
pub struct Initialised {
    pub config: PathBuf,
    pub admin_dir: PathBuf,
    pub ca_fingerprint: String,
    pub release_key_id: String,
}

pub fn init(data_dir: &Path, listen: SocketAddr) -> Result<Initialised> {
    let layout = Layout::new(data_dir);
    if layout.config().exists() {
        bail!(
            "{} is already initialised ({} exists); to start it run `stagehand controller serve --data-dir {}`",
            data_dir.display(),
            layout.config().display(),
            data_dir.display()
        );
    }
    fsx::create_private_dir(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;

    let ca = tls::new_ca()?;
    let ca_dir = layout.ca_dir();
    fsx::create_private_dir(&ca_dir)?;
    fsx::write_atomic(&ca_dir.join("ca.pem"), ca.cert_pem.as_bytes(), 0o644)?;
    fsx::write_atomic(&ca_dir.join("ca.key"), ca.key_pem.as_bytes(), 0o600)?;

    let server = tls::issue_with_key(&ca, &Role::Controller, tls::CONTROLLER_LIFETIME)?;
    Credentials { me: server, ca_pem: ca.cert_pem.clone() }.save(&layout.tls_dir())?;

    let release = SigningKey::generate(&mut rand::rngs::OsRng);
    let key_path = layout.release_key();
    fsx::create_private_dir(key_path.parent().expect("release key has a parent"))?;
    fsx::write_atomic(&key_path, hex::encode(release.to_bytes()).as_bytes(), 0o600)?;
    let public = ReleaseKey::from_signing(&release);

    let admin = tls::issue_with_key(&ca, &Role::Admin("admin".into()), tls::ADMIN_LIFETIME)?;
    let admin_fp = tls::fingerprint(&tls::cert_der(&admin.cert_pem)?);
    Credentials { me: admin, ca_pem: ca.cert_pem.clone() }.save(&layout.admin_dir())?;

    let store = Store::open(&layout.state())?;
    store.put_admin_cert(&admin_fp, "admin")?;
    store.flush()?;
    drop(store);

    // The config is written last: its presence means "initialised".
    let config = ControllerConfig::new(listen);
    fsx::write_atomic(&layout.config(), toml::to_string(&config)?.as_bytes(), 0o644)?;

    Ok(Initialised {
        config: layout.config(),
        admin_dir: layout.admin_dir(),
        ca_fingerprint: tls::fingerprint(&tls::cert_der(&ca.cert_pem)?),
        release_key_id: public.key_id,
    })
}

/// Loads the CA pair.
pub fn load_ca(layout: &Layout) -> Result<Pair> {
    let dir = layout.ca_dir();
    Ok(Pair {
        cert_pem: std::fs::read_to_string(dir.join("ca.pem")).with_context(|| format!("reading {}", dir.display()))?,
        key_pem: std::fs::read_to_string(dir.join("ca.key")).with_context(|| format!("reading {}", dir.display()))?,
    })
}

/// Loads the release signing key (finishing a rotation a crash interrupted).
pub fn load_release_key(layout: &Layout) -> Result<SigningKey> {
    Ok(crate::keys::load(layout)?.signing)
}
