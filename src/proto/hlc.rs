//! Hybrid logical clocks: timestamps that follow wall-clock time but never go backwards and
//! always order a received change before the changes made after it.

use serde::{Deserialize, Serialize};

/// How far ahead of our wall clock a remote timestamp may be before we stop following it.
pub const MAX_FORWARD_DRIFT_MS: u64 = 60_000;

/// One hybrid logical timestamp: wall-clock milliseconds plus a logical counter.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch (the largest physical time seen).
    pub wall_ms: u64,
    /// Counter that orders events within one millisecond.
    pub logical: u32,
}

/// The clock of one node. It is pure: the caller supplies the physical time.
#[derive(Clone, Debug, Default)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock that starts after `last` (e.g. the largest timestamp found in the store).
    pub fn starting_after(last: Hlc) -> Self {
        Self { last }
    }

    /// The last timestamp this clock issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A new timestamp for a local event at physical time `physical_ms`.
    pub fn tick(&mut self, physical_ms: u64) -> Hlc {
        self.last = if physical_ms > self.last.wall_ms {
            Hlc {
                wall_ms: physical_ms,
                logical: 0,
            }
        } else {
            Hlc {
                wall_ms: self.last.wall_ms,
                logical: self.last.logical.saturating_add(1),
            }
        };
        self.last
    }

    /// Take a remote timestamp into account so that later local events sort after it.
    /// A timestamp too far in the future (a peer with a broken clock) is not followed.
    pub fn observe(&mut self, remote: Hlc, physical_ms: u64) {
        if remote.wall_ms > physical_ms.saturating_add(MAX_FORWARD_DRIFT_MS) {
            return;
        }
        if remote > self.last {
            self.last = remote;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_strictly_increasing_even_when_the_wall_clock_goes_back() {
        let mut clock = HlcClock::default();
        let a = clock.tick(1_000);
        let b = clock.tick(900);
        let c = clock.tick(1_000);
        let d = clock.tick(1_001);
        assert!(a < b && b < c && c < d);
        assert_eq!(d.logical, 0);
    }

    #[test]
    fn observed_remote_time_orders_later_local_events_after_it() {
        let mut clock = HlcClock::default();
        clock.observe(
            Hlc {
                wall_ms: 5_000,
                logical: 7,
            },
            4_000,
        );
        let next = clock.tick(4_000);
        assert!(
            next > Hlc {
                wall_ms: 5_000,
                logical: 7
            }
        );
    }

    #[test]
    fn far_future_remote_time_is_not_followed() {
        let mut clock = HlcClock::default();
        clock.observe(
            Hlc {
                wall_ms: 10_000_000,
                logical: 0,
            },
            1_000,
        );
        assert_eq!(clock.tick(1_000).wall_ms, 1_000);
    }
}
