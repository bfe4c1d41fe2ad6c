//! The Llama architecture: configuration, weights and the forward pass.

use std::path::Path;
use std::sync::Arc;

use half::f16;
use tandem_gpu::{AttentionShape, DenseDevice, HostMatrix};
use tandem_kernels::ops::{add_in_place, rms_norm, silu_mul_in_place, Rope};
use tandem_kernels::quant::AffineMatrix;
use tandem_kernels::rng::SplitMix64;

use super::gguf::GgufFile;
use super::safetensors as hf;
use super::weights::{dequantize, host_matrix};
use crate::error::{Error, Result};
use crate::split::SequenceKv;

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

    fn from_gguf(file: &GgufFile) -> Result<Config> {
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

struct Layer<M> {
    attn_norm: Vec<f32>,
    wq: M,
    wk: M,
    wv: M,
    wo: M,
    ffn_norm: Vec<f32>,
    w_gate: M,
    w_up: M,
    w_down: M,
}

/// A Llama model with its weights resident on a dense device.
pub struct Llama<D: DenseDevice> {
    config: Config,
    device: D,
    embedding: HostMatrix,
    /// Shared so that generated weights can repeat one layer (see [`Llama::synthetic`]).
    layers: Vec<Arc<Layer<D::Matrix>>>,
    output_norm: Vec<f32>,
    lm_head: D::Matrix,
    rope: Rope,
    weight_bytes: usize,
}

/// Which positions of a forward pass need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position (teacher-forced evaluation).
    All,
}

impl<D: DenseDevice> Llama<D> {
    /// Loads a Llama GGUF file onto `device`.
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
        let kv_dim = c.n_kv_heads * c.head_dim;
        let upload = |m: HostMatrix| device.upload(m).map_err(|e| Error::Engine(e.to_string()));
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Arc::new(Layer {
                attn_norm: vector(&p("attn_norm"), c.dim)?,
                wq: upload(matrix(&p("attn_q"), c.dim, c.dim)?)?,
                wk: upload(matrix(&p("attn_k"), kv_dim, c.dim)?)?,
                wv: upload(matrix(&p("attn_v"), kv_dim, c.dim)?)?,
                wo: upload(matrix(&p("attn_output"), c.dim, c.dim)?)?,
                ffn_norm: vector(&p("ffn_norm"), c.dim)?,
                w_gate: upload(matrix(&p("ffn_gate"), c.ffn_dim, c.dim)?)?,
                w_up: upload(matrix(&p("ffn_up"), c.ffn_dim, c.dim)?)?,
                w_down: upload(matrix(&p("ffn_down"), c.dim, c.ffn_dim)?)?,
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
            rope: Rope::new(c.head_dim, c.rope_base),
            config,
            device,
            embedding,
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
        let engine = |e: String| Error::Engine(e);
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
            AffineMatrix::from_codes(rows, cols, 4, &codes, &vec![d; blocks], &vec![m; blocks])
                .map(HostMatrix::Affine)
                .map_err(|e| engine(e.to_string()))
        };
        let kv_dim = c.n_kv_heads * c.head_dim;
        let upload = |m: HostMatrix| device.upload(m).map_err(|e| Error::Engine(e.to_string()));
        let layer = Arc::new(Layer {
            attn_norm: vec![1.0; c.dim],
            wq: upload(random(c.dim, c.dim)?)?,
            wk: upload(random(kv_dim, c.dim)?)?,
            wv: upload(random(kv_dim, c.dim)?)?,
            wo: upload(random(c.dim, c.dim)?)?,
            ffn_norm: vec![1.0; c.dim],
            w_gate: upload(random(c.ffn_dim, c.dim)?)?,
            w_up: upload(random(c.ffn_dim, c.dim)?)?,
            w_down: upload(random(c.dim, c.ffn_dim)?)?,
        });
        let layer_bytes =
            2 * c.dim * c.dim / 2 + 2 * kv_dim * c.dim / 2 + 3 * c.ffn_dim * c.dim / 2;
        let embedding = random(c.vocab_size, c.dim)?;
        let weight_bytes = c.n_layers * layer_bytes * 9 / 8 + embedding.size_bytes();
        let lm_head = upload(embedding.clone())?;
        Ok(Llama {
            rope: Rope::new(c.head_dim, c.rope_base),
            layers: vec![layer; c.n_layers],
            output_norm: vec![1.0; c.dim],
            config,
            device,
            embedding,
            lm_head,
            weight_bytes,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The device the model runs on.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// Bytes of weights read per decoded token.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// A new, empty sequence with every layer dense on the device.
    pub fn new_cache(&self) -> SequenceKv {
        SequenceKv::dense(self.config.n_layers, self.config.attention_shape())
    }

    /// Runs `tokens` of one sequence through the model (see [`Llama::forward_batch`]).
    pub fn forward(&self, tokens: &[u32], kv: &mut SequenceKv, want: Logits) -> Result<Vec<f32>> {
        let mut steps = [Step { tokens, kv, want }];
        let mut logits = self.forward_batch(&mut steps)?;
        Ok(logits.pop().unwrap_or_default())
    }

    /// Runs each step's tokens through the model at its sequence's next
    /// positions, appending their keys and values; returns each step's logits
    /// (`vocab` per requested position). The sequences share every matrix
    /// product (the weights are read once per batch); each attends its own keys,
    /// the CPU workers serving one sequence while the device attends another.
    pub fn forward_batch(&self, steps: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let (dim, hd, kv_dim) = (c.dim, c.head_dim, c.n_kv_heads * c.head_dim);
        let engine = |e: tandem_gpu::DeviceError| Error::Engine(e.to_string());
        for step in steps.iter() {
            step.kv.check_usable()?;
            if step.tokens.is_empty() {
                return Err(Error::InvalidRequest("no tokens to run".into()));
            }
            if let Some(&t) = step.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(Error::InvalidRequest(format!(
                    "token id {t} is outside the vocabulary of {}",
                    c.vocab_size
                )));
            }
        }
        // Row ranges of each step in the stacked activations.
        let mut spans = Vec::with_capacity(steps.len());
        let mut n = 0;
        for step in steps.iter() {
            spans.push(n..n + step.tokens.len());
            n += step.tokens.len();
        }

        let mut x = vec![0f32; n * dim];
        for (row, &t) in x
            .chunks_exact_mut(dim)
            .zip(steps.iter().flat_map(|s| s.tokens))
        {
            self.embedding.row(t as usize, row);
        }
        let mut h = vec![0f32; n * dim];
        let mut q = vec![0f32; n * dim];
        let mut k = vec![0f32; n * kv_dim];
        let mut v = vec![0f32; n * kv_dim];
        let mut attn = vec![0f32; n * dim];
        let mut lse = vec![0f32; n * c.n_heads];
        let mut gate = vec![0f32; n * c.ffn_dim];
        let mut up = vec![0f32; n * c.ffn_dim];
        // Rotary angles depend only on the position: once per token, not per head and layer.
        let mut angles = Vec::with_capacity(n);
        for step in steps.iter() {
            for t in 0..step.tokens.len() {
                let mut a = Vec::new();
                self.rope.angles(step.kv.positions() + t, &mut a);
                angles.push(a);
            }
        }

        let result = (|| -> Result<()> {
            for (li, layer) in self.layers.iter().enumerate() {
                // Attention block.
                for (hr, xr) in h.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
                    rms_norm(xr, &layer.attn_norm, c.rms_eps, hr);
                }
                self.device.matmul(&layer.wq, &h, &mut q).map_err(engine)?;
                self.device.matmul(&layer.wk, &h, &mut k).map_err(engine)?;
                self.device.matmul(&layer.wv, &h, &mut v).map_err(engine)?;
                for t in 0..n {
                    for head in q[t * dim..(t + 1) * dim].chunks_exact_mut(hd) {
                        self.rope.rotate_interleaved_with(head, &angles[t]);
                    }
                    for head in k[t * kv_dim..(t + 1) * kv_dim].chunks_exact_mut(hd) {
                        self.rope.rotate_interleaved_with(head, &angles[t]);
                    }
                }
                // Queries go to the CPU workers first, so they work while the device attends.
                for (step, r) in steps.iter_mut().zip(&spans) {
                    step.kv.begin_layer(
                        li,
                        &k[r.start * kv_dim..r.end * kv_dim],
                        &v[r.start * kv_dim..r.end * kv_dim],
                        &q[r.start * dim..r.end * dim],
                    )?;
                }
                for (step, r) in steps.iter().zip(&spans) {
                    let cache = step.kv.device_cache();
                    self.device
                        .attention(
                            cache,
                            li,
                            &q[r.start * dim..r.end * dim],
                            cache.len(li) - r.len(),
                            &mut attn[r.start * dim..r.end * dim],
                            &mut lse[r.start * c.n_heads..r.end * c.n_heads],
                        )
                        .map_err(engine)?;
                }
                for (step, r) in steps.iter_mut().zip(&spans) {
                    step.kv.finish_layer(
                        li,
                        &q[r.start * dim..r.end * dim],
                        &mut attn[r.start * dim..r.end * dim],
                        &lse[r.start * c.n_heads..r.end * c.n_heads],
                    )?;
                }
                self.device
                    .matmul(&layer.wo, &attn, &mut h)
                    .map_err(engine)?;
                add_in_place(&mut x, &h);

                // Feed-forward block.
                for (hr, xr) in h.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
                    rms_norm(xr, &layer.ffn_norm, c.rms_eps, hr);
                }
                self.device
                    .matmul(&layer.w_gate, &h, &mut gate)
                    .map_err(engine)?;
                self.device
                    .matmul(&layer.w_up, &h, &mut up)
                    .map_err(engine)?;
                silu_mul_in_place(&mut gate, &up);
                self.device
                    .matmul(&layer.w_down, &gate, &mut h)
                    .map_err(engine)?;
                add_in_place(&mut x, &h);
            }
            Ok(())
        })();
        if let Err(e) = result {
            // A half-run step leaves rows in some layers only: no sequence of
            // this batch is usable until reset.
            for step in steps.iter_mut() {
                step.kv.settle();
                step.kv.mark_broken();
            }
            return Err(e);
        }
        for (step, r) in steps.iter_mut().zip(&spans) {
            step.kv.advance(r.len());
        }

        let mut all_logits = Vec::with_capacity(steps.len());
        for (step, r) in steps.iter().zip(&spans) {
            let rows = match step.want {
                Logits::Last => r.end - 1..r.end,
                Logits::All => r.clone(),
            };
            let mut normed = vec![0f32; rows.len() * dim];
            for (o, t) in normed.chunks_exact_mut(dim).zip(rows) {
                rms_norm(&x[t * dim..(t + 1) * dim], &self.output_norm, c.rms_eps, o);
            }
            let mut logits = vec![0f32; normed.len() / dim * c.vocab_size];
            self.device
                .matmul(&self.lm_head, &normed, &mut logits)
                .map_err(engine)?;
            all_logits.push(logits);
        }
        Ok(all_logits)
    }
}

/// One sequence's part of a batched forward pass.
pub struct Step<'a> {
    /// Tokens to run, at the sequence's next positions.
    pub tokens: &'a [u32],
    /// The sequence's keys and values.
    pub kv: &'a mut SequenceKv,
    /// Which positions' logits to return.
    pub want: Logits,
}

/// Opens a model file for a Llama model on `device`.
pub fn load_gguf<D: DenseDevice>(path: &Path, device: D) -> Result<(GgufFile, Llama<D>)> {
    let file = GgufFile::open(path)?;
    let model = Llama::from_gguf(&file, device)?;
    Ok((file, model))
}
