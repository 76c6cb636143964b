//! The S3 client of the content-addressed store, built from config. Under the default `aws`
//! profile nothing local is assumed: no endpoint means AWS itself, no region or key means the
//! AWS SDK's default chains (environment, shared profile, container or instance role). The
//! `local` profile points at the local stack's server with path-style addressing
//! ([`S3Config::effective_endpoint`]); its development credentials are refused elsewhere
//! (checked when the configuration loads).

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};

use crate::config::S3Config;

/// Builds an S3 client.
pub async fn client(cfg: &S3Config) -> aws_sdk_s3::Client {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = cfg.effective_region() {
        loader = loader.region(Region::new(region.to_string()));
    }
    if !cfg.access_key_id.is_empty() {
        loader = loader.credentials_provider(Credentials::new(
            cfg.access_key_id.clone(),
            cfg.secret_access_key.expose().clone(),
            None,
            None,
            "weir-config",
        ));
    }
    let shared = loader.load().await;
    let mut builder = aws_sdk_s3::config::Builder::from(&shared).force_path_style(cfg.path_style());
    if let Some(endpoint) = cfg.effective_endpoint() {
        builder = builder.endpoint_url(endpoint);
    }
    aws_sdk_s3::Client::from_conf(builder.build())
}
