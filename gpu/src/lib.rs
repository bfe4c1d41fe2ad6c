//! tandem's dense device: the part of a decode step that runs on the GPU when there
//! is one, and on the CPU otherwise.
//!
//! [`DenseDevice`] is the one trait every implementation provides: matrix products
//! over resident weights, and a KV cache with causal attention over it. The model's
//! forward pass (in `tandem-runtime`) is written once against this trait.
//!
//! Implementations: [`CpuDevice`]. A CUDA implementation is not built yet;
//! [`cuda_status`] says so at run time, so callers can fall back with a clear message.

mod cpu;
mod kv;

pub use cpu::CpuDevice;
pub use kv::KvCache;

use half::bf16;
use tandem_kernels::quant::AffineMatrix;

/// What can go wrong on a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A buffer or matrix had the wrong shape for the operation.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A parallel job panicked (a bug); the step is abandoned, the process survives.
    #[error("a device job failed: {0}")]
    Job(String),
}

/// A weight matrix in host memory, as loaded from a model file.
#[derive(Debug, Clone)]
pub enum HostMatrix {
    /// Block-quantized weights (from Q4_0, Q4_1, Q8_0, Q4_K, Q6_K).
    Affine(AffineMatrix),
    /// Full-precision weights, row-major.
    F32 {
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    },
    /// bf16 weights, row-major.
    Bf16 {
        rows: usize,
        cols: usize,
        data: Vec<bf16>,
    },
}

impl HostMatrix {
    /// (rows, cols): output and input features.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            HostMatrix::Affine(m) => (m.rows(), m.cols()),
            HostMatrix::F32 { rows, cols, .. } | HostMatrix::Bf16 { rows, cols, .. } => {
                (*rows, *cols)
            }
        }
    }

    /// Bytes of weights.
    pub fn size_bytes(&self) -> usize {
        match self {
            HostMatrix::Affine(m) => m.size_bytes(),
            HostMatrix::F32 { data, .. } => data.len() * 4,
            HostMatrix::Bf16 { data, .. } => data.len() * 2,
        }
    }

    /// Row `r` as floats (used for embedding look-ups).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        match self {
            HostMatrix::Affine(m) => m.dequantize_row(r, out),
            HostMatrix::F32 { cols, data, .. } => {
                out.copy_from_slice(&data[r * cols..(r + 1) * cols])
            }
            HostMatrix::Bf16 { cols, data, .. } => {
                for (o, v) in out.iter_mut().zip(&data[r * cols..(r + 1) * cols]) {
                    *o = v.to_f32();
                }
            }
        }
    }
}

/// The attention geometry of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
}

impl AttentionShape {
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// The dense side of a decode step.
///
/// Activations are host `f32` slices, row-major with one row per token. (A GPU
/// implementation will want activations resident on the device; the trait will
/// grow device buffers when one exists.)
pub trait DenseDevice: Send + Sync {
    /// A weight matrix resident on the device.
    type Matrix: Send + Sync;

    /// A short description, e.g. `cpu (avx512, 2 threads)`.
    fn name(&self) -> String;

    /// Makes a host matrix resident on the device.
    fn upload(&self, matrix: HostMatrix) -> Result<Self::Matrix, DeviceError>;

    /// `ys[t] = W · xs[t]` for every token `t`: `xs` is `tokens × cols`, `ys` is
    /// `tokens × rows`.
    fn matmul(&self, w: &Self::Matrix, xs: &[f32], ys: &mut [f32]) -> Result<(), DeviceError>;

    /// Causal attention of `T = q.len() / (n_heads·head_dim)` new queries over
    /// the rows of layer `layer` of `cache`, whose last `T` rows are these
    /// queries' own keys and values: query `t` sees rows `0..=first_row + t`
    /// (`first_row = cache.len(layer) - T`). Rows are in position order, but
    /// need not be contiguous positions: a cache that moved older rows elsewhere
    /// holds the rest. Writes `T × n_heads × head_dim` outputs, normalised over
    /// these rows, and the `T × n_heads` log-sum-exps of their logits, so the
    /// caller can merge them with attention computed elsewhere.
    fn attention(
        &self,
        cache: &KvCache,
        layer: usize,
        q: &[f32],
        first_row: usize,
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<(), DeviceError>;
}

/// Whether a CUDA device can be used, and if not, why — for a clear fallback message.
pub fn cuda_status() -> Result<(), String> {
    Err("the CUDA device is not implemented yet in this build; using the CPU".into())
}
