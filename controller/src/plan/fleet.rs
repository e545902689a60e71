//! Fleet-wide decisions that are not one rollout's: whether a returning agent must be
//! caught up and how, which environment a release must have been promoted from, and where
//! a rollback goes. Pure functions, table-tested.

use std::collections::HashSet;

/// The environment order when the controller's config names none.
pub const DEFAULT_ORDER: [&str; 4] = ["dev", "test", "staging", "prod"];

/// What is known of one agent and one app, for catch-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentApp<'a> {
    /// What it runs.
    pub active: Option<&'a str>,
    /// The last seq it applied.
    pub last_seq: Option<u64>,
    /// The environment's version is staged there with the right digest.
    pub staged: bool,
    /// Its latest receipt for the app.
    pub last_receipt: Option<LastReceipt<'a>>,
    /// A rollout that failed or was aborted could not send it back: it is owed the
    /// environment's version whatever seq it applied since.
    pub owed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastReceipt<'a> {
    pub seq: u64,
    pub version: &'a str,
    /// The agent recorded the seq as applied (it tried: switched, or refused after its intent).
    pub applied: bool,
    /// Refused for want of the bytes (not staged, digest mismatch) or of time (expired).
    pub for_want_of_bytes: bool,
}

/// What the environment should run for an app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired<'a> {
    pub version: &'a str,
    /// The seq of the environment's message (the last wave's).
    pub seq: u64,
    /// The first seq of the rollout that released it: a receipt for the version from
    /// this seq on is an answer to this release, not to an older one.
    pub since_seq: u64,
    /// The environment's message names this agent and is valid for a while yet.
    pub message_usable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatchUp {
    /// Nothing to do.
    Nothing,
    /// Send the environment's own message.
    Resend,
    /// Sign a fresh message for this agent alone (new, higher seq).
    SignFresh,
}

/// Whether an agent that (re)connected, or just staged something (`staged_now`), is behind
/// its environment and how to bring it there. A rollout of the app in the environment
/// that has not ended decides for its hosts: catch-up waits until it has.
pub fn catch_up(desired: &Desired, agent: &AgentApp, rollout_running: bool, staged_now: bool) -> CatchUp {
    if rollout_running || !agent.staged || agent.active == Some(desired.version) {
        return CatchUp::Nothing;
    }
    if !agent.owed {
        // It applied the environment's message or something newer (a message exported and
        // applied by hand): what it runs now was decided after the release.
        if agent.last_seq.is_some_and(|s| s >= desired.seq) {
            return CatchUp::Nothing;
        }
        // It tried this release already and it did not stay (refused after its intent,
        // unhealthy): not pestered again, unless it lacked the bytes then and has them now.
        if let Some(r) = &agent.last_receipt {
            let tried = r.version == desired.version && r.seq >= desired.since_seq && r.applied;
            if tried && !(staged_now && r.for_want_of_bytes) {
                return CatchUp::Nothing;
            }
        }
    }
    if desired.message_usable && agent.last_seq.is_none_or(|s| s < desired.seq) {
        CatchUp::Resend
    } else {
        CatchUp::SignFresh
    }
}

/// What an agent of an environment should hold: per app, the newest `keep` deploys and the
/// released version. `deploys` are (app, version, deployed at, payload); the answer keeps
/// each payload, newest first per app.
pub fn wanted<T>(
    mut deploys: Vec<(String, String, u64, T)>,
    released: &HashSet<(String, String)>,
    keep: usize,
) -> Vec<(String, String, T)> {
    deploys.sort_by(|a, b| (&a.0, b.2).cmp(&(&b.0, a.2)));
    let mut per_app: std::collections::HashMap<String, usize> = Default::default();
    let mut out = Vec::new();
    for (app, version, _, payload) in deploys {
        let n = per_app.entry(app.clone()).or_default();
        *n += 1;
        if *n <= keep || released.contains(&(app.clone(), version.clone())) {
            out.push((app, version, payload));
        }
    }
    out
}

/// The environment a release to `env` must have completed in first: the nearest one before
/// it in `order` that has agents. None when `env` is unordered or first among those with
/// agents.
pub fn promoted_from<'a>(order: &'a [String], with_agents: &HashSet<String>, env: &str) -> Option<&'a str> {
    let at = order.iter().position(|e| e == env)?;
    order[..at].iter().rev().find(|e| with_agents.contains(*e)).map(String::as_str)
}

/// Where a rollback goes: the named version, or the one released before the current.
/// `history` holds versions released before the current one, oldest first.
pub fn rollback_target(app: &str, env: &str, current: Option<&str>, history: &[String]) -> Result<String, String> {
    let Some(current) = current else {
        return Err(format!("{app} has never been released to {env}, so there is nothing to roll back to"));
    };
    match history.iter().rev().find(|v| *v != current) {
        Some(v) => Ok(v.clone()),
        None => Err(format!(
            "{env} has no version of {app} released before {current} (versions rolled back from leave its history), \
             so there is nothing earlier to go back to; name a staged version with --to"
        )),
    }
}

/// The history after a rollout of `version` succeeds in an environment that ran
/// `previous`: a release appends what it replaced; a rollback walks back, dropping what
/// came after its target.
pub fn next_history(history: &[String], previous: Option<&str>, version: &str, rollback: bool) -> Vec<String> {
    let mut h = history.to_vec();
    if rollback {
        if let Some(i) = h.iter().rposition(|v| v == version) {
            h.truncate(i);
        }
    } else if let Some(p) = previous.filter(|p| *p != version) {
        h.retain(|v| v != p);
        h.push(p.to_string());
    }
    h.retain(|v| v != version);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(active: Option<&str>, last_seq: Option<u64>) -> AgentApp<'_> {
        AgentApp { active, last_seq, staged: true, last_receipt: None, owed: false }
    }

    fn tried<'a>(version: &'a str, seq: u64, applied: bool, for_want_of_bytes: bool, a: AgentApp<'a>) -> AgentApp<'a> {
        AgentApp { last_receipt: Some(LastReceipt { seq, version, applied, for_want_of_bytes }), ..a }
    }

    /// v2 released by a rollout whose messages had seqs 8 to 10.
    const DESIRED: Desired = Desired { version: "v2", seq: 10, since_seq: 8, message_usable: true };

    #[test]
    fn catch_up_brings_only_agents_that_are_behind() {
        use CatchUp::*;
        let cases: Vec<(&str, AgentApp, bool, bool, CatchUp)> = vec![
            ("behind", agent(Some("v1"), Some(5)), false, false, Resend),
            ("never ran anything", agent(None, None), false, false, Resend),
            ("already runs it", agent(Some("v2"), Some(4)), false, false, Nothing),
            ("a rollout decides", agent(Some("v1"), Some(5)), true, false, Nothing),
            ("not staged", AgentApp { staged: false, ..agent(Some("v1"), None) }, false, false, Nothing),
            ("applied something newer by hand", agent(Some("v3"), Some(15)), false, false, Nothing),
            ("handled the message", agent(Some("v1"), Some(10)), false, false, Nothing),
            // A failed rollout switched it to v3 (seq 12) and could not put it back.
            (
                "owed by a failed rollout",
                AgentApp { owed: true, ..agent(Some("v3"), Some(12)) },
                false,
                false,
                SignFresh,
            ),
            (
                "tried this release, unhealthy",
                tried("v2", 8, true, false, agent(Some("v1"), Some(8))),
                false,
                true,
                Nothing,
            ),
            (
                "failed an older release of it",
                tried("v2", 3, true, false, agent(Some("v1"), Some(5))),
                false,
                false,
                Resend,
            ),
            (
                "refused before its intent",
                tried("v2", 9, false, false, agent(Some("v1"), Some(5))),
                false,
                false,
                Resend,
            ),
            (
                "refused for want of bytes, then staged",
                tried("v2", 9, true, true, agent(Some("v1"), Some(5))),
                false,
                true,
                Resend,
            ),
            (
                "refused for want of bytes, nothing new",
                tried("v2", 9, true, true, agent(Some("v1"), Some(5))),
                false,
                false,
                Nothing,
            ),
        ];
        for (what, a, running, staged_now, want) in cases {
            assert_eq!(catch_up(&DESIRED, &a, running, staged_now), want, "{what}");
        }
        let stale = Desired { message_usable: false, ..DESIRED };
        assert_eq!(catch_up(&stale, &agent(Some("v1"), Some(5)), false, false), SignFresh);
    }

    #[test]
    fn an_agent_holds_the_newest_deploys_and_the_released_version() {
        let d = |app: &str, v: &str, at: u64| (app.to_string(), v.to_string(), at, ());
        let deploys = vec![d("web", "1", 1), d("web", "3", 3), d("web", "2", 2), d("api", "9", 5), d("web", "4", 4)];
        let released = HashSet::from([("web".to_string(), "1".to_string())]);
        let got: Vec<(String, String)> = wanted(deploys, &released, 2).into_iter().map(|(a, v, ())| (a, v)).collect();
        let want = [("api", "9"), ("web", "4"), ("web", "3"), ("web", "1")];
        assert_eq!(got, want.map(|(a, v)| (a.to_string(), v.to_string())));
    }

    #[test]
    fn promotion_comes_from_the_nearest_earlier_environment_with_agents() {
        let order: Vec<String> = DEFAULT_ORDER.iter().map(|s| s.to_string()).collect();
        let with = |envs: &[&str]| envs.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
        assert_eq!(promoted_from(&order, &with(&["staging", "prod"]), "prod"), Some("staging"));
        assert_eq!(promoted_from(&order, &with(&["dev", "prod"]), "prod"), Some("dev"));
        assert_eq!(promoted_from(&order, &with(&["dev", "staging", "prod"]), "dev"), None);
        assert_eq!(promoted_from(&order, &with(&["prod"]), "prod"), None);
        assert_eq!(promoted_from(&order, &with(&["dev", "qa"]), "qa"), None, "unordered");
    }

    #[test]
    fn rollback_walks_the_history_backwards() {
        let h = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(rollback_target("web", "prod", Some("v3"), &h(&["v1", "v2"])), Ok("v2".into()));
        assert!(rollback_target("web", "prod", None, &[]).unwrap_err().contains("never been released"));
        let only = rollback_target("web", "prod", Some("v1"), &[]).unwrap_err();
        assert!(only.contains("--to"), "{only}");
        // Released v1, v2, v3; rolled back to v2, then to v1.
        let after_v3 = next_history(&h(&["v1"]), Some("v2"), "v3", false);
        assert_eq!(after_v3, h(&["v1", "v2"]));
        let back_to_v2 = next_history(&after_v3, Some("v3"), "v2", true);
        assert_eq!(back_to_v2, h(&["v1"]));
        assert_eq!(rollback_target("web", "prod", Some("v2"), &back_to_v2), Ok("v1".into()));
        let back_to_v1 = next_history(&back_to_v2, Some("v2"), "v1", true);
        assert!(back_to_v1.is_empty());
        // Releasing the same version again changes nothing.
        assert_eq!(next_history(&h(&["v1"]), Some("v2"), "v2", false), h(&["v1"]));
    }
}
