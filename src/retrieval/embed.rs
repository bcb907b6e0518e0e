//! The in-process embedder: a sentence-transformers BERT model directory
//! (`config.json`, `model.safetensors`, `tokenizer.json`, and the pooling settings in
//! `1_Pooling/config.json` and `sentence_bert_config.json`) run on the CPU with candle.
//! Built with the default cargo feature `embedder`; without it, naming a model in the
//! config stops the daemon at start with that reason.
#![forbid(unsafe_code)]

use std::path::Path;

/// Embedder failures.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model directory could not be loaded.
    #[error("embedder model {path}: {why}")]
    Load {
        /// The file or directory.
        path: String,
        /// What was wrong.
        why: String,
    },
    /// Tokenizing the input failed.
    #[error("embedder tokenize: {0}")]
    Tokenize(String),
    /// Running the model failed.
    #[error("embedder forward: {0}")]
    Forward(String),
}

/// Texts run through the model together.
const BATCH: usize = 64;

#[cfg(feature = "embedder")]
mod imp {
    use super::{BATCH, EmbedError, Path};
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use candle_transformers::models::bert::{BertModel, Config};
    use sha2::{Digest, Sha256};

    /// A loaded model.
    pub struct Embedder {
        model: BertModel,
        tokenizer: tokenizers::Tokenizer,
        id: String,
        dim: usize,
        mean: bool,
        max_tokens: usize,
    }

    impl std::fmt::Debug for Embedder {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Embedder({}, {} dimensions)", self.id, self.dim)
        }
    }

    fn load_err(path: &Path, why: impl std::fmt::Display) -> EmbedError {
        EmbedError::Load {
            path: path.display().to_string(),
            why: why.to_string(),
        }
    }

    fn read_json(path: &Path) -> Result<serde_json::Value, EmbedError> {
        let text = std::fs::read_to_string(path).map_err(|e| load_err(path, e))?;
        serde_json::from_str(&text).map_err(|e| load_err(path, e))
    }

    /// The weights, with every linear layer's matrix stored transposed (column-major)
    /// under its usual shape. A linear layer multiplies by the matrix's transpose, which
    /// is then a plain row-major matrix: the matrix multiply reads it in order instead of
    /// gathering it by stride, which took most of the time of a short input (measured
    /// here: 17×384 by 384×1536 in 306 µs instead of 408, by 1536×384 in 282 µs instead
    /// of 860).
    fn transposed_linears(
        weights: &[u8],
    ) -> candle_core::Result<std::collections::HashMap<String, Tensor>> {
        let mut tensors = candle_core::safetensors::load_buffer(weights, &Device::Cpu)?;
        for (name, t) in tensors.iter_mut() {
            if t.rank() == 2 && name.ends_with(".weight") && !name.contains("embeddings") {
                *t = t.to_dtype(DType::F32)?.t()?.contiguous()?.t()?;
            }
        }
        Ok(tensors)
    }

    impl Embedder {
        /// Loads the model in `dir`. Its identity (for caches) is the SHA-256 of its
        /// weights, so a replaced model never reuses another's cached vectors.
        pub fn load(dir: &Path) -> Result<Embedder, EmbedError> {
            let config_path = dir.join("config.json");
            let config: Config = serde_json::from_value(read_json(&config_path)?)
                .map_err(|e| load_err(&config_path, e))?;
            let pooling_path = dir.join("1_Pooling").join("config.json");
            let mean = match read_json(&pooling_path) {
                Ok(p) => {
                    let on = |k: &str| p.get(k).and_then(serde_json::Value::as_bool) == Some(true);
                    if on("pooling_mode_mean_tokens") {
                        true
                    } else if on("pooling_mode_cls_token") {
                        false
                    } else {
                        return Err(load_err(
                            &pooling_path,
                            "only mean or CLS pooling is supported",
                        ));
                    }
                }
                // Plain BERT directories without a pooling module: sentence-transformers
                // defaults to mean pooling.
                Err(EmbedError::Load { .. }) if !pooling_path.exists() => true,
                Err(e) => return Err(e),
            };
            let max_tokens = read_json(&dir.join("sentence_bert_config.json"))
                .ok()
                .and_then(|v| v.get("max_seq_length").and_then(serde_json::Value::as_u64))
                .map_or(256, |n| n as usize)
                .clamp(2, 512);
            let weights_path = dir.join("model.safetensors");
            let weights = std::fs::read(&weights_path).map_err(|e| load_err(&weights_path, e))?;
            let digest = Sha256::digest(&weights);
            // Packages often name the directory just `model`; its parent says which.
            let name = |p: Option<&std::ffi::OsStr>| {
                p.map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
            };
            let mut label = name(dir.file_name());
            if label == "model" {
                label = name(dir.parent().and_then(Path::file_name));
            }
            let id = format!(
                "{}@{}",
                label,
                digest[..8]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            );
            let vb = VarBuilder::from_tensors(
                transposed_linears(&weights).map_err(|e| load_err(&weights_path, e))?,
                DType::F32,
                &Device::Cpu,
            );
            let model = BertModel::load(vb, &config).map_err(|e| load_err(&weights_path, e))?;
            let tokenizer_path = dir.join("tokenizer.json");
            let mut tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
                .map_err(|e| load_err(&tokenizer_path, e))?;
            // The file may pad every input to a fixed length; batches are padded here,
            // to their own longest input, with an attention mask.
            tokenizer.with_padding(None);
            tokenizer
                .with_truncation(Some(tokenizers::TruncationParams {
                    max_length: max_tokens,
                    ..Default::default()
                }))
                .map_err(|e| load_err(&tokenizer_path, e))?;
            Ok(Embedder {
                model,
                tokenizer,
                id,
                dim: config.hidden_size,
                mean,
                max_tokens,
            })
        }

        /// The model's identity: directory name and weights digest.
        pub fn id(&self) -> &str {
            &self.id
        }

        /// Dimensions of its vectors.
        pub fn dim(&self) -> usize {
            self.dim
        }

        /// Longest input in tokens; the rest of a longer text is not read.
        pub fn max_tokens(&self) -> usize {
            self.max_tokens
        }

        /// Unit vectors for `texts`, in order.
        ///
        /// A batch is padded to its longest input, so inputs go into batches by length
        /// (bytes, a cheap stand-in for tokens): a document's short last chunk or a short
        /// note then no longer pays for the longest text that happened to arrive with it.
        pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
            let mut order: Vec<usize> = (0..texts.len()).collect();
            order.sort_by_key(|&i| texts[i].len());
            let mut out: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
            for at in order.chunks(BATCH) {
                let batch: Vec<&str> = at.iter().map(|&i| texts[i]).collect();
                let vectors = self.embed_batch(&batch)?;
                if vectors.len() != batch.len() {
                    return Err(EmbedError::Forward(format!(
                        "{} vectors for {} texts",
                        vectors.len(),
                        batch.len()
                    )));
                }
                for (&i, v) in at.iter().zip(vectors) {
                    out[i] = Some(v);
                }
            }
            out.into_iter()
                .map(|v| v.ok_or_else(|| EmbedError::Forward("a text got no vector".into())))
                .collect()
        }

        fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
            let fwd = |e: candle_core::Error| EmbedError::Forward(e.to_string());
            let encodings = self
                .tokenizer
                .encode_batch(texts.to_vec(), true)
                .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
            let len = encodings
                .iter()
                .map(|e| e.get_ids().len())
                .max()
                .unwrap_or(0)
                .max(1);
            let mut ids = Vec::with_capacity(texts.len() * len);
            let mut mask = Vec::with_capacity(texts.len() * len);
            for e in &encodings {
                let n = e.get_ids().len();
                ids.extend_from_slice(e.get_ids());
                ids.extend(std::iter::repeat_n(0u32, len - n));
                mask.extend(std::iter::repeat_n(1u32, n));
                mask.extend(std::iter::repeat_n(0u32, len - n));
            }
            let rows = texts.len();
            let ids = Tensor::from_vec(ids, (rows, len), &Device::Cpu).map_err(fwd)?;
            let mask = Tensor::from_vec(mask, (rows, len), &Device::Cpu).map_err(fwd)?;
            let types = ids.zeros_like().map_err(fwd)?;
            let hidden = self.model.forward(&ids, &types, Some(&mask)).map_err(fwd)?;
            let pooled = if self.mean {
                // Mean over real tokens only: padding is masked out of sum and count.
                let m = mask
                    .to_dtype(DType::F32)
                    .and_then(|m| m.unsqueeze(2))
                    .map_err(fwd)?;
                let sum = hidden
                    .broadcast_mul(&m)
                    .and_then(|h| h.sum(1))
                    .map_err(fwd)?;
                let count = m.sum(1).map_err(fwd)?;
                sum.broadcast_div(&count).map_err(fwd)?
            } else {
                hidden
                    .narrow(1, 0, 1)
                    .and_then(|h| h.squeeze(1))
                    .map_err(fwd)?
            };
            let vectors = pooled.to_vec2::<f32>().map_err(fwd)?;
            vectors
                .into_iter()
                .map(|v| {
                    super::super::vectors::normalized(&v)
                        .map_err(|e| EmbedError::Forward(e.to_string()))
                })
                .collect()
        }
    }
}

#[cfg(not(feature = "embedder"))]
mod imp {
    use super::{EmbedError, Path};

    /// Stands in for the model in builds without the `embedder` feature: loading fails.
    #[derive(Debug)]
    pub enum Embedder {}

    impl Embedder {
        /// Always fails: this build has no embedder.
        pub fn load(dir: &Path) -> Result<Embedder, EmbedError> {
            Err(EmbedError::Load {
                path: dir.display().to_string(),
                why: "this build has no in-process embedder (cargo feature `embedder`)".into(),
            })
        }

        /// Never called: no value exists.
        pub fn id(&self) -> &str {
            match *self {}
        }

        /// Never called: no value exists.
        pub fn dim(&self) -> usize {
            match *self {}
        }

        /// Never called: no value exists.
        pub fn max_tokens(&self) -> usize {
            match *self {}
        }

        /// Never called: no value exists.
        pub fn embed(&self, _texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
            match *self {}
        }
    }
}

pub use imp::Embedder;
