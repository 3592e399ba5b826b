//! Job logs on disk: reading a chunk from an offset, and keeping a copy sent by another node.
//! A worker writes its own logs through [`super::output::JobLog`], which keeps each to the
//! node's `--max-log-mb`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Default limit of a job's log on its worker, in MiB (`--max-log-mb`).
pub const DEFAULT_MAX_LOG_MB: u64 = 64;
/// Largest copy of a log kept for another node (the master's copy of a worker's log), in
/// bytes: the default worker limit, so a log under the default limit is copied whole, note
/// included; of a larger log (a worker with a higher `--max-log-mb`) only this much.
pub const MAX_LOG_BYTES: u64 = DEFAULT_MAX_LOG_MB << 20;
/// Largest chunk read or sent at once.
pub const CHUNK_BYTES: u64 = 256 << 10;

/// Path of the log of job `id` under `dir`.
pub fn log_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.log"))
}

/// Up to `max` bytes of the file from `offset`, and the file's size.
pub fn read_chunk(path: &Path, offset: u64, max: u64) -> std::io::Result<(Vec<u8>, u64)> {
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    if offset >= size {
        return Ok((Vec::new(), size));
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut data = Vec::new();
    file.take(max.min(CHUNK_BYTES)).read_to_end(&mut data)?;
    Ok((data, size))
}

/// Write a chunk of a copied log at `offset` (chunks arrive in order; a restart from 0
/// truncates). Refuses to grow past [`MAX_LOG_BYTES`].
pub fn write_chunk(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    if offset + data.len() as u64 > MAX_LOG_BYTES {
        return Err(std::io::Error::other("log copy over the size limit"));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)?;
    if offset == 0 {
        file.set_len(0)?;
    }
    let size = file.metadata()?.len();
    if offset != size {
        return Err(std::io::Error::other(format!(
            "chunk at {offset} does not follow the {size} bytes already copied"
        )));
    }
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_read_and_copy_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let source = log_path(dir.path(), "a");
        std::fs::write(&source, b"hello world").unwrap();
        assert_eq!(
            read_chunk(&source, 6, 100).unwrap(),
            (b"world".to_vec(), 11)
        );
        assert_eq!(read_chunk(&source, 50, 100).unwrap(), (Vec::new(), 11));
        let copy = log_path(dir.path(), "b");
        write_chunk(&copy, 0, b"hello ").unwrap();
        write_chunk(&copy, 6, b"world").unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), b"hello world");
        assert!(write_chunk(&copy, 3, b"x").is_err(), "out of order");
        assert!(
            write_chunk(&copy, MAX_LOG_BYTES, b"x").is_err(),
            "over the limit"
        );
    }
}
