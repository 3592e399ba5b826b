//! The worker's side: whether to start an incoming assignment, and when a run must stop.
//!
//! A worker judges the record it holds after merging the incoming one, not the request alone:
//! a delayed assignment that a newer one replaced, or one for a job cancelled meanwhile, is
//! refused. Starting is idempotent: the same assignment again is acknowledged, not restarted.

use crate::proto::crdt::NodeId;
use crate::proto::jobs::{Assignment, JobRecord, JobStatus};

/// Which attempt and assignment a run belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunKey {
    /// Attempt number.
    pub attempt: u32,
    /// `(epoch, seq)` of the assignment.
    pub assignment: (u64, u64),
}

impl RunKey {
    /// The key of `assignment`.
    pub fn of(assignment: &Assignment) -> RunKey {
        RunKey {
            attempt: assignment.attempt,
            assignment: assignment.key(),
        }
    }
}

/// What the worker knows when an assignment arrives.
#[derive(Clone, Copy, Debug)]
pub struct Fence<'a> {
    /// This node.
    pub me: &'a NodeId,
    /// This node's election term.
    pub term: u64,
    /// The leader of that term as this node knows it.
    pub leader: Option<&'a NodeId>,
    /// The sender of the assignment.
    pub from: &'a NodeId,
}

/// The worker's answer to an assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Start it (after slot and agent checks).
    Start,
    /// It runs here already: acknowledge.
    AlreadyRunning,
    /// This node runs the same attempt under an older assignment (a new master moved the
    /// attempt to a key of its term): keep the run, report under the new key.
    Adopt,
    /// It ran here and ended: acknowledge (the result is on its way).
    AlreadyEnded,
    /// A definite no: this node will never run this assignment.
    Refuse(String),
}

/// Judge `incoming` against `merged` (this node's record after merging the request's),
/// the run this node has of the job (`running`), and the newest assignment of the job this
/// node refused before (`refused`).
pub fn judge(
    merged: &JobRecord,
    incoming: &Assignment,
    running: Option<RunKey>,
    refused: Option<(u64, u64)>,
    fence: Fence<'_>,
) -> Verdict {
    let key = RunKey::of(incoming);
    if &incoming.node != fence.me {
        return Verdict::Refuse("the job is assigned to another node".into());
    }
    if running == Some(key) {
        return Verdict::AlreadyRunning;
    }
    let progress = &merged.progress.0;
    let same = progress.attempt == key.attempt && progress.assignment == key.assignment;
    if same && progress.status.is_terminal() {
        return Verdict::AlreadyEnded;
    }
    if refused.is_some_and(|r| r >= key.assignment) {
        return Verdict::Refuse("this node already refused this assignment".into());
    }
    if incoming.epoch != fence.term {
        return Verdict::Refuse(format!(
            "epoch {} is not the current term {} of this node's election",
            incoming.epoch, fence.term
        ));
    }
    if fence.leader != Some(fence.from) {
        return Verdict::Refuse(format!(
            "{} is not the master of term {} as this node knows it",
            fence.from, fence.term
        ));
    }
    if merged.assignment.as_ref().map(|a| &a.0) != Some(incoming) {
        return Verdict::Refuse("a newer assignment of the job replaced this one".into());
    }
    if progress.status.is_terminal() {
        return Verdict::Refuse(format!(
            "the job already ended ({:?}) in attempt {}",
            progress.status, progress.attempt
        ));
    }
    if !same || progress.status != JobStatus::Assigned {
        return Verdict::Refuse(format!(
            "the job moved on (attempt {}, {:?})",
            progress.attempt, progress.status
        ));
    }
    match running {
        Some(run) if run.attempt == key.attempt && run.assignment < key.assignment => {
            Verdict::Adopt
        }
        _ => Verdict::Start,
    }
}

/// Why a run of `run` on node `me` must stop given the job's current record, if it must: its
/// attempt ended (a cancel, whatever key it was written under), a newer attempt started, or a
/// newer assignment of its attempt gave it to another node. A newer assignment of the same
/// attempt to `me` is a new master keeping the attempt here: the run goes on and is adopted
/// under the new key ([`Verdict::Adopt`]).
pub fn must_stop(job: &JobRecord, run: RunKey, me: &NodeId) -> Option<&'static str> {
    let progress = &job.progress.0;
    if progress.attempt > run.attempt {
        return Some("a newer attempt of the job started");
    }
    if progress.attempt < run.attempt {
        return None;
    }
    if progress.status.is_terminal() {
        // Our own end is recorded only after the run is gone, so this was someone else's.
        return Some(if progress.status == JobStatus::Cancelled {
            "the job was cancelled"
        } else {
            "the attempt ended elsewhere"
        });
    }
    let newer = job
        .assignment
        .as_ref()
        .map(|a| &a.0)
        .filter(|a| a.attempt == run.attempt && a.key() > run.assignment);
    match newer {
        Some(a) if &a.node != me => Some("a newer assignment gave the attempt to another node"),
        Some(_) => None,
        None if progress.assignment > run.assignment => {
            Some("a newer assignment replaced this run")
        }
        None => None,
    }
}

/// At start, a job this node was given or ran in its previous life has no run any more (its
/// agents died with the process): the attempt becomes `lost`, "node restarted", unless the
/// caller recovered the outcome of an agent that had finished. `None` when the job is not
/// active here. `stamp` is called for the progress and the attempt entry.
pub fn lost_at_restart(
    job: &JobRecord,
    me: &NodeId,
    wall_ms: u64,
    stamp: &mut dyn FnMut() -> crate::proto::crdt::Stamp,
) -> Option<JobRecord> {
    let assignment = super::active_assignment(job)?;
    if &assignment.node != me {
        return None;
    }
    let why = "node restarted".to_string();
    let mut record = job.clone();
    record.progress.0 = crate::proto::jobs::Progress {
        status: JobStatus::Lost,
        reason: Some(why.clone()),
        result: None,
        stamp: stamp(),
        ..job.progress.0.clone()
    };
    record.attempts.ended(
        assignment.attempt,
        Some(me),
        JobStatus::Lost,
        Some(why),
        wall_ms,
        stamp(),
    );
    Some(record)
}
