//! Unit tests of the history horizon and of compaction.

use super::*;
use crate::proto::crdt::{Crdt, MaxReg, Stamp};
use crate::proto::hlc::Hlc;
use crate::proto::jobs::{CommandRun, FileDiff, JobSpec, JobStatus, Progress, RepoDiff, Usage};

pub(crate) const NOW: u64 = 100 * DAY_MS;

fn horizon(before_ms: u64) -> Horizon {
    Horizon {
        before_ms,
        epoch: 1,
        set_by: "m".into(),
    }
}

fn full_result() -> JobResult {
    JobResult {
        exit_code: Some(0),
        final_message: Some("done: changed the handler".into()),
        diffs: vec![RepoDiff {
            source: "acme/web".into(),
            files: vec![FileDiff {
                path: "src/main.rs".into(),
                added: 3,
                removed: 1,
            }],
        }],
        usage: Some(Usage {
            input_tokens: 1200,
            cached_input_tokens: 100,
            output_tokens: 300,
        }),
        duration_ms: 9_000,
        commands: vec![CommandRun {
            command: "cargo test".into(),
            exit_code: Some(0),
        }],
        prepare_ms: 400,
    }
}

/// A job of attempt 1 with `status`, reported at `at_ms`, with a full result.
pub(crate) fn job(status: JobStatus, at_ms: u64) -> JobRecord {
    let stamp = Stamp {
        at: Hlc {
            wall_ms: at_ms,
            logical: 0,
        },
        by: "w".into(),
    };
    let mut attempts = crate::proto::attempts::Attempts::default();
    if status.is_terminal() {
        attempts.ended(
            1,
            Some(&"w".to_string()),
            status,
            None,
            at_ms,
            stamp.clone(),
        );
    }
    JobRecord {
        spec: JobSpec::for_tests("fix the handler"),
        assignment: None,
        progress: MaxReg(Progress {
            attempt: 1,
            assignment: (1, 1),
            status,
            reason: None,
            result: status.is_terminal().then(full_result),
            stamp,
        }),
        attempts,
        compacted: false,
        extra: Default::default(),
    }
}

#[test]
fn the_horizon_trails_now_by_the_configured_days_in_steps() {
    assert_eq!(next_horizon(None, NOW, 30), Some(NOW - 30 * DAY_MS));
    assert_eq!(next_horizon(None, NOW, 0), None, "0 keeps all history");
    assert_eq!(
        next_horizon(None, 5 * DAY_MS, 30),
        None,
        "a clock before the epoch + days"
    );
    let current = horizon(NOW - 30 * DAY_MS);
    assert_eq!(
        next_horizon(Some(&current), NOW + HORIZON_STEP_MS - 1, 30),
        None,
        "less than a step later the record is not rewritten"
    );
    assert_eq!(
        next_horizon(Some(&current), NOW + HORIZON_STEP_MS, 30),
        Some(NOW - 30 * DAY_MS + HORIZON_STEP_MS)
    );
    let later = horizon(NOW);
    assert_eq!(
        next_horizon(Some(&later), NOW, 30),
        None,
        "a master with a longer history never moves the horizon back"
    );
}

#[test]
fn the_horizon_record_only_moves_forward() {
    let mut reg = MaxReg(horizon(10));
    assert!(!reg.merge(&MaxReg(horizon(5))));
    assert!(reg.merge(&MaxReg(horizon(20))));
    assert_eq!(reg.0.before_ms, 20);
}

#[test]
fn only_jobs_that_ended_before_the_horizon_are_due() {
    let old = job(JobStatus::Succeeded, NOW - 40 * DAY_MS);
    let recent = job(JobStatus::Failed, NOW - DAY_MS);
    let running = job(JobStatus::Running, NOW - 40 * DAY_MS);
    let before = NOW - 30 * DAY_MS;
    assert!(is_due(&old, before));
    assert!(!is_due(&recent, before));
    assert!(
        !is_due(&running, before),
        "a job that has not ended is never compacted"
    );
    let mut done = old.clone();
    compact(&mut done);
    assert!(!is_due(&done, before), "compacted once");
}

#[test]
fn the_end_time_comes_from_the_attempt_history_before_the_report_stamp() {
    let mut record = job(JobStatus::Succeeded, NOW - 40 * DAY_MS);
    record.progress.0.stamp.at.wall_ms = NOW;
    assert_eq!(ended_at_ms(&record), Some(NOW - 40 * DAY_MS));
    record.attempts = Default::default();
    assert_eq!(
        ended_at_ms(&record),
        Some(NOW),
        "no history: the terminal report's time"
    );
}

#[test]
fn compaction_keeps_the_summary_and_drops_the_rest() {
    let mut record = job(JobStatus::Succeeded, NOW - 40 * DAY_MS);
    let before = record.clone();
    assert!(compact(&mut record));
    assert!(!compact(&mut record), "idempotent");
    assert!(record.compacted);
    let result = record.progress.0.result.as_ref().expect("summary kept");
    assert_eq!(result.final_message, None);
    assert!(result.diffs.is_empty() && result.commands.is_empty());
    let full = before.progress.0.result.as_ref().expect("full result");
    assert_eq!(result.usage, full.usage, "token usage kept");
    assert_eq!(result.exit_code, full.exit_code);
    assert_eq!(result.duration_ms, full.duration_ms);
    assert_eq!(result.prepare_ms, full.prepare_ms);
    assert_eq!(record.spec, before.spec, "spec (prompt, repos) kept");
    assert_eq!(record.attempts, before.attempts, "node and times kept");
    assert_eq!(record.progress.0.status, JobStatus::Succeeded);
    assert!(record.validate(&record.spec.id.clone()).is_ok());
}

#[test]
fn a_full_copy_merged_into_a_compacted_record_stays_compacted_in_either_order() {
    let full = job(JobStatus::Succeeded, NOW - 40 * DAY_MS);
    let mut compacted = full.clone();
    compact(&mut compacted);

    let mut a = compacted.clone();
    assert!(!a.merge(&full), "the full copy brings nothing back");
    assert_eq!(a, compacted);

    let mut b = full.clone();
    assert!(b.merge(&compacted));
    assert_eq!(b, compacted, "the full copy converges to the compacted one");
}

#[test]
fn a_compacted_record_with_a_full_result_is_refused() {
    let mut record = job(JobStatus::Succeeded, NOW - 40 * DAY_MS);
    record.compacted = true;
    let id = record.spec.id.clone();
    assert!(record.validate(&id).is_err());
    compact(&mut record);
    assert!(record.validate(&id).is_ok());
}
