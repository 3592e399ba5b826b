//! The mesh task's view of its peers: who is connected, when to dial a known peer again,
//! who was heard from, and which anti-entropy sessions are running. In memory only; no I/O.

use std::collections::{BTreeSet, HashMap};

use libp2p::PeerId;

use super::liveness::Liveness;

/// First wait before dialling a peer again after a dial.
pub const REDIAL_FIRST_MS: u64 = 500;
/// Longest wait between two dials of the same peer.
pub const REDIAL_MAX_MS: u64 = 30_000;

/// When a peer may be dialled next, and the wait after that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Backoff {
    due: u64,
    next_wait: u64,
}

/// Connections, redial backoff, liveness and sync sessions.
#[derive(Debug, Default)]
pub struct Peers {
    connected: BTreeSet<PeerId>,
    redial: HashMap<PeerId, Backoff>,
    liveness: Liveness,
    /// Running anti-entropy sessions, each with its count of rounds in a row that changed
    /// nothing here.
    syncing: HashMap<PeerId, u32>,
}

impl Peers {
    /// A connection to `peer` is up: it is alive and its redial backoff starts over.
    pub fn connected(&mut self, peer: PeerId, now: u64) {
        self.connected.insert(peer);
        self.redial.remove(&peer);
        self.liveness.heard(&peer.to_string(), now);
    }

    /// The last connection to `peer` closed; its sync session (if any) ends with it.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.connected.remove(peer);
        self.syncing.remove(peer);
    }

    /// The connected peers, in id order.
    pub fn connected_peers(&self) -> impl Iterator<Item = &PeerId> {
        self.connected.iter()
    }

    /// How many peers are connected.
    pub fn connected_count(&self) -> usize {
        self.connected.len()
    }

    /// A connected peer chosen by `random`, for a periodic anti-entropy round.
    pub fn pick(&self, random: u64) -> Option<PeerId> {
        let n = self.connected.len();
        if n == 0 {
            return None;
        }
        self.connected
            .iter()
            .nth((random % n as u64) as usize)
            .copied()
    }

    /// Whether `peer` (not connected) may be dialled at `now`; a `true` answer counts as a
    /// dial and doubles the wait before the next one, from [`REDIAL_FIRST_MS`] up to
    /// [`REDIAL_MAX_MS`].
    pub fn should_dial(&mut self, peer: PeerId, now: u64) -> bool {
        if self.connected.contains(&peer) {
            return false;
        }
        let backoff = self.redial.get(&peer).copied().unwrap_or(Backoff {
            due: 0,
            next_wait: REDIAL_FIRST_MS,
        });
        if now < backoff.due {
            return false;
        }
        self.redial.insert(
            peer,
            Backoff {
                due: now + backoff.next_wait,
                next_wait: (backoff.next_wait * 2).min(REDIAL_MAX_MS),
            },
        );
        true
    }

    /// Dial `peer` again at the next chance (an operator re-admitted it).
    pub fn reset_backoff(&mut self, peer: &PeerId) {
        self.redial.remove(peer);
    }

    /// Node `id` was heard from at `now`.
    pub fn heard(&mut self, id: &str, now: u64) {
        self.liveness.heard(id, now);
    }

    /// Who was heard from, and when.
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// Start a sync session with `peer`; `false` when one is running already.
    pub fn begin_sync(&mut self, peer: PeerId) -> bool {
        if self.syncing.contains_key(&peer) {
            return false;
        }
        self.syncing.insert(peer, 0);
        true
    }

    /// Whether a sync session with `peer` is running.
    pub fn is_syncing(&self, peer: &PeerId) -> bool {
        self.syncing.contains_key(peer)
    }

    /// A round of the session with `peer` changed `changed` records here; returns how many
    /// rounds in a row changed nothing (0 after a round that changed something).
    pub fn sync_round(&mut self, peer: PeerId, changed: usize) -> u32 {
        let idle = match changed {
            0 => self.syncing.get(&peer).copied().unwrap_or(0) + 1,
            _ => 0,
        };
        if let Some(count) = self.syncing.get_mut(&peer) {
            *count = idle;
        }
        idle
    }

    /// The sync session with `peer` is over (finished, refused or broken).
    pub fn end_sync(&mut self, peer: &PeerId) {
        self.syncing.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redial_waits_double_up_to_the_cap_and_start_over_after_a_connection() {
        let mut peers = Peers::default();
        let p = PeerId::random();
        let mut dials = Vec::new();
        for now in (0..200_000).step_by(100) {
            if peers.should_dial(p, now) {
                dials.push(now);
            }
        }
        let waits: Vec<u64> = dials.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(
            &waits[..7],
            &[500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000]
        );
        assert!(waits[7..].iter().all(|&w| w == REDIAL_MAX_MS));
        peers.connected(p, 200_000);
        assert!(
            !peers.should_dial(p, 200_000),
            "a connected peer is not dialled"
        );
        peers.disconnected(&p);
        assert!(peers.should_dial(p, 200_000));
        assert!(!peers.should_dial(p, 200_000 + REDIAL_FIRST_MS - 1));
        assert!(peers.should_dial(p, 200_000 + REDIAL_FIRST_MS));
    }

    #[test]
    fn a_reset_backoff_dials_at_the_next_chance() {
        let mut peers = Peers::default();
        let p = PeerId::random();
        assert!(peers.should_dial(p, 0));
        assert!(!peers.should_dial(p, 100));
        peers.reset_backoff(&p);
        assert!(peers.should_dial(p, 100));
    }

    #[test]
    fn a_connection_counts_as_hearing_from_the_peer() {
        let mut peers = Peers::default();
        let p = PeerId::random();
        assert!(!peers.liveness().is_online(&p.to_string(), 1_000));
        peers.connected(p, 1_000);
        assert!(peers.liveness().is_online(&p.to_string(), 1_000));
        assert_eq!(peers.connected_count(), 1);
        assert_eq!(peers.pick(12_345), Some(p));
    }

    #[test]
    fn pick_covers_every_connected_peer() {
        let mut peers = Peers::default();
        assert_eq!(peers.pick(7), None);
        let all: BTreeSet<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        for p in &all {
            peers.connected(*p, 0);
        }
        let picked: BTreeSet<PeerId> = (0..4).filter_map(|r| peers.pick(r)).collect();
        assert_eq!(picked, all);
    }

    #[test]
    fn one_sync_session_per_peer_counting_idle_rounds() {
        let mut peers = Peers::default();
        let p = PeerId::random();
        assert!(peers.begin_sync(p));
        assert!(
            !peers.begin_sync(p),
            "a second session with the same peer waits"
        );
        assert_eq!(peers.sync_round(p, 0), 1);
        assert_eq!(peers.sync_round(p, 0), 2);
        assert_eq!(
            peers.sync_round(p, 3),
            0,
            "a round that changed records resets the count"
        );
        assert_eq!(peers.sync_round(p, 0), 1);
        peers.connected(p, 0);
        peers.disconnected(&p);
        assert!(
            !peers.is_syncing(&p),
            "the session ends with the connection"
        );
        assert!(peers.begin_sync(p));
        peers.end_sync(&p);
        assert!(!peers.is_syncing(&p));
    }
}
