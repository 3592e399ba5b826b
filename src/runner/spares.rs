//! Spare checkouts: for each recently used repository the node keeps one ready-made clone of
//! its mirror next to the work directories. The next job on that repository takes it with a
//! rename, fetches what changed from the local mirror and checks out only the files that
//! differ, instead of writing the whole tree again. A new spare is then made in the
//! background, while the job's agent runs.
//!
//! A spare is never handed to two jobs: taking it is a `rename(2)` of its directory into the
//! job's work directory, which only one caller can win. Spares live under the work directory
//! root so that the rename stays on one file system.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use super::repos::clone_from_mirror;
use git2::{
    build::CheckoutBuilder, AutotagOption, BranchType, FetchOptions, FetchPrune, Repository,
};

/// Name of the directory under the work directory root that holds the spares.
pub const SPARES_DIR: &str = ".spares";
/// Prefix of a spare that is still being made.
const BUILDING_PREFIX: &str = ".building-";
/// A spare still being made after this long was abandoned (its maker stopped).
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

/// Where spare checkouts are kept, and how many.
#[derive(Clone, Debug)]
pub struct SpareConfig {
    /// Directory holding the spares (on the same file system as the work directories).
    pub root: PathBuf,
    /// Keep at most this many spares (least recently made are removed first); 0 disables.
    pub max: usize,
}

impl SpareConfig {
    fn path(&self, mirror_id: &str) -> PathBuf {
        self.root.join(mirror_id)
    }
}

/// Move the spare of `mirror_id` to `dest` and bring it to `branch` (or the mirror's default
/// branch) as the mirror has it now, waiting first for a spare that is being made. Returns
/// `false`, leaving nothing at `dest`, when there is no spare or it cannot be used; the caller
/// then clones as usual.
pub fn take(
    config: &SpareConfig,
    mirror_id: &str,
    mirror: &Path,
    branch: Option<&str>,
    dest: &Path,
    deadline: Instant,
) -> bool {
    if config.max == 0 {
        return false;
    }
    wait_for_refill(mirror_id, deadline);
    if let Some(parent) = dest.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    if std::fs::rename(config.path(mirror_id), dest).is_err() {
        return false;
    }
    match bring_up_to_date(dest, mirror, branch) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("spare checkout of {mirror_id} not usable: {}", e.message());
            let _ = std::fs::remove_dir_all(dest);
            false
        }
    }
}

/// Fetch the mirror's new objects into the checkout at `dir` and check out `branch`, touching
/// only the files that differ. The result has the same refs a fresh clone would have.
fn bring_up_to_date(dir: &Path, mirror: &Path, branch: Option<&str>) -> Result<(), git2::Error> {
    let repo = Repository::open(dir)?;
    let mut options = FetchOptions::new();
    options
        .prune(FetchPrune::On)
        .download_tags(AutotagOption::All);
    let mirror_text = mirror
        .to_str()
        .ok_or_else(|| git2::Error::from_str("mirror path is not UTF-8"))?;
    // The spare's origin is the mirror it was cloned from; point it at this node's mirror.
    repo.remote_set_url("origin", mirror_text)?;
    repo.find_remote("origin")?.fetch(
        &[
            "+refs/heads/*:refs/remotes/origin/*",
            "+refs/tags/*:refs/tags/*",
        ],
        Some(&mut options),
        None,
    )?;
    let branch = match branch {
        Some(branch) => branch.to_string(),
        None => default_branch(mirror)?,
    };
    let target = repo
        .find_reference(&format!("refs/remotes/origin/{branch}"))
        .map_err(|_| git2::Error::from_str(&format!("no branch {branch}")))?
        .peel_to_commit()?;
    let mut checkout = CheckoutBuilder::new();
    checkout.safe();
    repo.checkout_tree(target.as_object(), Some(&mut checkout))?;
    let local_ref = format!("refs/heads/{branch}");
    repo.reference(&local_ref, target.id(), true, "codex-mesh: checkout")?;
    repo.set_head(&local_ref)?;
    repo.find_branch(&branch, BranchType::Local)?
        .set_upstream(Some(&format!("origin/{branch}")))?;
    for other in repo.branches(Some(BranchType::Local))? {
        let (mut other, _) = other?;
        if other.name()?.is_some_and(|name| name != branch) {
            other.delete()?;
        }
    }
    Ok(())
}

/// The branch the mirror's HEAD names.
fn default_branch(mirror: &Path) -> Result<String, git2::Error> {
    let repo = Repository::open_bare(mirror)?;
    let head = repo.find_reference("HEAD")?;
    head.symbolic_target()
        .ok()
        .flatten()
        .and_then(|t| t.strip_prefix("refs/heads/"))
        .map(str::to_string)
        .ok_or_else(|| git2::Error::from_str("the mirror has no default branch"))
}

/// Make a new spare of `mirror` in the background unless one exists or is being made.
pub fn refill_in_background(config: &SpareConfig, mirror_id: &str, mirror: &Path) {
    if config.max == 0 || config.path(mirror_id).exists() || !claim_refill(mirror_id) {
        return;
    }
    let (config_owned, id, mirror) = (config.clone(), mirror_id.to_string(), mirror.to_owned());
    let spawned = std::thread::Builder::new()
        .name("spare-checkout".into())
        .spawn(move || {
            if let Err(e) = refill(&config_owned, &id, &mirror) {
                tracing::debug!("cannot make a spare checkout of {id}: {e}");
            }
            release_refill(&id);
        });
    if spawned.is_err() {
        release_refill(mirror_id);
    }
}

/// The repositories whose spare is being made, and a signal for when one is done.
struct Refills {
    running: Mutex<HashSet<String>>,
    done: Condvar,
}

fn refills() -> &'static Refills {
    static REFILLS: OnceLock<Refills> = OnceLock::new();
    REFILLS.get_or_init(|| Refills {
        running: Mutex::new(HashSet::new()),
        done: Condvar::new(),
    })
}

fn claim_refill(mirror_id: &str) -> bool {
    refills()
        .running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(mirror_id.to_string())
}

fn release_refill(mirror_id: &str) {
    let refills = refills();
    refills
        .running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(mirror_id);
    refills.done.notify_all();
}

/// Wait (until `deadline` at the latest) for a spare of `mirror_id` that is being made: it
/// was started earlier than any clone this job could start now, and two checkouts of one
/// repository at once would only slow each other down.
fn wait_for_refill(mirror_id: &str, deadline: Instant) {
    let refills = refills();
    let mut running = refills.running.lock().unwrap_or_else(|e| e.into_inner());
    while running.contains(mirror_id) {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return;
        };
        running = match refills.done.wait_timeout(running, left) {
            Ok((guard, _)) => guard,
            Err(e) => e.into_inner().0,
        };
    }
}

/// Clone `mirror` into a temporary directory, then publish it as the spare.
fn refill(config: &SpareConfig, mirror_id: &str, mirror: &Path) -> Result<(), String> {
    // Private to the node: agents get a spare only once it is theirs (renamed into a job).
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.root)
        .map_err(|e| e.to_string())?;
    let building = config.root.join(format!(
        "{BUILDING_PREFIX}{mirror_id}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&building);
    if let Err(e) = clone_from_mirror(mirror, None, &building) {
        let _ = std::fs::remove_dir_all(&building);
        return Err(e);
    }
    if std::fs::rename(&building, config.path(mirror_id)).is_err() {
        // Another spare appeared meanwhile.
        let _ = std::fs::remove_dir_all(&building);
    }
    trim(config);
    Ok(())
}

/// Remove the oldest spares beyond `config.max`, and leftovers of interrupted refills.
fn trim(config: &SpareConfig) {
    let Ok(entries) = std::fs::read_dir(&config.root) else {
        return;
    };
    let mut spares: Vec<(SystemTime, PathBuf)> = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        if name.starts_with(BUILDING_PREFIX) {
            let age = SystemTime::now()
                .duration_since(modified)
                .unwrap_or_default();
            if age > ABANDONED_AFTER {
                let _ = std::fs::remove_dir_all(entry.path());
            }
            continue;
        }
        spares.push((modified, entry.path()));
    }
    spares.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    for (_, path) in spares.into_iter().skip(config.max) {
        let _ = std::fs::remove_dir_all(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::jobs::RepoSpec;
    use crate::runner::repos::{diff_summary, prepare, Checkout, RepoConfig};
    use crate::runner::testing::{entry_names, git};
    use std::os::unix::fs::MetadataExt;

    fn commit_file(repo: &Path, name: &str) {
        std::fs::write(repo.join(name), format!("{name}\n")).unwrap();
        git(repo, &["add", name]);
        git(repo, &["commit", "-qm", name]);
    }

    struct Fixture {
        root: tempfile::TempDir,
        origin: PathBuf,
        config: RepoConfig,
    }

    impl Fixture {
        fn new(max: usize) -> Fixture {
            let root = tempfile::tempdir().unwrap();
            let origin = root.path().join("origin");
            std::fs::create_dir_all(&origin).unwrap();
            git(&origin, &["init", "-q", "-b", "main"]);
            commit_file(&origin, "a.txt");
            let config = RepoConfig {
                mirror_root: root.path().join("mirrors"),
                github_url: String::new(),
                token: None,
                credentials: crate::runner::credentials::CredentialPolicy::default(),
                allow_local: true,
                spares: SpareConfig {
                    root: root.path().join("work").join(SPARES_DIR),
                    max,
                },
            };
            Fixture {
                root,
                origin,
                config,
            }
        }

        fn prepare(&self, job: &str, branch: Option<&str>) -> Result<Checkout, String> {
            let spec = RepoSpec {
                source: self.origin.display().to_string(),
                branch: branch.map(str::to_string),
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            let workdir = self.root.path().join("work").join(job);
            std::fs::create_dir_all(&workdir).unwrap();
            prepare(&[spec], &workdir, &self.config, deadline).map(|mut c| c.remove(0))
        }

        /// Waits for the (single) spare and returns the inode of its `a.txt`.
        fn spare_inode(&self) -> u64 {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let spares: Vec<PathBuf> = std::fs::read_dir(&self.config.spares.root)
                    .map(|d| d.flatten().map(|e| e.path()).collect())
                    .unwrap_or_default();
                let ready: Vec<&PathBuf> = spares
                    .iter()
                    .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                    .collect();
                if let [spare] = ready.as_slice() {
                    if let Ok(meta) = std::fs::metadata(spare.join("a.txt")) {
                        return meta.ino();
                    }
                }
                assert!(Instant::now() < deadline, "no spare appeared: {spares:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn head_and_branches(dir: &Path) -> (String, Vec<String>, String) {
        let repo = Repository::open(dir).unwrap();
        let head = repo.head().unwrap().name().unwrap().to_string();
        let branches = repo
            .branches(Some(BranchType::Local))
            .unwrap()
            .map(|b| b.unwrap().0.name().unwrap().unwrap().to_string())
            .collect();
        let upstream = repo
            .find_branch(head.trim_start_matches("refs/heads/"), BranchType::Local)
            .unwrap()
            .upstream()
            .unwrap()
            .name()
            .unwrap()
            .unwrap()
            .to_string();
        (head, branches, upstream)
    }

    #[test]
    fn the_next_job_takes_the_spare_and_sees_new_commits() {
        let fx = Fixture::new(4);
        let first = fx.prepare("job1", None).unwrap();
        assert!(first.dir.join("a.txt").is_file());
        let spare_inode = fx.spare_inode();

        commit_file(&fx.origin, "b.txt");
        let second = fx.prepare("job2", None).unwrap();
        // The very file of the spare moved into the job: nothing was written again.
        assert_eq!(
            std::fs::metadata(second.dir.join("a.txt")).unwrap().ino(),
            spare_inode
        );
        assert!(second.dir.join("b.txt").is_file(), "new commit checked out");
        assert_eq!(
            head_and_branches(&second.dir),
            (
                "refs/heads/main".to_string(),
                vec!["main".to_string()],
                "origin/main".to_string()
            )
        );
        let repo = Repository::open(&second.dir).unwrap();
        assert_eq!(
            repo.find_remote("origin").unwrap().url().ok(),
            Some(fx.origin.display().to_string().as_str()),
            "the agent sees the real remote"
        );
        assert!(
            diff_summary(&second).unwrap().files.is_empty(),
            "clean tree"
        );

        // A branch job switches the spare to that branch.
        git(&fx.origin, &["checkout", "-q", "-b", "dev"]);
        commit_file(&fx.origin, "c.txt");
        git(&fx.origin, &["checkout", "-q", "main"]);
        let spare_inode = fx.spare_inode();
        let third = fx.prepare("job3", Some("dev")).unwrap();
        assert_eq!(
            std::fs::metadata(third.dir.join("a.txt")).unwrap().ino(),
            spare_inode
        );
        assert!(third.dir.join("c.txt").is_file());
        assert_eq!(
            head_and_branches(&third.dir),
            (
                "refs/heads/dev".to_string(),
                vec!["dev".to_string()],
                "origin/dev".to_string()
            )
        );
        assert!(diff_summary(&third).unwrap().files.is_empty());
    }

    #[test]
    fn an_unknown_branch_fails_with_a_reason_even_with_a_spare() {
        let fx = Fixture::new(4);
        fx.prepare("job1", None).unwrap();
        fx.spare_inode();
        let err = fx.prepare("job2", Some("no-such-branch")).unwrap_err();
        assert!(err.contains("no-such-branch"), "{err}");
        assert!(!fx.root.path().join("work/job2/origin").exists());
    }

    #[test]
    fn spares_are_off_with_max_zero_and_trimmed_to_max() {
        let off = Fixture::new(0);
        off.prepare("job1", None).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(!off.config.spares.root.exists());

        let root = tempfile::tempdir().unwrap();
        let config = SpareConfig {
            root: root.path().to_path_buf(),
            max: 2,
        };
        for (i, name) in ["old", "mid", "new"].iter().enumerate() {
            std::fs::create_dir_all(root.path().join(name)).unwrap();
            let when = SystemTime::now() - Duration::from_secs(100 - i as u64 * 10);
            std::fs::File::open(root.path().join(name))
                .unwrap()
                .set_modified(when)
                .unwrap();
        }
        std::fs::create_dir_all(root.path().join(format!("{BUILDING_PREFIX}x-1"))).unwrap();
        trim(&config);
        assert_eq!(
            entry_names(root.path()),
            [format!("{BUILDING_PREFIX}x-1"), "mid".into(), "new".into()]
        );
    }
}
