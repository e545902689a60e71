//! The wire protocol: one enum per direction and channel, each starting with
//! `Hello { protocol_version }`. Variants are only ever added at the end; the golden-bytes
//! tests below fail if an existing encoding changes.

use crate::activate::{Refusal, ReleaseKey, SignedActivate};
use crate::ids::{AgentId, Digest};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bumped when a message changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 2;

pub const ALPN_ADMIN: &[u8] = b"stagehand-admin/1";
pub const ALPN_DEPLOY: &[u8] = b"stagehand-deploy/1";
pub const ALPN_RELEASE: &[u8] = b"stagehand-release/1";
pub const ALPN_JOIN: &[u8] = b"stagehand-join/1";

/// The QUIC close code with which the controller tells an agent it is revoked (or removed):
/// the agent stops for good (exit status 3) instead of reconnecting.
pub const CLOSE_REVOKED: u32 = 3;
/// The QUIC close code of a connection whose certificate does not grant its channel (an
/// agent this controller does not know): an agent with other controllers tries the next.
pub const CLOSE_UNAUTHORISED: u32 = 1;

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
    /// A certificate for a new key, two thirds into the current one's lifetime.
    Renew {
        csr_der: Vec<u8>,
    },
    /// The agent's own version (`stagehand-agent --version`), after its inventory.
    About {
        version: String,
    },
    /// What the artifact's `[verify]` said of a staged version (SPEC §14): sent after its
    /// stage report, and again for every staged version after the inventory.
    Verified {
        app: String,
        version: String,
        digest: Digest,
        outcome: VerifyOutcome,
    },
}

/// The result of an artifact's `[verify] command` against the staged tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerifyOutcome {
    Passed,
    /// Failed, timed out or could not start; the output, bounded.
    Failed {
        log: String,
    },
    /// The artifact declares no `[verify]`.
    NotDeclared,
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
    /// The renewed certificate, for the key of the agent's last `Renew`.
    Renewed {
        cert_pem: String,
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
    /// The policy the agent enforces, and the last update it refused (with why), if newer.
    Policy {
        serial: u64,
        approvals: u32,
        refused: Option<(u64, String)>,
    },
    /// A preview started, stopped or failed.
    Preview {
        app: String,
        version: Option<String>,
        port: Option<u16>,
        detail: String,
    },
}

/// Controller → agent on the release channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseDown {
    Hello {
        protocol_version: u32,
    },
    Activate(SignedActivate),
    Goodbye {
        reason: String,
    },
    /// Every release key change the controller made, oldest first (SPEC §10): sent before
    /// any message, and applied by the agent before it reads the next one.
    KeyChanges(Vec<crate::keychain::SignedKeyChange>),
    /// The environment's release policy (SPEC §14), sent after the key changes and before
    /// any message, and again whenever it changes.
    Policy(crate::policy::SignedPolicy),
    /// Start (or with no version, stop) a staged version beside the live one (SPEC §14).
    Preview(crate::policy::SignedPreview),
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
    /// The agent recorded this message's seq as applied (its intent was made durable): the
    /// same message will only ever be answered with this receipt again. False for refusals
    /// before the intent (not staged, expired, a host error reading the journal…) and for
    /// scheduled messages, which may be offered again. Decided by the agent, never inferred.
    #[serde(default)]
    pub applied: bool,
}

impl Receipt {
    /// The receipt in the JSON vocabulary every `-o json` output shares: named fields,
    /// `outcome` one of `committed`, `refused`, `scheduled`, and `reason` the stable code.
    pub fn to_json(&self) -> serde_json::Value {
        let (outcome, reason, until) = match &self.outcome {
            ReceiptOutcome::Committed => ("committed", None, None),
            ReceiptOutcome::Refused(why) => ("refused", Some(why.code()), None),
            ReceiptOutcome::Scheduled { until } => ("scheduled", None, Some(*until)),
        };
        serde_json::json!({
            "agent": self.agent_id, "app": self.app, "version": self.version, "seq": self.seq,
            "outcome": outcome, "reason": reason, "until": until, "applied": self.applied,
            "active": self.active, "log": self.log, "at": self.at,
            "check_us": self.check_us, "switch_us": self.switch_us, "total_us": self.total_us,
        })
    }
}

impl Receipt {
    /// Reads back what [`Receipt::to_json`] wrote (for scripts and tests).
    pub fn from_json(v: &serde_json::Value) -> Option<Receipt> {
        let text = |k: &str| v[k].as_str().map(str::to_string);
        let outcome = match v["outcome"].as_str()? {
            "committed" => ReceiptOutcome::Committed,
            "refused" => ReceiptOutcome::Refused(Refusal::from_code(v["reason"].as_str()?)?),
            "scheduled" => ReceiptOutcome::Scheduled { until: v["until"].as_u64()? },
            _ => return None,
        };
        Some(Receipt {
            agent_id: AgentId(text("agent")?),
            app: text("app")?,
            version: text("version")?,
            seq: v["seq"].as_u64()?,
            outcome,
            active: text("active"),
            log: text("log").unwrap_or_default(),
            check_us: v["check_us"].as_u64().unwrap_or_default(),
            switch_us: v["switch_us"].as_u64().unwrap_or_default(),
            total_us: v["total_us"].as_u64().unwrap_or_default(),
            at: v["at"].as_u64().unwrap_or_default(),
            applied: v["applied"].as_bool().unwrap_or_default(),
        })
    }
}

impl AppStatus {
    /// The status in the shared JSON vocabulary.
    pub fn to_json(&self) -> serde_json::Value {
        let agents: Vec<_> = self
            .agents
            .iter()
            .map(|a| {
                serde_json::json!({
                    "id": a.id, "name": a.name, "connected": a.connected, "active": a.active,
                    "last_seq": a.last_seq, "staged": a.staged,
                    "failed": a.staging_failed.iter().map(|(v, why)| serde_json::json!({ "version": v, "reason": why })).collect::<Vec<_>>(),
                    "last_receipt": a.last_receipt.as_ref().map(Receipt::to_json),
                    "preview": a.preview.as_ref().map(|(v, port)| serde_json::json!({ "version": v, "port": port })),
                    "verify": a.verify.iter().map(|(v, r)| serde_json::json!({ "version": v, "result": r })).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "app": self.app, "env": self.env,
            "desired": self.desired.as_ref().map(|(v, seq)| serde_json::json!({ "version": v, "seq": seq })),
            "agents": agents,
        })
    }
}

impl AgentInfo {
    /// The agent in the shared JSON vocabulary.
    pub fn to_json(&self) -> serde_json::Value {
        let apps: Vec<_> = self
            .apps
            .iter()
            .map(|x| {
                serde_json::json!({
                    "app": x.app, "active": x.active, "staged": x.staged,
                    "failed": x.failed.iter().map(|(v, why)| serde_json::json!({ "version": v, "reason": why })).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "id": self.id, "name": self.name, "env": self.env, "labels": self.labels,
            "own_labels": self.own_labels, "connected": self.connected, "revoked": self.revoked, "apps": apps,
            "version": self.version, "last_seen": self.last_seen,
        })
    }
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
    /// Starts a rollout (a release or a rollback), or with `dry_run` only plans it.
    Rollout(RolloutSpec),
    /// Rollouts, newest first, optionally of one app and/or environment.
    ListRollouts {
        app: Option<String>,
        env: Option<String>,
    },
    /// One rollout; answers at once when `after_revision` is below the rollout's revision,
    /// otherwise when it changes or at the timeout (for `--watch`).
    RolloutStatus {
        id: String,
        after_revision: u64,
        timeout_secs: u64,
    },
    /// Pause, resume or abort a rollout.
    ControlRollout {
        id: String,
        action: RolloutAction,
    },
    /// Forgets a revoked agent: its record, stagings, receipts. Its certificate stays refused.
    RemoveAgent {
        agent: String,
    },
    /// Issues a new operator identity (owner only): `role` is viewer, deployer, releaser or
    /// owner; `envs` limits a releaser (empty: every environment).
    AddAdmin {
        name: String,
        role: String,
        envs: Vec<String>,
        /// The new identity's approval public key (generated by the CLI; SPEC §14).
        approval_key: Option<[u8; 32]>,
    },
    ListAdmins,
    /// Refuses an operator identity from now on, and closes its connections.
    RevokeAdmin {
        name: String,
    },
    /// A new certificate for the identity that asks, for the key of this request (sent by
    /// the CLI once two thirds of its certificate's lifetime have passed).
    RenewCertificate {
        csr_der: Vec<u8>,
    },
    /// Every pushed version of every app, with where it is deployed and released.
    ListApps,
    /// Forget a version and free what only it used in the chunk store.
    RemoveArtifact {
        app: String,
        version: String,
    },
    /// A one-time link that signs a browser in to the fleet page as the identity that asks.
    UiLogin,
    /// What approving `id` (a rollout, or a policy change `policy-ENV-SERIAL`) signs.
    ToApprove {
        id: String,
    },
    /// An approval of `id`, signed with the asking identity's approval key.
    Approve {
        id: String,
        approval: crate::policy::Approval,
    },
    /// Ends a rollout awaiting approval.
    Reject {
        id: String,
        reason: String,
    },
    /// Stops new releases to `env` until `until` (Unix seconds; 0: until unfrozen).
    Freeze {
        env: String,
        until: u64,
        reason: String,
    },
    Unfreeze {
        env: String,
    },
    /// The policy of one environment, or of every known one.
    ShowPolicy {
        env: Option<String>,
    },
    /// Starts `version` beside the live one on every traffic-mode host of `env`; None stops it.
    Preview {
        app: String,
        env: String,
        version: Option<String>,
    },
    /// Registers the asking identity's approval public key (made on the operator's machine).
    SetApprovalKey {
        public: [u8; 32],
    },
    /// Signs the environment's policy anew with nothing before it (owner only): taken only by
    /// agents that enforce no policy (their `identity/policy` was removed on the host).
    ResetPolicy {
        env: String,
    },
}

/// What an approval signs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToSign {
    Plan(crate::policy::Plan),
    /// A policy body.
    Policy(Vec<u8>),
}

/// An approval as `rollout status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalView {
    pub by: String,
    pub at: u64,
}

/// A freeze of an environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeView {
    pub reason: String,
    pub by: String,
    pub at: u64,
    /// Unix seconds; 0: until unfrozen.
    pub until: u64,
}

/// One setting of a policy and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    pub name: String,
    pub value: String,
    pub source: String,
}

/// An environment's policy as `policy show` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    pub env: String,
    pub settings: Vec<Setting>,
    pub freeze: Option<FreezeView>,
    /// The serial of the newest policy signed for agents, and the approvers it names.
    pub serial: u64,
    pub approvers: Vec<String>,
    /// A loosening waiting for approvals: its id, approvals had and needed.
    pub pending: Option<(String, u32, u32)>,
    /// Per agent: its name, the serial it enforces, the approvals it requires, and the
    /// last update it refused.
    pub agents: Vec<(String, u64, u32, String)>,
}

/// An operator identity as `admin list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminInfo {
    pub name: String,
    pub role: String,
    pub envs: Vec<String>,
    pub revoked: bool,
    pub created_at: u64,
    /// When its newest certificate expires (Unix seconds).
    pub expires_at: u64,
}

/// What an operator asks of a rollout.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub app: String,
    /// The version to release; for a rollback, the version to go back to (None: the one
    /// released before the current).
    pub version: Option<String>,
    pub env: String,
    pub rollback: bool,
    /// Cumulative wave sizes, `1,25%,100%`; None: the environment's default.
    pub waves: Option<String>,
    pub bake_secs: Option<u64>,
    /// `N` or `P%`; None: the environment's default (0).
    pub max_unhealthy: Option<String>,
    /// Only agents whose (token) labels carry all of these.
    pub selectors: Labels,
    /// `wait`, `skip` or `fail`; None: wait.
    pub offline: Option<String>,
    /// Unix seconds at which agents switch (`not_before`); 0: now.
    pub at: u64,
    pub force: bool,
    pub dry_run: bool,
    /// Lifetime of the signed messages; 0: the controller's message_ttl.
    pub ttl_secs: u64,
    /// How long a wave may wait for its hosts (staged gate, receipts); 0: 10 minutes.
    pub timeout_secs: u64,
    /// The share of new connections (percent, 1..=100) the version gets on hosts in
    /// traffic mode; 0 (unset) or 100 moves them all.
    pub traffic: u8,
    /// Outside the environment's release window: refuse instead of waiting for it.
    pub no_wait_window: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutAction {
    Pause,
    Resume,
    Abort,
}

/// A rollout as the CLI shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutView {
    pub id: String,
    pub app: String,
    pub version: String,
    pub digest: Digest,
    pub env: String,
    /// `release` or `rollback`.
    pub kind: String,
    /// `planned` (dry run), `running`, `paused`, `rolling-back`, `succeeded`, `failed`, `aborted`.
    pub state: String,
    /// Why it failed or was aborted; what it waits for while running.
    pub reason: String,
    pub requested_by: String,
    pub forced: bool,
    pub created_at: u64,
    pub ended_at: Option<u64>,
    pub not_before: u64,
    pub bake_secs: u64,
    pub max_unhealthy: u32,
    pub offline: String,
    pub pause_requested: bool,
    /// The wave being worked on (0-based).
    pub wave: u32,
    pub waves: Vec<WaveView>,
    /// Hosts left out of the plan (offline with `--offline skip`, revoked), with why.
    pub skipped: Vec<HostView>,
    pub revision: u64,
    /// The share of new connections (percent) hosts in traffic mode give the version.
    pub traffic: u8,
    /// Approvals the environment's policy requires of it, and those it has.
    pub approvals_needed: u32,
    pub approvals: Vec<ApprovalView>,
    /// Awaiting a release window: when it opens (Unix seconds).
    pub window_opens: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveView {
    /// `waiting`, `staging-gate`, `in-progress`, `baking`, `passed`.
    pub state: String,
    pub hosts: Vec<HostView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    pub id: AgentId,
    pub name: String,
    /// `waiting`, `skipped`, `sent`, `scheduled`, `committed`, `failed`, `reverting`,
    /// `reverted`, `not-reverted`.
    pub state: String,
    /// Why it failed, was skipped or not reverted; empty otherwise.
    pub detail: String,
    /// The version it ran before this rollout.
    pub previous: Option<String>,
    pub connected: bool,
    pub receipt: Option<Receipt>,
}

/// Controller → operator CLI. Built once per answer and moved: the size of the largest
/// variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminResponse {
    Hello {
        protocol_version: u32,
    },
    Token {
        token: String,
        expires_at: u64,
    },
    Agents {
        agents: Vec<AgentInfo>,
    },
    PushNeed {
        digest: Digest,
        missing: Vec<Digest>,
        already_present: bool,
    },
    PushChunksDone {
        stored: u64,
    },
    Pushed {
        digest: Digest,
        size: u64,
    },
    Deployed {
        digest: Digest,
        targets: Vec<AgentId>,
    },
    Status {
        status: AppStatus,
    },
    Released {
        message: SignedActivate,
        version: String,
        seq: u64,
        targets: Vec<AgentId>,
    },
    Revoked {
        agent: AgentId,
    },
    Error {
        message: String,
        hint: String,
    },
    Waited {
        done: Vec<AgentId>,
        failed: Vec<(AgentId, String)>,
        pending: Vec<AgentId>,
    },
    /// A rollout started, planned (`dry_run`), or asked for by id.
    Rollout {
        rollout: RolloutView,
        notes: Vec<String>,
    },
    Rollouts {
        rollouts: Vec<RolloutView>,
    },
    Removed {
        agent: AgentId,
    },
    /// A new identity's credentials: written by the CLI into a credentials directory.
    AdminAdded {
        admin: AdminInfo,
        cert_pem: String,
        key_pem: String,
        ca_pem: String,
    },
    Admins {
        admins: Vec<AdminInfo>,
    },
    AdminRevoked {
        name: String,
    },
    /// A message to carry by hand, with the release key changes an agent may lack.
    Exported {
        message: SignedActivate,
        version: String,
        seq: u64,
        targets: Vec<AgentId>,
        key_changes: Vec<crate::keychain::SignedKeyChange>,
        /// The environment's release policies (the chain, then the newest), carried in the file.
        policies: Vec<crate::policy::SignedPolicy>,
    },
    CertificateRenewed {
        cert_pem: String,
        expires_at: u64,
    },
    Apps {
        versions: Vec<VersionInfo>,
    },
    ArtifactRemoved {
        app: String,
        version: String,
        /// Chunks and bytes the collection freed (shared chunks stay).
        chunks: u64,
        bytes: u64,
    },
    /// A one-time login secret for the fleet page, where the controller serves it.
    UiLogin {
        /// Goes in the link's fragment (`/login#SECRET`), never in a query string.
        secret: String,
        expires_at: u64,
        /// The page's base URL as the controller knows it (`http_url` in controller.toml, else
        /// `http://` and the address `--http` bound); `None` when it serves no page.
        base_url: Option<String>,
    },
    /// What approving `id` signs, and lines that describe it to the approver.
    ToApprove {
        id: String,
        describe: Vec<String>,
        sign: ToSign,
        /// The identity that asks, as the controller knows it: the approval is signed as it.
        you: String,
    },
    /// A policy change's approvals so far.
    PolicyApproved {
        id: String,
        have: u32,
        need: u32,
    },
    Frozen {
        env: String,
        freeze: Option<FreezeView>,
    },
    Policies {
        envs: Vec<PolicyView>,
    },
    /// Per host of a preview: its name and what happened (`port N`, or why not).
    Previews {
        hosts: Vec<(String, String)>,
    },
    ApprovalKeySet {
        name: String,
    },
}

/// One pushed version of an app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub app: String,
    pub version: String,
    pub digest: Digest,
    pub size: u64,
    pub pushed_at: u64,
    /// Environments told to stage it.
    pub deployed_to: Vec<String>,
    /// Environments where it is the released version.
    pub released_in: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub id: AgentId,
    pub name: String,
    pub env: String,
    /// Labels bound by the join token: the only ones rollout selectors match.
    pub labels: Labels,
    /// Labels the agent asked for itself at join: shown, never used for targeting.
    pub own_labels: Labels,
    pub connected: bool,
    pub revoked: bool,
    pub apps: Vec<AgentAppInfo>,
    /// The version the agent last said it runs.
    pub version: Option<String>,
    /// Unix seconds its last channel closed (0: never seen since this was recorded).
    pub last_seen: u64,
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
    /// A staged version running beside the live one (SPEC §14): version and port.
    pub preview: Option<(String, u16)>,
    /// Per staged version that ran its `[verify]`: the version and `passed`, `failed: …` or
    /// `none declared`.
    pub verify: Vec<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode;

    /// Every `-o json` receipt reads back as it was, with the stable codes.
    #[test]
    fn a_receipt_survives_its_json() {
        for outcome in Refusal::ALL
            .into_iter()
            .map(ReceiptOutcome::Refused)
            .chain([ReceiptOutcome::Committed, ReceiptOutcome::Scheduled { until: 9 }])
        {
            let r = Receipt {
                agent_id: AgentId("a-1".into()),
                app: "web".into(),
                version: "2".into(),
                seq: 7,
                outcome,
                active: Some("1".into()),
                log: "health: ok".into(),
                check_us: 1,
                switch_us: 2,
                total_us: 3,
                at: 4,
                applied: true,
            };
            assert_eq!(Receipt::from_json(&r.to_json()), Some(r));
        }
    }

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

    /// Protocol 2: a receipt ends with `applied`; the rollout requests follow the older ones.
    #[test]
    fn golden_bytes_of_protocol_2() {
        let receipt = Receipt {
            agent_id: AgentId("a".into()),
            app: "w".into(),
            version: "1".into(),
            seq: 2,
            outcome: ReceiptOutcome::Committed,
            active: None,
            log: String::new(),
            check_us: 3,
            switch_us: 4,
            total_us: 5,
            at: 6,
            applied: true,
        };
        let expected = [
            "000000000000000161", // agent_id
            "000000000000000177", // app
            "000000000000000131", // version
            "0000000000000002",   // seq
            "00000000",           // Committed
            "00",                 // active: None
            "0000000000000000",   // log
            "0000000000000003",
            "0000000000000004",
            "0000000000000005",
            "0000000000000006",
            "01", // applied
        ]
        .concat();
        assert_eq!(hex::encode(encode(&receipt)), expected);
        let status = AdminRequest::RolloutStatus { id: "r-1".into(), after_revision: 7, timeout_secs: 0 };
        assert_eq!(hex::encode(encode(&status)), "0000000f0000000000000003722d3100000000000000070000000000000000");
        let control = AdminRequest::ControlRollout { id: "r".into(), action: RolloutAction::Abort };
        assert_eq!(hex::encode(encode(&control)), "0000001000000000000000017200000002");
        assert!(hex::encode(encode(&AdminRequest::Rollout(RolloutSpec::default()))).starts_with("0000000d"));
    }
}
