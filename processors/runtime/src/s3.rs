//! The S3 client of the content-addressed store, built from config: an explicit endpoint and
//! path-style addressing for local S3 servers, the default AWS credential chain when no key
//! is configured (instance roles on AWS).

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};

use crate::config::S3Config;

/// Builds an S3 client.
pub async fn client(cfg: &S3Config) -> aws_sdk_s3::Client {
    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).region(Region::new(cfg.region.clone()));
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
    let mut builder =
        aws_sdk_s3::config::Builder::from(&shared).force_path_style(cfg.force_path_style);
    if !cfg.endpoint_url.is_empty() {
        builder = builder.endpoint_url(&cfg.endpoint_url);
    }
    aws_sdk_s3::Client::from_conf(builder.build())
}
