//! What a run leaves on disk so that a restarted node knows about it, and how processes of a
//! run are found again.
//!
//! Before the agent starts, the runner writes `<runs_dir>/<job id>.run` ([`RunRecord`]); the
//! moment the agent has exited it writes `<job id>.exit` ([`ExitRecord`]). Both are JSON,
//! written to a temporary file, synced and renamed into place, so a reader sees a whole record
//! or none. The mesh removes them with [`forget_run`] once it has recorded the terminal result.
//!
//! Every agent carries its run's random token in `CODEX_MESH_RUN`; the processes of a run are
//! those whose environment holds it ([`find_run_processes`]), wherever they moved (a new
//! session, a new process group, a new parent). Processes whose `/proc/<pid>/environ` this
//! node may not read (another user's, without the privilege to read them) are not found.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::RunnerConfig;
use crate::proto::jobs::JobStatus;

/// Environment variable with the job id, set for every agent.
pub const JOB_ENV: &str = "CODEX_MESH_JOB_ID";
/// Environment variable with the attempt number, set for every agent.
pub const ATTEMPT_ENV: &str = "CODEX_MESH_ATTEMPT";
/// Environment variable with the run's random token, set for every agent.
pub const RUN_ENV: &str = "CODEX_MESH_RUN";

/// A repository checked out for the run (so its diff can be computed again).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoRecord {
    /// The repository as given in the spec.
    pub source: String,
    /// Its directory inside the work directory.
    pub dir: PathBuf,
}

/// A run as recorded before its agent started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Job id.
    pub job: String,
    /// Attempt number.
    pub attempt: u32,
    /// Assignment `(epoch, seq)` of the run.
    pub assignment: (u64, u64),
    /// The run's token (the agent's `CODEX_MESH_RUN`).
    pub token: String,
    /// The kernel's boot id when the run started (empty when unknown).
    pub boot_id: String,
    /// When the job started on this node (before its preparation), ms since the epoch.
    pub started_unix_ms: u64,
    /// The job's work directory.
    pub workdir: PathBuf,
    /// The repositories checked out for it.
    pub repos: Vec<RepoRecord>,
    /// Whether the agent is Codex (its stdout is Codex JSONL).
    pub codex: bool,
    /// File where the agent writes its last message, if any.
    pub last_message_file: Option<PathBuf>,
    /// The agent's process group, once it started.
    #[serde(default)]
    pub pgid: Option<i32>,
    /// Time spent getting the repositories, in ms.
    #[serde(default)]
    pub prepare_ms: u64,
    /// Size of the job's log before this run wrote to it (earlier attempts' output).
    #[serde(default)]
    pub log_offset: u64,
}

/// How a run's agent ended, recorded the moment it exited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit code, when it exited by itself.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// When it ended, ms since the epoch.
    pub ended_unix_ms: u64,
    /// Set when the node stopped it (cancel, limits): the status and reason it gave.
    #[serde(default)]
    pub stopped: Option<(JobStatus, String)>,
}

/// Path of the run record of `job`.
pub fn run_path(runs_dir: &Path, job: &str) -> PathBuf {
    runs_dir.join(format!("{job}.run"))
}

/// Path of the exit record of `job`.
pub fn exit_path(runs_dir: &Path, job: &str) -> PathBuf {
    runs_dir.join(format!("{job}.exit"))
}

/// Remove the records of `job`'s run (once its terminal result is recorded); blocking.
pub fn forget_run(config: &RunnerConfig, job: &str) {
    // The run record first: an exit record alone is cleaned up at the next start.
    for path in [
        run_path(&config.runs_dir, job),
        exit_path(&config.runs_dir, job),
    ] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
        }
    }
    sync_dir(&config.runs_dir);
}

/// Write `value` as JSON to `path` atomically (temporary file, fsync, rename); blocking.
pub fn write_json(path: &Path, value: &impl Serialize) -> io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
}

/// A new random run token: 128 bits in hex.
pub fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The kernel's boot id, or empty when it cannot be read.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default()
}

/// Now, in ms since the epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A process of a run: its pid and process group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunProcess {
    /// Process id.
    pub pid: i32,
    /// Process group id, when `/proc/<pid>/stat` could be read.
    pub pgid: Option<i32>,
}

/// The live processes whose environment holds `CODEX_MESH_RUN=<token>` (this process
/// excluded); unreadable entries are skipped. Blocking.
pub fn find_run_processes(token: &str) -> Vec<RunProcess> {
    if token.is_empty() {
        return Vec::new();
    }
    let wanted = format!("{RUN_ENV}={token}").into_bytes();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            if pid == me {
                return None;
            }
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            if !environ.split(|&b| b == 0).any(|var| var == wanted) {
                return None;
            }
            Some(RunProcess {
                pid: i32::try_from(pid).ok()?,
                pgid: process_group(&entry.path()),
            })
        })
        .collect()
}

/// The process group in `<proc dir>/stat` (the field after the state).
fn process_group(proc_dir: &Path) -> Option<i32> {
    let stat = std::fs::read_to_string(proc_dir.join("stat")).ok()?;
    // The command name in parentheses may hold spaces and parentheses: skip to the last one.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// SIGKILL every process of the run with `token` (see [`find_run_processes`]), scanning
/// again until none is left (a process may fork while it is being killed), at most a few
/// rounds; returns how many processes were killed. Blocking.
pub fn kill_run_processes(token: &str) -> usize {
    let mut killed = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let found = find_run_processes(token);
        if found.is_empty() {
            break;
        }
        for process in found {
            // SAFETY: kill only sends a signal.
            if unsafe { libc::kill(process.pid, libc::SIGKILL) } == 0 {
                killed.insert(process.pid);
            }
        }
    }
    killed.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_128_random_bits_in_hex() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn records_are_written_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = exit_path(dir.path(), "j1");
        let record = ExitRecord {
            code: Some(0),
            signal: None,
            ended_unix_ms: 5,
            stopped: Some((JobStatus::Cancelled, "cancelled".into())),
        };
        write_json(&path, &record).unwrap();
        let back: ExitRecord = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, record);
        let names = crate::runner::testing::entry_names(dir.path());
        assert_eq!(names, vec!["j1.exit"], "no temporary file is left");
    }

    #[test]
    fn the_process_group_is_read_past_the_command_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stat"), "42 (a) b (c) S 1 4242 4242 0").unwrap();
        assert_eq!(process_group(dir.path()), Some(4242));
        assert_eq!(process_group(&dir.path().join("missing")), None);
    }

    #[test]
    fn processes_of_a_run_are_found_by_their_token_and_killed() {
        use std::io::BufRead;
        let token = new_token();
        // The shell says "ready" once it runs with the new environment (between fork and
        // exec, /proc shows the parent's), then waits on a built-in `read` of its stdin: no
        // further exec or fork that could make the scan see a transient state.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "echo ready; read line"])
            .env(RUN_ENV, &token)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        let pid = i32::try_from(child.id()).unwrap();
        let found = find_run_processes(&token);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].pid, pid);
        assert!(find_run_processes(&new_token()).is_empty());
        assert!(find_run_processes("").is_empty());
        assert_eq!(kill_run_processes(&token), 1);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
