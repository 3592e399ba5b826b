//! The attempt history of a job: one entry per attempt (which node, how it ended, when), kept
//! in the job record so a lost or retried attempt leaves a trace and not only a new number.
//!
//! Each entry is a register that only moves forward: an ended entry beats a started one, a
//! started one beats a bare assignment, and equal stages go to the later stamp. Writers are
//! the worker (start and end), the master (lost, refused) and any node (cancel).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::crdt::{Crdt, MaxReg, NodeId, Stamp};
use super::jobs::JobStatus;

/// Most attempts a job may have (a retry beyond is refused).
pub const MAX_ATTEMPTS: u32 = 64;

/// What is known of one attempt.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The node that ran (or was given) the attempt.
    pub node: Option<NodeId>,
    /// Its status when this entry was written.
    pub status: JobStatus,
    /// Why it ended that way.
    pub reason: Option<String>,
    /// When the node started preparing it (Unix ms).
    pub started_at_ms: Option<u64>,
    /// When it ended (Unix ms).
    pub ended_at_ms: Option<u64>,
    /// Who wrote this entry, and when.
    pub stamp: Stamp,
}

impl AttemptRecord {
    fn order_key(&self) -> (bool, u8, &Stamp) {
        (self.ended_at_ms.is_some(), self.status.rank(), &self.stamp)
    }
}

impl PartialOrd for AttemptRecord {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for AttemptRecord {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order_key()
            .cmp(&other.order_key())
            .then_with(|| self.status.cmp(&other.status))
            .then_with(|| self.node.cmp(&other.node))
            .then_with(|| self.reason.cmp(&other.reason))
            .then_with(|| self.started_at_ms.cmp(&other.started_at_ms))
            .then_with(|| self.ended_at_ms.cmp(&other.ended_at_ms))
    }
}

/// Attempt number to its entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attempts(pub BTreeMap<u32, MaxReg<AttemptRecord>>);

impl Crdt for Attempts {
    fn merge(&mut self, other: &Self) -> bool {
        let mut changed = false;
        for (attempt, theirs) in &other.0 {
            match self.0.get_mut(attempt) {
                Some(mine) => changed |= mine.merge(theirs),
                None => {
                    self.0.insert(*attempt, theirs.clone());
                    changed = true;
                }
            }
        }
        changed
    }
}

impl Attempts {
    /// The entry of `attempt`, if any.
    pub fn get(&self, attempt: u32) -> Option<&AttemptRecord> {
        self.0.get(&attempt).map(|r| &r.0)
    }

    /// Record that `node` started `attempt` at `at_ms`.
    pub fn started(&mut self, attempt: u32, node: &NodeId, at_ms: u64, stamp: Stamp) {
        let entry = AttemptRecord {
            node: Some(node.clone()),
            status: JobStatus::Preparing,
            reason: None,
            started_at_ms: Some(at_ms),
            ended_at_ms: None,
            stamp,
        };
        self.merge(&Attempts([(attempt, MaxReg(entry))].into_iter().collect()));
    }

    /// Record that `attempt` ended with `status` at `at_ms` (keeping the node and start time
    /// already known, unless `node` is given).
    pub fn ended(
        &mut self,
        attempt: u32,
        node: Option<&NodeId>,
        status: JobStatus,
        reason: Option<String>,
        at_ms: u64,
        stamp: Stamp,
    ) {
        let known = self.get(attempt);
        let entry = AttemptRecord {
            node: node.cloned().or_else(|| known.and_then(|k| k.node.clone())),
            status,
            reason,
            started_at_ms: known.and_then(|k| k.started_at_ms),
            ended_at_ms: Some(at_ms),
            stamp,
        };
        self.merge(&Attempts([(attempt, MaxReg(entry))].into_iter().collect()));
    }

    /// Check bounds before a record from anywhere is accepted.
    pub fn validate(&self) -> Result<(), String> {
        if self.0.len() > MAX_ATTEMPTS as usize {
            return Err(format!("more than {MAX_ATTEMPTS} attempts"));
        }
        let too_long = self.0.values().any(|r| {
            r.0.reason.as_ref().is_some_and(|t| t.len() > 4096)
                || r.0.node.as_ref().is_some_and(|n| n.len() > 128)
        });
        if too_long {
            return Err("an attempt entry is too long".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::crdt::laws;
    use super::super::hlc::Hlc;
    use super::*;
    use proptest::prelude::*;

    fn stamp(t: u64, by: &str) -> Stamp {
        Stamp {
            at: Hlc {
                wall_ms: t,
                logical: 0,
            },
            by: by.into(),
        }
    }

    fn attempts() -> impl Strategy<Value = Attempts> {
        proptest::collection::vec((1u32..4, 0u64..4, any::<bool>(), "[ab]"), 0..4).prop_map(
            |entries| {
                let mut a = Attempts::default();
                for (attempt, t, ended, by) in entries {
                    if ended {
                        a.ended(attempt, None, JobStatus::Lost, None, t, stamp(t, &by));
                    } else {
                        a.started(attempt, &by, t, stamp(t, &by));
                    }
                }
                a
            },
        )
    }

    proptest! {
        #[test]
        fn attempt_histories_obey_the_merge_laws(a in attempts(), b in attempts(), c in attempts()) {
            laws::commutative(&a, &b);
            laws::associative(&a, &b, &c);
            laws::idempotent(&a);
        }
    }

    #[test]
    fn an_end_keeps_the_start_and_outranks_it() {
        let mut a = Attempts::default();
        a.started(1, &"w".to_string(), 10, stamp(10, "w"));
        a.ended(
            1,
            None,
            JobStatus::Lost,
            Some("node w restarted".into()),
            20,
            stamp(20, "m"),
        );
        // A late copy of the start does not undo the end.
        let mut late = Attempts::default();
        late.started(1, &"w".to_string(), 10, stamp(30, "w"));
        a.merge(&late);
        let entry = a.get(1).cloned();
        assert_eq!(entry.as_ref().map(|e| e.status), Some(JobStatus::Lost));
        assert_eq!(
            entry.as_ref().and_then(|e| e.node.clone()),
            Some("w".into())
        );
        assert_eq!(entry.as_ref().and_then(|e| e.started_at_ms), Some(10));
        assert_eq!(entry.and_then(|e| e.ended_at_ms), Some(20));
    }
}
