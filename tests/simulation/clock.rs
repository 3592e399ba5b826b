//! Per-node clocks: a rate within ±10% of true time and offsets, a monotonic clock that
//! stands still while the node is frozen, and the runtime's clock-jump rule.

use crate::sim::Rng;

/// Unix time (ms) at which every simulation starts, before per-node offsets.
const WALL_BASE_MS: u64 = 1_750_000_000_000;
/// Clock rates are drawn within this many per mille of the true rate.
const RATE_SPREAD_PERMILLE: u64 = 100;
/// Wall clocks of different nodes differ by up to this much.
const WALL_SKEW_MS: u64 = 2_000;

/// A node's clocks as functions of global time: both run at the node's own rate; the
/// monotonic one stands still while the node is frozen, the wall clock does not.
#[derive(Clone, Debug)]
pub struct Clock {
    /// Rate in per mille of global time.
    pub rate: u64,
    mono_offset: u64,
    wall_offset: u64,
    /// Global time spent frozen in earlier freezes.
    frozen_total: u64,
    /// Global time the current freeze began.
    pub frozen_since: Option<u64>,
}

impl Clock {
    pub fn draw(rng: &mut Rng) -> Clock {
        Clock {
            rate: rng.range((1_000 - RATE_SPREAD_PERMILLE, 1_000 + RATE_SPREAD_PERMILLE)),
            mono_offset: rng.range((0, 1_000_000)),
            wall_offset: rng.range((0, WALL_SKEW_MS)),
            frozen_total: 0,
            frozen_since: None,
        }
    }

    /// Monotonic milliseconds at global time `global`.
    pub fn mono(&self, global: u64) -> u64 {
        let stopped = self.frozen_total + self.frozen_since.map_or(0, |s| global - s);
        self.mono_offset + (global - stopped) * self.rate / 1_000
    }

    /// Unix milliseconds at global time `global`.
    pub fn wall(&self, global: u64) -> u64 {
        WALL_BASE_MS + self.wall_offset + global * self.rate / 1_000
    }

    /// End the current freeze (if any) at `global`.
    pub fn thaw(&mut self, global: u64) {
        if let Some(since) = self.frozen_since.take() {
            self.frozen_total += global - since;
        }
    }
}

/// The runtime's clock-jump rule, and its threshold for the default timing.
pub use codex_mesh::mesh::clock::LeaseClock;

/// The jump threshold the runtime uses with the default timing.
pub fn jump_threshold_ms() -> u64 {
    codex_mesh::mesh::clock::jump_threshold_ms(&codex_mesh::proto::election::Timing::default())
}
