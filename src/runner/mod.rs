//! Running one job on this node: a fresh work directory, the agent process in its own process
//! group with a scrubbed environment, its output logged, a wall-clock limit, an idle-output
//! watchdog, cancellation that kills the whole group, and the result reported back.

pub mod agent;
pub mod credentials;
pub mod events;
pub mod isolation;
pub mod logs;
pub mod output;
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

use crate::proto::jobs::{CommandRun, JobResult, JobSpec, JobStatus, MAX_RESULT_COMMANDS};
use agent::{Agents, PASSED_ENV};
use repos::{diff_summary, prepare, Checkout, RepoConfig};

/// Where and how this node runs jobs.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Parent of the per-job work directories.
    pub workdir_root: PathBuf,
    /// Where job logs are kept.
    pub log_dir: PathBuf,
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
        if let Ok(mut active) = config.active.lock() {
            active.insert(spec.id.clone());
        }
        report(update(JobStatus::Preparing, None, None));
        let outcome = run(&spec, &config, cancelled, &|status| {
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

async fn run(
    spec: &JobSpec,
    config: &RunnerConfig,
    mut cancelled: watch::Receiver<bool>,
    progress: &(dyn Fn(JobStatus) + Send + Sync),
) -> Outcome {
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
    let log = match output::JobLog::open(&log_path, config.max_log_bytes).await {
        Ok(log) => log,
        Err(e) => {
            return failed(format!(
                "cannot open the job log {}: {e}",
                log_path.display()
            ))
        }
    };
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
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    config.isolation.apply(&mut command);
    #[cfg(unix)]
    command.process_group(0);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return failed(format!(
                "cannot start the agent {:?}: {e}",
                invocation.argv[0]
            ))
        }
    };
    progress(JobStatus::Running);
    let pid = child.id();
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
    if !matches!(ending, Ending::Exited(_)) {
        kill_group(pid);
        let _ = child.wait().await;
    }
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
    let from_file = match &invocation.last_message_file {
        Some(path) => isolation::read_agent_file(path)
            .await
            .filter(|t| !t.trim().is_empty()),
        None => None,
    };
    let diffs = tokio::task::spawn_blocking(move || {
        checkouts
            .iter()
            .filter_map(|c| diff_summary(c).ok())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
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
    let mut result = JobResult {
        commands,
        exit_code: None,
        final_message: from_file.or(summary.last_message.clone()).or(last_stdout),
        diffs,
        usage: summary.usage.clone(),
        duration_ms: 0,
        prepare_ms,
    };
    if let Some(message) = &mut result.final_message {
        truncate_utf8(message, 64 * 1024);
    }
    let (status, reason, result) = match ending {
        Ending::Exited(status) => {
            result.exit_code = status.code();
            if status.success() {
                (JobStatus::Succeeded, None, result)
            } else {
                let why = summary
                    .error
                    .clone()
                    .unwrap_or_else(|| match status.code() {
                        Some(code) => format!("the agent exited with code {code}"),
                        None => "the agent was killed by a signal".into(),
                    });
                (JobStatus::Failed, Some(why), result)
            }
        }
        Ending::WallClock => (
            JobStatus::TimedOut,
            Some(format!(
                "stopped after the time limit of {} s",
                spec.timeout_secs
            )),
            result,
        ),
        Ending::Idle => (
            JobStatus::TimedOut,
            Some(format!(
                "stopped: no output from the agent for {} s",
                spec.idle_timeout_secs
            )),
            result,
        ),
        Ending::Cancelled => (JobStatus::Cancelled, Some("cancelled".into()), result),
    };
    // Say so when the log limit dropped output (the job's outcome does not change).
    let reason = match (reason, log_capped) {
        (Some(why), Some(capped)) => Some(format!("{why}; the log is incomplete: {capped}")),
        (None, Some(capped)) => Some(format!("the log is incomplete: {capped}")),
        (reason, None) => reason,
    };
    (status, reason, result)
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
