//! The store's conformance suite (#14): the same operations, with the same guarantees, on
//! both backends. Each test takes two handles, `a` and `b`, as two controllers would hold
//! them: for sled two clones of one database (one controller), for etcd two stores opened
//! on one real etcd (two controllers). Racing threads use both.

use stagehand_common::activate::FULL_TRAFFIC;
use stagehand_common::protocol::{Labels, Receipt, ReceiptOutcome};
use stagehand_common::{AgentId, Digest};
use stagehand_controller::plan::rollout::{Kind, Offline, Rollout, State, RECORD_VERSION};
use stagehand_controller::store::*;
use stagehand_tests::etcd::Etcd;
use stagehand_tests::wait_for;
use std::collections::HashSet;
use std::time::Duration;

/// What the suite runs on: (a, b, and what keeps the backend alive).
struct Backend {
    a: Store,
    b: Store,
    _etcd: Option<Etcd>,
    _dir: tempfile::TempDir,
}

async fn sled() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(&dir.path().join("state")).unwrap();
    Backend { b: a.clone(), a, _etcd: None, _dir: dir }
}

async fn etcd() -> Option<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await.unwrap()?;
    let open = |name: &str| Store::open_etcd(vec![etcd.client.clone()], name.into()).unwrap();
    let (a, b) = tokio::task::block_in_place(|| (open("127.0.0.1:1"), open("127.0.0.1:2")));
    Some(Backend { a, b, _etcd: Some(etcd), _dir: dir })
}

/// Runs one test of the suite on both backends.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sled_backend {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { let s = super::sled().await; super::$name(&s.a, &s.b).await; })*
        }
        mod etcd_backend {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { if let Some(s) = super::etcd().await { super::$name(&s.a, &s.b).await; } })*
        }
    };
}

conformance!(
    records_written_through_one_are_read_through_the_other,
    seqs_are_never_issued_twice,
    a_token_is_used_exactly_as_often_as_it_allows,
    a_revocation_and_a_renewal_never_undo_each_other,
    one_rollout_of_an_app_and_environment_holds_the_mark,
    a_rollout_is_replaced_only_as_it_was_read,
    removing_an_agent_removes_what_is_kept_about_it,
    exactly_one_controller_drives,
    where_an_agent_is_connected_is_seen_by_the_others,
);

fn agent(n: u32) -> AgentRecord {
    AgentRecord {
        v: 2,
        id: AgentId(format!("a-{n}")),
        name: format!("host-{n}"),
        env: "prod".into(),
        labels: Labels::new(),
        cert_fingerprint: format!("fp-{n}"),
        revoked: false,
        joined_at: 1,
        own_labels: Labels::new(),
    }
}

fn receipt(id: &AgentId, seq: u64) -> Receipt {
    Receipt {
        agent_id: id.clone(),
        app: "web".into(),
        version: "1".into(),
        seq,
        outcome: ReceiptOutcome::Committed,
        active: Some("1".into()),
        log: String::new(),
        check_us: 0,
        switch_us: 0,
        total_us: 0,
        at: 0,
        applied: true,
    }
}

fn rollout(id: &str) -> Rollout {
    Rollout {
        v: RECORD_VERSION,
        id: id.into(),
        app: "web".into(),
        version: "2".into(),
        digest: Digest([2; 32]),
        env: "prod".into(),
        kind: Kind::Release,
        requested_by: "admin".into(),
        forced: false,
        created: 1,
        ended: None,
        not_before: 0,
        selectors: Labels::new(),
        bake_ms: 0,
        max_unhealthy: 0,
        offline: Offline::Wait,
        timeout_ms: 1000,
        ttl_secs: 60,
        state: State::Running,
        reason: String::new(),
        pause_requested: false,
        wave: 0,
        waves: vec![],
        skipped: vec![],
        rollback_since: None,
        messages: vec![],
        revision: 1,
        traffic: FULL_TRAFFIC,
        gate: Default::default(),
    }
}

/// Waits until `b` sees what `a` wrote (at once for one database; within a second or so
/// for another controller's).
async fn seen(what: &str, cond: impl Fn() -> bool) {
    let cond = &cond;
    wait_for(what, Duration::from_secs(10), || async move { cond() }).await.unwrap();
}

/// Runs `threads` copies of `f` at once, half on each handle; every result.
fn race<T: Send>(a: &Store, b: &Store, threads: usize, f: impl Fn(&Store, usize) -> T + Sync) -> Vec<T> {
    tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let f = &f;
            let handles: Vec<_> = (0..threads).map(|i| s.spawn(move || f(if i % 2 == 0 { a } else { b }, i))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    })
}

async fn records_written_through_one_are_read_through_the_other(a: &Store, b: &Store) {
    let (one, two) = (agent(1), agent(2));
    a.put_agent(&one).unwrap();
    a.put_agent(&two).unwrap();
    a.put_artifact("web", "1", &ArtifactRecord { v: 1, digest: Digest([1; 32]), size: 10, pushed_at: 1 }).unwrap();
    a.put_deploy("prod", "web", "1", &DeployRecord { v: 1, digest: Digest([1; 32]), size: 10, at: 1 }).unwrap();
    a.put_stage(&one.id, "web", "1", &StageRecord { v: 1, digest: Digest([1; 32]), state: StageState::Staged, at: 1 })
        .unwrap();
    a.put_appstate(&one.id, "web", &AppStateRecord { v: 1, active: Some("1".into()), last_seq: Some(3) }).unwrap();
    for seq in 1..=6 {
        a.put_recent_receipt(&receipt(&one.id, seq)).unwrap();
    }
    a.put_receipt(&receipt(&one.id, 6)).unwrap();
    a.put_promoted("prod", "web", &Digest([1; 32]), "r-1").unwrap();
    tokio::task::block_in_place(|| a.flush()).unwrap();
    seen("b to see a's records", || b.promoted("prod", "web", &Digest([1; 32])).unwrap().is_some()).await;
    let mut names: Vec<String> = b.agents_in("prod").unwrap().into_iter().map(|a| a.name).collect();
    names.sort();
    assert_eq!(names, ["host-1", "host-2"]);
    assert_eq!(b.cert_role("fp-2").unwrap(), Some(CertRole::Agent(two.id.clone())));
    assert!(b.knows_app("web").unwrap() && !b.knows_app("api").unwrap());
    assert_eq!(b.deploys_in("prod").unwrap().len(), 1);
    assert_eq!(b.stages_of(&one.id, Some("web")).unwrap()[0].2.state, StageState::Staged);
    assert_eq!(b.appstate(&one.id, "web").unwrap().last_seq, Some(3));
    assert_eq!(b.receipt(&one.id, "web").unwrap().map(|r| r.seq), Some(6));
    // The four most recent receipts are kept by seq, the older ones not.
    assert!(b.receipt_for(&one.id, "web", 3).unwrap().is_some());
    assert!(b.receipt_for(&one.id, "web", 2).unwrap().is_none());
}

async fn seqs_are_never_issued_twice(a: &Store, b: &Store) {
    let issued: Vec<u64> = race(a, b, 6, |s, _| (0..40).map(|_| s.next_seq("web").unwrap()).collect::<Vec<_>>())
        .into_iter()
        .flatten()
        .collect();
    let unique: HashSet<u64> = issued.iter().copied().collect();
    assert_eq!(unique.len(), issued.len(), "a seq was issued twice");
    assert_eq!(unique, (1..=240).collect(), "every seq from 1 to 240, once");
    for s in [a, b] {
        seen("both to see the counter at the last seq", || s.seq_counter("web").unwrap() == 240).await;
    }
}

async fn a_token_is_used_exactly_as_often_as_it_allows(a: &Store, b: &Store) {
    let token = TokenRecord {
        v: 1,
        secret_hash: "h".into(),
        env: "prod".into(),
        labels: Labels::new(),
        expires_at: 0,
        uses_left: 7,
    };
    a.put_token("t-1", &token).unwrap();
    tokio::task::block_in_place(|| a.flush()).unwrap();
    seen("b to see the token", || b.token("t-1").unwrap().is_some()).await;
    let used =
        race(a, b, 6, |s, _| (0..5).filter(|_| s.consume_token::<()>("t-1", |_| Ok(())).unwrap().is_ok()).count());
    assert_eq!(used.iter().sum::<usize>(), 7, "uses per thread: {used:?}");
    seen("the used-up token to be gone", || a.token("t-1").unwrap().is_none() && b.token("t-1").unwrap().is_none())
        .await;
}

async fn a_revocation_and_a_renewal_never_undo_each_other(a: &Store, b: &Store) {
    let one = agent(1);
    a.put_agent(&one).unwrap();
    tokio::task::block_in_place(|| a.flush()).unwrap();
    seen("b to see the agent", || b.agent(&one.id).unwrap().is_some()).await;
    race(a, b, 4, |s, i| {
        for n in 0..20 {
            if i == 1 && n == 10 {
                s.update_agent::<()>(&one.id, |mut r| {
                    r.revoked = true;
                    Ok(r)
                })
                .unwrap()
                .unwrap();
            } else {
                s.update_agent::<()>(&one.id, |mut r| {
                    r.cert_fingerprint = format!("fp-{i}-{n}");
                    Ok(r)
                })
                .unwrap()
                .unwrap();
            }
        }
    });
    for s in [a, b] {
        seen("the revocation to hold", || s.agent(&one.id).unwrap().is_some_and(|r| r.revoked)).await;
    }
}

async fn one_rollout_of_an_app_and_environment_holds_the_mark(a: &Store, b: &Store) {
    let won = race(a, b, 8, |s, i| s.start_rollout(&rollout(&format!("r-{i}"))).unwrap().is_none());
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    seen("a to see the mark", || a.active_rollout("prod", "web").unwrap().is_some()).await;
    let holder = a.active_rollout("prod", "web").unwrap().unwrap();
    // The record came with the mark: whoever sees the one sees the other.
    assert_eq!(a.rollout(&holder).unwrap().map(|r| r.id), Some(holder.clone()));
    seen("b to see the mark", || b.active_rollout("prod", "web").unwrap().as_ref() == Some(&holder)).await;
    assert!(b.rollout(&holder).unwrap().is_some());
    let losers = (0..8).map(|i| format!("r-{i}")).filter(|id| *id != holder);
    for id in losers {
        assert!(b.rollout(&id).unwrap().is_none(), "{id} lost the race and must not be stored");
    }
    assert_eq!(b.start_rollout(&rollout("r-99")).unwrap(), Some(holder));
}

async fn a_rollout_is_replaced_only_as_it_was_read(a: &Store, b: &Store) {
    let r = rollout("r-1");
    a.put_rollout(&r).unwrap();
    tokio::task::block_in_place(|| a.flush()).unwrap();
    seen("b to see the rollout", || b.rollout("r-1").unwrap().is_some()).await;
    let paused = Rollout { pause_requested: true, revision: 2, ..r.clone() };
    let stepped = Rollout { wave: 1, revision: 2, ..r.clone() };
    assert!(tokio::task::block_in_place(|| a.replace_rollout(&r, &paused, Default::default())).unwrap());
    // b read `r` too: its step is refused, and the pause stays; what its step's end would
    // have written (the released version) is not written either.
    let message = stagehand_common::activate::SignedActivate { body: vec![1], signature: vec![2; 64] };
    let desired = DesiredRecord {
        v: DESIRED_VERSION,
        version: "2".into(),
        digest: Digest([2; 32]),
        seq: 9,
        message,
        targets: vec![],
        history: vec![],
        selectors: Labels::new(),
        since_seq: 9,
        owed: vec![],
        more: vec![],
    };
    let ends = Ends { desired: Some(desired), promoted: true };
    assert!(!tokio::task::block_in_place(|| b.replace_rollout(&r, &stepped, ends)).unwrap());
    tokio::task::block_in_place(|| b.flush()).unwrap();
    assert!(
        b.desired("prod", "web").unwrap().is_none() && b.promoted("prod", "web", &Digest([2; 32])).unwrap().is_none()
    );
    seen("the pause to hold", || b.rollout("r-1").unwrap() == Some(paused.clone())).await;
    let done = Rollout { state: State::Succeeded, revision: 3, ..paused.clone() };
    let ends = Ends { desired: None, promoted: true };
    assert!(tokio::task::block_in_place(|| b.replace_rollout(&paused, &done, ends)).unwrap());
    seen("the promotion to come with the ended record", || {
        a.promoted("prod", "web", &Digest([2; 32])).unwrap().is_some()
    })
    .await;
    seen("the ended rollout to leave the running ones", || a.active_rollouts().unwrap().is_empty()).await;
}

async fn removing_an_agent_removes_what_is_kept_about_it(a: &Store, b: &Store) {
    let one = agent(1);
    a.put_agent(&one).unwrap();
    a.put_stage(&one.id, "web", "1", &StageRecord { v: 1, digest: Digest([1; 32]), state: StageState::Pending, at: 1 })
        .unwrap();
    a.put_receipt(&receipt(&one.id, 1)).unwrap();
    a.remove_agent(&one.id).unwrap();
    tokio::task::block_in_place(|| a.flush()).unwrap();
    for s in [a, b] {
        seen("the agent to be gone", || s.agent(&one.id).unwrap().is_none()).await;
        assert!(s.stages_of(&one.id, None).unwrap().is_empty());
        assert!(s.receipt(&one.id, "web").unwrap().is_none());
    }
}

/// One database: its one controller drives. Shared: exactly one of the two, and the other
/// once the first has gone.
async fn exactly_one_controller_drives(a: &Store, b: &Store) {
    if !a.shared() {
        assert!(a.is_leader() && b.is_leader());
        return;
    }
    seen("one of the two to drive", || a.is_leader() || b.is_leader()).await;
    let (leader, other) = if a.is_leader() { (a, b) } else { (b, a) };
    assert!(!other.is_leader());
    // A change through one wakes the other.
    let mut changes = other.subscribe();
    let written = std::time::Instant::now();
    leader.put_promoted("prod", "web", &Digest([3; 32]), "r-3").unwrap();
    tokio::task::block_in_place(|| leader.flush()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), changes.changed()).await.unwrap().unwrap();
    assert_ne!(other.take_changed(), 0);
    assert!(other.promoted("prod", "web", &Digest([3; 32])).unwrap().is_some());
    eprintln!("a change through one controller was seen by the other {:?} after it was made", written.elapsed());
    // A clean stop gives the lease up: the other takes over at once, not after the TTL.
    let closed = std::time::Instant::now();
    tokio::task::block_in_place(|| leader.close());
    seen("the other to take over", || other.is_leader()).await;
    eprintln!("the other controller took over {:?} after a clean stop", closed.elapsed());
}

/// Presence records (on each controller's lease) are seen by the other controller, one
/// change after another, and go when their controller does.
async fn where_an_agent_is_connected_is_seen_by_the_others(a: &Store, b: &Store) {
    if !a.shared() {
        // One controller knows its own sessions: nothing is recorded for others.
        a.set_presence(&AgentId("a-1".into()), "a", true).unwrap();
        assert!(!b.connected_elsewhere(&AgentId("a-1".into()), "b").unwrap());
        return;
    }
    for i in 0..12 {
        let id = AgentId(format!("a-{i}"));
        a.set_presence(&id, "127.0.0.1:1", true).unwrap();
        seen("b to see the agent connected to a", || b.connected_elsewhere(&id, "127.0.0.1:2").unwrap()).await;
        assert!(!a.connected_elsewhere(&id, "127.0.0.1:1").unwrap(), "a's own record is not elsewhere");
        if i % 3 == 0 {
            a.set_presence(&id, "127.0.0.1:1", false).unwrap();
            seen("b to see it gone", || !b.connected_elsewhere(&id, "127.0.0.1:2").unwrap()).await;
        }
    }
    tokio::task::block_in_place(|| a.close());
    seen("a's records to go with its lease", || {
        !b.connected_elsewhere(&AgentId("a-11".into()), "127.0.0.1:2").unwrap()
    })
    .await;
}
