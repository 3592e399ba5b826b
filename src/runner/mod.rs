//! Running one job on this node: a fresh work directory, the agent process in its own process
//! group with a scrubbed environment, its output logged, a wall-clock limit, an idle-output
//! watchdog, cancellation that kills the whole group, and the result reported back.
//!
//! Besides the passed variables, every agent gets three in its environment:
//! `CODEX_MESH_JOB_ID` (the job id), `CODEX_MESH_ATTEMPT` (the attempt number, from 1) and
//! `CODEX_MESH_RUN` (a random 128-bit token in hex, new for each run).
//!
//! Agents do not outlive the node unsupervised. On Linux each agent gets `SIGKILL` when the
//! node dies (`PR_SET_PDEATHSIG`; in bubblewrap, `--die-with-parent`). That reaches the agent
//! itself, not processes it started that left its reach (a new session, for one): those carry
//! the run's token, and are killed by a token scan of `/proc` when a run is cancelled or
//! stopped by a limit, and when the node starts again ([`recovery::recover`]). The run is
//! recorded in `runs_dir` before the agent starts and its exit status the moment it exits
//! ([`leftovers`]), so a node that died in between reports the result after its restart.

pub mod agent;
pub mod credentials;
pub mod events;
pub mod isolation;
pub mod leftovers;
pub mod logs;
pub mod output;
pub mod recovery;
pub mod repos;
pub mod retention;
pub mod spares;
#[cfg(test)]
mod testing;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::watch;

use crate::proto::jobs::{
    CommandRun, JobResult, JobSpec, JobStatus, RepoDiff, MAX_RESULT_COMMANDS,
};
use agent::{Agents, PASSED_ENV};
use events::Summary;
use leftovers::{ExitRecord, RepoRecord, RunRecord, ATTEMPT_ENV, JOB_ENV, RUN_ENV};
use repos::{diff_summary, prepare, Checkout, RepoConfig};

pub use leftovers::{forget_run, kill_run_processes};
pub use recovery::{recover, Recovered};

/// Where and how this node runs jobs.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Parent of the per-job work directories.
    pub workdir_root: PathBuf,
    /// Where job logs are kept.
    pub log_dir: PathBuf,
    /// Where runs are recorded while they go on (private to the node; see [`leftovers`]).
    pub runs_dir: PathBuf,
    /// Largest log file of one job, in bytes (`--max-log-mb`); output beyond is dropped.
    pub max_log_bytes: u64,
    /// The agents this node can run.
    pub agents: Agents,
    /// How repositories are fetched.
    pub repos: RepoConfig,
    /// Which work directories are kept.
    pub retention: retention::Retention,
    /// Environment variables passed to agents besides [`PASSED_ENV`] (operator's choice).
    pub pass_env: Vec<String>,
    /// Which user agents run as and what they can see (`--agent-user`, `--bwrap`).
    pub isolation: isolation::Isolation,
    /// Jobs running now (their work directories are never cleaned).
    pub active: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl RunnerConfig {
    /// Whether this node takes a job of agent `name` now, or why not.
    pub fn check(&self, name: &str) -> Result<(), String> {
        self.isolation.check()?;
        self.agents.check(name)
    }
}

/// A status change of a running job, for the mesh task to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobUpdate {
    /// Job id.
    pub id: String,
    /// Attempt.
    pub attempt: u32,
    /// Assignment `(epoch, seq)` this run belongs to.
    pub assignment: (u64, u64),
    /// New status.
    pub status: JobStatus,
    /// Why (failures, timeouts).
    pub reason: Option<String>,
    /// Result, when finished.
    pub result: Option<JobResult>,
}

/// Handle to a running job.
pub struct RunHandle {
    cancel: watch::Sender<bool>,
}

impl RunHandle {
    /// Kill the agent (its whole process group).
    pub fn cancel(&self) {
        let _ = self.cancel.send(true);
    }
}

/// Start running `spec` (attempt, assignment) in the background; `report` receives every
/// status change, the last one terminal.
pub fn start(
    spec: JobSpec,
    attempt: u32,
    assignment: (u64, u64),
    config: Arc<RunnerConfig>,
    report: impl Fn(JobUpdate) + Send + Sync + 'static,
) -> RunHandle {
    let (cancel, cancelled) = watch::channel(false);
    tokio::spawn(async move {
        let update = |status, reason: Option<String>, result| JobUpdate {
            id: spec.id.clone(),
            attempt,
            assignment,
            status,
            reason,
            result,
        };
        let started = Instant::now();
        let started_unix_ms = leftovers::now_unix_ms();
        if let Ok(mut active) = config.active.lock() {
            active.insert(spec.id.clone());
        }
        report(update(JobStatus::Preparing, None, None));
        let this = ThisRun {
            spec: &spec,
            attempt,
            assignment,
            started_unix_ms,
        };
        let outcome = run(this, &config, cancelled, &|status| {
            report(update(status, None, None))
        })
        .await;
        let (status, reason, mut result) = outcome;
        result.duration_ms = started.elapsed().as_millis() as u64;
        let workdir = config.workdir_root.join(&spec.id);
        if status != JobStatus::Succeeded && workdir.is_dir() {
            let _ = isolation::write_marker(&workdir.join(retention::FAILED_MARKER)).await;
        }
        report(update(status, reason, Some(result)));
        let running: Vec<String> = match config.active.lock() {
            Ok(mut active) => {
                active.remove(&spec.id);
                active.iter().cloned().collect()
            }
            Err(_) => Vec::new(),
        };
        let (root, policy) = (config.workdir_root.clone(), config.retention);
        let _ =
            tokio::task::spawn_blocking(move || retention::clean(&root, policy, &running)).await;
    });
    RunHandle { cancel }
}

type Outcome = (JobStatus, Option<String>, JobResult);

fn failed(reason: String) -> Outcome {
    (JobStatus::Failed, Some(reason), JobResult::default())
}

enum Ending {
    Exited(std::process::ExitStatus),
    WallClock,
    Idle,
    Cancelled,
}

/// Which run [`run`] runs.
#[derive(Clone, Copy)]
struct ThisRun<'a> {
    spec: &'a JobSpec,
    attempt: u32,
    assignment: (u64, u64),
    started_unix_ms: u64,
}

async fn run(
    this: ThisRun<'_>,
    config: &RunnerConfig,
    mut cancelled: watch::Receiver<bool>,
    progress: &(dyn Fn(JobStatus) + Send + Sync),
) -> Outcome {
    let spec = this.spec;
    if let Err(why) = config.isolation.check() {
        return failed(why);
    }
    let workdir = config.workdir_root.join(&spec.id);
    let _ = tokio::fs::remove_dir_all(&workdir).await;
    if let Err(e) = config.isolation.create_job_dir(&workdir).await {
        return failed(format!(
            "cannot create the work directory {}: {e}",
            workdir.display()
        ));
    }
    let deadline_at = Instant::now() + Duration::from_secs(spec.timeout_secs.into());
    let preparing = Instant::now();
    let checkouts: Vec<Checkout> = if spec.repos.is_empty() {
        Vec::new()
    } else {
        let (repos, dir, repo_config) = (spec.repos.clone(), workdir.clone(), config.repos.clone());
        let prepared =
            tokio::task::spawn_blocking(move || prepare(&repos, &dir, &repo_config, deadline_at))
                .await;
        match prepared {
            Ok(Ok(checkouts)) => checkouts,
            Ok(Err(e)) => return failed(e),
            Err(e) => return failed(format!("preparing the repositories crashed: {e}")),
        }
    };
    if let Err(e) = config.isolation.hand_over(&workdir).await {
        return failed(format!(
            "cannot give the work directory {} to the agent user: {e}",
            workdir.display()
        ));
    }
    let prepare_ms = preparing.elapsed().as_millis() as u64;
    let invocation = match config.agents.invocation(spec, &workdir) {
        Ok(i) => i,
        Err(e) => return failed(e),
    };
    let _ = tokio::fs::create_dir_all(&config.log_dir).await;
    let log_path = config.log_dir.join(format!("{}.log", spec.id));
    let log_offset = tokio::fs::metadata(&log_path)
        .await
        .map_or(0, |meta| meta.len());
    let log = match output::JobLog::open(&log_path, config.max_log_bytes).await {
        Ok(log) => log,
        Err(e) => {
            return failed(format!(
                "cannot open the job log {}: {e}",
                log_path.display()
            ))
        }
    };
    let token = leftovers::new_token();
    let mut record = RunRecord {
        job: spec.id.clone(),
        attempt: this.attempt,
        assignment: this.assignment,
        token: token.clone(),
        boot_id: leftovers::boot_id(),
        started_unix_ms: this.started_unix_ms,
        workdir: workdir.clone(),
        repos: checkouts
            .iter()
            .map(|c| RepoRecord {
                source: c.source.clone(),
                dir: c.dir.clone(),
            })
            .collect(),
        codex: invocation.codex_events,
        last_message_file: invocation.last_message_file.clone(),
        pgid: None,
        prepare_ms,
        log_offset,
    };
    if let Err(e) = save_run(config, &record).await {
        return failed(format!(
            "cannot record the run in {}: {e}",
            config.runs_dir.display()
        ));
    }
    let argv = config.isolation.wrap(&invocation.argv);
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .current_dir(&invocation.cwd)
        .env_clear()
        .envs(
            PASSED_ENV
                .iter()
                .copied()
                .chain(config.pass_env.iter().map(String::as_str))
                .filter_map(|k| std::env::var_os(k).map(|v| (k, v))),
        )
        .env(JOB_ENV, &spec.id)
        .env(ATTEMPT_ENV, this.attempt.to_string())
        .env(RUN_ENV, &token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    config.isolation.apply(&mut command);
    #[cfg(unix)]
    command.process_group(0);
    die_with_node(&mut command);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return failed(format!(
                "cannot start the agent {:?}: {e}",
                invocation.argv[0]
            ))
        }
    };
    let pid = child.id();
    record.pgid = pid.and_then(|p| i32::try_from(p).ok());
    if let Err(e) = save_run(config, &record).await {
        tracing::warn!("cannot record the process group of job {}: {e}", spec.id);
    }
    progress(JobStatus::Running);
    let mut chunks = output::spawn_readers(child.stdout.take(), child.stderr.take());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(spec.timeout_secs.into());
    let idle = Duration::from_secs(spec.idle_timeout_secs.into());
    let mut idle_deadline = tokio::time::Instant::now() + idle;
    let mut output = output::Output::new(invocation.codex_events, log);
    let mut streams_open = true;
    let ending = loop {
        tokio::select! {
            chunk = chunks.recv(), if streams_open => match chunk {
                Some((is_stdout, chunk)) => {
                    idle_deadline = tokio::time::Instant::now() + idle;
                    output.take(is_stdout, &chunk).await;
                }
                None => streams_open = false,
            },
            status = child.wait() => match status {
                Ok(status) => break Ending::Exited(status),
                Err(e) => return failed(format!("lost track of the agent process: {e}")),
            },
            _ = tokio::time::sleep_until(deadline) => break Ending::WallClock,
            _ = tokio::time::sleep_until(idle_deadline) => break Ending::Idle,
            changed = cancelled.changed() => {
                if changed.is_err() || *cancelled.borrow() {
                    break Ending::Cancelled;
                }
            }
        }
    };
    let stopped = stopped_by_node(&ending, spec);
    let exited = match ending {
        Ending::Exited(status) => {
            // Whatever the agent left running in the background ends with it.
            kill_group(pid);
            let token = token.clone();
            let _ = tokio::task::spawn_blocking(move || kill_run_processes(&token)).await;
            Some(status)
        }
        _ => {
            kill_group(pid);
            let token = token.clone();
            let _ = tokio::task::spawn_blocking(move || kill_run_processes(&token)).await;
            child.wait().await.ok()
        }
    };
    save_exit(config, &spec.id, exited, stopped.clone()).await;
    // Collect what the agent printed before it ended.
    while let Ok(Some((is_stdout, chunk))) =
        tokio::time::timeout(Duration::from_millis(200), chunks.recv()).await
    {
        output.take(is_stdout, &chunk).await;
    }
    let output::Collected {
        summary,
        last_stdout,
        log_capped,
    } = output.finish().await;
    // The exit is recorded and the log complete: a node that dies from here on reports the
    // result after its restart.
    crate::faults::point("agent-exited");
    let from_file = match &invocation.last_message_file {
        Some(path) => isolation::read_agent_file(path)
            .await
            .filter(|t| !t.trim().is_empty()),
        None => None,
    };
    let diffs = tokio::task::spawn_blocking(move || diffs_of(&checkouts))
        .await
        .unwrap_or_default();
    let mut result = build_result(&summary, last_stdout, from_file, diffs, prepare_ms);
    let (status, reason) = match (stopped, exited) {
        (Some((status, why)), _) => (status, Some(why)),
        (None, status) => {
            result.exit_code = status.and_then(|s| s.code());
            exit_outcome(&summary, result.exit_code)
        }
    };
    (status, with_log_note(reason, log_capped), result)
}

/// Status and reason of an agent that exited by itself with `code` (`None`: a signal).
fn exit_outcome(summary: &Summary, code: Option<i32>) -> (JobStatus, Option<String>) {
    if code == Some(0) {
        return (JobStatus::Succeeded, None);
    }
    let why = summary.error.clone().unwrap_or_else(|| match code {
        Some(code) => format!("the agent exited with code {code}"),
        None => "the agent was killed by a signal".into(),
    });
    (JobStatus::Failed, Some(why))
}

/// The status and reason of a run the node stopped (cancel, limits); `None` if it exited.
fn stopped_by_node(ending: &Ending, spec: &JobSpec) -> Option<(JobStatus, String)> {
    match ending {
        Ending::Exited(_) => None,
        Ending::WallClock => Some((
            JobStatus::TimedOut,
            format!("stopped after the time limit of {} s", spec.timeout_secs),
        )),
        Ending::Idle => Some((
            JobStatus::TimedOut,
            format!(
                "stopped: no output from the agent for {} s",
                spec.idle_timeout_secs
            ),
        )),
        Ending::Cancelled => Some((JobStatus::Cancelled, "cancelled".into())),
    }
}

/// Say so when the log limit dropped output (the job's outcome does not change).
fn with_log_note(reason: Option<String>, log_capped: Option<String>) -> Option<String> {
    match (reason, log_capped) {
        (Some(why), Some(capped)) => Some(format!("{why}; the log is incomplete: {capped}")),
        (None, Some(capped)) => Some(format!("the log is incomplete: {capped}")),
        (reason, None) => reason,
    }
}

/// The diff summaries of `checkouts` (those that can be computed); blocking.
fn diffs_of(checkouts: &[Checkout]) -> Vec<RepoDiff> {
    checkouts
        .iter()
        .filter_map(|c| diff_summary(c).ok())
        .collect()
}

/// The result of a run from what its output came to (exit code and duration left unset).
fn build_result(
    summary: &Summary,
    last_stdout: Option<String>,
    from_file: Option<String>,
    diffs: Vec<RepoDiff>,
    prepare_ms: u64,
) -> JobResult {
    let commands = summary
        .commands
        .iter()
        .take(MAX_RESULT_COMMANDS)
        .map(|(command, exit_code)| {
            let mut command = command.clone();
            truncate_utf8(&mut command, 512);
            CommandRun {
                command,
                exit_code: *exit_code,
            }
        })
        .collect();
    let mut final_message = from_file.or(summary.last_message.clone()).or(last_stdout);
    if let Some(message) = &mut final_message {
        truncate_utf8(message, 64 * 1024);
    }
    JobResult {
        commands,
        exit_code: None,
        final_message,
        diffs,
        usage: summary.usage.clone(),
        duration_ms: 0,
        prepare_ms,
    }
}

/// Write the run record (blocking work off the runtime).
async fn save_run(config: &RunnerConfig, record: &RunRecord) -> std::io::Result<()> {
    let (path, record) = (
        leftovers::run_path(&config.runs_dir, &record.job),
        record.clone(),
    );
    tokio::task::spawn_blocking(move || leftovers::write_json(&path, &record))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

/// Write the exit record of `job` (`None`: its exit status is unknown).
async fn save_exit(
    config: &RunnerConfig,
    job: &str,
    status: Option<std::process::ExitStatus>,
    stopped: Option<(JobStatus, String)>,
) {
    #[cfg(unix)]
    use std::os::unix::process::ExitStatusExt;
    let record = ExitRecord {
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        ended_unix_ms: leftovers::now_unix_ms(),
        stopped,
    };
    let path = leftovers::exit_path(&config.runs_dir, job);
    let shown = path.display().to_string();
    let written = tokio::task::spawn_blocking(move || leftovers::write_json(&path, &record)).await;
    if !matches!(written, Ok(Ok(()))) {
        tracing::warn!("cannot record the agent's exit in {shown}");
    }
}

/// Have the agent killed when the node dies (Linux): `PR_SET_PDEATHSIG`, set in the child
/// after std has switched its user (a change of credentials clears it), and an exit right
/// there if the node is already gone. The signal follows the thread that started the child;
/// agents are started from the runtime's worker threads, which live as long as the node.
fn die_with_node(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (prctl, getppid, _exit); it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                let signal = libc::SIGKILL as libc::c_ulong;
                if libc::prctl(libc::PR_SET_PDEATHSIG, signal, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

fn truncate_utf8(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// Kill the agent's whole process group (it may have started children).
fn kill_group(pid: Option<u32>) {
    #[cfg(unix)]
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: killpg only sends a signal; the group was created for this child.
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
        }
    }
}
