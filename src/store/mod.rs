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
    /// Open (or create) the store at `path` and bring its schema up to date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
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
    fn a_corrupt_file_gives_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = Store::open(&path).err().expect("garbage must not open");
        assert!(err.to_string().contains("cannot open the store"), "{err}");
    }
}
