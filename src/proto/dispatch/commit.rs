//! The voters' side of an assignment, a Paxos instance per job attempt in which the lease
//! term is the ballot and the value is the node that runs the attempt.
//!
//! * **Read** (once per term, before the master schedules anything): a voter whose election is
//!   at the master's term reports every assignment it accepted for jobs its replica does not
//!   show as ended. Its term only grows, so from then on it refuses assignments of older terms
//!   (its promise). The master binds each reported attempt to the node of the newest reported
//!   assignment ([`bind`]).
//! * **Accept**: a voter accepts an assignment only at its own term and from that term's
//!   leader, and only for an attempt its replica does not show as ended or replaced by a newer
//!   one; it persists what it accepted before it answers. The master delivers the assignment
//!   to the worker only once a quorum accepted it, and writes it into the replicated record
//!   then (a proposal that fails never reaches anyone's replica).
//!
//! Why one node per attempt: an assignment accepted by a quorum in term T was accepted by some
//! voter of every quorum that answers a later term's read, before that voter promised the later
//! term; so every later master learns it (or a newer one, which by induction names the same
//! node) and proposes that node again. The attempt only moves to another node after the node
//! definitely refused it (it is then queued again under a newer key, see [`bind`]) or as a new
//! attempt after it was lost.

use std::collections::BTreeMap;

use crate::proto::crdt::NodeId;
use crate::proto::jobs::{Assignment, JobRecord, JobStatus};

use super::worker::Fence;

/// What a voter accepted: per job, the newest assignment.
pub type Accepted = BTreeMap<String, Assignment>;

/// Most entries a voter reports in one read answer.
pub const MAX_READ_ENTRIES: usize = 4096;

/// Why a voter did not accept an assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The request itself is inconsistent.
    Malformed(String),
    /// Not from the leader of this voter's term (it may pass later, or never).
    Stale(String),
    /// The voter's replica shows the attempt ended or replaced (it answers with its record).
    Conflict(String),
}

/// Whether a voter whose replica of the job is `current` accepts `incoming` (a record whose
/// progress is `assigned` under its assignment), sent by `fence.from`.
pub fn accept(
    current: Option<&JobRecord>,
    incoming: &JobRecord,
    fence: Fence<'_>,
) -> Result<(), Refusal> {
    let Some(assignment) = incoming.assignment.as_ref().map(|a| &a.0) else {
        return Err(Refusal::Malformed("the assignment is missing".into()));
    };
    let progress = &incoming.progress.0;
    if progress.status != JobStatus::Assigned
        || progress.attempt != assignment.attempt
        || progress.assignment != assignment.key()
    {
        return Err(Refusal::Malformed(
            "the progress does not match the assignment".into(),
        ));
    }
    if assignment.epoch != fence.term || fence.leader != Some(fence.from) {
        return Err(Refusal::Stale(format!(
            "an assignment of epoch {} from {} is not one of the leader of term {}",
            assignment.epoch, fence.from, fence.term
        )));
    }
    let Some(known) = current.map(|c| &c.progress.0) else {
        return Ok(());
    };
    if known.attempt > assignment.attempt {
        return Err(Refusal::Conflict(format!(
            "the job is at attempt {}",
            known.attempt
        )));
    }
    if known.attempt == assignment.attempt && known.status.is_terminal() {
        return Err(Refusal::Conflict(format!(
            "attempt {} ended ({:?})",
            known.attempt, known.status
        )));
    }
    Ok(())
}

/// Record an accepted assignment (the newest per job wins).
pub fn remember(accepted: &mut Accepted, job: &str, assignment: &Assignment) {
    let newer = accepted
        .get(job)
        .is_none_or(|a| (a.attempt, a.key()) <= (assignment.attempt, assignment.key()));
    if newer {
        accepted.insert(job.to_string(), assignment.clone());
    }
}

/// Drop entries for attempts the replica shows as ended or replaced (`job` looks a job up);
/// what remains is what a read reports.
pub fn prune<'a>(accepted: &mut Accepted, job: impl Fn(&str) -> Option<&'a JobRecord>) {
    accepted.retain(|id, a| {
        job(id).is_none_or(|j| {
            let p = &j.progress.0;
            p.attempt < a.attempt || (p.attempt == a.attempt && !p.status.is_terminal())
        })
    });
}

/// The node an attempt is bound to after a read: the newest reported assignment of that
/// attempt, unless the job was queued again under a newer key (its node refused it).
pub fn bind<'a>(reported: &'a Accepted, job: &JobRecord) -> Option<&'a NodeId> {
    let entry = reported.get(&job.spec.id)?;
    let p = &job.progress.0;
    let requeued = p.status == JobStatus::Queued && p.assignment > entry.key();
    (entry.attempt == p.attempt && !requeued).then_some(&entry.node)
}
