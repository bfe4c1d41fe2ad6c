//! Per-head updates over lists of (key, head) pairs: sampled attention keeps
//! one value per pair (a logit, then a weight) with the pair's query head
//! (0..8) beside it, and adds a per-head constant to every pair (the int8
//! keys' offset, minus the head's maximum before the softmax). The AVX-512
//! path takes 16 pairs a step, each head's constant picked by a permute;
//! elsewhere a pair at a time. Head numbers are taken modulo 8.

use crate::isa::Isa;

/// `xs[i] += table[heads[i] % 8]` for every `i` (up to the shorter length).
pub fn add_per_head(xs: &mut [f32], heads: &[u8], table: &[f32; 8]) {
    add_per_head_with(Isa::detect(), xs, heads, table)
}

/// [`add_per_head`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn add_per_head_with(isa: Isa, xs: &mut [f32], heads: &[u8], table: &[f32; 8]) {
    let n = xs.len().min(heads.len());
    let (xs, heads) = (&mut xs[..n], &heads[..n]);
    match crate::isa::effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512 F/BW/VL; the lengths are equal.
        Isa::Avx512 => unsafe { x86::add_per_head(xs, heads, table) },
        _ => {
            for (x, &h) in xs.iter_mut().zip(heads) {
                *x += table[usize::from(h & 7)];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Lanes `0..m` of a 16-lane step.
    #[inline]
    fn lanes(m: usize) -> u16 {
        if m >= 16 {
            !0
        } else {
            (1u16 << m) - 1
        }
    }

    /// The heads of pairs `i..i + 16` (those within `keep`), modulo 8, one per
    /// dword lane. Safety: AVX-512 F/BW/VL; the kept bytes are in `heads`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn head_lanes(heads: &[u8], i: usize, keep: u16) -> __m512i {
        let h = _mm_maskz_loadu_epi8(keep, heads.as_ptr().add(i) as *const i8);
        _mm512_and_si512(_mm512_cvtepu8_epi32(h), _mm512_set1_epi32(7))
    }

    /// Safety: AVX-512 F/BW/VL; `xs.len() == heads.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn add_per_head(xs: &mut [f32], heads: &[u8], table: &[f32; 8]) {
        let t = _mm512_castps256_ps512(_mm256_loadu_ps(table.as_ptr()));
        let mut i = 0;
        while i < xs.len() {
            let keep = lanes(xs.len() - i);
            let idx = head_lanes(heads, i, keep);
            let p = xs.as_mut_ptr().add(i);
            let x = _mm512_maskz_loadu_ps(keep, p);
            _mm512_mask_storeu_ps(p, keep, _mm512_add_ps(x, _mm512_permutexvar_ps(idx, t)));
            i += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn every_isa_matches_the_scalar_reference_on_odd_sizes() {
        let mut rng = SplitMix64(17);
        for &n in &[0usize, 1, 7, 15, 16, 17, 33, 100, 1001] {
            for heads in [1u64, 3, 4, 8] {
                let xs: Vec<f32> = (0..n).map(|_| rng.signed_f32() * 40.0).collect();
                // Head numbers past 7 wrap around.
                let hs: Vec<u8> = (0..n)
                    .map(|_| (rng.next_u64() % heads) as u8 + 8 * (rng.next_u64() % 2) as u8)
                    .collect();
                let table: [f32; 8] = std::array::from_fn(|h| h as f32 * 1.5 - 3.0);
                let want: Vec<f32> = xs
                    .iter()
                    .zip(&hs)
                    .map(|(x, &h)| x + table[usize::from(h % 8)])
                    .collect();
                for isa in Isa::all_supported() {
                    let mut got = xs.clone();
                    add_per_head_with(isa, &mut got, &hs, &table);
                    assert_eq!(got, want, "{isa:?} n {n}");
                }
            }
        }
    }
}
