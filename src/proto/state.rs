//! The replicated state: every record by key, with per-key digests and bucket summaries that
//! anti-entropy compares. Pure: persistence is the caller's job.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::lookup::RecordLookup;
use super::records::{Key, Record, RecordError};

/// Number of buckets the key space is split into for anti-entropy summaries.
pub const BUCKETS: usize = 64;

/// A record with its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// Shared with the read snapshots, so they cost no copy of the record.
    record: Arc<Record>,
    digest: u64,
}

/// All replicated records held by one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicatedState {
    entries: BTreeMap<String, Entry>,
    buckets: [u64; BUCKETS],
}

impl Default for ReplicatedState {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            buckets: [0; BUCKETS],
        }
    }
}

/// Digest of a record's canonical encoding (ciborium, deterministic for our types).
pub fn record_digest(record: &Record) -> u64 {
    let mut bytes = Vec::new();
    // Encoding our own in-memory types into a Vec cannot fail.
    let _ = ciborium::into_writer(record, &mut bytes);
    first_u64(blake3::hash(&bytes).as_bytes())
}

/// Which anti-entropy bucket a key falls in.
pub fn bucket_of(key: &str) -> usize {
    (blake3::hash(key.as_bytes()).as_bytes()[0] as usize) % BUCKETS
}

fn entry_hash(key: &str, digest: u64) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(key.as_bytes());
    hasher.update(&digest.to_le_bytes());
    first_u64(hasher.finalize().as_bytes())
}

fn first_u64(bytes: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(first)
}

impl ReplicatedState {
    /// Merge `record` under `key`. Returns the merged record when the state changed.
    pub fn apply(&mut self, key: &str, record: &Record) -> Result<Option<Record>, RecordError> {
        let parsed = Key::parse(key)?;
        record.validate(&parsed)?;
        let bucket = bucket_of(key);
        match self.entries.get_mut(key) {
            Some(entry) => {
                let mut merged = (*entry.record).clone();
                if !merged.merge(record) {
                    return Ok(None);
                }
                let digest = record_digest(&merged);
                self.buckets[bucket] ^= entry_hash(key, entry.digest) ^ entry_hash(key, digest);
                entry.record = Arc::new(merged.clone());
                entry.digest = digest;
                Ok(Some(merged))
            }
            None => {
                let digest = record_digest(record);
                self.buckets[bucket] ^= entry_hash(key, digest);
                self.entries.insert(
                    key.to_string(),
                    Entry {
                        record: Arc::new(record.clone()),
                        digest,
                    },
                );
                Ok(Some(record.clone()))
            }
        }
    }

    /// What `apply` would store under `key`, without changing anything: the merged record
    /// when it differs from the current one. Lets the caller persist before applying.
    pub fn merged(&self, key: &str, record: &Record) -> Result<Option<Record>, RecordError> {
        let parsed = Key::parse(key)?;
        record.validate(&parsed)?;
        match self.entries.get(key) {
            Some(entry) => {
                let mut merged = (*entry.record).clone();
                Ok(merged.merge(record).then_some(merged))
            }
            None => Ok(Some(record.clone())),
        }
    }

    /// The record under `key`.
    pub fn get(&self, key: &str) -> Option<&Record> {
        self.entries.get(key).map(|e| &*e.record)
    }

    /// The record under `key`, shared (no copy).
    pub fn get_shared(&self, key: &str) -> Option<Arc<Record>> {
        self.entries.get(key).map(|e| e.record.clone())
    }

    /// All records, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.entries.iter().map(|(k, e)| (k, &*e.record))
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bucket summary compared in the first anti-entropy step.
    pub fn bucket_summary(&self) -> Vec<u64> {
        self.buckets.to_vec()
    }

    /// Buckets whose summary differs from `theirs` (all buckets if `theirs` is malformed).
    pub fn differing_buckets(&self, theirs: &[u64]) -> Vec<u16> {
        (0..BUCKETS)
            .filter(|&b| theirs.get(b) != Some(&self.buckets[b]) || theirs.len() != BUCKETS)
            .map(|b| b as u16)
            .collect()
    }

    /// `(key, digest)` of every record in the given buckets.
    pub fn digests_in(&self, buckets: &[u16]) -> Vec<(String, u64)> {
        let wanted: std::collections::BTreeSet<usize> =
            buckets.iter().map(|&b| b as usize).collect();
        self.entries
            .iter()
            .filter(|(k, _)| wanted.contains(&bucket_of(k)))
            .map(|(k, e)| (k.clone(), e.digest))
            .collect()
    }

    /// Compare a peer's digests for `buckets` with ours. Returns the records the peer lacks or
    /// holds differently (at most `limit` records and `max_bytes` of encoded key and record,
    /// but always at least one; `more` tells whether any were left out) and the keys we lack
    /// or hold differently. The page starts at the differing key number `start` (modulo their
    /// count) and wraps around: a caller passing a random `start` keeps records the peer
    /// refuses from filling every page and starving the others.
    pub fn reconcile(
        &self,
        buckets: &[u16],
        theirs: &[(String, u64)],
        limit: usize,
        max_bytes: usize,
        start: u64,
    ) -> Reconciliation {
        let their_map: BTreeMap<&str, u64> = theirs.iter().map(|(k, d)| (k.as_str(), *d)).collect();
        let mut out = Reconciliation::default();
        let differing: Vec<String> = self
            .digests_in(buckets)
            .into_iter()
            .filter(|(key, digest)| their_map.get(key.as_str()) != Some(digest))
            .map(|(key, _)| key)
            .collect();
        let start = match differing.len() {
            0 => 0,
            n => (start % n as u64) as usize,
        };
        let mut bytes = 0usize;
        let (tail, head) = differing.split_at(start);
        for key in head.iter().chain(tail) {
            let Some(record) = self.get(key) else {
                continue;
            };
            if out.records.len() >= limit {
                out.more = true;
                break;
            }
            let size = key.len() + record.encoded_len();
            if !out.records.is_empty() && bytes.saturating_add(size) > max_bytes {
                out.more = true;
                break;
            }
            bytes += size;
            out.records.push((key.clone(), record.clone()));
        }
        for (key, digest) in theirs {
            if self.entries.get(key).map(|e| e.digest) != Some(*digest) {
                out.want.push(key.clone());
            }
        }
        out
    }
}

/// The answer to a peer's digests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// Records the peer should merge.
    pub records: Vec<(String, Record)>,
    /// Keys whose records we want from the peer.
    pub want: Vec<String>,
    /// Whether records were left out because of the page limit.
    pub more: bool,
}

impl ReplicatedState {
    /// Records whose key starts with `prefix` and sorts after `after`, in key order.
    pub fn records_after<'a>(
        &'a self,
        prefix: &'a str,
        after: &str,
    ) -> impl Iterator<Item = (&'a String, &'a Record)> + 'a {
        let start = if after > prefix { after } else { prefix };
        self.entries
            .range::<str, _>((std::ops::Bound::Excluded(start), std::ops::Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, e)| (k, &*e.record))
    }
}

impl RecordLookup for ReplicatedState {
    fn record(&self, key: &str) -> Option<&Record> {
        self.get(key)
    }

    fn records_from<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Record)> + 'a {
        self.entries
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, e)| (k, &*e.record))
    }
}

#[cfg(test)]
mod tests {
    use super::super::crdt::{Lww, Stamp};
    use super::super::hlc::Hlc;
    use super::super::records::NodeAdmin;
    use super::*;
    use proptest::prelude::*;

    fn admin_record(wall_ms: u64, draining: bool) -> Record {
        Record::Admin(NodeAdmin {
            draining: Some(Lww::new(
                Stamp {
                    at: Hlc {
                        wall_ms,
                        logical: 0,
                    },
                    by: "w".into(),
                },
                draining,
            )),
            ..NodeAdmin::default()
        })
    }

    fn update() -> impl Strategy<Value = (String, Record)> {
        ("[abc]", 0u64..6, any::<bool>())
            .prop_map(|(id, t, d)| (format!("admin/{id}"), admin_record(t, d)))
    }

    proptest! {
        #[test]
        fn any_delivery_order_gives_equal_states(
            updates in proptest::collection::vec(update(), 0..20),
            seed in any::<u64>(),
        ) {
            let mut forward = ReplicatedState::default();
            for (k, r) in &updates {
                forward.apply(k, r).unwrap();
            }
            let mut shuffled = updates.clone();
            // Deterministic shuffle plus duplicate delivery.
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x as usize) % (i + 1));
            }
            shuffled.extend(updates.iter().take(3).cloned());
            let mut other = ReplicatedState::default();
            for (k, r) in &shuffled {
                other.apply(k, r).unwrap();
            }
            prop_assert_eq!(&forward, &other);
            prop_assert_eq!(forward.bucket_summary(), other.bucket_summary());
        }

        #[test]
        fn reconciliation_converges_two_replicas(
            left in proptest::collection::vec(update(), 0..15),
            right in proptest::collection::vec(update(), 0..15),
        ) {
            let mut a = ReplicatedState::default();
            let mut b = ReplicatedState::default();
            for (k, r) in &left { a.apply(k, r).unwrap(); }
            for (k, r) in &right { b.apply(k, r).unwrap(); }
            let buckets = b.differing_buckets(&a.bucket_summary());
            let answer = b.reconcile(&buckets, &a.digests_in(&buckets), usize::MAX, usize::MAX, 0);
            for (k, r) in &answer.records { a.apply(k, r).unwrap(); }
            for k in &answer.want {
                if let Some(r) = a.get(k).cloned() { b.apply(k, &r).unwrap(); }
            }
            prop_assert_eq!(a.bucket_summary(), b.bucket_summary());
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn a_malformed_record_is_refused_and_not_stored() {
        let mut state = ReplicatedState::default();
        assert!(state.apply("bogus", &admin_record(1, true)).is_err());
        assert!(state.apply("master", &admin_record(1, true)).is_err());
        assert!(state.is_empty());
    }

    #[test]
    fn merged_previews_without_changing_the_state() {
        let mut state = ReplicatedState::default();
        let record = admin_record(1, true);
        assert_eq!(
            state.merged("admin/a", &record).unwrap(),
            Some(record.clone())
        );
        assert!(state.is_empty());
        state.apply("admin/a", &record).unwrap();
        assert_eq!(state.merged("admin/a", &record).unwrap(), None);
        assert_eq!(
            state.merged("admin/a", &admin_record(2, false)).unwrap(),
            Some(admin_record(2, false))
        );
    }

    #[test]
    fn reapplying_the_same_record_reports_no_change() {
        let mut state = ReplicatedState::default();
        let record = admin_record(1, true);
        assert!(state.apply("admin/a", &record).unwrap().is_some());
        assert!(state.apply("admin/a", &record).unwrap().is_none());
        assert!(state
            .apply("admin/a", &admin_record(0, false))
            .unwrap()
            .is_none());
    }

    fn tagged_admin(tag_len: usize) -> Record {
        let mut record = admin_record(1, true);
        if let Record::Admin(admin) = &mut record {
            let stamp = Stamp {
                at: Hlc {
                    wall_ms: 1,
                    logical: 0,
                },
                by: "w".into(),
            };
            admin.tags = Some(Lww::new(stamp, vec!["t".repeat(tag_len); 4]));
        }
        record
    }

    #[test]
    fn pages_are_bounded_by_bytes_and_always_make_progress() {
        let mut full = ReplicatedState::default();
        for i in 0..10 {
            full.apply(&format!("admin/n{i}"), &tagged_admin(200))
                .unwrap();
        }
        let size = full.get("admin/n0").unwrap().encoded_len() + "admin/n0".len();
        let all: Vec<u16> = (0..BUCKETS as u16).collect();
        // Three records' worth of bytes: pages of three, `more` set, until all arrived.
        let mut empty = ReplicatedState::default();
        let mut rounds = 0;
        loop {
            rounds += 1;
            let page = full.reconcile(
                &all,
                &empty.digests_in(&all),
                usize::MAX,
                3 * size + 1,
                rounds,
            );
            assert!(!page.records.is_empty() && page.records.len() <= 3);
            for (k, r) in &page.records {
                empty.apply(k, r).unwrap();
            }
            if !page.more {
                break;
            }
            assert_eq!(page.records.len(), 3);
        }
        assert_eq!(rounds, 4);
        assert_eq!(empty, full);
        // A byte limit below one record still moves one record per page.
        let page = full.reconcile(&all, &[], usize::MAX, 1, 7);
        assert_eq!(page.records.len(), 1);
        assert!(page.more);
        // The count limit still holds.
        let page = full.reconcile(&all, &[], 2, usize::MAX, 0);
        assert_eq!((page.records.len(), page.more), (2, true));
        let page = full.reconcile(&all, &[], usize::MAX, usize::MAX, 0);
        assert_eq!((page.records.len(), page.more), (10, false));
        // The page starts where the caller says: different starts, different first records.
        let first = |start| {
            full.reconcile(&all, &[], 1, usize::MAX, start).records[0]
                .0
                .clone()
        };
        assert_ne!(first(0), first(1));
        assert_eq!(first(0), first(10));
    }
}
