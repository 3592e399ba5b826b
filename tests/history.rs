//! Job history that stops growing, on real node processes: finished jobs that ended before
//! the master's horizon (`--job-history-days`, default 30) are compacted on every node (the
//! summary stays, the final message, diff summary, commands and log go), recent ones are
//! untouched, and a node that comes back with full copies of compacted jobs converges to the
//! compacted records without bringing the dropped data back to anyone.
//!
//! The jobs are written into the nodes' stores before the nodes start, as they would be after
//! weeks of work: a job that ended 40 days ago cannot be produced any other way in a test.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use codex_mesh::proto::attempts::Attempts;
use codex_mesh::proto::ids::ulid;
use codex_mesh::proto::jobs::{
    CommandRun, FileDiff, JobRecord, JobStatus, RepoDiff, RepoSpec, Usage,
};
use codex_mesh::proto::records::{Key, Record};
use codex_mesh::store::Store;
use common::{poll, records, Mesh, NodeOptions};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");
const DAY_MS: u64 = 24 * 3600 * 1000;
const OLD_JOBS: usize = 30;
const RECENT_JOBS: usize = 2;
const WAIT: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A finished job that ended `age_ms` ago, with a full result and an attempt history.
fn finished(seq: u64, age_ms: u64) -> JobRecord {
    let ended = now_ms() - age_ms;
    let id = ulid(ended - 60_000, u128::from(seq) << 16 | 0xbeef);
    let mut spec = records::job_spec(&id, &format!("fix bug {seq}"), "codex", "12D3KooWsubmitter");
    spec.repos = vec![RepoSpec {
        source: "acme/web".into(),
        branch: None,
    }];
    spec.submitted_at_ms = ended - 60_000;
    let mut job = records::finished_job_at(spec, format!("changed the handler ({seq})"), ended);
    let result = job.progress.0.result.as_mut().expect("a result");
    result.exit_code = Some(0);
    result.usage = Some(Usage {
        input_tokens: 1000 + seq,
        cached_input_tokens: 10,
        output_tokens: 200,
    });
    result.duration_ms = 50_000;
    result.diffs = vec![RepoDiff {
        source: "acme/web".into(),
        files: vec![FileDiff {
            path: "src/main.rs".into(),
            added: 4,
            removed: 1,
        }],
    }];
    result.commands = vec![CommandRun {
        command: "cargo test".into(),
        exit_code: Some(0),
    }];
    let mut attempts = Attempts::default();
    let stamp = job.progress.0.stamp.clone();
    attempts.started(
        1,
        &"12D3KooWworker".to_string(),
        ended - 50_000,
        stamp.clone(),
    );
    attempts.ended(1, None, JobStatus::Succeeded, None, ended, stamp);
    job.attempts = attempts;
    job
}

fn seed(data_dir: &Path, jobs: &[JobRecord]) {
    std::fs::create_dir_all(data_dir).expect("data dir");
    let store = Store::open(&data_dir.join("state.redb")).expect("store opens");
    let rows: Vec<(String, Record)> = jobs
        .iter()
        .map(|job| {
            (
                Key::Job(job.spec.id.clone()).encode(),
                Record::Job(Box::new(job.clone())),
            )
        })
        .collect();
    let refs: Vec<(&str, &Record)> = rows.iter().map(|(k, r)| (k.as_str(), r)).collect();
    store.put_records(&refs).expect("records stored");
}

fn log_path(data_dir: &Path, id: &str) -> std::path::PathBuf {
    data_dir.join("job-logs").join(format!("{id}.log"))
}

fn job_view(node: &common::Node, id: &str) -> Result<Value, String> {
    node.api("GET", &format!("/api/v1/jobs/{id}"), None)
        .map_err(|e| e.to_string())?
        .expect_status(200)?
        .json()
}

#[test]
fn old_jobs_are_compacted_everywhere_and_a_returning_node_converges() {
    let old: Vec<JobRecord> = (0..OLD_JOBS as u64)
        .map(|i| finished(i, 40 * DAY_MS))
        .collect();
    let recent: Vec<JobRecord> = (0..RECENT_JOBS as u64)
        .map(|i| finished(1000 + i, DAY_MS / 2))
        .collect();
    let all: Vec<JobRecord> = old.iter().chain(&recent).cloned().collect();

    let mut mesh = Mesh::new(BIN);
    let n1_dir = mesh.data_dir("n1");
    seed(&n1_dir, &all);
    for job in &all {
        let path = log_path(&n1_dir, &job.spec.id);
        std::fs::create_dir_all(path.parent().expect("log dir")).expect("log dir");
        std::fs::write(&path, "agent output\n").expect("log written");
    }

    // 1. The master (default --job-history-days 30) compacts the old jobs, not the recent.
    let first = mesh.spawn_up("n1", &NodeOptions::default());
    mesh.nodes[first].wait_ready(WAIT);
    let n1 = &mesh.nodes[first];
    poll(WAIT, "the old jobs compacted on n1", || {
        let compacted = n1.metric("codex_mesh_jobs_compacted_total")?;
        (compacted >= OLD_JOBS as f64)
            .then_some(())
            .ok_or(format!("{compacted} compacted"))
    });
    for job in &old {
        let view = job_view(n1, &job.spec.id).expect("old job readable");
        assert_eq!(view["compacted"], true, "{view}");
        assert_eq!(view["status"], "succeeded");
        assert_eq!(view["prompt"], job.spec.prompt, "the prompt is kept");
        assert_eq!(view["repos"][0]["source"], "acme/web", "the repos are kept");
        let result = &view["result"];
        assert!(result["final_message"].is_null(), "{view}");
        assert_eq!(result["diffs"], serde_json::json!([]));
        assert_eq!(result["commands"], serde_json::json!([]));
        let usage = job
            .progress
            .0
            .result
            .as_ref()
            .and_then(|r| r.usage.as_ref());
        assert_eq!(
            result["usage"]["input_tokens"].as_u64(),
            usage.map(|u| u.input_tokens),
            "token usage is kept"
        );
        assert_eq!(
            view["attempts"][0]["ended_at"].as_u64(),
            job.attempts.get(1).and_then(|a| a.ended_at_ms)
        );
    }
    for job in &recent {
        let view = job_view(n1, &job.spec.id).expect("recent job readable");
        assert_eq!(view["compacted"], false, "{view}");
        assert!(view["result"]["final_message"].is_string(), "{view}");
        assert!(
            log_path(&n1_dir, &job.spec.id).exists(),
            "a recent job's log stays"
        );
    }
    assert_eq!(
        n1.metric("codex_mesh_jobs_compacted_total")
            .expect("metric"),
        OLD_JOBS as f64,
        "exactly the old jobs were compacted"
    );
    let old_id = &old[0].spec.id;
    poll(WAIT, "the old jobs' logs removed", || {
        let left = old
            .iter()
            .filter(|j| log_path(&n1_dir, &j.spec.id).exists())
            .count();
        (left == 0).then_some(()).ok_or(format!("{left} logs left"))
    });
    let gone = n1
        .api("GET", &format!("/api/v1/jobs/{old_id}/log"), None)
        .expect("log request");
    assert_eq!(gone.status, 410, "{}", gone.body);
    assert!(gone.body.contains("history horizon"), "{}", gone.body);
    let retry = n1
        .api("POST", &format!("/api/v1/jobs/{old_id}/retry"), None)
        .expect("retry request");
    assert_eq!(retry.status, 409, "{}", retry.body);
    assert!(retry.body.contains("compacted"), "{}", retry.body);

    // 2. n2 comes back with full copies of every job and keeps all history itself
    //    (--job-history-days 0): the master's horizon counts, and it converges.
    let n2_dir = mesh.data_dir("n2");
    seed(&n2_dir, &all);
    let ticket = mesh.nodes[first].ticket();
    let second = mesh.spawn_join(
        "n2",
        &ticket,
        &NodeOptions::with_extra(&["--job-history-days", "0"]),
    );
    mesh.nodes[second].wait_ready(WAIT);
    let (n1, n2) = (&mesh.nodes[first], &mesh.nodes[second]);
    poll(WAIT, "n2 converges to the compacted jobs", || {
        for job in &all {
            let id = &job.spec.id;
            let (a, b) = (job_view(n1, id)?, job_view(n2, id)?);
            if a != b {
                return Err(format!("job {id} differs:\n n1 {a}\n n2 {b}"));
            }
        }
        Ok(())
    });
    for job in &old {
        let view = job_view(n1, &job.spec.id).expect("old job readable");
        assert_eq!(
            view["compacted"], true,
            "n2's full copies brought nothing back: {view}"
        );
        assert!(view["result"]["final_message"].is_null(), "{view}");
    }
    for job in &recent {
        let view = job_view(n2, &job.spec.id).expect("recent job readable");
        assert!(view["result"]["final_message"].is_string(), "{view}");
    }
}
