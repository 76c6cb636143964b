//! The `s3` section (the object store) and the `cas` section (the blob store on it).
//!
//! Invariant: outside `s3.profile = "local"` the local stack's development credentials are
//! refused, so a deployment cannot run on them by accident.

use serde::{Deserialize, Serialize};

use super::Secret;

/// Which kind of object store the `s3` section talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum S3Profile {
    /// Amazon S3 (or any store configured explicitly): no endpoint means AWS, no region or
    /// key means the AWS SDK's default chains (environment, profile, container or instance
    /// role), and the local stack's development credentials are refused.
    Aws,
    /// The local stack (`infra/local/env` sets it): endpoint `http://127.0.0.1:9000`,
    /// region `us-east-1` and path-style addressing unless set, development credentials
    /// allowed.
    Local,
}

/// The local stack's S3 secret key (infra/local/lib.sh, infra/docker-compose.yml): refused
/// outside `s3.profile = "local"`, so a deployment cannot run on it by accident.
pub const LOCAL_DEV_S3_SECRET: &str = "weir-secret-key";

/// S3 settings for the content-addressed store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// `aws` (default) or `local` (env: WEIR__S3__PROFILE; `infra/local/env` sets `local`).
    pub profile: S3Profile,
    /// Endpoint of an S3-compatible server (env: S3_ENDPOINT_URL); empty means AWS itself
    /// (or the local stack's server under the `local` profile).
    pub endpoint_url: String,
    /// Bucket name (env: S3_BUCKET).
    pub bucket: String,
    /// Region (env: AWS_REGION); empty means the AWS SDK's region chain (`us-east-1` under
    /// the `local` profile).
    pub region: String,
    /// Access key id (env: AWS_ACCESS_KEY_ID); empty means the default AWS credential chain.
    pub access_key_id: String,
    /// Secret access key (env: AWS_SECRET_ACCESS_KEY).
    pub secret_access_key: Secret<String>,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most S3-compatible servers;
    /// always on under the `local` profile.
    pub force_path_style: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            profile: S3Profile::Aws,
            endpoint_url: String::new(),
            bucket: "weir-cas".into(),
            region: String::new(),
            access_key_id: String::new(),
            secret_access_key: Secret::default(),
            force_path_style: false,
        }
    }
}

impl S3Config {
    /// The endpoint to use, if not AWS's own.
    pub fn effective_endpoint(&self) -> Option<&str> {
        match (self.endpoint_url.as_str(), self.profile) {
            ("", S3Profile::Local) => Some("http://127.0.0.1:9000"),
            ("", S3Profile::Aws) => None,
            (url, _) => Some(url),
        }
    }

    /// The region to use; `None` leaves it to the AWS SDK's chain.
    pub fn effective_region(&self) -> Option<&str> {
        match (self.region.as_str(), self.profile) {
            ("", S3Profile::Local) => Some("us-east-1"),
            ("", S3Profile::Aws) => None,
            (region, _) => Some(region),
        }
    }

    /// Whether to address buckets by path.
    pub fn path_style(&self) -> bool {
        self.force_path_style || self.profile == S3Profile::Local
    }

    pub(super) fn problems(&self, p: &mut Vec<String>) {
        if !self.endpoint_url.is_empty() && !self.endpoint_url.starts_with("http") {
            p.push("s3.endpoint_url: must be an http(s) URL or empty".into());
        }
        if self.profile != S3Profile::Local
            && self.secret_access_key.expose() == LOCAL_DEV_S3_SECRET
        {
            p.push(
                "s3.secret_access_key: the local stack's development credentials are refused \
                 outside s3.profile = \"local\" (infra/local/env sets WEIR__S3__PROFILE=local); \
                 use real credentials or leave them empty for the AWS default chain"
                    .into(),
            );
        }
        if self.access_key_id.is_empty() != self.secret_access_key.expose().is_empty() {
            p.push(
                "s3.access_key_id/secret_access_key: set both, or neither for the AWS default \
                 credential chain"
                    .into(),
            );
        }
    }
}

/// Where CAS blobs live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CasBackend {
    /// The S3 bucket of the `s3` section.
    S3,
    /// A local directory (`cas.local_dir`): single-machine deployments and tools.
    Local,
}

/// CAS settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CasConfig {
    /// `s3` or `local`.
    pub backend: CasBackend,
    /// Directory of the local backend.
    pub local_dir: String,
    /// Key prefix of blobs in the bucket.
    pub key_prefix: String,
    /// zstd level used to compress blobs (1 fast .. 19 small).
    pub compression_level: i32,
    /// Blobs whose compressed size is above this are uploaded in parts, in bytes.
    pub multipart_threshold_bytes: u64,
    /// Size of one part of a multipart upload, in bytes (S3's minimum is 5 MiB).
    pub multipart_part_bytes: u64,
    /// Server-side encryption: "" (bucket default), "AES256" or "aws:kms".
    pub server_side_encryption: String,
    /// KMS key id when `server_side_encryption` is "aws:kms"; empty means the AWS managed key.
    pub kms_key_id: String,
}

impl Default for CasConfig {
    fn default() -> Self {
        Self {
            backend: CasBackend::S3,
            local_dir: ".stack/cas".into(),
            key_prefix: "cas/".into(),
            compression_level: 3,
            multipart_threshold_bytes: 16 * 1024 * 1024,
            multipart_part_bytes: 8 * 1024 * 1024,
            server_side_encryption: String::new(),
            kms_key_id: String::new(),
        }
    }
}
