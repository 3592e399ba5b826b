//! Who was heard from, and when (monotonic ms). Derived, in memory only.

use std::collections::HashMap;

/// A node is online if heard from within this window (three heartbeat periods).
pub const ONLINE_WINDOW_MS: u64 = 6_000;
/// A voter is replaced only after being silent this long.
pub const VOTER_GRACE_MS: u64 = 30_000;

/// Last time each node was heard from.
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    heard: HashMap<String, u64>,
}

impl Liveness {
    /// Note that `id` was heard from at `now`.
    pub fn heard(&mut self, id: &str, now: u64) {
        self.heard.insert(id.to_string(), now);
    }

    /// Heard from within [`ONLINE_WINDOW_MS`].
    pub fn is_online(&self, id: &str, now: u64) -> bool {
        self.heard
            .get(id)
            .is_some_and(|&t| now.saturating_sub(t) < ONLINE_WINDOW_MS)
    }

    /// Heard from within [`VOTER_GRACE_MS`] (or we started less than that ago).
    pub fn recently_seen(&self, id: &str, now: u64) -> bool {
        now < VOTER_GRACE_MS
            || self
                .heard
                .get(id)
                .is_some_and(|&t| now.saturating_sub(t) < VOTER_GRACE_MS)
    }

    /// Unix ms of the last time `id` was heard, given the current monotonic and Unix times.
    pub fn last_heard_unix(&self, id: &str, now: u64, now_unix: u64) -> Option<u64> {
        self.heard
            .get(id)
            .map(|&t| now_unix.saturating_sub(now.saturating_sub(t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_window_and_grace() {
        let mut l = Liveness::default();
        l.heard("a", 100_000);
        assert!(l.is_online("a", 105_000));
        assert!(!l.is_online("a", 106_000));
        assert!(l.recently_seen("a", 120_000));
        assert!(!l.recently_seen("a", 140_000));
        assert!(!l.is_online("b", 100_000));
        assert_eq!(l.last_heard_unix("a", 101_000, 5_000_000), Some(4_999_000));
    }
}
