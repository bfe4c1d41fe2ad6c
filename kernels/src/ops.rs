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

/// GeGLU with the tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`):
/// `gate = gelu(gate) * up`.
pub fn gelu_tanh_mul_in_place(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gelu_mul: length mismatch");
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        let inner = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
        *g = 0.5 * x * (1.0 + inner.tanh()) * u;
    }
}

/// `x *= s`.
pub fn scale_in_place(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

/// `row += bias` for every row of `x` (rows of `bias.len()`).
pub fn add_bias_in_place(x: &mut [f32], bias: &[f32]) {
    assert!(
        !bias.is_empty() && x.len().is_multiple_of(bias.len()),
        "add_bias: length mismatch"
    );
    for row in x.chunks_exact_mut(bias.len()) {
        add_in_place(row, bias);
    }
}

/// Llama 3.1's frequency scaling (`rope_scaling.rope_type = "llama3"`): long
/// wavelengths are slowed by `factor`, short ones kept, those between blended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    /// How much longer the context is than the one pre-trained on.
    pub factor: f32,
    /// Wavelengths above `original_context / low_freq_factor` are divided by `factor`.
    pub low_freq_factor: f32,
    /// Wavelengths below `original_context / high_freq_factor` are kept.
    pub high_freq_factor: f32,
    /// The pre-training context length.
    pub original_context: f32,
}

impl Llama3Scaling {
    /// The per-frequency divisors, as llama.cpp's converter writes them into
    /// `rope_freqs.weight` (one per rotated pair).
    pub fn factors(&self, dim: usize, base: f32) -> Vec<f32> {
        let low_wavelen = self.original_context / self.low_freq_factor;
        let high_wavelen = self.original_context / self.high_freq_factor;
        (0..dim / 2)
            .map(|i| {
                let freq = (base as f64).powf(-(2.0 * i as f64) / dim as f64) as f32;
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    self.factor
                } else {
                    let smooth = (self.original_context / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                }
            })
            .collect()
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
        Rope::with_factors(dim, base, &[])
    }

    /// As [`Rope::new`], each frequency divided by its factor (llama.cpp's
    /// `rope_freqs.weight`, see [`Llama3Scaling::factors`]); no factors, none divided.
    pub fn with_factors(dim: usize, base: f32, factors: &[f32]) -> Rope {
        let inv_freq = (0..dim / 2)
            .map(|i| {
                let f = (base as f64).powf(-(2.0 * i as f64) / dim as f64);
                (f / factors.get(i).copied().unwrap_or(1.0) as f64) as f32
            })
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

/// Rotates one head in place by precomputed angles, pairing each element of
/// the first half with its twin in the second, `(x[i], x[i + d/2])`: GPT-NeoX's
/// layout (llama.cpp's `LLAMA_ROPE_TYPE_NEOX`), which Gemma and Qwen2 GGUFs keep.
pub fn rotate_halves(head: &mut [f32], angles: &[f32]) {
    let half = head.len() / 2;
    let (lo, hi) = head.split_at_mut(half);
    for ((a, b), cs) in lo.iter_mut().zip(hi.iter_mut()).zip(angles.chunks_exact(2)) {
        let (x, y, cos, sin) = (*a, *b, cs[0], cs[1]);
        *a = x * cos - y * sin;
        *b = x * sin + y * cos;
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
    fn rotate_halves_is_interleaved_rotation_of_permuted_head() {
        let rope = Rope::new(8, 10000.0);
        let mut angles = Vec::new();
        rope.push_angles(13, &mut angles);
        let x: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut halves = x.clone();
        rotate_halves(&mut halves, &angles);
        // Interleave the halves, rotate adjacent pairs, split back.
        let mut pairs: Vec<f32> = (0..4).flat_map(|i| [x[i], x[i + 4]]).collect();
        rotate_interleaved(&mut pairs, &angles);
        let back: Vec<f32> = (0..8)
            .map(|j| {
                if j < 4 {
                    pairs[2 * j]
                } else {
                    pairs[2 * (j - 4) + 1]
                }
            })
            .collect();
        assert_eq!(halves, back);
    }

    #[test]
    fn gelu_tanh_matches_known_values() {
        let mut g = [-3.0, -1.0, 0.0, 0.5, 2.0];
        gelu_tanh_mul_in_place(&mut g, &[1.0, 1.0, 1.0, 1.0, 2.0]);
        // torch.nn.functional.gelu(x, approximate="tanh")
        let want = [
            -0.003_637_392,
            -0.158_808,
            0.0,
            0.345_714,
            2.0 * 1.954_597_7,
        ];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn llama3_factors_keep_short_and_stretch_long_wavelengths() {
        let s = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192.0,
        };
        let f = s.factors(128, 500000.0);
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[63], 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]));
        let rope = Rope::with_factors(128, 500000.0, &f);
        let plain = Rope::new(128, 500000.0);
        assert_eq!(rope.inv_freq[0], plain.inv_freq[0]);
        assert!((rope.inv_freq[63] * 8.0 - plain.inv_freq[63]).abs() < 1e-12);
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
