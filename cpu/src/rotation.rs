//! A fixed orthogonal rotation of a head's channels, applied to int4 and
//! int2 rows before they are quantized: a Walsh–Hadamard transform after a
//! fixed pattern of sign flips (as QuaRot rotates its KV cache). It spreads
//! the few channels of large magnitude that keys carry over all channels,
//! so that a row's own range, which its largest channel sets, no longer
//! leaves the other channels a handful of codes. Dot products are kept:
//! the queries turn the same way, `(R q) · (R k) = q · k`.

use tandem_kernels::rng::SplitMix64;

/// Seed of the sign pattern: fixed, so that stored rows and saved stores
/// agree with the queries of any later run.
const SIGN_SEED: u64 = 0x5eed_0f51;

/// The rotation of `d` channels: `R x = H (s ⊙ x) / √d`, with `H` the
/// Walsh–Hadamard matrix and `s` a fixed pattern of ±1; the identity where
/// `d` is not a power of two of at least 8.
#[derive(Clone)]
pub(crate) struct Rotation {
    /// Empty for the identity.
    signs: Vec<f32>,
}

impl Rotation {
    pub(crate) fn new(d: usize) -> Self {
        if d < 8 || !d.is_power_of_two() {
            return Rotation { signs: Vec::new() };
        }
        let mut rng = SplitMix64(SIGN_SEED ^ d as u64);
        let signs = (0..d)
            .map(|_| if rng.next_u64() >> 63 == 0 { 1.0 } else { -1.0 })
            .collect();
        Rotation { signs }
    }

    /// Whether the rotation moves anything.
    pub(crate) fn is_identity(&self) -> bool {
        self.signs.is_empty()
    }

    /// `x ← R x`.
    pub(crate) fn apply(&self, x: &mut [f32]) {
        if self.is_identity() {
            return;
        }
        x.iter_mut().zip(&self.signs).for_each(|(v, s)| *v *= s);
        hadamard_normalised(x);
    }

    /// `x ← Rᵀ x`, the inverse.
    pub(crate) fn invert(&self, x: &mut [f32]) {
        if self.is_identity() {
            return;
        }
        hadamard_normalised(x);
        x.iter_mut().zip(&self.signs).for_each(|(v, s)| *v *= s);
    }
}

/// `x ← H x / √len` in place (`len` a power of two): its own inverse.
fn hadamard_normalised(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (s, t) = (*u + *v, *u - *v);
                (*u, *v) = (s, t);
            }
        }
        h *= 2;
    }
    let scale = 1.0 / (n as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= scale);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.signed_f32() * 3.0).collect()
    }

    #[test]
    fn rotation_keeps_dot_products_and_inverts() {
        let mut rng = SplitMix64(3);
        for d in [8, 16, 64, 128, 256] {
            let r = Rotation::new(d);
            assert!(!r.is_identity());
            let (q, k) = (random(&mut rng, d), random(&mut rng, d));
            let (mut rq, mut rk) = (q.clone(), k.clone());
            r.apply(&mut rq);
            r.apply(&mut rk);
            let dot = |a: &[f32], b: &[f32]| -> f64 {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| f64::from(*x) * f64::from(*y))
                    .sum()
            };
            assert!(
                (dot(&q, &k) - dot(&rq, &rk)).abs() < 1e-4 * d as f64,
                "d={d}"
            );
            assert!(
                (dot(&k, &k) - dot(&rk, &rk)).abs() < 1e-4 * d as f64,
                "d={d}"
            );
            r.invert(&mut rk);
            for (a, b) in rk.iter().zip(&k) {
                assert!((a - b).abs() < 1e-5, "d={d}");
            }
        }
    }

    #[test]
    fn one_large_channel_spreads_over_all() {
        let d = 128;
        let mut x = vec![0.0f32; d];
        x[17] = 10.0;
        Rotation::new(d).apply(&mut x);
        let want = 10.0 / (d as f32).sqrt();
        assert!(x.iter().all(|v| (v.abs() - want).abs() < 1e-5));
    }

    #[test]
    fn other_widths_are_left_alone() {
        for d in [0, 1, 4, 6, 24, 96] {
            let r = Rotation::new(d);
            assert!(r.is_identity());
            let mut x: Vec<f32> = (0..d).map(|i| i as f32).collect();
            let before = x.clone();
            r.apply(&mut x);
            r.invert(&mut x);
            assert_eq!(x, before);
        }
    }
}
