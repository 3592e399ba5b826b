//! Durable storage in redb. Tables carry a version in their name (`records_v1`); the schema
//! version lives in `meta_v1` so later releases can migrate. Every applied change is written
//! in its own transaction before it is acknowledged or gossiped.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

use crate::proto::records::Record;

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records_v1");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta_v1");

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = 1;
const SCHEMA_KEY: &str = "schema_version";
/// Meta key: bytes of records made smaller or removed since the file was last compacted.
const SHRUNK_KEY: &str = "shrunk_bytes";
/// After records shrank by [`COMPACT_MIN_BYTES`] (history compaction), the file is compacted
/// at open once this share of it (in percent) is free pages.
const COMPACT_SHARE_PERCENT: u64 = 25;
/// Shrunk or free bytes below this never make the file worth compacting.
const COMPACT_MIN_BYTES: u64 = 4 << 20;

/// Storage failures.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The database file cannot be opened (corrupt, locked or unreadable).
    #[error("cannot open the store at {path}: {source}; if it is corrupt, move it aside and re-join the mesh (`codex-mesh join <ticket>`) to rebuild it from the peers")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: redb::DatabaseError,
    },
    /// The store was written by a newer release.
    #[error("the store at {path} has schema version {found}, newer than this release supports ({SCHEMA_VERSION}); upgrade codex-mesh")]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Version found.
        found: u32,
    },
    /// A read or write failed.
    #[error("store failure: {0}")]
    Db(#[from] redb::Error),
    /// Compacting the file failed (the store stays usable as it was).
    #[error("cannot compact the store: {0}")]
    Compact(#[from] redb::CompactionError),
    /// A stored value could not be decoded.
    #[error("stored value {key:?} is unreadable: {reason}")]
    Decode {
        /// Which key.
        key: String,
        /// Why.
        reason: String,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.into()) }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The node's database.
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Open (or create) the store at `path`, bring its schema up to date, and compact the
    /// file if records shrank enough since the last time (see [`Store::put_records_shrunk`]). Blocks
    /// for as long as the compaction takes: call it off the async runtime.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut store = Store::open_only(path)?;
        let shrunk = store.get_meta::<u64>(SHRUNK_KEY)?.unwrap_or(0);
        if shrunk >= COMPACT_MIN_BYTES {
            store.compact_if_worth_it()?;
        }
        Ok(store)
    }

    /// Compact the file when enough of it is free pages: at least [`COMPACT_MIN_BYTES`] and
    /// [`COMPACT_SHARE_PERCENT`] of it. Either way the shrink count starts over (below that,
    /// redb reuses the free pages as the store grows again).
    fn compact_if_worth_it(&mut self) -> Result<(), StoreError> {
        let size = self.size_bytes();
        let allocated = {
            let txn = self.db.begin_write()?;
            let stats = txn.stats()?;
            txn.abort()?;
            stats.allocated_pages() * stats.page_size() as u64
        };
        let free = size.saturating_sub(allocated);
        tracing::debug!(file_bytes = size, free_bytes = free, "store file usage");
        if free >= COMPACT_MIN_BYTES && free * 100 >= size * COMPACT_SHARE_PERCENT {
            let started = std::time::Instant::now();
            match self.db.compact() {
                Ok(_) => tracing::info!(
                    before_bytes = size,
                    after_bytes = self.size_bytes(),
                    ms = started.elapsed().as_millis() as u64,
                    "compacted the store file"
                ),
                Err(e) => {
                    tracing::warn!("{}", StoreError::from(e));
                    return Ok(());
                }
            }
        }
        self.put_meta(SHRUNK_KEY, &0u64)
    }

    /// Write `records`, which replace larger ones by `shrunk` bytes in all (history
    /// compaction), and count those bytes, in one transaction; the file is compacted at the
    /// next open once enough was freed. Until then redb reuses the freed pages.
    pub fn put_records_shrunk(
        &self,
        records: &[(&str, &Record)],
        shrunk: u64,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(RECORDS)?;
            for (key, record) in records {
                table.insert(*key, encode(record).as_slice())?;
            }
            let mut meta = txn.open_table(META)?;
            let total: u64 = match meta.get(SHRUNK_KEY)? {
                Some(bytes) => decode(SHRUNK_KEY, bytes.value())?,
                None => 0,
            };
            meta.insert(SHRUNK_KEY, encode(&total.saturating_add(shrunk)).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    fn open_only(path: &Path) -> Result<Store, StoreError> {
        let db = Database::builder()
            .set_cache_size(4 << 20)
            .create(path)
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let store = Store {
            db,
            path: path.to_path_buf(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let found: Option<u32> = self.get_meta(SCHEMA_KEY)?;
        match found {
            Some(v) if v > SCHEMA_VERSION => Err(StoreError::TooNew {
                path: self.path.clone(),
                found: v,
            }),
            Some(_) => Ok(()),
            None => {
                let txn = self.db.begin_write()?;
                txn.open_table(RECORDS)?;
                txn.open_table(META)?;
                {
                    let mut meta = txn.open_table(META)?;
                    meta.insert(SCHEMA_KEY, encode(&SCHEMA_VERSION).as_slice())?;
                }
                txn.commit()?;
                Ok(())
            }
        }
    }

    /// Every stored record. A record that cannot be decoded is reported, not skipped.
    pub fn load_records(&self) -> Result<Vec<(String, Record)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (key, value) = row?;
            let key = key.value().to_string();
            let record = decode(&key, value.value())?;
            out.push((key, record));
        }
        Ok(out)
    }

    /// Write a batch of merged records in one transaction.
    pub fn put_records(&self, records: &[(&str, &Record)]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(RECORDS)?;
            for (key, record) in records {
                table.insert(*key, encode(record).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// A metadata value.
    pub fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match table.get(key)? {
            Some(v) => Ok(Some(decode(key, v.value())?)),
            None => Ok(None),
        }
    }

    /// Write a metadata value in its own transaction.
    pub fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(META)?;
            table.insert(key, encode(value).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Size of the database file in bytes.
    pub fn size_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = Vec::new();
    // Serialising our own types into memory cannot fail.
    let _ = ciborium::into_writer(value, &mut bytes);
    bytes
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    ciborium::from_reader(bytes).map_err(|e| StoreError::Decode {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::records::NodeAdmin;

    #[test]
    fn records_and_meta_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let store = Store::open(&path).unwrap();
            store
                .put_records(&[("admin/a", &Record::Admin(NodeAdmin::default()))])
                .unwrap();
            store.put_meta("answer", &42u32).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.load_records().unwrap().len(), 1);
        assert_eq!(store.get_meta::<u32>("answer").unwrap(), Some(42));
        assert_eq!(store.get_meta::<u32>("missing").unwrap(), None);
    }

    #[test]
    fn the_file_shrinks_at_open_once_enough_of_it_was_freed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let big = |n: usize| Record::Unknown {
            kind: "blob".into(),
            raw: {
                let mut raw = Vec::new();
                ciborium::into_writer(&"x".repeat(n), &mut raw).unwrap();
                raw
            },
        };
        let keys: Vec<String> = (0..400).map(|i| format!("blob/{i}")).collect();
        let full_size;
        {
            let store = Store::open(&path).unwrap();
            let records: Vec<Record> = keys.iter().map(|_| big(64 << 10)).collect();
            let rows: Vec<(&str, &Record)> = keys
                .iter()
                .map(String::as_str)
                .zip(records.iter())
                .collect();
            store.put_records(&rows).unwrap();
            full_size = store.size_bytes();
            let small = big(16);
            let rows: Vec<(&str, &Record)> = keys.iter().map(|k| (k.as_str(), &small)).collect();
            store.put_records_shrunk(&rows, 400 * (64 << 10)).unwrap();
            assert_eq!(
                store.size_bytes(),
                full_size,
                "redb does not shrink by itself"
            );
        }
        let store = Store::open(&path).unwrap();
        assert!(
            store.size_bytes() * 4 < full_size,
            "{} bytes after, {full_size} before",
            store.size_bytes()
        );
        assert_eq!(
            store.load_records().unwrap().len(),
            400,
            "every record kept"
        );
        assert_eq!(store.get_meta::<u64>(SHRUNK_KEY).unwrap(), Some(0));
    }

    #[test]
    fn a_corrupt_file_gives_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = Store::open(&path).err().expect("garbage must not open");
        assert!(err.to_string().contains("cannot open the store"), "{err}");
    }
}
