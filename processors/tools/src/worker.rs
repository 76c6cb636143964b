//! The simulated worker of `weir demo` and `weir chaos`: what an external worker does with a
//! NodeReady, a few milliseconds of "work" and then its NodeCompleted through the gateway
//! (`POST /v1/runs/{run_id}/nodes/{node_id}/completions`).
//!
//! Invariant: the answer depends on the NodeReady alone (run, node, attempt, inputs, config),
//! never on time or chance, so a redelivered NodeReady gets the same answer byte for byte and
//! a rerun with the same inputs the same outputs (what the result cache keys on).

use std::hash::{Hash, Hasher};
use std::time::Duration;

use serde_json::{json, Value};
use weir_runtime::events::NodeReady;

/// Which attempts a simulated worker fails on purpose, so the coordinator's retries show.
#[derive(Debug, Clone, Copy)]
pub enum Failures {
    /// Attempts up to the node config's `fail_attempts` (0 when absent): the workflow says
    /// which nodes fail.
    FromConfig,
    /// The first attempt of one node in eight, chosen by hashing (seed, run, node).
    OneInEight {
        /// Seed of the choice.
        seed: u64,
    },
}

/// A simulated worker.
#[derive(Debug, Clone, Copy)]
pub struct Worker {
    /// Reported as the completion's `worker_id`.
    pub id: &'static str,
    /// Time each node takes, also reported as its `duration_ms`.
    pub work: Duration,
    /// Which attempts fail on purpose.
    pub failures: Failures,
    /// Whether a successful output carries the run's inputs (outputs then differ per input,
    /// as real work's would).
    pub echo_run_inputs: bool,
}

impl Worker {
    /// Whether this worker fails `ready` on purpose.
    pub fn fails(&self, ready: &NodeReady) -> bool {
        match self.failures {
            Failures::FromConfig => {
                let config: Value = serde_json::from_str(&ready.config_json).unwrap_or(Value::Null);
                let fail_attempts = config
                    .get("fail_attempts")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                i64::from(ready.attempt) <= fail_attempts
            }
            Failures::OneInEight { seed } => {
                ready.attempt == 1 && one_in_eight(seed, &ready.run_id, &ready.node_id)
            }
        }
    }

    /// The node's "work": sleeps for [`Worker::work`].
    pub async fn work(&self) {
        tokio::time::sleep(self.work).await;
    }

    /// The completion's body: failed with "simulated failure", or succeeded with an output
    /// naming the node and its inputs.
    pub fn completion(&self, ready: &NodeReady, fail: bool) -> Value {
        let duration_ms = u64::try_from(self.work.as_millis()).unwrap_or(u64::MAX);
        if fail {
            return json!({"attempt": ready.attempt, "status": "failed", "error": "simulated failure",
                          "duration_ms": duration_ms, "worker_id": self.id});
        }
        let from: Vec<&str> = ready.inputs.iter().map(|i| i.node_id.as_str()).collect();
        let mut output = json!({"node": ready.node_id, "from": from});
        if self.echo_run_inputs {
            output["run_inputs"] = json!(ready.run_inputs_json);
        }
        json!({"attempt": ready.attempt, "status": "succeeded", "duration_ms": duration_ms,
               "worker_id": self.id, "output": output})
    }
}

/// The gateway path a completion of `ready` is posted to.
pub fn completion_path(ready: &NodeReady) -> String {
    format!(
        "/v1/runs/{}/nodes/{}/completions",
        ready.run_id, ready.node_id
    )
}

/// One in eight (seed, run, node) triples, fixed by them.
fn one_in_eight(seed: u64, run_id: &str, node_id: &str) -> bool {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (seed, run_id, node_id).hash(&mut h);
    h.finish().is_multiple_of(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(attempt: i32, config: &str) -> NodeReady {
        NodeReady {
            event_id: weir_runtime::events::new_event_id(),
            occurred_at: 0,
            workspace_id: "ws".into(),
            traceparent: String::new(),
            tracestate: None,
            run_id: "r1".into(),
            workflow_id: "wf".into(),
            version: 1,
            node_id: "n".into(),
            node_type: "function".into(),
            config_json: config.into(),
            inputs: Vec::new(),
            attempt,
            hop: 0,
            deadline_at: None,
            run_inputs_json: Some("{\"x\":1}".into()),
            run_inputs_ref: None,
        }
    }

    #[test]
    fn answers_are_fixed_by_the_node_ready() {
        let w = Worker {
            id: "w",
            work: Duration::from_millis(5),
            failures: Failures::FromConfig,
            echo_run_inputs: true,
        };
        assert!(w.fails(&ready(1, r#"{"fail_attempts": 1}"#)));
        assert!(!w.fails(&ready(2, r#"{"fail_attempts": 1}"#)));
        assert!(!w.fails(&ready(1, "not json")));
        let ok = w.completion(&ready(2, "{}"), false);
        assert_eq!(ok["output"]["run_inputs"], "{\"x\":1}");
        assert_eq!(ok["duration_ms"], 5);
        assert_eq!(w.completion(&ready(1, "{}"), true)["status"], "failed");
        let chaos = Worker {
            failures: Failures::OneInEight { seed: 3 },
            echo_run_inputs: false,
            ..w
        };
        assert!(chaos.completion(&ready(1, "{}"), false)["output"]
            .get("run_inputs")
            .is_none());
        assert!(!chaos.fails(&ready(2, "{}")), "only first attempts fail");
        assert_eq!(chaos.fails(&ready(1, "{}")), chaos.fails(&ready(1, "{}")));
        assert_eq!(
            completion_path(&ready(1, "{}")),
            "/v1/runs/r1/nodes/n/completions"
        );
    }
}
