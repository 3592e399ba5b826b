//! Unit tests of the election state machine.

use super::*;

fn ids(list: &[&str]) -> BTreeSet<NodeId> {
    list.iter().map(|s| s.to_string()).collect()
}

fn membership(list: &[&str]) -> Membership {
    Membership {
        term: 0,
        index: 1,
        voters: ids(list),
        joining: None,
    }
}

/// The only voter of a new mesh, at time 0.
fn founder(id: &str) -> Election {
    let hard = HardState {
        membership: Membership::founding(&id.into()),
        ..HardState::default()
    };
    Election::new(id.into(), hard, Timing::default(), true, 0, 1)
}

fn node(id: &str, voters: &[&str], now: u64) -> Election {
    let hard = HardState {
        membership: membership(voters),
        ..HardState::default()
    };
    Election::new(id.into(), hard, Timing::default(), true, now, 7)
}

/// Let `e` campaign at `now` and win term 1 with the pre-votes and votes of `voters`.
fn win_first_term(e: &mut Election, voters: &[&str], now: u64) {
    e.tick(now);
    for voter in voters {
        let reply = Message::PreVoteReply {
            term: 1,
            granted: true,
            leader: None,
        };
        e.step(&(*voter).into(), reply, now);
    }
    for voter in voters {
        let reply = Message::VoteReply {
            term: 1,
            granted: true,
        };
        e.step(&(*voter).into(), reply, now);
    }
}

#[test]
fn quorum_needs_a_majority_of_both_sides_during_a_change() {
    let mut m = membership(&["a", "b", "c"]);
    m.joining = Some(ids(&["c", "d", "e"]));
    assert!(!m.is_quorum(&ids(&["a", "b"])));
    assert!(!m.is_quorum(&ids(&["d", "e"])));
    assert!(m.is_quorum(&ids(&["a", "c", "d"])));
    assert!(!Membership::default().is_quorum(&ids(&["a"])));
}

#[test]
fn a_sole_voter_is_master_at_once() {
    let mut e = founder("a");
    let actions = e.tick(0);
    assert!(e.is_master(0));
    assert_eq!(e.term(), 1);
    assert!(matches!(actions[0], Action::Persist(_)));
}

#[test]
fn a_worker_only_node_never_campaigns() {
    let hard = HardState {
        membership: membership(&["w"]),
        ..HardState::default()
    };
    let mut e = Election::new("w".into(), hard, Timing::default(), false, 0, 1);
    assert!(e.tick(100_000).is_empty());
    assert!(!e.is_leader());
}

#[test]
fn a_voter_that_just_heard_the_leader_refuses_votes_and_keeps_its_term() {
    let mut b = node("b", &["a", "b", "c"], 0);
    b.step(
        &"a".into(),
        Message::Heartbeat {
            term: 1,
            membership: membership(&["a", "b", "c"]),
            sent_at: 10,
        },
        10,
    );
    let out = b.step(
        &"c".into(),
        Message::Vote {
            term: 5,
            position: (0, 1),
        },
        20,
    );
    assert_eq!(b.term(), 1);
    assert!(out.contains(&Action::Send {
        to: "c".into(),
        msg: Message::VoteReply {
            term: 1,
            granted: false
        }
    }));
}

#[test]
fn the_lease_lapses_without_fresh_acknowledgements() {
    let t = Timing::default();
    let mut a = node("a", &["a", "b", "c"], 0);
    let mut now = t.election_max_ms + 1;
    // Campaign: pre-vote, then vote, answered by b.
    win_first_term(&mut a, &["b"], now);
    assert!(a.is_leader());
    assert!(!a.is_master(now), "no heartbeat acknowledged yet");
    a.step(
        &"b".into(),
        Message::HeartbeatAck {
            term: 1,
            sent_at: now,
            ok: true,
            position: (0, 1),
        },
        now + 2,
    );
    assert!(a.is_master(now + 2));
    now += t.lease_ms + 1;
    assert!(!a.is_master(now));
}

#[test]
fn a_delayed_heartbeat_does_not_roll_back_a_configuration_of_the_same_term() {
    let mut b = node("b", &["a", "b", "c"], 0);
    let heartbeat = |membership: Membership, sent_at: u64| Message::Heartbeat {
        term: 1,
        membership,
        sent_at,
    };
    let old = membership(&["a", "b", "c"]);
    let joint = Membership {
        term: 1,
        index: 2,
        voters: ids(&["a", "b", "c"]),
        joining: Some(ids(&["a", "b"])),
    };
    let new = Membership {
        term: 1,
        index: 3,
        voters: ids(&["a", "b"]),
        joining: None,
    };
    b.step(&"a".into(), heartbeat(joint, 20), 30);
    b.step(&"a".into(), heartbeat(new.clone(), 40), 50);
    // The heartbeat sent before the change arrives last.
    let out = b.step(&"a".into(), heartbeat(old.clone(), 10), 60);
    assert_eq!(b.membership(), &new);
    assert!(!out.iter().any(|a| matches!(a, Action::Persist(_))));
    assert!(out.contains(&Action::Send {
        to: "a".into(),
        msg: Message::HeartbeatAck {
            term: 1,
            sent_at: 10,
            ok: true,
            position: (1, 3),
        },
    }));
    // A leader of a later term still imposes its configuration.
    b.step(
        &"a".into(),
        Message::Heartbeat {
            term: 2,
            membership: old.clone(),
            sent_at: 70,
        },
        80,
    );
    assert_eq!(b.membership(), &old);
}

#[test]
fn a_refused_pre_vote_does_not_raise_the_candidates_term() {
    let t = Timing::default();
    let voters = ["a", "b", "c"];
    let heartbeat = Message::Heartbeat {
        term: 1,
        membership: membership(&voters),
        sent_at: 10,
    };
    let mut b = node("b", &voters, 0);
    let mut c = node("c", &voters, 0);
    c.step(&"a".into(), heartbeat.clone(), 10);
    // c loses the leader and asks b, which still hears from it.
    let now = 10 + t.election_max_ms + 1;
    b.step(&"a".into(), heartbeat, now - 100);
    let asked = c.tick(now);
    assert!(asked.contains(&Action::Send {
        to: "b".into(),
        msg: Message::PreVote {
            term: 2,
            position: (0, 1)
        }
    }));
    let refusal = Message::PreVoteReply {
        term: 1,
        granted: false,
        leader: Some("a".into()),
    };
    let out = b.step(
        &"c".into(),
        Message::PreVote {
            term: 2,
            position: (0, 1),
        },
        now,
    );
    assert_eq!(
        out,
        vec![Action::Send {
            to: "c".into(),
            msg: refusal.clone()
        }]
    );
    assert!(c.step(&"b".into(), refusal, now).is_empty());
    assert_eq!(c.term(), 1);
}

/// Deliver `actions` of `from` and everything they cause, at once, between `nodes`.
fn deliver(nodes: &mut BTreeMap<NodeId, Election>, from: &str, actions: Vec<Action>, now: u64) {
    let mut queue: Vec<(NodeId, NodeId, Message)> = Vec::new();
    let sends = |from: &str, actions: Vec<Action>, queue: &mut Vec<(NodeId, NodeId, Message)>| {
        for action in actions {
            if let Action::Send { to, msg } = action {
                queue.push((from.to_string(), to, msg));
            }
        }
    };
    sends(from, actions, &mut queue);
    while !queue.is_empty() {
        let (from, to, msg) = queue.remove(0);
        if let Some(node) = nodes.get_mut(&to) {
            let out = node.step(&from, msg, now);
            sends(&to, out, &mut queue);
        }
    }
}

#[test]
fn a_voter_that_missed_the_end_of_a_change_is_brought_up_to_date() {
    // b, leader of term 2, began moving the voters from {a, b, c} to {b}. c won term 3,
    // finished the change and lost its lease; b was down then and restarted holding the
    // joint configuration, which a and c refuse as out of date.
    let joint = Membership {
        term: 2,
        index: 4,
        voters: ids(&["a", "b", "c"]),
        joining: Some(ids(&["b"])),
    };
    let done = Membership {
        term: 3,
        index: 5,
        voters: ids(&["b"]),
        joining: None,
    };
    let mut nodes = BTreeMap::new();
    for (id, membership, seed) in [("a", &done, 3), ("b", &joint, 5), ("c", &done, 9)] {
        let hard = HardState {
            term: 3,
            voted_for: Some("c".into()),
            membership: membership.clone(),
        };
        let election = Election::new(id.into(), hard, Timing::default(), true, 0, seed);
        nodes.insert(id.to_string(), election);
    }
    let mut now = 0;
    while now < 20_000 && !nodes.values().any(|e| e.is_master(now)) {
        now += 50;
        for id in ["a", "b", "c"] {
            let out = nodes.get_mut(id).map(|e| e.tick(now)).unwrap_or_default();
            deliver(&mut nodes, id, out, now);
        }
    }
    assert!(
        nodes.values().any(|e| e.is_master(now)),
        "no master after {now} ms"
    );
    assert!(nodes["b"].membership().position() >= done.position());
}

fn heartbeat(term: u64, membership: Membership) -> Message {
    Message::Heartbeat {
        term,
        membership,
        sent_at: 0,
    }
}

#[test]
fn a_non_voter_cannot_raise_the_term_or_replace_the_voters() {
    let mut b = node("b", &["a", "b", "c"], 0);
    b.step(&"a".into(), heartbeat(1, membership(&["a", "b", "c"])), 10);
    for msg in [
        heartbeat(u64::MAX, membership(&["x"])),
        heartbeat(2, membership(&["x", "b"])),
        Message::Vote {
            term: 2,
            position: (u64::MAX, u64::MAX),
        },
        Message::PreVote {
            term: 2,
            position: (1, 9),
        },
        Message::VoteReply {
            term: 9,
            granted: true,
        },
    ] {
        assert!(b.admits(&"x".into(), &msg).is_err(), "{msg:?}");
        assert!(b.step(&"x".into(), msg, 20).is_empty());
    }
    assert_eq!(b.term(), 1);
    assert_eq!(b.membership(), &membership(&["a", "b", "c"]));
    assert_eq!(b.leader(), Some(&"a".to_string()));
}

#[test]
fn terms_out_of_range_and_malformed_configurations_are_refused_even_from_voters() {
    let b = node("b", &["a", "b", "c"], 0);
    let a: NodeId = "a".into();
    assert_eq!(
        b.admits(&a, &heartbeat(u64::MAX, membership(&["a"]))),
        Err(Refusal::TermOutOfRange(u64::MAX))
    );
    assert_eq!(
        b.admits(&a, &heartbeat(MAX_TERM_LEAP + 1, membership(&["a"]))),
        Err(Refusal::TermOutOfRange(MAX_TERM_LEAP + 1))
    );
    assert!(b
        .admits(&a, &heartbeat(MAX_TERM_LEAP, membership(&["a"])))
        .is_ok());
    let empty = Membership::default();
    assert_eq!(
        b.admits(&a, &heartbeat(1, empty)),
        Err(Refusal::BadMembership("no voters"))
    );
    let crowd: Vec<String> = (0..=MAX_VOTERS).map(|i| format!("v{i}")).collect();
    let crowd: Vec<&str> = crowd.iter().map(String::as_str).collect();
    assert_eq!(
        b.admits(&a, &heartbeat(1, membership(&crowd))),
        Err(Refusal::BadMembership("too many voters"))
    );
    let mut joint = membership(&["a", "b"]);
    joint.joining = Some(BTreeSet::new());
    assert!(b.admits(&a, &heartbeat(1, joint)).is_err());
    let mut last = membership(&["a", "b"]);
    last.index = u64::MAX;
    assert!(b.admits(&a, &heartbeat(1, last)).is_err());
    let mut later = membership(&["a", "b"]);
    later.term = 5;
    assert_eq!(
        b.admits(&a, &heartbeat(4, later)),
        Err(Refusal::BadMembership("made in a later term"))
    );
}

#[test]
fn a_node_without_a_configuration_takes_its_first_one() {
    let hard = HardState::default();
    let mut fresh = Election::new("n".into(), hard, Timing::default(), true, 0, 3);
    let out = fresh.step(&"a".into(), heartbeat(3, membership(&["a", "n"])), 5);
    assert_eq!(fresh.term(), 3);
    assert_eq!(fresh.membership(), &membership(&["a", "n"]));
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Send {
            msg: Message::HeartbeatAck { ok: true, .. },
            ..
        }
    )));
    // From then on only voters of that configuration are heard.
    assert!(fresh
        .step(&"x".into(), heartbeat(4, membership(&["x"])), 6)
        .is_empty());
    assert_eq!(fresh.term(), 3);
}

#[test]
fn a_term_at_the_end_of_the_range_stops_campaigns_instead_of_wrapping() {
    let hard = HardState {
        term: u64::MAX,
        voted_for: None,
        membership: Membership::founding(&"a".into()),
    };
    let mut a = Election::new("a".into(), hard, Timing::default(), true, 0, 1);
    let out = a.tick(10_000);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(a.term(), u64::MAX);
    assert!(!a.is_leader());
    // A sole-voter leader whose configuration index is used up cannot change voters.
    let mut solo = Election::new(
        "s".into(),
        HardState {
            membership: Membership {
                term: 0,
                index: u64::MAX - 1,
                voters: ids(&["s"]),
                joining: None,
            },
            ..HardState::default()
        },
        Timing::default(),
        true,
        0,
        1,
    );
    solo.tick(0);
    assert!(solo.is_master(0));
    assert_eq!(
        solo.change_voters(ids(&["s", "t"]), 0).err(),
        None,
        "the joint configuration takes the last index"
    );
    assert_eq!(solo.membership().index, u64::MAX);
    // t holds it; finishing it would need one more index: the change stays joint.
    let ack = Message::HeartbeatAck {
        term: solo.term(),
        sent_at: 0,
        ok: true,
        position: solo.membership().position(),
    };
    solo.step(&"t".into(), ack, 1);
    assert!(solo.is_master(1));
    assert_eq!(solo.membership().index, u64::MAX);
    assert!(solo.membership().joining.is_some());
    assert_eq!(
        solo.change_voters(ids(&["s"]), 1).err(),
        Some(ChangeError::Busy)
    );
}

#[test]
fn learners_hear_the_leader_but_do_not_acknowledge() {
    let mut a = founder("a");
    a.tick(0);
    a.set_learners(ids(&["w", "a"]));
    let out = a.tick(1);
    let to_w: Vec<&Message> = out
        .iter()
        .filter_map(|x| match x {
            Action::Send { to, msg } if to == "w" => Some(msg),
            _ => None,
        })
        .collect();
    assert!(
        matches!(to_w[..], [Message::Heartbeat { term: 1, .. }]),
        "{out:?}"
    );
    // Learners are told at most once a second, voters on every heartbeat.
    let later = a.tick(400);
    assert!(!later
        .iter()
        .any(|x| matches!(x, Action::Send { to, .. } if to == "w")));
    let mut w = Election::new(
        "w".into(),
        HardState::default(),
        Timing::default(),
        false,
        0,
        2,
    );
    let reply = w.step(
        &"a".into(),
        heartbeat(1, Membership::founding(&"a".into())),
        5,
    );
    assert_eq!(w.leader(), Some(&"a".to_string()));
    assert_eq!(w.term(), 1);
    assert!(
        !reply.iter().any(|x| matches!(x, Action::Send { .. })),
        "{reply:?}"
    );
    assert!(w.vouches_for(1, &"a".into()));
    assert!(!w.vouches_for(1, &"x".into()));
    assert!(!w.vouches_for(2, &"a".into()));
    assert!(w.vouches_for(0, &"x".into()));
}

#[test]
fn a_voter_that_missed_voter_changes_follows_the_leader_a_fellow_voter_names() {
    // c knows {a, b, c}; meanwhile the voters became {a, b, d} and d leads term 5.
    let mut c = node("c", &["a", "b", "c"], 0);
    let led_by_d = Membership {
        term: 4,
        index: 7,
        voters: ids(&["a", "b", "d"]),
        joining: None,
    };
    assert!(c
        .step(&"d".into(), heartbeat(5, led_by_d.clone()), 10)
        .is_empty());
    // c campaigns; a refuses and names d.
    let refusal = Message::PreVoteReply {
        term: 5,
        granted: false,
        leader: Some("d".into()),
    };
    c.step(&"a".into(), refusal, 20);
    assert_eq!(c.term(), 5);
    // A non-voter naming a leader is not heard.
    let lie = Message::PreVoteReply {
        term: 6,
        granted: false,
        leader: Some("x".into()),
    };
    assert!(c.step(&"x".into(), lie, 25).is_empty());
    assert!(c
        .step(&"x".into(), heartbeat(6, membership(&["x"])), 26)
        .is_empty());
    c.step(&"d".into(), heartbeat(5, led_by_d.clone()), 30);
    assert_eq!(c.leader(), Some(&"d".to_string()));
    assert_eq!(c.membership(), &led_by_d);
}

#[test]
fn a_learner_that_missed_voter_changes_asks_the_voters_it_knows_who_leads() {
    // w learned {a, b, c}; the voters became {b, c, d}, and d (unknown to w) leads term 4.
    let mut w = Election::new(
        "w".into(),
        HardState {
            term: 2,
            voted_for: None,
            membership: membership(&["a", "b", "c"]),
        },
        Timing::default(),
        true,
        0,
        5,
    );
    let now_led_by_d = Membership {
        term: 3,
        index: 4,
        voters: ids(&["b", "c", "d"]),
        joining: None,
    };
    assert!(w
        .step(&"d".into(), heartbeat(4, now_led_by_d.clone()), 10)
        .is_empty());
    let quiet = w.tick(LEARNER_QUIET_MS);
    let asked: BTreeSet<NodeId> = quiet
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                to,
                msg: Message::WhoLeads { term: 2 },
            } => Some(to.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(asked, ids(&["a", "b", "c"]));
    // b, which follows d, answers; w then takes d's heartbeats.
    let mut b = node("b", &["b", "c", "d"], 0);
    b.step(&"d".into(), heartbeat(4, now_led_by_d.clone()), 20);
    let answer = b.step(&"w".into(), Message::WhoLeads { term: 2 }, 30);
    let [Action::Send { to, msg }] = &answer[..] else {
        panic!("{answer:?}");
    };
    assert_eq!(to, "w");
    w.step(&"b".into(), msg.clone(), 40);
    w.step(&"d".into(), heartbeat(4, now_led_by_d.clone()), 50);
    assert_eq!(w.leader(), Some(&"d".to_string()));
    assert_eq!(w.membership(), &now_led_by_d);
    // A question changes nothing at a voter, and a learner's own answer counts for nothing.
    assert_eq!(b.term(), 4);
    assert!(w
        .step(&"x".into(), Message::WhoLeads { term: 9 }, 60)
        .is_empty());
}

mod lease;
