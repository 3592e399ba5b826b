//! The replica: this node's copy of the replicated records, its store, its hybrid logical
//! clock and the read snapshots, kept in step. A change is in the store before it is in
//! memory, and in the snapshot writer as soon as it is in memory.

use std::collections::BTreeMap;

use thiserror::Error;

use super::snapshot::{LocalFacts, Reader, SnapshotWriter};
use super::unix_ms;
use crate::proto::crdt::{NodeId, Stamp};
use crate::proto::history;
use crate::proto::hlc::HlcClock;
use crate::proto::lookup::RecordLookup;
use crate::proto::records::{Key, Record};
use crate::proto::state::ReplicatedState;
use crate::store::{Store, StoreError};

/// Why a change was not made.
#[derive(Debug, Error)]
pub enum ReplicaError {
    /// The record is not valid under its key.
    #[error("{0}")]
    Invalid(String),
    /// The store refused the write; nothing was applied.
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// The records, the store, the clock and the snapshot writer of one node.
pub struct Replica {
    state: ReplicatedState,
    store: Store,
    clock: HlcClock,
    snapshots: SnapshotWriter,
    /// Where history compaction goes on: the horizon it works under and the last job key
    /// it compacted.
    compaction_cursor: Option<(u64, String)>,
}

impl Replica {
    /// Load every stored record (invalid ones are skipped with a warning) and publish the
    /// first snapshot with `local`.
    pub fn open(store: Store, local: LocalFacts) -> Result<(Replica, Reader), StoreError> {
        let mut state = ReplicatedState::default();
        let mut clock = HlcClock::default();
        for (key, record) in store.load_records()? {
            clock.observe(record.latest_hlc(), unix_ms());
            if let Err(e) = state.apply(&key, &record) {
                tracing::warn!("ignoring stored record {key}: {e}");
            }
        }
        let (mut snapshots, reader) = SnapshotWriter::new(local.clone());
        for (key, _) in state.iter() {
            if let Some(record) = state.get_shared(key) {
                snapshots.record_changed(key, record);
            }
        }
        snapshots.publish(snapshots.build(local));
        let replica = Replica {
            state,
            store,
            clock,
            compaction_cursor: None,
            snapshots,
        };
        Ok((replica, reader))
    }

    /// The records (digests and summaries for anti-entropy included).
    pub fn state(&self) -> &ReplicatedState {
        &self.state
    }

    /// The store (for the node's own metadata).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The snapshot writer.
    pub fn snapshots(&self) -> &SnapshotWriter {
        &self.snapshots
    }

    /// The snapshot writer, to report changes no record carries and to publish.
    pub fn snapshots_mut(&mut self) -> &mut SnapshotWriter {
        &mut self.snapshots
    }

    /// A stamp for a write by `by` now.
    pub fn stamp(&mut self, by: &NodeId) -> Stamp {
        Stamp {
            at: self.clock.tick(unix_ms()),
            by: by.clone(),
        }
    }

    /// Merge `record` under `key`, persist, apply: the merged record when it changed
    /// anything, `None` when it did not.
    pub fn commit(&mut self, key: &str, record: &Record) -> Result<Option<Record>, ReplicaError> {
        let mut merged = match self.state.merged(key, record) {
            Ok(Some(merged)) => merged,
            Ok(None) => return Ok(None),
            Err(e) => return Err(ReplicaError::Invalid(e.to_string())),
        };
        self.compact_if_due(&mut merged);
        self.store.put_records(&[(key, &merged)])?;
        self.apply_stored(key, &merged);
        Ok(Some(merged))
    }

    /// Merge a batch of records from a peer: the ones that change anything are persisted in
    /// one transaction, then applied. `admit` decides for each record first (a refusal is
    /// only counted). Returns the changed records, or the store's refusal (then nothing is
    /// applied: anti-entropy brings the records again later); and how many were refused.
    pub fn merge_batch(
        &mut self,
        records: Vec<(String, Record)>,
        mut admit: impl FnMut(&Record) -> bool,
    ) -> (Result<BTreeMap<String, Record>, StoreError>, usize) {
        let now_unix = unix_ms();
        let mut refused = 0;
        let mut changed: BTreeMap<String, Record> = BTreeMap::new();
        for (key, record) in records {
            if !admit(&record) {
                refused += 1;
                continue;
            }
            let result = match changed.get(&key).cloned() {
                // The same key twice in one batch: merge onto what this batch already has.
                Some(mut pending) => Ok(pending.merge(&record).then_some(pending)),
                None => self.state.merged(&key, &record),
            };
            match result {
                Ok(Some(mut merged)) => {
                    self.compact_if_due(&mut merged);
                    self.clock.observe(record.latest_hlc(), now_unix);
                    changed.insert(key, merged);
                }
                Ok(None) => {}
                Err(e) => {
                    refused += 1;
                    tracing::debug!("refused a record from a peer: {e}");
                }
            }
        }
        let rows: Vec<(&str, &Record)> = changed.iter().map(|(k, r)| (k.as_str(), r)).collect();
        if let Err(e) = self.store.put_records(&rows) {
            return (Err(e), refused);
        }
        for (key, record) in &changed {
            self.apply_stored(key, record);
        }
        (Ok(changed), refused)
    }

    /// Compact a job that arrives (or changes) after the horizon already covers it: a node
    /// back from a long absence, or a peer that has not compacted yet, never brings the
    /// dropped history back here.
    fn compact_if_due(&self, record: &mut Record) {
        if let (Record::Job(job), Some(horizon)) = (record, self.horizon()) {
            if history::is_due(job, horizon.before_ms) {
                history::compact(job);
            }
        }
    }

    /// Compact up to `max` jobs that the horizon covers and that are not compacted yet, in
    /// one store transaction. Returns the ids compacted (fewer than `max`: none are left).
    /// Each call goes on after the last job the previous one compacted under the same
    /// horizon (jobs changed meanwhile were compacted as they changed).
    pub fn compact_history(&mut self, max: usize) -> Result<Vec<String>, StoreError> {
        let Some(before_ms) = self.horizon().map(|h| h.before_ms) else {
            return Ok(Vec::new());
        };
        let after = match self.compaction_cursor.take() {
            Some((horizon, key)) if horizon == before_ms => key,
            _ => String::new(),
        };
        let mut shrunk = 0u64;
        let mut ids = Vec::new();
        let mut rows: Vec<(String, Record)> = Vec::new();
        for (key, record) in self.state.records_after(Key::JOB_PREFIX, &after) {
            if rows.len() >= max {
                break;
            }
            let Record::Job(job) = record else { continue };
            if !history::is_due(job, before_ms) {
                continue;
            }
            let mut compacted = job.clone();
            history::compact(&mut compacted);
            ids.push(compacted.spec.id.clone());
            let compacted = Record::Job(compacted);
            shrunk += record.encoded_len().saturating_sub(compacted.encoded_len()) as u64;
            rows.push((key.clone(), compacted));
        }
        let refs: Vec<(&str, &Record)> = rows.iter().map(|(k, r)| (k.as_str(), r)).collect();
        self.store.put_records_shrunk(&refs, shrunk)?;
        for (key, record) in &rows {
            self.apply_stored(key, record);
        }
        if rows.len() >= max {
            if let Some((key, _)) = rows.last() {
                self.compaction_cursor = Some((before_ms, key.clone()));
            }
        }
        Ok(ids)
    }

    /// Apply a record that is in the store, and hand it to the snapshot writer.
    fn apply_stored(&mut self, key: &str, record: &Record) {
        let _ = self.state.apply(key, record);
        if let Some(shared) = self.state.get_shared(key) {
            self.snapshots.record_changed(key, shared);
        }
    }
}

impl RecordLookup for Replica {
    fn record(&self, key: &str) -> Option<&Record> {
        self.state.get(key)
    }

    fn records_from<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Record)> + 'a {
        self.state.records_from(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::crdt::MaxReg;
    use crate::proto::history::Horizon;
    use crate::proto::records::MasterInfo;
    use std::collections::BTreeSet;

    fn local() -> LocalFacts {
        LocalFacts::before_start("me", "me", "m", "/nonexistent".into())
    }

    fn master(epoch: u64) -> Record {
        Record::Master(MaxReg(MasterInfo {
            epoch,
            config_index: 1,
            master: "me".into(),
            since_ms: 0,
            voters: BTreeSet::new(),
        }))
    }

    #[test]
    fn a_commit_is_stored_applied_and_in_the_next_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let (mut replica, reader) = Replica::open(Store::open(&path).unwrap(), local()).unwrap();
        assert!(replica.commit("master", &master(2)).unwrap().is_some());
        assert!(
            replica.commit("master", &master(1)).unwrap().is_none(),
            "an older lease record changes nothing"
        );
        assert_eq!(replica.master().map(|m| m.epoch), Some(2));
        assert!(reader.current().master().is_none(), "not published yet");
        let snapshot = replica.snapshots().build(local());
        replica.snapshots_mut().publish(snapshot);
        assert_eq!(reader.current().master().map(|m| m.epoch), Some(2));
        assert!(matches!(
            replica.commit("bogus key", &master(3)),
            Err(ReplicaError::Invalid(_))
        ));
        drop(replica);
        // What was committed is what a restart loads, and the first snapshot has it.
        let (replica, reader) = Replica::open(Store::open(&path).unwrap(), local()).unwrap();
        assert_eq!(replica.master().map(|m| m.epoch), Some(2));
        assert_eq!(reader.current().master().map(|m| m.epoch), Some(2));
    }

    #[test]
    fn a_batch_merges_duplicates_and_counts_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        let (mut replica, _reader) = Replica::open(store, local()).unwrap();
        let batch = vec![
            ("master".to_string(), master(1)),
            ("master".to_string(), master(3)),
            ("master".to_string(), master(2)),
            ("bogus key".to_string(), master(9)),
            ("master".to_string(), master(7)),
        ];
        let mut seen = 0;
        let (changed, refused) = replica.merge_batch(batch, |_| {
            seen += 1;
            seen != 5
        });
        let changed = changed.unwrap();
        assert_eq!(refused, 2, "one not admitted, one invalid");
        assert_eq!(changed.len(), 1);
        assert_eq!(replica.master().map(|m| m.epoch), Some(3));
    }

    fn horizon_at(before_ms: u64) -> Record {
        Record::History(MaxReg(Horizon {
            before_ms,
            epoch: 1,
            set_by: "me".into(),
        }))
    }

    #[test]
    fn history_is_compacted_in_batches_and_full_copies_arriving_later_are_compacted() {
        use crate::proto::history::tests::{job, NOW};
        use crate::proto::history::DAY_MS;
        use crate::proto::jobs::JobStatus;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let (mut replica, _reader) = Replica::open(Store::open(&path).unwrap(), local()).unwrap();
        let record = |i: u64, age: u64| {
            let mut job = job(JobStatus::Succeeded, NOW - age);
            job.spec.id = crate::proto::ids::ulid(NOW - age, u128::from(i));
            (
                Key::Job(job.spec.id.clone()).encode(),
                Record::Job(Box::new(job)),
            )
        };
        let old: Vec<(String, Record)> = (0..5).map(|i| record(i, 40 * DAY_MS)).collect();
        let recent = record(99, DAY_MS);
        let mut batch = old[..4].to_vec();
        batch.push(recent.clone());
        assert!(replica.merge_batch(batch, |_| true).0.is_ok());
        assert!(
            replica.compact_history(10).unwrap().is_empty(),
            "no horizon yet"
        );
        replica
            .commit("history", &horizon_at(NOW - 30 * DAY_MS))
            .unwrap();
        assert_eq!(replica.compact_history(3).unwrap().len(), 3, "a full batch");
        assert_eq!(replica.compact_history(3).unwrap().len(), 1, "the rest");
        assert!(replica.compact_history(3).unwrap().is_empty());
        assert!(replica.job(&recent.0[4..]).is_some_and(|j| !j.compacted));

        // A full copy of an old job arriving after the horizon is compacted on arrival.
        let (key, late) = old[4].clone();
        let changed = replica
            .merge_batch(vec![(key.clone(), late)], |_| true)
            .0
            .unwrap();
        assert!(matches!(&changed[&key], Record::Job(j) if j.compacted));
        // And a full copy of an already compacted one changes nothing.
        let (key, full) = old[0].clone();
        assert!(replica
            .merge_batch(vec![(key, full)], |_| true)
            .0
            .unwrap()
            .is_empty());
        drop(replica);
        let (replica, _reader) = Replica::open(Store::open(&path).unwrap(), local()).unwrap();
        assert_eq!(
            replica.all_jobs().filter(|j| j.compacted).count(),
            5,
            "stored compacted"
        );
    }
}
