use std::collections::{BTreeMap, BTreeSet};

use super::commit::{self, accept, Refusal};
use super::worker::{judge, must_stop, Fence, RunKey, Verdict};
use super::*;
use crate::proto::crdt::Crdt;
use crate::proto::hlc::Hlc;
use crate::proto::jobs::JobSpec;

fn stamp(t: u64, by: &str) -> Stamp {
    Stamp {
        at: Hlc {
            wall_ms: t,
            logical: 0,
        },
        by: by.into(),
    }
}

fn queued() -> JobRecord {
    JobRecord {
        compacted: false,
        spec: JobSpec::for_tests("p"),
        assignment: None,
        progress: MaxReg(Progress {
            attempt: 1,
            assignment: (0, 0),
            status: JobStatus::Queued,
            reason: None,
            result: None,
            stamp: stamp(1, "s"),
        }),
        attempts: Default::default(),
        extra: Default::default(),
    }
}

fn assigned(job: &JobRecord, key: (u64, u64), node: &str, t: u64) -> JobRecord {
    let mut record = job.clone();
    record.assignment = Some(MaxReg(Assignment {
        epoch: key.0,
        seq: key.1,
        attempt: job.progress.0.attempt,
        node: node.into(),
    }));
    record.progress = MaxReg(Progress {
        attempt: job.progress.0.attempt,
        assignment: key,
        status: JobStatus::Assigned,
        reason: None,
        result: None,
        stamp: stamp(t, "m"),
    });
    record
}

fn with_status(job: &JobRecord, status: JobStatus, t: u64, by: &str) -> JobRecord {
    let mut record = job.clone();
    record.progress.0.status = status;
    record.progress.0.stamp = stamp(t, by);
    record
}

fn node(id: &str) -> NodeLoad {
    NodeLoad {
        id: id.into(),
        name: id.into(),
        tags: vec![],
        slots: 2,
        running: 0,
        online: true,
        draining: false,
        removed: false,
        agents: vec!["codex".into()],
        local_repos: false,
    }
}

struct Fixture {
    nodes: Vec<NodeLoad>,
    started: BTreeMap<NodeId, u64>,
    clock: u64,
}

impl Fixture {
    fn new(ids: &[&str]) -> Fixture {
        Fixture {
            nodes: ids.iter().map(|id| node(id)).collect(),
            started: BTreeMap::new(),
            clock: 100,
        }
    }

    fn round(&mut self, d: &mut Dispatcher, jobs: &[JobRecord], now: u64) -> Vec<Step> {
        let me = "m".to_string();
        let clock = &mut self.clock;
        let mut stamp = || {
            *clock += 1;
            stamp(*clock, "m")
        };
        let mut world = World {
            now,
            wall_ms: 1_000,
            me: &me,
            term: 5,
            nodes: &self.nodes,
            started_at_ms: &self.started,
            lost_requeues: 1,
            stamp: &mut stamp,
        };
        d.round(jobs, &mut world)
    }

    fn deliver_answer(
        &mut self,
        d: &mut Dispatcher,
        job: &JobRecord,
        key: (u64, u64),
        answer: DeliverAnswer,
    ) -> Vec<Step> {
        let me = "m".to_string();
        let mut stamp = || stamp(500, "m");
        let mut world = World {
            now: 10,
            wall_ms: 1_000,
            me: &me,
            term: 5,
            nodes: &self.nodes,
            started_at_ms: &self.started,
            lost_requeues: 1,
            stamp: &mut stamp,
        };
        d.on_deliver_answer(job, key, answer, &mut world)
    }
}

fn majority(set: &BTreeSet<NodeId>) -> bool {
    set.len() >= 2
}

/// A dispatcher of term 5 whose read found `reported`.
fn ready(fx: &mut Fixture, reported: Vec<(String, Assignment)>) -> Dispatcher {
    let mut d = Dispatcher::default();
    assert_eq!(fx.round(&mut d, &[], 0), vec![Step::Read]);
    assert!(
        fx.round(&mut d, &[queued()], 1).is_empty(),
        "nothing before the read"
    );
    d.on_read_answer(5, &"m".into(), reported, &majority);
    assert!(!d.ready(5));
    d.on_read_answer(5, &"v".into(), Vec::new(), &majority);
    assert!(d.ready(5));
    d
}

#[test]
fn an_assignment_is_delivered_only_after_a_quorum_accepted_it() {
    let mut fx = Fixture::new(&["w"]);
    let mut d = ready(&mut fx, Vec::new());
    let job = queued();
    let steps = fx.round(&mut d, std::slice::from_ref(&job), 0);
    let [Step::Commit(record)] = steps.as_slice() else {
        panic!("expected one commit, got {steps:?}");
    };
    let key = record.progress.0.assignment;
    assert_eq!(key, (5, 1));
    let id = &job.spec.id;
    let first = d.on_commit_answer(id, key, &"m".into(), CommitAnswer::Accepted, 1, &majority);
    assert!(first.is_empty(), "one voter of three is no quorum");
    let second = d.on_commit_answer(id, key, &"v".into(), CommitAnswer::Accepted, 2, &majority);
    assert!(
        matches!(second.as_slice(), [Step::Write(w), Step::Deliver(r)]
            if r.progress.0.assignment == key && w == r),
        "written into the replica and delivered: {second:?}"
    );
}

#[test]
fn an_unclear_answer_resends_the_same_assignment_and_never_requeues() {
    let mut fx = Fixture::new(&["w"]);
    let mut d = ready(&mut fx, Vec::new());
    let job = queued();
    let steps = fx.round(&mut d, std::slice::from_ref(&job), 0);
    let Some(Step::Commit(record)) = steps.first() else {
        panic!("no commit");
    };
    let record = (**record).clone();
    let key = record.progress.0.assignment;
    for voter in ["m", "v"] {
        d.on_commit_answer(
            &job.spec.id,
            key,
            &voter.into(),
            CommitAnswer::Accepted,
            1,
            &majority,
        );
    }
    let timeout = DeliverAnswer::Unclear("timed out".into());
    assert!(fx.deliver_answer(&mut d, &record, key, timeout).is_empty());
    // Not yet due again...
    assert!(fx
        .round(&mut d, std::slice::from_ref(&record), 500)
        .is_empty());
    // ...then the same assignment again, not a new one.
    let again = fx.round(&mut d, std::slice::from_ref(&record), 2_000);
    assert!(
        matches!(again.as_slice(), [Step::Deliver(r)] if r.progress.0.assignment == key),
        "{again:?}"
    );
    // An acknowledged assignment still not preparing after the deadline is checked again.
    assert!(fx
        .deliver_answer(&mut d, &record, key, DeliverAnswer::Ack)
        .is_empty());
    assert!(fx
        .round(&mut d, std::slice::from_ref(&record), 3_000)
        .is_empty());
    let recheck = fx.round(&mut d, std::slice::from_ref(&record), 20_000);
    assert!(
        matches!(recheck.as_slice(), [Step::Deliver(_)]),
        "{recheck:?}"
    );
}

#[test]
fn a_definite_refusal_requeues_the_attempt_under_a_newer_key() {
    let mut fx = Fixture::new(&["w"]);
    let mut d = ready(&mut fx, Vec::new());
    let job = queued();
    fx.round(&mut d, std::slice::from_ref(&job), 0);
    let record = assigned(&job, (5, 1), "w", 2);
    for voter in ["m", "v"] {
        d.on_commit_answer(
            &job.spec.id,
            (5, 1),
            &voter.into(),
            CommitAnswer::Accepted,
            1,
            &majority,
        );
    }
    let steps = fx.deliver_answer(
        &mut d,
        &record,
        (5, 1),
        DeliverAnswer::Refused("busy".into()),
    );
    let [Step::Write(requeued)] = steps.as_slice() else {
        panic!("{steps:?}");
    };
    let p = &requeued.progress.0;
    assert_eq!(
        (p.attempt, p.status, p.assignment > (5, 1)),
        (1, JobStatus::Queued, true)
    );
    assert!(p.reason.as_deref().is_some_and(|r| r.contains("busy")));
}

#[test]
fn a_new_master_keeps_an_inherited_attempt_on_its_node_under_a_key_of_its_term() {
    let mut fx = Fixture::new(&["w", "x"]);
    let mut d = ready(&mut fx, Vec::new());
    let inherited = assigned(&queued(), (4, 9), "w", 2);
    let steps = fx.round(&mut d, std::slice::from_ref(&inherited), 0);
    assert!(
        matches!(steps.as_slice(), [Step::Commit(r)]
            if r.progress.0.assignment == (5, 1)
            && r.assignment.as_ref().is_some_and(|a| a.0.node == "w")),
        "{steps:?}"
    );
}

#[test]
fn an_attempt_a_voter_reported_goes_to_the_same_node_only() {
    // The read found that an earlier term gave attempt 1 to x (possibly committed, never
    // replicated here): the job looks queued, but only x may get it.
    let job = queued();
    let earlier = Assignment {
        epoch: 4,
        seq: 2,
        attempt: 1,
        node: "x".into(),
    };
    let mut fx = Fixture::new(&["w", "x"]);
    fx.nodes[1].running = 0;
    fx.nodes[1].draining = true;
    let mut d = ready(&mut fx, vec![(job.spec.id.clone(), earlier.clone())]);
    let steps = fx.round(&mut d, std::slice::from_ref(&job), 0);
    assert!(
        matches!(steps.as_slice(), [Step::Commit(r)]
            if r.assignment.as_ref().is_some_and(|a| a.0.node == "x")),
        "{steps:?}"
    );
    // With x offline the attempt is lost, not given to w.
    let mut fx = Fixture::new(&["w", "x"]);
    fx.nodes[1].online = false;
    let mut d = ready(&mut fx, vec![(job.spec.id.clone(), earlier)]);
    let steps = fx.round(&mut d, &[job], 0);
    assert!(
        matches!(steps.as_slice(), [Step::Write(r)] if r.progress.0.attempt == 2),
        "{steps:?}"
    );
}

#[test]
fn jobs_of_an_offline_or_restarted_worker_are_lost_and_requeued() {
    let mut fx = Fixture::new(&["w", "x"]);
    fx.nodes[0].online = false;
    let mut d = ready(&mut fx, Vec::new());
    let running = with_status(
        &assigned(&queued(), (5, 1), "w", 2),
        JobStatus::Running,
        3,
        "w",
    );
    let steps = fx.round(&mut d, std::slice::from_ref(&running), 0);
    let [Step::Write(lost)] = steps.as_slice() else {
        panic!("{steps:?}");
    };
    assert_eq!(
        (lost.progress.0.attempt, lost.progress.0.status),
        (2, JobStatus::Queued)
    );
    let entry = lost.attempts.get(1).cloned();
    assert_eq!(entry.as_ref().map(|e| e.status), Some(JobStatus::Lost));
    assert!(entry
        .and_then(|e| e.reason)
        .is_some_and(|r| r.contains("offline")));

    // Back online, but started after it reported the attempt: it has no run of it.
    let mut fx = Fixture::new(&["w"]);
    fx.started.insert("w".into(), 10);
    let steps = fx.round(&mut d, std::slice::from_ref(&running), 0);
    assert!(
        matches!(steps.as_slice(), [Step::Write(r)] if r.progress.0.attempt == 2
            && r.attempts.get(1).and_then(|e| e.reason.clone()).is_some_and(|r| r.contains("restarted"))),
        "{steps:?}"
    );
    // Started before the report: nothing to do.
    fx.started.insert("w".into(), 2);
    assert!(fx.round(&mut d, &[running], 0).is_empty());
}

#[test]
fn a_job_lost_by_its_restarted_worker_is_queued_again_while_attempts_remain() {
    let mut fx = Fixture::new(&["w"]);
    let mut d = ready(&mut fx, Vec::new());
    let lost = with_status(
        &assigned(&queued(), (5, 1), "w", 2),
        JobStatus::Lost,
        3,
        "w",
    );
    assert!(is_open(&lost, 1));
    let steps = fx.round(&mut d, std::slice::from_ref(&lost), 0);
    assert!(matches!(steps.as_slice(), [Step::Write(r)] if r.progress.0.attempt == 2));
    let mut last = lost;
    last.progress.0.attempt = 2;
    assert!(!is_open(&last, 1), "no attempts left: lost for good");
}

#[test]
fn a_lost_job_past_the_history_horizon_is_not_queued_again() {
    let mut fx = Fixture::new(&["w"]);
    let mut d = ready(&mut fx, Vec::new());
    let mut lost = with_status(
        &assigned(&queued(), (5, 1), "w", 2),
        JobStatus::Lost,
        3,
        "w",
    );
    lost.compacted = true;
    assert!(!is_open(&lost, 1), "a compacted job is final");
    assert!(fx.round(&mut d, std::slice::from_ref(&lost), 0).is_empty());
}

#[test]
fn voters_accept_only_the_leader_of_their_term_and_live_attempts() {
    let job = queued();
    let a = assigned(&job, (5, 1), "w", 2);
    let (master, other) = ("m".to_string(), "x".to_string());
    let fence = Fence {
        me: &other,
        term: 5,
        leader: Some(&master),
        from: &master,
    };
    assert_eq!(accept(None, &a, fence), Ok(()));
    assert_eq!(accept(Some(&job), &a, fence), Ok(()));
    // An older term (the voter promised the newer one) or another sender: refused.
    let old = assigned(&job, (4, 1), "w", 2);
    assert!(matches!(
        accept(Some(&job), &old, fence),
        Err(Refusal::Stale(_))
    ));
    let forged = Fence {
        from: &other,
        ..fence
    };
    assert!(matches!(
        accept(Some(&job), &a, forged),
        Err(Refusal::Stale(_))
    ));
    // An attempt that ended or was replaced by a newer one.
    let ended = with_status(&a, JobStatus::Cancelled, 9, "x");
    assert!(matches!(
        accept(Some(&ended), &a, fence),
        Err(Refusal::Conflict(_))
    ));
    let mut newer = job.clone();
    newer.progress.0.attempt = 2;
    assert!(matches!(
        accept(Some(&newer), &a, fence),
        Err(Refusal::Conflict(_))
    ));
    // A progress that does not match its assignment.
    let mut bad = a.clone();
    bad.progress.0.assignment = (5, 2);
    assert!(matches!(
        accept(None, &bad, fence),
        Err(Refusal::Malformed(_))
    ));
}

#[test]
fn a_read_binds_an_attempt_to_its_newest_reported_node_until_it_is_requeued() {
    let job = queued();
    let mut reported = commit::Accepted::new();
    let at = |epoch, node: &str| Assignment {
        epoch,
        seq: 1,
        attempt: 1,
        node: node.into(),
    };
    commit::remember(&mut reported, &job.spec.id, &at(3, "a"));
    commit::remember(&mut reported, &job.spec.id, &at(4, "b"));
    commit::remember(&mut reported, &job.spec.id, &at(2, "c"));
    assert_eq!(commit::bind(&reported, &job).map(String::as_str), Some("b"));
    // b refused it definitely: queued again under a newer key, the attempt is free.
    let mut requeued = job.clone();
    requeued.progress.0.assignment = (4, 5);
    assert_eq!(commit::bind(&reported, &requeued), None);
    // Entries of ended attempts are not reported.
    let ended = with_status(&job, JobStatus::Succeeded, 9, "b");
    let mut kept = reported.clone();
    commit::prune(&mut kept, |_| Some(&ended));
    assert!(kept.is_empty());
    commit::prune(&mut reported, |_| Some(&job));
    assert_eq!(reported.len(), 1);
}

#[test]
fn a_worker_starts_only_the_merged_current_assignment() {
    let job = queued();
    let old = assigned(&job, (1, 1), "w1", 2);
    let newer = assigned(&job, (3, 1), "w2", 3);
    let mut merged = newer.clone();
    merged.merge(&old);
    let me = "w1".to_string();
    let master = "m".to_string();
    let fence = Fence {
        me: &me,
        term: 1,
        leader: Some(&master),
        from: &master,
    };
    let incoming = old.assignment.clone().map(|a| a.0).expect("assignment");
    // A delayed assignment to w1 arriving after w1 merged the newer one to w2.
    assert!(matches!(
        judge(&merged, &incoming, None, None, fence),
        Verdict::Refuse(_)
    ));
    // A job cancelled before its assignment arrived is not started.
    let mut cancelled = with_status(&job, JobStatus::Cancelled, 5, "x");
    cancelled.merge(&old);
    assert!(matches!(
        judge(&cancelled, &incoming, None, None, fence),
        Verdict::Refuse(_)
    ));
    // The current one starts, once; again it is acknowledged, not restarted.
    assert_eq!(judge(&old, &incoming, None, None, fence), Verdict::Start);
    let key = RunKey::of(&incoming);
    assert_eq!(
        judge(&old, &incoming, Some(key), None, fence),
        Verdict::AlreadyRunning
    );
    // The same attempt under a newer key of a new master: the run is kept.
    let rekeyed = assigned(&job, (1, 5), "w1", 4);
    let incoming5 = rekeyed.assignment.clone().map(|a| a.0).expect("assignment");
    assert_eq!(
        judge(&rekeyed, &incoming5, Some(key), None, fence),
        Verdict::Adopt
    );
    // Refused once, refused for good.
    assert!(matches!(
        judge(&old, &incoming, None, Some((1, 1)), fence),
        Verdict::Refuse(_)
    ));
    // From a node that is not the leader of the term: refused.
    let other = "x".to_string();
    let forged = Fence {
        from: &other,
        ..fence
    };
    assert!(matches!(
        judge(&old, &incoming, None, None, forged),
        Verdict::Refuse(_)
    ));
}

#[test]
fn a_cancel_stops_the_run_whatever_key_it_was_written_under() {
    let job = queued();
    let run_record = assigned(&job, (3, 1), "w", 2);
    let run = RunKey {
        attempt: 1,
        assignment: (3, 1),
    };
    let w = "w".to_string();
    assert_eq!(must_stop(&run_record, run, &w), None);
    // Cancelled at a peer that had only seen the job queued.
    let mut merged = run_record.clone();
    merged.merge(&with_status(&job, JobStatus::Cancelled, 9, "x"));
    assert_eq!(merged.progress.0.status, JobStatus::Cancelled);
    assert!(must_stop(&merged, run, &w).is_some());
    // A newer attempt or assignment stops it too.
    let mut retried = run_record.clone();
    retried.progress.0.attempt = 2;
    retried.progress.0.status = JobStatus::Queued;
    assert!(must_stop(&retried, run, &w).is_some());
    assert!(must_stop(&assigned(&job, (4, 1), "x", 3), run, &w).is_some());
    // A newer key of the same attempt for this very node keeps the run (it is adopted).
    assert_eq!(must_stop(&assigned(&job, (4, 1), "w", 3), run, &w), None);
}
