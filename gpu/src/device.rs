//! The dense device trait: what the forward pass and the split step ask of the
//! device that holds the weights, the activations and each sequence's window.

use std::ops::Range;

use half::bf16;
use tandem_kernels::sas::Softmax;

use crate::error::DeviceError;

use crate::host::{AttentionShape, HostMatrix};

/// A device buffer of `f32`: activations (`rows × width`, row-major) or a small
/// vector of weights (norm gains, rotary angles).
pub trait DeviceBuffer: Send + Sync {
    /// Elements held.
    fn len(&self) -> usize;

    /// Whether the buffer holds no element.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a rotary embedding pairs a head's elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])`: llama GGUFs, whose q/k rows llama.cpp's
    /// converter permutes into this layout.
    Interleaved,
    /// The halves `(x[i], x[i + d/2])`: GPT-NeoX's layout, kept by Gemma and
    /// Qwen2 GGUFs and by Hugging Face checkpoints.
    Halves,
}

/// The activation of a gated feed-forward block, `act(gate) · up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama, Qwen2).
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluTanh,
}

/// The keys one [`DenseDevice::attention`] call attends: layer `layer` of a
/// sequence's cache, every row or, with a sliding `window` of `W`, each
/// query's last `W` rows, and how their scores become softmax weights.
#[derive(Debug, Clone, Copy)]
pub struct KvLayer<'a, K> {
    /// The sequence's cache.
    pub kv: &'a K,
    /// The layer.
    pub layer: usize,
    /// The sliding window, if any.
    pub window: Option<usize>,
    /// The softmax's weights: exact, or TurboAttention's SAS
    /// ([`tandem_kernels::sas`]). The CPU device follows it; the CUDA device
    /// computes exact weights whatever it says.
    pub softmax: Softmax,
}

/// The dense side of a decode step.
///
/// An implementation owns everything that lives on it: weight matrices
/// ([`DenseDevice::Matrix`]), activations ([`DenseDevice::Buffer`]) and each
/// sequence's sinks + recent window of keys and values ([`DenseDevice::Kv`]).
/// The host sees device memory only through the calls that cross the seam,
/// which are exactly the split step's three transfers plus the logits:
///
/// 1. [`DenseDevice::kv_take`]: rows leaving the window go to the CPU workers'
///    store (a borrow-and-copy on the CPU device; a device-to-host copy into
///    pinned staging on a GPU);
/// 2. [`DenseDevice::to_host`] on the step's queries, for the workers (a plain
///    borrow on the CPU device, no copy; an async copy into `staging` on a GPU);
/// 3. [`DenseDevice::merge_partials`]: the workers' partial outputs and
///    log-sum-exps come back and merge into the device's own partial.
///
/// Everything else (norms, rotary embedding, matrix products, window attention)
/// runs on the device over device buffers. The CUDA implementation
/// (`tandem-cuda`) maps each method to a cuBLAS call or a small kernel on one
/// stream, with `Buffer` a device slice and `Kv` per-layer device arrays of
/// window rows; `to_host` and `kv_take` copy to the host. Calls are
/// synchronous as seen by the caller: a GPU implementation synchronises inside
/// the methods that return host data, and only there.
pub trait DenseDevice: Send + Sync {
    /// A weight matrix resident on the device.
    type Matrix: Send + Sync;
    /// A buffer of `f32` resident on the device.
    type Buffer: DeviceBuffer;
    /// One sequence's keys and values on the device, for every layer.
    type Kv: Send + Sync;

    /// A short description, e.g. `cpu (avx512, 2 threads)`.
    fn name(&self) -> String;

    // ---- memory -------------------------------------------------------------

    /// Makes a host matrix resident on the device.
    fn upload(&self, matrix: HostMatrix) -> Result<Self::Matrix, DeviceError>;

    /// A device buffer holding a copy of `values`.
    fn upload_vector(&self, values: &[f32]) -> Result<Self::Buffer, DeviceError>;

    /// A zeroed device buffer of `len` elements.
    fn zeros(&self, len: usize) -> Result<Self::Buffer, DeviceError>;

    /// Elements `range` of `buf` as host memory: a borrow of the buffer where
    /// the device is the host, else a copy into `staging`.
    fn to_host<'a>(
        &self,
        buf: &'a Self::Buffer,
        range: Range<usize>,
        staging: &'a mut Vec<f32>,
    ) -> Result<&'a [f32], DeviceError>;

    /// The whole buffer, moved to host memory (no copy where the device is the host).
    fn download(&self, buf: Self::Buffer) -> Result<Vec<f32>, DeviceError>;

    // ---- the layer's arithmetic ----------------------------------------------

    /// `out[t] = embedding row tokens[t]`, for `out` of `tokens × cols`.
    fn embed(
        &self,
        table: &Self::Matrix,
        tokens: &[u32],
        out: &mut Self::Buffer,
    ) -> Result<(), DeviceError>;

    /// `ys[t] = W · xs[t]` for every token `t`: `xs` is `tokens × cols`, `ys`
    /// is `tokens × rows`.
    fn matmul(
        &self,
        w: &Self::Matrix,
        xs: &Self::Buffer,
        ys: &mut Self::Buffer,
    ) -> Result<(), DeviceError>;

    /// RMS norm of every row of `xs` (rows of `weight.len()`), times `weight`.
    fn rms_norm(
        &self,
        xs: &Self::Buffer,
        weight: &Self::Buffer,
        eps: f32,
        out: &mut Self::Buffer,
    ) -> Result<(), DeviceError>;

    /// Rotary embedding of every head (of `head_dim`) of every row of `xs`, its
    /// pairs (as `style` says) rotated by row `t`'s angles: `angles` holds
    /// `head_dim / 2` pairs `(cos, sin)` per row.
    fn rope(
        &self,
        xs: &mut Self::Buffer,
        head_dim: usize,
        angles: &Self::Buffer,
        style: RopeStyle,
    ) -> Result<(), DeviceError>;

    /// A gated activation: `gate = act(gate) · up`.
    fn glu(
        &self,
        activation: Activation,
        gate: &mut Self::Buffer,
        up: &Self::Buffer,
    ) -> Result<(), DeviceError>;

    /// `x += y`.
    fn add(&self, x: &mut Self::Buffer, y: &Self::Buffer) -> Result<(), DeviceError>;

    /// `x *= s`.
    fn scale(&self, x: &mut Self::Buffer, s: f32) -> Result<(), DeviceError>;

    /// `row += bias` for every row of `xs` (rows of `bias.len()`).
    fn add_bias(&self, xs: &mut Self::Buffer, bias: &Self::Buffer) -> Result<(), DeviceError>;

    // ---- one sequence's window -----------------------------------------------

    /// An empty cache of `n_layers` layers.
    fn kv_new(&self, n_layers: usize, shape: AttentionShape) -> Result<Self::Kv, DeviceError>;

    /// A copy of `kv` (one prefill measured under several policies).
    fn kv_fork(&self, kv: &Self::Kv) -> Result<Self::Kv, DeviceError>;

    /// Rows held in `layer`.
    fn kv_len(&self, kv: &Self::Kv, layer: usize) -> usize;

    /// Bytes of keys and values held.
    fn kv_bytes(&self, kv: &Self::Kv) -> usize;

    /// Appends rows `rows` of `k` and `v` (each row `n_kv_heads × head_dim`,
    /// RoPE applied to the keys) to `layer`.
    fn kv_append(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        k: &Self::Buffer,
        v: &Self::Buffer,
        rows: Range<usize>,
    ) -> Result<(), DeviceError>;

    /// Moves `count` rows of `layer` from row `start` out of the device,
    /// appending them to `keys` and `values` as `count × n_kv_heads × head_dim`
    /// bf16 (the layout the CPU store loads). Later rows move down.
    fn kv_take(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        start: usize,
        count: usize,
        keys: &mut Vec<bf16>,
        values: &mut Vec<bf16>,
    ) -> Result<(), DeviceError>;

    /// Forgets `count` rows of `layer` from row `start` (a sliding window's
    /// oldest rows); later rows move down.
    fn kv_discard(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        start: usize,
        count: usize,
    ) -> Result<(), DeviceError>;

    /// Drops every row from `len` on, in every layer.
    fn kv_truncate(&self, kv: &mut Self::Kv, len: usize);

    /// Causal attention of the queries in rows `rows` of `q` (each
    /// `n_heads × head_dim`, RoPE applied) over `keys`, whose last
    /// `rows.len()` rows are these queries' own keys and values: query `t`
    /// sees rows `0..=first + t`, `first = kv_len - rows.len()`, or with a
    /// sliding window of `W` only the last `W` of them. Writes the same rows
    /// of `out` (normalised over these rows) and of `lse` (`n_heads`
    /// log-sum-exps per row), so the caller can merge them with attention
    /// computed elsewhere.
    fn attention(
        &self,
        keys: KvLayer<'_, Self::Kv>,
        q: &Self::Buffer,
        rows: Range<usize>,
        out: &mut Self::Buffer,
        lse: &mut Self::Buffer,
    ) -> Result<(), DeviceError>;

    /// Merges a partial computed elsewhere into rows `rows` of the device's
    /// partial (`out`, normalised; `lse`, per row and head): afterwards `out`
    /// is the softmax over the union of both parts' keys. `part_out` and
    /// `part_lse` are host memory laid out like those rows; an empty part has
    /// `lse = -inf`.
    fn merge_partials(
        &self,
        out: &mut Self::Buffer,
        lse: &Self::Buffer,
        rows: Range<usize>,
        part_out: &[f32],
        part_lse: &[f32],
    ) -> Result<(), DeviceError>;
}
