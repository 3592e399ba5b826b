//! Counters and gauges exposed at `GET /metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// All metrics of one node. Cheap to update from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Peers with an open connection.
    pub peers_connected: AtomicU64,
    /// Gossip messages received and accepted.
    pub gossip_in: AtomicU64,
    /// Gossip messages published.
    pub gossip_out: AtomicU64,
    /// Gossip messages dropped as malformed, oversized or from a refused peer.
    pub gossip_dropped: AtomicU64,
    /// Requests or records refused as malformed or invalid.
    pub wire_dropped: AtomicU64,
    /// Anti-entropy rounds completed (as initiator).
    pub anti_entropy_rounds: AtomicU64,
    /// Records changed locally by anti-entropy.
    pub anti_entropy_records_received: AtomicU64,
    /// Jobs whose history this node compacted (past the horizon).
    pub jobs_compacted: AtomicU64,
    /// Current election term.
    pub election_term: AtomicU64,
    /// 1 while this node acts as master.
    pub is_master: AtomicU64,
    /// Replicated records held.
    pub records: AtomicU64,
    /// Size of the store file in bytes.
    pub store_bytes: AtomicU64,
    /// Largest age of the lease's evidence seen while leading: the time since the newest
    /// heartbeat a quorum acknowledged (ms). Stays near the heartbeat interval when healthy.
    pub lease_age_max_ms: AtomicU64,
}

const COUNTERS: &[(&str, &str)] = &[
    (
        "gossip_messages_in_total",
        "Gossip messages received and accepted.",
    ),
    ("gossip_messages_out_total", "Gossip messages published."),
    (
        "gossip_messages_dropped_total",
        "Gossip messages dropped as malformed or refused.",
    ),
    (
        "wire_messages_dropped_total",
        "Peer requests or records refused as malformed or invalid.",
    ),
    (
        "anti_entropy_rounds_total",
        "Anti-entropy rounds completed as initiator.",
    ),
    (
        "anti_entropy_records_received_total",
        "Records changed locally by anti-entropy.",
    ),
    (
        "jobs_compacted_total",
        "Finished jobs whose history this node compacted (past the horizon).",
    ),
];

const GAUGES: &[(&str, &str)] = &[
    ("peers_connected", "Peers with an open connection."),
    ("election_term", "Current election term (lease epoch)."),
    ("is_master", "1 while this node acts as master."),
    ("records", "Replicated records held."),
    ("store_bytes", "Size of the store file in bytes."),
    (
        "lease_age_max_ms",
        "Largest time since the newest quorum-acknowledged heartbeat seen while leading (ms).",
    ),
];

impl Metrics {
    /// Add one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Raise a gauge to `value` if it is lower.
    pub fn raise(gauge: &AtomicU64, value: u64) {
        gauge.fetch_max(value, Ordering::Relaxed);
    }

    /// Set a gauge.
    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    fn value(&self, name: &str) -> u64 {
        let cell = match name {
            "gossip_messages_in_total" => &self.gossip_in,
            "gossip_messages_out_total" => &self.gossip_out,
            "gossip_messages_dropped_total" => &self.gossip_dropped,
            "wire_messages_dropped_total" => &self.wire_dropped,
            "anti_entropy_rounds_total" => &self.anti_entropy_rounds,
            "anti_entropy_records_received_total" => &self.anti_entropy_records_received,
            "jobs_compacted_total" => &self.jobs_compacted,
            "peers_connected" => &self.peers_connected,
            "election_term" => &self.election_term,
            "is_master" => &self.is_master,
            "records" => &self.records,
            "lease_age_max_ms" => &self.lease_age_max_ms,
            _ => &self.store_bytes,
        };
        cell.load(Ordering::Relaxed)
    }

    /// Render in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (kind, list) in [("counter", COUNTERS), ("gauge", GAUGES)] {
            for (name, help) in list {
                let _ = writeln!(out, "# HELP codex_mesh_{name} {help}");
                let _ = writeln!(out, "# TYPE codex_mesh_{name} {kind}");
                let _ = writeln!(out, "codex_mesh_{name} {}", self.value(name));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_its_value() {
        let m = Metrics::default();
        Metrics::inc(&m.gossip_in);
        Metrics::set(&m.election_term, 7);
        let text = m.render();
        assert!(text.contains("codex_mesh_gossip_messages_in_total 1\n"));
        assert!(text.contains("codex_mesh_election_term 7\n"));
        assert!(text.contains("# TYPE codex_mesh_peers_connected gauge"));
    }
}
