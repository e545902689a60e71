//! Staging in proportion to what changed: a new version shares the files it has in common
//! with a staged one (a reflink, else a hard link), or copies them with `reuse = "copy"`;
//! every version's seal stays a true check when inodes are shared.

use crate::AGENT;
use stagehand_agent::config::{AgentConfig, Reuse};
use stagehand_common::protocol::{AdminRequest, AdminResponse};
use stagehand_tests::{
    assert_same_tree, copy_linked, inodes, next_version, tree_file, versioned_tree, wait_for, Fleet, Proc, TestAgent,
};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

const FILES: usize = 24;
const SIZE: usize = 160 << 10;
/// What the agent logs when a seal no longer holds and it reads a whole tree again.
const FULL_READ: &str = "reading it in full";

fn configure(agent: &TestAgent, f: impl FnOnce(&mut AgentConfig)) {
    let mut c = AgentConfig::load(&agent.dir).unwrap();
    f(&mut c);
    c.save(&agent.dir).unwrap();
}

/// An enrolled agent run as a process of its own, logging at info.
fn spawn(fleet: &Fleet, agent: &TestAgent, env: &[(&str, &str)], log: &str) -> Proc {
    let dir = agent.dir.to_str().unwrap();
    let mut all = vec![("STAGEHAND_LOG", "info"), ("NO_COLOR", "1")];
    all.extend_from_slice(env);
    Proc::spawn(AGENT, &["run", "--data-dir", dir], &all, fleet.path().join(log)).unwrap()
}

/// Versions 1..=n of a tree, each a 1% change of the one before, under `fleet`'s directory.
fn versions(fleet: &Fleet, n: usize) -> Vec<PathBuf> {
    let dirs: Vec<PathBuf> = (1..=n).map(|v| fleet.path().join(format!("src-{v}"))).collect();
    versioned_tree(&dirs[0], FILES, SIZE, 1).unwrap();
    for v in 1..n {
        next_version(&dirs[v - 1], &dirs[v], 4 * v, FILES, v as u64 + 1).unwrap();
    }
    dirs
}

async fn stage(fleet: &Fleet, version: &str, src: &Path) {
    fleet.push("web", version, src).await.unwrap();
    let p = fleet.deploy("web", version, "prod", 60).await.unwrap();
    assert!(p.all_done(), "staging {version}: {p:?}");
}

async fn release(fleet: &Fleet, version: &str) {
    let p = fleet.release("web", version, "prod").await.unwrap();
    assert!(p.all_done(), "releasing {version}: {p:?}");
}

/// The files of `a` and `b` that are one inode, by path.
fn shared(a: &Path, b: &Path) -> Vec<String> {
    let (ia, ib) = (inodes(a), inodes(b));
    ia.iter().filter(|(p, i)| ib.get(*p) == Some(i)).map(|(p, _)| p.clone()).collect()
}

#[tokio::test]
async fn a_one_percent_change_shares_every_unchanged_file_and_no_seal_breaks() {
    let fleet = Fleet::start().await.unwrap();
    let agent = fleet.enrol("prod", "p").await.unwrap();
    let proc = spawn(&fleet, &agent, &[], "agent.log");
    let src = versions(&fleet, 2);
    // Version 3 has version 2's bytes, but one file is executable now: a file of its own,
    // or the chmod would reach version 2.
    let v3 = fleet.path().join("src-3");
    copy_linked(&src[1], &v3).unwrap();
    let moded = v3.join(tree_file(9));
    let bytes = std::fs::read(&moded).unwrap();
    std::fs::remove_file(&moded).unwrap();
    std::fs::write(&moded, bytes).unwrap();
    std::fs::set_permissions(&moded, std::fs::Permissions::from_mode(0o755)).unwrap();

    stage(&fleet, "1", &src[0]).await;
    release(&fleet, "1").await;
    stage(&fleet, "2", &src[1]).await;
    stage(&fleet, "3", &v3).await;
    let dir = |v: &str| agent.release_dir("web", v);
    for (v, s) in [("1", &src[0]), ("2", &src[1]), ("3", &v3)] {
        assert_same_tree(s, &dir(v));
    }
    // Every file but the four changed ones is version 1's inode; and in version 3 every
    // file but the one whose mode changed is version 2's.
    let unchanged: Vec<String> = shared(&src[0], &src[1]);
    assert_eq!(unchanged.len(), FILES + 1 - 4, "the test's own trees");
    assert_eq!(shared(&dir("1"), &dir("2")), unchanged);
    let mut want: Vec<String> = inodes(&dir("2")).into_keys().filter(|p| *p != tree_file(9)).collect();
    want.sort();
    assert_eq!(shared(&dir("2"), &dir("3")), want);
    assert_eq!(std::fs::metadata(dir("2").join(tree_file(9))).unwrap().mode() & 0o777, 0o644);

    // Every version activates, and none needed a full read: the agent's own links moved
    // the ctime of shared inodes without breaking a seal.
    for v in ["3", "2", "1"] {
        release(&fleet, v).await;
    }
    assert!(!proc.log_text().contains(FULL_READ), "a seal broke:\n{}", proc.log_text());
}

#[tokio::test]
async fn a_write_to_a_shared_file_is_refused_in_every_version_that_holds_it() {
    let fleet = Fleet::start().await.unwrap();
    let agent = fleet.agent("prod", "p").await.unwrap();
    let src = versions(&fleet, 3);
    for (i, s) in src.iter().enumerate() {
        stage(&fleet, &(i + 1).to_string(), s).await;
    }
    // A file no version changed, written in place through version 2, its size and mtime
    // kept: only the ctime tells.
    let rel = tree_file(1);
    let path = agent.release_dir("web", "2").join(&rel);
    assert_eq!(std::fs::metadata(&path).unwrap().nlink(), 3, "{rel} is one inode in three versions");
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"tampered", 100).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);

    for (v, others) in [("1", "web 2, 3"), ("2", "web 1, 3"), ("3", "web 1, 2")] {
        let p = fleet.release("web", v, "prod").await.unwrap();
        let why = &p.failed.first().unwrap_or_else(|| panic!("release {v} went through: {p:?}")).1;
        assert!(why.starts_with("digest-mismatch"), "{why}");
        assert!(why.contains(&rel) && why.contains(&format!("shared (hard-linked) with {others}")), "{why}");
        assert!(agent.current("web").is_none(), "nothing went live");
    }

    // The agent told the controller, which no longer counts version 1 as staged there.
    wait_for("the controller to learn of the damage", Duration::from_secs(30), || async {
        let Ok(AdminResponse::Agents { agents }) = fleet.call(AdminRequest::ListAgents).await else { return false };
        agents[0].apps.iter().any(|a| a.app == "web" && !a.staged.contains(&"1".to_string()))
    })
    .await
    .unwrap();
    // Deploying again repairs a version: it gets a file of its own with the right bytes.
    let p = fleet.deploy("web", "1", "prod", 60).await.unwrap();
    assert!(p.all_done(), "{p:?}");
    assert_same_tree(&src[0], &agent.release_dir("web", "1"));
    release(&fleet, "1").await;
}

#[tokio::test]
async fn reuse_copy_gives_every_version_files_of_its_own() {
    let fleet = Fleet::start().await.unwrap();
    let mut agent = fleet.enrol("prod", "p").await.unwrap();
    configure(&agent, |c| c.apps.entry("web".into()).or_default().reuse = Reuse::Copy);
    agent.start().await.unwrap();
    let src = versions(&fleet, 2);
    stage(&fleet, "1", &src[0]).await;
    stage(&fleet, "2", &src[1]).await;
    let (v1, v2) = (agent.release_dir("web", "1"), agent.release_dir("web", "2"));
    assert_same_tree(&src[1], &v2);
    assert!(shared(&v1, &v2).is_empty(), "a file is shared under reuse = \"copy\"");
    // The app writes into its live tree: the other version does not see it.
    release(&fleet, "2").await;
    std::fs::OpenOptions::new().write(true).open(v2.join(tree_file(1))).unwrap().write_all_at(b"log", 0).unwrap();
    release(&fleet, "1").await;
}

/// Stages two versions with the app's root at `root`; returns how many files of the
/// second are the first's inode.
async fn stage_two_under(root: &Path) -> usize {
    let fleet = Fleet::start().await.unwrap();
    let mut agent = fleet.enrol("prod", "p").await.unwrap();
    configure(&agent, |c| c.apps.entry("web".into()).or_default().root = Some(root.to_path_buf()));
    agent.start().await.unwrap();
    let src = versions(&fleet, 2);
    stage(&fleet, "1", &src[0]).await;
    stage(&fleet, "2", &src[1]).await;
    let (v1, v2) = (root.join("releases/1"), root.join("releases/2"));
    assert_same_tree(&src[1], &v2);
    release(&fleet, "2").await;
    release(&fleet, "1").await;
    agent.stop().await;
    shared(&v1, &v2).len()
}

#[tokio::test]
async fn tmpfs_has_no_reflinks_and_falls_back_to_hard_links() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    assert_eq!(stage_two_under(&shm.path().join("web")).await, FILES + 1 - 4);
}

/// A loop-mounted XFS: reflinks, so no inode is shared and the unchanged bytes take no
/// new space. Needs root and mkfs.xfs (`.ci/run` installs xfsprogs).
#[tokio::test]
async fn xfs_clones_unchanged_files_with_reflinks() {
    let Some(xfs) = LoopXfs::mount() else { return };
    let root = xfs.dir.join("web");
    let used = || {
        let out = std::process::Command::new("df").args(["-B1", "--output=used"]).arg(&xfs.dir).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse::<u64>().unwrap()
    };
    let before = used();
    assert_eq!(stage_two_under(&root).await, 0, "reflinks, not hard links");
    // Two versions of 24 files, 4 changed: well under two full copies.
    let grew = used() - before;
    let one = (FILES * SIZE) as u64;
    assert!(grew < one + one / 2, "two versions took {grew} bytes, one is {one}");
}

struct LoopXfs {
    _image: tempfile::TempDir,
    dir: PathBuf,
}

impl LoopXfs {
    fn mount() -> Option<LoopXfs> {
        let have = std::process::Command::new("mkfs.xfs").arg("-V").output().is_ok_and(|o| o.status.success());
        if !have || !rustix_is_root() {
            eprintln!("skipped: needs root and mkfs.xfs (apt-get install xfsprogs; .ci/run does)");
            return None;
        }
        let image = tempfile::tempdir().unwrap();
        let file = image.path().join("xfs.img");
        std::fs::File::create(&file).unwrap().set_len(512 << 20).unwrap();
        let dir = image.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
            let out = std::process::Command::new(cmd).args(args).output().unwrap();
            assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run("mkfs.xfs", &["-q".as_ref(), file.as_os_str()]);
        run("mount", &["-o".as_ref(), "loop".as_ref(), file.as_os_str(), dir.as_os_str()]);
        Some(LoopXfs { _image: image, dir })
    }
}

impl Drop for LoopXfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
    }
}

fn rustix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")))
}

#[tokio::test]
async fn an_agent_killed_while_sharing_files_resumes_and_every_version_holds() {
    let fleet = Fleet::start().await.unwrap();
    let agent = fleet.enrol("prod", "p").await.unwrap();
    let src = versions(&fleet, 2);
    let first = spawn(&fleet, &agent, &[], "agent-1.log");
    stage(&fleet, "1", &src[0]).await;
    drop(first);

    // SIGKILL after the 10th of 21 shared files.
    let mut dying = spawn(&fleet, &agent, &[("STAGEHAND_FAILPOINT", "stage-reuse:10")], "agent-2.log");
    fleet.push("web", "2", &src[1]).await.unwrap();
    fleet
        .call(stagehand_common::protocol::AdminRequest::Deploy {
            app: "web".into(),
            version: "2".into(),
            env: "prod".into(),
        })
        .await
        .unwrap();
    let status = dying.wait_exit(Duration::from_secs(60)).await.unwrap();
    assert!(!status.success(), "the failpoint should have killed the agent");
    assert!(!agent.release_dir("web", "2").exists(), "a half-staged version must never appear");

    let _again = spawn(&fleet, &agent, &[], "agent-3.log");
    let p = fleet.wait_staged("web", "2", "prod", 60).await.unwrap();
    assert!(p.all_done(), "{p:?}");
    let (v1, v2) = (agent.release_dir("web", "1"), agent.release_dir("web", "2"));
    assert_same_tree(&src[0], &v1);
    assert_same_tree(&src[1], &v2);
    assert_eq!(shared(&v1, &v2).len(), FILES + 1 - 4);
    release(&fleet, "2").await;
    release(&fleet, "1").await;
}

#[tokio::test]
async fn retention_removes_links_and_keeps_content_other_versions_share() {
    let fleet = Fleet::start().await.unwrap();
    let agent = fleet.enrol("prod", "p").await.unwrap();
    configure(&agent, |c| c.keep_releases = 2);
    let proc = spawn(&fleet, &agent, &[], "agent.log");
    let src = versions(&fleet, 5);
    stage(&fleet, "1", &src[0]).await;
    release(&fleet, "1").await;
    for (i, s) in src.iter().enumerate().skip(1) {
        stage(&fleet, &(i + 1).to_string(), s).await;
    }
    // The live version and the two most recent others.
    let releases = agent.app_root("web").join("releases");
    wait_for("retention to remove versions 2 and 3", Duration::from_secs(30), || {
        let left: Vec<String> = {
            let mut v: Vec<String> =
                std::fs::read_dir(&releases).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            v.sort();
            v
        };
        let gone = agent.app_root("web").join(".staging").read_dir().is_ok_and(|mut d| d.next().is_none());
        async move { left == ["1", "4", "5"] && gone }
    })
    .await
    .unwrap();
    for v in [1usize, 4, 5] {
        assert_same_tree(&src[v - 1], &releases.join(v.to_string()));
    }
    // A file no version changed: one inode, three links left of five.
    let never = releases.join("5").join(tree_file(0));
    assert_eq!(std::fs::metadata(&never).unwrap().nlink(), 3);
    for v in ["5", "4", "1"] {
        release(&fleet, v).await;
    }
    assert!(!proc.log_text().contains(FULL_READ), "a removal broke a seal:\n{}", proc.log_text());
}
