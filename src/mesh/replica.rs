//! The replica: this node's copy of the replicated records, its store, its hybrid logical
//! clock and the read snapshots, kept in step. A change is in the store before it is in
//! memory, and in the snapshot writer as soon as it is in memory.

use std::collections::BTreeMap;

use thiserror::Error;

use super::snapshot::{LocalFacts, Reader, SnapshotWriter};
use super::unix_ms;
use crate::proto::crdt::{NodeId, Stamp};
use crate::proto::hlc::HlcClock;
use crate::proto::jobs::JobRecord;
use crate::proto::records::{Key, MasterInfo, NodeAdmin, NodeInfo, Record};
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

    /// The record under `key`.
    pub fn get(&self, key: &Key) -> Option<&Record> {
        self.state.get(&key.encode())
    }

    /// Job `id`.
    pub fn job(&self, id: &str) -> Option<&JobRecord> {
        match self.get(&Key::Job(id.to_string())) {
            Some(Record::Job(job)) => Some(job),
            _ => None,
        }
    }

    /// Operator decisions about node `id`.
    pub fn admin(&self, id: &str) -> Option<&NodeAdmin> {
        match self.get(&Key::Admin(id.to_string())) {
            Some(Record::Admin(admin)) => Some(admin),
            _ => None,
        }
    }

    /// The newest lease record.
    pub fn master(&self) -> Option<&MasterInfo> {
        match self.get(&Key::Master) {
            Some(Record::Master(m)) => Some(&m.0),
            _ => None,
        }
    }

    /// Every node's own record.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.state
            .with_prefix("node/")
            .filter_map(|(_, r)| match r {
                Record::Node(info) => Some(&info.value),
                _ => None,
            })
    }

    /// Every job.
    pub fn jobs(&self) -> impl Iterator<Item = &JobRecord> {
        self.state.with_prefix("job/").filter_map(|(_, r)| match r {
            Record::Job(job) => Some(&**job),
            _ => None,
        })
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
        let merged = match self.state.merged(key, record) {
            Ok(Some(merged)) => merged,
            Ok(None) => return Ok(None),
            Err(e) => return Err(ReplicaError::Invalid(e.to_string())),
        };
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
                Ok(Some(merged)) => {
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

    /// Apply a record that is in the store, and hand it to the snapshot writer.
    fn apply_stored(&mut self, key: &str, record: &Record) {
        let _ = self.state.apply(key, record);
        if let Some(shared) = self.state.get_shared(key) {
            self.snapshots.record_changed(key, shared);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::crdt::MaxReg;
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
        assert!(
            reader.current().master_record().is_none(),
            "not published yet"
        );
        let snapshot = replica.snapshots().build(local());
        replica.snapshots_mut().publish(snapshot);
        assert_eq!(reader.current().master_record().map(|m| m.epoch), Some(2));
        assert!(matches!(
            replica.commit("bogus key", &master(3)),
            Err(ReplicaError::Invalid(_))
        ));
        drop(replica);
        // What was committed is what a restart loads, and the first snapshot has it.
        let (replica, reader) = Replica::open(Store::open(&path).unwrap(), local()).unwrap();
        assert_eq!(replica.master().map(|m| m.epoch), Some(2));
        assert_eq!(reader.current().master_record().map(|m| m.epoch), Some(2));
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
}
