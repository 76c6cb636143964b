use super::*;
use std::io::Write;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn layers_apply_in_order_and_passthrough_keys_keep_dots() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        file,
        "[runtime]\nmax_batch = 100\nmax_wait_ms = 7\n[kafka]\ntopic_prefix = \"dev.\"\n[kafka.consumer]\n\"fetch.wait.max.ms\" = \"20\""
    )
    .unwrap();
    let cfg = Config::load_from(
        Some(file.path()),
        env(&[
            ("DATABASE_URL", "postgres://u:p@db:5432/x"),
            ("WEIR__RUNTIME__MAX_BATCH", "250"),
            ("WEIR__KAFKA__PRODUCER__LINGER_MS", "3"),
            ("WEIR__TELEMETRY__LOG_FORMAT", "json"),
        ]),
    )
    .unwrap();
    assert_eq!(cfg.runtime.max_batch, 250, "env wins over file");
    assert_eq!(cfg.runtime.max_wait_ms, 7, "file wins over defaults");
    assert_eq!(cfg.kafka.topic("weir.patches.v1"), "dev.weir.patches.v1");
    assert_eq!(cfg.kafka.consumer["fetch.wait.max.ms"], "20");
    assert_eq!(cfg.kafka.producer["linger.ms"], "3");
    assert_eq!(cfg.telemetry.log_format, LogFormat::Json);
    assert_eq!(cfg.postgres.url.expose(), "postgres://u:p@db:5432/x");
    let shown = format!("{cfg:?}");
    assert!(
        !shown.contains("u:p@"),
        "the database password must not print"
    );
    assert!(
        !shown.contains("weir-secret-key"),
        "the S3 secret must not print"
    );
}

#[test]
fn s3_defaults_are_aws_and_dev_credentials_need_the_local_profile() {
    let cfg = Config::load_from(None, env(&[])).unwrap();
    assert_eq!(cfg.s3.profile, S3Profile::Aws);
    assert_eq!(cfg.s3.effective_endpoint(), None, "no endpoint: AWS itself");
    assert_eq!(
        cfg.s3.effective_region(),
        None,
        "no region: the SDK's chain"
    );
    assert!(cfg.s3.access_key_id.is_empty(), "no key: the SDK's chain");
    assert!(!cfg.s3.path_style());

    // What infra/local/env prints, without the profile: refused.
    let local = [
        ("S3_ENDPOINT_URL", "http://127.0.0.1:9000"),
        ("AWS_ACCESS_KEY_ID", "weir"),
        ("AWS_SECRET_ACCESS_KEY", LOCAL_DEV_S3_SECRET),
        ("AWS_REGION", "us-east-1"),
    ];
    let err = Config::load_from(None, env(&local))
        .unwrap_err()
        .to_string();
    assert!(err.contains("development credentials are refused"), "{err}");
    assert!(
        !err.contains(LOCAL_DEV_S3_SECRET),
        "the secret must not print: {err}"
    );

    // With it: accepted, path-style.
    let mut with_profile = local.to_vec();
    with_profile.push(("WEIR__S3__PROFILE", "local"));
    let cfg = Config::load_from(None, env(&with_profile)).unwrap();
    assert_eq!(cfg.s3.profile, S3Profile::Local);
    assert!(cfg.s3.path_style());
    assert_eq!(cfg.s3.effective_endpoint(), Some("http://127.0.0.1:9000"));

    // The local profile alone fills in the local server.
    let cfg = Config::load_from(None, env(&[("WEIR__S3__PROFILE", "local")])).unwrap();
    assert_eq!(cfg.s3.effective_endpoint(), Some("http://127.0.0.1:9000"));
    assert_eq!(cfg.s3.effective_region(), Some("us-east-1"));

    // Half a key pair is a mistake.
    let err = Config::load_from(None, env(&[("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("set both"), "{err}");
}

#[test]
fn kafka_secrets_are_redacted_in_debug_output() {
    let cfg = Config::load_from(
        None,
        env(&[
            ("WEIR__KAFKA__CONSUMER__SASL__PASSWORD", "hunter2-consumer"),
            ("WEIR__KAFKA__PRODUCER__SASL__PASSWORD", "hunter2-producer"),
            ("WEIR__KAFKA__PRODUCER__SSL__KEY__PASSWORD", "keypass-1"),
            ("WEIR__KAFKA__CONSUMER__SASL__USERNAME", "weir-user"),
            ("WEIR__KAFKA__CONSUMER__FETCH__WAIT__MAX__MS", "20"),
        ]),
    )
    .unwrap();
    let mut cfg = cfg;
    for (k, v) in [
        ("ssl.keystore.password", "keystore-2"),
        ("sasl.oauthbearer.client.secret", "oauth-3"),
        ("ssl.key.pem", "-----BEGIN PRIVATE KEY-----4"),
        ("sasl.jaas.config", "jaas-5"),
        ("ssl.truststore.password", "trust-6"),
        ("sasl.oauthbearer.config", "principal=x secret-7"),
    ] {
        cfg.kafka.consumer.insert(k.into(), v.into());
    }
    let shown = format!("{cfg:#?}");
    for secret in [
        "hunter2-consumer",
        "hunter2-producer",
        "keypass-1",
        "keystore-2",
        "oauth-3",
        "PRIVATE KEY",
        "jaas-5",
        "trust-6",
        "secret-7",
    ] {
        assert!(!shown.contains(secret), "{secret} printed:\n{shown}");
    }
    assert!(shown.contains("weir-user"), "non-secrets still print");
    assert!(shown.contains("\"20\""), "non-secrets still print");
    for k in [
        "sasl.password",
        "ssl.key.password",
        "ssl.ca.pem",
        "my.api.key",
        "x.token",
    ] {
        assert!(is_secret_key(k), "{k}");
    }
    for k in [
        "sasl.username",
        "fetch.wait.max.ms",
        "security.protocol",
        "ssl.ca.location",
    ] {
        assert!(!is_secret_key(k), "{k}");
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        file,
        "[runtime]\nmax_batch = \"lots\"\nbogus = 1\n[kafka]\npartitions = 0\n[nosuch]\nx = 1"
    )
    .unwrap();
    let err = Config::load_from(
        Some(file.path()),
        env(&[
            ("WEIR__TELEMETRY__LISTEN", "not-an-address"),
            ("WEIR__X", "1"),
        ]),
    )
    .unwrap_err();
    let text = err.to_string();
    for needle in [
        "runtime.max_batch",
        "runtime.bogus: unknown key",
        "nosuch: unknown key",
        "telemetry.listen",
        "WEIR__X",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    // Semantic checks run once the shape is right.
    let err = Config::load_from(
        None,
        env(&[
            ("WEIR__KAFKA__PARTITIONS", "0"),
            ("WEIR__MATERIALIZER__MAX_BATCH", "0"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("kafka.partitions: must be at least 1"),
        "{err}"
    );
    assert!(
        err.contains("materializer.max_batch: must be at least 1"),
        "{err}"
    );
    // The materializer's own batching settings parse from the environment.
    let cfg = Config::load_from(
        None,
        env(&[
            ("WEIR__MATERIALIZER__MAX_BATCH", "500"),
            ("WEIR__MATERIALIZER__MAX_WAIT_MS", "3"),
        ]),
    )
    .unwrap();
    assert_eq!(
        (cfg.materializer.max_batch, cfg.materializer.max_wait_ms),
        (500, 3)
    );
}

/// The secrets of `cfg`, filled back into the commented lines of its `weir config` output.
fn fill_secrets(printed: &str, cfg: &Config) -> String {
    let values = serde_json::to_value(cfg).unwrap();
    let mut section: Vec<String> = Vec::new();
    let mut out = String::new();
    for line in printed.lines() {
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = toml::from_str::<toml::Value>(&format!("{header} = 0"))
                .map(|_| header.split('.').map(str::to_string).collect())
                .unwrap();
        }
        match line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" = \"***\"  # secret, not shown"))
        {
            Some(key) => {
                let name = key.trim_matches('"');
                let mut v = &values;
                for part in &section {
                    v = &v[part.as_str()];
                }
                let real = v[name].as_str().unwrap();
                out.push_str(&format!("{key} = {}\n", toml::Value::String(real.into())));
            }
            None => out.push_str(&format!("{line}\n")),
        }
    }
    out
}

#[test]
fn weir_config_prints_a_file_that_loads_back_with_secrets_hidden() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        file,
        "[runtime]\nmax_batch = 100\n[kafka]\ntopic_prefix = \"dev.\"\ntopic_partitions = {{ \"weir.patches.v1\" = 12 }}\n[kafka.consumer]\n\"fetch.wait.max.ms\" = \"20\"\n\"sasl.password\" = \"file-hunter2\"\n[cache]\nthreshold_overrides = {{ \"ws-1/agent\" = 0.97 }}\nsimilarity_threshold = 0.9"
    )
    .unwrap();
    let environment = env(&[
        ("DATABASE_URL", "postgres://u:pg-pass-1@db:5432/x"),
        ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "s3-secret-2"),
        ("WEIR__SCHEMA_REGISTRY__PASSWORD", "registry-pass-3"),
        ("WEIR__CACHE__OPENAI_API_KEY", "sk-openai-4"),
        ("WEIR__KAFKA__PRODUCER__SSL__KEY__PASSWORD", "keypass-5"),
        ("WEIR__KAFKA__PRODUCER__LINGER_MS", "3"),
        ("WEIR__GATEWAY__CLIENT_IP_FROM_FORWARDED_FOR", "yes"),
    ]);
    let cfg = Config::load_from(Some(file.path()), environment.clone()).unwrap();
    let printed = cfg.to_toml_redacted().unwrap();
    for secret in [
        "pg-pass-1",
        "s3-secret-2",
        "registry-pass-3",
        "sk-openai-4",
        "keypass-5",
        "file-hunter2",
        "weir:secret",
    ] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
    for shown in [
        "max_batch = 100",
        "\"fetch.wait.max.ms\" = \"20\"",
        "\"linger.ms\" = \"3\"",
        "access_key_id = \"AKIAEXAMPLE\"",
        "client_ip_from_forwarded_for = true",
        "# url = \"***\"  # secret, not shown",
        "# \"sasl.password\" = \"***\"  # secret, not shown",
    ] {
        assert!(printed.contains(shown), "{shown} missing:\n{printed}");
    }
    let as_json = |c: &Config| serde_json::to_value(c).unwrap();

    // With its secrets filled back in, the output alone is the same configuration.
    let mut back = tempfile::NamedTempFile::new().unwrap();
    write!(back, "{}", fill_secrets(&printed, &cfg)).unwrap();
    let loaded = Config::load_from(Some(back.path()), env(&[])).unwrap();
    assert_eq!(as_json(&loaded), as_json(&cfg));

    // Copied as it is, it loads back unchanged where the secrets come from the environment.
    let mut copied = tempfile::NamedTempFile::new().unwrap();
    write!(copied, "{printed}").unwrap();
    let mut with_env = environment;
    with_env.push((
        "WEIR__KAFKA__CONSUMER__SASL__PASSWORD".into(),
        "file-hunter2".into(),
    ));
    let loaded = Config::load_from(Some(copied.path()), with_env).unwrap();
    assert_eq!(as_json(&loaded), as_json(&cfg));

    // The file is the one named: no `NAME.toml` when NAME is missing.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(back.path(), dir.path().join("weir.toml")).unwrap();
    let err = Config::load_from(Some(&dir.path().join("weir")), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot read"), "{err}");
}
