//! The local-directory backend: one blocking task per put or get, files written atomically.

use std::io::Write as _;
use std::path::Path;

use bytes::Bytes;

use weir_model::cas_ref::CasRef;

use super::blob::{blocking, compress, verify};
use super::{deduplicated, Cas, CasError, PutOutcome, PutReceipt};

impl Cas {
    pub(super) async fn put_local(
        &self,
        root: &Path,
        content: Bytes,
    ) -> Result<PutReceipt, CasError> {
        let root = root.to_owned();
        let prefix = self.inner.key_prefix.clone();
        let level = self.inner.level;
        // File I/O blocks anyway: the whole put is one blocking task.
        blocking(move || {
            let cas_ref = CasRef::of(&content);
            let path = root.join(cas_ref.key(&prefix));
            match std::fs::metadata(&path) {
                Ok(_) => return Ok(deduplicated(cas_ref)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CasError::io("stat", &path, e)),
            }
            let compressed = compress(&content, level)?;
            write_atomically(&path, &cas_ref, &compressed)?;
            Ok(PutReceipt {
                cas_ref,
                outcome: PutOutcome::Stored,
                stored_bytes: compressed.len() as u64,
            })
        })
        .await?
    }

    pub(super) async fn get_local(&self, root: &Path, r: &CasRef) -> Result<Bytes, CasError> {
        let path = root.join(self.key(r));
        let r = *r;
        blocking(move || {
            let compressed = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(CasError::NotFound(r))
                }
                Err(e) => return Err(CasError::io("read", &path, e)),
            };
            verify(r, &compressed)
        })
        .await?
    }
}

/// Writes `data` to `path` so that readers see either no file or the whole file: a temp file
/// in the same directory, fsynced, renamed into place, and the directory fsynced.
pub(super) fn write_atomically(path: &Path, cas_ref: &CasRef, data: &[u8]) -> Result<(), CasError> {
    let dir = path
        .parent()
        .ok_or_else(|| CasError::Config(format!("no parent directory for {}", path.display())))?;
    std::fs::create_dir_all(dir).map_err(|e| CasError::io("create directory", dir, e))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        cas_ref.hex(),
        uuid::Uuid::now_v7().simple()
    ));
    let written = (|| {
        let mut file = std::fs::File::create_new(&tmp)?;
        file.write_all(data)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(CasError::io("write", &tmp, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(CasError::io("rename", path, e));
    }
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CasError::io("sync directory", dir, e))?;
    Ok(())
}
