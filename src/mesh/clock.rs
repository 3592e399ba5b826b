//! The lease clock: monotonic milliseconds that keep counting while the machine is suspended
//! (`CLOCK_BOOTTIME` on Linux, [`Instant`] elsewhere), and a detector of wall-clock jumps that
//! the monotonic clock did not see.
//!
//! A master that was suspended must not wake up believing its lease is still fresh. With
//! `CLOCK_BOOTTIME` the suspended time is counted, so the lease lapses on its own; where only a
//! clock that stops during suspend is available, [`LeaseClock::observe`] notices that the wall
//! clock moved on much further than the monotonic clock, and the mesh drops its lease.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Milliseconds since creation on a clock that counts suspend, plus a wall-jump detector.
#[derive(Debug)]
pub struct LeaseClock {
    /// Fallback origin, also used where the boot-time clock cannot be read.
    started: Instant,
    /// The boot-time clock at creation, in nanoseconds, when it could be read.
    boot_origin_ns: Option<u128>,
    /// Largest value handed out, so that a fallback read never goes backwards.
    high_water: AtomicU64,
    /// How far the wall clock may run ahead of the monotonic clock between two observations.
    threshold_ms: u64,
    /// The previous observation: (wall clock, monotonic clock), in milliseconds.
    last: Option<(u64, u64)>,
}

impl LeaseClock {
    /// A clock starting at 0 now. `threshold_ms` is the largest unexplained advance of the wall
    /// clock over the monotonic clock that [`observe`](Self::observe) tolerates (for example
    /// the lease length).
    pub fn new(threshold_ms: u64) -> Self {
        Self {
            started: Instant::now(),
            boot_origin_ns: boottime_ns(),
            high_water: AtomicU64::new(0),
            threshold_ms,
            last: None,
        }
    }

    /// The jump threshold this clock was made with, in milliseconds.
    pub fn threshold_ms(&self) -> u64 {
        self.threshold_ms
    }

    /// Milliseconds since creation, suspended time included where the platform counts it.
    /// Never decreases.
    pub fn now_ms(&self) -> u64 {
        let elapsed_ns = match (self.boot_origin_ns, boottime_ns()) {
            (Some(origin), Some(now)) => now.saturating_sub(origin),
            _ => self.started.elapsed().as_nanos(),
        };
        let ms = u64::try_from(elapsed_ns / 1_000_000).unwrap_or(u64::MAX);
        self.high_water.fetch_max(ms, Ordering::Relaxed).max(ms)
    }

    /// Record a reading of the wall clock (`wall_unix_ms`) together with the monotonic clock
    /// (`mono_ms`, normally [`now_ms`](Self::now_ms)). Returns `Some(jump_ms)` when, since the
    /// previous reading, the wall clock advanced more than the threshold beyond the monotonic
    /// clock: a suspend the monotonic clock did not count, or a wall-clock step forward. The
    /// first reading, and a wall clock that went backwards, report nothing.
    pub fn observe(&mut self, wall_unix_ms: u64, mono_ms: u64) -> Option<u64> {
        let previous = self.last.replace((wall_unix_ms, mono_ms));
        let (last_wall, last_mono) = previous?;
        let wall = wall_unix_ms.saturating_sub(last_wall);
        let mono = mono_ms.saturating_sub(last_mono);
        let jump = wall.saturating_sub(mono);
        (jump > self.threshold_ms).then_some(jump)
    }
}

/// The jump threshold for an election `timing`: a sixth of the margin between the lease and
/// the election timeout, at least 20 ms. The rest of the margin covers clock rates 10 % apart
/// (a voter's 1200 ms at 1.1 against a leader's 900 ms at 0.9 leave 91 ms; 50 ms of an unseen
/// stall fit in it).
pub fn jump_threshold_ms(timing: &crate::proto::election::Timing) -> u64 {
    (timing.election_min_ms.saturating_sub(timing.lease_ms) / 6).max(20)
}

/// `CLOCK_BOOTTIME` in nanoseconds, if it can be read.
#[cfg(target_os = "linux")]
fn boottime_ns() -> Option<u128> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_BOOTTIME is a valid clock id.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return None;
    }
    let secs = u128::try_from(ts.tv_sec).ok()?;
    let nanos = u128::try_from(ts.tv_nsec).ok()?;
    Some(secs * 1_000_000_000 + nanos)
}

/// No boot-time clock here: [`Instant`] is used.
#[cfg(not(target_os = "linux"))]
fn boottime_ns() -> Option<u128> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_first_observation_reports_nothing() {
        let mut clock = LeaseClock::new(900);
        assert_eq!(clock.observe(1_700_000_000_000, 5), None);
    }

    #[test]
    fn wall_and_monotonic_moving_together_report_nothing() {
        let mut clock = LeaseClock::new(900);
        clock.observe(1_000_000, 0);
        assert_eq!(clock.observe(1_000_050, 50), None);
        // Drift up to the threshold is tolerated.
        assert_eq!(clock.observe(1_001_000, 100), None);
    }

    #[test]
    fn a_wall_advance_beyond_the_monotonic_clock_is_reported() {
        let mut clock = LeaseClock::new(900);
        clock.observe(1_000_000, 10_000);
        // Suspended for a minute while the monotonic clock moved 50 ms.
        assert_eq!(clock.observe(1_060_050, 10_050), Some(60_000));
        // The next reading is measured from the new one.
        assert_eq!(clock.observe(1_060_100, 10_100), None);
    }

    #[test]
    fn the_threshold_itself_is_tolerated() {
        let mut clock = LeaseClock::new(900);
        clock.observe(0, 0);
        assert_eq!(clock.observe(900, 0), None);
        assert_eq!(clock.observe(1_801, 0), Some(901));
    }

    #[test]
    fn a_wall_clock_going_backwards_reports_nothing() {
        let mut clock = LeaseClock::new(900);
        clock.observe(1_000_000, 0);
        assert_eq!(clock.observe(900_000, 100), None);
        // Measured from the stepped-back value afterwards.
        assert_eq!(clock.observe(900_200, 300), None);
    }

    #[test]
    fn now_ms_is_monotonic_and_not_behind_instant() {
        let clock = LeaseClock::new(900);
        let after = Instant::now();
        let deadline = after + Duration::from_secs(5);
        let mut previous = clock.now_ms();
        // Let at least 20 ms pass, checking every reading against the one before.
        while after.elapsed() < Duration::from_millis(20) {
            assert!(Instant::now() < deadline, "time did not advance");
            let now = clock.now_ms();
            assert!(now >= previous, "{now} < {previous}");
            previous = now;
            std::thread::yield_now();
        }
        let instant_ms = after.elapsed().as_millis();
        let lease_ms = u128::from(clock.now_ms());
        assert!(lease_ms >= instant_ms, "{lease_ms} < {instant_ms}");
        assert!(lease_ms >= 20);
    }
}
