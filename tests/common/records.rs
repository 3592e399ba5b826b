//! Records as a peer sends them, for tests that speak to nodes over the wire.

use codex_mesh::proto::crdt::{MaxReg, Stamp};
use codex_mesh::proto::hlc::Hlc;
use codex_mesh::proto::jobs::{
    JobRecord, JobResult, JobSpec, JobStatus, Origin, Progress, Sandbox, Target,
};

/// A spec of job `id` for any node, submitted through the API of `by`.
pub fn job_spec(id: &str, prompt: &str, agent: &str, by: &str) -> JobSpec {
    JobSpec {
        id: id.to_string(),
        target: Target::Any,
        repos: Vec::new(),
        prompt: prompt.to_string(),
        agent: agent.to_string(),
        model: None,
        sandbox: Sandbox::WorkspaceWrite,
        timeout_secs: 60,
        idle_timeout_secs: 60,
        origin: Origin {
            kind: "api".into(),
            reply_to: None,
            user: None,
        },
        submitted_via: by.to_string(),
        submitted_at_ms: 1,
        idempotency_key: None,
        extra: Default::default(),
    }
}

/// A job of `spec` that succeeded on its first attempt with `final_message` just now, never
/// assigned (as a peer relays one), stamped by the spec's submitter.
pub fn finished_job(spec: JobSpec, final_message: String) -> JobRecord {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    finished_job_at(spec, final_message, now)
}

/// As [`finished_job`], ended at `ended_ms` (Unix ms).
pub fn finished_job_at(spec: JobSpec, final_message: String, ended_ms: u64) -> JobRecord {
    let stamp = Stamp {
        at: Hlc {
            wall_ms: ended_ms,
            logical: 0,
        },
        by: spec.submitted_via.clone(),
    };
    JobRecord {
        compacted: false,
        spec,
        assignment: None,
        progress: MaxReg(Progress {
            attempt: 1,
            assignment: (0, 0),
            status: JobStatus::Succeeded,
            reason: None,
            result: Some(JobResult {
                final_message: Some(final_message),
                ..JobResult::default()
            }),
            stamp,
        }),
        attempts: Default::default(),
        extra: Default::default(),
    }
}
