//! The HTTP gateway in the test's process, on fresh topics, with the processors a test asks
//! for next to it: [`Gateway::start`] (or [`Setup::new`] then [`Setup::serve`] when a test
//! wires a processor of its own first), `key` for an API key of a workspace and `call` for a
//! request whose answer is read whole into an [`Answer`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use weir_gateway::{create_key, Sources};
use weir_model::Permission;
use weir_runtime::app::Services;
use weir_runtime::cas::Cas;
use weir_runtime::codec::Codec;
use weir_runtime::config::Config;
use weir_runtime::events::TopicEvent;

use crate::{config, prepare, random_name};

/// What runs next to the gateway, and how the test's client talks to it.
#[derive(Default)]
pub struct Options {
    /// The gateway's read models.
    pub sources: Sources,
    /// Run the materializer in this process.
    pub materializer: bool,
    /// Run the coordinator in this process.
    pub coordinator: bool,
    /// Serve the telemetry port (`/metrics`, health) on a local address, see
    /// [`Gateway::metrics`].
    pub telemetry: bool,
    /// The client's pool idle timeout (reqwest's default when `None`).
    pub pool_idle_timeout: Option<Duration>,
    /// Every 4xx/5xx answer on a path starting with this must be a problem body
    /// (`application/problem+json` with the answer's `status`, a `title` and a `detail`);
    /// `None` checks nothing.
    pub problems_under: Option<&'static str>,
}

/// A test's configuration, prepared topics and the handles the processors share, before
/// anything runs.
pub struct Setup {
    /// The configuration, after the test's changes.
    pub cfg: Arc<Config>,
    /// Avro through the registry, for the test's topics.
    pub codec: Arc<Codec>,
    /// Postgres, for the test's own queries and keys.
    pub pool: sqlx::PgPool,
    /// The configured CAS.
    pub cas: Cas,
    /// The handles the processors run with.
    pub services: Services,
    /// Stops everything spawned for the test.
    pub shutdown: CancellationToken,
}

impl Setup {
    /// Configuration under a fresh topic prefix named after `kind`, its topics, schemas and
    /// migrations; then `configure` changes it (after `prepare`, so it may point at a broker
    /// that is down).
    pub async fn new(kind: &str, configure: impl FnOnce(&mut Config)) -> Setup {
        let mut cfg = config(&format!("{}.", random_name(kind)));
        let codec = prepare(&cfg).await.expect("prepare the stack");
        configure(&mut cfg);
        let cfg = Arc::new(cfg);
        Setup {
            services: Services::new(cfg.clone()).unwrap(),
            cas: Cas::from_config(&cfg).await.unwrap(),
            pool: weir_runtime::db::pool(&cfg.postgres).unwrap(),
            shutdown: CancellationToken::new(),
            cfg,
            codec,
        }
    }

    /// Spawns the processors `options` asks for, the gateway on a local port and, if asked,
    /// the telemetry listener.
    pub async fn serve(self, options: Options) -> Gateway {
        let Setup {
            cfg,
            codec,
            pool,
            cas,
            services,
            shutdown,
        } = self;
        if options.materializer {
            let consumer = services.consumer(weir_materializer::Materializer::new(
                cfg.clone(),
                cas.clone(),
            ));
            tokio::spawn(consumer.run(shutdown.clone()));
        }
        if options.coordinator {
            let consumer = services.consumer(weir_coordinator::Coordinator::new(
                cfg.clone(),
                cas.clone(),
                Arc::new(weir_wiring::PatchLogReplay::new(pool.clone(), cas.clone())),
            ));
            tokio::spawn(consumer.run(shutdown.clone()));
        }
        let state = weir_gateway::state(cfg.clone(), options.sources)
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = weir_gateway::spawn(listener, state, shutdown.clone()).unwrap();
        let telemetry = if options.telemetry {
            let tl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let at = format!("http://{}", tl.local_addr().unwrap());
            tokio::spawn(weir_runtime::telemetry::serve_listener(
                tl,
                services.health.clone(),
                shutdown.clone(),
            ));
            Some(at)
        } else {
            None
        };
        let mut http = reqwest::Client::builder();
        if let Some(t) = options.pool_idle_timeout {
            http = http.pool_idle_timeout(t);
        }
        Gateway {
            base: format!("http://{}", running.addr),
            addr: running.addr,
            telemetry,
            http: http.build().unwrap(),
            problems_under: options.problems_under,
            cfg,
            codec,
            pool,
            cas,
            services,
            shutdown,
        }
    }
}

/// A running gateway (and whatever [`Options`] asked for); dropping it stops them.
pub struct Gateway {
    /// The configuration.
    pub cfg: Arc<Config>,
    /// Avro through the registry, for the test's topics.
    pub codec: Arc<Codec>,
    /// `http://<addr>`.
    pub base: String,
    /// The gateway's address.
    pub addr: SocketAddr,
    /// `http://<addr>` of the telemetry port, if it was asked for.
    pub telemetry: Option<String>,
    /// Postgres.
    pub pool: sqlx::PgPool,
    /// The configured CAS.
    pub cas: Cas,
    /// The handles the processors run with (their health, for one).
    pub services: Services,
    /// The test's HTTP client.
    pub http: reqwest::Client,
    /// Stops everything; cancelled on drop.
    pub shutdown: CancellationToken,
    problems_under: Option<&'static str>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: reqwest::header::HeaderMap,
    /// Whether it is `application/problem+json`.
    pub problem: bool,
    /// The body as JSON, or as a JSON string when it is not JSON.
    pub body: Value,
}

impl Gateway {
    /// A gateway as [`Options`] says, on the configuration [`Setup::new`] makes.
    pub async fn start(kind: &str, configure: impl FnOnce(&mut Config), options: Options) -> Self {
        Setup::new(kind, configure).await.serve(options).await
    }

    /// A new API key of `workspace`.
    pub async fn key(&self, workspace: &str, permission: Permission) -> String {
        create_key(&self.pool, workspace, permission)
            .await
            .unwrap()
            .key
    }

    /// A request with `key` as bearer token, `headers`, and `body` as JSON; checks problem
    /// bodies as [`Options::problems_under`] says.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Answer {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let problem = headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap().starts_with("application/problem+json"));
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        let checked = self.problems_under.is_some_and(|p| path.starts_with(p));
        if checked && (status.is_client_error() || status.is_server_error()) {
            assert!(problem, "{status} on {path} must be a problem body: {body}");
            assert_eq!(body["status"], status.as_u16(), "{body}");
            assert!(
                body["detail"].is_string() && body["title"].is_string(),
                "{body}"
            );
        }
        Answer {
            status,
            headers,
            problem,
            body,
        }
    }

    /// GET `path` with `key`.
    pub async fn get(&self, path: &str, key: &str) -> Answer {
        self.call(Method::GET, path, Some(key), &[], None).await
    }

    /// POST `body` to `path` with `key`.
    pub async fn post(&self, path: &str, key: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(key), &[], Some(body.to_string()))
            .await
    }

    /// Polls GET `path` until `done` holds (60 s at most).
    pub async fn wait_for(&self, path: &str, key: &str, done: impl Fn(&Answer) -> bool) -> Answer {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let a = self.get(path, key).await;
            if done(&a) {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "timed out on {path}: {} {}",
                a.status,
                a.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every event on topic `E` (from the start) until `want` of them are read (60 s at
    /// most); each must be keyed by its key.
    pub async fn events<E: TopicEvent>(&self, want: usize) -> Vec<E> {
        let consumer = crate::reader(&self.cfg, &[&self.codec.topic::<E>()]);
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while out.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "read {} of {want} events", out.len());
            if let Ok(Ok(m)) = tokio::time::timeout(left, consumer.recv()).await {
                let e: E = self.codec.decode(m.payload().unwrap()).await.unwrap();
                assert_eq!(m.key().unwrap(), e.key().as_bytes(), "keyed by {}", e.key());
                out.push(e);
            }
        }
        out
    }

    /// The telemetry port's `/metrics` (which must answer 200).
    ///
    /// # Panics
    /// If the gateway was started without [`Options::telemetry`].
    pub async fn metrics(&self) -> String {
        let telemetry = self.telemetry.as_deref().expect("started with telemetry");
        let res = self
            .http
            .get(format!("{telemetry}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            StatusCode::OK,
            "metrics on the telemetry port"
        );
        res.text().await.unwrap()
    }
}
