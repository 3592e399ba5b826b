//! What a node that starts again makes of the runs it had going when it stopped.
//!
//! For each run record left in the runs directory ([`super::leftovers`]) the processes of the
//! run that are still alive are killed, and the run is either finished from its exit record
//! (the agent had exited: status, final message, usage, commands and diffs rebuilt from the
//! records, the log and the work directory) or reported without an outcome (the node died
//! while the agent ran). The records are left for the mesh to remove once it has recorded the
//! result ([`super::forget_run`]), so recovering twice gives the same answer.

use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::events::{parse_line, Summary};
use super::leftovers::{
    self, exit_path, find_run_processes, kill_run_processes, ExitRecord, RunRecord,
};
use super::output::{LineSplitter, Piece, MAX_LINE_BYTES, READ_CHUNK_BYTES};
use super::repos::Checkout;
use super::{build_result, diffs_of, exit_outcome, with_log_note, Outcome, RunnerConfig};
use crate::proto::jobs::JobStatus;

/// What the reason of a recovered result says (alone, or after the agent's own reason).
pub const RECOVERED: &str = "recovered after the node restarted";

/// Prefix of stderr lines in a job log.
const STDERR_PREFIX: &[u8] = b"[stderr] ";
/// Prefix of the node's own notes in a job log.
const NOTE_PREFIX: &[u8] = b"[codex-mesh] ";

/// A run found at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// Job id.
    pub id: String,
    /// Attempt number.
    pub attempt: u32,
    /// Assignment `(epoch, seq)` of the run.
    pub assignment: (u64, u64),
    /// Status, reason and result when the agent had exited; `None` when it was still running.
    pub outcome: Option<(JobStatus, Option<String>, crate::proto::jobs::JobResult)>,
}

/// Kill what is left of the runs recorded in `config.runs_dir` and say how each ended.
/// Blocking; called once at start, before the mesh runs. Unreadable records are logged and
/// removed.
pub fn recover(config: &RunnerConfig) -> Vec<Recovered> {
    recover_in(&config.runs_dir, &config.log_dir, config.max_log_bytes)
}

/// [`recover`] with the runs in `runs_dir` and their logs in `log_dir`.
fn recover_in(runs_dir: &Path, log_dir: &Path, max_log_bytes: u64) -> Vec<Recovered> {
    let entries = match std::fs::read_dir(runs_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!("cannot read the runs in {}: {e}", runs_dir.display());
            return Vec::new();
        }
    };
    let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    let mut recovered = Vec::new();
    for path in paths {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(job) = name.strip_suffix(".run") {
            match recover_run(&path, job, runs_dir, log_dir, max_log_bytes) {
                Ok(run) => recovered.push(run),
                Err(why) => {
                    tracing::warn!(
                        "removing the unreadable run record {}: {why}",
                        path.display()
                    );
                    remove(&path);
                    remove(&exit_path(runs_dir, job));
                }
            }
        } else if name.ends_with(".tmp") {
            remove(&path);
        } else if let Some(job) = name.strip_suffix(".exit") {
            if !leftovers::run_path(runs_dir, job).exists() {
                remove(&path);
            }
        }
    }
    recovered
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

fn recover_run(
    path: &Path,
    job: &str,
    runs_dir: &Path,
    log_dir: &Path,
    max_log_bytes: u64,
) -> Result<Recovered, String> {
    let record: RunRecord = read_json(path)?;
    if record.job != job {
        return Err(format!("it records job {:?}", record.job));
    }
    let killed = kill_leftovers(&record);
    if killed > 0 {
        tracing::info!("killed {killed} leftover process(es) of job {job}");
    }
    let exit_file = exit_path(runs_dir, job);
    let exit = match read_json::<ExitRecord>(&exit_file) {
        Ok(exit) => Some(exit),
        Err(_) if !exit_file.exists() => None,
        Err(why) => {
            tracing::warn!(
                "ignoring the unreadable exit record {}: {why}",
                exit_file.display()
            );
            None
        }
    };
    let log = super::logs::log_path(log_dir, job);
    Ok(Recovered {
        id: record.job.clone(),
        attempt: record.attempt,
        assignment: record.assignment,
        outcome: exit.map(|exit| outcome(&record, &exit, &log, max_log_bytes)),
    })
}

/// Kill every process of the run: its process group when it is still that run's (same boot,
/// and a process of the group carries the token), and every process with its token.
fn kill_leftovers(record: &RunRecord) -> usize {
    let found = find_run_processes(&record.token);
    let mut killed = 0;
    if let Some(pgid) = record.pgid.filter(|&pgid| pgid > 1) {
        let same_boot = !record.boot_id.is_empty() && record.boot_id == leftovers::boot_id();
        if same_boot && found.iter().any(|p| p.pgid == Some(pgid)) {
            // SAFETY: killpg only sends a signal, to a group shown to belong to the run.
            if unsafe { libc::killpg(pgid, libc::SIGKILL) } == 0 {
                killed += found.iter().filter(|p| p.pgid == Some(pgid)).count();
            }
        }
    }
    let rest = kill_run_processes(&record.token);
    killed.max(rest)
}

/// The outcome of a run whose agent exited, from its records and its log at `log`.
fn outcome(record: &RunRecord, exit: &ExitRecord, log: &Path, max_log_bytes: u64) -> Outcome {
    let replay = replay_log(log, record.log_offset, record.codex, max_log_bytes);
    let from_file = record
        .last_message_file
        .as_deref()
        .and_then(|path| super::isolation::read_agent_file_blocking(path).ok())
        .filter(|text| !text.trim().is_empty());
    let checkouts: Vec<Checkout> = record
        .repos
        .iter()
        .map(|repo| Checkout {
            source: repo.source.clone(),
            dir: repo.dir.clone(),
        })
        .collect();
    let mut result = build_result(
        &replay.summary,
        replay.last_stdout,
        from_file,
        diffs_of(&checkouts),
        record.prepare_ms,
    );
    result.duration_ms = exit.ended_unix_ms.saturating_sub(record.started_unix_ms);
    let (status, reason) = match &exit.stopped {
        Some((status, why)) => (*status, Some(why.clone())),
        None => {
            result.exit_code = exit.code;
            exit_outcome(&replay.summary, exit.code)
        }
    };
    let reason = match with_log_note(reason, replay.capped) {
        Some(why) => format!("{why}; {RECOVERED}"),
        None => RECOVERED.to_string(),
    };
    (status, Some(reason), result)
}

/// What a run's part of its log says, read again.
#[derive(Debug, Default)]
struct Replay {
    summary: Summary,
    last_stdout: Option<String>,
    capped: Option<String>,
}

/// Parse the agent's stdout lines in the log from `offset`, as the runner did when it ran
/// (Codex events, or the last non-blank line); at most `max` bytes are read.
fn replay_log(path: &Path, offset: u64, codex: bool, max: u64) -> Replay {
    let mut replay = Replay::default();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let Ok(mut file) = file else {
        return replay;
    };
    if file.seek(SeekFrom::Start(offset)).is_err() {
        return replay;
    }
    let mut file = file.take(max);
    let mut splitter = LineSplitter::new(MAX_LINE_BYTES);
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        splitter.push(&buf[..n], |piece| replay.piece(piece, codex));
    }
    splitter.finish(|piece| replay.piece(piece, codex));
    replay
}

impl Replay {
    fn piece(&mut self, piece: Piece<'_>, codex: bool) {
        let line = match piece {
            Piece::Line(line) | Piece::LongEnd(line) => line,
            Piece::LongStart(_) | Piece::LongMore(_) => return,
        };
        if line.starts_with(STDERR_PREFIX) {
            return;
        }
        if let Some(note) = line.strip_prefix(NOTE_PREFIX) {
            self.capped = Some(String::from_utf8_lossy(note).into_owned());
            return;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text = String::from_utf8_lossy(line);
        if codex {
            if let Some(event) = parse_line(&text) {
                self.summary.add(event);
            }
        } else if !text.trim().is_empty() {
            self.last_stdout = Some(text.into_owned());
        }
    }
}

#[cfg(test)]
#[path = "recovery_tests.rs"]
mod tests;
