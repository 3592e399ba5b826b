//! The node's data directory: identity key, mesh key, API token, store and the files the CLI
//! reads to find the local API. Secret files are created with mode 0600.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use rand::RngCore;
use thiserror::Error;

use crate::secret::Secret;

/// Length of the pre-shared mesh key.
pub const MESH_KEY_LEN: usize = 32;

/// The pre-shared mesh key.
pub type MeshKey = Secret<[u8; MESH_KEY_LEN]>;

/// Data directory failures.
#[derive(Debug, Error)]
pub enum DataDirError {
    /// A file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key file exists but its contents are not valid.
    #[error(
        "{path} is damaged ({reason}); restore it from a backup or start with a fresh --data-dir"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The directory belongs to another mesh than the ticket's.
    #[error("the data dir {path} belongs to another mesh ({have}) than the ticket ({want}); use a fresh --data-dir to join this mesh")]
    OtherMesh {
        /// The directory.
        path: PathBuf,
        /// Mesh id found in the directory.
        have: String,
        /// Mesh id of the ticket.
        want: String,
    },
}

/// A node's data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

/// A short public id of a mesh derived from its key (safe to print).
pub fn mesh_id(key: &MeshKey) -> String {
    let digest = blake3::derive_key("codex-mesh mesh id v1", key.expose());
    hex::encode(&digest[..6])
}

impl DataDir {
    /// Use (and create) the directory at `root`.
    pub fn open(root: &Path) -> Result<DataDir, DataDirError> {
        let io = |source| DataDirError::Io {
            path: root.to_path_buf(),
            source,
        };
        let existed = root.exists();
        fs::create_dir_all(root).map_err(io)?;
        // The store holds replicated secrets: keep the whole directory private, also when it
        // existed with looser permissions.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(root).map_err(io)?.permissions().mode();
            if mode & 0o777 != 0o700 {
                fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(io)?;
                if existed && mode & 0o077 != 0 {
                    tracing::info!("made the data dir {} private (0700)", root.display());
                }
            }
        }
        Ok(DataDir {
            root: root.to_path_buf(),
        })
    }

    /// The directory path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of the redb store.
    pub fn store_path(&self) -> PathBuf {
        self.root.join("state.redb")
    }

    /// Path of the file holding the local API URL.
    pub fn api_url_path(&self) -> PathBuf {
        self.root.join("api-url")
    }

    /// Path of the file holding the API bearer token.
    pub fn token_path(&self) -> PathBuf {
        self.root.join("api-token")
    }

    fn mesh_key_path(&self) -> PathBuf {
        self.root.join("mesh.key")
    }

    fn node_key_path(&self) -> PathBuf {
        self.root.join("node.key")
    }

    /// The node identity, created on first use.
    pub fn identity(&self) -> Result<Keypair, DataDirError> {
        let path = self.node_key_path();
        match read_optional(&path)? {
            Some(bytes) => {
                Keypair::from_protobuf_encoding(&bytes).map_err(|e| DataDirError::Damaged {
                    path,
                    reason: e.to_string(),
                })
            }
            None => {
                let keypair = Keypair::generate_ed25519();
                let bytes = keypair
                    .to_protobuf_encoding()
                    .map_err(|e| DataDirError::Damaged {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                write_secret(&path, &bytes)?;
                Ok(keypair)
            }
        }
    }

    /// The mesh key, if this directory already belongs to a mesh.
    pub fn mesh_key(&self) -> Result<Option<MeshKey>, DataDirError> {
        let path = self.mesh_key_path();
        let Some(bytes) = read_optional(&path)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        let damaged = |reason: &str| DataDirError::Damaged {
            path: path.clone(),
            reason: reason.to_string(),
        };
        let raw = hex::decode(text.trim()).map_err(|_| damaged("not hex"))?;
        let key: [u8; MESH_KEY_LEN] = raw.try_into().map_err(|_| damaged("wrong length"))?;
        Ok(Some(Secret::new(key)))
    }

    /// Which mesh key to use: the ticket's (`Some`) or the one already here. Checks that the
    /// directory does not belong to another mesh; writes nothing. Returns the key and whether
    /// it is new to this directory (see [`DataDir::save_mesh_key`]).
    pub fn choose_mesh_key(
        &self,
        ticket_key: Option<&MeshKey>,
    ) -> Result<(MeshKey, bool), DataDirError> {
        match (self.mesh_key()?, ticket_key) {
            (Some(have), Some(want)) if &have != want => Err(DataDirError::OtherMesh {
                path: self.root.clone(),
                have: mesh_id(&have),
                want: mesh_id(want),
            }),
            (Some(have), _) => Ok((have, false)),
            (None, Some(want)) => Ok((want.clone(), true)),
            (None, None) => {
                let mut key = Secret::new([0u8; MESH_KEY_LEN]);
                rand::rngs::OsRng.fill_bytes(key.expose_mut());
                Ok((key, true))
            }
        }
    }

    /// Record that this directory belongs to the mesh of `key`. Called last during start-up,
    /// so a start that fails earlier leaves the directory as it was.
    pub fn save_mesh_key(&self, key: &MeshKey) -> Result<(), DataDirError> {
        let text = Secret::new(hex::encode(key.expose()));
        write_secret(&self.mesh_key_path(), text.expose().as_bytes())
    }

    /// The API bearer token, created on first use.
    pub fn api_token(&self) -> Result<Secret<String>, DataDirError> {
        let path = self.token_path();
        if let Some(bytes) = read_optional(&path)? {
            let bytes = Secret::new(bytes);
            let token = Secret::new(String::from_utf8_lossy(bytes.expose()).trim().to_string());
            if token.expose().len() >= 16 {
                return Ok(token);
            }
        }
        let mut raw = Secret::new([0u8; 24]);
        rand::rngs::OsRng.fill_bytes(raw.expose_mut());
        let token = Secret::new(hex::encode(raw.expose()));
        write_secret(&path, token.expose().as_bytes())?;
        Ok(token)
    }

    /// Record the local API URL for the CLI (atomically).
    pub fn write_api_url(&self, url: &str) -> Result<(), DataDirError> {
        let path = self.api_url_path();
        let tmp = self.root.join(".api-url.tmp");
        fs::write(&tmp, url)
            .and_then(|_| fs::rename(&tmp, &path))
            .map_err(|source| DataDirError::Io { path, source })
    }

    /// Remove the API URL file (on shutdown).
    pub fn clear_api_url(&self) {
        let _ = fs::remove_file(self.api_url_path());
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, DataDirError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DataDirError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Write a file readable by the owner only.
fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    let io = |source| DataDirError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_mesh_key_persist_with_private_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path()).unwrap();
        let id = data.identity().unwrap().public().to_peer_id();
        let (key, created) = data.choose_mesh_key(None).unwrap();
        assert!(created);
        assert_eq!(data.mesh_key().unwrap(), None, "choosing writes nothing");
        data.save_mesh_key(&key).unwrap();
        let again = DataDir::open(dir.path()).unwrap();
        assert_eq!(again.identity().unwrap().public().to_peer_id(), id);
        assert_eq!(again.choose_mesh_key(None).unwrap(), (key.clone(), false));
        assert_eq!(again.choose_mesh_key(Some(&key)).unwrap(), (key, false));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join("mesh.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_loose_existing_data_dir_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        DataDir::open(dir.path()).unwrap();
        let mode = fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn joining_another_mesh_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path()).unwrap();
        data.save_mesh_key(&Secret::new([1u8; MESH_KEY_LEN]))
            .unwrap();
        let err = data
            .choose_mesh_key(Some(&Secret::new([7u8; MESH_KEY_LEN])))
            .unwrap_err();
        assert!(err.to_string().contains("another mesh"));
    }
}
