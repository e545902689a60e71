//! The rollout planner (SPEC §8): what a rollout does next, decided from the rollout, what
//! is observed of its hosts and the time, in the style of quinn-proto's `Connection`:
//! observations in ([`Rollout::advance`]), actions out ([`Step`]), the driver reports
//! what it did ([`Rollout::record_sent`]). No store, no sockets, no clock.
//!
//! A rollout walks its waves in order. A wave starts when its hosts are connected and
//! report the version staged (the staged gate; offline hosts wait, are skipped or fail
//! the rollout, as the operator chose). It passes when every host in it has answered,
//! and the next starts when `bake` has elapsed after that. When more hosts failed than
//! `max_unhealthy` allows, or the operator aborts, every host this rollout switched gets
//! a new message back to the version it ran before, and later waves are never touched.

use serde::{Deserialize, Serialize};
use stagehand_common::activate::{Refusal, SignedActivate};
use stagehand_common::protocol::{Receipt, ReceiptOutcome};
use stagehand_common::{AgentId, Digest};
use std::collections::{BTreeMap, HashMap};

/// The version of the stored [`Rollout`] record.
pub const RECORD_VERSION: u8 = 3;

/// How long a wave waits for its hosts when the operator gave no `--timeout`.
pub const DEFAULT_TIMEOUT_MS: u64 = 10 * 60 * 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Release,
    Rollback,
}

/// What happens to a target that is offline when its wave is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Offline {
    /// Wait for it, up to the timeout; then it counts as failed.
    Wait,
    /// Leave it out; it takes the environment's released version when it returns.
    Skip,
    /// Fail the rollout.
    Fail,
}

impl Offline {
    pub fn parse(s: &str) -> Result<Offline, String> {
        match s {
            "wait" => Ok(Offline::Wait),
            "skip" => Ok(Offline::Skip),
            "fail" => Ok(Offline::Fail),
            other => Err(format!("--offline takes wait, skip or fail, not {other:?}")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Offline::Wait => "wait",
            Offline::Skip => "skip",
            Offline::Fail => "fail",
        }
    }
}

/// How a rollout that is putting hosts back will end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ending {
    Failed,
    Aborted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Running,
    /// Holding between waves until resumed.
    Paused,
    /// Sending hosts back to what they ran before; ends as the `Ending` says.
    RollingBack(Ending),
    Succeeded,
    Failed,
    Aborted,
    /// Waits for the approvals the environment's policy requires (SPEC §14).
    AwaitingApproval,
    /// Waits for the environment's next release window (`Gate::window_opens`).
    AwaitingWindow,
    /// An approver rejected it; nothing was sent.
    Rejected,
}

impl State {
    pub fn is_final(self) -> bool {
        matches!(self, State::Succeeded | State::Failed | State::Aborted | State::Rejected)
    }

    /// Waiting before its first message: for approvals or a window.
    pub fn is_awaiting(self) -> bool {
        matches!(self, State::AwaitingApproval | State::AwaitingWindow)
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::RollingBack(_) => "rolling-back",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Aborted => "aborted",
            State::AwaitingApproval => "awaiting-approval",
            State::AwaitingWindow => "awaiting-window",
            State::Rejected => "rejected",
        }
    }
}

/// One host's place in a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostState {
    /// Its wave has not started.
    Waiting,
    /// Left out (offline under `--offline skip`, revoked); never sent anything.
    Skipped(String),
    /// The wave's message (this seq) was sent; no answer yet. Seq 0: about to be signed.
    Sent { seq: u64 },
    /// Switched, hooks and health passed.
    Committed,
    /// Refused, or unhealthy and switched back by itself, or never got its message.
    Failed(String),
    /// Sent its message and did not answer in time: it may still switch, so it counts as
    /// failed and a rollback sends it back too.
    NoAnswer,
    /// A message back to `previous` (this seq) was sent.
    Reverting { seq: u64 },
    /// Back on `previous`.
    Reverted,
    /// Could not be put back, and why.
    NotReverted(String),
}

impl HostState {
    pub fn name(&self) -> &'static str {
        match self {
            HostState::Waiting => "waiting",
            HostState::Skipped(_) => "skipped",
            HostState::Sent { .. } => "sent",
            HostState::Committed => "committed",
            HostState::Failed(_) => "failed",
            HostState::NoAnswer => "no-answer",
            HostState::Reverting { .. } => "reverting",
            HostState::Reverted => "reverted",
            HostState::NotReverted(_) => "not-reverted",
        }
    }

    /// Why it failed, was skipped or was not put back.
    pub fn detail(&self) -> &str {
        match self {
            HostState::Skipped(why) | HostState::Failed(why) | HostState::NotReverted(why) => why,
            _ => "",
        }
    }

    /// The seq of the message this host is waiting on, if any.
    pub fn awaited_seq(&self) -> Option<u64> {
        match self {
            HostState::Sent { seq } | HostState::Reverting { seq } if *seq > 0 => Some(*seq),
            _ => None,
        }
    }
}

/// A refusal as a host's detail: its code, and for a modified staged tree the agent's
/// account of what was modified (the first line of the receipt's log).
fn refusal(why: &Refusal, log: &str) -> String {
    match (why, log.lines().next()) {
        (Refusal::DigestMismatch, Some(first)) if !first.is_empty() => {
            let first: String = first.chars().take(400).collect();
            format!("{}: {first}", why.code())
        }
        _ => why.code().to_string(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub id: AgentId,
    pub name: String,
    pub state: HostState,
    /// What it ran when its wave started: where a rollback sends it.
    pub previous: Option<String>,
    /// Its answer to this rollout's last message to it.
    pub receipt: Option<Receipt>,
}

impl Host {
    pub fn new(id: AgentId, name: String) -> Host {
        Host { id, name, state: HostState::Waiting, previous: None, receipt: None }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    pub hosts: Vec<Host>,
    /// When the staged gate began to wait for this wave (ms).
    pub gate_since: Option<u64>,
    /// When its messages were sent (ms).
    pub started: Option<u64>,
    /// When every host had answered (ms); the bake runs from here.
    pub passed: Option<u64>,
}

/// Why a message was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    /// The message of wave N (0-based).
    Wave(u32),
    /// Back to the version hosts ran before.
    Revert,
}

/// A message this rollout signed, kept so that it can be sent again (same seq: an agent
/// that already applied it answers with its earlier receipt and changes nothing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub seq: u64,
    pub purpose: Purpose,
    pub version: String,
    pub message: SignedActivate,
}

/// Hosts named by one signed message at most. A send to more is signed as several messages
/// with the same seq ("parts"), each naming the hosts [`part_of`] gives it and sent to them
/// only: what every host receives stays small however large the wave (one message naming
/// 10,000 hosts, sent to each, would be 2 GB).
pub const PART_HOSTS: usize = 64;

/// Which of `parts` parts names `host`: a hash of its id, so that the part is found again
/// from the id alone (by the driver sending again, by catch-up).
pub fn part_of(host: &AgentId, parts: usize) -> usize {
    if parts <= 1 {
        return 0;
    }
    let h = blake3::hash(host.0.as_bytes());
    (u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) % parts as u64) as usize
}

/// The hosts of a send, as its parts (some may be empty: each is signed all the same,
/// so that the number of parts alone says where a host is).
pub fn parts(hosts: &[AgentId]) -> Vec<Vec<AgentId>> {
    let n = hosts.len().div_ceil(PART_HOSTS).max(1);
    let mut parts = vec![Vec::new(); n];
    for h in hosts {
        parts[part_of(h, n)].push(h.clone());
    }
    parts
}

/// A rollout, as stored. Times are milliseconds since the Unix epoch, except `not_before`
/// (seconds, as in the activate message).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub v: u8,
    pub id: String,
    pub app: String,
    pub version: String,
    pub digest: Digest,
    pub env: String,
    pub kind: Kind,
    pub requested_by: String,
    /// Released past the promotion rule with `--force`.
    pub forced: bool,
    pub created: u64,
    pub ended: Option<u64>,
    pub not_before: u64,
    /// Targets were the agents whose token labels include all of these.
    pub selectors: stagehand_common::protocol::Labels,
    pub bake_ms: u64,
    pub max_unhealthy: u32,
    pub offline: Offline,
    pub timeout_ms: u64,
    pub ttl_secs: u64,
    pub state: State,
    /// Why it failed or was aborted.
    pub reason: String,
    /// Hold once the current wave has passed.
    pub pause_requested: bool,
    /// The wave being worked on.
    pub wave: usize,
    pub waves: Vec<Wave>,
    /// Targets left out when it was planned (offline under `--offline skip`).
    pub skipped: Vec<Host>,
    /// When the rollback began (ms).
    pub rollback_since: Option<u64>,
    pub messages: Vec<Message>,
    /// Bumped on every stored change: watchers wait for it to move.
    pub revision: u64,
    /// The share of new connections (percent) each host in traffic mode gives the version
    /// (SPEC §9); 100 for a rollout that moves them all.
    pub traffic: u8,
    /// What the environment's release policy holds it to (SPEC §14). The last field (layout 3).
    pub gate: Gate,
}

/// What a rollout waits for before its first message: approvals, a release window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    pub approvals_needed: u32,
    pub approvals: Vec<GivenApproval>,
    /// The plan approvers sign names the targets by their number and a digest of their ids.
    pub plan_targets: u32,
    pub plan_hosts: Digest,
    /// Unix seconds at which its release window opens, while it waits for one.
    pub window_opens: Option<u64>,
}

/// One approver's signature over the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GivenApproval {
    pub by: String,
    /// Milliseconds since the Unix epoch.
    pub at: u64,
    pub signature: Vec<u8>,
}

/// What is known of a host right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostObs {
    /// Both channels are up.
    pub connected: bool,
    pub revoked: bool,
    /// The rollout's version (with its digest) on this host.
    pub staging: Staging,
    /// What is live.
    pub active: Option<String>,
    /// Its latest receipt for the rollout's app.
    pub receipt: Option<Receipt>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Staging {
    Staged,
    /// Ordered, not reported yet.
    Pending,
    Failed(String),
    /// Never ordered.
    Missing,
}

/// What is known of a rollout's hosts right now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub hosts: HashMap<AgentId, HostObs>,
    /// Until this time (ms) a host seen offline may only not have reconnected yet to a
    /// controller that just (re)started, and receipts sent while it was down may still come:
    /// offline policies and timeouts wait until then.
    pub grace_until: u64,
}

impl std::ops::Deref for Observed {
    type Target = HashMap<AgentId, HostObs>;
    fn deref(&self) -> &Self::Target {
        &self.hosts
    }
}

impl std::ops::DerefMut for Observed {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.hosts
    }
}

impl FromIterator<(AgentId, HostObs)> for Observed {
    fn from_iter<I: IntoIterator<Item = (AgentId, HostObs)>>(iter: I) -> Self {
        Observed { hosts: iter.into_iter().collect(), grace_until: 0 }
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Sign one message for `version` naming exactly `hosts`, send it to them, and report
    /// its seq with [`Rollout::record_sent`].
    Send { purpose: Purpose, version: String, hosts: Vec<AgentId>, not_before: u64 },
}

/// The outcome of one [`Rollout::advance`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub actions: Vec<Action>,
    /// Call `advance` again at this time (ms) even if nothing is observed to change.
    pub wake_at: Option<u64>,
}

impl Step {
    fn wake(&mut self, at: u64) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }
}

/// A cumulative wave size as the operator writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaveSize {
    Count(usize),
    Percent(u32),
}

/// Parses `1,25%,100%`.
pub fn parse_waves(spec: &str) -> Result<Vec<WaveSize>, String> {
    let bad =
        |part: &str| format!("--waves takes cumulative counts or percentages like 1,25%,100%; {part:?} is neither");
    spec.split(',')
        .map(str::trim)
        .map(|part| match part.strip_suffix('%') {
            Some(p) => match p.parse::<u32>() {
                Ok(p) if (1..=100).contains(&p) => Ok(WaveSize::Percent(p)),
                _ => Err(bad(part)),
            },
            None => match part.parse::<usize>() {
                Ok(n) if n > 0 => Ok(WaveSize::Count(n)),
                _ => Err(bad(part)),
            },
        })
        .collect()
}

/// Splits `targets` hosts into waves of the given cumulative sizes (percentages rounded
/// up): the size of each wave. Sizes that do not grow add no wave; hosts the list does not
/// reach form a last wave, so every target is in exactly one wave.
pub fn split(targets: usize, sizes: &[WaveSize]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut done = 0;
    for s in sizes {
        let upto = match *s {
            WaveSize::Count(n) => n,
            WaveSize::Percent(p) => (targets * p as usize).div_ceil(100),
        }
        .min(targets);
        if upto > done {
            out.push(upto - done);
            done = upto;
        }
    }
    if done < targets {
        out.push(targets - done);
    }
    out
}

/// Parses `N` or `P%` of `targets` (a percentage rounds down: `--max-unhealthy 10%` of 5
/// hosts tolerates none).
pub fn parse_max_unhealthy(spec: &str, targets: usize) -> Result<u32, String> {
    let bad = || format!("--max-unhealthy takes a count or a percentage like 2 or 10%, not {spec:?}");
    match spec.trim().strip_suffix('%') {
        Some(p) => {
            let p: usize = p.parse().map_err(|_| bad())?;
            if p > 100 {
                return Err(bad());
            }
            Ok((targets * p / 100) as u32)
        }
        None => spec.trim().parse().map_err(|_| bad()),
    }
}

impl Rollout {
    /// All hosts of all waves.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.waves.iter().flat_map(|w| w.hosts.iter())
    }

    pub fn hosts_mut(&mut self) -> impl Iterator<Item = &mut Host> {
        self.waves.iter_mut().flat_map(|w| w.hosts.iter_mut())
    }

    /// Hosts that refused, were unhealthy or never answered.
    pub fn failures(&self) -> usize {
        self.hosts().filter(|h| matches!(h.state, HostState::Failed(_) | HostState::NoAnswer)).count()
    }

    /// The message with this seq that names `host`, for sending (again).
    pub fn message_for(&self, seq: u64, host: &AgentId) -> Option<&Message> {
        let parts: Vec<&Message> = self.messages.iter().filter(|m| m.seq == seq).collect();
        parts.get(part_of(host, parts.len())).copied()
    }

    /// The parts of the newest wave's message: what the environment keeps for catch-up.
    pub fn last_wave_message(&self) -> Option<(u64, Vec<SignedActivate>)> {
        let seq = self.messages.iter().rev().find(|m| matches!(m.purpose, Purpose::Wave(_)))?.seq;
        Some((seq, self.messages.iter().filter(|m| m.seq == seq).map(|m| m.message.clone()).collect()))
    }

    /// Records that the driver signed the parts of a `Send` (see [`parts`]) with `seq`.
    pub fn record_sent(
        &mut self,
        purpose: Purpose,
        hosts: &[AgentId],
        seq: u64,
        version: &str,
        parts: Vec<SignedActivate>,
    ) {
        let hosts: std::collections::HashSet<&AgentId> = hosts.iter().collect();
        for h in self.hosts_mut().filter(|h| hosts.contains(&h.id)) {
            h.state = match purpose {
                Purpose::Wave(_) => HostState::Sent { seq },
                Purpose::Revert => HostState::Reverting { seq },
            };
        }
        for message in parts {
            self.messages.push(Message { seq, purpose, version: version.to_string(), message });
        }
    }

    /// Pause, resume or abort, as the operator asks.
    pub fn control(&mut self, action: Control, who: &str, now: u64) -> Result<&'static str, String> {
        let ended = |s: State| format!("rollout {} has already {}", self.id, s.name());
        match (action, self.state) {
            (_, s) if s.is_final() => Err(ended(s)),
            (_, State::RollingBack(_)) => Err(format!("rollout {} is rolling back already", self.id)),
            (Control::Pause, State::Paused) => Ok("already paused"),
            (Control::Pause, _) => {
                self.pause_requested = true;
                Ok("pausing: the current wave finishes, then the rollout holds")
            }
            (Control::Resume, State::AwaitingApproval) => {
                Err(format!("rollout {} awaits approval: stagehand approve {} (or reject it)", self.id, self.id))
            }
            (Control::Resume, State::AwaitingWindow) => Err(format!(
                "rollout {} waits for its release window; it starts by itself when the window opens",
                self.id
            )),
            (Control::Abort, s) if s.is_awaiting() => {
                self.reason = format!("aborted by {who} before it started");
                self.end(State::Aborted, now);
                Ok("aborted: nothing had been sent")
            }
            (Control::Resume, State::Running) => {
                let was = std::mem::take(&mut self.pause_requested);
                Ok(if was { "resumed: the pause was cancelled" } else { "already running" })
            }
            (Control::Resume, _) => {
                self.state = State::Running;
                self.pause_requested = false;
                // A paused rollout bakes its last wave again from now: a pause never shortens it;
                // and a gate it held at waits its full time again.
                if let Some(w) = self.waves.get_mut(self.wave) {
                    if w.passed.is_some() {
                        w.passed = Some(now);
                    }
                    if w.started.is_none() {
                        w.gate_since = None;
                    }
                }
                Ok("resumed")
            }
            (Control::Abort, _) => {
                self.begin_rollback(Ending::Aborted, format!("aborted by {who}"), now);
                Ok("aborting: every host this rollout switched goes back to what it ran before")
            }
        }
    }

    /// Records `by`'s approval (its signature already checked against its key and its role
    /// against the environment). Once enough approvers signed, the rollout waits for its
    /// window or starts.
    pub fn approve(&mut self, by: &str, signature: Vec<u8>, now: u64) -> Result<String, String> {
        if self.state != State::AwaitingApproval {
            return Err(format!("rollout {} is {}, not awaiting approval", self.id, self.state.name()));
        }
        if by == self.requested_by {
            return Err(format!(
                "{by} requested rollout {}; another identity must approve it (SPEC §14: a requester never approves their own release)",
                self.id
            ));
        }
        if self.gate.approvals.iter().any(|a| a.by == by) {
            return Err(format!("{by} has already approved rollout {}; an identity counts once", self.id));
        }
        self.gate.approvals.push(GivenApproval { by: by.to_string(), at: now, signature });
        let (have, need) = (self.gate.approvals.len() as u32, self.gate.approvals_needed);
        if have < need {
            return Ok(format!("approved by {by} ({have} of {need}); it waits for {} more", need - have));
        }
        // The window and any freeze are looked at again now: the approval may come hours later.
        self.state = State::AwaitingWindow;
        let opens = *self.gate.window_opens.get_or_insert(0);
        Ok(if opens > now / 1000 {
            format!("approved by {by} ({have} of {need}); it starts when its release window opens")
        } else {
            format!("approved by {by} ({have} of {need}); it starts now, unless its environment is frozen")
        })
    }

    /// Ends a rollout that has not started, as an approver decided.
    pub fn reject(&mut self, by: &str, reason: &str, now: u64) -> Result<String, String> {
        if !self.state.is_awaiting() {
            return Err(format!(
                "rollout {} is {}; only one awaiting approval or a window can be rejected",
                self.id,
                self.state.name()
            ));
        }
        self.reason =
            if reason.is_empty() { format!("rejected by {by}") } else { format!("rejected by {by}: {reason}") };
        self.end(State::Rejected, now);
        Ok(format!("rejected; nothing was sent ({})", self.reason))
    }

    fn begin_rollback(&mut self, ending: Ending, reason: String, now: u64) {
        self.state = State::RollingBack(ending);
        self.reason = reason;
        self.rollback_since = Some(now);
        self.pause_requested = false;
    }

    fn end(&mut self, state: State, now: u64) {
        self.state = state;
        self.ended = Some(now);
    }

    /// Decides what to do next, given what is observed of the hosts at `now` (ms).
    pub fn advance(&mut self, obs: &Observed, now: u64) -> Step {
        let mut step = Step::default();
        self.take_receipts(obs);
        // Each pass either changes the state or the wave, or stops; bounded all the same.
        for _ in 0..(4 * self.waves.len() + 8) {
            let progressed = match self.state {
                State::Running => self.run(obs, now, &mut step),
                State::RollingBack(ending) => self.roll_back(ending, obs, now, &mut step),
                State::AwaitingWindow => match self.gate.window_opens {
                    Some(at) if now < at * 1000 => {
                        step.wake(at * 1000);
                        false
                    }
                    _ => {
                        self.gate.window_opens = None;
                        self.state = State::Running;
                        true
                    }
                },
                State::Paused
                | State::Succeeded
                | State::Failed
                | State::Aborted
                | State::AwaitingApproval
                | State::Rejected => false,
            };
            if !progressed {
                break;
            }
        }
        step
    }

    /// Answers to the messages hosts are waiting on.
    fn take_receipts(&mut self, obs: &Observed) {
        for h in self.hosts_mut() {
            let (Some(seq), Some(r)) = (h.state.awaited_seq(), obs.get(&h.id).and_then(|o| o.receipt.as_ref())) else {
                continue;
            };
            let reverting = matches!(h.state, HostState::Reverting { .. });
            if r.seq == seq {
                let next = match (&r.outcome, reverting) {
                    (ReceiptOutcome::Committed, false) => Some(HostState::Committed),
                    (ReceiptOutcome::Committed, true) => Some(HostState::Reverted),
                    (ReceiptOutcome::Refused(why), false) => Some(HostState::Failed(refusal(why, &r.log))),
                    (ReceiptOutcome::Refused(why), true) => Some(HostState::NotReverted(refusal(why, &r.log))),
                    (ReceiptOutcome::Scheduled { .. }, _) => None,
                };
                h.receipt = Some(r.clone());
                if let Some(next) = next {
                    h.state = next;
                }
            } else if r.seq > seq && r.applied {
                // Another message (an exported one applied by hand) overtook ours.
                let why = format!("superseded by seq {}", r.seq);
                h.state = if reverting { HostState::NotReverted(why) } else { HostState::Failed(why) };
                h.receipt = Some(r.clone());
            }
        }
    }

    fn run(&mut self, obs: &Observed, now: u64, step: &mut Step) -> bool {
        if self.failures() > self.max_unhealthy as usize {
            let failed: Vec<String> = self
                .hosts()
                .filter_map(|h| match &h.state {
                    HostState::Failed(why) => Some(format!("{}: {why}", h.name)),
                    HostState::NoAnswer => Some(format!("{}: no answer within the timeout", h.name)),
                    _ => None,
                })
                .collect();
            let reason = format!(
                "{} host(s) failed, more than --max-unhealthy {} allows ({})",
                failed.len(),
                self.max_unhealthy,
                failed.join("; ")
            );
            self.begin_rollback(Ending::Failed, reason, now);
            return true;
        }
        let last = self.waves.len().saturating_sub(1);
        let (timeout, offline, version, not_before) =
            (self.timeout_ms, self.offline, self.version.clone(), self.not_before);
        let w = self.wave;
        let Some(wave) = self.waves.get_mut(w) else {
            self.end(State::Succeeded, now);
            return true;
        };
        if wave.started.is_none() {
            // Pausing holds before any new wave starts.
            if self.pause_requested {
                self.pause_requested = false;
                self.state = State::Paused;
                return true;
            }
            let since = *wave.gate_since.get_or_insert(now);
            let in_grace = now < obs.grace_until;
            let mut unready = std::collections::HashSet::new();
            let mut offline_fail = None;
            for h in wave.hosts.iter_mut().filter(|h| h.state == HostState::Waiting) {
                match obs.get(&h.id) {
                    None => h.state = HostState::Skipped("no longer registered".into()),
                    Some(o) if o.revoked => h.state = HostState::Skipped("revoked".into()),
                    Some(HostObs { staging: Staging::Failed(why), .. }) => {
                        h.state = HostState::Failed(format!("staging failed: {why}"))
                    }
                    Some(o) if !o.connected && in_grace => drop(unready.insert(h.id.clone())),
                    Some(o) if !o.connected => match offline {
                        Offline::Skip => h.state = HostState::Skipped("offline".into()),
                        Offline::Fail => offline_fail = Some(h.name.clone()),
                        Offline::Wait => drop(unready.insert(h.id.clone())),
                    },
                    Some(o) if o.staging != Staging::Staged => drop(unready.insert(h.id.clone())),
                    Some(_) => {}
                }
            }
            let ready = unready.is_empty();
            if let Some(name) = offline_fail {
                self.begin_rollback(Ending::Failed, format!("{name} is offline (--offline fail)"), now);
                return true;
            }
            if self.failures() > self.max_unhealthy as usize {
                return true;
            }
            let wave = &mut self.waves[w];
            if ready {
                let mut hosts = Vec::new();
                for h in wave.hosts.iter_mut().filter(|h| h.state == HostState::Waiting) {
                    h.previous = obs.get(&h.id).and_then(|o| o.active.clone());
                    h.state = HostState::Sent { seq: 0 };
                    hosts.push(h.id.clone());
                }
                wave.started = Some(now);
                if !hosts.is_empty() {
                    step.actions.push(Action::Send { purpose: Purpose::Wave(w as u32), version, hosts, not_before });
                }
                return true;
            }
            let deadline = (since + timeout).max(obs.grace_until);
            if in_grace {
                // Offline policies apply once the grace is over.
                step.wake(obs.grace_until);
            }
            if now >= deadline {
                // Only the hosts that are not ready fail; the others go ahead if that is allowed.
                for h in wave.hosts.iter_mut().filter(|h| unready.contains(&h.id)) {
                    h.state = HostState::Failed("not connected with the version staged within the timeout".into());
                }
                return true;
            }
            step.wake(deadline);
            return false;
        }
        let started = wave.started.unwrap_or(now);
        if wave.passed.is_none() {
            // A host revoked on the way can be sent nothing more: it leaves the rollout.
            for h in wave.hosts.iter_mut().filter(|h| matches!(h.state, HostState::Sent { .. })) {
                if obs.get(&h.id).is_none_or(|o| o.revoked) {
                    h.state = HostState::Skipped("revoked during the rollout".into());
                }
            }
            let settled = wave.hosts.iter().all(|h| {
                matches!(
                    h.state,
                    HostState::Committed | HostState::Failed(_) | HostState::NoAnswer | HostState::Skipped(_)
                )
            });
            if settled {
                wave.passed = Some(now);
                return true;
            }
            // A scheduled message is answered at its time: the wait counts from then.
            let deadline = (started.max(not_before.saturating_mul(1000)) + timeout).max(obs.grace_until);
            if now >= deadline {
                for h in wave.hosts.iter_mut().filter(|h| matches!(h.state, HostState::Sent { .. })) {
                    h.state = HostState::NoAnswer;
                }
                return true;
            }
            step.wake(deadline);
            return false;
        }
        if w == last {
            self.end(State::Succeeded, now);
            return true;
        }
        if self.pause_requested {
            self.pause_requested = false;
            self.state = State::Paused;
            return true;
        }
        let bake_end = wave.passed.unwrap_or(now) + self.bake_ms;
        if now >= bake_end {
            self.wave += 1;
            return true;
        }
        step.wake(bake_end);
        false
    }

    /// Every host this rollout switched (or may have: sent, no answer) goes back to what it
    /// ran before; then the rollout ends.
    fn roll_back(&mut self, ending: Ending, obs: &Observed, now: u64, step: &mut Step) -> bool {
        let version = self.version.clone();
        let mut groups: BTreeMap<String, Vec<AgentId>> = BTreeMap::new();
        for h in self.hosts_mut() {
            // A host that failed but says it still runs the version could not switch back itself.
            let stuck = matches!(h.state, HostState::Failed(_))
                && h.receipt.as_ref().is_some_and(|r| r.active.as_deref() == Some(version.as_str()));
            if !(stuck || matches!(h.state, HostState::Committed | HostState::Sent { .. } | HostState::NoAnswer)) {
                continue;
            }
            if obs.get(&h.id).is_none_or(|o| o.revoked) {
                h.state = HostState::NotReverted("revoked".into());
                continue;
            }
            match &h.previous {
                Some(p) if *p != version => {
                    groups.entry(p.clone()).or_default().push(h.id.clone());
                    h.state = HostState::Reverting { seq: 0 };
                }
                Some(_) => h.state = HostState::Reverted,
                None => {
                    // No version to send it back to; a message it holds for later still fires.
                    let scheduled = match h.receipt.as_ref().map(|r| &r.outcome) {
                        Some(ReceiptOutcome::Scheduled { until }) => format!(
                            "; it still switches at {}, as its message was scheduled",
                            humantime::format_rfc3339_seconds(
                                std::time::UNIX_EPOCH + std::time::Duration::from_secs(*until)
                            )
                        ),
                        _ => String::new(),
                    };
                    h.state = HostState::NotReverted(format!("nothing was live before this rollout{scheduled}"));
                }
            }
        }
        for (version, hosts) in groups {
            step.actions.push(Action::Send { purpose: Purpose::Revert, version, hosts, not_before: 0 });
        }
        if !step.actions.is_empty() {
            return false;
        }
        for h in self.hosts_mut().filter(|h| matches!(h.state, HostState::Reverting { .. })) {
            if obs.get(&h.id).is_none_or(|o| o.revoked) {
                h.state = HostState::NotReverted("revoked".into());
            }
        }
        let pending = self.hosts().any(|h| matches!(h.state, HostState::Reverting { .. }));
        let deadline = (self.rollback_since.unwrap_or(now) + self.timeout_ms).max(obs.grace_until);
        if pending && now < deadline {
            step.wake(deadline);
            return false;
        }
        for h in self.hosts_mut().filter(|h| matches!(h.state, HostState::Reverting { .. })) {
            h.state = HostState::NotReverted("no answer within the timeout".into());
        }
        self.end(if ending == Ending::Failed { State::Failed } else { State::Aborted }, now);
        true
    }
}

/// What an operator asks of a running rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Abort,
}

#[cfg(test)]
mod tests {
    use super::*;
    use stagehand_common::activate::Refusal;

    fn id(n: usize) -> AgentId {
        AgentId(format!("a-{n}"))
    }

    /// A release of v2 to `n` hosts in waves of the given sizes, no bake, max_unhealthy 0.
    fn rollout(n: usize, sizes: &[usize]) -> Rollout {
        let mut hosts = (0..n).map(|i| Host::new(id(i), format!("h{i}")));
        let waves =
            sizes.iter().map(|&k| Wave { hosts: hosts.by_ref().take(k).collect(), ..Wave::default() }).collect();
        Rollout {
            v: RECORD_VERSION,
            traffic: 100,
            gate: Gate::default(),
            id: "r-1".into(),
            app: "web".into(),
            version: "v2".into(),
            digest: Digest([7; 32]),
            env: "prod".into(),
            kind: Kind::Release,
            requested_by: "admin".into(),
            forced: false,
            created: 0,
            ended: None,
            not_before: 0,
            selectors: Default::default(),
            bake_ms: 0,
            max_unhealthy: 0,
            offline: Offline::Wait,
            timeout_ms: 60_000,
            ttl_secs: 3600,
            state: State::Running,
            reason: String::new(),
            pause_requested: false,
            wave: 0,
            waves,
            skipped: vec![],
            rollback_since: None,
            messages: vec![],
            revision: 0,
        }
    }

    /// Every host connected, v2 staged, v1 live, no receipts.
    fn fleet(n: usize) -> Observed {
        (0..n)
            .map(|i| {
                let o = HostObs {
                    connected: true,
                    revoked: false,
                    staging: Staging::Staged,
                    active: Some("v1".into()),
                    receipt: None,
                };
                (id(i), o)
            })
            .collect()
    }

    fn receipt(host: usize, seq: u64, outcome: ReceiptOutcome) -> Receipt {
        Receipt {
            agent_id: id(host),
            app: "web".into(),
            version: "v2".into(),
            seq,
            applied: !matches!(outcome, ReceiptOutcome::Scheduled { .. }),
            outcome,
            active: None,
            log: String::new(),
            check_us: 0,
            switch_us: 0,
            total_us: 0,
            at: 0,
        }
    }

    fn signed() -> SignedActivate {
        SignedActivate { body: vec![], signature: vec![] }
    }

    /// Performs the sends of a step as the driver would, with seqs from `next_seq`.
    fn perform(r: &mut Rollout, step: &Step, next_seq: &mut u64) -> Vec<(Purpose, String, Vec<AgentId>, u64)> {
        let mut out = vec![];
        for Action::Send { purpose, version, hosts, .. } in &step.actions {
            *next_seq += 1;
            r.record_sent(*purpose, hosts, *next_seq, version, vec![signed()]);
            out.push((*purpose, version.clone(), hosts.clone(), *next_seq));
        }
        out
    }

    fn answer(obs: &mut Observed, hosts: &[AgentId], seq: u64, outcome: ReceiptOutcome) {
        for h in hosts {
            let n: usize = h.0[2..].parse().unwrap();
            obs.get_mut(h).unwrap().receipt = Some(receipt(n, seq, outcome.clone()));
        }
    }

    #[test]
    fn a_large_send_is_signed_in_parts_that_each_host_finds_again() {
        for n in [0, 1, 64, 65, 1000, 10_000] {
            let hosts: Vec<AgentId> = (0..n).map(id).collect();
            let parts = parts(&hosts);
            assert_eq!(parts.len(), n.div_ceil(PART_HOSTS).max(1), "{n} hosts");
            // Every host in exactly one part, the one part_of names, and no part far too big.
            assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), n);
            for (i, p) in parts.iter().enumerate() {
                assert!(p.len() <= 2 * PART_HOSTS, "part {i} of {n} hosts names {}", p.len());
                assert!(p.iter().all(|h| part_of(h, parts.len()) == i));
            }
            // The rollout finds each host's part by seq and id, among other messages.
            let mut r = rollout(n, &[n]);
            r.record_sent(Purpose::Wave(0), &hosts, 5, "v1", vec![signed()]);
            let signed_part = |i: usize| SignedActivate { body: vec![i as u8], signature: vec![] };
            r.record_sent(Purpose::Wave(0), &hosts, 6, "v2", (0..parts.len()).map(signed_part).collect());
            for h in &hosts {
                assert_eq!(r.message_for(6, h).unwrap().message, signed_part(part_of(h, parts.len())));
                assert_eq!(r.message_for(5, h).unwrap().seq, 5);
            }
            let (seq, last) = r.last_wave_message().unwrap();
            assert_eq!((seq, last.len()), (6, parts.len()));
        }
    }

    #[test]
    fn waves_split_as_the_operator_wrote_them() {
        let w = parse_waves("1,25%,100%").unwrap();
        assert_eq!(split(4, &w), vec![1, 3], "a quarter of 4 is the canary already");
        assert_eq!(split(100, &w), vec![1, 24, 75]);
        assert_eq!(split(1, &w), vec![1]);
        // Percentages round up; a size that does not grow adds no wave.
        assert_eq!(split(4, &parse_waves("1,50%,100%").unwrap()), vec![1, 1, 2]);
        assert_eq!(split(3, &parse_waves("1,1,2").unwrap()), vec![1, 1, 1]);
        // Hosts the list does not reach form a last wave.
        assert_eq!(split(10, &parse_waves("2,5").unwrap()), vec![2, 3, 5]);
        assert_eq!(split(0, &w), Vec::<usize>::new());
        for bad in ["", "0", "1,,2", "0%", "101%", "x", "-1"] {
            assert!(parse_waves(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(parse_max_unhealthy("2", 10), Ok(2));
        assert_eq!(parse_max_unhealthy("10%", 5), Ok(0));
        assert_eq!(parse_max_unhealthy("50%", 5), Ok(2));
        assert!(parse_max_unhealthy("150%", 5).is_err());
        assert!(parse_max_unhealthy("two", 5).is_err());
    }

    #[test]
    fn a_healthy_rollout_passes_its_waves_in_order() {
        let mut r = rollout(4, &[1, 1, 2]);
        let mut obs = fleet(4);
        let mut seq = 10;
        let step = r.advance(&obs, 0);
        let sent = perform(&mut r, &step, &mut seq);
        assert_eq!(sent, vec![(Purpose::Wave(0), "v2".to_string(), vec![id(0)], 11)]);
        assert_eq!(r.waves[0].hosts[0].previous.as_deref(), Some("v1"));
        // Nothing more until the canary answers.
        assert_eq!(r.advance(&obs, 5), Step { actions: vec![], wake_at: Some(60_000) });
        answer(&mut obs, &[id(0)], 11, ReceiptOutcome::Committed);
        let step = r.advance(&obs, 10);
        let sent = perform(&mut r, &step, &mut seq);
        assert_eq!(sent, vec![(Purpose::Wave(1), "v2".to_string(), vec![id(1)], 12)]);
        answer(&mut obs, &[id(1)], 12, ReceiptOutcome::Committed);
        let sent = {
            let s = r.advance(&obs, 20);
            perform(&mut r, &s, &mut seq)
        };
        assert_eq!(sent, vec![(Purpose::Wave(2), "v2".to_string(), vec![id(2), id(3)], 13)]);
        answer(&mut obs, &[id(2), id(3)], 13, ReceiptOutcome::Committed);
        assert!(r.advance(&obs, 30).actions.is_empty());
        assert_eq!(r.state, State::Succeeded);
        assert_eq!(r.ended, Some(30));
        assert!(r.hosts().all(|h| h.state == HostState::Committed));
    }

    #[test]
    fn the_next_wave_waits_for_the_bake() {
        let mut r = rollout(2, &[1, 1]);
        r.bake_ms = 5_000;
        let mut obs = fleet(2);
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        perform(&mut r, &s, &mut seq);
        answer(&mut obs, &[id(0)], 1, ReceiptOutcome::Committed);
        let s = r.advance(&obs, 1_000);
        assert_eq!(s, Step { actions: vec![], wake_at: Some(6_000) }, "baking until 6 s");
        assert_eq!(r.waves[0].passed, Some(1_000));
        assert!(r.advance(&obs, 5_999).actions.is_empty());
        let s = r.advance(&obs, 6_000);
        assert_eq!(perform(&mut r, &s, &mut seq)[0].2, vec![id(1)]);
    }

    #[test]
    fn a_gated_rollout_sends_nothing_until_approved_by_others_and_its_window_opens() {
        let mut r = rollout(2, &[2]);
        r.state = State::AwaitingApproval;
        r.gate.approvals_needed = 2;
        r.gate.window_opens = Some(100);
        let obs = fleet(2);
        assert!(r.advance(&obs, 1_000).actions.is_empty());
        assert!(r.approve("admin", vec![1], 1_000).is_err(), "the requester approves nothing");
        assert!(r.approve("alice", vec![1], 1_000).unwrap().contains("1 of 2"));
        assert!(r.approve("alice", vec![1], 1_000).is_err(), "an identity counts once");
        assert_eq!(r.state, State::AwaitingApproval);
        assert!(r.advance(&obs, 2_000).actions.is_empty());
        r.approve("bob", vec![2], 2_000).unwrap();
        assert_eq!(r.state, State::AwaitingWindow);
        let step = r.advance(&obs, 50_000);
        assert!(step.actions.is_empty());
        assert_eq!(step.wake_at, Some(100_000));
        assert!(r.control(Control::Resume, "bob", 60_000).is_err(), "a window is not skipped by resume");
        let step = r.advance(&obs, 100_000);
        assert_eq!(r.state, State::Running);
        assert_eq!(step.actions.len(), 1);
        // Rejected before it started: ended, nothing sent.
        let mut r = rollout(1, &[1]);
        r.state = State::AwaitingApproval;
        r.gate.approvals_needed = 1;
        r.reject("bob", "not today", 5).unwrap();
        assert_eq!((r.state, r.reason.as_str()), (State::Rejected, "rejected by bob: not today"));
        assert!(r.state.is_final() && r.advance(&obs, 10).actions.is_empty());
        assert!(r.approve("bob", vec![], 20).is_err());
    }

    #[test]
    fn a_failed_canary_stops_the_rollout_and_later_waves_are_never_touched() {
        let mut r = rollout(4, &[1, 1, 2]);
        let mut obs = fleet(4);
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        perform(&mut r, &s, &mut seq);
        // The canary was unhealthy and switched back by itself: nothing to put back.
        answer(&mut obs, &[id(0)], 1, ReceiptOutcome::Refused(Refusal::Unhealthy));
        let s = r.advance(&obs, 10);
        assert!(s.actions.is_empty(), "{s:?}");
        assert_eq!(r.state, State::Failed);
        assert!(r.reason.contains("h0: unhealthy"), "{}", r.reason);
        assert!(r.waves[1..].iter().flat_map(|w| &w.hosts).all(|h| h.state == HostState::Waiting));
    }

    #[test]
    fn a_failure_in_a_later_wave_sends_every_switched_host_back() {
        let mut r = rollout(4, &[1, 1, 2]);
        let mut obs = fleet(4);
        // h1 ran v0 before, the others v1.
        obs.get_mut(&id(1)).unwrap().active = Some("v0".into());
        let mut seq = 0;
        for (wave, hosts) in [(0, vec![id(0)]), (1, vec![id(1)])] {
            let s = r.advance(&obs, 0);
            let sent = perform(&mut r, &s, &mut seq);
            assert_eq!(sent[0].0, Purpose::Wave(wave));
            answer(&mut obs, &hosts, seq, ReceiptOutcome::Committed);
        }
        let s = r.advance(&obs, 0);
        let sent = perform(&mut r, &s, &mut seq);
        assert_eq!(sent[0].2, vec![id(2), id(3)]);
        // h2 fails; h3 has not answered yet: it may still switch, so it goes back too.
        answer(&mut obs, &[id(2)], 3, ReceiptOutcome::Refused(Refusal::PreActivateFailed));
        let s = r.advance(&obs, 100);
        assert_eq!(r.state, State::RollingBack(Ending::Failed));
        let mut sent = perform(&mut r, &s, &mut seq);
        sent.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(
            sent,
            vec![(Purpose::Revert, "v0".into(), vec![id(1)], 4), (Purpose::Revert, "v1".into(), vec![id(0), id(3)], 5)]
        );
        // Nothing is sent twice while the answers come in.
        assert!(r.advance(&obs, 200).actions.is_empty());
        answer(&mut obs, &[id(1)], 4, ReceiptOutcome::Committed);
        answer(&mut obs, &[id(0), id(3)], 5, ReceiptOutcome::Committed);
        r.advance(&obs, 300);
        assert_eq!(r.state, State::Failed);
        let states: Vec<_> = r.hosts().map(|h| h.state.name()).collect();
        assert_eq!(states, vec!["reverted", "reverted", "failed", "reverted"]);
    }

    #[test]
    fn max_unhealthy_tolerates_that_many_failures() {
        let mut r = rollout(3, &[3]);
        r.max_unhealthy = 1;
        let mut obs = fleet(3);
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        perform(&mut r, &s, &mut seq);
        answer(&mut obs, &[id(0), id(1)], 1, ReceiptOutcome::Committed);
        answer(&mut obs, &[id(2)], 1, ReceiptOutcome::Refused(Refusal::Unhealthy));
        r.advance(&obs, 10);
        assert_eq!(r.state, State::Succeeded);
    }

    #[test]
    fn the_staged_gate_holds_a_wave_until_its_hosts_have_the_version() {
        let mut r = rollout(2, &[2]);
        let mut obs = fleet(2);
        obs.get_mut(&id(1)).unwrap().staging = Staging::Pending;
        let s = r.advance(&obs, 0);
        assert_eq!(s, Step { actions: vec![], wake_at: Some(60_000) });
        obs.get_mut(&id(1)).unwrap().staging = Staging::Staged;
        let s = r.advance(&obs, 10);
        assert_eq!(s.actions.len(), 1);
        // A staging that failed fails the host.
        let mut r = rollout(2, &[2]);
        let mut obs = fleet(2);
        obs.get_mut(&id(1)).unwrap().staging = Staging::Failed("disk full".into());
        r.advance(&obs, 0);
        assert_eq!(r.state, State::Failed);
        assert!(r.reason.contains("staging failed: disk full"));
    }

    #[test]
    fn an_offline_host_under_each_policy() {
        let offline = |policy| {
            let mut r = rollout(2, &[2]);
            r.offline = policy;
            let mut obs = fleet(2);
            obs.get_mut(&id(1)).unwrap().connected = false;
            (r, obs)
        };
        // wait: nothing is sent until it returns…
        let (mut r, mut obs) = offline(Offline::Wait);
        assert!(r.advance(&obs, 0).actions.is_empty());
        obs.get_mut(&id(1)).unwrap().connected = true;
        assert_eq!(r.advance(&obs, 10).actions.len(), 1);
        // …or fails it at the timeout.
        let (mut r, obs) = offline(Offline::Wait);
        r.advance(&obs, 0);
        r.advance(&obs, 60_000);
        assert_eq!(r.state, State::Failed);
        assert!(r.reason.contains("within the timeout"), "{}", r.reason);
        // skip: the others go ahead.
        let (mut r, mut obs) = offline(Offline::Skip);
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        assert_eq!(perform(&mut r, &s, &mut seq)[0].2, vec![id(0)]);
        answer(&mut obs, &[id(0)], 1, ReceiptOutcome::Committed);
        r.advance(&obs, 10);
        assert_eq!(r.state, State::Succeeded);
        assert_eq!(r.waves[0].hosts[1].state, HostState::Skipped("offline".into()));
        // fail: the rollout fails, nothing is sent.
        let (mut r, obs) = offline(Offline::Fail);
        let s = r.advance(&obs, 0);
        assert!(s.actions.is_empty());
        assert_eq!(r.state, State::Failed);
        assert!(r.messages.is_empty());
    }

    #[test]
    fn a_host_that_never_answers_fails_at_the_timeout() {
        let mut r = rollout(1, &[1]);
        let obs = fleet(1);
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        perform(&mut r, &s, &mut seq);
        assert_eq!(r.advance(&obs, 59_999).wake_at, Some(60_000));
        // It may still switch when it returns: it is sent back.
        let s = r.advance(&obs, 60_000);
        assert_eq!(r.state, State::RollingBack(Ending::Failed));
        assert_eq!(perform(&mut r, &s, &mut seq), vec![(Purpose::Revert, "v1".into(), vec![id(0)], 2)]);
        assert!(r.reason.contains("h0: no answer within the timeout"), "{}", r.reason);
    }

    #[test]
    fn pause_holds_after_the_current_wave_and_resume_bakes_again() {
        let mut r = rollout(2, &[1, 1]);
        r.bake_ms = 1_000;
        let mut obs = fleet(2);
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        perform(&mut r, &s, &mut seq);
        assert_eq!(
            r.control(Control::Pause, "ops", 5),
            Ok("pausing: the current wave finishes, then the rollout holds")
        );
        assert_eq!(r.state, State::Running, "the wave in flight finishes");
        answer(&mut obs, &[id(0)], 1, ReceiptOutcome::Committed);
        assert!(r.advance(&obs, 10).actions.is_empty());
        assert_eq!(r.state, State::Paused);
        assert!(r.advance(&obs, 10_000).actions.is_empty(), "a paused rollout sends nothing");
        r.control(Control::Resume, "ops", 20_000).unwrap();
        assert_eq!(r.advance(&obs, 20_500).wake_at, Some(21_000), "the bake starts again");
        assert_eq!(r.advance(&obs, 21_000).actions.len(), 1);
        // Pausing before a wave starts holds at once.
        let mut r = rollout(1, &[1]);
        r.control(Control::Pause, "ops", 0).unwrap();
        assert!(r.advance(&fleet(1), 0).actions.is_empty());
        assert_eq!(r.state, State::Paused);
    }

    #[test]
    fn abort_sends_back_what_the_rollout_switched() {
        let mut r = rollout(2, &[1, 1]);
        r.bake_ms = 60_000;
        let mut obs = fleet(2);
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        perform(&mut r, &s, &mut seq);
        answer(&mut obs, &[id(0)], 1, ReceiptOutcome::Committed);
        r.advance(&obs, 10);
        r.control(Control::Abort, "ops", 20).unwrap();
        let s = r.advance(&obs, 30);
        assert_eq!(perform(&mut r, &s, &mut seq), vec![(Purpose::Revert, "v1".into(), vec![id(0)], 2)]);
        answer(&mut obs, &[id(0)], 2, ReceiptOutcome::Committed);
        r.advance(&obs, 40);
        assert_eq!(r.state, State::Aborted);
        assert_eq!(r.reason, "aborted by ops");
        assert_eq!(r.waves[1].hosts[0].state, HostState::Waiting, "never touched");
        assert!(r.control(Control::Resume, "ops", 50).is_err());
    }

    #[test]
    fn a_host_with_nothing_live_before_cannot_be_sent_back() {
        let mut r = rollout(2, &[1, 1]);
        let mut obs = fleet(2);
        obs.get_mut(&id(0)).unwrap().active = None;
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        perform(&mut r, &s, &mut seq);
        answer(&mut obs, &[id(0)], 1, ReceiptOutcome::Committed);
        // With no bake, the next wave starts in the same step.
        let s = r.advance(&obs, 0);
        assert_eq!(perform(&mut r, &s, &mut seq)[0].0, Purpose::Wave(1));
        answer(&mut obs, &[id(1)], 2, ReceiptOutcome::Refused(Refusal::Unhealthy));
        let s = r.advance(&obs, 0);
        assert!(s.actions.is_empty());
        assert_eq!(r.state, State::Failed);
        assert_eq!(r.waves[0].hosts[0].state, HostState::NotReverted("nothing was live before this rollout".into()));
    }

    #[test]
    fn a_scheduled_message_is_waited_for_from_its_time() {
        let mut r = rollout(1, &[1]);
        r.not_before = 100; // seconds
        let mut obs = fleet(1);
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        assert!(matches!(s.actions[0], Action::Send { not_before: 100, .. }));
        perform(&mut r, &s, &mut seq);
        answer(&mut obs, &[id(0)], 1, ReceiptOutcome::Scheduled { until: 100 });
        assert_eq!(r.advance(&obs, 90_000).wake_at, Some(160_000));
        assert_eq!(r.waves[0].hosts[0].state, HostState::Sent { seq: 1 });
        answer(&mut obs, &[id(0)], 1, ReceiptOutcome::Committed);
        r.advance(&obs, 100_500);
        assert_eq!(r.state, State::Succeeded);
    }

    #[test]
    fn receipts_for_other_messages_are_not_taken_for_this_one() {
        let mut r = rollout(1, &[1]);
        let mut obs = fleet(1);
        let mut seq = 5;
        let s = r.advance(&obs, 0);
        perform(&mut r, &s, &mut seq);
        // An older receipt (seq 3) says nothing about seq 6; a newer one that was not
        // applied (refused before its intent) does not overtake it either.
        answer(&mut obs, &[id(0)], 3, ReceiptOutcome::Committed);
        r.advance(&obs, 1);
        assert_eq!(r.waves[0].hosts[0].state, HostState::Sent { seq: 6 });
        obs.get_mut(&id(0)).unwrap().receipt =
            Some(Receipt { applied: false, ..receipt(0, 9, ReceiptOutcome::Refused(Refusal::Expired)) });
        r.advance(&obs, 2);
        assert_eq!(r.waves[0].hosts[0].state, HostState::Sent { seq: 6 });
        obs.get_mut(&id(0)).unwrap().receipt = Some(receipt(0, 9, ReceiptOutcome::Committed));
        r.advance(&obs, 3);
        assert_eq!(r.waves[0].hosts[0].state, HostState::Failed("superseded by seq 9".into()));
    }

    #[test]
    fn a_revoked_host_is_left_out() {
        let mut r = rollout(2, &[2]);
        let mut obs = fleet(2);
        obs.get_mut(&id(1)).unwrap().revoked = true;
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        assert_eq!(perform(&mut r, &s, &mut seq)[0].2, vec![id(0)]);
        assert_eq!(r.waves[0].hosts[1].state, HostState::Skipped("revoked".into()));
    }

    #[test]
    fn a_rollback_that_gets_no_answer_ends_at_the_timeout() {
        let mut r = rollout(1, &[1]);
        let mut obs = fleet(1);
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        perform(&mut r, &s, &mut seq);
        answer(&mut obs, &[id(0)], 1, ReceiptOutcome::Committed);
        r.control(Control::Abort, "ops", 0).unwrap();
        let s = r.advance(&obs, 0);
        perform(&mut r, &s, &mut seq);
        assert_eq!(r.advance(&obs, 1).wake_at, Some(60_000));
        r.advance(&obs, 60_000);
        assert_eq!(r.state, State::Aborted);
        assert_eq!(r.waves[0].hosts[0].state, HostState::NotReverted("no answer within the timeout".into()));
    }

    #[test]
    fn after_a_restart_hosts_get_time_to_reconnect() {
        // --offline skip, the controller just restarted: p1 is not back yet.
        let mut r = rollout(2, &[2]);
        r.offline = Offline::Skip;
        let mut obs = fleet(2);
        obs.grace_until = 20_000;
        obs.get_mut(&id(1)).unwrap().connected = false;
        assert_eq!(r.advance(&obs, 0).wake_at, Some(20_000), "not skipped while it may be reconnecting");
        assert_eq!(r.waves[0].hosts[1].state, HostState::Waiting);
        obs.get_mut(&id(1)).unwrap().connected = true;
        assert_eq!(r.advance(&obs, 1_000).actions.len(), 1);
        // A wave whose receipts were due while the controller was down waits for them.
        let mut r = rollout(1, &[1]);
        let mut obs = fleet(1);
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        perform(&mut r, &s, &mut seq);
        obs.grace_until = 100_000;
        assert_eq!(r.advance(&obs, 90_000).wake_at, Some(100_000));
        answer(&mut obs, &[id(0)], 1, ReceiptOutcome::Committed);
        r.advance(&obs, 95_000);
        assert_eq!(r.state, State::Succeeded);
    }

    #[test]
    fn at_the_gate_timeout_only_hosts_that_are_not_ready_fail() {
        let mut r = rollout(3, &[3]);
        r.max_unhealthy = 1;
        let mut obs = fleet(3);
        obs.get_mut(&id(2)).unwrap().connected = false;
        r.advance(&obs, 0);
        let s = r.advance(&obs, 60_000);
        let states: Vec<_> = r.hosts().map(|h| h.state.name()).collect();
        assert_eq!(states, ["sent", "sent", "failed"]);
        assert!(matches!(&s.actions[..], [Action::Send { hosts, .. }] if hosts == &[id(0), id(1)]));
    }

    #[test]
    fn resume_gives_a_held_gate_its_full_time_again() {
        let mut r = rollout(1, &[1]);
        let mut obs = fleet(1);
        obs.get_mut(&id(0)).unwrap().staging = Staging::Pending;
        r.advance(&obs, 0);
        r.control(Control::Pause, "ops", 10).unwrap();
        r.advance(&obs, 10);
        assert_eq!(r.state, State::Paused);
        r.control(Control::Resume, "ops", 500_000).unwrap();
        assert_eq!(r.advance(&obs, 500_000).wake_at, Some(560_000));
        assert_eq!(r.state, State::Running);
    }

    #[test]
    fn a_host_revoked_on_the_way_leaves_the_rollout() {
        let mut r = rollout(2, &[2]);
        let mut obs = fleet(2);
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        perform(&mut r, &s, &mut seq);
        obs.get_mut(&id(1)).unwrap().revoked = true;
        answer(&mut obs, &[id(0)], 1, ReceiptOutcome::Committed);
        r.advance(&obs, 10);
        assert_eq!(r.state, State::Succeeded);
        assert_eq!(r.waves[0].hosts[1].state, HostState::Skipped("revoked during the rollout".into()));
    }

    #[test]
    fn a_host_that_could_not_switch_back_itself_is_sent_back() {
        let mut r = rollout(1, &[1]);
        let mut obs = fleet(1);
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        perform(&mut r, &s, &mut seq);
        // Unhealthy, but the switch back failed: it still runs v2.
        let mut stuck = receipt(0, 1, ReceiptOutcome::Refused(Refusal::Unhealthy));
        stuck.active = Some("v2".into());
        obs.get_mut(&id(0)).unwrap().receipt = Some(stuck);
        let s = r.advance(&obs, 10);
        assert_eq!(perform(&mut r, &s, &mut seq), vec![(Purpose::Revert, "v1".into(), vec![id(0)], 2)]);
    }

    #[test]
    fn an_aborted_scheduled_release_says_when_a_host_with_nothing_before_still_switches() {
        let mut r = rollout(1, &[1]);
        r.not_before = 100;
        let mut obs = fleet(1);
        obs.get_mut(&id(0)).unwrap().active = None;
        let mut seq = 0;
        let s = r.advance(&obs, 0);
        perform(&mut r, &s, &mut seq);
        answer(&mut obs, &[id(0)], 1, ReceiptOutcome::Scheduled { until: 100 });
        r.advance(&obs, 10);
        r.control(Control::Abort, "ops", 20).unwrap();
        assert!(r.advance(&obs, 30).actions.is_empty());
        assert_eq!(r.state, State::Aborted);
        assert_eq!(
            r.waves[0].hosts[0].state,
            HostState::NotReverted(
                "nothing was live before this rollout; it still switches at 1970-01-01T00:01:40Z, as its message was scheduled"
                    .into()
            )
        );
    }
}
