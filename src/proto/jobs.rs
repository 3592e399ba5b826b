//! Jobs as replicated records: a write-once spec, an assignment ordered by (epoch, seq) and
//! written only by the master, and a progress register whose merge only moves forward.
//!
//! Progress order (larger wins): attempt, then terminal over non-terminal; between two
//! terminal states of one attempt the earlier stamp wins (the first end is the end: a cancel
//! is not undone by a success reported after it, and a success that came first is not undone
//! by a later cancel); between non-terminal states the assignment they belong to, then the
//! status rank, then the stamp. So within one attempt a terminal state absorbs everything, a
//! worker's report for an older assignment loses to the current one, and a retry (a new
//! attempt) starts over from `queued`.

use serde::{Deserialize, Serialize};

use super::attempts::Attempts;
use super::crdt::{Crdt, MaxReg, NodeId, Stamp};
use super::records::{keep_unknown_fields, Extra, MAX_TEXT_LEN};

/// Longest accepted prompt, in bytes.
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;
/// Most repositories per job.
pub const MAX_REPOS: usize = 16;
/// Longest accepted wall-clock timeout.
pub const MAX_TIMEOUT_SECS: u32 = 7 * 24 * 3600;

/// Where a job may run.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Target {
    /// Any node with a free slot.
    Any,
    /// One node, by id or name.
    Node(String),
    /// Any node carrying the tag.
    Tag(String),
}

/// A repository to clone into the job's work directory.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RepoSpec {
    /// `owner/name` (GitHub), an `http(s)://` (or `git://`) URL, or a local path (ssh and
    /// URLs with credentials are refused: see [`super::repo_spec`]).
    pub source: String,
    /// Branch to check out (default branch when absent).
    pub branch: Option<String>,
}

impl RepoSpec {
    /// Whether this is a path on the node's own disk (only nodes whose operator allows that
    /// can clone it).
    pub fn is_local_path(&self) -> bool {
        matches!(
            super::repo_spec::repo_kind(&self.source),
            Ok(super::repo_spec::RepoKind::LocalPath)
        )
    }
}

/// Codex sandbox modes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Sandbox {
    /// Read-only file system access.
    ReadOnly,
    /// Writes inside the work directory only (the default).
    #[default]
    WorkspaceWrite,
    /// No sandbox.
    DangerFullAccess,
}

/// Where a job came from, and where to answer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// `cli`, `api`, `dashboard`, `telegram` or `slack`.
    pub kind: String,
    /// Chat/thread address for the completion message, if any.
    pub reply_to: Option<String>,
    /// Who asked (chat user id), if known.
    pub user: Option<String>,
}

/// What to do. Written once at submission and never changed. Fields this version does not
/// know (from newer versions) are kept in `extra` and written back.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct JobSpec {
    /// Job id (ULID).
    pub id: String,
    /// Where it may run.
    pub target: Target,
    /// Repositories to clone.
    pub repos: Vec<RepoSpec>,
    /// The prompt.
    pub prompt: String,
    /// Agent name (`codex` or one the operator defines).
    pub agent: String,
    /// Model override.
    pub model: Option<String>,
    /// Sandbox mode for the agent.
    pub sandbox: Sandbox,
    /// Wall-clock limit in seconds.
    pub timeout_secs: u32,
    /// Limit on silence from the agent in seconds.
    pub idle_timeout_secs: u32,
    /// Origin and reply address.
    pub origin: Origin,
    /// Node that accepted the submission.
    pub submitted_via: NodeId,
    /// Submission time (Unix ms): the scheduler's FIFO order.
    pub submitted_at_ms: u64,
    /// The client's `Idempotency-Key`, if it sent one: the same key within a day is the
    /// same job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Fields this version does not know, kept as they came.
    #[serde(skip)]
    pub extra: Extra,
}

keep_unknown_fields!(
    JobSpec,
    &[
        "id",
        "target",
        "repos",
        "prompt",
        "agent",
        "model",
        "sandbox",
        "timeout_secs",
        "idle_timeout_secs",
        "origin",
        "submitted_via",
        "submitted_at_ms",
        "idempotency_key",
    ]
);

impl JobSpec {
    /// Whether any repository is a path on the node's own disk (only nodes whose operator
    /// allows that can run the job).
    pub fn names_local_paths(&self) -> bool {
        self.repos.iter().any(RepoSpec::is_local_path)
    }
}

#[cfg(test)]
impl JobSpec {
    /// A valid spec for unit tests: `prompt` for any node, with the `codex` agent.
    pub(crate) fn for_tests(prompt: &str) -> JobSpec {
        JobSpec {
            id: "01J0000000000000000000000A".into(),
            target: Target::Any,
            repos: vec![],
            prompt: prompt.into(),
            agent: "codex".into(),
            model: None,
            sandbox: Sandbox::WorkspaceWrite,
            timeout_secs: 600,
            idle_timeout_secs: 120,
            origin: Origin {
                kind: "cli".into(),
                reply_to: None,
                user: None,
            },
            submitted_via: "n1".into(),
            submitted_at_ms: 1,
            idempotency_key: None,
            extra: Extra::default(),
        }
    }
}

/// Which node runs an attempt. Written only by the master; a later (epoch, seq) wins.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Assignment {
    /// Lease epoch of the master that assigned.
    pub epoch: u64,
    /// The master's sequence number within the epoch.
    pub seq: u64,
    /// Attempt this assignment is for.
    pub attempt: u32,
    /// The node.
    pub node: NodeId,
}

impl Assignment {
    /// The order key of this assignment.
    pub fn key(&self) -> (u64, u64) {
        (self.epoch, self.seq)
    }
}

/// Job status, in the order it may move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a node.
    Queued,
    /// Given to a node.
    Assigned,
    /// The node prepares the work directory and clones.
    Preparing,
    /// The agent runs.
    Running,
    /// Finished with success.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Cancelled by a user.
    Cancelled,
    /// Stopped by the wall-clock or idle limit.
    TimedOut,
    /// Its node went away.
    Lost,
}

impl JobStatus {
    /// Whether no further change happens within the attempt.
    pub fn is_terminal(self) -> bool {
        self.rank() == 4
    }

    /// Position in the forward-only order; all terminal states share the last rank.
    pub fn rank(self) -> u8 {
        match self {
            JobStatus::Queued => 0,
            JobStatus::Assigned => 1,
            JobStatus::Preparing => 2,
            JobStatus::Running => 3,
            _ => 4,
        }
    }

    /// Parse the snake_case name.
    pub fn parse(text: &str) -> Option<JobStatus> {
        serde_json::from_value(serde_json::Value::String(text.to_string())).ok()
    }
}

/// Lines changed in one file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FileDiff {
    /// Path relative to the repository.
    pub path: String,
    /// Added lines.
    pub added: u32,
    /// Removed lines.
    pub removed: u32,
}

/// The change an attempt made to one repository.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RepoDiff {
    /// The repository as given in the spec.
    pub source: String,
    /// Files changed.
    pub files: Vec<FileDiff>,
}

/// Token usage reported by the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Usage {
    /// Input tokens.
    pub input_tokens: u64,
    /// Cached input tokens.
    pub cached_input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
}

/// A command the agent ran.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CommandRun {
    /// The command line (at most 512 bytes kept).
    pub command: String,
    /// Its exit code, if reported.
    pub exit_code: Option<i64>,
}

/// Most commands kept in a result.
pub const MAX_RESULT_COMMANDS: usize = 200;

/// What a finished attempt produced.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobResult {
    /// Agent process exit code.
    pub exit_code: Option<i32>,
    /// The agent's final message.
    pub final_message: Option<String>,
    /// Per-repository diff summary.
    pub diffs: Vec<RepoDiff>,
    /// Token usage.
    pub usage: Option<Usage>,
    /// Wall-clock duration in ms.
    pub duration_ms: u64,
    /// Commands the agent ran (Codex agents), in order.
    #[serde(default)]
    pub commands: Vec<CommandRun>,
    /// Part of the duration spent getting the repositories, in ms.
    #[serde(default)]
    pub prepare_ms: u64,
}

/// Where an attempt stands.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Progress {
    /// Attempt number (1 for the first).
    pub attempt: u32,
    /// `(epoch, seq)` of the assignment this report belongs to; `(0, 0)` before any.
    pub assignment: (u64, u64),
    /// The status.
    pub status: JobStatus,
    /// Why, for failures, cancellations, losses and waits.
    pub reason: Option<String>,
    /// The outcome, once terminal.
    pub result: Option<JobResult>,
    /// Who wrote this, and when.
    pub stamp: Stamp,
}

impl Progress {
    fn order(&self, other: &Self) -> std::cmp::Ordering {
        let terminal = self.status.is_terminal();
        self.attempt
            .cmp(&other.attempt)
            .then(terminal.cmp(&other.status.is_terminal()))
            .then_with(|| {
                if terminal {
                    // Both ended: the earlier end wins.
                    other.stamp.cmp(&self.stamp)
                } else {
                    (self.assignment, self.status.rank(), &self.stamp).cmp(&(
                        other.assignment,
                        other.status.rank(),
                        &other.stamp,
                    ))
                }
            })
    }
}

impl PartialOrd for Progress {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Progress {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order(other)
            // Identical keys come only from one writer reusing a stamp; stay deterministic.
            .then_with(|| self.assignment.cmp(&other.assignment))
            .then_with(|| self.status.cmp(&other.status))
            .then_with(|| self.reason.cmp(&other.reason))
            // What compaction keeps decides before what it drops, so stripping both sides
            // never changes which one wins.
            .then_with(|| kept_of(&self.result).cmp(&kept_of(&other.result)))
            .then_with(|| self.result.cmp(&other.result))
    }
}

/// The parts of a result a compacted job keeps (see [`super::history`]).
fn kept_of(result: &Option<JobResult>) -> Option<(Option<i32>, &Option<Usage>, u64, u64)> {
    result
        .as_ref()
        .map(|r| (r.exit_code, &r.usage, r.duration_ms, r.prepare_ms))
}

/// A job record, key `job/<id>`. Fields this version does not know are kept in `extra`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct JobRecord {
    /// What to do.
    pub spec: JobSpec,
    /// Current assignment.
    pub assignment: Option<MaxReg<Assignment>>,
    /// Current progress.
    pub progress: MaxReg<Progress>,
    /// What is known of each attempt (node, end, times).
    #[serde(default)]
    pub attempts: Attempts,
    /// Whether the job's history was compacted (see [`super::history`]): once set, never
    /// cleared, and every result merged in is stripped.
    #[serde(default, skip_serializing_if = "is_false")]
    pub compacted: bool,
    /// Fields this version does not know, kept as they came.
    #[serde(skip)]
    pub extra: Extra,
}

keep_unknown_fields!(
    JobRecord,
    &["spec", "assignment", "progress", "attempts", "compacted"]
);

fn is_false(flag: &bool) -> bool {
    !*flag
}

/// Number of fields in the spec's encoding (known fields present plus unknown ones).
fn field_count(spec: &JobSpec) -> usize {
    12 + usize::from(spec.idempotency_key.is_some()) + spec.extra.len()
}

fn encoded(spec: &JobSpec) -> Vec<u8> {
    let mut bytes = Vec::new();
    // Encoding our own in-memory types into a Vec cannot fail.
    let _ = ciborium::into_writer(spec, &mut bytes);
    bytes
}

/// Whether spec `b` wins over `a` in the write-once merge: the one whose encoding has more
/// fields (so a copy re-encoded by a version that dropped fields never wins), then the
/// smaller encoding (byte-wise). Both rules read only the encoding, so nodes of different
/// versions pick the same spec.
fn spec_wins(a: &JobSpec, b: &JobSpec) -> bool {
    a != b
        && field_count(b)
            .cmp(&field_count(a))
            .then_with(|| encoded(a).cmp(&encoded(b)))
            .is_gt()
}

impl Crdt for JobRecord {
    fn merge(&mut self, other: &Self) -> bool {
        // Compaction absorbs: a compacted side makes the merge compacted, and a full copy
        // merged into a compacted record is stripped before it is merged, so it brings
        // nothing back (and does not count as a change).
        match (self.compacted, other.compacted) {
            (true, false) => {
                let mut stripped = other.clone();
                super::history::compact(&mut stripped);
                self.merge_parts(&stripped)
            }
            (false, true) => {
                super::history::compact(self);
                self.merge_parts(other);
                true
            }
            _ => self.merge_parts(other),
        }
    }
}

impl JobRecord {
    /// Merge field by field (both sides compacted, or neither).
    fn merge_parts(&mut self, other: &Self) -> bool {
        // The spec is written once; two different specs under one id come from a faulty
        // writer or from a version that lost fields: see `spec_wins`.
        let spec = if spec_wins(&self.spec, &other.spec) {
            self.spec = other.spec.clone();
            true
        } else {
            false
        };
        let assignment = self.assignment.merge(&other.assignment);
        let progress = self.progress.merge(&other.progress);
        let attempts = self.attempts.merge(&other.attempts);
        spec | assignment | progress | attempts
    }
}

impl JobRecord {
    /// Check bounds before a record from anywhere is accepted.
    pub fn validate(&self, id: &str) -> Result<(), String> {
        let spec = &self.spec;
        if spec.id != id {
            return Err("job id differs from key".into());
        }
        if spec.prompt.is_empty() || spec.prompt.len() > MAX_PROMPT_BYTES {
            return Err(format!("prompt must be 1 to {MAX_PROMPT_BYTES} bytes"));
        }
        if spec.repos.len() > MAX_REPOS {
            return Err(format!("at most {MAX_REPOS} repositories"));
        }
        let texts = spec
            .repos
            .iter()
            .flat_map(|r| std::iter::once(&r.source).chain(r.branch.iter()))
            .chain([&spec.agent, &spec.origin.kind])
            .chain(spec.model.iter())
            .chain(spec.idempotency_key.iter());
        for text in texts {
            if text.len() > MAX_TEXT_LEN {
                return Err("a field is too long".into());
            }
        }
        if spec.timeout_secs == 0 || spec.timeout_secs > MAX_TIMEOUT_SECS {
            return Err("timeout out of range".into());
        }
        let result_size = self.progress.0.result.as_ref().map_or(0, |r| {
            r.final_message.as_ref().map_or(0, String::len)
                + r.diffs.iter().map(|d| d.files.len() * 64).sum::<usize>()
                + r.commands
                    .iter()
                    .map(|c| c.command.len() + 16)
                    .sum::<usize>()
        });
        if result_size > 1 << 20 {
            return Err("result too large".into());
        }
        let kept_result = self.progress.0.result.as_ref();
        if self.compacted && !kept_result.is_none_or(super::history::is_stripped) {
            return Err("a compacted job carries its full result".into());
        }
        if self.progress.0.attempt > super::attempts::MAX_ATTEMPTS {
            return Err(format!(
                "more than {} attempts",
                super::attempts::MAX_ATTEMPTS
            ));
        }
        self.attempts.validate()
    }
}

#[cfg(test)]
pub(crate) mod tests;
