//! The state machine against a reference model: random DAGs, random completion orders,
//! duplicates, late and stale deliveries, failures, deadlines, retries and cancellation.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use serde_json::json;
use weir_model::definition::{validate, Limits};

use super::*;

/// What the simulated worker does with one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeed,
    Fail,
    /// Never answers in time: the deadline fires, then a late answer arrives.
    Timeout,
}

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    edges: Vec<(usize, usize)>,
    max_attempts: Vec<u32>,
    deadline: Vec<bool>,
    /// outcomes[node][attempt - 1]
    outcomes: Vec<Vec<Outcome>>,
    /// Entropy for the delivery order and the noise.
    choices: Vec<u16>,
    /// Deliver a cancel after this many steps, if set.
    cancel_at: Option<usize>,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..=7).prop_flat_map(|n| {
        let pairs: Vec<(usize, usize)> = (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .collect();
        let np = pairs.len();
        (
            Just(n),
            Just(pairs),
            proptest::collection::vec(proptest::bool::weighted(0.4), np),
            proptest::collection::vec(1u32..=3, n),
            proptest::collection::vec(proptest::bool::weighted(0.3), n),
            proptest::collection::vec(
                proptest::collection::vec(
                    prop_oneof![
                        6 => Just(Outcome::Succeed),
                        2 => Just(Outcome::Fail),
                        1 => Just(Outcome::Timeout)
                    ],
                    3,
                ),
                n,
            ),
            proptest::collection::vec(any::<u16>(), 400),
            proptest::option::weighted(0.15, 0usize..40),
        )
            .prop_map(
                |(n, pairs, keep, max_attempts, deadline, mut outcomes, choices, cancel_at)| {
                    for (i, o) in outcomes.iter_mut().enumerate() {
                        for x in o.iter_mut() {
                            if *x == Outcome::Timeout && !deadline[i] {
                                *x = Outcome::Fail;
                            }
                        }
                    }
                    Case {
                        n,
                        edges: pairs
                            .into_iter()
                            .zip(keep)
                            .filter_map(|(p, k)| k.then_some(p))
                            .collect(),
                        max_attempts,
                        deadline,
                        outcomes,
                        choices,
                        cancel_at,
                    }
                },
            )
    })
}

fn definition(c: &Case) -> Plan {
    let mut nodes = serde_json::Map::new();
    for i in 0..c.n {
        let mut node = json!({"type": "function", "config": {"i": i},
                              "retry": {"max_attempts": c.max_attempts[i], "backoff_ms": 100}});
        if c.deadline[i] {
            node["deadline_ms"] = json!(1000);
        }
        nodes.insert(format!("n{i}"), node);
    }
    let edges: Vec<_> = c
        .edges
        .iter()
        .map(|(a, b)| json!({"from": format!("n{a}"), "to": format!("n{b}")}))
        .collect();
    let doc = json!({"nodes": nodes, "edges": edges});
    Plan::new(&validate(&doc, &Limits::default()).expect("generated DAG is valid"))
}

/// The reference model: the end state a run must reach whatever the delivery order.
struct Expected {
    /// Some(k): the node ends succeeded at attempt k. None: it is not (never reached, or it
    /// exhausts its attempts).
    succeeds_at: Vec<Option<usize>>,
    /// Reached nodes that exhaust their attempts.
    exhausted: BTreeSet<usize>,
}

fn reference(c: &Case) -> Expected {
    let mut succeeds_at = vec![None; c.n];
    let mut exhausted = BTreeSet::new();
    // Node indices are a topological order (edges go from lower to higher).
    for j in 0..c.n {
        let reached = c
            .edges
            .iter()
            .filter(|(_, b)| *b == j)
            .all(|(a, _)| succeeds_at[*a].is_some());
        if !reached {
            continue;
        }
        let max = c.max_attempts[j] as usize;
        match c.outcomes[j][..max]
            .iter()
            .position(|o| *o == Outcome::Succeed)
        {
            Some(k) => succeeds_at[j] = Some(k + 1),
            None => {
                exhausted.insert(j);
            }
        }
    }
    Expected {
        succeeds_at,
        exhausted,
    }
}

struct Driver<'a> {
    plan: &'a Plan,
    run: RunRt,
    choices: std::iter::Cycle<std::slice::Iter<'a, u16>>,
    /// Dispatched (plan index, attempt) awaiting an answer.
    pending: Vec<(usize, i32)>,
    /// Retry timers set: (plan index, attempt to dispatch).
    timers: Vec<(usize, i32)>,
    /// Inputs already applied or known stale, to replay as noise.
    history: Vec<Input>,
    dispatched: BTreeMap<usize, Vec<i32>>,
    ended: Option<Effect>,
    now: i64,
}

impl Driver<'_> {
    fn pick(&mut self, n: usize) -> usize {
        usize::from(*self.choices.next().unwrap_or(&0)) % n.max(1)
    }

    fn feed(&mut self, input: Input) -> Vec<Effect> {
        let mut effects = Vec::new();
        let mut rng = 7u64;
        let mut jitter = |n: u64| {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
            if n == 0 {
                0
            } else {
                (rng >> 33) % (n + 1)
            }
        };
        let mut env = Env {
            now_ms: self.now,
            max_backoff_ms: DEFAULT_MAX_BACKOFF_MS,
            jitter: &mut jitter,
        };
        step(self.plan, &mut self.run, input, &mut env, &mut effects);
        self.now += 10;
        for e in &effects {
            match e {
                Effect::Dispatch { node, attempt, .. } => {
                    assert!(self.ended.is_none(), "dispatch after the run ended");
                    self.pending.push((*node, *attempt));
                    self.dispatched.entry(*node).or_default().push(*attempt);
                }
                Effect::Retry {
                    node,
                    failed_attempt,
                    next_attempt,
                    retry_at_ms,
                    ..
                } => {
                    assert_eq!(*next_attempt, failed_attempt + 1);
                    // backoff 100 ms doubled per attempt, jitter in the upper half.
                    let full = 100i64 << (failed_attempt - 1);
                    let delay = retry_at_ms - (self.now - 10);
                    assert!(
                        (full / 2..=full).contains(&delay),
                        "delay {delay} outside [{}, {full}]",
                        full / 2
                    );
                    self.timers.push((*node, *next_attempt));
                }
                Effect::Completed | Effect::Failed { .. } | Effect::Cancelled { .. } => {
                    assert!(self.ended.is_none(), "the run ended twice");
                    self.ended = Some(e.clone());
                }
                _ => {}
            }
        }
        effects
    }

    /// Feeds an input that must change nothing.
    fn feed_noise(&mut self, input: Input) {
        let before = self.run.clone();
        let effects = self.feed(input.clone());
        assert!(
            matches!(effects.as_slice(), [Effect::Ignored(_)]),
            "{input:?} gave {effects:?}"
        );
        assert_eq!(before, self.run, "ignored input {input:?} changed the run");
    }
}

fn completed(plan: &Plan, node: usize, attempt: i32, ok: bool) -> Input {
    Input::Completed {
        node_id: plan.ids[node].clone(),
        attempt,
        succeeded: ok,
        output_json: ok.then(|| format!("{{\"n\":{node},\"a\":{attempt}}}")),
        output_ref: None,
        error: (!ok).then(|| "boom".to_string()),
        from_cache: false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn runs_end_as_the_reference_model_predicts(c in case()) {
        let plan = definition(&c);
        let idx: Vec<usize> = (0..c.n).map(|i| plan.index(&format!("n{i}")).unwrap()).collect();
        let mut d = Driver {
            plan: &plan,
            run: RunRt::new(&plan),
            choices: c.choices.iter().cycle(),
            pending: Vec::new(),
            timers: Vec::new(),
            history: Vec::new(),
            dispatched: BTreeMap::new(),
            ended: None,
            now: 1_000_000,
        };
        let effects = d.feed(Input::Start);
        prop_assert_eq!(&effects[0], &Effect::Started);
        d.feed_noise(Input::Start);
        let mut steps = 0usize;
        let mut cancelled_before_end = false;
        while !d.pending.is_empty() || !d.timers.is_empty() {
            steps += 1;
            prop_assert!(steps < 10_000, "no progress");
            if Some(steps) == c.cancel_at {
                let was_running = d.run.phase == RunPhase::Running;
                let effects = d.feed(Input::Cancel { reason: Some("test".into()) });
                if was_running {
                    prop_assert_eq!(&effects, &vec![Effect::Cancelled { reason: Some("test".into()) }]);
                    cancelled_before_end = true;
                } else {
                    prop_assert_eq!(&effects, &vec![Effect::Ignored(Ignored::RunFinished)]);
                }
            }
            let action = d.pick(10);
            if action == 8 && !d.history.is_empty() {
                let h = d.pick(d.history.len());
                let input = d.history[h].clone();
                d.feed_noise(input);
                continue;
            }
            if action == 9 {
                // Garbage: an unknown node, a future attempt, a timer for a future attempt.
                let node = d.pick(plan.len());
                let attempt = d.run.nodes[node].attempt + 1 + d.pick(3) as i32;
                let input = match d.pick(3) {
                    0 => Input::Completed { node_id: "nope".into(), attempt: 1, succeeded: true,
                        output_json: None, output_ref: None, error: None, from_cache: false },
                    1 => completed(&plan, node, attempt, true),
                    _ => Input::DeadlineDue { node_id: plan.ids[node].clone(), attempt },
                };
                d.feed_noise(input);
                continue;
            }
            let use_timer = (action == 7 || d.pending.is_empty()) && !d.timers.is_empty();
            if use_timer {
                let t = d.pick(d.timers.len());
                let (node, attempt) = d.timers.swap_remove(t);
                let input = Input::RetryDue { node_id: plan.ids[node].clone(), attempt };
                if d.run.phase == RunPhase::Running {
                    d.feed(input.clone());
                } else {
                    d.feed_noise(input.clone());
                }
                d.history.push(input);
                continue;
            }
            let p = d.pick(d.pending.len());
            let (node, attempt) = d.pending.swap_remove(p);
            let case_node = idx.iter().position(|&x| x == node).unwrap();
            let outcome = c.outcomes[case_node][(attempt - 1) as usize];
            let running = d.run.phase == RunPhase::Running;
            match outcome {
                Outcome::Succeed | Outcome::Fail => {
                    let input = completed(&plan, node, attempt, outcome == Outcome::Succeed);
                    if running { d.feed(input.clone()); } else { d.feed_noise(input.clone()); }
                    d.history.push(input);
                }
                Outcome::Timeout => {
                    let input = Input::DeadlineDue { node_id: plan.ids[node].clone(), attempt };
                    if running { d.feed(input.clone()); } else { d.feed_noise(input.clone()); }
                    d.history.push(input);
                    // The worker answers after all: too late, whatever it says.
                    let late = completed(&plan, node, attempt, true);
                    d.feed_noise(late.clone());
                    d.history.push(late);
                }
            }
        }

        // Each node dispatched once per attempt, attempts 1, 2, ... without gaps.
        for (node, attempts) in &d.dispatched {
            let expected: Vec<i32> = (1..=attempts.len() as i32).collect();
            prop_assert_eq!(attempts, &expected, "node {}", plan.ids[*node]);
            prop_assert!(attempts.len() as i32 <= plan.max_attempts[*node]);
        }
        let expected = reference(&c);
        if cancelled_before_end {
            prop_assert_eq!(d.run.phase, RunPhase::Cancelled);
            prop_assert!(d.run.nodes.iter().all(|n| !matches!(n.phase, Phase::Running | Phase::RetryWait)));
        } else if expected.exhausted.is_empty() {
            prop_assert_eq!(d.run.phase, RunPhase::Completed);
            prop_assert_eq!(d.ended.clone(), Some(Effect::Completed));
            for (i, &at) in idx.iter().enumerate() {
                let n = &d.run.nodes[at];
                let k = expected.succeeds_at[i].unwrap() as i32;
                prop_assert_eq!(n.phase, Phase::Succeeded);
                prop_assert_eq!(n.attempt, k);
                prop_assert_eq!(d.dispatched[&at].len() as i32, k);
                prop_assert_eq!(n.output_json.clone(), Some(format!("{{\"n\":{at},\"a\":{k}}}")));
            }
        } else {
            prop_assert_eq!(d.run.phase, RunPhase::Failed);
            let failed = d.run.failed_node.unwrap();
            let case_failed = idx.iter().position(|&x| x == failed).unwrap();
            prop_assert!(expected.exhausted.contains(&case_failed));
            prop_assert_eq!(d.dispatched[&failed].len() as i32, plan.max_attempts[failed]);
            prop_assert_eq!(d.run.nodes[failed].phase, Phase::Failed);
            // Nodes that succeed in the model and were answered are never wrongly failed.
            for (i, &at) in idx.iter().enumerate() {
                let n = &d.run.nodes[at];
                if n.phase == Phase::Succeeded {
                    prop_assert_eq!(Some(n.attempt as usize), expected.succeeds_at[i]);
                }
            }
        }
    }
}

#[test]
fn max_hops_fails_the_run_before_dispatching_too_deep() {
    let doc = json!({
        "nodes": {"a": {"type": "pure", "config": {}}, "b": {"type": "pure", "config": {}},
                  "c": {"type": "pure", "config": {}}},
        "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}],
        "settings": {"max_hops": 2}
    });
    let plan = Plan::new(&validate(&doc, &Limits::default()).unwrap());
    let mut run = RunRt::new(&plan);
    let mut j = |_| 0;
    let mut env = Env {
        now_ms: 0,
        max_backoff_ms: 1000,
        jitter: &mut j,
    };
    let mut fx = Vec::new();
    step(&plan, &mut run, Input::Start, &mut env, &mut fx);
    step(
        &plan,
        &mut run,
        completed(&plan, 0, 1, true),
        &mut env,
        &mut fx,
    );
    assert!(fx.contains(&Effect::Dispatch {
        node: 1,
        attempt: 1,
        hop: 2,
        deadline_at_ms: None,
        after: Some(0)
    }));
    fx.clear();
    step(
        &plan,
        &mut run,
        completed(&plan, 1, 1, true),
        &mut env,
        &mut fx,
    );
    assert_eq!(run.phase, RunPhase::Failed);
    assert_eq!(run.failed_node, Some(2));
    assert!(run.reason.as_deref().unwrap().contains("max_hops = 2"));
    assert!(!fx.iter().any(|e| matches!(e, Effect::Dispatch { .. })));
    assert_eq!(run.nodes[2].phase, Phase::Waiting);
}

#[test]
fn retry_delay_doubles_and_is_capped() {
    let mut max = |n| n;
    let mut env = Env {
        now_ms: 0,
        max_backoff_ms: 1_000,
        jitter: &mut max,
    };
    assert_eq!(retry_delay_ms(100, 1, &mut env), 100);
    assert_eq!(retry_delay_ms(100, 3, &mut env), 400);
    assert_eq!(retry_delay_ms(100, 30, &mut env), 1_000);
    let mut min = |_| 0;
    env.jitter = &mut min;
    assert_eq!(retry_delay_ms(100, 3, &mut env), 200);
    assert_eq!(retry_delay_ms(0, 3, &mut env), 0);
}
