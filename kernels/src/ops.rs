//! Element-wise and row-wise operations of a transformer layer.
//!
//! These touch a few kilobytes per token and are not worth hand-written SIMD: they
//! are written as simple loops the compiler vectorises.

/// `out = x / rms(x) * weight`, with `rms(x) = sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert!(
        x.len() == weight.len() && x.len() == out.len(),
        "rms_norm: length mismatch"
    );
    let mean_sq = x.iter().map(|v| (v * v) as f64).sum::<f64>() / x.len() as f64;
    let inv = (1.0 / (mean_sq + eps as f64).sqrt()) as f32;
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// `x += y`.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len(), "add_in_place: length mismatch");
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// SwiGLU: `gate = silu(gate) * up`.
pub fn silu_mul_in_place(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: length mismatch");
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Rotary position embedding tables: `cos`/`sin` of `position · base^(-2i/dim)`.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// Frequencies for heads of `dim` rotated dimensions with the given base.
    pub fn new(dim: usize, base: f32) -> Rope {
        let inv_freq = (0..dim / 2)
            .map(|i| (base as f64).powf(-(2.0 * i as f64) / dim as f64) as f32)
            .collect();
        Rope { inv_freq }
    }

    /// Appends the `(cos, sin)` of every frequency at `position` to `out`, as
    /// flat pairs: computed once per token and shared by all heads and layers
    /// through [`rotate_interleaved`].
    pub fn push_angles(&self, position: usize, out: &mut Vec<f32>) {
        out.extend(self.inv_freq.iter().flat_map(|&f| {
            let (sin, cos) = (position as f64 * f as f64).sin_cos();
            [cos as f32, sin as f32]
        }));
    }

    /// Rotates one head in place at `position`, pairing adjacent elements
    /// `(x[2i], x[2i+1])` — the layout of GGUF llama weights, whose q/k rows
    /// llama.cpp's converter permutes from Hugging Face's half-split layout.
    pub fn rotate_interleaved(&self, head: &mut [f32], position: usize) {
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let (sin, cos) = (position as f64 * f as f64).sin_cos();
            let (sin, cos) = (sin as f32, cos as f32);
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * cos - b * sin;
            head[2 * i + 1] = a * sin + b * cos;
        }
    }
}

/// Rotates one head in place by precomputed angles ([`Rope::push_angles`]:
/// `(cos, sin)` pairs), pairing adjacent elements as [`Rope::rotate_interleaved`].
pub fn rotate_interleaved(head: &mut [f32], angles: &[f32]) {
    for (pair, cs) in head.chunks_exact_mut(2).zip(angles.chunks_exact(2)) {
        let (a, b, cos, sin) = (pair[0], pair[1], cs[0], cs[1]);
        pair[0] = a * cos - b * sin;
        pair[1] = a * sin + b * cos;
    }
}

/// Merges partial attention results `(out, lse)`, each output normalised within
/// its part and `lse` the log-sum-exp of its logits, into `out`: the softmax over
/// the union of the parts' keys. Returns the merged lse. Parts with `lse = -inf`
/// contribute nothing; if all are empty, `out` is zero and the lse is `-inf`.
/// Only the first `out.len()` elements of each part are read.
pub fn merge_partials(parts: &[(&[f32], f32)], out: &mut [f32]) -> f32 {
    out.iter_mut().for_each(|x| *x = 0.0);
    let m = parts.iter().map(|p| p.1).fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY || m.is_nan() {
        return f32::NEG_INFINITY;
    }
    let total: f64 = parts.iter().map(|p| ((p.1 - m) as f64).exp()).sum();
    for (o, lse) in parts {
        let w = (((*lse - m) as f64).exp() / total) as f32;
        if w > 0.0 {
            for (dst, x) in out.iter_mut().zip(o.iter()) {
                *dst += w * x;
            }
        }
    }
    m + total.ln() as f32
}

/// Index of the largest element (the first on ties); `None` when empty or all NaN.
pub fn argmax(x: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_of_constant_is_weight() {
        let mut out = [0.0; 4];
        rms_norm(&[3.0; 4], &[1.0, 2.0, 3.0, 4.0], 0.0, &mut out);
        for (o, w) in out.iter().zip([1.0, 2.0, 3.0, 4.0]) {
            assert!((o - w).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_preserves_norm_and_is_identity_at_zero() {
        let rope = Rope::new(8, 10000.0);
        let x: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        let mut y = x.clone();
        rope.rotate_interleaved(&mut y, 0);
        assert_eq!(x, y);
        let mut z = x.clone();
        rope.rotate_interleaved(&mut y, 77);
        let mut angles = Vec::new();
        rope.push_angles(77, &mut angles);
        rotate_interleaved(&mut z, &angles);
        assert_eq!(y, z);
        let n0: f32 = x.iter().map(|v| v * v).sum();
        let n1: f32 = y.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }

    #[test]
    fn argmax_skips_nan_and_prefers_first() {
        assert_eq!(argmax(&[1.0, f32::NAN, 3.0, 3.0]), Some(2));
        assert_eq!(argmax(&[]), None);
    }
}
