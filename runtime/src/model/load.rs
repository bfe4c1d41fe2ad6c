//! Putting a Llama model's weights on a device: from a GGUF file, from a
//! Hugging Face directory, or generated for speed measurements.

use std::path::Path;
use std::sync::Arc;

use half::f16;
use tandem_gpu::{DenseDevice, HostMatrix};
use tandem_kernels::ops::Rope;
use tandem_kernels::quant::AffineMatrix;
use tandem_kernels::rng::SplitMix64;

use super::config::{Config, Family};
use super::gguf::GgufFile;
use super::llama::{Layer, Llama};
use super::safetensors as hf;
use super::weights::{dequantize, host_matrix};
use crate::error::{Error, Result};

impl<D: DenseDevice> Llama<D> {
    /// Loads a GGUF file (llama, gemma3 or qwen2) onto `device`.
    pub fn from_gguf(file: &GgufFile, device: D) -> Result<Llama<D>> {
        let config = Config::from_gguf(file)?;
        let path = file.path().to_path_buf();
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<HostMatrix> {
            let info = file
                .tensor(name)
                .ok_or_else(|| Error::bad_model(&path, format!("tensor `{name}` is missing")))?;
            if info.dims != [cols as u64, rows as u64] {
                return Err(Error::bad_model(
                    &path,
                    format!(
                        "tensor `{name}` has shape {:?}, expected [{cols}, {rows}]",
                        info.dims
                    ),
                ));
            }
            host_matrix(info, file.tensor_data(info))
                .map_err(|p| Error::bad_model(&path, format!("tensor `{name}`: {p}")))
        };
        let vector = |name: &str, len: usize| -> Result<Vec<f32>> {
            let info = file
                .tensor(name)
                .ok_or_else(|| Error::bad_model(&path, format!("tensor `{name}` is missing")))?;
            if info.dims != [len as u64] {
                return Err(Error::bad_model(
                    &path,
                    format!(
                        "tensor `{name}` has shape {:?}, expected [{len}]",
                        info.dims
                    ),
                ));
            }
            dequantize(info.dtype, file.tensor_data(info))
                .map_err(|p| Error::bad_model(&path, format!("tensor `{name}`: {p}")))
        };
        let has_output = file.tensor("output.weight").is_some();
        Self::assemble(config, device, has_output, matrix, vector)
    }

    /// Loads a Hugging Face Llama checkpoint directory (`config.json` and
    /// `*.safetensors`) onto `device`. The q/k projections' rows are permuted from
    /// Hugging Face's half-split RoPE layout into the interleaved layout the forward
    /// pass uses (as llama.cpp's converter does).
    pub fn from_hf_dir(dir: &Path, device: D) -> Result<Llama<D>> {
        let config = hf::read_hf_config(dir)?;
        let weights = hf::SafetensorsDir::open(dir)?;
        let (n_heads, n_kv_heads) = (config.n_heads, config.n_kv_heads);
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<HostMatrix> {
            let m = weights.matrix(&hf::hf_tensor_name(name), rows, cols)?;
            Ok(if name.ends_with(".attn_q.weight") {
                hf::permute_qk(m, n_heads)
            } else if name.ends_with(".attn_k.weight") {
                hf::permute_qk(m, n_kv_heads)
            } else {
                m
            })
        };
        let vector = |name: &str, len: usize| weights.vector(&hf::hf_tensor_name(name), len);
        // Without `lm_head.weight` (`tie_word_embeddings`), the LM head is the embedding.
        let has_output = weights.tensor("lm_head.weight").is_some();
        Self::assemble(config, device, has_output, matrix, vector)
    }

    /// Builds the model from weight getters addressed by GGUF tensor names.
    fn assemble(
        config: Config,
        device: D,
        has_output: bool,
        mut matrix: impl FnMut(&str, usize, usize) -> Result<HostMatrix>,
        vector: impl Fn(&str, usize) -> Result<Vec<f32>>,
    ) -> Result<Llama<D>> {
        let mut weight_bytes = 0;
        let mut matrix = |name: &str, rows: usize, cols: usize| -> Result<HostMatrix> {
            let m = matrix(name, rows, cols)?;
            weight_bytes += m.size_bytes();
            Ok(m)
        };
        let c = &config;
        let (q_dim, kv_dim, f) = (c.q_dim(), c.kv_dim(), &c.family);
        let upload = |m: HostMatrix| -> Result<D::Matrix> { Ok(device.upload(m)?) };
        let vector = |name: &str, len: usize| -> Result<D::Buffer> {
            Ok(device.upload_vector(&vector(name, len)?)?)
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            let bias = |s: &str, len: usize| vector(&format!("blk.{i}.{s}.bias"), len);
            let post_norm = |s: &str| f.post_norms.then(|| vector(&p(s), c.dim)).transpose();
            layers.push(Arc::new(Layer {
                attn_norm: vector(&p("attn_norm"), c.dim)?,
                wq: upload(matrix(&p("attn_q"), q_dim, c.dim)?)?,
                wk: upload(matrix(&p("attn_k"), kv_dim, c.dim)?)?,
                wv: upload(matrix(&p("attn_v"), kv_dim, c.dim)?)?,
                qkv_bias: f
                    .qkv_bias
                    .then(|| -> Result<_> {
                        Ok([
                            bias("attn_q", q_dim)?,
                            bias("attn_k", kv_dim)?,
                            bias("attn_v", kv_dim)?,
                        ])
                    })
                    .transpose()?,
                qk_norm: f
                    .qk_norm
                    .then(|| -> Result<_> {
                        Ok([
                            vector(&p("attn_q_norm"), c.head_dim)?,
                            vector(&p("attn_k_norm"), c.head_dim)?,
                        ])
                    })
                    .transpose()?,
                wo: upload(matrix(&p("attn_output"), c.dim, q_dim)?)?,
                post_attn_norm: post_norm("post_attention_norm")?,
                ffn_norm: vector(&p("ffn_norm"), c.dim)?,
                w_gate: upload(matrix(&p("ffn_gate"), c.ffn_dim, c.dim)?)?,
                w_up: upload(matrix(&p("ffn_up"), c.ffn_dim, c.dim)?)?,
                w_down: upload(matrix(&p("ffn_down"), c.dim, c.ffn_dim)?)?,
                post_ffn_norm: post_norm("post_ffw_norm")?,
                rope: usize::from(c.layer_rope_base(i) != c.rope_base),
            }));
        }
        let embedding = matrix("token_embd.weight", c.vocab_size, c.dim)?;
        let lm_head = if has_output {
            upload(matrix("output.weight", c.vocab_size, c.dim)?)?
        } else {
            // Tied embeddings: the LM head is the embedding matrix.
            upload(embedding.clone())?
        };
        let output_norm = vector("output_norm.weight", c.dim)?;
        Ok(Llama {
            ropes: ropes(c),
            embedding: upload(embedding)?,
            config,
            device: Arc::new(device),
            layers,
            output_norm,
            lm_head,
            weight_bytes,
        })
    }

    /// A model of `config`'s shape with generated 4-bit weights, for speed
    /// measurements where no weights can be had. To fit in memory, one
    /// generated layer is shared by every layer (each layer still streams its
    /// weights from memory, as the shared layer is far larger than any cache);
    /// the LM head is the embedding. Its outputs are meaningless.
    pub fn synthetic(config: Config, device: D, seed: u64) -> Result<Llama<D>> {
        let c = &config;
        let mut rng = SplitMix64(seed);
        let mut random = |rows: usize, cols: usize| -> Result<HostMatrix> {
            // Uniform weights of standard deviation ~1/sqrt(cols).
            let d = f16::from_f32(0.75 / (cols as f32).sqrt());
            let m = f16::from_f32(-7.5 * d.to_f32());
            let mut codes = Vec::with_capacity(rows * cols);
            while codes.len() < rows * cols {
                let bits = rng.next_u64();
                codes.extend((0..16).map(|i| ((bits >> (4 * i)) & 15) as u8));
            }
            codes.truncate(rows * cols);
            let blocks = rows * cols / 32;
            let m =
                AffineMatrix::from_codes(rows, cols, 4, &codes, &vec![d; blocks], &vec![m; blocks])
                    .map_err(|e| Error::InvalidRequest(format!("generated weights: {e}")))?;
            Ok(HostMatrix::Affine(m))
        };
        if c.family != Family::llama() || c.local.is_some() {
            return Err(Error::InvalidRequest(
                "generated weights are built for the plain Llama family only".into(),
            ));
        }
        let kv_dim = c.kv_dim();
        let upload = |m: HostMatrix| -> Result<D::Matrix> { Ok(device.upload(m)?) };
        let ones = || -> Result<D::Buffer> { Ok(device.upload_vector(&vec![1.0; c.dim])?) };
        let layer = Arc::new(Layer {
            attn_norm: ones()?,
            wq: upload(random(c.dim, c.dim)?)?,
            wk: upload(random(kv_dim, c.dim)?)?,
            wv: upload(random(kv_dim, c.dim)?)?,
            qkv_bias: None,
            qk_norm: None,
            wo: upload(random(c.dim, c.dim)?)?,
            post_attn_norm: None,
            ffn_norm: ones()?,
            w_gate: upload(random(c.ffn_dim, c.dim)?)?,
            w_up: upload(random(c.ffn_dim, c.dim)?)?,
            w_down: upload(random(c.dim, c.ffn_dim)?)?,
            post_ffn_norm: None,
            rope: 0,
        });
        let layer_bytes =
            2 * c.dim * c.dim / 2 + 2 * kv_dim * c.dim / 2 + 3 * c.ffn_dim * c.dim / 2;
        let embedding = random(c.vocab_size, c.dim)?;
        let weight_bytes = c.n_layers * layer_bytes * 9 / 8 + embedding.size_bytes();
        let lm_head = upload(embedding.clone())?;
        Ok(Llama {
            ropes: ropes(c),
            layers: vec![layer; c.n_layers],
            output_norm: ones()?,
            embedding: upload(embedding)?,
            config,
            device: Arc::new(device),
            lm_head,
            weight_bytes,
        })
    }
}

/// The model's RoPE tables: the global layers', then the local layers' if
/// their base differs (scaling applies to the global layers only, as in Gemma 3).
fn ropes(c: &Config) -> Vec<Rope> {
    let mut ropes = vec![Rope::with_factors(c.head_dim, c.rope_base, &c.rope_factors)];
    if let Some(local) = c.local.as_ref().filter(|l| l.rope_base != c.rope_base) {
        ropes.push(Rope::new(c.head_dim, local.rope_base));
    }
    ropes
}

/// Opens a model file on `device`.
pub fn load_gguf<D: DenseDevice>(path: &Path, device: D) -> Result<(GgufFile, Llama<D>)> {
    let file = GgufFile::open(path)?;
    let model = Llama::from_gguf(&file, device)?;
    Ok((file, model))
}
