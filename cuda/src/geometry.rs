//! The attention kernels' parameters, shared by the launches and their CPU twins.

/// Keys each block of `attend_split` attends.
pub const SPLIT: usize = 512;

/// Threads of a block, `BLOCK` in the kernel sources.
pub const BLOCK: usize = 128;

/// Largest head dimension the attention kernels handle (`MAX_HEAD_DIM`).
pub const MAX_HEAD_DIM: usize = 2 * BLOCK;

/// `struct Geometry` of `attention.cu`, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    /// Query heads.
    pub n_heads: i32,
    /// Key/value heads.
    pub n_kv_heads: i32,
    /// Dimension of one head.
    pub head_dim: i32,
    /// Query `t` sees rows up to `first + t`.
    pub first: i32,
    /// Sliding window; 0 for none.
    pub window: i32,
    /// Keys per split.
    pub split: i32,
    /// Splits per (query, head).
    pub splits: i32,
    /// Score scale, `1/√head_dim`.
    pub scale: f32,
}

impl Geometry {
    /// The geometry of `tokens` queries whose first sees rows `..=first`.
    pub fn new(
        shape: tandem_gpu::AttentionShape,
        first: usize,
        tokens: usize,
        window: Option<usize>,
    ) -> Geometry {
        let widest = window.map_or(first + tokens, |w| w.min(first + tokens));
        Geometry {
            n_heads: shape.n_heads as i32,
            n_kv_heads: shape.n_kv_heads as i32,
            head_dim: shape.head_dim as i32,
            first: first as i32,
            window: window.unwrap_or(0) as i32,
            split: SPLIT as i32,
            splits: widest.div_ceil(SPLIT).max(1) as i32,
            scale: 1.0 / (shape.head_dim as f32).sqrt(),
        }
    }

    /// The rows query `t` sees.
    pub fn rows(&self, t: usize) -> std::ops::Range<usize> {
        let end = self.first as usize + t + 1;
        let begin = match self.window {
            w if w > 0 => end.saturating_sub(w as usize),
            _ => 0,
        };
        begin..end
    }
}
