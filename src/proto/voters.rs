//! Which master-eligible nodes should vote: 1, 3 or 5 of them, chosen deterministically and
//! changed as little as possible.

use std::collections::{BTreeMap, BTreeSet};

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
///
/// The set never shrinks because nodes fall silent; only removal shrinks it:
/// * the target size is [`target_size`] of all eligible nodes, heard from or not (the leader
///   always counts, and a current voter without a candidate entry counts as a silent eligible
///   node);
/// * the leader always votes; a current voter is kept unless it is no longer eligible;
/// * a voter not heard from within the grace window (`recently_seen` false) is swapped for an
///   online eligible non-voter when one exists, and otherwise stays;
/// * the set grows towards the target with online eligible non-voters, in id order;
/// * it is never moved to an even size: growth that cannot reach an odd size is not made. When
///   removals leave it even (or above the target) and online nodes cannot fill it, the
///   least-live remaining voters are dropped down to the largest odd size (as they are from an
///   even-sized `current`, which the mesh never creates).
///
/// Pure: the same inputs always give the same answer.
pub fn desired_voters(
    current: &BTreeSet<NodeId>,
    leader: &NodeId,
    candidates: &[Candidate],
) -> Option<BTreeSet<NodeId>> {
    let pool = pool(current, leader, candidates);
    let eligible: Vec<&Candidate> = pool.values().filter(|c| c.eligible).collect();
    let target = target_size(eligible.len());
    let removed = current
        .iter()
        .any(|id| pool.get(id).is_some_and(|c| !c.eligible));

    // The leader, then every current voter that is still eligible.
    let mut chosen: BTreeSet<NodeId> = [leader.clone()].into_iter().collect();
    chosen.extend(
        eligible
            .iter()
            .filter(|c| current.contains(&c.id))
            .map(|c| c.id.clone()),
    );
    // Online non-voters in id order (the pool is ordered by id).
    let fresh: Vec<NodeId> = eligible
        .iter()
        .filter(|c| c.online && !chosen.contains(&c.id))
        .map(|c| c.id.clone())
        .collect();
    let mut fresh = fresh.into_iter();
    // Swap silent voters for online non-voters, one for one.
    let silent: Vec<NodeId> = eligible
        .iter()
        .filter(|c| chosen.contains(&c.id) && &c.id != leader && !c.recently_seen)
        .map(|c| c.id.clone())
        .collect();
    for gone in silent {
        match fresh.next() {
            Some(id) => {
                chosen.remove(&gone);
                chosen.insert(id);
            }
            None => break,
        }
    }
    // Grow towards the target; an even step that cannot be completed is not taken.
    let mut added: Vec<NodeId> = Vec::new();
    while chosen.len() < target {
        match fresh.next() {
            Some(id) => {
                chosen.insert(id.clone());
                added.push(id);
            }
            None => break,
        }
    }
    if chosen.len() % 2 == 0 {
        if let Some(id) = added.pop() {
            chosen.remove(&id);
        }
    }
    // Above the target or even after removals: drop the least-live voters.
    while chosen.len() > target || chosen.len() % 2 == 0 {
        if !removed && current.len() % 2 == 1 {
            // Nothing was removed: keep the set as it is rather than drop a member.
            break;
        }
        let weakest = eligible
            .iter()
            .filter(|c| chosen.contains(&c.id) && &c.id != leader)
            .max_by_key(|c| (!c.recently_seen, !c.online, c.id.clone()))
            .map(|c| c.id.clone());
        match weakest {
            Some(id) => chosen.remove(&id),
            None => break,
        };
    }
    (chosen != *current).then_some(chosen)
}

/// Candidates by id: the given ones, the leader as an eligible live node, and current voters
/// without an entry as silent eligible nodes.
fn pool(
    current: &BTreeSet<NodeId>,
    leader: &NodeId,
    candidates: &[Candidate],
) -> BTreeMap<NodeId, Candidate> {
    let mut pool: BTreeMap<NodeId, Candidate> = candidates
        .iter()
        .map(|c| (c.id.clone(), c.clone()))
        .collect();
    for id in current {
        pool.entry(id.clone()).or_insert_with(|| Candidate {
            id: id.clone(),
            eligible: true,
            online: false,
            recently_seen: false,
        });
    }
    pool.insert(
        leader.clone(),
        Candidate {
            id: leader.clone(),
            eligible: true,
            online: true,
            recently_seen: true,
        },
    );
    pool
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

    #[test]
    fn a_silent_voter_is_kept_without_a_replacement() {
        let mut c: Vec<_> = ["a", "b", "c"].iter().map(|i| cand(i, true)).collect();
        c[2] = cand("c", false);
        assert_eq!(
            desired_voters(&set(&["a", "b", "c"]), &"a".into(), &c),
            None
        );
        // Nor is a silent eligible node a reason to shrink a set of one that cannot grow.
        let c = vec![cand("a", true), cand("b", false), cand("c", false)];
        assert_eq!(desired_voters(&set(&["a"]), &"a".into(), &c), None);
    }

    #[test]
    fn a_silent_voter_is_swapped_for_an_online_non_voter() {
        let c = vec![
            cand("a", true),
            cand("b", false),
            cand("c", true),
            cand("d", true),
        ];
        assert_eq!(
            desired_voters(&set(&["a", "b", "c"]), &"a".into(), &c),
            Some(set(&["a", "c", "d"]))
        );
        // A voter that is offline but within the grace window is not swapped.
        let mut c = c;
        c[1].recently_seen = true;
        assert_eq!(
            desired_voters(&set(&["a", "b", "c"]), &"a".into(), &c),
            None
        );
    }

    #[test]
    fn only_removal_shrinks_the_set() {
        let mut c: Vec<_> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|i| cand(i, true))
            .collect();
        let five = set(&["a", "b", "c", "d", "e"]);
        // Two of five voters silent, nobody to replace them: the set stays.
        c[3] = cand("d", false);
        c[4] = cand("e", false);
        assert_eq!(desired_voters(&five, &"a".into(), &c), None);
        // e is removed: four eligible nodes make three voters, the silent d goes first.
        c[4].eligible = false;
        assert_eq!(
            desired_voters(&five, &"a".into(), &c),
            Some(set(&["a", "b", "c"]))
        );
        // In a set of three, a removed voter is replaced by an online node when there is one...
        let mut c = vec![cand("a", true), cand("b", true), cand("c", true)];
        c[2].eligible = false;
        c.push(cand("d", true));
        let three = set(&["a", "b", "c"]);
        assert_eq!(
            desired_voters(&three, &"a".into(), &c),
            Some(set(&["a", "b", "d"]))
        );
        // ...and otherwise the set drops to the largest odd size it can hold.
        c[3] = cand("d", false);
        assert_eq!(desired_voters(&three, &"a".into(), &c), Some(set(&["a"])));
    }

    #[test]
    fn growth_that_cannot_reach_an_odd_size_is_not_made() {
        let c = vec![
            cand("a", true),
            cand("b", true),
            cand("c", true),
            cand("d", true),
            cand("e", false),
            cand("f", false),
        ];
        // Six eligible nodes ask for five voters; only d is online to join: stay at three.
        assert_eq!(
            desired_voters(&set(&["a", "b", "c"]), &"a".into(), &c),
            None
        );
    }
}
