//! The scores at or above a threshold: as bit masks, 32 scores to a word
//! (dense attention marks the keys whose softmax weight matters for some head
//! of the group before it reads their value rows), or copied out in order
//! (a k-th largest orders only the scores above a bound). AVX2 compares 8
//! scores and moves their sign bits out in one instruction each; AVX-512, 16,
//! and compresses the 16 to their kept ones in one store.

use crate::isa::{effective, Isa};

/// Scores per mask word.
pub const MASK_WORD: usize = 32;

/// `masks[c] |= 1 << k` for every `xs[32 c + k] >= threshold` (NaN never).
///
/// # Panics
/// If `masks` holds fewer than `xs.len().div_ceil(32)` words.
pub fn or_at_least(xs: &[f32], threshold: f32, masks: &mut [u32]) {
    or_at_least_with(Isa::detect(), xs, threshold, masks)
}

/// [`or_at_least`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn or_at_least_with(isa: Isa, xs: &[f32], threshold: f32, masks: &mut [u32]) {
    let words = xs.len().div_ceil(MASK_WORD);
    assert!(
        masks.len() >= words,
        "{} mask words for {words}",
        masks.len()
    );
    let whole = xs.len() / MASK_WORD;
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F; `masks` holds `whole` words and
        // `xs` their 32 scores each (checked above).
        Isa::Avx512 => unsafe { x86::or_at_least_avx512(xs, threshold, &mut masks[..whole]) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2; as above.
        Isa::Avx2 => unsafe { x86::or_at_least_avx2(xs, threshold, &mut masks[..whole]) },
        _ => scalar(&xs[..whole * MASK_WORD], threshold, &mut masks[..whole]),
    }
    scalar(
        &xs[whole * MASK_WORD..],
        threshold,
        &mut masks[whole..words],
    );
}

/// Copies the scores `>= threshold` (NaN never) to the front of `out`, in
/// their order, and returns how many; the rest of `out` is left unspecified.
///
/// # Panics
/// If `out` is shorter than `xs`.
pub fn keep_at_least(xs: &[f32], threshold: f32, out: &mut [f32]) -> usize {
    keep_at_least_with(Isa::detect(), xs, threshold, out)
}

/// [`keep_at_least`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn keep_at_least_with(isa: Isa, xs: &[f32], threshold: f32, out: &mut [f32]) -> usize {
    assert!(
        out.len() >= xs.len(),
        "{} places for {} scores",
        out.len(),
        xs.len()
    );
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F; `out` has room for every score
        // (checked above).
        Isa::Avx512 => unsafe { x86::keep_at_least_avx512(xs, threshold, out) },
        _ => keep_scalar(xs, threshold, out),
    }
}

/// Writes every score and moves past the kept ones: no branch to mispredict
/// where most scores fall below.
fn keep_scalar(xs: &[f32], threshold: f32, out: &mut [f32]) -> usize {
    let mut kept = 0;
    for &x in xs {
        out[kept] = x;
        kept += usize::from(x >= threshold);
    }
    kept
}

fn scalar(xs: &[f32], threshold: f32, masks: &mut [u32]) {
    for (chunk, m) in xs.chunks(MASK_WORD).zip(masks) {
        for (k, &x) in chunk.iter().enumerate() {
            *m |= u32::from(x >= threshold) << k;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::MASK_WORD;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2; `xs` holds `32 · masks.len()` scores.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn or_at_least_avx2(xs: &[f32], threshold: f32, masks: &mut [u32]) {
        let t = _mm256_set1_ps(threshold);
        for (c, m) in masks.iter_mut().enumerate() {
            let p = xs.as_ptr().add(c * MASK_WORD);
            let mut bits = 0u32;
            for q in 0..4 {
                let hit = _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_loadu_ps(p.add(8 * q)), t);
                bits |= (_mm256_movemask_ps(hit) as u32) << (8 * q);
            }
            *m |= bits;
        }
    }

    /// # Safety
    /// AVX-512F; `out` is at least as long as `xs`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn keep_at_least_avx512(
        xs: &[f32],
        threshold: f32,
        out: &mut [f32],
    ) -> usize {
        let t = _mm512_set1_ps(threshold);
        let whole = xs.len() / 16;
        let mut kept = 0;
        for c in 0..whole {
            let v = _mm512_loadu_ps(xs.as_ptr().add(16 * c));
            let hit = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, t);
            // At most 16 go to `out[kept..]`, and `kept <= 16 c`.
            _mm512_mask_compressstoreu_ps(out.as_mut_ptr().add(kept).cast(), hit, v);
            kept += hit.count_ones() as usize;
        }
        kept + super::keep_scalar(&xs[16 * whole..], threshold, &mut out[kept..])
    }

    /// # Safety
    /// AVX-512F; `xs` holds `32 · masks.len()` scores.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn or_at_least_avx512(xs: &[f32], threshold: f32, masks: &mut [u32]) {
        let t = _mm512_set1_ps(threshold);
        for (c, m) in masks.iter_mut().enumerate() {
            let p = xs.as_ptr().add(c * MASK_WORD);
            let low = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_loadu_ps(p), t);
            let high = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_loadu_ps(p.add(16)), t);
            *m |= u32::from(low) | u32::from(high) << 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn every_isa_keeps_as_the_scalar_reference_on_odd_sizes() {
        let mut rng = SplitMix64(29);
        for n in [0usize, 1, 15, 16, 17, 33, 255, 1001] {
            let mut xs: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            if n > 5 {
                xs[1] = f32::NAN;
                xs[2] = 0.5;
                xs[3] = f32::INFINITY;
                xs[4] = f32::NEG_INFINITY;
            }
            for threshold in [0.5, f32::NEG_INFINITY, f32::INFINITY, -0.3] {
                let want: Vec<f32> = xs.iter().copied().filter(|&x| x >= threshold).collect();
                let mut out = vec![0.0; n];
                assert_eq!(keep_scalar(&xs, threshold, &mut out), want.len());
                assert_eq!(out[..want.len()], want[..], "scalar n={n}");
                for isa in Isa::all_supported() {
                    let mut out = vec![f32::NAN; n + 3];
                    let kept = keep_at_least_with(isa, &xs, threshold, &mut out);
                    assert_eq!(kept, want.len(), "{isa:?} n={n} t={threshold}");
                    assert_eq!(out[..kept], want[..], "{isa:?} n={n} t={threshold}");
                }
            }
        }
    }

    #[test]
    fn every_isa_marks_as_the_scalar_reference_on_odd_sizes() {
        let mut rng = SplitMix64(17);
        for n in [0usize, 1, 31, 32, 33, 95, 1000] {
            let mut xs: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            if n > 4 {
                xs[1] = f32::NAN;
                xs[2] = 0.25;
                xs[3] = f32::INFINITY;
            }
            let before: Vec<u32> = (0..n.div_ceil(32) + 1)
                .map(|_| rng.next_u64() as u32 & 0x0101_0101)
                .collect();
            let mut want = before.clone();
            scalar(&xs, 0.25, &mut want);
            for (i, &x) in xs.iter().enumerate() {
                let bit = (want[i / 32] >> (i % 32)) & 1 == 1;
                assert!(
                    bit == (x >= 0.25) || (before[i / 32] >> (i % 32)) & 1 == 1,
                    "n={n} i={i}"
                );
            }
            for isa in Isa::all_supported() {
                let mut got = before.clone();
                or_at_least_with(isa, &xs, 0.25, &mut got);
                assert_eq!(got, want, "{isa:?} n={n}");
            }
        }
    }
}
