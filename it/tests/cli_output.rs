//! The `weir` command's output when its reader goes away early (`weir keys list | head`): the
//! command ends quietly, exit 0 and nothing on stderr, instead of panicking on the closed pipe.

use std::process::{Command, Stdio};

use weir_gateway::create_key;
use weir_it::{config, random_name, weir_bin};
use weir_model::Permission;

/// Runs `weir args` with stdout a pipe whose read end is already closed, so its first write
/// fails with EPIPE; returns the exit code and stderr.
fn into_closed_pipe(prefix: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(weir_bin())
        .args(args)
        .env("WEIR__KAFKA__TOPIC_PREFIX", prefix)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn listings_into_a_closed_pipe_end_quietly() {
    let prefix = random_name("it-cli");
    let cfg = config(&prefix);
    let pool = weir_runtime::db::pool(&cfg.postgres).unwrap();
    let ws = random_name("ws");
    for _ in 0..3 {
        create_key(&pool, &ws, Permission::Read).await.unwrap();
    }
    for args in [
        &["keys", "list", "--workspace", &ws][..],
        &["keys", "list", "--workspace", &ws, "--json"][..],
        &["config"][..],
        &["doctor"][..],
        &["schemas", "check"][..],
    ] {
        let (code, err) = into_closed_pipe(&prefix, args);
        assert_eq!(code, Some(0), "weir {args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "weir {args:?} says nothing about the closed pipe: {err}"
        );
    }
    // The same listing into an open pipe still prints every key.
    let out = Command::new(weir_bin())
        .args(["keys", "list", "--workspace", &ws, "--json"])
        .env("WEIR__KAFKA__TOPIC_PREFIX", &prefix)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
}
