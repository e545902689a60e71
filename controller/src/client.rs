//! The operator CLI's connection to the controller on the admin channel.

use anyhow::{bail, Context, Result};
use stagehand_common::frame::{self, read_msg, write_blob, write_msg};
use stagehand_common::protocol::{AdminRequest, AdminResponse, ALPN_ADMIN, PROTOCOL_VERSION};
use stagehand_common::tls::Credentials;
use stagehand_common::{net, Digest};
use std::path::Path;

/// An operator error: what failed and the next command to run.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub message: String,
    pub hint: String,
}

impl OpError {
    pub fn new(message: impl Into<String>, hint: impl Into<String>) -> Self {
        OpError { message: message.into(), hint: hint.into() }
    }
}

#[derive(Clone)]
pub struct Client {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
}

/// Whether a certificate has passed two thirds of its lifetime.
fn net_renew_due(creds: &Credentials) -> bool {
    stagehand_common::tls::renew_at(&creds.me.cert_pem).is_ok_and(|at| at <= stagehand_common::ids::now_secs() as i64)
}

/// How long a client waits for the controller to answer its handshake, by default.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Client {
    pub async fn connect(addr: Option<&str>, credentials: Option<&Path>) -> Result<Client> {
        Self::connect_within(addr, credentials, DEFAULT_CONNECT_TIMEOUT).await
    }

    /// Connects, giving up after `timeout` without an answer.
    pub async fn connect_within(
        addr: Option<&str>,
        credentials: Option<&Path>,
        timeout: std::time::Duration,
    ) -> Result<Client> {
        let addr = addr.ok_or_else(|| {
            OpError::new(
                "no controller address",
                "pass --controller HOST:PORT or set STAGEHAND_CONTROLLER (`stagehand dev` prints it)",
            )
        })?;
        let dir = credentials.ok_or_else(|| {
            OpError::new(
                "no admin credentials",
                "pass --credentials DIR or set STAGEHAND_CREDENTIALS (`stagehand controller init` made DATA/admin)",
            )
        })?;
        let creds =
            Credentials::load(dir).with_context(|| format!("loading admin credentials from {}", dir.display()))?;
        if !addr.contains(':') {
            return Err(OpError::new(
                format!("the controller address {addr:?} has no port"),
                format!("give HOST:PORT, for example --controller {addr}:7443"),
            )
            .into());
        }
        let sock = net::resolve(addr).await.map_err(|e| {
            OpError::new(e.to_string(), "give the controller as HOST:PORT (STAGEHAND_CONTROLLER or --controller)")
        })?;
        let endpoint = net::client_endpoint(sock)?;
        let config = net::client_config(creds.client_config(ALPN_ADMIN)?)?;
        let unreachable = |why: String| {
            OpError::new(
                format!("cannot reach the controller at {addr}: {why}"),
                "check that `stagehand controller serve` runs there and that the address and credentials are right \
                 (--connect-timeout waits longer)",
            )
        };
        let conn = match tokio::time::timeout(timeout, net::connect(&endpoint, sock, config)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(unreachable(e.to_string()).into()),
            Err(_) => {
                return Err(unreachable(format!("no answer within {}", humantime::format_duration(timeout))).into())
            }
        };
        let client = Client { conn, endpoint };
        match client.call(&AdminRequest::Hello { protocol_version: PROTOCOL_VERSION }).await {
            Ok(AdminResponse::Hello { .. }) => {}
            Ok(other) => bail!("{}", crate::cli::unexpected(&other)),
            Err(e) => return Err(e.context("the controller refused these credentials on the admin channel")),
        }
        // Two thirds into its lifetime, the certificate is renewed (the new one is kept in
        // the credentials directory); a failure leaves the current one, which still works.
        if net_renew_due(&creds) {
            match client.renew(dir, &creds).await {
                Ok(until) => eprintln!("note: renewed the certificate in {} (valid until {until} unix)", dir.display()),
                Err(e) => eprintln!("warning: could not renew the certificate in {}: {e:#}", dir.display()),
            }
        }
        Ok(client)
    }

    /// Asks for a new certificate for a fresh key and keeps both in `dir`.
    async fn renew(&self, dir: &Path, creds: &Credentials) -> Result<u64> {
        let (key_pem, csr_der) = stagehand_common::tls::new_csr()?;
        match self.call(&AdminRequest::RenewCertificate { csr_der }).await? {
            AdminResponse::CertificateRenewed { cert_pem, expires_at } => {
                let renewed =
                    Credentials { me: stagehand_common::tls::Pair { cert_pem, key_pem }, ca_pem: creds.ca_pem.clone() };
                renewed.save_renewed(dir)?;
                Ok(expires_at)
            }
            other => bail!("{}", crate::cli::unexpected(&other)),
        }
    }

    /// One request, one answer, on a stream of its own.
    pub async fn call(&self, req: &AdminRequest) -> Result<AdminResponse> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_msg(&mut send, req).await?;
        send.finish()?;
        self.answer(&mut recv).await
    }

    async fn answer(&self, recv: &mut quinn::RecvStream) -> Result<AdminResponse> {
        match read_msg::<_, AdminResponse, { frame::ADMIN_LIMIT }>(recv).await? {
            Some(AdminResponse::Error { message, hint }) => Err(OpError::new(message, hint).into()),
            Some(r) => Ok(r),
            None => bail!("the controller closed the stream without answering"),
        }
    }

    /// Uploads chunks: `chunks` yields each digest with its bytes.
    pub async fn push_chunks(&self, chunks: Vec<(Digest, Vec<u8>)>) -> Result<u64> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        let digests = chunks.iter().map(|(d, _)| *d).collect();
        write_msg(&mut send, &AdminRequest::PushChunks { digests }).await?;
        for (_, bytes) in &chunks {
            write_blob(&mut send, Some(bytes)).await?;
        }
        send.finish()?;
        match self.answer(&mut recv).await? {
            AdminResponse::PushChunksDone { stored } => Ok(stored),
            other => bail!("unexpected answer to a chunk upload: {other:?}"),
        }
    }

    /// Closes the connection. The close is sent at once; waiting out QUIC's draining period
    /// (three round-trip timeouts) would only delay the command's exit, so the wait is short.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(std::time::Duration::from_millis(5), self.endpoint.wait_idle()).await;
    }
}
