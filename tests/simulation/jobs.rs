//! Jobs, the master's half: users submit and cancel at any node, and the master runs the real
//! [`Dispatcher`] as the runtime's scheduler does: a round every 250 ms and after any job
//! change, its steps carried out with the lease checked again before every read, commit and
//! delivery; voters answer reads and judge commits with `commit::accept`.

use std::collections::{BTreeMap, VecDeque};

use codex_mesh::proto::attempts::Attempts;
use codex_mesh::proto::crdt::{MaxReg, NodeId, Stamp};
use codex_mesh::proto::dispatch::commit::{self, Refusal};
use codex_mesh::proto::dispatch::worker::Fence;
use codex_mesh::proto::dispatch::{is_open, CommitAnswer, DeliverAnswer, Dispatcher, Step, World};
use codex_mesh::proto::ids::ulid;
use codex_mesh::proto::jobs::{JobRecord, JobSpec, JobStatus, Origin, Progress, Sandbox, Target};
use codex_mesh::proto::lookup::RecordLookup;
use codex_mesh::proto::records::{Key, Record};
use codex_mesh::proto::schedule::NodeLoad;

use crate::net::{Kind, Pending, Request, Response};
use crate::sim::Sim;
use crate::trace::{short, Failure};
use crate::LOST_REQUEUES;

/// How often the master schedules without being woken (the runtime's `SCHEDULE_EVERY_MS`).
const SCHEDULE_EVERY_MS: u64 = 250;
/// A node is online to the master if heard from within this (the runtime's liveness window).
const ONLINE_WINDOW_MS: u64 = 6_000;
/// Job slots of every node.
const SLOTS: u32 = 3;

impl Sim {
    /// What the master knows of every member.
    fn loads(&self, i: usize) -> Vec<NodeLoad> {
        let now = self.mono(i);
        (0..self.nodes.len())
            .map(|j| NodeLoad {
                id: self.nodes[j].id.clone(),
                name: self.nodes[j].id.clone(),
                tags: Vec::new(),
                slots: SLOTS,
                running: 0,
                online: j == i
                    || self.nodes[i].heard[j]
                        .is_some_and(|t| now.saturating_sub(t) < ONLINE_WINDOW_MS),
                draining: false,
                removed: false,
                agents: vec!["codex".to_string()],
                local_repos: false,
            })
            .collect()
    }

    /// Run `f` with node `i`'s dispatcher and a [`World`] of this moment.
    fn with_world<R>(
        &mut self,
        i: usize,
        f: impl FnOnce(&mut Dispatcher, &mut World<'_>) -> R,
    ) -> R {
        let (now, wall) = (self.mono(i), self.wall(i));
        let nodes = self.loads(i);
        let started: BTreeMap<NodeId, u64> = self
            .nodes
            .iter()
            .map(|n| (n.id.clone(), n.started_wall))
            .collect();
        let node = &mut self.nodes[i];
        let term = node.election.as_ref().map_or(0, |e| e.term());
        let me = node.id.clone();
        let mut dispatcher = std::mem::take(&mut node.dispatcher);
        let hlc = &mut node.hlc;
        let mut stamp = || Stamp {
            at: hlc.tick(wall),
            by: me.clone(),
        };
        let by = node.id.clone();
        let mut world = World {
            now,
            wall_ms: wall,
            me: &by,
            term,
            nodes: &nodes,
            started_at_ms: &started,
            lost_requeues: LOST_REQUEUES,
            stamp: &mut stamp,
        };
        let result = f(&mut dispatcher, &mut world);
        self.nodes[i].dispatcher = dispatcher;
        result
    }

    /// Scheduling rounds asked for while handling the last event.
    pub fn schedule_woken(&mut self) -> Result<(), Failure> {
        for i in 0..self.nodes.len() {
            if std::mem::take(&mut self.nodes[i].woken)
                && self.nodes[i].up(self.now)
                && self.acting_master(i)
            {
                self.round(i)?;
            }
        }
        Ok(())
    }

    fn round(&mut self, i: usize) -> Result<(), Failure> {
        self.nodes[i].next_round = self.mono(i) + SCHEDULE_EVERY_MS;
        self.stats.rounds += 1;
        let jobs: Vec<JobRecord> = self.nodes[i]
            .state
            .all_jobs()
            .filter(|job| is_open(job, LOST_REQUEUES))
            .cloned()
            .collect();
        let steps = self.with_world(i, |d, world| d.round(&jobs, world));
        self.run_steps(i, steps)?;
        // Records written by this round woke the scheduler again; nothing is left to do.
        self.nodes[i].woken = false;
        Ok(())
    }

    /// Carry out the dispatcher's steps (and those that local answers lead to).
    fn run_steps(&mut self, i: usize, steps: Vec<Step>) -> Result<(), Failure> {
        let mut queue: VecDeque<Step> = steps.into();
        while let Some(step) = queue.pop_front() {
            match step {
                Step::Write(record) => {
                    let key = Key::Job(record.spec.id.to_string()).encode();
                    self.write(i, key, Record::Job(record))?;
                }
                Step::Read => {
                    if !self.acting_master(i) {
                        continue;
                    }
                    self.stats.reads += 1;
                    let term = self.nodes[i].election.as_ref().map_or(0, |e| e.term());
                    trace!(
                        self,
                        "n{i} reads the voters' accepted assignments in t{term}"
                    );
                    for (voter, j) in self.voters(i) {
                        if j == i {
                            let me = self.nodes[i].id.clone();
                            let answer = self.answer_read(i, &me, term);
                            self.read_answered(i, term, &voter, answer);
                        } else {
                            let pending = Pending {
                                to: j,
                                job: String::new(),
                                key: (0, 0),
                                kind: Kind::Read(term),
                            };
                            self.request(i, j, Request::Read { term }, pending);
                        }
                    }
                }
                Step::Commit(record) => {
                    if !self.acting_master(i) {
                        continue;
                    }
                    self.stats.commits += 1;
                    let id = record.spec.id.clone();
                    let key = record.progress.0.assignment;
                    trace!(self, "n{i} commits job {} {key:?}", short(&id));
                    for (voter, j) in self.voters(i) {
                        if j == i {
                            let answer = match self.judge_commit(i, &voter, &record)? {
                                Response::Ack => CommitAnswer::Accepted,
                                Response::Conflict(theirs) => CommitAnswer::Conflict(theirs),
                                other => CommitAnswer::Unclear(format!("{other:?}")),
                            };
                            queue.extend(self.commit_answered(i, &id, key, &voter, answer));
                        } else {
                            let pending = Pending {
                                to: j,
                                job: id.clone(),
                                key,
                                kind: Kind::Commit,
                            };
                            self.request(i, j, Request::Commit(record.clone()), pending);
                        }
                    }
                }
                Step::Deliver(record) => {
                    if !self.acting_master(i) {
                        continue;
                    }
                    let Some(node) = record.assignment.as_ref().map(|a| a.0.node.clone()) else {
                        continue;
                    };
                    self.stats.deliveries += 1;
                    let (id, key) = (record.spec.id.clone(), record.progress.0.assignment);
                    trace!(self, "n{i} delivers job {} {key:?} to {node}", short(&id));
                    if node == self.nodes[i].id {
                        let from = node.clone();
                        let response = self.accept_assignment(i, &record, &from)?;
                        queue.extend(self.deliver_answered(i, &id, key, Ok(response)));
                    } else if let Some(j) = self.index_of(&node) {
                        let pending = Pending {
                            to: j,
                            job: id,
                            key,
                            kind: Kind::Assign,
                        };
                        self.request(i, j, Request::Assign(record), pending);
                    }
                }
            }
        }
        Ok(())
    }

    /// The voters of node `i`'s configuration (itself included), with their indices.
    fn voters(&self, i: usize) -> Vec<(NodeId, usize)> {
        let voters = match self.nodes[i].election.as_ref() {
            Some(e) => e.membership().all_voters(),
            None => return Vec::new(),
        };
        voters
            .into_iter()
            .filter_map(|v| self.index_of(&v).map(|j| (v, j)))
            .collect()
    }

    fn read_answered(&mut self, i: usize, term: u64, voter: &NodeId, answer: Response) {
        let Response::Entries(entries) = answer else {
            return;
        };
        let node = &mut self.nodes[i];
        let Some(membership) = node.election.as_ref().map(|e| e.membership().clone()) else {
            return;
        };
        node.dispatcher
            .on_read_answer(term, voter, entries, &|set| membership.is_quorum(set));
        // The read may be complete: schedule at once.
        node.woken = true;
    }

    /// A voter's answer to a read: at the master's term, every assignment it accepted for
    /// jobs its replica does not show as ended.
    pub fn answer_read(&mut self, i: usize, from: &NodeId, term: u64) -> Response {
        let node = &mut self.nodes[i];
        let Some(election) = node.election.as_ref() else {
            return Response::Refused("down".into());
        };
        if election.term() != term || election.leader() != Some(from) {
            return Response::Refused(format!("not the leader of term {term} here"));
        }
        if self.params.broken_voters {
            return Response::Entries(Vec::new());
        }
        let state = &node.state;
        commit::prune(&mut node.accepted, |id| state.job(id));
        Response::Entries(
            node.accepted
                .iter()
                .map(|(id, a)| (id.clone(), a.clone()))
                .collect(),
        )
    }

    fn commit_answered(
        &mut self,
        i: usize,
        id: &str,
        key: (u64, u64),
        voter: &NodeId,
        answer: CommitAnswer,
    ) -> Vec<Step> {
        let now = self.mono(i);
        let node = &mut self.nodes[i];
        let Some(membership) = node.election.as_ref().map(|e| e.membership().clone()) else {
            return Vec::new();
        };
        node.dispatcher
            .on_commit_answer(id, key, voter, answer, now, &|set| {
                membership.is_quorum(set)
            })
    }

    fn deliver_answered(
        &mut self,
        i: usize,
        id: &str,
        key: (u64, u64),
        result: Result<Response, String>,
    ) -> Vec<Step> {
        let answer = match result {
            Ok(Response::Ack) => DeliverAnswer::Ack,
            Ok(Response::Refused(why)) => DeliverAnswer::Refused(why),
            Ok(other) => DeliverAnswer::Unclear(format!("unexpected answer {other:?}")),
            Err(e) => DeliverAnswer::Unclear(e),
        };
        let Some(job) = self.job(i, id) else {
            return Vec::new();
        };
        self.with_world(i, |d, world| d.on_deliver_answer(&job, key, answer, world))
    }

    /// The answer (or the timeout) of a request node `i` sent.
    pub fn answered(
        &mut self,
        i: usize,
        pending: Pending,
        result: Result<Response, String>,
    ) -> Result<(), Failure> {
        let (id, key) = (pending.job.as_str(), pending.key);
        let steps = match pending.kind {
            Kind::Read(term) => {
                let voter = self.nodes[pending.to].id.clone();
                if let Ok(answer) = result {
                    self.read_answered(i, term, &voter, answer);
                }
                Vec::new()
            }
            Kind::Commit => {
                let answer = match result {
                    Ok(Response::Ack) => CommitAnswer::Accepted,
                    Ok(Response::Conflict(record)) if record.spec.id == id => {
                        // Take the voter's newer state through the same checks as any peer's.
                        self.stats.conflicts += 1;
                        self.merge(i, &Key::Job(id.to_string()).encode(), &Record::Job(record))?;
                        match self.job(i, id) {
                            Some(current) => CommitAnswer::Conflict(Box::new(current)),
                            None => CommitAnswer::Unclear("unknown job".into()),
                        }
                    }
                    Ok(other) => CommitAnswer::Unclear(format!("{other:?}")),
                    Err(e) => CommitAnswer::Unclear(e),
                };
                let voter = self.nodes[pending.to].id.clone();
                self.commit_answered(i, id, key, &voter, answer)
            }
            Kind::Assign => self.deliver_answered(i, id, key, result),
        };
        self.run_steps(i, steps)
    }

    /// A voter's check of an assignment: `commit::accept` at this node's term, from that
    /// term's leader; what it accepts is persisted before the answer.
    pub fn judge_commit(
        &mut self,
        i: usize,
        from: &NodeId,
        record: &JobRecord,
    ) -> Result<Response, Failure> {
        let id = record.spec.id.clone();
        let current = self.job(i, &id);
        let node = &self.nodes[i];
        let Some(election) = node.election.as_ref() else {
            return Ok(Response::Refused("down".into()));
        };
        let fence = Fence {
            me: &node.id,
            term: election.term(),
            leader: election.leader(),
            from,
        };
        let verdict = if self.params.broken_voters {
            Ok(())
        } else {
            commit::accept(current.as_ref(), record, fence)
        };
        match verdict {
            Ok(()) => {}
            Err(Refusal::Malformed(why) | Refusal::Stale(why)) => {
                return Ok(Response::Refused(why))
            }
            Err(Refusal::Conflict(why)) => {
                trace!(self, "n{i} refuses the commit of {}: {why}", short(&id));
                return Ok(match current {
                    Some(current) => Response::Conflict(Box::new(current)),
                    None => Response::Refused(why),
                });
            }
        }
        if let Some(assignment) = record.assignment.as_ref() {
            commit::remember(&mut self.nodes[i].accepted, &id, &assignment.0);
        }
        Ok(Response::Ack)
    }

    /// A user submits a job at node `i` (nothing happens if the node is down).
    pub fn submit(&mut self, i: usize) -> Result<(), Failure> {
        if !self.nodes[i].up(self.now) {
            return Ok(());
        }
        self.submitted += 1;
        self.stats.jobs += 1;
        let wall = self.wall(i);
        let random = u128::from(self.rng.next_u64()) << 16 | u128::from(self.submitted);
        let n = self.nodes.len();
        let target = if self.rng.permille(200) {
            Target::Node(self.nodes[self.rng.index(n)].id.clone())
        } else {
            Target::Any
        };
        let spec = JobSpec {
            id: ulid(wall, random),
            target,
            repos: Vec::new(),
            prompt: format!("job {}", self.submitted),
            agent: "codex".to_string(),
            model: None,
            sandbox: Sandbox::default(),
            timeout_secs: 600,
            idle_timeout_secs: 120,
            origin: Origin {
                kind: "cli".to_string(),
                reply_to: None,
                user: None,
            },
            submitted_via: self.nodes[i].id.clone(),
            submitted_at_ms: wall,
            idempotency_key: None,
            extra: Default::default(),
        };
        let progress = Progress {
            attempt: 1,
            assignment: (0, 0),
            status: JobStatus::Queued,
            reason: None,
            result: None,
            stamp: self.stamp(i),
        };
        let key = Key::Job(spec.id.to_string()).encode();
        trace!(self, "n{i}: a user submits job {}", short(&spec.id));
        let record = JobRecord {
            compacted: false,
            spec,
            assignment: None,
            progress: MaxReg(progress),
            attempts: Attempts::default(),
            extra: Default::default(),
        };
        self.write(i, key, Record::Job(Box::new(record)))
    }

    /// A user cancels an unfinished job that node `i` knows, as the runtime's cancel does.
    pub fn cancel(&mut self, i: usize) -> Result<(), Failure> {
        if !self.nodes[i].up(self.now) {
            return Ok(());
        }
        let open: Vec<JobRecord> = self.nodes[i]
            .state
            .all_jobs()
            .filter(|job| !job.progress.0.status.is_terminal())
            .cloned()
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        let mut record = open[self.rng.index(open.len())].clone();
        self.stats.cancels += 1;
        let current = record.progress.0.clone();
        let reason = Some(format!("cancelled via n{i}"));
        record.progress.0 = Progress {
            status: JobStatus::Cancelled,
            reason: reason.clone(),
            stamp: self.stamp(i),
            ..current.clone()
        };
        let (wall, stamp) = (self.wall(i), self.stamp(i));
        record.attempts.ended(
            current.attempt,
            None,
            JobStatus::Cancelled,
            reason,
            wall,
            stamp,
        );
        trace!(self, "n{i}: a user cancels job {}", short(&record.spec.id));
        let key = Key::Job(record.spec.id.to_string()).encode();
        self.write(i, key, Record::Job(Box::new(record)))
    }
}
