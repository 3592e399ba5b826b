//! Every node's list of jobs, and whether the nodes agree that all jobs are finished.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use crate::common::ApiEndpoint;
use crate::http;

/// Page size of `GET /api/v1/jobs` (the API's maximum).
const PAGE: usize = 500;
/// Timeout of one page request.
const PAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Final statuses.
pub const TERMINAL: [&str; 5] = ["succeeded", "failed", "cancelled", "timed_out", "lost"];

/// What one node says about one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    /// `status` of the job view.
    pub status: String,
    /// `attempt` of the job view.
    pub attempt: u64,
    /// `prompt` of the job view.
    pub prompt: String,
}

impl JobState {
    /// Whether the status is final.
    pub fn terminal(&self) -> bool {
        TERMINAL.contains(&self.status.as_str())
    }
}

/// Jobs by id as one node lists them.
pub type NodeView = BTreeMap<String, JobState>;

/// Every job `endpoint` lists (pages of [`PAGE`]).
pub fn list_jobs(endpoint: &ApiEndpoint) -> Result<NodeView, String> {
    let mut jobs = NodeView::new();
    let mut offset = 0;
    loop {
        let path = format!("/api/v1/jobs?limit={PAGE}&offset={offset}");
        let list = http::get_json(endpoint, &path, PAGE_TIMEOUT)?;
        let page = list["jobs"]
            .as_array()
            .ok_or_else(|| format!("GET {path}: no jobs array"))?;
        let total = list["total"].as_u64().unwrap_or(0) as usize;
        for job in page {
            if let Some((id, state)) = job_state(job) {
                jobs.insert(id, state);
            }
        }
        offset += page.len();
        if page.is_empty() || offset >= total {
            return Ok(jobs);
        }
    }
}

fn job_state(job: &Value) -> Option<(String, JobState)> {
    Some((
        job["id"].as_str()?.to_owned(),
        JobState {
            status: job["status"].as_str()?.to_owned(),
            attempt: job["attempt"].as_u64().unwrap_or(0),
            prompt: job["prompt"].as_str().unwrap_or_default().to_owned(),
        },
    ))
}

/// One look at all nodes.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Nodes that did not answer, with why.
    pub unanswered: Vec<String>,
    /// Jobs some answering node does not list.
    pub missing: BTreeSet<String>,
    /// Jobs not final on some answering node.
    pub non_terminal: BTreeSet<String>,
    /// Jobs on whose status or attempt the answering nodes differ.
    pub disagree: BTreeSet<String>,
    /// A few of the problem jobs with every node's view, for the report.
    pub examples: Vec<String>,
}

impl Observation {
    /// Whether every node answered and agrees that every job is final.
    pub fn settled(&self) -> bool {
        self.unanswered.is_empty()
            && self.missing.is_empty()
            && self.non_terminal.is_empty()
            && self.disagree.is_empty()
    }

    /// One line for progress output.
    pub fn line(&self) -> String {
        format!(
            "unanswered nodes {}, missing {}, not final {}, disagreeing {}",
            self.unanswered.len(),
            self.missing.len(),
            self.non_terminal.len(),
            self.disagree.len()
        )
    }
}

/// Compares the views (`None`: the node did not answer) over the jobs `ids`.
pub fn observe(
    names: &[String],
    views: &[Result<NodeView, String>],
    ids: &BTreeSet<String>,
) -> Observation {
    let mut obs = Observation::default();
    for (name, view) in names.iter().zip(views) {
        if let Err(e) = view {
            obs.unanswered.push(format!("{name}: {e}"));
        }
    }
    for id in ids {
        let states: Vec<(&String, Option<&JobState>)> = names
            .iter()
            .zip(views)
            .filter_map(|(name, view)| view.as_ref().ok().map(|v| (name, v.get(id))))
            .collect();
        let mut problem = false;
        if states.iter().any(|(_, s)| s.is_none()) {
            obs.missing.insert(id.clone());
            problem = true;
        }
        if states.iter().any(|(_, s)| s.is_some_and(|s| !s.terminal())) {
            obs.non_terminal.insert(id.clone());
            problem = true;
        }
        let distinct: BTreeSet<(&str, u64)> = states
            .iter()
            .filter_map(|(_, s)| s.map(|s| (s.status.as_str(), s.attempt)))
            .collect();
        if distinct.len() > 1 {
            obs.disagree.insert(id.clone());
            problem = true;
        }
        if problem && obs.examples.len() < 8 {
            let each: Vec<String> = states
                .iter()
                .map(|(name, s)| match s {
                    Some(s) => format!("{name}={}#{}", s.status, s.attempt),
                    None => format!("{name}=absent"),
                })
                .collect();
            obs.examples.push(format!("{id}: {}", each.join(" ")));
        }
    }
    obs
}
