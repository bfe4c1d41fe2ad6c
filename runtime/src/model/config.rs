//! The shape and constants of a Llama-architecture model, as a GGUF file states them.

use tandem_gpu::AttentionShape;

use super::gguf::GgufFile;
use crate::error::{Error, Result};

/// The shape and constants of a Llama-architecture model.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub n_layers: usize,
    pub dim: usize,
    pub ffn_dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    /// The context length the model was trained for.
    pub context_length: usize,
}

impl Config {
    /// The attention geometry.
    pub fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }

    pub(crate) fn from_gguf(file: &GgufFile) -> Result<Config> {
        let path = file.path();
        let arch = file
            .get_str("general.architecture")
            .ok_or_else(|| Error::bad_model(path, "metadata `general.architecture` is missing"))?;
        if arch != "llama" {
            return Err(Error::unsupported(
                path,
                format!("architecture `{arch}` (only `llama` is supported)"),
            ));
        }
        let get = |k: &str| file.require_u64(&format!("llama.{k}")).map(|v| v as usize);
        let dim = get("embedding_length")?;
        let n_heads = get("attention.head_count")?;
        let n_kv_heads = file
            .get("llama.attention.head_count_kv")
            .and_then(|v| v.as_u64())
            .map_or(n_heads, |v| v as usize);
        if n_heads == 0 || n_kv_heads == 0 || dim % n_heads != 0 || n_heads % n_kv_heads != 0 {
            return Err(Error::bad_model(
                path,
                format!(
                    "inconsistent head counts: dim {dim}, {n_heads} heads, {n_kv_heads} kv heads"
                ),
            ));
        }
        let embed = file
            .tensor("token_embd.weight")
            .ok_or_else(|| Error::bad_model(path, "tensor `token_embd.weight` is missing"))?;
        let config = Config {
            n_layers: get("block_count")?,
            dim,
            ffn_dim: get("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim: dim / n_heads,
            vocab_size: embed.dims.get(1).copied().unwrap_or(0) as usize,
            rope_base: file.get_f64("llama.rope.freq_base").unwrap_or(10000.0) as f32,
            rms_eps: file
                .get_f64("llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5) as f32,
            context_length: get("context_length").unwrap_or(4096),
        };
        if let Some(rot) = file
            .get("llama.rope.dimension_count")
            .and_then(|v| v.as_u64())
        {
            if rot as usize != config.head_dim {
                return Err(Error::unsupported(
                    path,
                    format!("partial rotary ({rot} of {} dims)", config.head_dim),
                ));
            }
        }
        if file.tensor("rope_freqs.weight").is_some() {
            return Err(Error::unsupported(
                path,
                "rope frequency factors (`rope_freqs.weight`, Llama 3.1 scaling)",
            ));
        }
        Ok(config)
    }
}
