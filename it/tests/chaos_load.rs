//! The chaos suite's workload and checker end to end, without faults: `weir dev` on fresh
//! topics, the mixed load through its gateway for about 20 s (patches with rejections and
//! refusals on purpose, fan-out/fan-in runs answered by the simulated workers with failed
//! first attempts, cache entries and lookups, poison records), then the drain and every
//! invariant. A healthy system must check clean: this is the baseline the fault runs are
//! judged against, and it fails if the checker sees what is not there (or the product
//! loses or duplicates anything under plain load).

use std::process::{Command, Stdio};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use weir_chaos::check;
use weir_chaos::load::{self, Expect, LoadConfig, OVER_BUDGET};
use weir_it::{config, prepare, random_name, weir_bin, ChildGuard};

/// `WEIR_IT_CHAOS_<NAME>` from the environment (to measure other rates), else `default`.
fn knob(name: &str, default: f64) -> f64 {
    std::env::var(format!("WEIR_IT_CHAOS_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A free local port (bound, then released for the child to take).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_seconds_of_mixed_load_check_clean() {
    let prefix = format!("{}.", random_name("chaos"));
    let cfg = config(&prefix);
    prepare(&cfg).await.expect("prepare the stack");
    // One `weir dev` by default; `WEIR_IT_CHAOS_PROCS` more, and with `WEIR_IT_CHAOS_KILL_EVERY`
    // seconds the second one is SIGKILLed and restarted (processes of this test only: the
    // shared stack's services are never touched).
    let spawn = |port: u16| {
        ChildGuard(
            Command::new(weir_bin())
                .arg("dev")
                .env("WEIR__KAFKA__TOPIC_PREFIX", &prefix)
                .env("WEIR__KAFKA__PARTITIONS", "3")
                .env("WEIR__GATEWAY__LISTEN", format!("127.0.0.1:{port}"))
                .env("WEIR__TELEMETRY__LISTEN", "127.0.0.1:0")
                // A killed member holds its partitions until its session times out.
                .env("WEIR__KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000")
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn weir dev"),
        )
    };
    let ports: Vec<u16> = (0..knob("PROCS", 1.0).max(1.0) as usize)
        .map(|_| free_port())
        .collect();
    let mut fleet: Vec<ChildGuard> = ports.iter().map(|p| spawn(*p)).collect();
    let gateways: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let kill_every = knob("KILL_EVERY", 0.0) as u64;

    let stop = CancellationToken::new();
    let running = load::start(
        &cfg,
        LoadConfig {
            gateways,
            seed: 17,
            workflows: knob("WORKFLOWS", 300.0) as usize,
            patches_per_sec: knob("PATCHES", 40.0),
            runs_per_sec: knob("RUNS", 2.0),
            cache_ops_per_sec: knob("CACHE", 10.0),
            poison_per_min: knob("POISON", 20.0),
        },
        stop.clone(),
    )
    .await
    .expect("start the load");
    let secs = knob("SECS", 20.0) as u64;
    for second in 1..=secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if kill_every > 0 && fleet.len() > 1 && second % kill_every == 0 {
            fleet[1].kill();
            eprintln!("killed weir dev #1 at {second} s");
            tokio::time::sleep(Duration::from_secs(3)).await;
            fleet[1] = spawn(ports[1]);
        }
        if std::env::var_os("WEIR_IT_CHAOS_VERBOSE").is_some() {
            eprintln!("{:?}", running.snapshot());
        }
    }
    let snapshot = running.snapshot();
    assert!(snapshot.acknowledged > 0, "{snapshot:?}");
    assert!(
        kill_every > 0 || snapshot.recent_p99_ms.is_some(),
        "patches became visible: {snapshot:?}"
    );
    stop.cancel();
    let ledger = running
        .finish(Duration::from_secs(120))
        .await
        .expect("finish the load");

    // The workload did every kind of thing it promises.
    assert_eq!(ledger.runs_unfinished, 0, "every acknowledged run ended");
    assert!(ledger.runs.len() >= 10, "runs: {}", ledger.runs.len());
    if std::env::var_os("WEIR_IT_CHAOS_VERBOSE").is_some() {
        for kind in ["patch_visible", "next_node_ready"] {
            let mut ms: Vec<f64> = ledger
                .latencies
                .iter()
                .filter(|(_, k, _)| *k == kind)
                .map(|(_, _, d)| d.as_secs_f64() * 1e3)
                .collect();
            ms.sort_by(f64::total_cmp);
            let q = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
            eprintln!(
                "{kind}: n={} p50={:.1} p99={:.1} max={:.1} ms",
                ms.len(),
                q(0.5),
                q(0.99),
                q(1.0)
            );
        }
        eprintln!(
            "acknowledged {} shed {} gave up {}",
            ledger.acknowledged(),
            ledger.shed,
            ledger.gave_up
        );
    }
    assert!(ledger.nodes_failed_on_purpose > 0, "failed first attempts");
    assert!(ledger.patches.iter().any(|p| p.expect == Expect::Rejected));
    assert!(ledger
        .answers
        .iter()
        .any(|a| a.kind == OVER_BUDGET && a.status == 422));
    assert!(!ledger.cache_entries.is_empty() && ledger.cache_lookups > 0);
    assert!(!ledger.poison.is_empty(), "poison sent");
    for kind in ["patch_visible", "next_node_ready"] {
        assert!(
            ledger.latencies.iter().any(|(_, k, _)| *k == kind),
            "{kind} measured"
        );
    }

    let report = check::check(&cfg, &ledger, Duration::from_secs(120))
        .await
        .expect("check");
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    assert!(report.acknowledged > 0, "{text}");
    assert_eq!(report.lost, 0, "{text}");
    assert_eq!(report.duplicated_effects, 0, "{text}");
    assert!(report.invariants.len() >= 15, "{text}");
    assert!(report.clean(), "{text}");

    for mut weir in fleet {
        weir.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    }
}

/// A partition taken over from a process killed before its last auto-commit reports no lag
/// once everything is applied, even when no new record arrives: the new owner stores the
/// Postgres positions for Kafka's commit. (Found by the chaos suite's lag check: the group
/// kept "lag" of records it had applied long ago, so "lag back to zero" never held.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_partition_reports_no_lag_once_applied() {
    use weir_runtime::events::{new_event_id, now_micros, PatchSubmitted};
    let prefix = format!("{}.", random_name("chaos-lag"));
    let cfg = config(&prefix);
    let codec = prepare(&cfg).await.expect("prepare the stack");
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let producer = weir_runtime::kafka::producer(&cfg.kafka).unwrap();
    let def = r#"[{"op":"add","path":"","value":{"nodes":{"a":{"type":"function","config":{}}},"edges":[]}}]"#;
    let patches: Vec<PatchSubmitted> = (0..30)
        .map(|i| PatchSubmitted {
            event_id: new_event_id(),
            occurred_at: now_micros(),
            workspace_id: "ws-lag".into(),
            traceparent: String::new(),
            tracestate: None,
            patch_id: uuid::Uuid::now_v7(),
            workflow_id: format!("wf-{i}"),
            author: "it".into(),
            base_version: None,
            operations_json: def.into(),
            operations_ref: None,
        })
        .collect();
    // The first owner never commits to Kafka by itself: no auto-commit (not even the one
    // librdkafka makes when a rebalance revokes its partitions), and it is SIGKILLed, so it
    // cannot commit on the way out either.
    let mut first = weir_it::spawn_weir_run(
        &prefix,
        "materializer",
        &[
            ("WEIR__KAFKA__CONSUMER__ENABLE_AUTO_COMMIT", "false"),
            ("WEIR__KAFKA__CONSUMER__AUTO_COMMIT_INTERVAL_MS", "3600000"),
            ("WEIR__KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000"),
        ],
    );
    weir_it::produce_in_order(&producer, &codec, &patches)
        .await
        .unwrap();
    let group = cfg.kafka.group(weir_materializer::processor::GROUP);
    let topic = cfg.kafka.topic("weir.patches.v1");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while weir_runtime::consumer::applied_records(&pool, &group, &topic)
        .await
        .unwrap()
        < 30
    {
        assert!(std::time::Instant::now() < deadline, "patches applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    first.kill();
    let lag = |cfg: &weir_runtime::config::Config| {
        let cfg = cfg.clone();
        async move {
            tokio::task::spawn_blocking(move || check::consumer_lag(&cfg))
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(lag(&cfg).await, 30, "nothing committed to Kafka yet");

    let _second = weir_it::spawn_weir_run(&prefix, "materializer", &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let l = lag(&cfg).await;
        if l == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lag stays at {l} although every record is applied"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        weir_runtime::consumer::applied_records(&pool, &group, &topic)
            .await
            .unwrap(),
        30,
        "applied once"
    );
}
