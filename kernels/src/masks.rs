//! Bit masks of the scores at or above a threshold, 32 scores to a word:
//! dense attention marks the keys whose softmax weight matters for some head
//! of the group before it reads their value rows. AVX2 compares 8 scores
//! and moves their sign bits out in one instruction each; AVX-512, 16.

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
