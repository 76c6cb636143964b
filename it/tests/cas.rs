//! The content-addressed store against the real S3 server of the local stack (s3s-fs):
//! round trips, deduplication without a second upload, multipart uploads, corrupt objects
//! refused, missing refs, encryption headers and error classification.
//! Needs the local stack (`infra/local/up`) and its environment (`infra/local/env`).
//!
//! `cargo test -p weir-it --test cas -- --ignored --nocapture measure_dedup_strategies`
//! prints the measurement behind `weir_runtime::cas::HEAD_FIRST_ABOVE` (docs/cas.md).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::BoxError;
use aws_sdk_s3::primitives::ByteStream;
use rand::Rng as _;
use weir_model::CasRef;
use weir_runtime::cas::{Cas, CasError, PutOutcome, HEAD_FIRST_ABOVE};
use weir_runtime::config::{CasBackend, Config};
use weir_runtime::{Classify as _, Disposition};

const MIB: usize = 1024 * 1024;

/// One HTTP request the S3 client sent.
#[derive(Debug, Clone)]
struct Sent {
    method: String,
    uri: String,
    body_bytes: Option<u64>,
}

impl Sent {
    fn is(&self, method: &str, query_part: &str) -> bool {
        self.method == method && self.uri.contains(query_part)
    }
}

/// Records every request the client transmits (retries included).
#[derive(Debug, Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Sent>>>);

impl Recorder {
    fn take(&self) -> Vec<Sent> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Intercept for Recorder {
    fn name(&self) -> &'static str {
        "it-request-recorder"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request();
        self.0.lock().unwrap().push(Sent {
            method: request.method().to_owned(),
            uri: request.uri().to_owned(),
            body_bytes: request.body().content_length(),
        });
        Ok(())
    }
}

/// Stack config with the S3 backend and a fresh key prefix.
fn s3_config() -> Config {
    let mut cfg = weir_it::config("it-cas");
    cfg.cas.backend = CasBackend::S3;
    cfg.cas.key_prefix = format!("it-{}/", uuid::Uuid::now_v7().simple());
    cfg
}

/// A CAS on a client that records its requests, and a plain client for direct access.
async fn recorded_cas(cfg: &Config) -> (Cas, Recorder, aws_sdk_s3::Client) {
    let raw = weir_runtime::s3::client(&cfg.s3).await;
    let recorder = Recorder::default();
    let recorded = aws_sdk_s3::Client::from_conf(
        raw.config()
            .to_builder()
            .interceptor(recorder.clone())
            .build(),
    );
    let cas = Cas::s3(recorded, &cfg.s3.bucket, &cfg.cas).expect("cas");
    (cas, recorder, raw)
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rng().fill(&mut v[..]);
    v
}

async fn head(raw: &aws_sdk_s3::Client, bucket: &str, key: &str) -> (String, String) {
    let h = raw
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .expect("head object");
    (
        h.last_modified().expect("last modified").to_string(),
        h.e_tag().expect("etag").to_owned(),
    )
}

#[tokio::test]
async fn round_trip_and_key_layout() {
    let cfg = s3_config();
    let cas = Cas::from_config(&cfg).await.expect("cas from config");
    let raw = weir_runtime::s3::client(&cfg.s3).await;

    for content in [
        b"{\"nodes\":{}}".to_vec(),
        b"weir ".repeat(40_000),
        random_bytes(300_000),
    ] {
        let r = cas.put(content.clone()).await.expect("put");
        assert_eq!(r, CasRef::of(&content));
        assert_eq!(cas.get(&r).await.expect("get"), content);
        assert!(cas.exists(&r).await.expect("exists"));

        let hex = r.hex();
        let key = format!("{}{}/{}", cfg.cas.key_prefix, &hex[..2], hex);
        let object = raw
            .get_object()
            .bucket(&cfg.s3.bucket)
            .key(&key)
            .send()
            .await
            .expect("object at <prefix><hex[0..2]>/<hex>");
        let stored = object.body.collect().await.unwrap().into_bytes();
        // Stored zstd-compressed.
        assert_eq!(&stored[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
    }

    let value = serde_json::json!({"nodes": {"fetch": {"type": "http_request"}}, "edges": []});
    let r = cas.put_json(&value).await.unwrap();
    assert_eq!(cas.get_json::<serde_json::Value>(&r).await.unwrap(), value);
}

#[tokio::test]
async fn second_put_does_not_store_again() {
    let cfg = s3_config();
    let (cas, sent, raw) = recorded_cas(&cfg).await;

    // Small blob: one conditional PUT, answered 412 the second time.
    let small = random_bytes(10_000);
    let first = cas.put_detailed(small.clone()).await.unwrap();
    assert_eq!(first.outcome, PutOutcome::Stored);
    let key = cas.key(&first.cas_ref);
    let before = head(&raw, &cfg.s3.bucket, &key).await;
    sent.take();
    // Last-Modified has a resolution of one second: a rewrite would show.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let second = cas.put_detailed(small.clone()).await.unwrap();
    assert_eq!(second.outcome, PutOutcome::Deduplicated);
    assert_eq!(second.cas_ref, first.cas_ref);
    let requests = sent.take();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(requests[0].is("PUT", ""), "{requests:?}");
    assert_eq!(
        head(&raw, &cfg.s3.bucket, &key).await,
        before,
        "object rewritten"
    );

    // Large blob: HEAD first, and nothing is sent at all the second time.
    let large = random_bytes(HEAD_FIRST_ABOVE + 1);
    let first = cas.put_detailed(large.clone()).await.unwrap();
    assert_eq!(first.outcome, PutOutcome::Stored);
    let requests = sent.take();
    assert_eq!(
        requests
            .iter()
            .map(|s| s.method.as_str())
            .collect::<Vec<_>>(),
        ["HEAD", "PUT"],
        "{requests:?}"
    );
    let key = cas.key(&first.cas_ref);
    let before = head(&raw, &cfg.s3.bucket, &key).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let second = cas.put_detailed(large.clone()).await.unwrap();
    assert_eq!(second.outcome, PutOutcome::Deduplicated);
    let requests = sent.take();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(requests[0].is("HEAD", ""), "{requests:?}");
    assert_eq!(
        head(&raw, &cfg.s3.bucket, &key).await,
        before,
        "object rewritten"
    );
    assert_eq!(cas.get(&first.cas_ref).await.unwrap(), large);
    cas.delete(&first.cas_ref).await.unwrap();
}

#[tokio::test]
async fn multipart_upload_round_trips() {
    let mut cfg = s3_config();
    cfg.cas.multipart_threshold_bytes = 1;
    cfg.cas.multipart_part_bytes = 5 * MIB as u64;
    let (cas, sent, raw) = recorded_cas(&cfg).await;

    let blob = random_bytes(12 * MIB);
    let receipt = cas.put_detailed(blob.clone()).await.expect("multipart put");
    assert_eq!(receipt.outcome, PutOutcome::Stored);
    assert!(receipt.stored_bytes > 12 * MIB as u64, "incompressible");
    let requests = sent.take();
    let count = |m: &str, q: &str| requests.iter().filter(|s| s.is(m, q)).count();
    assert_eq!(count("HEAD", ""), 1, "{requests:?}");
    assert_eq!(count("POST", "uploads"), 1, "create: {requests:?}");
    assert_eq!(
        count("PUT", "partNumber="),
        3,
        "12 MiB in 5 MiB parts: {requests:?}"
    );
    assert_eq!(count("POST", "uploadId="), 1, "complete: {requests:?}");
    let part_sizes: Vec<u64> = requests
        .iter()
        .filter(|s| s.is("PUT", "partNumber="))
        .filter_map(|s| s.body_bytes)
        .collect();
    assert!(
        part_sizes.iter().filter(|&&n| n == 5 * MIB as u64).count() >= 2,
        "{part_sizes:?}"
    );

    // s3s-fs reports the multipart ETag `<md5>-<parts>`.
    let (_, etag) = head(&raw, &cfg.s3.bucket, &cas.key(&receipt.cas_ref)).await;
    assert!(etag.trim_matches('"').ends_with("-3"), "{etag}");
    assert_eq!(cas.get(&receipt.cas_ref).await.expect("get"), blob);

    // Deduplicated by the HEAD: no upload starts.
    sent.take();
    let again = cas.put_detailed(blob).await.unwrap();
    assert_eq!(again.outcome, PutOutcome::Deduplicated);
    let requests = sent.take();
    assert_eq!(requests.len(), 1, "{requests:?}");

    cas.delete(&receipt.cas_ref).await.unwrap();
    assert!(!cas.exists(&receipt.cas_ref).await.unwrap());
}

/// A multipart upload whose conditional complete finds the object already there
/// (a concurrent writer) is aborted and reported as deduplicated.
#[tokio::test]
async fn multipart_lost_race_is_aborted() {
    let mut cfg = s3_config();
    cfg.cas.multipart_threshold_bytes = 1;
    let (cas, sent, raw) = recorded_cas(&cfg).await;

    // Below HEAD_FIRST_ABOVE: no HEAD, straight to the multipart upload.
    let blob = random_bytes(1000);
    assert_eq!(
        cas.put_detailed(blob.clone()).await.unwrap().outcome,
        PutOutcome::Stored
    );
    sent.take();
    let again = cas.put_detailed(blob.clone()).await.unwrap();
    assert_eq!(again.outcome, PutOutcome::Deduplicated);
    let requests = sent.take();
    let abort = requests
        .iter()
        .find(|s| s.is("DELETE", "uploadId="))
        .unwrap_or_else(|| panic!("no abort: {requests:?}"));
    let upload_id = abort
        .uri
        .split(['?', '&'])
        .find_map(|kv| kv.strip_prefix("uploadId="))
        .expect("upload id")
        .to_owned();
    let late_part = raw
        .upload_part()
        .bucket(&cfg.s3.bucket)
        .key(cas.key(&again.cas_ref))
        .upload_id(&upload_id)
        .part_number(1)
        .body(ByteStream::from(b"late".to_vec()))
        .send()
        .await;
    assert!(late_part.is_err(), "upload {upload_id} still open");
    assert_eq!(cas.get(&again.cas_ref).await.unwrap(), blob);
}

#[tokio::test]
async fn corrupted_object_is_refused() {
    let cfg = s3_config();
    let (cas, _, raw) = recorded_cas(&cfg).await;
    let bucket = &cfg.s3.bucket;

    let original = b"the original definition".to_vec();
    let r = cas.put(original.clone()).await.unwrap();
    let other = cas.put(&b"another blob"[..]).await.unwrap();

    // A valid zstd object of other content under r's key.
    let other_stored = raw
        .get_object()
        .bucket(bucket)
        .key(cas.key(&other))
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    let overwrite = |body: Vec<u8>| {
        raw.put_object()
            .bucket(bucket)
            .key(cas.key(&r))
            .body(ByteStream::from(body))
            .send()
    };
    overwrite(other_stored.to_vec()).await.unwrap();
    match cas.get(&r).await {
        Err(CasError::Corrupt { expected, actual }) => {
            assert_eq!(expected, r);
            assert_eq!(actual, other.to_string());
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }

    // Not zstd at all.
    overwrite(b"definitely not zstd".to_vec()).await.unwrap();
    let err = cas.get(&r).await.unwrap_err();
    assert!(
        matches!(&err, CasError::Corrupt { expected, actual }
            if *expected == r && actual.starts_with("undecodable")),
        "{err:?}"
    );

    // A put does not repair (the key exists); delete then put does.
    assert_eq!(
        cas.put_detailed(original.clone()).await.unwrap().outcome,
        PutOutcome::Deduplicated
    );
    cas.delete(&r).await.unwrap();
    assert_eq!(
        cas.put_detailed(original.clone()).await.unwrap().outcome,
        PutOutcome::Stored
    );
    assert_eq!(cas.get(&r).await.unwrap(), original);
}

#[tokio::test]
async fn missing_ref_is_not_found() {
    let cfg = s3_config();
    let cas = Cas::from_config(&cfg).await.unwrap();
    let r = CasRef::of(uuid::Uuid::now_v7().as_bytes());
    match cas.get(&r).await {
        Err(CasError::NotFound(missing)) => assert_eq!(missing, r),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(!cas.exists(&r).await.unwrap());
    cas.delete(&r)
        .await
        .expect("deleting a missing blob succeeds");
    assert!(matches!(
        cas.get_json::<serde_json::Value>(&r).await,
        Err(CasError::NotFound(_))
    ));
}

#[tokio::test]
async fn empty_blob_round_trips() {
    let cfg = s3_config();
    let cas = Cas::from_config(&cfg).await.unwrap();
    let r = cas.put(Vec::new()).await.unwrap();
    assert_eq!(r, CasRef::of(b""));
    assert!(cas.get(&r).await.unwrap().is_empty());
}

#[tokio::test]
async fn encryption_settings_are_sent() {
    for (mode, key) in [("AES256", ""), ("aws:kms", "alias/weir-it")] {
        let mut cfg = s3_config();
        cfg.cas.server_side_encryption = mode.into();
        cfg.cas.kms_key_id = key.into();
        let (cas, _, _) = recorded_cas(&cfg).await;
        let blob = random_bytes(2_000);
        let r = cas.put(blob.clone()).await.expect(mode);
        assert_eq!(cas.get(&r).await.unwrap(), blob);

        // The multipart path carries the settings too.
        cfg.cas.multipart_threshold_bytes = 1;
        let (cas, _, _) = recorded_cas(&cfg).await;
        let blob = random_bytes(2_000);
        let r = cas.put(blob.clone()).await.expect(mode);
        assert_eq!(cas.get(&r).await.unwrap(), blob);
    }
}

#[tokio::test]
async fn errors_carry_a_retry_hint() {
    // Wrong credentials: auth. The secret never shows in the message.
    let mut cfg = s3_config();
    cfg.s3.access_key_id = "weir-intruder".into();
    let cas = Cas::from_config(&cfg).await.unwrap();
    let err = cas.put(&b"x"[..]).await.unwrap_err();
    assert_eq!(err.disposition(), Disposition::Fatal, "{err}");
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains(cfg.s3.secret_access_key.expose()),
        "{shown}"
    );

    // Nobody listening: network, retry.
    let mut cfg = s3_config();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cfg.s3.endpoint_url = format!("http://127.0.0.1:{port}");
    let cas = Cas::from_config(&cfg).await.unwrap();
    let err = cas.get(&CasRef::of(b"x")).await.unwrap_err();
    assert_eq!(err.disposition(), Disposition::Retry, "{err}");
}

#[tokio::test]
async fn local_backend_from_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = s3_config();
    cfg.cas.backend = CasBackend::Local;
    cfg.cas.local_dir = dir.path().to_string_lossy().into_owned();
    let cas = Cas::from_config(&cfg).await.unwrap();
    assert_eq!(cas.backend_name(), "local");
    let r = cas.put(&b"local"[..]).await.unwrap();
    assert!(dir.path().join(cas.key(&r)).is_file());
    assert_eq!(cas.get(&r).await.unwrap(), &b"local"[..]);
}

/// Latency of the two dedup strategies, for new and already-stored blobs of several sizes,
/// and how often a conditional PUT of a stored blob fails instead of answering 412 (the
/// server answers before reading the body and closes the connection under the client).
/// SDK retries are off so that every failure shows. Not a pass/fail test: run it by name
/// with `--ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a test"]
async fn measure_dedup_strategies() {
    let cfg = s3_config();
    let base = weir_runtime::s3::client(&cfg.s3).await;
    let raw = aws_sdk_s3::Client::from_conf(
        base.config()
            .to_builder()
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            .build(),
    );
    let bucket = cfg.s3.bucket.clone();
    let prefix = cfg.cas.key_prefix.clone();
    let key_of = |i: u64| format!("{prefix}measure/{i}");
    let mut n = 0u64;
    let head = |key: String| {
        let (raw, bucket) = (raw.clone(), bucket.clone());
        async move {
            raw.head_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .is_ok()
        }
    };
    let put = |key: String, body: bytes::Bytes| {
        let (raw, bucket) = (raw.clone(), bucket.clone());
        async move {
            let sent = raw
                .put_object()
                .bucket(bucket)
                .key(key)
                .if_none_match("*")
                .body(ByteStream::from(body))
                .send()
                .await;
            match sent {
                Ok(_) => "stored",
                Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(412) => "412",
                Err(_) => "failed",
            }
        }
    };
    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;

    println!(
        "size (KiB) | new: HEAD+PUT | new: cond PUT | hit: HEAD | hit: cond PUT | cond PUT on hit failed"
    );
    for size in [
        1024,
        16 * 1024,
        64 * 1024,
        256 * 1024,
        MIB,
        4 * MIB,
        16 * MIB,
    ] {
        let rounds: u64 = if size >= 4 * MIB { 10 } else { 50 };
        let body = bytes::Bytes::from(random_bytes(size));
        let (mut a, mut b, mut c, mut d, mut failed) = (vec![], vec![], vec![], vec![], 0);
        for _ in 0..rounds {
            // New blob, HEAD first.
            n += 1;
            let key = key_of(n);
            let t = Instant::now();
            assert!(!head(key.clone()).await);
            assert_eq!(put(key.clone(), body.clone()).await, "stored");
            a.push(ms(t));
            // Stored blob, HEAD first.
            let t = Instant::now();
            assert!(head(key.clone()).await);
            c.push(ms(t));
            // New blob, conditional PUT only.
            n += 1;
            let key = key_of(n);
            let t = Instant::now();
            assert_eq!(put(key.clone(), body.clone()).await, "stored");
            b.push(ms(t));
            // Stored blob, conditional PUT only.
            let t = Instant::now();
            match put(key.clone(), body.clone()).await {
                "412" => d.push(ms(t)),
                "failed" => failed += 1,
                other => panic!("conditional PUT over a stored blob: {other}"),
            }
        }
        // Leave nothing behind: this writes up to half a GiB.
        for key in (n - 2 * rounds + 1..=n).map(key_of) {
            raw.delete_object()
                .bucket(&bucket)
                .key(key)
                .send()
                .await
                .expect("delete");
        }
        println!(
            "{:>10} | {:>10.2} ms | {:>10.2} ms | {:>6.2} ms | {:>10.2} ms | {failed}/{rounds}",
            size / 1024,
            median(a),
            median(b),
            median(c),
            median(d),
        );
    }
}
