//! What the host hands a device: weight matrices as loaded, and the
//! attention geometry.

use half::bf16;
use tandem_kernels::quant::AffineMatrix;

/// A weight matrix in host memory, as loaded from a model file.
#[derive(Debug, Clone)]
pub enum HostMatrix {
    /// Block-quantized weights (from Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K).
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
