//! Prompt embedders: the built-in all-MiniLM-L6-v2 (BERT, candle on CPU, 384 dimensions,
//! mean pooling over the attention mask, then L2 normalization — what sentence-transformers
//! does for this model), or an OpenAI-compatible `/v1/embeddings` endpoint.
//!
//! Invariants: every vector returned has exactly [`Embedder::dimensions`] components and unit
//! length (so cosine similarity is a dot product); the local model runs on tokio's blocking
//! pool, never on an async worker; model files are read from disk only (no hub download).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use weir_runtime::config::{CacheConfig, EmbedderKind, Secret};

use crate::error::CacheError;
use crate::metrics as m;

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
                        retry: false,
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

    /// Embeds `texts` (in order), in batches; unit-length vectors.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, CacheError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let n = texts.len();
        let out = match self {
            Embedder::Local(model) => {
                let model = model.clone();
                tokio::task::spawn_blocking(move || model.embed_all(&texts))
                    .await
                    .map_err(|e| CacheError::Embed {
                        message: format!("embedding task panicked: {e}"),
                        retry: false,
                    })??
            }
            Embedder::OpenAi(o) => o.embed_all(&texts).await?,
        };
        metrics::counter!(m::EMBEDDED, "embedder" => self.name()).increment(n as u64);
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
        retry: false,
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

    /// Embeds all `texts` in batches of `cache.embed_batch` (blocking, CPU-heavy).
    pub fn embed_all(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, CacheError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.batch) {
            out.extend(self.embed_batch(chunk).map_err(|e| CacheError::Embed {
                message: e.to_string(),
                retry: false,
            })?);
        }
        Ok(out)
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
                retry: false,
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

    async fn embed_all(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, CacheError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.batch) {
            let body = serde_json::json!({"model": self.model, "input": chunk, "dimensions": self.dimensions});
            let resp = self
                .client
                .post(&self.url)
                .bearer_auth(self.key.expose())
                .json(&body)
                .send()
                .await
                .map_err(|e| CacheError::Embed {
                    message: format!("POST {}: {e}", self.url),
                    retry: true,
                })?;
            let status = resp.status();
            if !status.is_success() {
                // 429 and 5xx pass; other 4xx (bad key, unknown model) need an operator.
                let retry = status.as_u16() == 429 || status.is_server_error();
                return Err(CacheError::Embed {
                    message: format!("POST {}: HTTP {status}", self.url),
                    retry,
                });
            }
            let mut parsed: EmbeddingsResponse =
                resp.json().await.map_err(|e| CacheError::Embed {
                    message: format!("embeddings response: {e}"),
                    retry: true,
                })?;
            parsed.data.sort_by_key(|d| d.index);
            if parsed.data.len() != chunk.len() {
                return Err(CacheError::Embed {
                    message: format!(
                        "asked for {} embeddings, got {}",
                        chunk.len(),
                        parsed.data.len()
                    ),
                    retry: false,
                });
            }
            for d in parsed.data {
                out.push(normalize(check_dims(d.embedding, self.dimensions)?));
            }
        }
        Ok(out)
    }
}

/// Refuses a vector whose length is not the deployment's dimension.
pub fn check_dims(v: Vec<f32>, dims: usize) -> Result<Vec<f32>, CacheError> {
    if v.len() != dims {
        return Err(CacheError::Dimension(format!(
            "an embedding has {} dimensions, this deployment uses {dims} (cache.dimensions)",
            v.len()
        )));
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(CacheError::Invalid(
            "an embedding holds NaN or infinity".into(),
        ));
    }
    Ok(v)
}

/// Scales `v` to unit length (a zero vector stays zero).
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
        let v = e
            .embed(texts.iter().map(|s| s.to_string()).collect())
            .await
            .unwrap();
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
            dot(&alone[0], &v[2]) > 0.9999,
            "padding changed the embedding"
        );
        let mut wrong = cfg.clone();
        wrong.dimensions = 768;
        assert!(matches!(
            Embedder::from_config(&wrong).await,
            Err(CacheError::Dimension(_))
        ));
    }
}
