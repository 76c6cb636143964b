//! The CAS against a local directory (dedup, layout, verification, settings) and the
//! classification of S3 and file-system errors.

use std::path::Path;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::operation::get_object::GetObjectError;

use super::error::{ambiguous, conditional_conflict, missing_key, precondition_failed, s3_error};
use super::*;
use crate::error::{Classify, Disposition};

fn local_cas(dir: &Path) -> Cas {
    let cfg = CasConfig {
        backend: CasBackend::Local,
        local_dir: dir.to_string_lossy().into_owned(),
        ..CasConfig::default()
    };
    Cas::local(&cfg).unwrap()
}

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}

#[test]
fn cas_is_send_sync_clone() {
    assert_send_sync_clone::<Cas>();
    assert_send_sync_clone::<CasRef>();
}

#[test]
fn bad_ref_strings_are_rejected() {
    let good = CasRef::of(b"x").hex();
    let cases = [
        ("".to_string(), "scheme"),
        (good.clone(), "scheme"),
        (format!("sha1:{good}"), "scheme"),
        (format!("SHA256:{good}"), "scheme"),
        (format!(" sha256:{good}"), "scheme"),
        (format!("sha256:{good} "), "64"),
        (format!("sha256:{}", &good[..63]), "64"),
        (format!("sha256:{good}0"), "64"),
        (format!("sha256:{}", good.to_uppercase()), "lowercase"),
        (format!("sha256:{}g", &good[..63]), "lowercase"),
        ("sha256:".to_string() + &"é".repeat(32), "lowercase"),
    ];
    for (input, why) in cases {
        let err = input.parse::<CasRef>().unwrap_err();
        assert!(err.to_string().contains(why), "{input:?}: {err}");
    }
    let long = "x".repeat(10_000);
    let err = long.parse::<CasRef>().unwrap_err();
    assert!(err.input.chars().count() <= weir_model::cas_ref::MAX_REF_ECHO + 1);
    assert_eq!(err.disposition(), Disposition::DeadLetter);
    let err: CasError = err.into();
    assert_eq!(
        err.disposition(),
        Disposition::DeadLetter,
        "a bad ref is the record's"
    );
}

#[tokio::test]
async fn put_twice_deduplicates() {
    let dir = tempfile::tempdir().unwrap();
    let cas = local_cas(dir.path());
    let first = cas.put_detailed(&b"hello, weir"[..]).await.unwrap();
    assert_eq!(first.outcome, PutOutcome::Stored);
    assert!(first.stored_bytes > 0);
    let path = dir.path().join(cas.key(&first.cas_ref));
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let second = cas.put_detailed(b"hello, weir".to_vec()).await.unwrap();
    assert_eq!(second.outcome, PutOutcome::Deduplicated);
    assert_eq!(second.stored_bytes, 0);
    assert_eq!(second.cas_ref, first.cas_ref);
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    assert_eq!(cas.put_slice(b"hello, weir").await.unwrap(), first.cas_ref);
    // Exactly one file in the shard directory: no temp files left behind.
    let shard = path.parent().unwrap();
    assert_eq!(std::fs::read_dir(shard).unwrap().count(), 1);
}

#[tokio::test]
async fn layout_is_prefix_shard_hex_and_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let cas = local_cas(dir.path());
    let content = b"abc".repeat(10_000);
    let r = cas.put(content.clone()).await.unwrap();
    let hex = r.hex();
    let path = dir.path().join("cas").join(&hex[..2]).join(&hex);
    let stored = std::fs::read(&path).unwrap();
    assert!(stored.len() < content.len() / 10, "{} bytes", stored.len());
    assert_eq!(zstd::stream::decode_all(&stored[..]).unwrap(), content);
}

#[tokio::test]
async fn get_verifies_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let cas = local_cas(dir.path());
    // Small (inline) and large (blocking pool) blobs.
    for size in [1, 1000, INLINE_LIMIT + 1, 3 * 1024 * 1024] {
        let content: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let r = cas.put(content.clone()).await.unwrap();
        assert_eq!(r, CasRef::of(&content));
        assert_eq!(cas.get(&r).await.unwrap(), content);
        assert!(cas.exists(&r).await.unwrap());
    }
}

#[tokio::test]
async fn corrupted_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cas = local_cas(dir.path());
    let r = cas.put(&b"the original"[..]).await.unwrap();
    let other = cas.put(&b"something else"[..]).await.unwrap();
    let path = dir.path().join(cas.key(&r));

    // A valid zstd frame of other content.
    std::fs::copy(dir.path().join(cas.key(&other)), &path).unwrap();
    match cas.get(&r).await {
        Err(CasError::Corrupt { expected, actual }) => {
            assert_eq!(expected, r);
            assert_eq!(actual, other.to_string());
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }

    // Not zstd at all.
    std::fs::write(&path, b"garbage").unwrap();
    let err = cas.get(&r).await.unwrap_err();
    assert!(
        matches!(&err, CasError::Corrupt { expected, actual }
            if *expected == r && actual.starts_with("undecodable")),
        "{err:?}"
    );
    assert_eq!(err.disposition(), Disposition::Fatal);

    // A flipped bit in a valid blob.
    let mut stored = zstd::bulk::compress(b"the original", 3).unwrap();
    let last = stored.len() - 1;
    stored[last] ^= 1;
    std::fs::write(&path, &stored).unwrap();
    assert!(matches!(cas.get(&r).await, Err(CasError::Corrupt { .. })));
}

#[tokio::test]
async fn missing_blob_is_not_found_and_delete_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let cas = local_cas(dir.path());
    let r = CasRef::of(b"never stored");
    assert!(matches!(cas.get(&r).await, Err(CasError::NotFound(x)) if x == r));
    assert!(!cas.exists(&r).await.unwrap());
    cas.delete(&r).await.unwrap();

    let r = cas.put(&b"short-lived"[..]).await.unwrap();
    cas.delete(&r).await.unwrap();
    assert!(!cas.exists(&r).await.unwrap());
    assert!(matches!(cas.get(&r).await, Err(CasError::NotFound(_))));
    // Put after delete stores it again.
    let receipt = cas.put_detailed(&b"short-lived"[..]).await.unwrap();
    assert_eq!(receipt.outcome, PutOutcome::Stored);
}

#[tokio::test]
async fn empty_blob_works() {
    let dir = tempfile::tempdir().unwrap();
    let cas = local_cas(dir.path());
    let r = cas.put(Bytes::new()).await.unwrap();
    assert_eq!(
        r.to_string(),
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert!(cas.get(&r).await.unwrap().is_empty());
    let again = cas.put_detailed(Vec::new()).await.unwrap();
    assert_eq!(again.outcome, PutOutcome::Deduplicated);
}

#[tokio::test]
async fn json_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let cas = local_cas(dir.path());
    let value = serde_json::json!({"nodes": {"a": {"type": "pure"}}, "edges": []});
    let r = cas.put_json(&value).await.unwrap();
    let back: serde_json::Value = cas.get_json(&r).await.unwrap();
    assert_eq!(back, value);
    let err = cas.get_json::<Vec<u32>>(&r).await.unwrap_err();
    assert!(matches!(err, CasError::Json(_)), "{err:?}");
}

#[tokio::test]
async fn concurrent_puts_of_the_same_blob_agree() {
    let dir = tempfile::tempdir().unwrap();
    let cas = local_cas(dir.path());
    let content = Bytes::from(vec![7u8; 200_000]);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (cas, content) = (cas.clone(), content.clone());
            tokio::spawn(async move { cas.put(content).await })
        })
        .collect();
    let mut refs = Vec::new();
    for t in tasks {
        refs.push(t.await.unwrap().unwrap());
    }
    assert!(refs.iter().all(|r| *r == refs[0]));
    assert_eq!(cas.get(&refs[0]).await.unwrap(), content);
    let shard = dir.path().join(cas.key(&refs[0]));
    assert_eq!(
        std::fs::read_dir(shard.parent().unwrap()).unwrap().count(),
        1
    );
}

#[test]
fn bad_settings_are_rejected() {
    let base = CasConfig {
        local_dir: "/tmp/x".into(),
        ..CasConfig::default()
    };
    for bad in [
        CasConfig {
            key_prefix: "../escape/".into(),
            ..base.clone()
        },
        CasConfig {
            key_prefix: "/abs/".into(),
            ..base.clone()
        },
        CasConfig {
            compression_level: 0,
            ..base.clone()
        },
        CasConfig {
            local_dir: String::new(),
            ..base.clone()
        },
    ] {
        let err = Cas::local(&bad).unwrap_err();
        assert!(matches!(err, CasError::Config(_)), "{err:?}");
        assert_eq!(err.disposition(), Disposition::Fatal);
    }
    assert!(matches!(
        check_config(
            &CasConfig {
                server_side_encryption: "rot13".into(),
                ..base.clone()
            },
            true
        ),
        Err(CasError::Config(_))
    ));
    assert!(matches!(
        check_config(
            &CasConfig {
                multipart_part_bytes: 1024,
                ..base.clone()
            },
            true
        ),
        Err(CasError::Config(_))
    ));
}

#[test]
fn s3_errors_are_classified() {
    use aws_sdk_s3::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_s3::primitives::SdkBody;

    let service = |status: u16, code: &str| {
        SdkError::service_error(
            GetObjectError::generic(ErrorMetadata::builder().code(code).build()),
            HttpResponse::new(status.try_into().unwrap(), SdkBody::empty()),
        )
    };
    let hint = |e| s3_error("GetObject", "k", e).disposition();
    for (status, code, want) in [
        (503, "SlowDown", Disposition::Retry),
        (500, "InternalError", Disposition::Retry),
        (400, "RequestTimeout", Disposition::Retry),
        (429, "", Disposition::Retry),
        (409, "ConditionalRequestConflict", Disposition::Retry),
        (400, "KMS.ThrottlingException", Disposition::Retry),
        (403, "AccessDenied", Disposition::Fatal),
        (403, "InvalidAccessKeyId", Disposition::Fatal),
        (404, "NoSuchBucket", Disposition::Fatal),
        (400, "InvalidArgument", Disposition::Fatal),
        (400, "KMS.NotFoundException", Disposition::Fatal),
    ] {
        assert_eq!(hint(service(status, code)), want, "{status} {code}");
    }
    assert!(missing_key(&service(404, "NoSuchKey")));
    assert!(missing_key(&service(404, "")));
    assert!(!missing_key(&service(404, "NoSuchBucket")));
    assert!(precondition_failed(&service(412, "PreconditionFailed")));
    assert!(!precondition_failed(&service(
        409,
        "ConditionalRequestConflict"
    )));
    assert!(conditional_conflict(&service(
        409,
        "ConditionalRequestConflict"
    )));

    let io = SdkError::<GetObjectError, HttpResponse>::dispatch_failure(ConnectorError::io(
        Box::new(std::io::Error::other("connection reset")),
    ));
    assert!(ambiguous(&io));
    assert!(!ambiguous(&service(412, "PreconditionFailed")));
    assert_eq!(hint(io), Disposition::Retry);
    let timeout = SdkError::<GetObjectError, HttpResponse>::timeout_error("slow");
    assert_eq!(hint(timeout), Disposition::Retry);
    let user = SdkError::<GetObjectError, HttpResponse>::dispatch_failure(ConnectorError::user(
        Box::new(std::io::Error::other("bad endpoint")),
    ));
    assert_eq!(hint(user), Disposition::Fatal);
    let built = SdkError::<GetObjectError, HttpResponse>::construction_failure("no bucket");
    assert_eq!(hint(built), Disposition::Fatal);
}

#[test]
fn io_errors_are_classified() {
    use std::io::{Error, ErrorKind};
    let p = Path::new("/x");
    let e = |k| CasError::io("write", p, Error::from(k)).disposition();
    assert_eq!(e(ErrorKind::PermissionDenied), Disposition::Fatal);
    assert_eq!(e(ErrorKind::StorageFull), Disposition::Retry);
    assert_eq!(e(ErrorKind::Interrupted), Disposition::Retry);
}
