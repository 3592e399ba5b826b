//! The simulated network: one-way messages with delay, loss, duplication and partitions, the
//! request-response exchanges of the scheduler (whose answers can be lost: the sender then sees
//! an unclear answer after a timeout), gossip and paged anti-entropy.

use codex_mesh::proto::election::Message;
use codex_mesh::proto::jobs::{Assignment, JobRecord};
use codex_mesh::proto::records::Record;

use crate::sim::{Event, Sim};
use crate::trace::{show_payload, Failure};
use crate::{DELAY_MS, PAGE_LIMIT, SLOW_DELAY_MS};

/// Pages in a row that change nothing before a session stops (the runtime's `MAX_IDLE_ROUNDS`).
const MAX_IDLE_ROUNDS: u32 = 8;

/// A request without an answer within this is given up as unclear.
pub const REQUEST_TIMEOUT_MS: u64 = 2_000;
/// Chance (per mille) during the chaos phase that the answer to a handled request is lost.
pub const LOST_RESPONSE_PERMILLE: u64 = 100;

/// A scheduler request.
#[derive(Clone, Debug)]
pub enum Request {
    /// Report the assignments accepted (to a voter, once per term of the master).
    Read { term: u64 },
    /// Accept an assignment (to a voter).
    Commit(Box<JobRecord>),
    /// Run a committed assignment (to its worker).
    Assign(Box<JobRecord>),
}

/// The answer to a [`Request`].
#[derive(Clone, Debug)]
pub enum Response {
    Ack,
    Conflict(Box<JobRecord>),
    Refused(String),
    /// A voter's accepted assignments.
    Entries(Vec<(String, Assignment)>),
}

/// What a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read(u64),
    Commit,
    Assign,
}

/// What a request was for, kept by the sender until it is answered or timed out.
#[derive(Clone, Debug)]
pub struct Pending {
    pub to: usize,
    pub job: String,
    pub key: (u64, u64),
    pub kind: Kind,
}

/// What travels between simulated nodes.
#[derive(Clone, Debug)]
pub enum Payload {
    Election(Message),
    /// A gossiped change.
    Delta(String, Box<Record>),
    /// Anti-entropy step 1: the initiator's bucket summary.
    Summary(Vec<u64>),
    /// Step 2: the differing buckets and the answerer's digests in them.
    Digests(Vec<u16>, Vec<(String, u64)>),
    /// Step 3 and 4: records the receiver lacks, keys the sender wants, and whether the sender
    /// left records out (the receiver then starts another round: paging).
    Records {
        records: Vec<(String, Record)>,
        want: Vec<String>,
        more: bool,
    },
    Request {
        id: u64,
        body: Request,
    },
    Response {
        id: u64,
        body: Response,
    },
}

impl Sim {
    pub fn send(&mut self, from: usize, to: usize, mut payload: Payload) {
        if !self.reachable(from, to) || (self.chaos && self.rng.permille(self.drop_permille)) {
            self.stats.dropped += 1;
            return;
        }
        let copies = if self.chaos && self.rng.permille(self.dup_permille) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        let (from_incarnation, to_incarnation) =
            (self.nodes[from].incarnation, self.nodes[to].incarnation);
        for copy in 1..=copies {
            let delay = if self.chaos && self.rng.permille(self.slow_permille) {
                self.rng.range(SLOW_DELAY_MS)
            } else {
                self.rng.range(DELAY_MS)
            };
            let payload = if copy < copies {
                payload.clone()
            } else {
                std::mem::replace(&mut payload, Payload::Summary(Vec::new()))
            };
            let event = Event::Deliver {
                from,
                to,
                from_incarnation,
                to_incarnation,
                payload,
            };
            self.schedule(delay, event);
        }
    }

    /// Send a scheduler request and wait for its answer (or the timeout).
    pub fn request(&mut self, from: usize, to: usize, body: Request, pending: Pending) {
        let id = self.fresh_id();
        self.nodes[from].pending.insert(id, pending);
        let incarnation = self.nodes[from].incarnation;
        self.schedule(
            REQUEST_TIMEOUT_MS,
            Event::Timeout {
                node: from,
                incarnation,
                id,
            },
        );
        self.send(from, to, Payload::Request { id, body });
    }

    /// Answer a handled request; the answer may be lost on the way.
    fn respond(&mut self, from: usize, to: usize, id: u64, body: Response) {
        if self.chaos && self.rng.permille(LOST_RESPONSE_PERMILLE) {
            self.stats.lost_responses += 1;
            return;
        }
        self.send(from, to, Payload::Response { id, body });
    }

    pub fn deliver(
        &mut self,
        from: usize,
        to: usize,
        from_incarnation: u64,
        to_incarnation: u64,
        payload: Payload,
    ) -> Result<(), Failure> {
        let lost = self.nodes[from].incarnation != from_incarnation
            || self.nodes[to].incarnation != to_incarnation
            || self.nodes[to].election.is_none()
            || !self.reachable(from, to);
        if lost {
            self.stats.dropped += 1;
            return Ok(());
        }
        if !self.nodes[to].up(self.now) {
            // The receiver is stopped: the message waits in its socket buffer, or is lost.
            if self.rng.permille(500) {
                self.stats.dropped += 1;
            } else {
                let delay = self.nodes[to].resumes_at() - self.now + self.rng.range((0, 30));
                self.schedule(
                    delay,
                    Event::Deliver {
                        from,
                        to,
                        from_incarnation,
                        to_incarnation,
                        payload,
                    },
                );
            }
            return Ok(());
        }
        self.stats.delivered += 1;
        trace!(self, "n{from} -> n{to}: {}", show_payload(&payload));
        let now = self.mono(to);
        self.nodes[to].heard[from] = Some(now);
        match payload {
            Payload::Election(msg) => {
                let from_id = self.nodes[from].id.clone();
                let actions = match self.nodes[to].election.as_mut() {
                    Some(election) => election.step(&from_id, msg, now),
                    None => return Ok(()),
                };
                self.apply(to, actions)?;
                self.after_step(to)
            }
            Payload::Delta(key, record) => self.merge(to, &key, &record),
            Payload::Summary(theirs) => {
                let state = &self.nodes[to].state;
                let buckets = state.differing_buckets(&theirs);
                if !buckets.is_empty() {
                    let digests = state.digests_in(&buckets);
                    self.send(to, from, Payload::Digests(buckets, digests));
                }
                Ok(())
            }
            Payload::Digests(buckets, theirs) => {
                let answer =
                    self.nodes[to]
                        .state
                        .reconcile(&buckets, &theirs, PAGE_LIMIT, usize::MAX, 0);
                if !answer.records.is_empty() || !answer.want.is_empty() || answer.more {
                    let payload = Payload::Records {
                        records: answer.records,
                        want: answer.want,
                        more: answer.more,
                    };
                    self.send(to, from, payload);
                }
                Ok(())
            }
            Payload::Records {
                records,
                want,
                more,
            } => self.records(from, to, records, want, more),
            Payload::Request { id, body } => {
                let from_id = self.nodes[from].id.clone();
                let answer = match body {
                    Request::Read { term } => self.answer_read(to, &from_id, term),
                    Request::Commit(record) => self.judge_commit(to, &from_id, &record)?,
                    Request::Assign(record) => self.accept_assignment(to, &record, &from_id)?,
                };
                self.respond(to, from, id, answer);
                Ok(())
            }
            Payload::Response { id, body } => match self.nodes[to].pending.remove(&id) {
                Some(pending) => self.answered(to, pending, Ok(body)),
                None => Ok(()), // a duplicate, or answered after its timeout
            },
        }
    }

    /// A request of node `i` timed out (if still unanswered).
    pub fn timed_out(&mut self, i: usize, id: u64) -> Result<(), Failure> {
        match self.nodes[i].pending.remove(&id) {
            Some(pending) => {
                self.stats.timeouts += 1;
                trace!(self, "n{i}: request #{id} timed out");
                self.answered(i, pending, Err("timed out".to_string()))
            }
            None => Ok(()),
        }
    }

    /// Anti-entropy steps 3 and 4.
    fn records(
        &mut self,
        from: usize,
        to: usize,
        records: Vec<(String, Record)>,
        want: Vec<String>,
        more: bool,
    ) -> Result<(), Failure> {
        let before = self.nodes[to].state.bucket_summary();
        for (key, record) in &records {
            self.merge(to, key, record)?;
        }
        let changed = self.nodes[to].state.bucket_summary() != before;
        if !want.is_empty() {
            let state = &self.nodes[to].state;
            let mut page = Vec::new();
            let mut left_out = false;
            for key in &want {
                if let Some(record) = state.get(key) {
                    if page.len() < PAGE_LIMIT {
                        page.push((key.clone(), record.clone()));
                    } else {
                        left_out = true;
                        break;
                    }
                }
            }
            if !page.is_empty() || left_out {
                let payload = Payload::Records {
                    records: page,
                    want: Vec::new(),
                    more: left_out,
                };
                self.send(to, from, payload);
            }
        }
        // Rounds in a row that changed nothing here (records this node refuses for now, say
        // of a term it has not heard of) end the session, as in the runtime.
        let idle = self.sync_idle.entry((to, from)).or_insert(0);
        *idle = if changed { 0 } else { *idle + 1 };
        let go_on = *idle < MAX_IDLE_ROUNDS;
        if !go_on {
            self.sync_idle.remove(&(to, from));
        }
        if more && go_on {
            // The peer left records out: ask for the next page with a new round.
            self.stats.anti_entropy_pages += 1;
            let summary = self.nodes[to].state.bucket_summary();
            self.send(to, from, Payload::Summary(summary));
        }
        Ok(())
    }

    pub fn start_anti_entropy(&mut self, i: usize) {
        let peers: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| j != i && self.nodes[j].election.is_some() && self.reachable(i, j))
            .collect();
        if peers.is_empty() {
            return;
        }
        let j = peers[self.rng.index(peers.len())];
        self.stats.anti_entropy_rounds += 1;
        trace!(self, "n{i} starts anti-entropy with n{j}");
        let summary = self.nodes[i].state.bucket_summary();
        self.send(i, j, Payload::Summary(summary));
    }
}
