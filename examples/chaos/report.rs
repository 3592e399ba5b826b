//! The outcome of a chaos run: checks, human-readable text and one JSON line.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::ledger::Summary;
use crate::views::{JobState, Observation};

/// One injected fault.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Seconds after the first submission when the node was killed.
    pub at_secs: f64,
    /// Name of the killed node.
    pub node: String,
    /// Whether it was the master when it was killed.
    pub on_master: bool,
    /// Planned time between `kill -9` and the restart.
    pub down_ms: u64,
    /// From `kill -9` until the restarted node served its API again.
    pub back_ms: u64,
    /// Whether the mesh converged again (all nodes online, one master) before the next fault.
    pub settled: bool,
}

/// One job submission (possibly retried on other nodes with the same key).
#[derive(Debug, Clone)]
pub struct Submission {
    /// The `Idempotency-Key`.
    pub key: String,
    /// The job id the mesh answered with, if any.
    pub id: Option<String>,
    /// Requests made.
    pub tries: u32,
    /// The first error, if any request failed.
    pub first_error: Option<String>,
    /// Seconds after the first submission when this one ended (accepted or given up).
    pub done_secs: f64,
}

/// Everything measured in one run.
pub struct Outcome {
    /// The options, as JSON.
    pub options: Value,
    /// Number of nodes.
    pub nodes: usize,
    /// Submissions in order.
    pub submissions: Vec<Submission>,
    /// Faults in order.
    pub faults: Vec<Fault>,
    /// The last look at the nodes after the drain.
    pub observation: Observation,
    /// Seconds after the first submission when the last submission and the last fault were
    /// over (the drain started).
    pub run_end_secs: f64,
    /// Seconds after the first submission when the nodes agreed that every job was final;
    /// `None` if the drain deadline passed first.
    pub settled_at_secs: Option<f64>,
    /// The drain deadline in seconds.
    pub drain_deadline_secs: u64,
    /// Final state of each run job (as the first node listing it shows it).
    pub finals: BTreeMap<String, JobState>,
    /// Idempotency keys the mesh created more than one job for, with the ids.
    pub duplicates: Vec<(String, Vec<String>)>,
    /// The ledger.
    pub ledger: Summary,
}

impl Outcome {
    /// When the last submission ended (seconds after the first).
    fn last_submit_secs(&self) -> f64 {
        self.submissions
            .iter()
            .map(|s| s.done_secs)
            .fold(0.0, f64::max)
    }

    /// When the last killed node served its API again (seconds after the first submission).
    fn last_fault_back_secs(&self) -> Option<f64> {
        self.faults
            .iter()
            .map(|f| f.at_secs + f.back_ms as f64 / 1000.0)
            .reduce(f64::max)
    }

    /// Drain time after the last fault (its node back) and after the last submission.
    fn drain_secs(&self) -> (Option<f64>, Option<f64>) {
        let settled = self.settled_at_secs;
        let after_fault = settled.zip(self.last_fault_back_secs()).map(|(s, f)| s - f);
        (after_fault, settled.map(|s| s - self.last_submit_secs()))
    }

    fn accepted(&self) -> usize {
        self.submissions.iter().filter(|s| s.id.is_some()).count()
    }

    fn submit_failures(&self) -> usize {
        self.submissions.len() - self.accepted()
    }

    fn retried(&self) -> usize {
        self.submissions.iter().filter(|s| s.tries > 1).count()
    }

    fn on_master(&self) -> usize {
        self.faults.iter().filter(|f| f.on_master).count()
    }

    fn statuses(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for state in self.finals.values() {
            *counts.entry(state.status.clone()).or_default() += 1;
        }
        counts
    }

    fn count(&self, status: &str) -> usize {
        self.finals.values().filter(|s| s.status == status).count()
    }

    fn attempts(&self) -> BTreeMap<u64, usize> {
        let mut counts = BTreeMap::new();
        for state in self.finals.values() {
            *counts.entry(state.attempt).or_default() += 1;
        }
        counts
    }

    /// Jobs the agent started more often than the job's final attempt number says.
    fn starts_beyond_attempts(&self) -> BTreeSet<String> {
        self.finals
            .iter()
            .filter(|(id, state)| {
                let starts = self.ledger.starts_by_job.get(*id).copied().unwrap_or(0);
                starts as u64 > state.attempt
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether the ledger names attempts; if not, the double-execution check falls back to
    /// comparing starts with the final attempt number.
    fn attempts_known(&self) -> bool {
        self.ledger.starts > 0 && self.ledger.without_attempt == 0
    }

    fn double_executions(&self) -> usize {
        if self.attempts_known() {
            self.ledger.doubles.len()
        } else {
            self.starts_beyond_attempts().len()
        }
    }

    fn non_terminal(&self) -> usize {
        self.observation
            .non_terminal
            .union(&self.observation.missing)
            .count()
    }

    fn agree(&self) -> bool {
        self.observation.unanswered.is_empty() && self.observation.disagree.is_empty()
    }

    /// `(check, passed, detail)` for every check.
    pub fn checks(&self) -> Vec<(&'static str, bool, String)> {
        vec![
            (
                "every submission accepted",
                self.submit_failures() == 0,
                format!("{} not accepted", self.submit_failures()),
            ),
            (
                "no duplicate jobs per idempotency key",
                self.duplicates.is_empty(),
                format!("{} keys with more than one job", self.duplicates.len()),
            ),
            (
                "no job left non-final after the drain",
                self.non_terminal() == 0,
                format!("{} not final or missing on some node", self.non_terminal()),
            ),
            (
                "no job lost for good",
                self.count("lost") == 0,
                format!("{} lost", self.count("lost")),
            ),
            (
                "no execution twice within one attempt",
                self.double_executions() == 0,
                format!(
                    "{} {}",
                    self.double_executions(),
                    if self.attempts_known() {
                        "(job, attempt) pairs started more than once"
                    } else {
                        "jobs started more often than their attempt number (ledger lacks attempts)"
                    }
                ),
            ),
            (
                "all nodes agree on every job",
                self.agree(),
                format!(
                    "{} disagreeing, {} nodes not answering",
                    self.observation.disagree.len(),
                    self.observation.unanswered.len()
                ),
            ),
        ]
    }

    /// Names of the failed checks.
    pub fn failed_checks(&self) -> Vec<&'static str> {
        self.checks()
            .into_iter()
            .filter(|(_, ok, _)| !ok)
            .map(|(name, _, _)| name)
            .collect()
    }

    /// Human-readable report on stdout.
    pub fn print_text(&self) {
        println!();
        println!(
            "chaos: {} nodes, {} jobs submitted ({} accepted, {} retried on another node, {} not accepted)",
            self.nodes,
            self.submissions.len(),
            self.accepted(),
            self.retried(),
            self.submit_failures()
        );
        println!(
            "faults: {} kill -9 ({} on the master); down {}",
            self.faults.len(),
            self.on_master(),
            self.faults
                .iter()
                .map(|f| format!(
                    "{}{}@{:.1}s/{:.1}s{}",
                    f.node,
                    if f.on_master { "(M)" } else { "" },
                    f.at_secs,
                    f.down_ms as f64 / 1000.0,
                    if f.settled { "" } else { " unsettled" }
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let secs = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{s:.1} s"));
        match self.drain_secs() {
            (after_fault, Some(after_submit)) => println!(
                "drain: all jobs final and agreed {} after the last fault's node was back, {} after the last submission",
                secs(after_fault),
                secs(Some(after_submit))
            ),
            _ => println!(
                "drain: NOT settled within {} s after the end of the run at {:.1} s ({})",
                self.drain_deadline_secs,
                self.run_end_secs,
                self.observation.line()
            ),
        }
        println!("statuses at the end: {}", counts_text(&self.statuses()));
        println!("attempts needed: {}", counts_text(&self.attempts()));
        println!(
            "ledger: {} lines, {} starts, {} interrupted by a kill, {} without CODEX_MESH_JOB_ID, {} without CODEX_MESH_ATTEMPT, {} unparsable",
            self.ledger.lines,
            self.ledger.starts,
            self.ledger.interrupted,
            self.ledger.without_job_env,
            self.ledger.without_attempt,
            self.ledger.unparsable
        );
        for s in self
            .submissions
            .iter()
            .filter(|s| s.tries > 1 || s.id.is_none())
            .take(5)
        {
            println!(
                "  {} {} after {} tries; first error: {}",
                if s.id.is_some() {
                    "accepted"
                } else {
                    "NOT accepted"
                },
                s.key,
                s.tries,
                s.first_error.as_deref().unwrap_or("-")
            );
        }
        for (key, ids) in self.duplicates.iter().take(5) {
            println!("  duplicate: {key} -> {}", ids.join(", "));
        }
        for (job, attempt, n) in self.ledger.doubles.iter().take(5) {
            println!("  double execution: {job} attempt {attempt:?} started {n} times");
        }
        for example in &self.observation.examples {
            println!("  unsettled job: {example}");
        }
        for node in &self.observation.unanswered {
            println!("  not answering: {node}");
        }
        println!();
        for (name, ok, detail) in self.checks() {
            println!(
                "{:<42} {}{}",
                name,
                if ok { "ok" } else { "FAILED" },
                if ok {
                    String::new()
                } else {
                    format!(" ({detail})")
                }
            );
        }
        println!();
    }

    /// All figures as one JSON value.
    pub fn to_json(&self) -> Value {
        let faults: Vec<Value> = self
            .faults
            .iter()
            .map(|f| {
                json!({
                    "at_secs": f.at_secs,
                    "node": f.node,
                    "on_master": f.on_master,
                    "down_ms": f.down_ms,
                    "back_ms": f.back_ms,
                    "settled": f.settled,
                })
            })
            .collect();
        let attempts: BTreeMap<String, usize> = self
            .attempts()
            .into_iter()
            .map(|(a, n)| (a.to_string(), n))
            .collect();
        json!({
            "bench": "chaos",
            "options": self.options,
            "nodes": self.nodes,
            "jobs_submitted": self.submissions.len(),
            "jobs_accepted": self.accepted(),
            "submits_retried": self.retried(),
            "submit_failures": self.submit_failures(),
            "duplicate_keys": self.duplicates.len(),
            "faults": self.faults.len(),
            "faults_on_master": self.on_master(),
            "fault_list": faults,
            "non_terminal_after_drain": self.non_terminal(),
            "lost": self.count("lost"),
            "double_executions": self.double_executions(),
            "statuses": self.statuses(),
            "attempts": attempts,
            "drain_secs_after_last_fault": self.drain_secs().0,
            "drain_secs_after_last_submit": self.drain_secs().1,
            "last_submit_secs": self.last_submit_secs(),
            "last_fault_back_secs": self.last_fault_back_secs(),
            "settled_at_secs": self.settled_at_secs,
            "all_nodes_agree": self.agree(),
            "ledger": {
                "lines": self.ledger.lines,
                "starts": self.ledger.starts,
                "interrupted": self.ledger.interrupted,
                "without_job_env": self.ledger.without_job_env,
                "without_attempt": self.ledger.without_attempt,
                "unparsable": self.ledger.unparsable,
            },
            "failed_checks": self.failed_checks(),
            "ok": self.failed_checks().is_empty(),
        })
    }
}

fn counts_text<K: std::fmt::Display>(counts: &BTreeMap<K, usize>) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}
