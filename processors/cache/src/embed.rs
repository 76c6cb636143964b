//! Prompt embedders: the built-in all-MiniLM-L6-v2 (BERT, candle on CPU, 384 dimensions,
//! mean pooling over the attention mask, then L2 normalization — what sentence-transformers
//! does for this model), or an OpenAI-compatible `/v1/embeddings` endpoint.
//!
//! Invariants: every vector returned has exactly [`Embedder::dimensions`] finite components
//! and unit length (so cosine similarity is a dot product): each is a [`UnitVector`],
//! validated once as it leaves the embedder (as a caller's vector is where it enters), because a zero, NaN or infinite vector
//! makes cosine NaN, and NaN sorts above every threshold. The local model runs on tokio's
//! blocking pool, never on an async worker; model files are read from disk only (no hub
//! download).
//!
//! A prompt that cannot be embedded costs that prompt only: [`Embedder::embed`] answers one
//! result per text, `Err(reason)` for a text the model or the endpoint refuses (an HTTP 4xx
//! about the input, an inference error, a panic, a bad vector), and fails the whole call only
//! when waiting or an operator can fix it ([`EmbedClass`]): the endpoint is down or rate
//! limited, or it refuses the key, the model or the URL (401/403/404). A batch that fails is
//! split into single texts to find the culprit; a single text that gets a 5xx or a timeout
//! is tried against a one-word canary first: if the canary embeds, the text is to blame.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use weir_runtime::config::{CacheConfig, EmbedderKind, Secret};

use crate::cache::UnitVector;

use crate::error::{CacheError, EmbedClass};
use crate::metrics as m;

/// What [`Embedder::embed`] answers per text: a unit vector, or why this text was refused.
pub type Embedded = Result<UnitVector, String>;

/// Longest refusal reason kept from an endpoint's answer, in bytes.
const MAX_REASON: usize = 300;

/// Longest input in tokens (all-MiniLM-L6-v2 was trained with 256; longer text is truncated).
pub const MAX_TOKENS: usize = 256;

/// The default directory of the local model files: `~/.cache/weir/models/all-MiniLM-L6-v2`.
pub fn default_model_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let cache = std::env::var_os("WEIR_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cache/weir"));
    cache.join("models/all-MiniLM-L6-v2")
}

/// An embedder, cheap to clone.
#[derive(Clone)]
pub enum Embedder {
    /// all-MiniLM-L6-v2 in process.
    Local(Arc<LocalModel>),
    /// An OpenAI-compatible endpoint.
    OpenAi(Arc<OpenAiEmbedder>),
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Embedder {
    /// Builds the embedder `cfg` asks for; loading the local model reads ~90 MB from disk.
    /// Refuses a configured dimension the embedder does not produce.
    pub async fn from_config(cfg: &CacheConfig) -> Result<Embedder, CacheError> {
        let e = match cfg.embedder {
            EmbedderKind::Local => {
                let dir = if cfg.model_dir.is_empty() {
                    default_model_dir()
                } else {
                    PathBuf::from(&cfg.model_dir)
                };
                let batch = cfg.embed_batch;
                let model = tokio::task::spawn_blocking(move || LocalModel::load(&dir, batch))
                    .await
                    .map_err(|e| CacheError::Embed {
                        message: format!("model loader panicked: {e}"),
                        class: EmbedClass::Misconfigured,
                    })??;
                Embedder::Local(Arc::new(model))
            }
            EmbedderKind::Openai => Embedder::OpenAi(Arc::new(OpenAiEmbedder::new(cfg)?)),
        };
        if e.dimensions() != cfg.dimensions as usize {
            return Err(CacheError::Dimension(format!(
                "cache.dimensions is {} but the {} embedder produces {}",
                cfg.dimensions,
                e.name(),
                e.dimensions()
            )));
        }
        Ok(e)
    }

    /// Name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Embedder::Local(_) => "local",
            Embedder::OpenAi(_) => "openai",
        }
    }

    /// Components of every vector.
    pub fn dimensions(&self) -> usize {
        match self {
            Embedder::Local(m) => m.dimensions,
            Embedder::OpenAi(o) => o.dimensions,
        }
    }

    /// Embeds `texts` (in order), in batches: one result per text, a unit vector of
    /// [`Embedder::dimensions`] components or the reason this text was refused. `Err` only
    /// for what is not the texts' fault (see the module docs).
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Embedded>, CacheError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let n = texts.len();
        let out = match self {
            Embedder::Local(model) => {
                let model = model.clone();
                // CPU-heavy: the blocking pool, never an async worker. embed_all catches a
                // panic per batch, so a JoinError here is the runtime shutting down.
                tokio::task::spawn_blocking(move || model.embed_all(&texts))
                    .await
                    .map_err(|e| CacheError::Embed {
                        message: format!("embedding task ended: {e}"),
                        class: EmbedClass::Unavailable,
                    })?
            }
            Embedder::OpenAi(o) => o.embed_all(&texts).await?,
        };
        let refused = out.iter().filter(|r| r.is_err()).count();
        metrics::counter!(m::EMBEDDED, "embedder" => self.name()).increment((n - refused) as u64);
        if refused > 0 {
            metrics::counter!(m::EMBED_REFUSED, "embedder" => self.name())
                .increment(refused as u64);
        }
        metrics::histogram!(m::EMBED_SECONDS, "embedder" => self.name())
            .record(started.elapsed().as_secs_f64());
        Ok(out)
    }
}

/// all-MiniLM-L6-v2 loaded with candle.
pub struct LocalModel {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dimensions: usize,
    batch: usize,
}

fn load_err(what: &str, path: &Path, e: impl std::fmt::Display) -> CacheError {
    CacheError::Embed {
        message: format!(
            "cannot load {what} from {} ({e}); run infra/local/prereqs to install the model files",
            path.display()
        ),
        class: EmbedClass::Misconfigured,
    }
}

impl LocalModel {
    /// Loads model.safetensors, config.json and tokenizer.json from `dir`.
    pub fn load(dir: &Path, batch: usize) -> Result<LocalModel, CacheError> {
        let device = Device::Cpu;
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| load_err("config.json", &config_path, e))?;
        let config: BertConfig =
            serde_json::from_str(&text).map_err(|e| load_err("config.json", &config_path, e))?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| load_err("tokenizer.json", &tok_path, e))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| load_err("tokenizer.json", &tok_path, e))?;
        let weights = dir.join("model.safetensors");
        // Safety: the file is memory-mapped read-only; it must not be modified while mapped,
        // which holds for model files installed once by the prereqs script.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device) }
            .map_err(|e| load_err("model.safetensors", &weights, e))?;
        let model =
            BertModel::load(vb, &config).map_err(|e| load_err("model.safetensors", &weights, e))?;
        Ok(LocalModel {
            model,
            tokenizer,
            device,
            dimensions: config.hidden_size,
            batch: batch.max(1),
        })
    }

    /// Embeds all `texts` in batches of `cache.embed_batch` (blocking, CPU-heavy). A batch
    /// that fails (an inference error or a panic) is embedded again text by text, so only
    /// the texts that fail alone are refused.
    pub fn embed_all(&self, texts: &[String]) -> Vec<Embedded> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.batch) {
            match self.guarded(chunk) {
                Ok(vs) => out.extend(vs),
                Err(_) if chunk.len() > 1 => {
                    for t in chunk {
                        out.push(match self.guarded(std::slice::from_ref(t)) {
                            Ok(mut v) => v.pop().unwrap_or_else(|| Err("no vector".into())),
                            Err(e) => Err(e),
                        });
                    }
                }
                Err(e) => out.push(Err(e)),
            }
        }
        out
    }

    /// One batch, with inference errors and panics turned into a reason, and every vector
    /// validated.
    fn guarded(&self, texts: &[String]) -> Result<Vec<Embedded>, String> {
        let run = std::panic::AssertUnwindSafe(|| self.embed_batch(texts));
        match std::panic::catch_unwind(run) {
            Ok(Ok(vs)) if vs.len() == texts.len() => Ok(vs
                .into_iter()
                .map(|v| UnitVector::new(v, self.dimensions))
                .collect()),
            Ok(Ok(vs)) => Err(format!(
                "the local model gave {} vectors for {} texts",
                vs.len(),
                texts.len()
            )),
            Ok(Err(e)) => Err(format!("the local model failed on this prompt: {e}")),
            Err(_) => Err("the local model panicked on this prompt".into()),
        }
    }

    fn embed_batch(&self, texts: &[String]) -> anyhow::Result<Vec<Vec<f32>>> {
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        let len = enc.first().map_or(0, |e| e.get_ids().len());
        let n = enc.len();
        let mut ids = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        for e in &enc {
            ids.extend(e.get_ids().iter().map(|&x| x as i64));
            mask.extend(e.get_attention_mask().iter().map(|&x| x as i64));
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (n, len, dims)
                                                                     // Mean over the real tokens only: padding must not dilute short prompts.
        let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (n, len, 1)
        let summed = hidden.broadcast_mul(&maskf)?.sum(1)?; // (n, dims)
        let counts = maskf.sum(1)?.clamp(1e-9, f64::MAX)?; // (n, 1)
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        let unit = mean.broadcast_div(&norms)?;
        Ok(unit.to_vec2::<f32>()?)
    }
}

/// An OpenAI-compatible embeddings endpoint.
pub struct OpenAiEmbedder {
    client: reqwest::Client,
    url: String,
    model: String,
    key: Secret<String>,
    dimensions: usize,
    batch: usize,
}

#[derive(serde::Deserialize)]
struct EmbeddingsResponse {
    data: Vec<EmbeddingItem>,
}

#[derive(serde::Deserialize)]
struct EmbeddingItem {
    index: usize,
    embedding: Vec<f32>,
}

impl OpenAiEmbedder {
    /// Builds the client from `cache.openai_*`.
    pub fn new(cfg: &CacheConfig) -> Result<OpenAiEmbedder, CacheError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| CacheError::Embed {
                message: format!("http client: {e}"),
                class: EmbedClass::Misconfigured,
            })?;
        Ok(OpenAiEmbedder {
            client,
            url: format!(
                "{}/v1/embeddings",
                cfg.openai_base_url.trim_end_matches('/')
            ),
            model: cfg.openai_model.clone(),
            key: cfg.openai_api_key.clone(),
            dimensions: cfg.dimensions as usize,
            batch: cfg.embed_batch.max(1),
        })
    }

    /// One result per text (see [`Embedder::embed`]).
    async fn embed_all(&self, texts: &[String]) -> Result<Vec<Embedded>, CacheError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.batch) {
            let failure = match self.post(chunk).await {
                Ok(vs) => {
                    out.extend(vs);
                    continue;
                }
                Err(f) => f,
            };
            if chunk.len() == 1 {
                out.push(self.settle(failure).await?);
                continue;
            }
            match failure {
                Failure::Config(m) => return Err(Failure::Config(m).into_error()),
                Failure::Busy(m) => return Err(Failure::Busy(m).into_error()),
                // Maybe one text's fault, maybe the endpoint's: a canary tells them apart.
                Failure::Broken(m) if !self.canary_embeds().await => {
                    return Err(Failure::Busy(m).into_error())
                }
                Failure::Broken(_) | Failure::Content(_) => {}
            }
            // The endpoint works: find the texts it refuses, one by one.
            for t in chunk {
                match self.post(std::slice::from_ref(t)).await {
                    Ok(mut v) => out.push(v.pop().unwrap_or_else(|| Err("no vector".into()))),
                    Err(f) => out.push(self.settle(f).await?),
                }
            }
        }
        Ok(out)
    }

    /// What one text's failed call means: a refusal of that text (a 4xx about the input, or
    /// a 5xx/timeout while a canary still embeds), or an error of the whole call.
    async fn settle(&self, f: Failure) -> Result<Embedded, CacheError> {
        match f {
            Failure::Content(m) => Ok(Err(format!("the embedder refused this prompt: {m}"))),
            Failure::Broken(m) if self.canary_embeds().await => {
                Ok(Err(format!("the embedder fails on this prompt only: {m}")))
            }
            Failure::Broken(m) => Err(Failure::Busy(m).into_error()),
            other => Err(other.into_error()),
        }
    }

    async fn canary_embeds(&self) -> bool {
        matches!(self.post(&[CANARY.to_string()]).await, Ok(v) if v.iter().all(|r| r.is_ok()))
    }

    /// One POST of `chunk`: a validated result per text, or how the call failed.
    async fn post(&self, chunk: &[String]) -> Result<Vec<Embedded>, Failure> {
        let body =
            serde_json::json!({"model": self.model, "input": chunk, "dimensions": self.dimensions});
        let resp = self
            .client
            .post(&self.url)
            .bearer_auth(self.key.expose())
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                let m = format!("POST {}: {e}", self.url);
                if e.is_timeout() {
                    Failure::Broken(m)
                } else {
                    Failure::Busy(m)
                }
            })?;
        let status = resp.status();
        if !status.is_success() {
            // The reason the endpoint gives (bounded), for the dead letter.
            let detail: String = resp
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(MAX_REASON)
                .collect();
            let m = format!("POST {}: HTTP {status}: {detail}", self.url);
            return Err(match status.as_u16() {
                // The key, the model or the URL: nothing a tenant sends changes these.
                401 | 403 | 404 => Failure::Config(m),
                408 | 429 => Failure::Busy(m),
                s if s >= 500 => Failure::Broken(m),
                // 400, 413, 422, ...: the input (empty, too long, not text).
                _ => Failure::Content(m),
            });
        }
        let mut parsed: EmbeddingsResponse = resp
            .json()
            .await
            .map_err(|e| Failure::Broken(format!("embeddings response: {e}")))?;
        parsed.data.sort_by_key(|d| d.index);
        if parsed.data.len() != chunk.len() {
            return Err(Failure::Broken(format!(
                "asked for {} embeddings, got {}",
                chunk.len(),
                parsed.data.len()
            )));
        }
        // Every vector of the wrong length: the model is not the configured dimension.
        if parsed
            .data
            .iter()
            .all(|d| d.embedding.len() != self.dimensions)
        {
            return Err(Failure::Config(format!(
                "the endpoint's embeddings have {} dimensions, cache.dimensions is {}",
                parsed.data[0].embedding.len(),
                self.dimensions
            )));
        }
        Ok(parsed
            .data
            .into_iter()
            .map(|d| UnitVector::new(d.embedding, self.dimensions))
            .collect())
    }
}

/// The text a suspicious failure is checked against: if it embeds, the endpoint is up.
const CANARY: &str = "ping";

/// How one call to the endpoint failed.
enum Failure {
    /// 401/403/404 or vectors of another dimension: an operator must fix the settings.
    Config(String),
    /// Unreachable, rate limited: waiting fixes it.
    Busy(String),
    /// 5xx, a timeout, a malformed answer: the endpoint, or possibly this input.
    Broken(String),
    /// A 4xx about the input.
    Content(String),
}

impl Failure {
    /// The error of a whole call (the failures that are not a text's fault).
    fn into_error(self) -> CacheError {
        match self {
            Failure::Config(message) => CacheError::Embed {
                message,
                class: EmbedClass::Misconfigured,
            },
            Failure::Busy(message) | Failure::Broken(message) | Failure::Content(message) => {
                CacheError::Embed {
                    message,
                    class: EmbedClass::Unavailable,
                }
            }
        }
    }
}

/// Scales `v` to unit length (a zero vector stays zero). For synthetic vectors (benchmarks,
/// tests); everything stored or looked up is a [`UnitVector`].
pub fn normalize(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

/// Cosine similarity of two unit vectors.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_model::cache::validate_vector;
    use weir_runtime::Classify as _;

    /// Needs the model files from infra/local/prereqs.
    #[tokio::test]
    async fn local_model_puts_paraphrases_close_and_unrelated_text_far() {
        let cfg = CacheConfig::default();
        let e = Embedder::from_config(&cfg)
            .await
            .expect("model files: run infra/local/prereqs");
        let texts = [
            "How do I reset my password?",
            "What are the steps to change my password?",
            "The cat sat on the warm windowsill in the sun.",
            "Summarize the quarterly sales report for the board.",
            "Give the board a summary of this quarter's sales report.",
        ];
        let v: Vec<Vec<f32>> = e
            .embed(texts.iter().map(|s| s.to_string()).collect())
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap().as_slice().to_vec())
            .collect();
        assert_eq!(v.len(), 5);
        for x in &v {
            assert_eq!(x.len(), 384);
            assert!((dot(x, x) - 1.0).abs() < 1e-4, "unit length");
        }
        let (para1, para2) = (dot(&v[0], &v[1]), dot(&v[3], &v[4]));
        let (unrelated1, unrelated2) = (dot(&v[0], &v[2]), dot(&v[2], &v[3]));
        eprintln!("paraphrases {para1:.4} {para2:.4}, unrelated {unrelated1:.4} {unrelated2:.4}");
        assert!(para1 > 0.8 && para2 > 0.8, "paraphrases {para1} {para2}");
        assert!(
            unrelated1 < 0.5 && unrelated2 < 0.5,
            "unrelated {unrelated1} {unrelated2}"
        );
        // Batching and padding must not change a vector: alone vs in a batch of mixed lengths.
        let alone = e.embed(vec![texts[2].to_string()]).await.unwrap();
        assert!(
            dot(alone[0].as_ref().unwrap().as_slice(), &v[2]) > 0.9999,
            "padding changed the embedding"
        );
        let mut wrong = cfg.clone();
        wrong.dimensions = 768;
        assert!(matches!(
            Embedder::from_config(&wrong).await,
            Err(CacheError::Dimension(_))
        ));
    }

    #[test]
    fn bad_vectors_are_refused_with_a_reason() {
        let d = 4;
        assert!(validate_vector(vec![0.0; 4], d)
            .unwrap_err()
            .contains("zero"));
        assert!(validate_vector(vec![1e-9; 4], d).is_err(), "near zero");
        assert!(validate_vector(vec![f32::NAN, 1.0, 0.0, 0.0], d)
            .unwrap_err()
            .contains("NaN"));
        assert!(validate_vector(vec![f32::INFINITY, 1.0, 0.0, 0.0], d).is_err());
        assert!(validate_vector(vec![1.0; 3], d)
            .unwrap_err()
            .contains("3 dimensions"));
        assert!(validate_vector(vec![], d).is_err());
        // Huge finite components: the f32 sum of squares would be infinite.
        let big = validate_vector(vec![f32::MAX, f32::MAX, 0.0, 0.0], d).unwrap();
        assert!((dot(&big, &big) - 1.0).abs() < 1e-5);
        let v = validate_vector(vec![3.0, 4.0, 0.0, 0.0], d).unwrap();
        assert_eq!(v, vec![0.6, 0.8, 0.0, 0.0]);
    }

    /// A tiny OpenAI-compatible endpoint on 127.0.0.1 (a real HTTP peer): 401 for a wrong
    /// key; 400 for a batch holding an empty input; 500 for a batch holding "boom"; else one
    /// vector per input, all-zero for "zero".
    async fn endpoint() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let (head_end, len) = loop {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (i + 4, len);
                        }
                    };
                    while buf.len() < head_end + len {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let body: serde_json::Value =
                        serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or_default();
                    let inputs: Vec<String> = body["input"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|x| x.as_str().unwrap_or("").to_string())
                                .collect()
                        })
                        .unwrap_or_default();
                    let (status, answer) = if !head.contains("bearer good") {
                        (401, serde_json::json!({"error": {"message": "bad key"}}))
                    } else if inputs.iter().any(|t| t.is_empty()) {
                        (
                            400,
                            serde_json::json!({"error": {"message": "input is empty"}}),
                        )
                    } else if inputs.iter().any(|t| t == "boom") {
                        (500, serde_json::json!({"error": {"message": "crashed"}}))
                    } else {
                        let data: Vec<_> = inputs
                            .iter()
                            .enumerate()
                            .map(|(i, t)| {
                                let x = if t == "zero" { 0.0 } else { 1.0 };
                                serde_json::json!({"index": i, "embedding": [x, x, 0.0, 0.0]})
                            })
                            .collect();
                        (200, serde_json::json!({ "data": data }))
                    };
                    let text = answer.to_string();
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                        text.len()
                    );
                    let _ = sock.write_all(reply.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn openai_refusals_cost_one_prompt_and_configuration_errors_are_not_fatal() {
        let base = endpoint().await;
        let cfg = |key: &str| CacheConfig {
            embedder: EmbedderKind::Openai,
            dimensions: 4,
            openai_base_url: base.clone(),
            openai_api_key: Secret::new(key.to_string()),
            ..CacheConfig::default()
        };
        let e = Embedder::OpenAi(Arc::new(OpenAiEmbedder::new(&cfg("good")).unwrap()));
        let texts = ["fine", "", "boom", "zero", "also fine"]
            .map(String::from)
            .to_vec();
        let out = e.embed(texts).await.unwrap();
        assert_eq!(out.len(), 5);
        assert!(out[0].is_ok() && out[4].is_ok(), "{out:?}");
        assert!(out[1].as_ref().unwrap_err().contains("400"), "{out:?}");
        assert!(out[2].as_ref().unwrap_err().contains("500"), "{out:?}");
        assert!(out[3].as_ref().unwrap_err().contains("zero"), "{out:?}");
        // A bad key is the operator's to fix: retried (readiness down), never Fatal.
        let bad = Embedder::OpenAi(Arc::new(OpenAiEmbedder::new(&cfg("wrong")).unwrap()));
        let err = bad.embed(vec!["fine".into()]).await.unwrap_err();
        assert!(
            matches!(
                &err,
                CacheError::Embed {
                    class: EmbedClass::Misconfigured,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.disposition(), weir_runtime::Disposition::Retry);
        // An endpoint that does not answer: retried.
        let down = CacheConfig {
            openai_base_url: "http://127.0.0.1:9".into(),
            ..cfg("good")
        };
        let down = Embedder::OpenAi(Arc::new(OpenAiEmbedder::new(&down).unwrap()));
        let err = down.embed(vec!["fine".into()]).await.unwrap_err();
        assert_eq!(
            err.disposition(),
            weir_runtime::Disposition::Retry,
            "{err:?}"
        );
    }
}
