//! The simulated users of `weir bench e2e`: clients that POST patches and start runs through
//! the gateway on an open-loop schedule, workers that answer every NodeReady of their
//! workspace by POSTing its completion, and one Kafka reader of the output topics
//! (`weir.workflows.v1`, `weir.node-ready.v1`, `weir.run-events.v1`) that timestamps each
//! record when it arrives and pairs it with the request that caused it.
//!
//! Invariants:
//! - a request's latency runs from its intended send time: the schedule's slot for patches and
//!   run starts, the arrival of the NodeReady for a completion (the worker does no work);
//! - a request is counted in a phase when its intended time is inside the phase's window;
//!   throughputs count outputs that arrived inside the window;
//! - a hop (completion → next NodeReady) is measured from the latest completion among the
//!   ready node's predecessors (`NodeReady.inputs`): the one that made it ready;
//! - in-flight requests are bounded (a semaphore); waiting for a permit delays the send and
//!   shows as issue lag, never as a lost request;
//! - only records of the benchmark's own workspace count.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use weir_runtime::codec::Codec;
use weir_runtime::config::Config;
use weir_runtime::events::{NodeReady, RunEvent, TopicEvent, WorkflowEvent};

use super::stats::{Correlator, Latencies, Pair, Schedule, Window};
use crate::worker::{completion_path, Failures, Worker};

/// What the kinds of request did in a phase (intended time inside the window).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Counts {
    /// Sent.
    pub issued: u64,
    /// Answered 202.
    pub accepted: u64,
    /// Answered otherwise, or not answered in time (timeouts included).
    pub errors: u64,
    /// Not answered within the request timeout.
    pub timeouts: u64,
}

/// Kinds of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// POST /v1/workflows/{id}/patches.
    Patch,
    /// POST /v1/runs.
    RunStart,
    /// POST /v1/runs/{id}/nodes/{node}/completions.
    Completion,
}

/// What one phase measured.
#[derive(Debug, Default)]
pub struct Phase {
    /// The measured window (`None` outside phases: setup).
    pub window: Option<Window>,
    /// Patch POST → its WorkflowMaterialized read from Kafka.
    pub patch_visible: Latencies,
    /// Completion POST → the next NodeReady read from Kafka.
    pub hop: Latencies,
    /// Run start POST → the first NodeReady.
    pub start_ready: Latencies,
    /// Run start POST → RunCompleted.
    pub run_time: Latencies,
    /// How late requests were sent after their intended time.
    pub issue_lag: Latencies,
    /// Patch or completion POST → its 202 (the gateway, with the broker's acknowledgement).
    pub answered: Latencies,
    /// Patch or completion POST → the output record's Kafka timestamp (when the relay
    /// produced it; millisecond resolution).
    pub published: Latencies,
    /// Patches.
    pub patches: Counts,
    /// Run starts.
    pub run_starts: Counts,
    /// Completions.
    pub completions: Counts,
    /// Patches of this workspace made visible (read) inside the window.
    pub visible_in_window: u64,
    /// NodeReady of this workspace read inside the window.
    pub ready_in_window: u64,
    /// Runs completed (read) inside the window.
    pub runs_done_in_window: u64,
    /// Patches rejected by the materializer, runs failed (neither should happen).
    pub rejected: u64,
    /// Errors by class (HTTP status, `timeout`, `transport`).
    pub error_classes: BTreeMap<String, u64>,
}

impl Phase {
    fn counts(&mut self, kind: Kind) -> &mut Counts {
        match kind {
            Kind::Patch => &mut self.patches,
            Kind::RunStart => &mut self.run_starts,
            Kind::Completion => &mut self.completions,
        }
    }

    fn inside(&self, t: Instant) -> bool {
        self.window.is_some_and(|w| w.contains(t))
    }

    /// Records a patch paired with its WorkflowMaterialized (when meant inside the window).
    fn patch_pair(&mut self, pair: Pair<Option<Instant>>) {
        if !self.inside(pair.intended) {
            return;
        }
        self.patch_visible.add(pair.latency);
        if let Some(p) = pair.meta {
            self.published
                .add(p.saturating_duration_since(pair.intended));
        }
    }
}

#[derive(Debug, Default)]
struct RunTrack {
    /// Intended time of the run's start.
    started: Option<Instant>,
    /// Intended time of each node's completion.
    completed: HashMap<String, Instant>,
}

#[derive(Default)]
struct State {
    /// Patch ids, paired with the WorkflowMaterialized that names them (and when the relay
    /// produced it).
    patches: Correlator<Uuid, Option<Instant>>,
    starts: Correlator<String>,
    runs: HashMap<String, RunTrack>,
    phase: Phase,
}

/// The clients, workers and reader, shared by their tasks.
pub struct Shared {
    http: reqwest::Client,
    gateways: Vec<String>,
    auth: String,
    workspace: String,
    next_gateway: AtomicUsize,
    inflight: Arc<Semaphore>,
    max_inflight: usize,
    worker: Worker,
    /// One reading of both clocks, to place Kafka's wall-clock timestamps on `Instant`s.
    clock: (Instant, SystemTime),
    state: Mutex<State>,
}

/// What a successful POST answered.
type Answer = Result<bytes::Bytes, String>;

impl Shared {
    /// Clients of `gateways` with `key`, in `workspace`; at most `max_inflight` requests
    /// outstanding, each given `timeout`.
    pub fn new(
        gateways: Vec<String>,
        key: &str,
        workspace: String,
        max_inflight: usize,
        timeout: Duration,
    ) -> anyhow::Result<Arc<Self>> {
        anyhow::ensure!(!gateways.is_empty(), "no gateway");
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(max_inflight)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()?;
        Ok(Arc::new(Self {
            http,
            gateways,
            auth: format!("Bearer {key}"),
            workspace,
            next_gateway: AtomicUsize::new(0),
            inflight: Arc::new(Semaphore::new(max_inflight.max(1))),
            max_inflight: max_inflight.max(1),
            worker: Worker {
                id: "weir-bench-e2e",
                work: Duration::ZERO,
                failures: Failures::FromConfig,
                echo_run_inputs: false,
            },
            clock: (Instant::now(), SystemTime::now()),
            state: Mutex::new(State::default()),
        }))
    }

    /// A Kafka timestamp (ms since the epoch, this machine's clock) as an `Instant`.
    fn instant_of(&self, ms: Option<i64>) -> Option<Instant> {
        let ms = u64::try_from(ms?).ok()?;
        let wall = UNIX_EPOCH + Duration::from_millis(ms);
        let (i0, w0) = self.clock;
        match wall.duration_since(w0) {
            Ok(after) => i0.checked_add(after),
            Err(e) => i0.checked_sub(e.duration()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a phase measuring `window`; pairs still open from before are forgotten.
    pub fn begin_phase(&self, window: Window) {
        let mut st = self.state();
        st.patches.clear();
        st.starts.clear();
        st.phase = Phase {
            window: Some(window),
            ..Phase::default()
        };
    }

    /// Ends the phase: what it measured, and how many of its requests never got their output
    /// (patches not visible, runs not completed).
    pub fn end_phase(&self) -> (Phase, u64) {
        let mut st = self.state();
        let waiting = self.waiting_locked(&st);
        let phase = std::mem::take(&mut st.phase);
        (phase, waiting)
    }

    fn waiting_locked(&self, st: &State) -> u64 {
        let Some(w) = st.phase.window else {
            return 0;
        };
        let runs = st
            .runs
            .values()
            .filter(|r| r.started.is_some_and(|t| w.contains(t)))
            .count() as u64;
        st.patches.waiting(&w) + runs
    }

    /// Requests of the phase still waiting for their output, plus requests in flight.
    pub fn outstanding(&self) -> u64 {
        let waiting = self.waiting_locked(&self.state());
        waiting + (self.max_inflight - self.inflight.available_permits()) as u64
    }

    /// POSTs `body` to `path` on the next gateway; the answer's body on 202.
    async fn post(&self, path: &str, body: Vec<u8>) -> Answer {
        let i = self.next_gateway.fetch_add(1, Ordering::Relaxed) % self.gateways.len();
        let res = self
            .http
            .post(format!("{}{path}", self.gateways[i]))
            .header("authorization", &self.auth)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let classify = |e: reqwest::Error| {
            if e.is_timeout() {
                "timeout".to_string()
            } else {
                "transport".to_string()
            }
        };
        match res {
            Ok(r) if r.status().as_u16() == 202 => r.bytes().await.map_err(classify),
            Ok(r) => Err(r.status().as_u16().to_string()),
            Err(e) => Err(classify(e)),
        }
    }

    /// Records the answer of a `kind` request meant for `intended`.
    fn answered(&self, kind: Kind, intended: Instant, answer: &Answer) {
        let mut st = self.state();
        if !st.phase.inside(intended) {
            return;
        }
        if answer.is_ok() && kind != Kind::RunStart {
            st.phase
                .answered
                .add(Instant::now().saturating_duration_since(intended));
        }
        let c = st.phase.counts(kind);
        c.issued += 1;
        match answer {
            Ok(_) => c.accepted += 1,
            Err(class) => {
                c.errors += 1;
                if class == "timeout" {
                    c.timeouts += 1;
                }
                *st.phase.error_classes.entry(class.clone()).or_default() += 1;
            }
        }
    }

    /// Takes an in-flight permit for a request meant for `intended` and records how late it
    /// goes out.
    async fn permit(&self, intended: Instant) -> tokio::sync::OwnedSemaphorePermit {
        let permit = loop {
            // The semaphore is never closed; a closed one would only stop the bounding.
            if let Ok(p) = self.inflight.clone().acquire_owned().await {
                break p;
            }
        };
        let lag = Instant::now().saturating_duration_since(intended);
        let mut st = self.state();
        if st.phase.inside(intended) {
            st.phase.issue_lag.add(lag);
        }
        permit
    }

    /// POSTs a patch of `workflow` meant for `intended`; pairs its id with the output.
    pub async fn patch(self: Arc<Self>, workflow: String, n: u64, intended: Instant) {
        let body = format!(r#"[{{"op":"replace","path":"/nodes/a/config/n","value":{n}}}]"#);
        let answer = self
            .post(
                &format!("/v1/workflows/{workflow}/patches"),
                body.into_bytes(),
            )
            .await;
        self.answered(Kind::Patch, intended, &answer);
        if let Some(id) = answer.ok().and_then(|b| id_of(&b, "patch_id")) {
            if let Ok(id) = Uuid::parse_str(&id) {
                let mut st = self.state();
                if let Some(pair) = st.patches.sent(id, intended) {
                    st.phase.patch_pair(pair);
                }
            }
        }
    }

    /// PUTs a workflow (setup, not measured); false unless answered 202.
    pub async fn put_workflow(&self, workflow: &str, definition: &Value) -> bool {
        let i = self.next_gateway.fetch_add(1, Ordering::Relaxed) % self.gateways.len();
        self.http
            .put(format!("{}/v1/workflows/{workflow}", self.gateways[i]))
            .header("authorization", &self.auth)
            .header("content-type", "application/json")
            .body(definition.to_string())
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 202)
    }

    /// Whether `workflow` is materialized (GET answers 200).
    pub async fn visible(&self, workflow: &str) -> bool {
        self.http
            .get(format!("{}/v1/workflows/{workflow}", self.gateways[0]))
            .header("authorization", &self.auth)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// Starts a run of `workflow` meant for `intended` (inputs unique per run, so no node is
    /// answered from the result cache).
    pub async fn start_run(self: Arc<Self>, workflow: String, n: u64, intended: Instant) {
        let body = serde_json::json!({"workflow_id": workflow, "inputs": {"n": n}});
        let answer = self.post("/v1/runs", body.to_string().into_bytes()).await;
        self.answered(Kind::RunStart, intended, &answer);
        if let Some(run_id) = answer.ok().and_then(|b| id_of(&b, "run_id")) {
            let mut st = self.state();
            st.runs.entry(run_id.clone()).or_default().started = Some(intended);
            if let Some(pair) = st.starts.sent(run_id, intended) {
                if st.phase.inside(pair.intended) {
                    st.phase.start_ready.add(pair.latency);
                }
            }
        }
    }

    /// The worker: answers `ready` (read at `at`) with its completion at once.
    async fn complete(self: Arc<Self>, ready: NodeReady, at: Instant) {
        let _permit = self.permit(at).await;
        let fail = self.worker.fails(&ready);
        let body = self.worker.completion(&ready, fail);
        let answer = self
            .post(&completion_path(&ready), body.to_string().into_bytes())
            .await;
        self.answered(Kind::Completion, at, &answer);
    }

    /// Handles one output record read at `at`; a NodeReady gets its worker spawned.
    fn on_node_ready(self: &Arc<Self>, ready: NodeReady, at: Instant, published: Option<Instant>) {
        if ready.workspace_id != self.workspace {
            return;
        }
        {
            let mut st = self.state();
            let st = &mut *st;
            if st.phase.inside(at) {
                st.phase.ready_in_window += 1;
            }
            if ready.attempt == 1 {
                if ready.inputs.is_empty() {
                    if let Some(pair) = st.starts.seen(ready.run_id.clone(), at, ()) {
                        if st.phase.inside(pair.intended) {
                            st.phase.start_ready.add(pair.latency);
                        }
                    }
                } else if let Some(run) = st.runs.get(&ready.run_id) {
                    let cause = ready
                        .inputs
                        .iter()
                        .filter_map(|i| run.completed.get(&i.node_id))
                        .max()
                        .copied();
                    if let Some(t) = cause {
                        if st.phase.inside(t) {
                            st.phase.hop.add(at.saturating_duration_since(t));
                            if let Some(p) = published {
                                st.phase.published.add(p.saturating_duration_since(t));
                            }
                        }
                    }
                }
            }
            // The completion is meant to leave now: its time is recorded before it is sent,
            // so the NodeReady it causes always finds it.
            st.runs
                .entry(ready.run_id.clone())
                .or_default()
                .completed
                .insert(ready.node_id.clone(), at);
        }
        tokio::spawn(self.clone().complete(ready, at));
    }

    fn on_run_event(&self, event: RunEvent, at: Instant) {
        let (ws, run_id, ok) = match &event {
            RunEvent::RunCompleted(e) => (&e.workspace_id, &e.run_id, true),
            RunEvent::RunFailed(e) => (&e.workspace_id, &e.run_id, false),
            RunEvent::RunCancelled(e) => (&e.workspace_id, &e.run_id, false),
            _ => return,
        };
        if *ws != self.workspace {
            return;
        }
        let mut st = self.state();
        let st = &mut *st;
        let Some(run) = st.runs.remove(run_id) else {
            return;
        };
        if let Some(t) = run.started.filter(|t| st.phase.inside(*t)) {
            if ok {
                st.phase.run_time.add(at.saturating_duration_since(t));
            } else {
                st.phase.rejected += 1;
            }
        }
        if ok && st.phase.inside(at) {
            st.phase.runs_done_in_window += 1;
        }
    }

    fn on_workflow_event(&self, event: WorkflowEvent, at: Instant, published: Option<Instant>) {
        let mut st = self.state();
        let st = &mut *st;
        match event {
            WorkflowEvent::WorkflowMaterialized(m) if m.workspace_id == self.workspace => {
                for id in m.patch_ids {
                    if st.phase.inside(at) {
                        st.phase.visible_in_window += 1;
                    }
                    if let Some(pair) = st.patches.seen(id, at, published) {
                        st.phase.patch_pair(pair);
                    }
                }
            }
            WorkflowEvent::PatchRejected(r) if r.workspace_id == self.workspace => {
                // Paired so it does not wait forever; counted, not timed.
                if let Some(pair) = st.patches.seen(r.patch_id, at, published) {
                    if st.phase.inside(pair.intended) {
                        st.phase.rejected += 1;
                    }
                }
            }
            _ => {}
        }
    }
}

/// The string `field` of a JSON answer.
fn id_of(body: &[u8], field: &str) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get(field)?.as_str().map(str::to_string)
}

/// Runs `offer(i, intended)` for each slot of `schedule` at its time, each in its own task
/// holding an in-flight permit; returns the slots issued (all of them unless `stop`).
///
/// The pacing runs on a thread of its own with the OS's sleep (tens of microseconds late),
/// not on the runtime's timer: that one fires on whole-millisecond ticks, rounded up, which
/// sent every request 1–2 ms after its slot at a low rate and added that to every latency.
pub async fn open_loop<F, Fut>(
    shared: Arc<Shared>,
    schedule: Schedule,
    stop: CancellationToken,
    offer: F,
) -> u64
where
    F: Fn(u64, Instant) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handle = tokio::runtime::Handle::current();
    let pacer = tokio::task::spawn_blocking(move || {
        let total = schedule.total();
        let mut i = 0;
        while i < total {
            if stop.is_cancelled() {
                return i;
            }
            let now = Instant::now();
            let at = schedule.at(i);
            if at > now {
                // Short enough to see `stop` soon.
                std::thread::sleep((at - now).min(PACER_NAP));
                continue;
            }
            let due = schedule.due(now).max(i + 1);
            while i < due {
                let intended = schedule.at(i);
                // A blocking-pool thread may block on the runtime's futures.
                let permit = handle.block_on(shared.permit(intended));
                let fut = offer(i, intended);
                handle.spawn(async move {
                    fut.await;
                    drop(permit);
                });
                i += 1;
            }
        }
        i
    });
    match pacer.await {
        Ok(issued) => issued,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Only a runtime shutting down cancels it; nothing more is issued then.
        Err(_) => 0,
    }
}

/// Longest sleep of the pacer between looks at its stop token.
const PACER_NAP: Duration = Duration::from_millis(20);

/// The output topics' current ends: the reader starts there, so nothing older counts.
pub async fn output_ends(cfg: &Arc<Config>) -> anyhow::Result<TopicPartitionList> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || {
        let probe: rdkafka::consumer::BaseConsumer =
            weir_runtime::kafka::consumer_config(&cfg.kafka, "weir-bench-e2e-probe", 0).create()?;
        let mut tpl = TopicPartitionList::new();
        for topic in [
            cfg.kafka.topic(NodeReady::TOPIC),
            cfg.kafka.topic(RunEvent::TOPIC),
            cfg.kafka.topic(WorkflowEvent::TOPIC),
        ] {
            for (p, high) in crate::common::high_watermarks(&probe, &topic)? {
                tpl.add_partition_offset(&topic, p, Offset::Offset(high))?;
            }
        }
        anyhow::Ok(tpl)
    })
    .await?
}

/// Reads the output topics from `starts` until `stop`, timestamping each record on arrival.
pub async fn read_outputs(
    shared: Arc<Shared>,
    cfg: Arc<Config>,
    starts: TopicPartitionList,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let group = format!("weir-bench-e2e-reader-{}", Uuid::now_v7().simple());
    // Assigned, not subscribed (no group to join); fetches return as soon as one record is
    // there, so the reader adds no wait of its own to the figures.
    let consumer: StreamConsumer = weir_runtime::kafka::consumer_config(&cfg.kafka, &group, 0)
        .set("enable.auto.commit", "false")
        .set("fetch.min.bytes", "1")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    consumer.assign(&starts)?;
    let codec = Arc::new(Codec::new(&cfg.schema_registry, &cfg.kafka)?);
    let node_ready: Arc<str> = cfg.kafka.topic(NodeReady::TOPIC).into();
    let run_events: Arc<str> = cfg.kafka.topic(RunEvent::TOPIC).into();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = consumer.recv() => match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "bench reader");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let at = Instant::now();
        // Decoding happens off this loop, so a record's arrival time is never held up by the
        // decoding of the records before it.
        let msg = msg.detach();
        let published = shared.instant_of(msg.timestamp().to_millis());
        let (shared, codec) = (shared.clone(), codec.clone());
        let (node_ready, run_events) = (node_ready.clone(), run_events.clone());
        tokio::spawn(async move {
            let Some(payload) = msg.payload() else {
                return;
            };
            if msg.topic() == &*node_ready {
                if let Ok(ready) = codec.decode::<NodeReady>(payload).await {
                    shared.on_node_ready(ready, at, published);
                }
            } else if msg.topic() == &*run_events {
                if let Ok(event) = codec.decode::<RunEvent>(payload).await {
                    shared.on_run_event(event, at);
                }
            } else if let Ok(event) = codec.decode::<WorkflowEvent>(payload).await {
                shared.on_workflow_event(event, at, published);
            }
        });
    }
}
