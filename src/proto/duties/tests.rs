//! Unit tests of the master's duties.

use super::*;
use crate::proto::election::{HardState, Membership, Timing};

/// The only voter of a new mesh, master from time 0.
fn founder(id: &str) -> Election {
    let hard = HardState {
        membership: Membership::founding(&id.into()),
        ..HardState::default()
    };
    let mut e = Election::new(id.into(), hard, Timing::default(), true, 0, 1);
    e.tick(0);
    assert!(e.is_master(0));
    e
}

fn candidate(id: &str, online: bool) -> Candidate {
    Candidate {
        id: id.into(),
        eligible: true,
        online,
        recently_seen: online,
    }
}

#[test]
fn the_lease_is_recorded_once_per_term_and_configuration() {
    let e = founder("a");
    let mut duties = MasterDuties::default();
    let record = duties.lease_record(&e, 1_000).expect("nothing written yet");
    assert_eq!((record.epoch, record.master.as_str()), (1, "a"));
    assert_eq!(record.since_ms, 1_000);
    assert!(record.voters.contains("a"));
    // Not stored yet (the commit failed): asked again.
    assert!(duties.lease_record(&e, 1_000).is_some());
    duties.lease_written(&record);
    assert_eq!(duties.lease_record(&e, 1_000), None);
}

#[test]
fn a_new_configuration_is_recorded_again() {
    let mut e = founder("a");
    let mut duties = MasterDuties::new(0);
    let first = duties.lease_record(&e, 0).expect("first record");
    duties.lease_written(&first);
    let voters: BTreeSet<NodeId> = ["a".to_string(), "b".into(), "c".into()].into();
    e.change_voters(voters, 10)
        .expect("the sole voter may change voters");
    let second = duties
        .lease_record(&e, 0)
        .expect("a joint configuration is recorded");
    assert!(second.config_index > first.config_index);
    assert!(second.voters.contains("b") && second.voters.contains("c"));
}

#[test]
fn voters_change_only_after_the_term_settled() {
    let e = founder("a");
    let duties = MasterDuties::new(5_000);
    let candidates = [
        candidate("a", true),
        candidate("b", true),
        candidate("c", true),
    ];
    assert_eq!(duties.voter_change(&e, 4_999, &candidates), None);
    let voters = duties
        .voter_change(&e, 5_000, &candidates)
        .expect("three live eligible nodes make three voters");
    assert_eq!(voters.len(), 3);
}

#[test]
fn no_change_while_the_set_is_right_or_a_change_is_under_way() {
    let mut e = founder("a");
    let duties = MasterDuties::new(0);
    let alone = [candidate("a", true), candidate("b", false)];
    assert_eq!(
        duties.voter_change(&e, 10, &alone),
        None,
        "one live node: one voter"
    );
    let three = [
        candidate("a", true),
        candidate("b", true),
        candidate("c", true),
    ];
    let voters = duties.voter_change(&e, 10, &three).expect("grow to three");
    e.change_voters(voters, 10).expect("change starts");
    assert!(
        !duties.may_change_voters(&e, 20),
        "the joint configuration is not held yet"
    );
    assert_eq!(duties.voter_change(&e, 20, &three), None);
}

#[test]
fn a_follower_has_no_voter_change_to_make() {
    let hard = HardState {
        membership: Membership::founding(&"b".into()),
        ..HardState::default()
    };
    let e = Election::new("a".into(), hard, Timing::default(), true, 0, 1);
    let duties = MasterDuties::new(0);
    let three = [
        candidate("a", true),
        candidate("b", true),
        candidate("c", true),
    ];
    assert_eq!(duties.voter_change(&e, 100_000, &three), None);
}

#[test]
fn the_voter_check_runs_once_per_period() {
    let mut duties = MasterDuties::default();
    assert!(duties.voter_check_due(0));
    assert!(!duties.voter_check_due(VOTER_CHECK_EVERY_MS - 1));
    assert!(duties.voter_check_due(VOTER_CHECK_EVERY_MS));
}
