//! TurboAttention's SAS (sparsity-aware softmax): softmax weights without a
//! float `exp`. For a score `x = s - max <= 0`, with `t = -x`:
//!
//! `exp(-t) ≈ LUT[⌊t⌋] · P3(t - ⌊t⌋)`, and 0 once `t >= N` (the cut-off),
//!
//! with `LUT[i] = e^{-i}` (16 entries: one AVX-512 register, read with
//! `vpermps`) and `P3(f) = 0.99941 - 0.98991 f + 0.45745 f² - 0.09929 f³`,
//! the least-squares cubic for `e^{-f}` on `[0, 1)`, evaluated by FMA Horner.
//!
//! # Error bound
//!
//! - Each kept weight (`t < N`) has relative error at most
//!   [`SAS_MAX_REL_ERROR`] (6e-4: the cubic's own error peaks at 5.97e-4 as
//!   `f → 1`; f32 rounding adds under 1e-6).
//! - Each dropped weight is below `e^{-N}` of the largest (which is kept), so
//!   over `n` scores the softmax mass lost is `m <= (n-1)·e^{-N} / (1 +
//!   (n-1)·e^{-N})`; in practice `m` is the exact mass of the scores at least
//!   `N` below the max, far smaller on peaked attention.
//! - Together, with `δ = SAS_MAX_REL_ERROR`, the normalised weights move by
//!   at most `Σ|p̃ - p| <= 2(δ + m) / (1 - δ - m)` in total, so an attention
//!   output moves by at most `2(δ + m) / (1 - δ - m) · max|v|`
//!   ([`sas_output_bound`]), and its log-sum-exp by at most `-ln(1 - δ - m)`
//!   (and up by at most `ln(1 + δ)`).
//!
//! The result is always finite and non-negative: `-inf`, NaN and any score
//! `N` or more below the max give 0; a score above the max counts as a tie
//! with it (weight `P3(0)`).

use crate::isa::effective;
use crate::vector::{exp_inplace, exp_shifted_sum};
use crate::Isa;

/// Relative error of every weight SAS keeps against `exp` (checked by tests
/// over a fine grid of `[0, 16)`).
pub const SAS_MAX_REL_ERROR: f32 = 6e-4;
/// The cut-off TurboAttention's SAS uses when none is given: scores 8 or
/// more below the max (weight `e^{-8} ≈ 3.4e-4` of the largest) are dropped.
pub const SAS_DEFAULT_CUTOFF: u8 = 8;
/// The largest cut-off: the table holds `e^{-i}` for `i < 16`.
pub const SAS_MAX_CUTOFF: u8 = 16;

/// `e^{-i}` for `i` in `0..16`, rounded to f32.
const LUT: [f32; 16] = [
    1.0,
    0.367_879_45,
    0.135_335_28,
    0.049_787_067,
    0.018_315_64,
    0.006_737_947,
    0.002_478_752_3,
    0.000_911_882,
    0.000_335_462_62,
    0.000_123_409_8,
    4.539_993e-5,
    1.670_17e-5,
    6.144_212_4e-6,
    2.260_329_4e-6,
    8.315_287e-7,
    3.059_023_2e-7,
];
const C0: f32 = 0.999_41;
const C1: f32 = -0.989_91;
const C2: f32 = 0.457_45;
const C3: f32 = -0.099_29;

/// How an attention pass turns scores minus their max into softmax weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Softmax {
    /// [`crate::vector::exp_inplace`]: relative error at most 1e-6.
    #[default]
    Exact,
    /// SAS with scores `cutoff` (1 to [`SAS_MAX_CUTOFF`]) or more below the
    /// max dropped; see the module's error bound.
    Sas {
        /// The cut-off N.
        cutoff: u8,
    },
}

impl Softmax {
    /// SAS with TurboAttention's cut-off of 8.
    pub const SAS: Softmax = Softmax::Sas {
        cutoff: SAS_DEFAULT_CUTOFF,
    };

    /// Replaces every `x` (a score minus its max) of `xs` with its weight.
    pub fn weights_inplace(self, xs: &mut [f32]) {
        match self {
            Softmax::Exact => exp_inplace(xs),
            Softmax::Sas { cutoff } => sas_exp_inplace(xs, cutoff),
        }
    }

    /// Replaces every score `x` of `xs` with its weight relative to `max`
    /// (their largest) and returns the weights' sum, in one pass over the
    /// scores ([`exp_shifted_sum`], [`sas_shifted_sum`]).
    pub fn weights_relative(self, xs: &mut [f32], max: f32) -> f32 {
        match self {
            Softmax::Exact => exp_shifted_sum(xs, max),
            Softmax::Sas { cutoff } => sas_shifted_sum(xs, max, cutoff),
        }
    }

    /// The scalar weight of one score minus its max.
    pub fn weight(self, x: f32) -> f32 {
        match self {
            Softmax::Exact => crate::vector::exp_f32(x),
            Softmax::Sas { cutoff } => sas_exp(x, cutoff),
        }
    }
}

/// The bound on an attention output's error under SAS (see the module's
/// docs): `2(δ + m) / (1 - δ - m)` times the largest `|v|`, with `m` the
/// exact softmax mass of the scores dropped; infinite once `δ + m >= 1`.
pub fn sas_output_bound(dropped_mass: f64) -> f64 {
    let e = f64::from(SAS_MAX_REL_ERROR) + dropped_mass;
    if e >= 1.0 {
        f64::INFINITY
    } else {
        2.0 * e / (1.0 - e)
    }
}

/// SAS's `exp(x)` for `x <= 0` with cut-off `cutoff` (capped at
/// [`SAS_MAX_CUTOFF`]): 0 for `x <= -cutoff`, `-inf` and NaN.
#[inline]
pub fn sas_exp(x: f32, cutoff: u8) -> f32 {
    let t = -x;
    if t.is_nan() || t >= f32::from(cutoff.min(SAS_MAX_CUTOFF)) {
        return 0.0;
    }
    let t = t.max(0.0);
    let i = t.floor();
    let f = t - i;
    let p = ((C3 * f + C2) * f + C1) * f + C0;
    LUT[i as usize & 15] * p
}

/// Replaces every `x` of `xs` with [`sas_exp`]`(x, cutoff)` (auto-dispatch).
pub fn sas_exp_inplace(xs: &mut [f32], cutoff: u8) {
    sas_exp_inplace_with(Isa::detect(), xs, cutoff)
}

/// [`sas_exp_inplace`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn sas_exp_inplace_with(isa: Isa, xs: &mut [f32], cutoff: u8) {
    // Subtracting +0 leaves every score as it is (−0 and NaN included).
    sas_shifted_sum_with(isa, xs, 0.0, cutoff);
}

/// Replaces every score `x` of `xs` with [`sas_exp`]`(x - max, cutoff)` and
/// returns the weights' sum, in one pass (auto-dispatch).
pub fn sas_shifted_sum(xs: &mut [f32], max: f32, cutoff: u8) -> f32 {
    sas_shifted_sum_with(Isa::detect(), xs, max, cutoff)
}

/// [`sas_shifted_sum`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn sas_shifted_sum_with(isa: Isa, xs: &mut [f32], max: f32, cutoff: u8) -> f32 {
    let cutoff = cutoff.min(SAS_MAX_CUTOFF);
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` guarantees the CPU supports AVX-512F.
        Isa::Avx512 => unsafe { x86::sas_shifted_sum_avx512(xs, max, cutoff) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `effective` guarantees the CPU supports AVX2 and FMA.
        Isa::Avx2 => unsafe { x86::sas_shifted_sum_avx2(xs, max, cutoff) },
        _ => xs.iter_mut().fold(0.0, |sum, x| {
            *x = sas_exp(*x - max, cutoff);
            sum + *x
        }),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    unsafe fn sas16(x: __m512, cutoff: __m512, lut: __m512) -> __m512 {
        let t = _mm512_sub_ps(_mm512_setzero_ps(), x);
        // Ordered compare: NaN lanes are dropped with the cut ones.
        let kept = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(t, cutoff);
        let t = _mm512_max_ps(t, _mm512_setzero_ps());
        let i = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(t);
        let f = _mm512_sub_ps(t, i);
        let mut p = _mm512_set1_ps(C3);
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(C2));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(C1));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(C0));
        // vpermps reads the low 4 bits of each index: no lane can fault.
        let scale = _mm512_permutexvar_ps(_mm512_cvttps_epi32(i), lut);
        _mm512_maskz_mul_ps(kept, scale, p)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sas_shifted_sum_avx512(xs: &mut [f32], max: f32, cutoff: u8) -> f32 {
        let lut = _mm512_loadu_ps(LUT.as_ptr());
        let cut = _mm512_set1_ps(f32::from(cutoff));
        let by = _mm512_set1_ps(max);
        let n = xs.len();
        let p = xs.as_mut_ptr();
        let mut sum = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let w = sas16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), by), cut, lut);
            _mm512_storeu_ps(p.add(i), w);
            sum = _mm512_add_ps(sum, w);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), by);
            let w = _mm512_maskz_mov_ps(m, sas16(x, cut, lut));
            _mm512_mask_storeu_ps(p.add(i), m, w);
            sum = _mm512_add_ps(sum, w);
        }
        _mm512_reduce_add_ps(sum)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn sas8(x: __m256, cutoff: __m256, lo: __m256, hi: __m256) -> __m256 {
        let t = _mm256_sub_ps(_mm256_setzero_ps(), x);
        let kept = _mm256_cmp_ps::<_CMP_LT_OQ>(t, cutoff);
        let t = _mm256_max_ps(t, _mm256_setzero_ps());
        let i = _mm256_floor_ps(t);
        let f = _mm256_sub_ps(t, i);
        let mut p = _mm256_set1_ps(C3);
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C2));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C1));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C0));
        // Two 8-entry permutes (low 3 bits of the index), then bit 3 picks one.
        let idx = _mm256_cvttps_epi32(i);
        let from_lo = _mm256_permutevar8x32_ps(lo, idx);
        let from_hi = _mm256_permutevar8x32_ps(hi, idx);
        let upper = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
        let scale = _mm256_blendv_ps(from_lo, from_hi, upper);
        _mm256_and_ps(kept, _mm256_mul_ps(scale, p))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sas_shifted_sum_avx2(xs: &mut [f32], max: f32, cutoff: u8) -> f32 {
        let lo = _mm256_loadu_ps(LUT.as_ptr());
        let hi = _mm256_loadu_ps(LUT.as_ptr().add(8));
        let cut = _mm256_set1_ps(f32::from(cutoff));
        let by = _mm256_set1_ps(max);
        let n = xs.len();
        let p = xs.as_mut_ptr();
        let mut sum = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let w = sas8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), by), cut, lo, hi);
            _mm256_storeu_ps(p.add(i), w);
            sum = _mm256_add_ps(sum, w);
            i += 8;
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        let mut total: f32 = lanes.iter().sum();
        for x in &mut xs[i..] {
            *x = sas_exp(*x - max, cutoff);
            total += *x;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn relative_weights_and_their_sum_match_subtracting_then_weighing() {
        let mut rng = SplitMix64(21);
        for softmax in [Softmax::Exact, Softmax::SAS, Softmax::Sas { cutoff: 3 }] {
            for n in [0usize, 1, 9, 31, 1000] {
                let scores: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 6.0).collect();
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut want = scores.clone();
                want.iter_mut().for_each(|x| *x -= max);
                softmax.weights_inplace(&mut want);
                let want_sum: f64 = want.iter().map(|&w| f64::from(w)).sum();
                let mut got = scores;
                let sum = softmax.weights_relative(&mut got, max);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= w.abs() * 1e-6, "{softmax:?} n={n} i={i}");
                }
                let err = (f64::from(sum) - want_sum).abs();
                assert!(err <= 1e-5 * want_sum.max(1e-30), "{softmax:?} n={n}");
            }
        }
    }

    #[test]
    fn the_table_holds_exp_of_minus_its_index() {
        for (i, &v) in LUT.iter().enumerate() {
            assert_eq!(v, (-(i as f64)).exp() as f32, "i={i}");
        }
    }

    #[test]
    fn kept_weights_are_within_the_stated_relative_error_on_a_fine_grid() {
        let cutoff = SAS_MAX_CUTOFF;
        let steps = 1 << 20;
        let xs: Vec<f32> = (0..steps)
            .map(|k| -(k as f32) * f32::from(cutoff) / steps as f32)
            .collect();
        let mut worst = 0.0f64;
        for isa in Isa::all_supported() {
            let mut ws = xs.clone();
            sas_exp_inplace_with(isa, &mut ws, cutoff);
            for (x, w) in xs.iter().zip(&ws) {
                let e = f64::from(*x).exp();
                worst = worst.max((f64::from(*w) - e).abs() / e);
            }
        }
        assert!(worst < f64::from(SAS_MAX_REL_ERROR), "worst {worst}");
        // The cubic's error peaks near f = 1: the bound is not loose.
        assert!(worst > 5.9e-4, "worst {worst}");
    }

    #[test]
    fn scores_at_or_past_the_cutoff_are_dropped_and_nothing_is_nan() {
        let special = [
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
            -f32::NAN,
            -1e30,
            1e30,
            0.0,
            -0.0,
            1e-3,
            -7.999,
            -8.0,
            -8.001,
            -15.99,
            -16.0,
            -1e4,
            f32::MIN,
            f32::MAX,
        ];
        for isa in Isa::all_supported() {
            for cutoff in [1u8, 8, 16, 200] {
                let mut ws = special;
                sas_exp_inplace_with(isa, &mut ws, cutoff);
                let cut = f32::from(cutoff.min(SAS_MAX_CUTOFF));
                for (x, w) in special.iter().zip(&ws) {
                    assert!(w.is_finite() && *w >= 0.0, "{isa:?} x={x} w={w}");
                    if x.is_nan() || -*x >= cut {
                        assert_eq!(*w, 0.0, "{isa:?} cutoff={cutoff} x={x}");
                    }
                    if *x >= 0.0 {
                        assert_eq!(*w, C0, "{isa:?} ties weigh P3(0): x={x}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_isa_matches_the_scalar_reference_on_odd_sizes() {
        let mut rng = SplitMix64(19);
        for &n in &[1usize, 3, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1001] {
            let xs: Vec<f32> = (0..n).map(|_| -rng.next_f32() * 20.0).collect();
            for cutoff in [1u8, 5, 8, 16] {
                let want: Vec<f32> = xs.iter().map(|&x| sas_exp(x, cutoff)).collect();
                for isa in Isa::all_supported() {
                    let mut ws = xs.clone();
                    sas_exp_inplace_with(isa, &mut ws, cutoff);
                    for (k, (w, e)) in ws.iter().zip(&want).enumerate() {
                        assert!(
                            (w - e).abs() <= 1e-6 * e,
                            "{isa:?} n={n} cutoff={cutoff} k={k}: {w} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_fused_pass_matches_the_scalar_reference_on_every_isa() {
        let mut rng = SplitMix64(23);
        for &n in &[0usize, 1, 5, 8, 15, 16, 17, 33, 257, 1001] {
            let mut xs: Vec<f32> = (0..n).map(|_| rng.signed_f32() * 12.0).collect();
            if n > 3 {
                xs[1] = f32::NAN;
                xs[2] = f32::NEG_INFINITY;
            }
            let max = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            for cutoff in [1u8, 8, 16] {
                let want: Vec<f32> = xs.iter().map(|&x| sas_exp(x - max, cutoff)).collect();
                let want_sum: f64 = want.iter().map(|&w| f64::from(w)).sum();
                for isa in Isa::all_supported() {
                    let mut ws = xs.clone();
                    let sum = sas_shifted_sum_with(isa, &mut ws, max, cutoff);
                    for (k, (w, e)) in ws.iter().zip(&want).enumerate() {
                        assert!(
                            (w - e).abs() <= 1e-6 * e,
                            "{isa:?} n={n} cutoff={cutoff} k={k}: {w} vs {e}"
                        );
                    }
                    let err = (f64::from(sum) - want_sum).abs();
                    assert!(err <= 1e-5 * want_sum.max(1e-30), "{isa:?} n={n}");
                }
            }
        }
    }

    #[test]
    fn softmax_outputs_stay_within_the_stated_bound_of_exact_ones() {
        let mut rng = SplitMix64(5);
        for case in 0..200 {
            let n = 1 + (rng.next_u64() % 700) as usize;
            let spread = 1.0 + (case % 7) as f32 * 4.0;
            let scores: Vec<f32> = (0..n).map(|_| rng.signed_f32() * spread).collect();
            let values: Vec<f32> = (0..n).map(|_| rng.signed_f32()).collect();
            let cutoff = 1 + (case % 16) as u8;
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let exact: Vec<f64> = scores.iter().map(|&s| f64::from(s - max).exp()).collect();
            let total: f64 = exact.iter().sum();
            let dropped: f64 = scores
                .iter()
                .zip(&exact)
                .filter(|(s, _)| max - **s >= f32::from(cutoff))
                .map(|(_, w)| w / total)
                .sum();
            let mut approx: Vec<f32> = scores.iter().map(|&s| s - max).collect();
            Softmax::Sas { cutoff }.weights_inplace(&mut approx);
            let out = |ws: &mut dyn Iterator<Item = f64>| {
                let (mut num, mut den) = (0.0, 0.0);
                for (w, v) in ws.zip(&values) {
                    num += w * f64::from(*v);
                    den += w;
                }
                (num / den, den)
            };
            let (o_exact, den_exact) = out(&mut exact.iter().cloned());
            let (o_sas, den_sas) = out(&mut approx.iter().map(|&w| f64::from(w)));
            let bound = sas_output_bound(dropped);
            assert!((o_sas - o_exact).abs() <= bound, "case {case}");
            let lse_shift = (den_sas / den_exact).ln();
            let e = f64::from(SAS_MAX_REL_ERROR) + dropped;
            assert!(lse_shift <= (1.0 + e).ln(), "case {case}");
            assert!(e >= 1.0 || lse_shift >= (1.0 - e).ln(), "case {case}");
        }
    }
}
