//! Cleaning up work directories: keep the most recent ones, drop those past a maximum age,
//! and optionally keep the ones of failed jobs for inspection.

use std::path::Path;
use std::time::{Duration, SystemTime};

/// Marker file left in the work directory of a job that did not succeed.
pub const FAILED_MARKER: &str = ".codex-mesh-failed";

/// How many work directories to keep, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most this many (newest first).
    pub keep: usize,
    /// Remove any older than this.
    pub max_age: Duration,
    /// Never remove those of jobs that did not succeed.
    pub keep_failed: bool,
}

/// One existing work directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkDir {
    /// Its name (the job id).
    pub name: String,
    /// Last modification.
    pub modified: SystemTime,
    /// The job did not succeed.
    pub failed: bool,
}

/// The directories to remove under `policy` at time `now`; `running` ones are never removed.
pub fn to_remove(
    mut dirs: Vec<WorkDir>,
    policy: Retention,
    now: SystemTime,
    running: &[String],
) -> Vec<String> {
    dirs.retain(|d| !running.contains(&d.name));
    dirs.sort_by(|a, b| b.modified.cmp(&a.modified).then(a.name.cmp(&b.name)));
    dirs.into_iter()
        .enumerate()
        .filter(|(index, dir)| {
            let too_old = now.duration_since(dir.modified).unwrap_or_default() > policy.max_age;
            let over_count = *index >= policy.keep;
            (too_old || over_count) && !(policy.keep_failed && dir.failed)
        })
        .map(|(_, dir)| dir.name)
        .collect()
}

/// Apply `policy` to the work directories under `root`.
pub fn clean(root: &Path, policy: Retention, running: &[String]) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let dirs: Vec<WorkDir> = entries
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        // Hidden entries (such as the spare checkouts) are not work directories.
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            Some(WorkDir {
                name: e.file_name().to_str()?.to_string(),
                modified: e.metadata().and_then(|m| m.modified()).ok()?,
                failed: e.path().join(FAILED_MARKER).exists(),
            })
        })
        .collect();
    for name in to_remove(dirs, policy, SystemTime::now(), running) {
        if let Err(e) = std::fs::remove_dir_all(root.join(&name)) {
            tracing::warn!("cannot remove work directory {name}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str, age_secs: u64, failed: bool, now: SystemTime) -> WorkDir {
        WorkDir {
            name: name.into(),
            modified: now - Duration::from_secs(age_secs),
            failed,
        }
    }

    #[test]
    fn keeps_the_newest_and_drops_the_old_but_not_failed_or_running_ones() {
        let now = SystemTime::now();
        let policy = Retention {
            keep: 2,
            max_age: Duration::from_secs(1000),
            keep_failed: true,
        };
        let dirs = vec![
            dir("a", 10, false, now),
            dir("b", 20, false, now),
            dir("c", 30, false, now),
            dir("d", 40, true, now),
            dir("e", 5000, false, now),
            dir("f", 50, false, now),
        ];
        let mut removed = to_remove(dirs.clone(), policy, now, &["f".into()]);
        removed.sort();
        assert_eq!(removed, vec!["c", "e"]);
        let strict = Retention {
            keep_failed: false,
            ..policy
        };
        let mut removed = to_remove(dirs, strict, now, &[]);
        removed.sort();
        assert_eq!(removed, vec!["c", "d", "e", "f"]);
    }

    #[test]
    fn cleaning_leaves_hidden_entries_such_as_the_spares_alone() {
        let root = tempfile::tempdir().unwrap();
        for name in [".spares", "job-a", "job-b"] {
            std::fs::create_dir_all(root.path().join(name)).unwrap();
        }
        let policy = Retention {
            keep: 0,
            max_age: Duration::from_secs(1000),
            keep_failed: false,
        };
        clean(root.path(), policy, &["job-b".into()]);
        assert_eq!(
            crate::runner::testing::entry_names(root.path()),
            [".spares", "job-b"]
        );
    }
}
