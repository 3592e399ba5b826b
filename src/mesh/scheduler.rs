//! The scheduler's runtime half, run by the master: it feeds [`Dispatcher`] the replicated
//! jobs and members, and carries out its steps: writes, commits at the voters (this node
//! included) and deliveries to workers. The lease is checked again before every commit and
//! delivery, not once per round. Voters answer commits here too ([`Mesh::judge_commit`]).

use std::collections::{BTreeMap, VecDeque};

use libp2p::PeerId;

use super::{unix_ms, Mesh, Purpose};
use crate::proto::crdt::NodeId;
use crate::proto::dispatch::commit::{self, Refusal, MAX_READ_ENTRIES};
use crate::proto::dispatch::worker::Fence;
use crate::proto::dispatch::{is_open, CommitAnswer, DeliverAnswer, Dispatcher, Step, World};
use crate::proto::jobs::JobRecord;
use crate::proto::lookup::RecordLookup;
use crate::proto::records::{Key, Record};
use crate::proto::schedule::NodeLoad;
use crate::wire::{Request, Response};

/// How often the master looks at the queue without being woken (for waits that end by time:
/// a node coming back, a refusal backoff running out, an answer that is due).
pub const SCHEDULE_EVERY_MS: u64 = 250;
/// Store meta key of the assignments this node accepted as a voter.
pub const ACCEPTED_META: &str = "accepted_assignments";

/// The master's scheduling bookkeeping (in memory: a new master starts afresh).
#[derive(Debug, Default)]
pub struct SchedulerState {
    dispatcher: Dispatcher,
    /// Something changed that may let a queued job run: schedule after the current input.
    woken: bool,
}

impl SchedulerState {
    /// Ask for a scheduling round as soon as the current input is handled.
    pub fn wake(&mut self) {
        self.woken = true;
    }
}

impl Mesh {
    /// Jobs the scheduler still has work for (see [`is_open`]). Finished ones, with their
    /// results, are left uncopied.
    fn open_jobs(&self) -> Vec<JobRecord> {
        let requeues = self.config.lost_requeues;
        self.replica
            .all_jobs()
            .filter(|job| is_open(job, requeues))
            .cloned()
            .collect()
    }

    /// Members as the dispatcher sees them, and when each one's process started.
    fn dispatch_members(&self) -> (Vec<NodeLoad>, BTreeMap<NodeId, u64>) {
        let mut started = BTreeMap::new();
        let loads = super::read::nodes::node_views(&self.view())
            .into_iter()
            .map(|n| {
                started.insert(n.id.clone(), n.started_at_ms);
                NodeLoad {
                    running: 0,
                    id: n.id,
                    name: n.name,
                    tags: n.tags,
                    slots: n.slots,
                    online: n.online,
                    draining: n.draining,
                    removed: n.removed,
                    agents: n.agents,
                    local_repos: n.local_repos,
                }
            })
            .collect();
        (loads, started)
    }

    /// Run `f` with the dispatcher and a [`World`] of this moment.
    fn with_dispatcher<R>(&mut self, f: impl FnOnce(&mut Dispatcher, &mut World<'_>) -> R) -> R {
        let (nodes, started) = self.dispatch_members();
        let mut dispatcher = std::mem::take(&mut self.scheduler.dispatcher);
        let now = self.now();
        let me = self.id.clone();
        let term = self.election.term();
        let lost_requeues = self.config.lost_requeues;
        let mut stamp = || self.stamp();
        let mut world = World {
            now,
            wall_ms: unix_ms(),
            me: &me,
            term,
            nodes: &nodes,
            started_at_ms: &started,
            lost_requeues,
            stamp: &mut stamp,
        };
        let result = f(&mut dispatcher, &mut world);
        self.scheduler.dispatcher = dispatcher;
        result
    }

    /// Run a scheduling round if one was asked for and this node acts as master.
    pub(super) fn schedule_if_due(&mut self) {
        if !self.scheduler.woken {
            return;
        }
        self.scheduler.woken = false;
        let now = self.now();
        if self.acting_master(now) {
            self.next_schedule = now + SCHEDULE_EVERY_MS;
            let jobs = self.open_jobs();
            let steps = self.with_dispatcher(|d, world| d.round(&jobs, world));
            self.run_steps(steps);
            // Records written by this round wake the scheduler again; nothing is left to do.
            self.scheduler.woken = false;
        }
    }

    /// Carry out the dispatcher's steps (and those that local answers lead to).
    fn run_steps(&mut self, steps: Vec<Step>) {
        let mut queue: VecDeque<Step> = steps.into();
        while let Some(step) = queue.pop_front() {
            match step {
                Step::Write(record) => {
                    let key = Key::Job(record.spec.id.clone()).encode();
                    if let Err(e) = self.commit_local(key, Record::Job(record)) {
                        tracing::error!("scheduler cannot record a job: {e}");
                    }
                }
                Step::Read => {
                    if !self.acting_master(self.now()) {
                        continue;
                    }
                    let term = self.election.term();
                    let me = self.id.clone();
                    for voter in self.election.membership().all_voters() {
                        if voter == me {
                            if let Response::Accepted(entries) = self.answer_read(&me, term) {
                                let membership = self.election.membership().clone();
                                self.scheduler.dispatcher.on_read_answer(
                                    term,
                                    &me,
                                    entries,
                                    &|set| membership.is_quorum(set),
                                );
                            }
                            continue;
                        }
                        if let Ok(peer) = voter.parse::<PeerId>() {
                            self.send(peer, Request::ReadAccepted { term }, Purpose::Read { term });
                        }
                    }
                    if self.scheduler.dispatcher.ready(term) {
                        self.scheduler.wake();
                    }
                }
                Step::Commit(record) => {
                    if !self.acting_master(self.now()) {
                        continue;
                    }
                    let id = record.spec.id.clone();
                    let key = record.progress.0.assignment;
                    let me = self.id.clone();
                    for voter in self.election.membership().all_voters() {
                        if voter == me {
                            let answer = match self.judge_commit(&me, &record) {
                                Response::Ack => CommitAnswer::Accepted,
                                Response::Conflict(theirs) => CommitAnswer::Conflict(theirs),
                                other => CommitAnswer::Unclear(format!("{other:?}")),
                            };
                            queue.extend(self.commit_answered(&id, key, &me, answer));
                            continue;
                        }
                        match voter.parse::<PeerId>() {
                            Ok(peer) => self.send(
                                peer,
                                Request::Commit(record.clone()),
                                Purpose::Commit {
                                    job: id.clone(),
                                    key,
                                },
                            ),
                            Err(_) => tracing::warn!("voter with an invalid id {voter}"),
                        }
                    }
                }
                Step::Deliver(record) => {
                    if !self.acting_master(self.now()) {
                        continue;
                    }
                    let Some(node) = record.assignment.as_ref().map(|a| a.0.node.clone()) else {
                        continue;
                    };
                    let purpose = Purpose::Assign {
                        job: record.spec.id.clone(),
                        key: record.progress.0.assignment,
                    };
                    tracing::info!(job = %record.spec.id, %node, key = ?record.progress.0.assignment, "assigning");
                    crate::faults::point("assignment-committed");
                    if node == self.id {
                        let from = self.id.clone();
                        let response = self.accept_assignment(&record, &from);
                        queue.extend(self.assign_answered(purpose, Ok(response)));
                    } else {
                        match node.parse::<PeerId>() {
                            Ok(peer) => self.send(peer, Request::Assign(record), purpose),
                            Err(_) => queue
                                .extend(self.assign_answered(purpose, Err("bad node id".into()))),
                        }
                    }
                }
            }
        }
    }

    fn commit_answered(
        &mut self,
        id: &str,
        key: (u64, u64),
        voter: &NodeId,
        answer: CommitAnswer,
    ) -> Vec<Step> {
        let now = self.now();
        let membership = self.election.membership().clone();
        self.scheduler
            .dispatcher
            .on_commit_answer(id, key, voter, answer, now, &|set| {
                membership.is_quorum(set)
            })
    }

    /// A voter's answer to the read of accepted assignments.
    pub(super) fn on_read_answer(
        &mut self,
        peer: PeerId,
        purpose: Purpose,
        result: Result<Response, String>,
    ) {
        let Purpose::Read { term } = purpose else {
            return;
        };
        let Ok(Response::Accepted(entries)) = result else {
            return; // asked again at the next round
        };
        if entries.len() > MAX_READ_ENTRIES {
            return;
        }
        let membership = self.election.membership().clone();
        let dispatcher = &mut self.scheduler.dispatcher;
        dispatcher.on_read_answer(term, &peer.to_string(), entries, &|set| {
            membership.is_quorum(set)
        });
        if dispatcher.ready(term) {
            self.scheduler.wake();
        }
    }

    /// A voter's answer to a commit request.
    pub(super) fn on_commit_answer(
        &mut self,
        peer: PeerId,
        purpose: Purpose,
        result: Result<Response, String>,
    ) {
        let Purpose::Commit { job, key } = purpose else {
            return;
        };
        let answer = match result {
            Ok(Response::Ack) => CommitAnswer::Accepted,
            Ok(Response::Conflict(record)) if record.spec.id == job => {
                // Take the voter's newer state through the same checks as any peer's record.
                let key = Key::Job(job.clone()).encode();
                self.apply_remote(vec![(key, Record::Job(record.clone()))]);
                CommitAnswer::Conflict(record)
            }
            Ok(other) => CommitAnswer::Unclear(format!("{other:?}")),
            Err(e) => CommitAnswer::Unclear(e),
        };
        let answer = match answer {
            // Already merged above (or refused by the checks): nothing to write again.
            CommitAnswer::Conflict(_) => match self.job_record(&job) {
                Some(current) => CommitAnswer::Conflict(Box::new(current)),
                None => CommitAnswer::Unclear("unknown job".into()),
            },
            other => other,
        };
        let steps = self.commit_answered(&job, key, &peer.to_string(), answer);
        self.run_steps(steps);
    }

    fn assign_answered(&mut self, purpose: Purpose, result: Result<Response, String>) -> Vec<Step> {
        let Purpose::Assign { job: id, key } = purpose else {
            return Vec::new();
        };
        let answer = match result {
            Ok(Response::Ack) => DeliverAnswer::Ack,
            Ok(Response::Refused(why)) => DeliverAnswer::Refused(why),
            Ok(other) => DeliverAnswer::Unclear(format!("unexpected answer {other:?}")),
            Err(e) => DeliverAnswer::Unclear(format!("unreachable ({e})")),
        };
        if let DeliverAnswer::Refused(why) | DeliverAnswer::Unclear(why) = &answer {
            tracing::info!(job = %id, "assignment not taken: {why}");
        }
        let Some(job) = self.job_record(&id) else {
            return Vec::new();
        };
        self.with_dispatcher(|d, world| d.on_deliver_answer(&job, key, answer, world))
    }

    /// The worker's (or the network's) answer to an assignment.
    pub(super) fn on_assign_answer(
        &mut self,
        _peer: PeerId,
        purpose: Purpose,
        result: Result<Response, String>,
    ) {
        let steps = self.assign_answered(purpose, result);
        self.run_steps(steps);
    }

    fn job_record(&self, id: &str) -> Option<JobRecord> {
        match self.replica.state().get(&Key::Job(id.to_string()).encode()) {
            Some(Record::Job(job)) => Some((**job).clone()),
            _ => None,
        }
    }

    fn fence<'a>(&'a self, from: &'a NodeId) -> Fence<'a> {
        Fence {
            me: &self.id,
            term: self.election.term(),
            leader: self.election.leader(),
            from,
        }
    }

    /// A voter's answer to the read of the master of `term`: the assignments it accepted
    /// for attempts its replica does not show as ended, once its own term is `term` (from
    /// then on it refuses assignments of older terms).
    pub(super) fn answer_read(&mut self, from: &NodeId, term: u64) -> Response {
        let fence = self.fence(from);
        if term != fence.term || fence.leader != Some(from) {
            return Response::Refused(format!(
                "{from} is not the leader of term {term} as this node knows it (its term is {})",
                fence.term
            ));
        }
        let state = self.replica.state();
        commit::prune(&mut self.accepted, |id| {
            match state.get(&Key::Job(id.to_string()).encode()) {
                Some(Record::Job(job)) => Some(&**job),
                _ => None,
            }
        });
        let entries: Vec<_> = self
            .accepted
            .iter()
            .map(|(job, a)| (job.clone(), a.clone()))
            .collect();
        if entries.len() > MAX_READ_ENTRIES {
            return Response::Refused(format!("more than {MAX_READ_ENTRIES} open assignments"));
        }
        Response::Accepted(entries)
    }

    /// A voter's check of an assignment before any worker may start it
    /// ([`commit::accept`]): from the leader of this node's term, for an attempt its replica
    /// does not show as ended. What it accepts is persisted before the answer.
    pub(super) fn judge_commit(&mut self, from: &NodeId, record: &JobRecord) -> Response {
        let id = record.spec.id.clone();
        let current = self.job_record(&id);
        match commit::accept(current.as_ref(), record, self.fence(from)) {
            Ok(()) => {}
            Err(Refusal::Malformed(why) | Refusal::Stale(why)) => return Response::Refused(why),
            Err(Refusal::Conflict(why)) => {
                tracing::debug!(job = %id, "commit refused: {why}");
                return match current {
                    Some(current) => Response::Conflict(Box::new(current)),
                    None => Response::Refused(why),
                };
            }
        }
        let Some(assignment) = record.assignment.as_ref().map(|a| a.0.clone()) else {
            return Response::Refused("the assignment is missing".into());
        };
        let mut accepted = self.accepted.clone();
        commit::remember(&mut accepted, &id, &assignment);
        let state = self.replica.state();
        commit::prune(&mut accepted, |id| {
            match state.get(&Key::Job(id.to_string()).encode()) {
                Some(Record::Job(job)) => Some(&**job),
                _ => None,
            }
        });
        // Acknowledge only what is in the store.
        if let Err(e) = self.replica.store().put_meta(ACCEPTED_META, &accepted) {
            return Response::Refused(format!("the assignment could not be stored: {e}"));
        }
        self.accepted = accepted;
        Response::Ack
    }
}
