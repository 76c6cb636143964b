//! The CPU work on a blob: hashing, zstd (de)compression and verification against its ref,
//! inline for small blobs and on the blocking pool for large ones.

use bytes::Bytes;

use weir_model::cas_ref::CasRef;

use super::{CasError, INLINE_LIMIT};

/// Runs `f` inline for small inputs, on the blocking pool for large ones.
pub(super) async fn off_worker<T, F>(len: usize, f: F) -> Result<T, CasError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if len <= INLINE_LIMIT {
        Ok(f())
    } else {
        blocking(f).await
    }
}

pub(super) async fn blocking<T, F>(f: F) -> Result<T, CasError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CasError::Task(e.to_string()))
}

pub(super) fn compress(content: &[u8], level: i32) -> Result<Bytes, CasError> {
    zstd::bulk::compress(content, level)
        .map(Bytes::from)
        .map_err(|e| CasError::Task(format!("zstd compression: {e}")))
}

/// Decompresses and re-hashes, off the async worker when the blob is large.
pub(super) async fn decode_verified(r: CasRef, compressed: Bytes) -> Result<Bytes, CasError> {
    let len = zstd::zstd_safe::get_frame_content_size(&compressed)
        .ok()
        .flatten()
        .map_or(compressed.len(), |n| {
            usize::try_from(n).unwrap_or(usize::MAX)
        });
    off_worker(len.max(compressed.len()), move || verify(r, &compressed)).await?
}

/// Frames that declare a content size up to this are decoded in one call with a reused
/// per-thread context (creating a zstd context costs more than decoding a small result);
/// others, and frames without a declared size, are streamed.
const BULK_DECODE_MAX: u64 = 8 << 20;

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

pub(super) fn decompress(compressed: &[u8]) -> std::io::Result<Vec<u8>> {
    let declared = zstd::zstd_safe::get_frame_content_size(compressed)
        .ok()
        .flatten();
    match declared {
        Some(n) if n <= BULK_DECODE_MAX => DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            let d = match slot.as_mut() {
                Some(d) => d,
                None => slot.insert(zstd::bulk::Decompressor::new()?),
            };
            // n <= BULK_DECODE_MAX, so the cast cannot truncate.
            d.decompress(compressed, n as usize)
        }),
        _ => zstd::stream::decode_all(compressed),
    }
}

pub(super) fn verify(expected: CasRef, compressed: &[u8]) -> Result<Bytes, CasError> {
    let content = decompress(compressed).map_err(|e| CasError::Corrupt {
        expected,
        actual: format!("undecodable zstd frame ({e})"),
    })?;
    let actual = CasRef::of(&content);
    if actual != expected {
        return Err(CasError::Corrupt {
            expected,
            actual: actual.to_string(),
        });
    }
    Ok(Bytes::from(content))
}
