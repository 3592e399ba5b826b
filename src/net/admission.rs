//! Which connected peers the rest of the program hears of. A peer is admitted once identify
//! has shown that it speaks our protocol major version; until then what it sends is held
//! back (up to a bound), and the mesh task learns of the peer only when it is admitted. A
//! peer of another version is refused: what it sent is dropped and it is disconnected.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

use super::version::{self, VersionError};
use super::Event;

/// How long a connected peer may take to identify itself before it is disconnected.
pub(super) const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most messages held back from one peer that has not identified itself yet.
const MAX_HELD: usize = 64;
/// How long after a refusal this node does not dial the refused peer again.
pub(super) const REFUSED_PAUSE: Duration = Duration::from_secs(60);
/// How long a refusal is remembered (to warn once, not at every reconnection).
const REFUSAL_MEMORY: Duration = Duration::from_secs(600);

struct Waiting {
    since: Instant,
    addr: Multiaddr,
    held: Vec<Event>,
}

struct Refusal {
    version: String,
    at: Instant,
}

/// The admission state of connected and refused peers.
#[derive(Default)]
pub(super) struct Admission {
    admitted: HashSet<PeerId>,
    waiting: HashMap<PeerId, Waiting>,
    refused: HashMap<PeerId, Refusal>,
}

/// What identify's answer means for a peer.
#[derive(Debug)]
pub(super) enum Verdict {
    /// Newly admitted: emit these events (`Connected` first, then what was held back).
    Admitted(Vec<Event>),
    /// Admitted before, or no longer connected: nothing changes.
    Unchanged,
    /// Refused: disconnect it.
    Refused {
        /// Why.
        error: VersionError,
        /// Whether this is news worth a warning (not a repeat of the same refusal).
        warn: bool,
        /// Whether the peer had been admitted (the mesh task must hear it is gone).
        was_admitted: bool,
    },
}

impl Admission {
    /// A first connection to `peer` opened.
    pub(super) fn connected(&mut self, peer: PeerId, addr: Multiaddr, now: Instant) {
        if !self.admitted.contains(&peer) {
            self.waiting.entry(peer).or_insert(Waiting {
                since: now,
                addr,
                held: Vec::new(),
            });
        }
    }

    /// The last connection to `peer` closed; true if the mesh task had heard of it.
    pub(super) fn closed(&mut self, peer: &PeerId) -> bool {
        self.waiting.remove(peer);
        self.admitted.remove(peer)
    }

    /// Whether `peer` is admitted.
    pub(super) fn is_admitted(&self, peer: &PeerId) -> bool {
        self.admitted.contains(peer)
    }

    /// A message from `peer`: returned if it can be delivered now, held back if the peer has
    /// not identified itself yet, dropped otherwise.
    pub(super) fn deliver(&mut self, peer: &PeerId, event: Event) -> Option<Event> {
        if self.admitted.contains(peer) {
            return Some(event);
        }
        match self.waiting.get_mut(peer) {
            Some(waiting) if waiting.held.len() < MAX_HELD => waiting.held.push(event),
            Some(_) => tracing::debug!("dropped a message from {peer}: too many before identify"),
            None => tracing::debug!("dropped a message from {peer}, which is not admitted"),
        }
        None
    }

    /// Identify told us `peer`'s protocol version.
    pub(super) fn identified(
        &mut self,
        peer: PeerId,
        ours: u32,
        theirs: &str,
        now: Instant,
    ) -> Verdict {
        match version::check(ours, theirs) {
            Ok(_) => {
                let Some(waiting) = self.waiting.remove(&peer) else {
                    return Verdict::Unchanged;
                };
                self.admitted.insert(peer);
                self.refused.remove(&peer);
                let mut events = vec![Event::Connected {
                    peer,
                    addr: waiting.addr,
                }];
                events.extend(waiting.held);
                Verdict::Admitted(events)
            }
            Err(error) => {
                let warn = self
                    .refused
                    .get(&peer)
                    .is_none_or(|refusal| refusal.version != theirs);
                self.refused.insert(
                    peer,
                    Refusal {
                        version: theirs.to_string(),
                        at: now,
                    },
                );
                self.waiting.remove(&peer);
                Verdict::Refused {
                    error,
                    warn,
                    was_admitted: self.admitted.remove(&peer),
                }
            }
        }
    }

    /// Whether `peer` was refused less than [`REFUSED_PAUSE`] ago.
    pub(super) fn recently_refused(&self, peer: &PeerId, now: Instant) -> bool {
        self.refused
            .get(peer)
            .is_some_and(|r| now.saturating_duration_since(r.at) < REFUSED_PAUSE)
    }

    /// Peers that have not identified themselves within [`IDENTIFY_TIMEOUT`] (no longer
    /// waiting: the caller disconnects them); old refusals are forgotten.
    pub(super) fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        self.refused
            .retain(|_, r| now.saturating_duration_since(r.at) < REFUSAL_MEMORY);
        let late: Vec<PeerId> = self
            .waiting
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.since) >= IDENTIFY_TIMEOUT)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in &late {
            self.waiting.remove(peer);
        }
        late
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gossip(peer: PeerId, n: u8) -> Event {
        Event::Gossip {
            source: peer,
            data: vec![n],
        }
    }

    fn ours() -> String {
        version::format(1, 0)
    }

    #[test]
    fn messages_before_identify_are_delivered_after_connected() {
        let mut a = Admission::default();
        let peer = PeerId::random();
        let now = Instant::now();
        a.connected(peer, Multiaddr::empty(), now);
        assert!(a.deliver(&peer, gossip(peer, 1)).is_none());
        assert!(a.deliver(&peer, gossip(peer, 2)).is_none());
        let Verdict::Admitted(events) = a.identified(peer, 1, "codex-mesh/1.3", now) else {
            panic!("not admitted");
        };
        assert!(matches!(events[0], Event::Connected { .. }));
        assert!(matches!(&events[1], Event::Gossip { data, .. } if data == &[1]));
        assert!(matches!(&events[2], Event::Gossip { data, .. } if data == &[2]));
        assert!(a.deliver(&peer, gossip(peer, 3)).is_some());
        assert!(matches!(
            a.identified(peer, 1, &ours(), now),
            Verdict::Unchanged
        ));
        assert!(a.closed(&peer));
        assert!(a.deliver(&peer, gossip(peer, 4)).is_none());
    }

    #[test]
    fn a_peer_of_another_major_version_is_refused_and_warned_about_once() {
        let mut a = Admission::default();
        let peer = PeerId::random();
        let now = Instant::now();
        a.connected(peer, Multiaddr::empty(), now);
        assert!(a.deliver(&peer, gossip(peer, 1)).is_none());
        let verdict = a.identified(peer, 1, "codex-mesh/2.0", now);
        assert!(
            matches!(
                verdict,
                Verdict::Refused {
                    warn: true,
                    was_admitted: false,
                    ..
                }
            ),
            "{verdict:?}"
        );
        assert!(!a.closed(&peer));
        assert!(a.recently_refused(&peer, now));
        assert!(!a.recently_refused(&peer, now + REFUSED_PAUSE));
        // It connects again: refused again, without a second warning.
        a.connected(peer, Multiaddr::empty(), now);
        assert!(matches!(
            a.identified(peer, 1, "codex-mesh/2.0", now),
            Verdict::Refused { warn: false, .. }
        ));
        // Upgraded to our version: admitted.
        a.connected(peer, Multiaddr::empty(), now);
        assert!(matches!(
            a.identified(peer, 1, &ours(), now),
            Verdict::Admitted(_)
        ));
        assert!(!a.recently_refused(&peer, now));
    }

    #[test]
    fn what_is_held_back_is_bounded() {
        let mut a = Admission::default();
        let peer = PeerId::random();
        let now = Instant::now();
        a.connected(peer, Multiaddr::empty(), now);
        for n in 0..200u8 {
            assert!(a.deliver(&peer, gossip(peer, n)).is_none());
        }
        let Verdict::Admitted(events) = a.identified(peer, 1, &ours(), now) else {
            panic!("not admitted");
        };
        assert_eq!(events.len(), 1 + MAX_HELD);
    }

    #[test]
    fn a_peer_that_never_identifies_is_expired() {
        let mut a = Admission::default();
        let peer = PeerId::random();
        let now = Instant::now();
        a.connected(peer, Multiaddr::empty(), now);
        assert!(a.expire(now + Duration::from_secs(1)).is_empty());
        assert_eq!(a.expire(now + IDENTIFY_TIMEOUT), vec![peer]);
        assert!(a.deliver(&peer, gossip(peer, 1)).is_none());
        assert!(!a.is_admitted(&peer));
    }
}
