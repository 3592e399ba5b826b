//! Unit tests of job records.

use super::super::crdt::laws;
use super::super::hlc::Hlc;
use super::*;
use proptest::prelude::*;

fn spec(prompt: &str) -> JobSpec {
    JobSpec::for_tests(prompt)
}

fn status() -> impl Strategy<Value = JobStatus> {
    prop_oneof![
        Just(JobStatus::Queued),
        Just(JobStatus::Assigned),
        Just(JobStatus::Preparing),
        Just(JobStatus::Running),
        Just(JobStatus::Succeeded),
        Just(JobStatus::Failed),
        Just(JobStatus::Cancelled),
        Just(JobStatus::Lost),
    ]
}

/// No result, or one of a few that differ in what compaction keeps and in what it drops.
fn result() -> impl Strategy<Value = Option<JobResult>> {
    proptest::option::of(
        (
            0i32..2,
            prop_oneof![Just(None), Just(Some("x")), Just(Some("y"))],
        )
            .prop_map(|(exit_code, message)| JobResult {
                exit_code: Some(exit_code),
                final_message: message.map(str::to_string),
                ..JobResult::default()
            }),
    )
}

fn progress() -> impl Strategy<Value = Progress> {
    (1u32..3, 0u64..3, status(), 0u64..4, "[ab]", result()).prop_map(
        |(attempt, epoch, status, t, by, result)| Progress {
            attempt,
            assignment: (epoch, 1),
            status,
            reason: None,
            result,
            stamp: Stamp {
                at: Hlc {
                    wall_ms: t,
                    logical: 0,
                },
                by,
            },
        },
    )
}

fn record() -> impl Strategy<Value = JobRecord> {
    let assignment =
        proptest::option::of((0u64..3, 0u64..3, "[xy]").prop_map(|(epoch, seq, node)| {
            MaxReg(Assignment {
                epoch,
                seq,
                attempt: 1,
                node,
            })
        }));
    let compacted = any::<bool>();
    (
        prop_oneof![Just("a"), Just("b")],
        assignment,
        progress(),
        compacted,
    )
        .prop_map(|(p, assignment, progress, compacted)| {
            let mut record = JobRecord {
                compacted: false,
                spec: spec(p),
                assignment,
                progress: MaxReg(progress),
                attempts: Attempts::default(),
                extra: Extra::default(),
            };
            if compacted {
                super::super::history::compact(&mut record);
            }
            record
        })
}

proptest! {
    #[test]
    fn job_records_obey_the_merge_laws(a in record(), b in record(), c in record()) {
        laws::commutative(&a, &b);
        laws::associative(&a, &b, &c);
        laws::idempotent(&a);
    }

    #[test]
    fn a_terminal_state_absorbs_its_attempt(done in progress(), other in progress()) {
        prop_assume!(done.status.is_terminal() && other.attempt <= done.attempt);
        let mut reg = MaxReg(done.clone());
        reg.merge(&MaxReg(other));
        prop_assert!(reg.0.status.is_terminal());
        prop_assert_eq!(reg.0.attempt, done.attempt);
    }

    #[test]
    fn status_never_moves_backwards_within_an_assignment(
        a in progress(),
        later in status(),
        t in 0u64..4,
    ) {
        let mut b = a.clone();
        b.status = later;
        b.stamp.at.wall_ms = t;
        let mut reg = MaxReg(a.clone());
        reg.merge(&MaxReg(b.clone()));
        prop_assert!(reg.0.status.rank() >= a.status.rank().max(b.status.rank()));
    }
}

#[test]
fn a_stale_assignments_report_loses_to_the_current_one() {
    let at = |t| Stamp {
        at: Hlc {
            wall_ms: t,
            logical: 0,
        },
        by: "w".into(),
    };
    let stale_running = Progress {
        attempt: 1,
        assignment: (1, 1),
        status: JobStatus::Running,
        reason: None,
        result: None,
        stamp: at(9),
    };
    let reassigned = Progress {
        attempt: 1,
        assignment: (2, 1),
        status: JobStatus::Assigned,
        reason: None,
        result: None,
        stamp: at(5),
    };
    let mut reg = MaxReg(reassigned.clone());
    assert!(!reg.merge(&MaxReg(stale_running)));
    assert_eq!(reg.0, reassigned);
}

#[test]
fn a_retry_starts_a_new_attempt_from_queued() {
    let stamp = Stamp {
        at: Hlc {
            wall_ms: 1,
            logical: 0,
        },
        by: "m".into(),
    };
    let failed = Progress {
        attempt: 1,
        assignment: (1, 1),
        status: JobStatus::Failed,
        reason: Some("clone failed".into()),
        result: None,
        stamp: stamp.clone(),
    };
    let retry = Progress {
        attempt: 2,
        assignment: (0, 0),
        status: JobStatus::Queued,
        reason: None,
        result: None,
        stamp,
    };
    let mut reg = MaxReg(failed);
    assert!(reg.merge(&MaxReg(retry.clone())));
    assert_eq!(reg.0, retry);
}

#[test]
fn validation_refuses_bad_specs() {
    let good = JobRecord {
        compacted: false,
        spec: spec("fix the bug"),
        attempts: Attempts::default(),
        extra: Extra::default(),
        assignment: None,
        progress: MaxReg(Progress {
            attempt: 1,
            assignment: (0, 0),
            status: JobStatus::Queued,
            reason: None,
            result: None,
            stamp: Stamp {
                at: Hlc::default(),
                by: "n1".into(),
            },
        }),
    };
    assert!(good.validate(&good.spec.id).is_ok());
    assert!(good.validate("other").is_err());
    let mut empty = good.clone();
    empty.spec.prompt.clear();
    assert!(empty.validate(&good.spec.id).is_err());
    let mut huge = good;
    huge.spec.prompt = "x".repeat(MAX_PROMPT_BYTES + 1);
    assert!(huge.validate(&huge.spec.id.clone()).is_err());
}

#[test]
fn the_first_end_of_an_attempt_is_its_end() {
    let at = |t, by: &str| Stamp {
        at: Hlc {
            wall_ms: t,
            logical: 0,
        },
        by: by.into(),
    };
    // A cancel written at a peer that had not seen the assignment yet (old key)...
    let cancelled = Progress {
        attempt: 1,
        assignment: (0, 0),
        status: JobStatus::Cancelled,
        reason: Some("cancelled via a".into()),
        result: None,
        stamp: at(10, "a"),
    };
    // ...is not undone by the worker's success reported after it under the real key.
    let succeeded = Progress {
        attempt: 1,
        assignment: (3, 1),
        status: JobStatus::Succeeded,
        reason: None,
        result: Some(JobResult::default()),
        stamp: at(12, "w"),
    };
    let mut reg = MaxReg(cancelled.clone());
    assert!(!reg.merge(&MaxReg(succeeded.clone())));
    assert_eq!(reg.0, cancelled);
    let mut reg = MaxReg(succeeded.clone());
    assert!(reg.merge(&MaxReg(cancelled.clone())));
    assert_eq!(reg.0, cancelled);
    // A success that ended before the cancel was written stays.
    let early = Progress {
        stamp: at(8, "w"),
        ..succeeded
    };
    let mut reg = MaxReg(cancelled);
    assert!(reg.merge(&MaxReg(early.clone())));
    assert_eq!(reg.0, early);
}

#[test]
fn statuses_parse_from_their_names() {
    assert_eq!(JobStatus::parse("timed_out"), Some(JobStatus::TimedOut));
    assert_eq!(JobStatus::parse("bogus"), None);
}

/// A queued job record for unit tests elsewhere in `proto`.
pub(crate) fn queued_record() -> JobRecord {
    JobRecord {
        compacted: false,
        spec: spec("fix the bug"),
        assignment: None,
        progress: MaxReg(Progress {
            attempt: 1,
            assignment: (0, 0),
            status: JobStatus::Queued,
            reason: None,
            result: None,
            stamp: Stamp {
                at: Hlc::default(),
                by: "n1".into(),
            },
        }),
        attempts: Attempts::default(),
        extra: Extra::default(),
    }
}
