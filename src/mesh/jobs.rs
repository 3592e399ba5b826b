//! Jobs in the mesh task: submission from any peer (the job waits in `queued` even with no
//! master reachable), listing with filters, cancel and retry. Scheduling and running build on
//! these records.

use serde::Serialize;
use thiserror::Error;

use super::read;
use super::views::NodeView;
use super::{unix_ms, Mesh};
use crate::proto::crdt::MaxReg;
use crate::proto::ids::ulid;
use crate::proto::jobs::{
    JobRecord, JobResult, JobSpec, JobStatus, Origin, Progress, RepoSpec, Sandbox, Target,
    MAX_PROMPT_BYTES, MAX_REPOS, MAX_TIMEOUT_SECS,
};
use crate::proto::lookup::RecordLookup;
use crate::proto::records::{validate_tag, Key, Record};
use crate::proto::repo_spec::parse_repo;

/// Default wall-clock limit of a job.
pub const DEFAULT_TIMEOUT_SECS: u32 = 3600;
/// Default limit on silence from the agent.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u32 = 600;
/// Agents every node knows.
pub const BUILTIN_AGENTS: &[&str] = &["codex"];

/// A job as submitted through the API or CLI, before validation.
#[derive(Clone, Debug, Default)]
pub struct SubmitRequest {
    /// Node id or name to run on.
    pub node: Option<String>,
    /// Tag a node must carry.
    pub tag: Option<String>,
    /// Repositories, `source[#branch]`.
    pub repos: Vec<String>,
    /// The prompt.
    pub prompt: String,
    /// Agent (default `codex`).
    pub agent: Option<String>,
    /// Model override.
    pub model: Option<String>,
    /// Sandbox mode.
    pub sandbox: Option<Sandbox>,
    /// Wall-clock limit.
    pub timeout_secs: Option<u32>,
    /// Idle limit.
    pub idle_timeout_secs: Option<u32>,
    /// Where it came from.
    pub origin: Option<Origin>,
    /// The client's `Idempotency-Key`: a second submission with it within
    /// [`IDEMPOTENCY_WINDOW_MS`] returns the first job.
    pub idempotency_key: Option<String>,
}

/// How long an `Idempotency-Key` names the job it first created.
pub const IDEMPOTENCY_WINDOW_MS: u64 = 24 * 3600 * 1000;
/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// A submission's outcome.
#[derive(Clone, Debug)]
pub struct Submitted {
    /// The job.
    pub view: JobView,
    /// Whether the job existed already (an `Idempotency-Key` seen before).
    pub replayed: bool,
}

/// Filters for listing jobs.
#[derive(Clone, Debug, Default)]
pub struct JobQuery {
    /// Only this status.
    pub status: Option<JobStatus>,
    /// Only jobs assigned to this node (id or name).
    pub node: Option<String>,
    /// Only jobs whose prompt or id contains this text (case-insensitive).
    pub text: Option<String>,
    /// Page size.
    pub limit: usize,
    /// Jobs to skip.
    pub offset: usize,
}

/// Why a job request failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum JobError {
    /// No such job.
    #[error("no job {0:?}")]
    NotFound(String),
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The job is not in a state that allows this.
    #[error("{0}")]
    Conflict(String),
    /// The change could not be stored.
    #[error("could not store the job: {0}")]
    Store(String),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Unavailable,
    /// An `Idempotency-Key` came back with a different request.
    #[error("{0}")]
    KeyReused(String),
    /// What was asked for was dropped with the job's history.
    #[error("{0}")]
    Gone(String),
}

/// A job as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct JobView {
    /// Current status.
    pub status: JobStatus,
    /// Attempt number.
    pub attempt: u32,
    /// Node running (or that ran) the current attempt.
    pub node: Option<String>,
    /// Name of that node.
    pub node_name: Option<String>,
    /// Epoch of the current assignment.
    pub epoch: Option<u64>,
    /// Why (failures, cancellations, waits).
    pub reason: Option<String>,
    /// Outcome of a finished attempt.
    pub result: Option<JobResult>,
    /// When the status last changed (Unix ms).
    pub updated_at_ms: u64,
    /// Every attempt so far, the current one last.
    pub attempts: Vec<AttemptView>,
    /// The job ended before the mesh's history horizon: `result` keeps only its summary
    /// (exit code, token usage, durations), and its log was dropped.
    pub compacted: bool,
    /// The spec.
    #[serde(flatten)]
    pub spec: JobSpec,
}

/// One attempt of a job as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttemptView {
    /// Attempt number (1 for the first).
    pub attempt: u32,
    /// Node that ran (or was given) it.
    pub node: Option<String>,
    /// Name of that node.
    pub node_name: Option<String>,
    /// How it stands or ended.
    pub status: JobStatus,
    /// Why it ended that way.
    pub reason: Option<String>,
    /// When its node started it (Unix ms).
    pub started_at: Option<u64>,
    /// When it ended (Unix ms).
    pub ended_at: Option<u64>,
}

/// One page of jobs.
#[derive(Clone, Debug, Serialize)]
pub struct JobList {
    /// The jobs, newest first.
    pub jobs: Vec<JobView>,
    /// How many match the filters in all.
    pub total: usize,
}

/// Cancel or retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobAction {
    /// Stop the current attempt.
    Cancel,
    /// Start a new attempt of a finished job.
    Retry,
}

fn optional_text(value: Option<String>) -> Option<String> {
    value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

impl Mesh {
    fn job(&self, id: &str) -> Option<&JobRecord> {
        match self.replica.state().get(&Key::Job(id.to_string()).encode()) {
            Some(Record::Job(job)) => Some(job),
            _ => None,
        }
    }

    /// The job an `Idempotency-Key` created within the window, if any.
    fn job_with_key(&self, key: &str, now_ms: u64) -> Option<&JobRecord> {
        self.replica
            .all_jobs()
            .filter(|job| job.spec.idempotency_key.as_deref() == Some(key))
            .filter(|job| now_ms.saturating_sub(job.spec.submitted_at_ms) < IDEMPOTENCY_WINDOW_MS)
            .min_by(|a, b| a.spec.id.cmp(&b.spec.id))
    }

    /// Validate and record a new job in `queued` (or, for an `Idempotency-Key` seen within
    /// the window, return the job it created).
    pub(super) fn submit_job(&mut self, request: SubmitRequest) -> Result<Submitted, JobError> {
        let key = request.idempotency_key.clone();
        let spec = self.job_spec(request)?;
        if let Some(key) = &key {
            if let Some(first) = self.job_with_key(key, spec.submitted_at_ms) {
                let same = first.spec.prompt == spec.prompt
                    && first.spec.target == spec.target
                    && first.spec.repos == spec.repos
                    && first.spec.agent == spec.agent
                    && first.spec.model == spec.model;
                if !same {
                    return Err(JobError::KeyReused(format!(
                        "the Idempotency-Key {key:?} was used for a different job ({}); use a new key for a new job",
                        first.spec.id
                    )));
                }
                let view = read::jobs::job_view(&self.view(), first);
                return Ok(Submitted {
                    view,
                    replayed: true,
                });
            }
        }
        let stamp = self.stamp();
        let record = JobRecord {
            compacted: false,
            spec: spec.clone(),
            attempts: Default::default(),
            extra: Default::default(),
            assignment: None,
            progress: MaxReg(Progress {
                attempt: 1,
                assignment: (0, 0),
                status: JobStatus::Queued,
                reason: None,
                result: None,
                stamp,
            }),
        };
        let key = Key::Job(spec.id.clone()).encode();
        self.commit_local(key, Record::Job(Box::new(record)))
            .map_err(|e| JobError::Store(e.to_string()))?;
        self.get_job(&spec.id).map(|view| Submitted {
            view,
            replayed: false,
        })
    }

    fn job_spec(&mut self, request: SubmitRequest) -> Result<JobSpec, JobError> {
        let invalid = |m: String| JobError::Invalid(m);
        let prompt = request.prompt.trim().to_string();
        if prompt.is_empty() {
            return Err(invalid("the prompt is empty".into()));
        }
        if prompt.len() > MAX_PROMPT_BYTES {
            return Err(invalid(format!(
                "the prompt is {} bytes; the limit is {MAX_PROMPT_BYTES}",
                prompt.len()
            )));
        }
        if let Some(c) = prompt
            .chars()
            .find(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
        {
            return Err(invalid(format!(
                "the prompt contains the control character U+{:04X}; only newlines, tabs and carriage returns are allowed",
                u32::from(c)
            )));
        }
        // The nodes the job could run on, read once for every check below.
        let snapshot = self.view();
        let members: Vec<NodeView> = read::nodes::node_views(&snapshot)
            .into_iter()
            .filter(|n| !n.removed)
            .collect();
        let target = match (optional_text(request.node), optional_text(request.tag)) {
            (Some(_), Some(_)) => return Err(invalid("give a node or a tag, not both".into())),
            (Some(node), None) => Target::Node(
                read::nodes::resolve_node(&snapshot, &node).map_err(|e| invalid(e.to_string()))?,
            ),
            (None, Some(tag)) => {
                validate_tag(&tag).map_err(invalid)?;
                let carried = members.iter().any(|n| n.tags.contains(&tag));
                if !carried {
                    return Err(invalid(format!("no node carries the tag {tag:?}")));
                }
                Target::Tag(tag)
            }
            (None, None) => Target::Any,
        };
        if request.repos.len() > MAX_REPOS {
            return Err(invalid(format!("at most {MAX_REPOS} repositories per job")));
        }
        let repos: Vec<RepoSpec> = request
            .repos
            .iter()
            .map(|r| parse_repo(r))
            .collect::<Result<_, _>>()
            .map_err(invalid)?;
        check_local_paths(&repos, &target, &members).map_err(invalid)?;
        let agent = optional_text(request.agent).unwrap_or_else(|| "codex".to_string());
        let mut known: Vec<String> = BUILTIN_AGENTS.iter().map(|a| a.to_string()).collect();
        for node in &members {
            known.extend(node.agents.iter().cloned());
        }
        known.sort();
        known.dedup();
        if !known.contains(&agent) {
            return Err(invalid(format!(
                "unknown agent {agent:?}; known agents: {}",
                known.join(", ")
            )));
        }
        let model = optional_text(request.model);
        if model.as_ref().is_some_and(|m| {
            m.len() > 128
                || !m
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
        }) {
            return Err(invalid("invalid model name".into()));
        }
        let timeout_secs = request.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
        let idle_timeout_secs = request
            .idle_timeout_secs
            .unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS.min(timeout_secs));
        for (name, value) in [
            ("timeout", timeout_secs),
            ("idle timeout", idle_timeout_secs),
        ] {
            if value == 0 || value > MAX_TIMEOUT_SECS {
                return Err(invalid(format!(
                    "the {name} must be 1 to {MAX_TIMEOUT_SECS} seconds"
                )));
            }
        }
        let origin = request.origin.unwrap_or(Origin {
            kind: "api".into(),
            reply_to: None,
            user: None,
        });
        let now = unix_ms();
        Ok(JobSpec {
            id: ulid(now, u128::from_le_bytes(rand::random::<[u8; 16]>())),
            target,
            repos,
            prompt,
            agent,
            model,
            sandbox: request.sandbox.unwrap_or_default(),
            timeout_secs,
            idle_timeout_secs,
            origin,
            submitted_via: self.id.clone(),
            submitted_at_ms: now,
            idempotency_key: request.idempotency_key,
            extra: Default::default(),
        })
    }

    /// One job, as the views show it now.
    pub(super) fn get_job(&self, id: &str) -> Result<JobView, JobError> {
        read::jobs::get(&self.view(), id)
    }

    /// Cancel the current attempt, or start a new attempt of a finished job.
    pub(super) fn job_action(&mut self, id: &str, action: JobAction) -> Result<JobView, JobError> {
        let job = self
            .job(id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        let current = job.progress.0.clone();
        let stamp = self.stamp();
        let progress = match action {
            JobAction::Cancel => {
                if current.status.is_terminal() {
                    return Err(JobError::Conflict(format!(
                        "the job already finished ({:?}); nothing to cancel",
                        current.status
                    )));
                }
                Progress {
                    status: JobStatus::Cancelled,
                    reason: Some(format!("cancelled via {}", self.config.name)),
                    stamp,
                    ..current.clone()
                }
            }
            JobAction::Retry => {
                if !current.status.is_terminal() {
                    return Err(JobError::Conflict(
                        "the job has not finished; cancel it first to retry".into(),
                    ));
                }
                if job.compacted {
                    return Err(JobError::Conflict(
                        "the job's history was compacted (it ended before the mesh's history horizon, --job-history-days); submit it again instead".into(),
                    ));
                }
                if current.attempt >= crate::proto::attempts::MAX_ATTEMPTS {
                    return Err(JobError::Conflict(format!(
                        "the job has had {} attempts, the most allowed",
                        current.attempt
                    )));
                }
                Progress {
                    attempt: current.attempt + 1,
                    assignment: (0, 0),
                    status: JobStatus::Queued,
                    reason: None,
                    result: None,
                    stamp,
                }
            }
        };
        let mut record = JobRecord {
            progress: MaxReg(progress),
            ..job
        };
        let wall = unix_ms();
        match action {
            JobAction::Cancel => {
                let reason = record.progress.0.reason.clone();
                let stamp = self.stamp();
                record.attempts.ended(
                    current.attempt,
                    None,
                    JobStatus::Cancelled,
                    reason,
                    wall,
                    stamp,
                );
            }
            JobAction::Retry => {
                if record
                    .attempts
                    .get(current.attempt)
                    .is_none_or(|e| e.ended_at_ms.is_none())
                {
                    let stamp = self.stamp();
                    record.attempts.ended(
                        current.attempt,
                        None,
                        current.status,
                        current.reason.clone(),
                        wall,
                        stamp,
                    );
                }
            }
        }
        self.commit_local(
            Key::Job(id.to_string()).encode(),
            Record::Job(Box::new(record)),
        )
        .map_err(|e| JobError::Store(e.to_string()))?;
        self.get_job(id)
    }
}

/// Refuse local repository paths unless one of `members` the job may run on allows them.
fn check_local_paths(
    repos: &[RepoSpec],
    target: &Target,
    members: &[NodeView],
) -> Result<(), String> {
    let Some(local) = repos.iter().find(|r| r.is_local_path()) else {
        return Ok(());
    };
    let mut allowing = members.iter().filter(|n| n.local_repos);
    let (allowed, which) = match target {
        Target::Node(id) => (allowing.any(|n| &n.id == id), "the target node"),
        Target::Tag(tag) => (allowing.any(|n| n.tags.contains(tag)), "with that tag"),
        Target::Any => (allowing.next().is_some(), "in the mesh"),
    };
    if allowed {
        Ok(())
    } else {
        Err(format!(
            "{}: no node {which} allows local repository paths (an operator can allow them with --allow-local-repos)",
            local.source
        ))
    }
}
