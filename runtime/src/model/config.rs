//! A model's shape and the conventions of its family, as its file states them.
//!
//! The forward pass is written once; what differs between Llama, Gemma 3 and
//! Qwen2 is data here ([`Family`]'s fields), each convention checked against
//! llama.cpp's reading of the GGUF format (`src/llama-model.cpp` and
//! `src/models/*.cpp`), cited where it is set.

use tandem_gpu::{Activation, AttentionShape, RopeStyle};

use super::gguf::GgufFile;
use crate::error::{Error, Result};

/// Largest layer count, width or head count a model file may state: far above
/// any released model, low enough that a hostile file cannot ask for terabytes.
const MAX_DIM: u64 = 1 << 20;

/// The architectures tandem runs, as GGUF's `general.architecture` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM2, Mistral-like models.
    Llama,
    /// Gemma 3 (text).
    Gemma3,
    /// Qwen2 and Qwen2.5.
    Qwen2,
}

impl Architecture {
    fn from_name(name: &str) -> Option<Architecture> {
        match name {
            "llama" => Some(Architecture::Llama),
            "gemma3" => Some(Architecture::Gemma3),
            "qwen2" => Some(Architecture::Qwen2),
            _ => None,
        }
    }

    /// The name, as in GGUF metadata keys (`gemma3.block_count`).
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Gemma3 => "gemma3",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// How a family's layers differ from plain Llama's.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// Which architecture.
    pub architecture: Architecture,
    /// How RoPE pairs a head's elements.
    pub rope_style: RopeStyle,
    /// The feed-forward block's gated activation.
    pub activation: Activation,
    /// Embedding rows are multiplied by this (Gemma: `sqrt(dim)`).
    pub embed_scale: f32,
    /// Queries are multiplied by this before attention, which itself scales by
    /// `1/sqrt(head_dim)`: for a model whose attention scale differs.
    pub query_scale: f32,
    /// Per-head RMS norms of the queries and keys before RoPE (Gemma 3).
    pub qk_norm: bool,
    /// Each block's output RMS-normed before the residual add (Gemma's
    /// "sandwich" norms: `post_attention_norm`, `post_ffw_norm`).
    pub post_norms: bool,
    /// Biases on the query, key and value projections (Qwen2).
    pub qkv_bias: bool,
}

impl Family {
    /// Plain Llama: SwiGLU, interleaved RoPE pairs, no extra norms or biases.
    pub fn llama() -> Family {
        Family {
            architecture: Architecture::Llama,
            rope_style: RopeStyle::Interleaved,
            activation: Activation::Silu,
            embed_scale: 1.0,
            query_scale: 1.0,
            qk_norm: false,
            post_norms: false,
            qkv_bias: false,
        }
    }
}

/// The shape and constants of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// What the file calls the model (`general.name`), else its architecture.
    pub name: String,
    pub n_layers: usize,
    pub dim: usize,
    pub ffn_dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// RoPE base of the global layers.
    pub rope_base: f32,
    /// Each RoPE frequency is divided by its factor (Llama 3.1 scaling); empty
    /// when none is.
    pub rope_factors: Vec<f32>,
    pub rms_eps: f32,
    /// The context length the model was trained for.
    pub context_length: usize,
    /// The family's conventions.
    pub family: Family,
    /// The sliding-window layers: their window and RoPE base, and which they are.
    pub local: Option<LocalLayers>,
}

/// Layers that attend only a sliding window of recent tokens (Gemma 3's
/// local layers), which the model was trained with and no policy changes.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalLayers {
    /// Tokens each query sees, itself included.
    pub window: usize,
    /// Their RoPE base.
    pub rope_base: f32,
    /// One layer in `period` is global: the last of each run.
    pub period: usize,
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

    /// Width of a row of queries (and of attention outputs).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of a row of keys or values.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// The sliding window `layer` is trained with, if it is a local layer.
    pub fn sliding_window(&self, layer: usize) -> Option<usize> {
        let local = self.local.as_ref()?;
        (!(layer + 1).is_multiple_of(local.period)).then_some(local.window)
    }

    /// Every layer's sliding window (see [`Config::sliding_window`]).
    pub fn sliding_windows(&self) -> Vec<Option<usize>> {
        (0..self.n_layers).map(|l| self.sliding_window(l)).collect()
    }

    /// The RoPE base of `layer`.
    pub fn layer_rope_base(&self, layer: usize) -> f32 {
        match (&self.local, self.sliding_window(layer)) {
            (Some(local), Some(_)) => local.rope_base,
            _ => self.rope_base,
        }
    }

    /// The plain Llama shape `synthetic` models are built with.
    #[allow(clippy::too_many_arguments)]
    pub fn llama(
        n_layers: usize,
        dim: usize,
        ffn_dim: usize,
        n_heads: usize,
        n_kv_heads: usize,
        vocab_size: usize,
        rope_base: f32,
        context_length: usize,
    ) -> Config {
        Config {
            name: format!("llama shape {n_layers}x{dim}"),
            n_layers,
            dim,
            ffn_dim,
            n_heads,
            n_kv_heads,
            head_dim: dim / n_heads.max(1),
            vocab_size,
            rope_base,
            rope_factors: Vec::new(),
            rms_eps: 1e-5,
            context_length,
            family: Family::llama(),
            local: None,
        }
    }

    /// Checks what the forward pass relies on, whatever the file format:
    /// sizes in `1..=MAX_DIM`, whole and even heads, query heads a multiple of
    /// kv heads, a positive finite RoPE base and RMS epsilon. The error is the
    /// problem, in words.
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        for (what, v) in [
            ("layer count", self.n_layers),
            ("width", self.dim),
            ("feed-forward width", self.ffn_dim),
            ("head count", self.n_heads),
            ("kv head count", self.n_kv_heads),
            ("head size", self.head_dim),
            ("vocabulary size", self.vocab_size),
            ("context length", self.context_length),
        ] {
            if v == 0 || v as u64 > MAX_DIM {
                return Err(format!("{what} {v} is out of range (1 to {MAX_DIM})"));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head size {} is odd: RoPE rotates pairs of elements",
                self.head_dim
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!(
                "{} query heads cannot share {} kv heads evenly",
                self.n_heads, self.n_kv_heads
            ));
        }
        for (what, v) in [("RoPE base", self.rope_base), ("RMS epsilon", self.rms_eps)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{what} {v} must be a positive number"));
            }
        }
        Ok(())
    }

    pub(crate) fn from_gguf(file: &GgufFile) -> Result<Config> {
        let path = file.path();
        let arch_name = file
            .get_str("general.architecture")
            .ok_or_else(|| Error::bad_model(path, "metadata `general.architecture` is missing"))?;
        let arch = Architecture::from_name(arch_name).ok_or_else(|| {
            Error::unsupported(
                path,
                format!("architecture `{arch_name}` (tandem runs llama, gemma3 and qwen2)"),
            )
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let get = |k: &str| -> Result<usize> {
            let v = file.require_u64(&key(k))?;
            if v == 0 || v > MAX_DIM {
                return Err(Error::bad_model(
                    path,
                    format!("`{}` = {v} is out of range (1 to {MAX_DIM})", key(k)),
                ));
            }
            Ok(v as usize)
        };
        let optional = |k: &str| -> Result<Option<usize>> {
            match file.get(&key(k)) {
                None => Ok(None),
                Some(_) => get(k).map(Some),
            }
        };
        let float = |k: &str, default: f64| -> Result<f32> {
            let v = file.get_f64(&key(k)).unwrap_or(default);
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::bad_model(
                    path,
                    format!("`{}` = {v} must be a positive number", key(k)),
                ));
            }
            Ok(v as f32)
        };
        let dim = get("embedding_length")?;
        let n_heads = get("attention.head_count")?;
        let n_kv_heads = optional("attention.head_count_kv")?.unwrap_or(n_heads);
        // Gemma states its head size; others imply `dim / heads`.
        let head_dim = optional("attention.key_length")?.unwrap_or(dim / n_heads);
        if let Some(v) = optional("attention.value_length")? {
            if v != head_dim {
                return Err(Error::unsupported(
                    path,
                    format!("value heads of {v} beside key heads of {head_dim}"),
                ));
            }
        }
        if n_heads % n_kv_heads != 0 || head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::bad_model(
                path,
                format!(
                    "inconsistent heads: {n_heads} query heads, {n_kv_heads} kv heads of {head_dim}"
                ),
            ));
        }
        if let Some(rot) = optional("rope.dimension_count")? {
            if rot != head_dim {
                return Err(Error::unsupported(
                    path,
                    format!("partial rotary ({rot} of {head_dim} dims)"),
                ));
            }
        }
        let embed = file
            .tensor("token_embd.weight")
            .ok_or_else(|| Error::bad_model(path, "tensor `token_embd.weight` is missing"))?;
        let n_layers = get("block_count")?;
        let rope_base = float("rope.freq_base", 10000.0)?;
        let mut config = Config {
            name: file
                .get_str("general.name")
                .unwrap_or(arch_name)
                .to_string(),
            n_layers,
            dim,
            ffn_dim: get("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size: embed.dims.get(1).copied().unwrap_or(0) as usize,
            rope_base,
            rope_factors: rope_factors(file, &key, head_dim)?,
            rms_eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
            context_length: optional("context_length")?.unwrap_or(4096),
            family: Family::llama(),
            local: None,
        };
        match arch {
            Architecture::Llama => {}
            Architecture::Qwen2 => {
                // llama.cpp: LLM_ARCH_QWEN2 uses LLAMA_ROPE_TYPE_NEOX and loads
                // `bq`, `bk`, `bv` (src/models/qwen2.cpp).
                config.family = Family {
                    architecture: arch,
                    rope_style: RopeStyle::Halves,
                    qkv_bias: true,
                    ..Family::llama()
                };
            }
            Architecture::Gemma3 => config.family_gemma3(file, &key)?,
        }
        config
            .validate()
            .map_err(|problem| Error::bad_model(path, problem))?;
        Ok(config)
    }

    /// Gemma 3's conventions, as llama.cpp's `llm_build_gemma3` applies them.
    fn family_gemma3(&mut self, file: &GgufFile, key: &dyn Fn(&str) -> String) -> Result<()> {
        let path = file.path();
        // Query scale: 1/sqrt(head_dim), except the 27B (62 layers), scaled by
        // 1/sqrt(dim / heads) (llama-model.cpp, LLM_ARCH_GEMMA3; gemma_pytorch's
        // `query_pre_attn_scalar`).
        let query_scale = if self.n_layers == 62 {
            (self.head_dim as f32 / (self.dim / self.n_heads) as f32).sqrt()
        } else {
            1.0
        };
        self.family = Family {
            architecture: Architecture::Gemma3,
            // LLAMA_ROPE_TYPE_NEOX for LLM_ARCH_GEMMA3 (llama_model_rope_type).
            rope_style: RopeStyle::Halves,
            // LLM_FFN_GELU with LLM_FFN_PAR: gelu(gate) * up (src/models/gemma3.cpp).
            activation: Activation::GeluTanh,
            // `ggml_scale(inpL, sqrtf(n_embd))` on token embeddings.
            embed_scale: (self.dim as f32).sqrt(),
            query_scale,
            qk_norm: true,
            post_norms: true,
            qkv_bias: false,
        };
        let window = file
            .get(&key("attention.sliding_window"))
            .and_then(|v| v.as_u64())
            .ok_or_else(|| {
                Error::bad_model(
                    path,
                    format!("`{}` is missing", key("attention.sliding_window")),
                )
            })?;
        if window == 0 || window > MAX_DIM {
            return Err(Error::bad_model(path, format!("sliding window {window}")));
        }
        // `set_swa_pattern(6)`: five local layers, then a global one; local
        // layers use RoPE base 10000 (`rope_freq_base_train_swa`).
        self.local = Some(LocalLayers {
            window: window as usize,
            rope_base: 10000.0,
            period: 6,
        });
        Ok(())
    }
}

/// Llama 3.1's RoPE scaling as llama.cpp's converter stores it
/// (`rope_freqs.weight`, one divisor per rotated pair), or a linear scaling
/// (`rope.scaling.type = linear`, every frequency divided by the factor).
fn rope_factors(
    file: &GgufFile,
    key: &dyn Fn(&str) -> String,
    head_dim: usize,
) -> Result<Vec<f32>> {
    let path = file.path();
    if let Some(info) = file.tensor("rope_freqs.weight") {
        if info.dims != [head_dim as u64 / 2] {
            return Err(Error::bad_model(
                path,
                format!(
                    "`rope_freqs.weight` has shape {:?}, expected [{}]",
                    info.dims,
                    head_dim / 2
                ),
            ));
        }
        let factors = super::weights::dequantize(info.dtype, file.tensor_data(info))
            .map_err(|p| Error::bad_model(path, format!("tensor `rope_freqs.weight`: {p}")))?;
        if factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
            return Err(Error::bad_model(
                path,
                "`rope_freqs.weight` holds a factor that is not a positive number",
            ));
        }
        return Ok(factors);
    }
    match file.get_str(&key("rope.scaling.type")) {
        None | Some("none") => Ok(Vec::new()),
        Some("linear") => {
            let f = file.get_f64(&key("rope.scaling.factor")).unwrap_or(1.0);
            if !(f.is_finite() && f > 0.0) {
                return Err(Error::bad_model(path, format!("RoPE scaling factor {f}")));
            }
            Ok(vec![f as f32; head_dim / 2])
        }
        Some(other) => Err(Error::unsupported(path, format!("RoPE scaling `{other}`"))),
    }
}
