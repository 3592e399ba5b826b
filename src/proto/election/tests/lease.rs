//! Unit tests of the leader's view of acknowledgements and its lease.

use super::*;

#[test]
fn acked_at_reports_the_newest_acknowledged_heartbeat_while_leading() {
    let t = Timing::default();
    let mut a = node("a", &["a", "b", "c"], 0);
    let now = t.election_max_ms + 1;
    assert_eq!(a.acked_at(&"b".into()), None, "not leading");
    win_first_term(&mut a, &["b"], now);
    assert!(a.is_leader());
    assert_eq!(a.acked_at(&"b".into()), None, "nothing acknowledged yet");
    let ack = |sent_at| Message::HeartbeatAck {
        term: 1,
        sent_at,
        ok: true,
        position: (0, 1),
    };
    a.step(&"b".into(), ack(now + 250), now + 260);
    assert_eq!(a.acked_at(&"b".into()), Some(now + 250));
    // A late acknowledgement of an older heartbeat does not move it back.
    a.step(&"b".into(), ack(now), now + 270);
    assert_eq!(a.acked_at(&"b".into()), Some(now + 250));
    // A refused acknowledgement does not count.
    a.step(
        &"b".into(),
        Message::HeartbeatAck {
            term: 1,
            sent_at: now + 500,
            ok: false,
            position: (0, 1),
        },
        now + 510,
    );
    assert_eq!(a.acked_at(&"b".into()), Some(now + 250));
    assert_eq!(a.acked_at(&"c".into()), None);
    // Stepping down forgets it.
    a.step(&"c".into(), ack(now + 600), now + 610);
    a.step(
        &"c".into(),
        Message::HeartbeatAck {
            term: 2,
            sent_at: now + 700,
            ok: false,
            position: (0, 1),
        },
        now + 710,
    );
    assert!(!a.is_leader());
    assert_eq!(a.acked_at(&"b".into()), None);
}

#[test]
fn a_voided_lease_needs_fresh_acknowledgements() {
    let t = Timing::default();
    let mut a = node("a", &["a", "b", "c"], 0);
    let now = t.election_max_ms + 1;
    a.tick(now);
    let b: NodeId = "b".into();
    let granted = Message::PreVoteReply {
        term: 1,
        granted: true,
        leader: None,
    };
    a.step(&b, granted, now);
    a.step(
        &b,
        Message::VoteReply {
            term: 1,
            granted: true,
        },
        now,
    );
    let ack = |sent_at| Message::HeartbeatAck {
        term: 1,
        sent_at,
        ok: true,
        position: (0, 1),
    };
    a.step(&b, ack(now), now + 2);
    assert!(a.is_master(now + 2));
    // Its clock may have missed time: the acknowledgement it holds no longer counts...
    a.void_lease(now + 3);
    assert!(!a.is_master(now + 3));
    assert!(a.is_leader(), "it still leads the term");
    // A late acknowledgement of a heartbeat sent before does not bring it back...
    a.step(&b, ack(now + 1), now + 4);
    assert!(!a.is_master(now + 4));
    // ...one of a heartbeat sent after that does.
    a.step(&b, ack(now + 3), now + 4);
    assert!(a.is_master(now + 4));
}

#[test]
fn quorum_acked_at_is_the_newest_heartbeat_a_quorum_acknowledged() {
    let t = Timing::default();
    let mut a = node("a", &["a", "b", "c", "d", "e"], 0);
    let now = t.election_max_ms + 1;
    assert_eq!(a.quorum_acked_at(), None, "not leading");
    win_first_term(&mut a, &["b", "c"], now);
    assert!(a.is_leader());
    assert_eq!(a.quorum_acked_at(), None, "nothing acknowledged yet");
    let ack = |sent_at| Message::HeartbeatAck {
        term: 1,
        sent_at,
        ok: true,
        position: (0, 1),
    };
    a.step(&"b".into(), ack(now + 900), now + 910);
    assert_eq!(a.quorum_acked_at(), None, "two of five are no quorum");
    a.step(&"c".into(), ack(now + 250), now + 920);
    assert_eq!(
        a.quorum_acked_at(),
        Some(now + 250),
        "a, b and c: the older of the two"
    );
    a.step(&"d".into(), ack(now + 600), now + 930);
    assert_eq!(a.quorum_acked_at(), Some(now + 600), "a, b and d");
}
