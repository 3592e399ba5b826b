//! Getting a job's repositories into its work directory with git2. Each remote is kept as a
//! bare mirror in the node's cache; a job fetches only what changed into the mirror, then
//! clones from it locally. Tokens go through the credentials callback only, never into a URL
//! that is stored or logged. Also: the per-repository diff summary at the end of a job.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use git2::{
    build::RepoBuilder, Cred, DiffOptions, FetchOptions, Patch, RemoteCallbacks, Repository,
};

use crate::proto::jobs::{FileDiff, RepoDiff, RepoSpec};
use crate::proto::repo_spec::{repo_kind, RepoKind};

use super::credentials::CredentialPolicy;
use super::spares::{self, SpareConfig};
use crate::secret::Secret;

/// How this node fetches repositories.
#[derive(Clone, Debug)]
pub struct RepoConfig {
    /// Where bare mirrors are cached.
    pub mirror_root: PathBuf,
    /// Base URL for `owner/name` repositories.
    pub github_url: String,
    /// Token for https remotes (sent through the credentials callback only).
    pub token: Option<Secret<String>>,
    /// Which servers may receive the token.
    pub credentials: CredentialPolicy,
    /// Whether jobs may name local paths.
    pub allow_local: bool,
    /// Ready-made checkouts for the next job on a repository.
    pub spares: SpareConfig,
}

/// A repository checked out for a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkout {
    /// The repository as given in the spec.
    pub source: String,
    /// Its directory inside the work directory.
    pub dir: PathBuf,
}

/// The URL to fetch `spec` from, or why it is refused here.
pub fn remote_url(spec: &RepoSpec, config: &RepoConfig) -> Result<String, String> {
    match repo_kind(&spec.source)? {
        RepoKind::GitHub => Ok(format!(
            "{}/{}.git",
            config.github_url.trim_end_matches('/'),
            spec.source
        )),
        RepoKind::Url => Ok(spec.source.clone()),
        RepoKind::LocalPath if config.allow_local => Ok(spec.source.clone()),
        RepoKind::LocalPath => Err(format!(
            "{}: local repository paths are not allowed on this node (its operator can allow them with --allow-local-repos)",
            spec.source
        )),
    }
}

/// Directory name for a repository: its last path segment without `.git`.
fn dir_name(source: &str) -> String {
    let last = source
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or("repo");
    let name = last.strip_suffix(".git").unwrap_or(last);
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() || clean.starts_with('.') {
        "repo".into()
    } else {
        clean
    }
}

/// Process-wide git settings for job preparation. Objects are not hashed again each time
/// they are read: every object in a mirror was hashed by the indexer when it was fetched, so
/// checking it again on each checkout only costs time (about a third of a large checkout).
pub fn tune_git() {
    git2::opts::strict_hash_verification(false);
}

fn mirror_lock(path: &Path) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    locks.entry(path.to_path_buf()).or_default().clone()
}

fn callbacks<'a>(config: &'a RepoConfig, deadline: Instant) -> RemoteCallbacks<'a> {
    let mut callbacks = RemoteCallbacks::new();
    let mut tried = false;
    callbacks.credentials(move |url, _user, _allowed| {
        // Called again only after the server refused the previous credentials: stop then.
        if tried {
            return Err(git2::Error::from_str("the server refused the credentials"));
        }
        tried = true;
        match &config.token {
            // The URL is the server asking (after any redirect): the token goes only where
            // the operator said it may.
            Some(token) if config.credentials.allows(url) => {
                Cred::userpass_plaintext("x-access-token", token.expose())
            }
            Some(_) => Err(git2::Error::from_str(
                "the repository needs credentials, and this node sends its token only to the --github-url host and --credential-hosts over https",
            )),
            None => Err(git2::Error::from_str(
                "the repository needs credentials and none are configured",
            )),
        }
    });
    callbacks.transfer_progress(move |_| Instant::now() < deadline);
    callbacks
}

/// Short stable name of the mirror (and spare checkout) of `url`.
fn mirror_id(url: &str) -> String {
    blake3::hash(url.as_bytes()).to_hex()[..16].to_string()
}

/// Update (or create) the bare mirror of `url` (named `id`); returns its path.
fn refresh_mirror(
    url: &str,
    id: &str,
    config: &RepoConfig,
    deadline: Instant,
) -> Result<PathBuf, String> {
    let path = config.mirror_root.join(format!("{id}.git"));
    let lock = mirror_lock(&path);
    let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    let repo = match Repository::open_bare(&path) {
        Ok(repo) => repo,
        Err(_) => {
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path)
                .map_err(|e| format!("cannot create the mirror cache: {e}"))?;
            let repo = Repository::init_bare(&path).map_err(|e| e.message().to_string())?;
            repo.remote_with_fetch("origin", url, "+refs/heads/*:refs/heads/*")
                .map_err(|e| e.message().to_string())?;
            repo
        }
    };
    let mut remote = repo
        .find_remote("origin")
        .map_err(|e| e.message().to_string())?;
    let default_branch = {
        let connection = remote
            .connect_auth(
                git2::Direction::Fetch,
                Some(callbacks(config, deadline)),
                None,
            )
            .map_err(|e| e.message().to_string())?;
        connection
            .default_branch()
            .ok()
            .and_then(|b| b.as_str().ok().map(str::to_string))
    };
    let mut options = FetchOptions::new();
    options.remote_callbacks(callbacks(config, deadline));
    options.prune(git2::FetchPrune::On);
    remote
        .fetch(
            &["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
            Some(&mut options),
            None,
        )
        .map_err(|e| e.message().to_string())?;
    if let Some(head) = default_branch {
        let _ = repo.set_head(&head);
    }
    Ok(path)
}

/// Bring every repository of a job into `workdir`, each in its own directory.
pub fn prepare(
    repos: &[RepoSpec],
    workdir: &Path,
    config: &RepoConfig,
    deadline: Instant,
) -> Result<Vec<Checkout>, String> {
    let mut checkouts = Vec::new();
    for spec in repos {
        let url = remote_url(spec, config)?;
        let fail = |e: String| format!("cannot get {}: {e}", spec.source);
        let started = Instant::now();
        let id = mirror_id(&url);
        let mirror = refresh_mirror(&url, &id, config, deadline).map_err(fail)?;
        let fetched = Instant::now();
        let mut name = dir_name(&spec.source);
        let base = name.clone();
        let mut n = 2;
        while checkouts
            .iter()
            .any(|c: &Checkout| c.dir == workdir.join(&name))
        {
            name = format!("{base}-{n}");
            n += 1;
        }
        let dir = workdir.join(&name);
        let from_spare = spares::take(
            &config.spares,
            &id,
            &mirror,
            spec.branch.as_deref(),
            &dir,
            deadline,
        );
        let repo = if from_spare {
            Repository::open(&dir).map_err(|e| fail(e.message().to_string()))?
        } else {
            clone_from_mirror(&mirror, spec.branch.as_deref(), &dir).map_err(fail)?
        };
        // The agent sees the real remote (without credentials), not our cache.
        repo.remote_set_url("origin", &url)
            .map_err(|e| fail(e.message().to_string()))?;
        spares::refill_in_background(&config.spares, &id, &mirror);
        tracing::debug!(
            repo = %spec.source,
            from_spare,
            fetch_ms = (fetched - started).as_millis() as u64,
            checkout_ms = fetched.elapsed().as_millis() as u64,
            "repository prepared"
        );
        checkouts.push(Checkout {
            source: spec.source.clone(),
            dir,
        });
    }
    Ok(checkouts)
}

/// Clone the local `mirror` into `dir`, copying its files instead of packing objects anew.
/// Never hard links: the agent owns its checkout and could otherwise change the mirror's
/// object files, which every later job reads.
pub(super) fn clone_from_mirror(
    mirror: &Path,
    branch: Option<&str>,
    dir: &Path,
) -> Result<Repository, String> {
    let mut builder = RepoBuilder::new();
    builder.clone_local(git2::build::CloneLocal::NoLinks);
    if let Some(branch) = branch {
        builder.branch(branch);
    }
    let mirror_text = mirror.to_str().ok_or("mirror path is not UTF-8")?;
    builder
        .clone(mirror_text, dir)
        .map_err(|e| e.message().to_string())
}

/// Files changed in `checkout` since its HEAD, untracked files included.
pub fn diff_summary(checkout: &Checkout) -> Result<RepoDiff, String> {
    let repo = Repository::open(&checkout.dir).map_err(|e| e.message().to_string())?;
    let head = repo
        .head()
        .and_then(|h| h.peel_to_tree())
        .map_err(|e| e.message().to_string())?;
    let mut options = DiffOptions::new();
    options
        .include_untracked(true)
        .recurse_untracked_dirs(true)
        .show_untracked_content(true);
    let diff = repo
        .diff_tree_to_workdir_with_index(Some(&head), Some(&mut options))
        .map_err(|e| e.message().to_string())?;
    let mut files = Vec::new();
    for index in 0..diff.deltas().len().min(10_000) {
        let Some(delta) = diff.get_delta(index) else {
            continue;
        };
        let path = delta
            .new_file()
            .path()
            .or_else(|| delta.old_file().path())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let (added, removed) = match Patch::from_diff(&diff, index) {
            Ok(Some(patch)) => patch
                .line_stats()
                .map(|(_, a, r)| (a as u32, r as u32))
                .unwrap_or((0, 0)),
            _ => (0, 0),
        };
        files.push(FileDiff {
            path,
            added,
            removed,
        });
    }
    Ok(RepoDiff {
        source: checkout.source.clone(),
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::testing::git;

    fn config(allow_local: bool) -> RepoConfig {
        RepoConfig {
            mirror_root: PathBuf::from("/tmp/m"),
            github_url: "https://github.com".into(),
            token: None,
            credentials: CredentialPolicy::default(),
            allow_local,
            spares: SpareConfig {
                root: PathBuf::from("/tmp/s"),
                max: 0,
            },
        }
    }

    #[test]
    fn urls_and_directory_names() {
        let spec = |s: &str| RepoSpec {
            source: s.into(),
            branch: None,
        };
        assert_eq!(
            remote_url(&spec("o/r"), &config(false)).unwrap(),
            "https://github.com/o/r.git"
        );
        assert!(remote_url(&spec("/srv/r"), &config(false))
            .unwrap_err()
            .contains("not allowed"));
        assert_eq!(
            remote_url(&spec("/srv/r"), &config(true)).unwrap(),
            "/srv/r"
        );
        assert_eq!(dir_name("o/app"), "app");
        assert_eq!(dir_name("https://h/x/lib.git"), "lib");
        assert_eq!(dir_name("git@h:o/tool.git"), "tool");
    }

    #[test]
    fn clones_through_the_mirror_and_summarises_changes() {
        let root = tempfile::tempdir().unwrap();
        let origin = root.path().join("origin");
        std::fs::create_dir_all(&origin).unwrap();
        git(&origin, &["init", "-q", "-b", "main"]);
        std::fs::write(origin.join("a.txt"), "one\ntwo\n").unwrap();
        git(&origin, &["add", "."]);
        git(&origin, &["commit", "-qm", "first"]);
        let config = RepoConfig {
            mirror_root: root.path().join("mirrors"),
            github_url: String::new(),
            token: None,
            credentials: CredentialPolicy::default(),
            allow_local: true,
            spares: SpareConfig {
                root: root.path().join("spares"),
                max: 0,
            },
        };
        let spec = RepoSpec {
            source: origin.display().to_string(),
            branch: None,
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        let work = root.path().join("work");
        let checkouts = prepare(std::slice::from_ref(&spec), &work, &config, deadline).unwrap();
        let dir = &checkouts[0].dir;
        assert_eq!(
            std::fs::read_to_string(dir.join("a.txt")).unwrap(),
            "one\ntwo\n"
        );
        std::fs::write(dir.join("a.txt"), "one\nTWO\nthree\n").unwrap();
        std::fs::write(dir.join("new.txt"), "x\n").unwrap();
        let diff = diff_summary(&checkouts[0]).unwrap();
        let mut files = diff.files.clone();
        files.sort();
        assert_eq!(
            files,
            vec![
                FileDiff {
                    path: "a.txt".into(),
                    added: 2,
                    removed: 1
                },
                FileDiff {
                    path: "new.txt".into(),
                    added: 1,
                    removed: 0
                },
            ]
        );
        // A second job reuses the mirror and sees new commits.
        std::fs::write(origin.join("b.txt"), "b\n").unwrap();
        git(&origin, &["add", "."]);
        git(&origin, &["commit", "-qm", "second"]);
        let again = prepare(&[spec], &root.path().join("work2"), &config, deadline).unwrap();
        assert!(again[0].dir.join("b.txt").exists());
        assert_eq!(
            std::fs::read_dir(root.path().join("mirrors"))
                .unwrap()
                .count(),
            1
        );
    }

    #[test]
    fn an_unreachable_repository_fails_quickly_with_a_reason() {
        let root = tempfile::tempdir().unwrap();
        let config = RepoConfig {
            mirror_root: root.path().join("mirrors"),
            github_url: String::new(),
            token: None,
            credentials: CredentialPolicy::default(),
            allow_local: false,
            spares: SpareConfig {
                root: root.path().join("spares"),
                max: 4,
            },
        };
        let spec = RepoSpec {
            source: "git://127.0.0.1:1/nothing.git".into(),
            branch: None,
        };
        let started = Instant::now();
        let deadline = started + std::time::Duration::from_secs(60);
        let err = prepare(&[spec], root.path(), &config, deadline).unwrap_err();
        assert!(err.contains("cannot get"), "{err}");
    }
}
