//! The wire protocol: one enum per direction and channel, each starting with
//! `Hello { protocol_version }`. Variants are only ever added at the end; the golden-bytes
//! tests below fail if an existing encoding changes.

use crate::activate::{Refusal, ReleaseKey, SignedActivate};
use crate::ids::{AgentId, Digest};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bumped when a message changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;

pub const ALPN_ADMIN: &[u8] = b"stagehand-admin/1";
pub const ALPN_DEPLOY: &[u8] = b"stagehand-deploy/1";
pub const ALPN_RELEASE: &[u8] = b"stagehand-release/1";
pub const ALPN_JOIN: &[u8] = b"stagehand-join/1";

/// The name every controller certificate carries and every client checks, whatever
/// address it dialled.
pub const CONTROLLER_SERVER_NAME: &str = "stagehand-controller";

pub type Labels = BTreeMap<String, String>;

// ---- Enrolment (ALPN stagehand-join/1), no client certificate. ----

/// Agent → controller on the join channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinUp {
    Hello {
        protocol_version: u32,
    },
    /// The token's secret part, a CSR for a key the agent made, and what it wants to be called.
    Join {
        token_id: String,
        token_secret: String,
        csr_der: Vec<u8>,
        name: String,
        labels: Labels,
    },
}

/// Controller → agent on the join channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinDown {
    Hello {
        protocol_version: u32,
    },
    Joined {
        agent_id: AgentId,
        env: String,
        labels: Labels,
        cert_pem: String,
        ca_pem: String,
        release_keys: Vec<ReleaseKey>,
    },
    Refused {
        reason: String,
    },
}

// ---- Deploy channel (ALPN stagehand-deploy/1). It carries bytes and reports, never a
// message that changes what is live. ----

/// Agent → controller on the deploy channel. `FetchManifest` and `FetchChunks` open their
/// own stream; the answer is raw blobs (see `frame::write_blob`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeployUp {
    Hello {
        protocol_version: u32,
    },
    /// What the agent holds staged, sent after every (re)connection.
    Inventory {
        staged: Vec<StagedArtifact>,
    },
    StageReport {
        app: String,
        version: String,
        digest: Digest,
        outcome: StageOutcome,
    },
    FetchManifest {
        digest: Digest,
    },
    FetchChunks {
        digests: Vec<Digest>,
    },
    /// The agent removed a staged version to keep within its retention (`keep_releases`).
    Pruned {
        app: String,
        version: String,
    },
}

/// Controller → agent on the deploy channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeployDown {
    Hello {
        protocol_version: u32,
    },
    /// Make this artifact present and verified under `releases/<version>`.
    Stage {
        app: String,
        version: String,
        digest: Digest,
        size: u64,
    },
    /// The controller refuses this connection (unknown or revoked agent, bad hello).
    Goodbye {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedArtifact {
    pub app: String,
    pub version: String,
    pub digest: Digest,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageOutcome {
    Staged { fetched_bytes: u64, reused_bytes: u64, millis: u64 },
    Failed { reason: String },
}

// ---- Release channel (ALPN stagehand-release/1): activate messages and receipts only. ----

/// Agent → controller on the release channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseUp {
    Hello {
        protocol_version: u32,
    },
    /// Per app: what is live and the last `seq` applied; sent on connect and after changes.
    State {
        apps: Vec<AppState>,
    },
    Receipt(Receipt),
}

/// Controller → agent on the release channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseDown {
    Hello { protocol_version: u32 },
    Activate(SignedActivate),
    Goodbye { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppState {
    pub app: String,
    pub active: Option<String>,
    pub last_seq: Option<u64>,
}

/// An agent's answer to one activate message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub agent_id: AgentId,
    pub app: String,
    pub version: String,
    pub seq: u64,
    pub outcome: ReceiptOutcome,
    /// What is live after this message was handled.
    pub active: Option<String>,
    /// Hook and health-check output, bounded.
    pub log: String,
    /// Microseconds: receipt of the message → check done, → switch visible, → committed.
    pub check_us: u64,
    pub switch_us: u64,
    pub total_us: u64,
    /// Unix seconds when the agent finished.
    pub at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReceiptOutcome {
    /// Switched, healthy, committed.
    Committed,
    /// Refused, or switched and then switched back; `current` is as it was.
    Refused(Refusal),
    /// Accepted, waiting for `not_before`.
    Scheduled { until: u64 },
}

// ---- Admin channel (ALPN stagehand-admin/1): one request per stream. ----

/// Operator CLI → controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    Hello {
        protocol_version: u32,
    },
    CreateToken {
        env: String,
        ttl_secs: u64,
        labels: Labels,
        uses: u32,
    },
    ListAgents,
    /// Offers a manifest; the answer lists the chunks the controller lacks.
    PushBegin {
        app: String,
        version: String,
        manifest: Vec<u8>,
    },
    /// Followed on the same stream by blobs, in the order of `digests`.
    PushChunks {
        digests: Vec<Digest>,
    },
    PushCommit {
        app: String,
        version: String,
        digest: Digest,
    },
    Deploy {
        app: String,
        version: String,
        env: String,
    },
    Status {
        app: String,
        env: String,
    },
    Release {
        app: String,
        version: String,
        env: String,
        export: bool,
        ttl_secs: u64,
    },
    Rollback {
        app: String,
        env: String,
        to: Option<String>,
        export: bool,
        ttl_secs: u64,
    },
    RevokeAgent {
        agent: String,
    },
    /// Answers when every agent of `env` reports `version` staged (or failed), or at the timeout.
    WaitStaged {
        app: String,
        version: String,
        env: String,
        timeout_secs: u64,
    },
    /// Answers when every target of the release with `seq` has a receipt, or at the timeout.
    WaitRelease {
        app: String,
        env: String,
        seq: u64,
        timeout_secs: u64,
    },
}

/// Controller → operator CLI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminResponse {
    Hello { protocol_version: u32 },
    Token { token: String, expires_at: u64 },
    Agents { agents: Vec<AgentInfo> },
    PushNeed { digest: Digest, missing: Vec<Digest>, already_present: bool },
    PushChunksDone { stored: u64 },
    Pushed { digest: Digest, size: u64 },
    Deployed { digest: Digest, targets: Vec<AgentId> },
    Status { status: AppStatus },
    Released { message: SignedActivate, version: String, seq: u64, targets: Vec<AgentId> },
    Revoked { agent: AgentId },
    Error { message: String, hint: String },
    Waited { done: Vec<AgentId>, failed: Vec<(AgentId, String)>, pending: Vec<AgentId> },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub id: AgentId,
    pub name: String,
    pub env: String,
    pub labels: Labels,
    pub connected: bool,
    pub revoked: bool,
    pub apps: Vec<AgentAppInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentAppInfo {
    pub app: String,
    pub active: Option<String>,
    pub staged: Vec<String>,
    pub failed: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppStatus {
    pub app: String,
    pub env: String,
    /// The version the environment should run, and the seq of its message.
    pub desired: Option<(String, u64)>,
    pub agents: Vec<AgentAppStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentAppStatus {
    pub id: AgentId,
    pub name: String,
    pub connected: bool,
    pub staged: Vec<String>,
    pub staging_failed: Vec<(String, String)>,
    pub active: Option<String>,
    pub last_seq: Option<u64>,
    pub last_receipt: Option<Receipt>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode;

    /// Pins the encoding: reordering variants or fields fails here, not in a fleet.
    #[test]
    fn golden_bytes() {
        let hello = encode(&DeployUp::Hello { protocol_version: 1 });
        assert_eq!(hex::encode(hello), "0000000000000001");
        let stage =
            encode(&DeployDown::Stage { app: "a".into(), version: "1".into(), digest: Digest([0xAB; 32]), size: 2 });
        assert_eq!(
            hex::encode(stage),
            format!(
                "00000001{}{}{}{}",
                "000000000000000161",
                "000000000000000131",
                "ab".repeat(32),
                "0000000000000002"
            )
        );
        let fetch = encode(&DeployUp::FetchChunks { digests: vec![Digest([1; 32])] });
        assert_eq!(hex::encode(fetch), format!("000000040000000000000001{}", "01".repeat(32)));
        assert_eq!(hex::encode(encode(&ReleaseDown::Hello { protocol_version: 1 })), "0000000000000001");
        assert_eq!(hex::encode(encode(&ReleaseUp::Hello { protocol_version: 1 })), "0000000000000001");
        assert_eq!(hex::encode(encode(&AdminRequest::ListAgents)), "00000002");
        assert_eq!(hex::encode(encode(&JoinUp::Hello { protocol_version: 1 })), "0000000000000001");
        let outcome = encode(&ReceiptOutcome::Refused(crate::activate::Refusal::StaleSeq));
        assert_eq!(hex::encode(outcome), "0000000100000005");
    }
}
