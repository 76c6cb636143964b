//! The S3 backend: conditional puts (one round trip for small blobs, a HEAD first for large
//! ones), multipart uploads with a guard that aborts them, and verified gets.

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};

use weir_model::cas_ref::CasRef;

use super::blob::{compress, decode_verified, off_worker};
use super::error::{ambiguous, conditional_conflict, missing_key, precondition_failed, s3_error};
use super::{
    deduplicated, Cas, CasError, PutOutcome, PutReceipt, HEAD_FIRST_ABOVE, MAX_PARTS,
    MAX_SINGLE_PUT, PART_CONCURRENCY,
};
use crate::error::Disposition;

impl Cas {
    pub(super) async fn put_s3(
        &self,
        client: &aws_sdk_s3::Client,
        bucket: &str,
        content: Bytes,
    ) -> Result<PutReceipt, CasError> {
        let level = self.inner.level;
        let len = content.len();
        let (cas_ref, compressed) = if len > HEAD_FIRST_ABOVE {
            // Large: ask first, so that a stored blob is neither compressed nor sent again.
            let c = content.clone();
            let cas_ref = off_worker(len, move || CasRef::of(&c)).await?;
            if head(client, bucket, &self.key(&cas_ref)).await? {
                return Ok(deduplicated(cas_ref));
            }
            let compressed = off_worker(len, move || compress(&content, level)).await??;
            (cas_ref, compressed)
        } else {
            off_worker(len, move || -> Result<_, CasError> {
                Ok((CasRef::of(&content), compress(&content, level)?))
            })
            .await??
        };
        let key = self.key(&cas_ref);
        let size = compressed.len() as u64;
        let stored = if size > self.inner.multipart_threshold || size > MAX_SINGLE_PUT {
            self.put_multipart(client, bucket, &key, compressed, len)
                .await?
        } else {
            self.put_single(client, bucket, &key, compressed, len)
                .await?
        };
        Ok(match stored {
            PutOutcome::Stored => PutReceipt {
                cas_ref,
                outcome: PutOutcome::Stored,
                stored_bytes: size,
            },
            PutOutcome::Deduplicated => deduplicated(cas_ref),
        })
    }

    /// One conditional PUT: 412 means the blob is already there.
    pub(super) async fn put_single(
        &self,
        client: &aws_sdk_s3::Client,
        bucket: &str,
        key: &str,
        compressed: Bytes,
        uncompressed_len: usize,
    ) -> Result<PutOutcome, CasError> {
        let mut req = client
            .put_object()
            .bucket(bucket)
            .key(key)
            .if_none_match("*")
            .content_type("application/zstd")
            .metadata("uncompressed-size", uncompressed_len.to_string())
            .body(ByteStream::from(compressed));
        if let Some(sse) = &self.inner.sse {
            req = req
                .server_side_encryption(sse.mode.clone())
                .set_ssekms_key_id(sse.kms_key_id.clone());
        }
        match req.send().await {
            Ok(_) => Ok(PutOutcome::Stored),
            Err(e) if precondition_failed(&e) => Ok(PutOutcome::Deduplicated),
            // A concurrent write of the same key (409), or a connection dropped under the
            // body (a server may answer 412 before reading it): the object is there or not.
            // Whoever wrote it wrote these bytes, the key being their hash.
            Err(e) if conditional_conflict(&e) || ambiguous(&e) => {
                if head(client, bucket, key).await? {
                    Ok(PutOutcome::Deduplicated)
                } else {
                    Err(s3_error("PutObject", key, e))
                }
            }
            Err(e) => Err(s3_error("PutObject", key, e)),
        }
    }

    /// A multipart upload, completed conditionally and aborted on any failure.
    pub(super) async fn put_multipart(
        &self,
        client: &aws_sdk_s3::Client,
        bucket: &str,
        key: &str,
        compressed: Bytes,
        uncompressed_len: usize,
    ) -> Result<PutOutcome, CasError> {
        let mut create = client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .content_type("application/zstd")
            .metadata("uncompressed-size", uncompressed_len.to_string())
            .checksum_algorithm(ChecksumAlgorithm::Crc32);
        if let Some(sse) = &self.inner.sse {
            create = create
                .server_side_encryption(sse.mode.clone())
                .set_ssekms_key_id(sse.kms_key_id.clone());
        }
        let created = create
            .send()
            .await
            .map_err(|e| s3_error("CreateMultipartUpload", key, e))?;
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(CasError::S3 {
                op: "CreateMultipartUpload",
                key: key.to_owned(),
                status: None,
                code: None,
                message: "the response has no upload id".into(),
                disposition: Disposition::Retry,
            });
        };
        // Aborts the upload if this future is dropped half-way (e.g. on shutdown).
        let mut guard = AbortGuard {
            client: client.clone(),
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            upload_id: upload_id.clone(),
            armed: true,
        };
        let result = self
            .upload_parts(client, bucket, key, &upload_id, compressed)
            .await;
        match result {
            Ok(PutOutcome::Stored) => {
                guard.armed = false;
                Ok(PutOutcome::Stored)
            }
            other => {
                guard.armed = false;
                abort_upload(client, bucket, key, &upload_id).await;
                other
            }
        }
    }

    pub(super) async fn upload_parts(
        &self,
        client: &aws_sdk_s3::Client,
        bucket: &str,
        key: &str,
        upload_id: &str,
        compressed: Bytes,
    ) -> Result<PutOutcome, CasError> {
        let total = compressed.len() as u64;
        let part_size = self.inner.part_bytes.max(total.div_ceil(MAX_PARTS)).max(1) as usize;
        let chunks: Vec<(i32, Bytes)> = (0..compressed.len().max(1))
            .step_by(part_size)
            .enumerate()
            .map(|(i, start)| {
                let end = (start + part_size).min(compressed.len());
                (i as i32 + 1, compressed.slice(start..end))
            })
            .collect();
        let parts: Vec<CompletedPart> = futures::stream::iter(chunks)
            .map(|(number, chunk)| async move {
                let out = client
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .checksum_algorithm(ChecksumAlgorithm::Crc32)
                    .body(ByteStream::from(chunk))
                    .send()
                    .await
                    .map_err(|e| s3_error("UploadPart", key, e))?;
                Ok::<_, CasError>(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag().map(str::to_owned))
                        .set_checksum_crc32(out.checksum_crc32().map(str::to_owned))
                        .build(),
                )
            })
            .buffered(PART_CONCURRENCY)
            .try_collect()
            .await?;
        let done = client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .if_none_match("*")
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match done {
            Ok(_) => Ok(PutOutcome::Stored),
            Err(e) if precondition_failed(&e) => Ok(PutOutcome::Deduplicated),
            Err(e) if conditional_conflict(&e) && head(client, bucket, key).await? => {
                Ok(PutOutcome::Deduplicated)
            }
            Err(e) => Err(s3_error("CompleteMultipartUpload", key, e)),
        }
    }

    pub(super) async fn get_s3(
        &self,
        client: &aws_sdk_s3::Client,
        bucket: &str,
        r: &CasRef,
    ) -> Result<Bytes, CasError> {
        let key = self.key(r);
        let out = match client.get_object().bucket(bucket).key(&key).send().await {
            Ok(out) => out,
            Err(e) if missing_key(&e) => return Err(CasError::NotFound(*r)),
            Err(e) => return Err(s3_error("GetObject", &key, e)),
        };
        let compressed = out
            .body
            .collect()
            .await
            .map_err(|e| CasError::S3 {
                op: "GetObject",
                key: key.clone(),
                status: None,
                code: None,
                message: format!("reading the body: {}", DisplayErrorContext(&e)),
                disposition: Disposition::Retry,
            })?
            .into_bytes();
        decode_verified(*r, compressed).await
    }
}

pub(super) async fn head(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
) -> Result<bool, CasError> {
    match client.head_object().bucket(bucket).key(key).send().await {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_service_error().is_some_and(|s| s.is_not_found())
                || e.raw_response().map(|r| r.status().as_u16()) == Some(404) =>
        {
            Ok(false)
        }
        Err(e) => Err(s3_error("HeadObject", key, e)),
    }
}

pub(super) async fn abort_upload(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
) {
    if let Err(e) = client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await
    {
        // The bucket's AbortIncompleteMultipartUpload lifecycle rule cleans up eventually.
        tracing::warn!(key, upload_id, error = %DisplayErrorContext(&e),
            "could not abort a CAS multipart upload");
    }
}

/// Aborts a multipart upload whose future was dropped before it finished.
pub(super) struct AbortGuard {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    upload_id: String,
    armed: bool,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (client, bucket, key, upload_id) = (
                self.client.clone(),
                std::mem::take(&mut self.bucket),
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.upload_id),
            );
            handle.spawn(async move { abort_upload(&client, &bucket, &key, &upload_id).await });
        }
    }
}
