//! The node's identity key and the data-directory lock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use weft_crdt::SigningKey;

use crate::error::NodeError;

const KEY_FILE: &str = "identity.key";
const LOCK_FILE: &str = "LOCK";

/// Loads the ed25519 key from `<dir>/identity.key`, creating it (mode 0600) on first
/// start. The file holds the 32-byte secret seed and nothing else.
pub(crate) fn load_or_create(dir: &Path) -> Result<SigningKey, NodeError> {
    let path = dir.join(KEY_FILE);
    match File::open(&path) {
        Ok(mut f) => {
            let mut buf = Vec::with_capacity(32);
            f.read_to_end(&mut buf)
                .map_err(|e| NodeError::io(format!("reading {}", path.display()), e))?;
            let seed: [u8; 32] = buf.as_slice().try_into().map_err(|_| NodeError::Identity {
                path: path.clone(),
                reason: format!("expected 32 bytes, found {}", buf.len()),
            })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let tmp = dir.join(format!("{KEY_FILE}.tmp"));
            let mut opts = OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let io = |e| NodeError::io(format!("writing {}", tmp.display()), e);
            let mut f = opts.open(&tmp).map_err(io)?;
            f.write_all(&key.to_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            // Rename so a crash never leaves a half-written key that would change identity.
            std::fs::rename(&tmp, &path)
                .map_err(|e| NodeError::io(format!("creating {}", path.display()), e))?;
            Ok(key)
        }
        Err(e) => Err(NodeError::io(format!("opening {}", path.display()), e)),
    }
}

/// Takes an exclusive lock on the data directory for the life of the returned file, so
/// two nodes never share one log (LMDB alone would let them, with two writers racing).
pub(crate) fn lock_data_dir(dir: &Path) -> Result<File, NodeError> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| NodeError::io(format!("opening {}", path.display()), e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(NodeError::DataDirInUse(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(NodeError::io(format!("locking {}", path.display()), e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_reloaded() {
        let d = tempfile::tempdir().unwrap();
        let a = load_or_create(d.path()).unwrap();
        let b = load_or_create(d.path()).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
    }

    #[test]
    fn corrupt_key_file_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(KEY_FILE), b"short").unwrap();
        let err = load_or_create(d.path()).unwrap_err().to_string();
        assert!(err.contains("expected 32 bytes"), "{err}");
    }

    #[test]
    fn second_lock_on_a_data_dir_fails() {
        let d = tempfile::tempdir().unwrap();
        let _held = lock_data_dir(d.path()).unwrap();
        assert!(matches!(
            lock_data_dir(d.path()),
            Err(NodeError::DataDirInUse(_))
        ));
    }
}
