//! Certificates and TLS configurations. The controller runs its own CA; every certificate
//! it issues names one role (controller, agent with its id, admin), and every connection is
//! mutual TLS except enrolment, where the agent checks the controller against the CA
//! fingerprint its join token carries.

use crate::protocol::CONTROLLER_SERVER_NAME;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How long the CA certificate lives.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86400);
/// Default lifetime of an agent's certificate; renewed over its channel (SPEC §10).
pub const AGENT_LIFETIME: Duration = Duration::from_secs(30 * 86400);
/// Default lifetime of an operator's certificate.
pub const ADMIN_LIFETIME: Duration = Duration::from_secs(90 * 86400);
/// The controller's own certificate; reissued at start once two thirds have passed.
pub const CONTROLLER_LIFETIME: Duration = Duration::from_secs(365 * 86400);
/// How far back a certificate's validity starts: clocks of hosts differ a little.
const SKEW: Duration = Duration::from_secs(60);

/// Sets a certificate's validity: from a little before now, for `lifetime`.
fn valid_for(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - SKEW;
    params.not_after = now + lifetime;
}

/// A certificate's validity, Unix seconds: (not before, not after).
pub fn validity(cert_pem: &str) -> Result<(i64, i64), TlsError> {
    let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
    Ok((params.not_before.unix_timestamp(), params.not_after.unix_timestamp()))
}

/// When a certificate should be renewed: two thirds into its lifetime (Unix seconds).
pub fn renew_at(cert_pem: &str) -> Result<i64, TlsError> {
    let (from, until) = validity(cert_pem)?;
    let issued = from + SKEW.as_secs() as i64;
    Ok(issued + (until - issued) * 2 / 3)
}

/// What can go wrong building certificates or TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be parsed.
    #[error("cannot parse {what}: {why}")]
    Pem { what: String, why: String },
    /// Certificate generation or signing failed.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// A credentials file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// The ring crypto provider, the only one Stagehand uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The role a certificate grants, written into its common name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Controller,
    Agent(String),
    Admin(String),
}

impl Role {
    fn common_name(&self) -> String {
        match self {
            Role::Controller => "stagehand-controller".into(),
            Role::Agent(id) => format!("stagehand-agent:{id}"),
            Role::Admin(name) => format!("stagehand-admin:{name}"),
        }
    }
}

/// The BLAKE3 fingerprint (hex) of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    blake3::hash(der).to_hex().to_string()
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes a new self-signed CA.
pub fn new_ca() -> Result<Pair, TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = dn("Stagehand CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    valid_for(&mut params, CA_LIFETIME);
    let cert = params.self_signed(&key)?;
    Ok(Pair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn leaf_params(role: &Role) -> Result<CertificateParams, TlsError> {
    let names = match role {
        Role::Controller => vec![CONTROLLER_SERVER_NAME.to_string()],
        _ => Vec::new(),
    };
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name = dn(&role.common_name());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match role {
        Role::Controller => ExtendedKeyUsagePurpose::ServerAuth,
        _ => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    Ok(params)
}

fn issue(ca: &Pair, role: &Role, public: &impl PublicKeyData, lifetime: Duration) -> Result<String, TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let ca_cert = CertificateParams::from_ca_cert_pem(&ca.cert_pem)?.self_signed(&ca_key)?;
    let mut params = leaf_params(role)?;
    valid_for(&mut params, lifetime);
    Ok(params.signed_by(public, &ca_cert, &ca_key)?.pem())
}

/// Issues a certificate and a fresh key for `role` (controller and admin credentials),
/// valid for `lifetime`.
pub fn issue_with_key(ca: &Pair, role: &Role, lifetime: Duration) -> Result<Pair, TlsError> {
    let key = KeyPair::generate()?;
    Ok(Pair { cert_pem: issue(ca, role, &key, lifetime)?, key_pem: key.serialize_pem() })
}

/// A new certificate for an existing pair's key (the controller's own, at start).
pub fn reissue(ca: &Pair, role: &Role, me: &Pair, lifetime: Duration) -> Result<Pair, TlsError> {
    let key = KeyPair::from_pem(&me.key_pem)?;
    Ok(Pair { cert_pem: issue(ca, role, &key, lifetime)?, key_pem: me.key_pem.clone() })
}

/// Issues a certificate for the key in a CSR, valid for `lifetime`. The CSR's own names
/// are ignored: the role (and so the agent id) is chosen by the caller.
pub fn issue_for_csr(ca: &Pair, role: &Role, csr_der: &[u8], lifetime: Duration) -> Result<String, TlsError> {
    let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))?;
    issue(ca, role, &csr.public_key, lifetime)
}

/// A new key and a CSR for it, as an agent makes at join.
pub fn new_csr() -> Result<(String, Vec<u8>), TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn("stagehand-agent");
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Parses the first certificate of a PEM text.
pub fn cert_der(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| TlsError::Pem { what: "certificate".into(), why: e.to_string() })
}

fn key_der(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| TlsError::Pem { what: "private key".into(), why: e.to_string() })
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(cert_der(ca_pem)?)?;
    Ok(Arc::new(roots))
}

/// The controller's TLS configuration: its certificate chain, client certificates
/// verified against the CA when presented (enrolment presents none; the controller
/// checks per channel who may connect).
pub fn server_config(ca_pem: &str, server: &Pair, alpns: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert_der(&server.cert_pem)?, cert_der(ca_pem)?], key_der(&server.key_pem)?)?;
    cfg.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// A client configuration with a client certificate, trusting only our CA.
pub fn client_config(ca_pem: &str, me: &Pair, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(vec![cert_der(&me.cert_pem)?], key_der(&me.key_pem)?)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// The enrolment client configuration: no client certificate; the server must present a
/// chain whose CA has the given fingerprint and a certificate that CA issued.
pub fn join_client_config(ca_fingerprint: &str, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let verifier =
        Arc::new(PinnedCaVerifier { fingerprint: ca_fingerprint.to_ascii_lowercase(), provider: provider() });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// Trusts a server whose chain carries the CA with a pinned fingerprint, then verifies the
/// server certificate against that CA as usual.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates.iter().find(|c| fingerprint(c) == self.fingerprint).ok_or_else(|| {
            rustls::Error::General("the controller's CA does not match the fingerprint in the join token".into())
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A credentials directory: `cert.pem`, `key.pem` (mode 0600) and `ca.pem`.
#[derive(Clone)]
pub struct Credentials {
    pub me: Pair,
    pub ca_pem: String,
}

impl Pair {
    /// Whether the key is the certificate's.
    pub fn matches(&self) -> bool {
        let Ok(cert) = cert_der(&self.cert_pem) else { return false };
        let Ok(key) = rustls::pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()) else { return false };
        let Ok(signing) = rustls::crypto::ring::sign::any_supported_type(&key) else { return false };
        rustls::sign::CertifiedKey::new(vec![cert], signing).keys_match().is_ok()
    }
}

impl Credentials {
    /// Loads the credentials in `dir`, finishing a renewal a crash interrupted (when the
    /// directory is ours to change; a read-only one is only read).
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        if let Ok(_lock) = Self::lock(dir) {
            Self::finish_renewal(dir)
                .map_err(|source| TlsError::Io { path: dir.join("renewed").display().to_string(), source })?;
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TlsError::Io { path: path.display().to_string(), source })
        };
        Ok(Credentials { me: Pair { cert_pem: read("cert.pem")?, key_pem: read("key.pem")? }, ca_pem: read("ca.pem")? })
    }

    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| TlsError::Io { path, source }
        };
        crate::fsx::create_private_dir(dir).map_err(io(dir))?;
        crate::fsx::write_atomic(&dir.join("ca.pem"), self.ca_pem.as_bytes(), 0o644).map_err(io(dir))?;
        crate::fsx::write_atomic(&dir.join("cert.pem"), self.me.cert_pem.as_bytes(), 0o644).map_err(io(dir))?;
        crate::fsx::write_atomic(&dir.join("key.pem"), self.me.key_pem.as_bytes(), 0o600).map_err(io(dir))?;
        Ok(())
    }

    /// Keeps renewed credentials in `dir`: written whole beside the current ones first
    /// (`dir/renewed/`), then moved over them, so a crash at any point leaves a certificate
    /// with its own key ([`Credentials::load`] finishes an interrupted move).
    ///
    /// Several processes may renew the same directory at once (parallel CLI runs): each
    /// writes and moves its pair under an exclusive lock on `dir/.lock`, and a pair whose key
    /// does not match its certificate is never moved in.
    pub fn save_renewed(&self, dir: &Path) -> Result<(), TlsError> {
        let io = |source| TlsError::Io { path: dir.display().to_string(), source };
        if !self.me.matches() {
            return Err(TlsError::Io {
                path: dir.display().to_string(),
                source: std::io::Error::other("the renewed certificate does not match its key"),
            });
        }
        let _lock = Self::lock(dir).map_err(io)?;
        Self::finish_renewal(dir).map_err(io)?;
        self.save(&dir.join("renewed"))?;
        Self::finish_renewal(dir).map_err(io)
    }

    /// An exclusive lock on the directory's renewals, held until the file is dropped.
    fn lock(dir: &Path) -> std::io::Result<std::fs::File> {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(".lock"))?;
        f.lock()?;
        Ok(f)
    }

    /// Under [`Credentials::lock`]: moves a whole, matching renewed pair over the current one.
    fn finish_renewal(dir: &Path) -> std::io::Result<()> {
        let next = dir.join("renewed");
        if !next.join("key.pem").exists() {
            let _ = std::fs::remove_dir_all(&next);
            return Ok(());
        }
        // The certificate that goes with the new key: still beside it, or already moved.
        let cert = std::fs::read_to_string(next.join("cert.pem"))
            .or_else(|_| std::fs::read_to_string(dir.join("cert.pem")))?;
        let key = std::fs::read_to_string(next.join("key.pem"))?;
        if !(Pair { cert_pem: cert, key_pem: key }).matches() {
            // Never a certificate without its key: the current pair stays.
            let _ = std::fs::remove_dir_all(&next);
            return Ok(());
        }
        // The certificate first: while `renewed/key.pem` is there, the new key is the truth.
        for name in ["cert.pem", "key.pem"] {
            if next.join(name).exists() {
                std::fs::rename(next.join(name), dir.join(name))?;
                // In this order on disk too: the key moves only once the certificate has.
                crate::fsx::fsync_dir(dir)?;
            }
        }
        let _ = std::fs::remove_dir_all(&next);
        Ok(())
    }

    pub fn client_config(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        client_config(&self.ca_pem, &self.me, alpn)
    }

    /// The fingerprint of the CA these credentials trust.
    pub fn ca_fingerprint(&self) -> Result<String, TlsError> {
        Ok(fingerprint(&cert_der(&self.ca_pem)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parallel CLI runs renewing one credentials directory: whatever the interleaving, the
    /// directory ends with a certificate and its own key; a mismatched pair is never kept.
    #[test]
    fn renewals_racing_in_one_directory_leave_a_matching_pair() {
        let ca = new_ca().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pair = || issue_with_key(&ca, &Role::Admin("ops".into()), ADMIN_LIFETIME).unwrap();
        Credentials { me: pair(), ca_pem: ca.cert_pem.clone() }.save(dir.path()).unwrap();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..5 {
                        Credentials { me: pair(), ca_pem: ca.cert_pem.clone() }.save_renewed(dir.path()).unwrap();
                        assert!(Credentials::load(dir.path()).unwrap().me.matches());
                    }
                });
            }
        });
        let kept = Credentials::load(dir.path()).unwrap();
        assert!(kept.me.matches());
        let bad = Credentials { me: Pair { cert_pem: pair().cert_pem, key_pem: pair().key_pem }, ca_pem: ca.cert_pem };
        assert!(bad.save_renewed(dir.path()).is_err());
        assert_eq!(Credentials::load(dir.path()).unwrap().me.cert_pem, kept.me.cert_pem);
    }

    #[test]
    fn csr_names_are_ignored() {
        let ca = new_ca().unwrap();
        let (_key, csr) = new_csr().unwrap();
        let pem = issue_for_csr(&ca, &Role::Agent("a-1".into()), &csr, AGENT_LIFETIME).unwrap();
        let (from, until) = validity(&pem).unwrap();
        assert!(until - from <= (AGENT_LIFETIME + SKEW).as_secs() as i64, "{from}..{until}");
        let der = cert_der(&pem).unwrap();
        // The common name we chose is in the certificate; the CSR asked for another.
        let needle = b"stagehand-agent:a-1";
        assert!(der.windows(needle.len()).any(|w| w == needle));
        assert!(issue_for_csr(&ca, &Role::Agent("a-1".into()), b"garbage", AGENT_LIFETIME).is_err());
    }
}
