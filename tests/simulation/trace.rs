//! What a run reports: its counters, its failure, and its trace (formatted only when asked).

use std::collections::{BTreeSet, VecDeque};

use codex_mesh::proto::crdt::NodeId;
use codex_mesh::proto::election::{Membership, Message};

use crate::net::{Payload, Request, Response};

/// Format and record a trace line, only when tracing (formatting is the expensive part).
macro_rules! trace {
    ($sim:expr, $($arg:tt)*) => {
        if $sim.trace.is_some() {
            let line = format!($($arg)*);
            $sim.push_trace(line);
        }
    };
}

/// Counters of one run (summed over seeds), so the tests can assert that faults happened.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub steps: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub crashes: u64,
    pub pauses: u64,
    pub freezes: u64,
    pub clock_jumps: u64,
    pub splits: u64,
    pub link_cuts: u64,
    pub leaders: u64,
    pub voter_changes: u64,
    pub writes: u64,
    pub anti_entropy_rounds: u64,
    pub anti_entropy_pages: u64,
    pub forged: u64,
    pub refused_records: u64,
    pub max_term: u64,
    pub jobs: u64,
    pub cancels: u64,
    pub rounds: u64,
    pub reads: u64,
    pub commits: u64,
    pub adopted: u64,
    pub conflicts: u64,
    pub deliveries: u64,
    pub refusals: u64,
    pub lost_responses: u64,
    pub timeouts: u64,
    pub runs: u64,
    pub stopped_runs: u64,
    pub killed_runs: u64,
    pub lost_attempts: u64,
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        let max_term = self.max_term.max(other.max_term);
        let pairs = [
            (&mut self.steps, other.steps),
            (&mut self.delivered, other.delivered),
            (&mut self.dropped, other.dropped),
            (&mut self.duplicated, other.duplicated),
            (&mut self.crashes, other.crashes),
            (&mut self.pauses, other.pauses),
            (&mut self.freezes, other.freezes),
            (&mut self.clock_jumps, other.clock_jumps),
            (&mut self.splits, other.splits),
            (&mut self.link_cuts, other.link_cuts),
            (&mut self.leaders, other.leaders),
            (&mut self.voter_changes, other.voter_changes),
            (&mut self.writes, other.writes),
            (&mut self.anti_entropy_rounds, other.anti_entropy_rounds),
            (&mut self.anti_entropy_pages, other.anti_entropy_pages),
            (&mut self.forged, other.forged),
            (&mut self.refused_records, other.refused_records),
            (&mut self.jobs, other.jobs),
            (&mut self.cancels, other.cancels),
            (&mut self.rounds, other.rounds),
            (&mut self.reads, other.reads),
            (&mut self.commits, other.commits),
            (&mut self.adopted, other.adopted),
            (&mut self.conflicts, other.conflicts),
            (&mut self.deliveries, other.deliveries),
            (&mut self.refusals, other.refusals),
            (&mut self.lost_responses, other.lost_responses),
            (&mut self.timeouts, other.timeouts),
            (&mut self.runs, other.runs),
            (&mut self.stopped_runs, other.stopped_runs),
            (&mut self.killed_runs, other.killed_runs),
            (&mut self.lost_attempts, other.lost_attempts),
        ];
        for (mine, theirs) in pairs {
            *mine += theirs;
        }
        self.max_term = max_term;
    }
}

/// An invariant violation.
#[derive(Debug)]
pub struct Failure {
    pub at: u64,
    pub step: u64,
    pub what: String,
}

/// The result of a run, its counters and (when traced) its trace.
pub struct Outcome {
    pub result: Result<(), Failure>,
    pub stats: Stats,
    pub trace: Vec<String>,
}

/// The trace of a run.
pub struct Trace {
    /// Keep only this many lines (all when `None`).
    pub keep: Option<usize>,
    pub lines: VecDeque<String>,
}

impl Trace {
    /// Add a line stamped with the global time.
    pub fn push(&mut self, now: u64, line: String) {
        self.lines.push_back(format!("{now:>7} {line}"));
        if let Some(keep) = self.keep {
            while self.lines.len() > keep {
                self.lines.pop_front();
            }
        }
    }
}

pub fn show_config(m: &Membership) -> String {
    let list = |set: &BTreeSet<NodeId>| set.iter().cloned().collect::<Vec<_>>().join(",");
    match &m.joining {
        Some(joining) => format!(
            "({},{})[{}]+[{}]",
            m.term,
            m.index,
            list(&m.voters),
            list(joining)
        ),
        None => format!("({},{})[{}]", m.term, m.index, list(&m.voters)),
    }
}

pub fn show_message(msg: &Message) -> String {
    match msg {
        Message::PreVote { term, position } => format!("PreVote t{term} pos{position:?}"),
        Message::PreVoteReply {
            term,
            granted,
            leader,
        } => format!("PreVoteReply t{term} granted={granted} leader={leader:?}"),
        Message::Vote { term, position } => format!("Vote t{term} pos{position:?}"),
        Message::VoteReply { term, granted } => format!("VoteReply t{term} granted={granted}"),
        Message::Heartbeat {
            term,
            membership,
            sent_at,
        } => format!(
            "Heartbeat t{term} {} sent@{sent_at}",
            show_config(membership)
        ),
        Message::HeartbeatAck {
            term,
            sent_at,
            ok,
            position,
        } => format!("HeartbeatAck t{term} sent@{sent_at} ok={ok} pos{position:?}"),
        Message::WhoLeads { term } => format!("WhoLeads t{term}"),
    }
}

/// A short job id for the trace (the end of the ULID, which is the random part).
pub fn short(id: &str) -> &str {
    &id[id.len().saturating_sub(4)..]
}

pub fn show_payload(payload: &Payload) -> String {
    match payload {
        Payload::Election(msg) => show_message(msg),
        Payload::Delta(key, _) => format!("Delta {key}"),
        Payload::Summary(_) => "Summary".to_string(),
        Payload::Digests(buckets, digests) => {
            format!("Digests {} buckets {} keys", buckets.len(), digests.len())
        }
        Payload::Records {
            records,
            want,
            more,
        } => format!(
            "Records {} records, want {}, more={more}",
            records.len(),
            want.len()
        ),
        Payload::Request { id, body } => match body {
            Request::Read { term } => format!("#{id} Read t{term}"),
            Request::Commit(record) => format!(
                "#{id} Commit job {} {:?}",
                short(&record.spec.id),
                record.progress.0.assignment
            ),
            Request::Assign(record) => format!(
                "#{id} Assign job {} {:?}",
                short(&record.spec.id),
                record.progress.0.assignment
            ),
        },
        Payload::Response { id, body } => match body {
            Response::Ack => format!("#{id} Ack"),
            Response::Conflict(record) => format!(
                "#{id} Conflict (attempt {} {:?} {:?})",
                record.progress.0.attempt, record.progress.0.status, record.progress.0.assignment
            ),
            Response::Refused(why) => format!("#{id} Refused: {why}"),
            Response::Entries(entries) => format!("#{id} {} accepted", entries.len()),
        },
    }
}
