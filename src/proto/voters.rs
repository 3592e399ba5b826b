//! Which master-eligible nodes should vote: 1, 3 or 5 of them, chosen deterministically and
//! changed as little as possible.

use std::collections::BTreeSet;

use super::crdt::NodeId;

/// What the master knows about one candidate voter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The node.
    pub id: NodeId,
    /// Master-eligible and not removed.
    pub eligible: bool,
    /// Heard from within the liveness window.
    pub online: bool,
    /// Heard from within the (longer) grace window; a voter is replaced only after this.
    pub recently_seen: bool,
}

/// Voter count for `eligible` eligible nodes: 1 for 1-2, 3 for 3-4, 5 for 5 or more.
pub fn target_size(eligible: usize) -> usize {
    match eligible {
        0..=2 => 1,
        3..=4 => 3,
        _ => 5,
    }
}

/// The voter set the master should move to, or `None` when `current` is right.
pub fn desired_voters(
    current: &BTreeSet<NodeId>,
    leader: &NodeId,
    candidates: &[Candidate],
) -> Option<BTreeSet<NodeId>> {
    let usable: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.eligible && (c.recently_seen || &c.id == leader))
        .collect();
    let target = target_size(usable.len().max(1));
    // Keep the leader, then current voters that are still usable (online ones first).
    let mut keep: Vec<&Candidate> = usable
        .iter()
        .copied()
        .filter(|c| current.contains(&c.id) && &c.id != leader)
        .collect();
    keep.sort_by_key(|c| (!c.online, c.id.clone()));
    let mut chosen: BTreeSet<NodeId> = [leader.clone()].into_iter().collect();
    for c in keep {
        if chosen.len() < target {
            chosen.insert(c.id.clone());
        }
    }
    // Fill with online non-voters in id order.
    let mut fresh: Vec<&Candidate> = usable
        .iter()
        .copied()
        .filter(|c| c.online && !chosen.contains(&c.id))
        .collect();
    fresh.sort_by(|a, b| a.id.cmp(&b.id));
    for c in fresh {
        if chosen.len() < target {
            chosen.insert(c.id.clone());
        }
    }
    // Never move to an even-sized set: drop back to the largest odd size we can fill.
    while chosen.len() % 2 == 0 {
        let drop = chosen.iter().rev().find(|id| *id != leader).cloned();
        match drop {
            Some(id) => chosen.remove(&id),
            None => break,
        };
    }
    (chosen != *current).then_some(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: &str, online: bool) -> Candidate {
        Candidate {
            id: id.into(),
            eligible: true,
            online,
            recently_seen: online,
        }
    }

    fn set(ids: &[&str]) -> BTreeSet<NodeId> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn grows_to_three_then_five() {
        let c: Vec<_> = ["a", "b", "c"].iter().map(|i| cand(i, true)).collect();
        assert_eq!(desired_voters(&set(&["a"]), &"a".into(), &c[..2]), None);
        assert_eq!(
            desired_voters(&set(&["a"]), &"a".into(), &c),
            Some(set(&["a", "b", "c"]))
        );
        let c: Vec<_> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|i| cand(i, true))
            .collect();
        assert_eq!(
            desired_voters(&set(&["a", "b", "c"]), &"a".into(), &c),
            Some(set(&["a", "b", "c", "d", "e"]))
        );
    }

    #[test]
    fn replaces_a_voter_gone_past_the_grace_window() {
        let mut c: Vec<_> = ["a", "b", "c", "d"].iter().map(|i| cand(i, true)).collect();
        c[2] = cand("c", false);
        assert_eq!(
            desired_voters(&set(&["a", "b", "c"]), &"a".into(), &c),
            Some(set(&["a", "b", "d"]))
        );
    }

    #[test]
    fn keeps_a_voter_that_is_briefly_offline() {
        let mut c: Vec<_> = ["a", "b", "c"].iter().map(|i| cand(i, true)).collect();
        c[2].online = false;
        assert_eq!(
            desired_voters(&set(&["a", "b", "c"]), &"a".into(), &c),
            None
        );
    }

    #[test]
    fn ignores_ineligible_nodes() {
        let mut c: Vec<_> = ["a", "b", "c"].iter().map(|i| cand(i, true)).collect();
        c[1].eligible = false;
        assert_eq!(desired_voters(&set(&["a"]), &"a".into(), &c), None);
    }
}
