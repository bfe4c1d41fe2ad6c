//! The forward pass, written once against the dense device trait for every
//! family tandem runs: embedding, then per layer an attention block and a
//! feed-forward block, then the head. What differs between families (RoPE
//! style and bases, activation, the extra norms, biases, sliding windows) is
//! data in [`Config`] and optional weights in [`Layer`].

use std::ops::Range;
use std::sync::Arc;

use tandem_gpu::DenseDevice;
use tandem_kernels::ops::Rope;

use super::config::Config;
use crate::error::{Error, Result};
use crate::split::{self, SequenceKv};

/// One layer's weights, resident on the device.
pub(super) struct Layer<D: DenseDevice> {
    pub(super) attn_norm: D::Buffer,
    pub(super) wq: D::Matrix,
    pub(super) wk: D::Matrix,
    pub(super) wv: D::Matrix,
    /// Projection biases (Qwen2): q, k, v.
    pub(super) qkv_bias: Option<[D::Buffer; 3]>,
    /// Per-head norms of queries and keys (Gemma 3): q, k.
    pub(super) qk_norm: Option<[D::Buffer; 2]>,
    pub(super) wo: D::Matrix,
    /// Norm of the attention output before the residual add (Gemma).
    pub(super) post_attn_norm: Option<D::Buffer>,
    pub(super) ffn_norm: D::Buffer,
    pub(super) w_gate: D::Matrix,
    pub(super) w_up: D::Matrix,
    pub(super) w_down: D::Matrix,
    /// Norm of the feed-forward output before the residual add (Gemma).
    pub(super) post_ffn_norm: Option<D::Buffer>,
    /// Which of the model's RoPE tables the layer rotates with.
    pub(super) rope: usize,
}

/// A model of any family tandem runs (Llama, Gemma 3, Qwen2; named for the
/// architecture the others vary) with its weights resident on a dense device.
pub struct Llama<D: DenseDevice> {
    pub(super) config: Config,
    pub(super) device: Arc<D>,
    pub(super) embedding: D::Matrix,
    /// Shared so that generated weights can repeat one layer (see [`Llama::synthetic`]).
    pub(super) layers: Vec<Arc<Layer<D>>>,
    pub(super) output_norm: D::Buffer,
    pub(super) lm_head: D::Matrix,
    /// RoPE tables: the global layers' first, then the local layers' if they differ.
    pub(super) ropes: Vec<Rope>,
    pub(super) weight_bytes: usize,
}

/// Which positions of a forward pass need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position (teacher-forced evaluation).
    All,
}

/// One sequence's part of a batched forward pass.
pub struct Step<'a, D: DenseDevice> {
    /// Tokens to run, at the sequence's next positions.
    pub tokens: &'a [u32],
    /// The sequence's keys and values.
    pub kv: &'a mut SequenceKv<D>,
    /// Which positions' logits to return.
    pub want: Logits,
}

/// The activations of one forward pass, `rows` tokens stacked, on the device.
struct Activations<D: DenseDevice> {
    /// The residual stream.
    x: D::Buffer,
    /// Normed input of a block, then its output.
    h: D::Buffer,
    q: D::Buffer,
    k: D::Buffer,
    v: D::Buffer,
    /// Where per-head norms of `q` and `k` land before they swap in (empty
    /// without such norms).
    q_normed: D::Buffer,
    k_normed: D::Buffer,
    attn: D::Buffer,
    lse: D::Buffer,
    gate: D::Buffer,
    up: D::Buffer,
    /// A block's output, normed (empty without post-norms).
    post: D::Buffer,
    /// Rotary (cos, sin) pairs per row, one buffer per RoPE table.
    angles: Vec<D::Buffer>,
}

impl<D: DenseDevice> Activations<D> {
    fn new(device: &D, c: &Config, rows: usize, angles: &[Vec<f32>]) -> Result<Activations<D>> {
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let f = &c.family;
        let if_used = |used: bool, len: usize| device.zeros(if used { len } else { 0 });
        Ok(Activations {
            x: device.zeros(rows * c.dim)?,
            h: device.zeros(rows * c.dim)?,
            q: device.zeros(rows * q_dim)?,
            k: device.zeros(rows * kv_dim)?,
            v: device.zeros(rows * kv_dim)?,
            q_normed: if_used(f.qk_norm, rows * q_dim)?,
            k_normed: if_used(f.qk_norm, rows * kv_dim)?,
            attn: device.zeros(rows * q_dim)?,
            lse: device.zeros(rows * c.n_heads)?,
            gate: device.zeros(rows * c.ffn_dim)?,
            up: device.zeros(rows * c.ffn_dim)?,
            post: if_used(f.post_norms, rows * c.dim)?,
            angles: angles
                .iter()
                .map(|a| device.upload_vector(a))
                .collect::<std::result::Result<_, _>>()?,
        })
    }
}

impl<D: DenseDevice> Llama<D> {
    /// The model's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Arc<D> {
        &self.device
    }

    /// Bytes of weights read per decoded token.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// A new, empty sequence with every layer dense on the device, but the
    /// model's sliding-window layers, which keep their window.
    pub fn new_cache(&self) -> Result<SequenceKv<D>> {
        let c = &self.config;
        SequenceKv::dense(
            Arc::clone(&self.device),
            &c.sliding_windows(),
            c.attention_shape(),
        )
    }

    /// Runs `tokens` of one sequence through the model (see [`Llama::forward_batch`]).
    pub fn forward(
        &self,
        tokens: &[u32],
        kv: &mut SequenceKv<D>,
        want: Logits,
    ) -> Result<Vec<f32>> {
        self.forward_until(tokens, kv, want, &|| false)
    }

    /// [`Llama::forward`], asking `stop` before every layer (see
    /// [`Llama::forward_batch_until`]).
    pub fn forward_until(
        &self,
        tokens: &[u32],
        kv: &mut SequenceKv<D>,
        want: Logits,
        stop: &dyn Fn() -> bool,
    ) -> Result<Vec<f32>> {
        let mut steps = [Step { tokens, kv, want }];
        let mut logits = self.forward_batch_until(&mut steps, stop)?;
        Ok(logits.pop().unwrap_or_default())
    }

    /// Runs each step's tokens through the model at its sequence's next
    /// positions, appending their keys and values; returns each step's logits
    /// (`vocab` per requested position). The sequences share every matrix
    /// product (the weights are read once per batch) and each attends its own
    /// keys.
    pub fn forward_batch(&self, steps: &mut [Step<'_, D>]) -> Result<Vec<Vec<f32>>> {
        self.forward_batch_until(steps, &|| false)
    }

    /// [`Llama::forward_batch`], asking `stop` before every layer. When it
    /// says so, the rows the step added are taken back and the step fails
    /// with [`Error::Cancelled`]; a sequence whose rows cannot be taken back
    /// (the step moved rows off the device) is left broken, as after any
    /// failed step.
    pub fn forward_batch_until(
        &self,
        steps: &mut [Step<'_, D>],
        stop: &dyn Fn() -> bool,
    ) -> Result<Vec<Vec<f32>>> {
        self.check_steps(steps)?;
        let spans = stacked_rows(steps);
        let rows = spans.last().map_or(0, |r| r.end);
        let tokens: Vec<u32> = steps.iter().flat_map(|s| s.tokens).copied().collect();
        let mut a = Activations::new(&*self.device, &self.config, rows, &self.angles(steps))?;
        self.device.embed(&self.embedding, &tokens, &mut a.x)?;
        if self.config.family.embed_scale != 1.0 {
            self.device
                .scale(&mut a.x, self.config.family.embed_scale)?;
        }
        let mut seqs: Vec<_> = steps
            .iter_mut()
            .map(|s| &mut *s.kv)
            .zip(spans.clone())
            .collect();
        let before: Vec<Vec<usize>> = seqs.iter().map(|(kv, _)| kv.device_rows()).collect();
        let mut done = 0;
        let layers = (|| -> Result<()> {
            for (li, layer) in self.layers.iter().enumerate() {
                if stop() {
                    return Err(Error::Cancelled);
                }
                self.attention_block(li, layer, &mut a, &mut seqs)?;
                self.ffn_block(layer, &mut a)?;
                done = li + 1;
            }
            Ok(())
        })();
        if let Err(e) = layers {
            for ((kv, r), before) in seqs.iter_mut().zip(&before) {
                match e {
                    Error::Cancelled => kv.undo_step(before, done, r.len()),
                    // A half-run step leaves rows in some layers only: no
                    // sequence of this batch is usable until reset.
                    _ => {
                        kv.settle();
                        kv.mark_broken();
                    }
                }
            }
            return Err(e);
        }
        for (kv, r) in &mut seqs {
            kv.advance(r.len());
        }
        steps
            .iter()
            .zip(&spans)
            .map(|(step, r)| match step.want {
                Logits::Last => self.logits(&a.x, r.end - 1..r.end),
                Logits::All => self.logits(&a.x, r.clone()),
            })
            .collect()
    }

    /// `x += attention(rms_norm(x))` for every sequence of the batch.
    fn attention_block(
        &self,
        li: usize,
        layer: &Layer<D>,
        a: &mut Activations<D>,
        seqs: &mut [(&mut SequenceKv<D>, Range<usize>)],
    ) -> Result<()> {
        let (d, c) = (&*self.device, &self.config);
        d.rms_norm(&a.x, &layer.attn_norm, c.rms_eps, &mut a.h)?;
        d.matmul(&layer.wq, &a.h, &mut a.q)?;
        d.matmul(&layer.wk, &a.h, &mut a.k)?;
        d.matmul(&layer.wv, &a.h, &mut a.v)?;
        if let Some([bq, bk, bv]) = &layer.qkv_bias {
            d.add_bias(&mut a.q, bq)?;
            d.add_bias(&mut a.k, bk)?;
            d.add_bias(&mut a.v, bv)?;
        }
        if let Some([q_norm, k_norm]) = &layer.qk_norm {
            // Norms of each head's row (the weights are `head_dim` long).
            d.rms_norm(&a.q, q_norm, c.rms_eps, &mut a.q_normed)?;
            d.rms_norm(&a.k, k_norm, c.rms_eps, &mut a.k_normed)?;
            std::mem::swap(&mut a.q, &mut a.q_normed);
            std::mem::swap(&mut a.k, &mut a.k_normed);
        }
        let angles = &a.angles[layer.rope];
        d.rope(&mut a.q, c.head_dim, angles, c.family.rope_style)?;
        d.rope(&mut a.k, c.head_dim, angles, c.family.rope_style)?;
        if c.family.query_scale != 1.0 {
            d.scale(&mut a.q, c.family.query_scale)?;
        }
        split::attend(d, li, seqs, &a.q, &a.k, &a.v, &mut a.attn, &mut a.lse)?;
        d.matmul(&layer.wo, &a.attn, &mut a.h)?;
        self.residual(&mut a.x, &a.h, layer.post_attn_norm.as_ref(), &mut a.post)
    }

    /// `x += w_down · (act(w_gate · h) ⊙ w_up · h)`, `h = rms_norm(x)`.
    fn ffn_block(&self, layer: &Layer<D>, a: &mut Activations<D>) -> Result<()> {
        let (d, c) = (&*self.device, &self.config);
        d.rms_norm(&a.x, &layer.ffn_norm, c.rms_eps, &mut a.h)?;
        d.matmul(&layer.w_gate, &a.h, &mut a.gate)?;
        d.matmul(&layer.w_up, &a.h, &mut a.up)?;
        d.glu(c.family.activation, &mut a.gate, &a.up)?;
        d.matmul(&layer.w_down, &a.gate, &mut a.h)?;
        self.residual(&mut a.x, &a.h, layer.post_ffn_norm.as_ref(), &mut a.post)
    }

    /// `x += out`, or `x += rms_norm(out)` with a post-norm.
    fn residual(
        &self,
        x: &mut D::Buffer,
        out: &D::Buffer,
        post_norm: Option<&D::Buffer>,
        normed: &mut D::Buffer,
    ) -> Result<()> {
        let d = &*self.device;
        match post_norm {
            Some(w) => {
                d.rms_norm(out, w, self.config.rms_eps, normed)?;
                Ok(d.add(x, normed)?)
            }
            None => Ok(d.add(x, out)?),
        }
    }

    /// Logits of rows `rows` of the residual stream.
    fn logits(&self, x: &D::Buffer, rows: Range<usize>) -> Result<Vec<f32>> {
        let (d, c) = (&*self.device, &self.config);
        let mut staging = Vec::new();
        let picked = d.to_host(x, rows.start * c.dim..rows.end * c.dim, &mut staging)?;
        let picked = d.upload_vector(picked)?;
        let mut normed = d.zeros(rows.len() * c.dim)?;
        d.rms_norm(&picked, &self.output_norm, c.rms_eps, &mut normed)?;
        let mut logits = d.zeros(rows.len() * c.vocab_size)?;
        d.matmul(&self.lm_head, &normed, &mut logits)?;
        Ok(d.download(logits)?)
    }

    /// Rotary (cos, sin) pairs of every row, at each sequence's next positions,
    /// per RoPE table: once per token, shared by every head and layer.
    fn angles(&self, steps: &[Step<'_, D>]) -> Vec<Vec<f32>> {
        let rows: usize = steps.iter().map(|s| s.tokens.len()).sum();
        self.ropes
            .iter()
            .map(|rope| {
                let mut flat = Vec::with_capacity(self.config.head_dim * rows);
                for step in steps {
                    for t in 0..step.tokens.len() {
                        rope.push_angles(step.kv.positions() + t, &mut flat);
                    }
                }
                flat
            })
            .collect()
    }

    fn check_steps(&self, steps: &[Step<'_, D>]) -> Result<()> {
        if steps.is_empty() {
            return Err(Error::InvalidRequest("no sequence to run".into()));
        }
        for step in steps {
            step.kv.check_usable()?;
            if step.tokens.is_empty() {
                return Err(Error::InvalidRequest("no tokens to run".into()));
            }
            let vocab = self.config.vocab_size;
            if let Some(&t) = step.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::InvalidRequest(format!(
                    "token id {t} is outside the vocabulary of {vocab}"
                )));
            }
        }
        Ok(())
    }
}

/// Row ranges of each step in the stacked activations.
fn stacked_rows<D: DenseDevice>(steps: &[Step<'_, D>]) -> Vec<Range<usize>> {
    let mut n = 0;
    steps
        .iter()
        .map(|s| {
            n += s.tokens.len();
            n - s.tokens.len()..n
        })
        .collect()
}
