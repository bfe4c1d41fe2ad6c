//! Scores of a key sketch: each key projected onto `r` components (a
//! multiple of 4) and stored as int8 codes, offset by 128 to unsigned bytes.
//! Keys go [`SKETCH_BLOCK`] to a block; within a block, each group of four
//! components is 64 bytes, the four codes of key 0, then of key 1, and so on,
//! so that one VNNI instruction adds four components' products for 16 keys.
//!
//! Queries come as int8 components; a key's score is `Σ_c q_c · (code_c +
//! 128)`, the product with the signed codes plus `128 · Σ_c q_c`, the same
//! constant for every key of a query, so scores rank keys as the signed
//! products do.

use crate::isa::effective;
use crate::Isa;

/// Keys per block of a sketch.
pub const SKETCH_BLOCK: usize = 16;

/// Bytes of one block of a sketch of `r` components.
pub const fn block_bytes(r: usize) -> usize {
    r * SKETCH_BLOCK
}

/// Where key `lane` of a block holds component `c`, within the block.
pub const fn code_offset(r: usize, lane: usize, c: usize) -> usize {
    let _ = r;
    (c / 4) * 64 + lane * 4 + c % 4
}

/// Scores of `n` sketched keys for `g = qs.len() / r` queries (at most 8):
/// `out[h * n + i] = Σ_c qs[h * r + c] · codes(i, c)` (see the module
/// documentation for the layout and the offset).
///
/// # Panics
/// If `r` is not a positive multiple of 4, `codes` is shorter than
/// `n.div_ceil(16)` blocks, `qs` is not 1 to 8 `r`-vectors, or `out` is
/// shorter than `g * n`.
pub fn sketch_scores(codes: &[u8], r: usize, n: usize, qs: &[i8], out: &mut [i32]) {
    sketch_scores_with(Isa::detect(), codes, r, n, qs, out)
}

/// [`sketch_scores`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn sketch_scores_with(
    isa: Isa,
    codes: &[u8],
    r: usize,
    n: usize,
    qs: &[i8],
    out: &mut [i32],
) {
    let g = check(codes, r, n, qs);
    assert!(out.len() >= g * n, "out too short");
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW/VL/VNNI (the Avx512 level);
        // the lengths were checked above.
        Isa::Avx512 => unsafe { x86::sketch_scores_avx512(codes, r, n, qs, out) },
        _ => {
            let mut scores = [0i32; 8];
            for i in 0..n {
                score_one(codes, r, i, qs, &mut scores[..g]);
                for h in 0..g {
                    out[h * n + i] = scores[h];
                }
            }
        }
    }
}

/// Marks the sketched keys whose score ([`sketch_scores`]) for query `h`
/// reaches `cutoffs[h]`: `mask[i] |= 1 << h` for each such key `i < n`,
/// without writing the scores.
///
/// # Panics
/// As [`sketch_scores`], or if `mask` is shorter than `n` or `cutoffs` is
/// not one per query.
pub fn sketch_select(
    codes: &[u8],
    r: usize,
    n: usize,
    qs: &[i8],
    cutoffs: &[i32],
    mask: &mut [u8],
) {
    sketch_select_with(Isa::detect(), codes, r, n, qs, cutoffs, mask)
}

/// [`sketch_select`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn sketch_select_with(
    isa: Isa,
    codes: &[u8],
    r: usize,
    n: usize,
    qs: &[i8],
    cutoffs: &[i32],
    mask: &mut [u8],
) {
    let g = check(codes, r, n, qs);
    assert!(cutoffs.len() == g, "{g} queries, {} cutoffs", cutoffs.len());
    assert!(mask.len() >= n, "mask too short");
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW/VL/VNNI (the Avx512 level);
        // the lengths were checked above.
        Isa::Avx512 => unsafe { x86::sketch_select_avx512(codes, r, n, qs, cutoffs, mask) },
        _ => {
            let mut scores = [0i32; 8];
            for (i, m) in mask[..n].iter_mut().enumerate() {
                score_one(codes, r, i, qs, &mut scores[..g]);
                for (h, (&s, &c)) in scores[..g].iter().zip(cutoffs).enumerate() {
                    *m |= u8::from(s >= c) << h;
                }
            }
        }
    }
}

/// Checks the shapes; returns the number of queries.
fn check(codes: &[u8], r: usize, n: usize, qs: &[i8]) -> usize {
    assert!(
        r > 0 && r.is_multiple_of(4),
        "{r} components (a positive multiple of 4)"
    );
    assert!(qs.len().is_multiple_of(r), "queries are not {r}-vectors");
    let g = qs.len() / r;
    assert!(g <= 8, "{g} queries (at most 8)");
    assert!(
        codes.len() >= n.div_ceil(SKETCH_BLOCK) * block_bytes(r),
        "codes too short"
    );
    g
}

/// The scores of key `i` for each query of `qs` into `out`.
fn score_one(codes: &[u8], r: usize, i: usize, qs: &[i8], out: &mut [i32]) {
    let (block, lane) = (i / SKETCH_BLOCK, i % SKETCH_BLOCK);
    let base = block * block_bytes(r);
    for (h, o) in out.iter_mut().enumerate() {
        *o = (0..r)
            .map(|c| i32::from(qs[h * r + c]) * i32::from(codes[base + code_offset(r, lane, c)]))
            .sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{block_bytes, SKETCH_BLOCK};
    use std::arch::x86_64::*;

    /// One block's scores for each of the `G` queries.
    #[inline(always)]
    unsafe fn block_scores<const G: usize>(pb: *const u8, r: usize, qs: &[i8]) -> [__m512i; G] {
        let mut acc = [_mm512_setzero_si512(); G];
        for grp in 0..r / 4 {
            let v = _mm512_loadu_si512(pb.add(grp * 64) as *const _);
            for (h, a) in acc.iter_mut().enumerate() {
                let q = (qs.as_ptr().add(h * r + grp * 4) as *const i32).read_unaligned();
                *a = _mm512_dpbusd_epi32(*a, v, _mm512_set1_epi32(q));
            }
        }
        acc
    }

    /// The lanes of the block starting at key `first` of `n`, as a mask.
    #[inline(always)]
    fn tail_mask(first: usize, n: usize) -> __mmask16 {
        let lanes = (n - first).min(SKETCH_BLOCK);
        if lanes == SKETCH_BLOCK {
            0xffff
        } else {
            (1u16 << lanes) - 1
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn sketch_scores_avx512_g<const G: usize>(
        codes: &[u8],
        r: usize,
        n: usize,
        qs: &[i8],
        out: &mut [i32],
    ) {
        let po = out.as_mut_ptr();
        for block in 0..n.div_ceil(SKETCH_BLOCK) {
            let acc = block_scores::<G>(codes.as_ptr().add(block * block_bytes(r)), r, qs);
            let first = block * SKETCH_BLOCK;
            let tail = tail_mask(first, n);
            for (h, a) in acc.iter().enumerate() {
                _mm512_mask_storeu_epi32(po.add(h * n + first) as *mut _, tail, *a);
            }
        }
    }

    /// # Safety
    /// The CPU supports AVX-512F/BW/VL/VNNI; `codes` holds every block of
    /// `n` keys, `qs` 1 to 8 `r`-vectors (`r` a multiple of 4) and `out`
    /// their `g * n` scores.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn sketch_scores_avx512(
        codes: &[u8],
        r: usize,
        n: usize,
        qs: &[i8],
        out: &mut [i32],
    ) {
        dispatch_g!(qs.len() / r, sketch_scores_avx512_g, codes, r, n, qs, out)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn sketch_select_avx512_g<const G: usize>(
        codes: &[u8],
        r: usize,
        n: usize,
        qs: &[i8],
        cutoffs: &[i32],
        mask: &mut [u8],
    ) {
        let pm = mask.as_mut_ptr();
        for block in 0..n.div_ceil(SKETCH_BLOCK) {
            let acc = block_scores::<G>(codes.as_ptr().add(block * block_bytes(r)), r, qs);
            let mut bits = _mm_setzero_si128();
            for (h, a) in acc.iter().enumerate() {
                let hit = _mm512_cmpge_epi32_mask(*a, _mm512_set1_epi32(cutoffs[h]));
                bits = _mm_or_si128(bits, _mm_maskz_mov_epi8(hit, _mm_set1_epi8(1 << h)));
            }
            let first = block * SKETCH_BLOCK;
            let tail = tail_mask(first, n);
            let at = pm.add(first) as *mut i8;
            let old = _mm_maskz_loadu_epi8(tail, at);
            _mm_mask_storeu_epi8(at, tail, _mm_or_si128(old, bits));
        }
    }

    /// # Safety
    /// The CPU supports AVX-512F/BW/VL/VNNI; `codes` holds every block of
    /// `n` keys, `qs` 1 to 8 `r`-vectors (`r` a multiple of 4), `cutoffs` one
    /// per query and `mask` at least `n` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn sketch_select_avx512(
        codes: &[u8],
        r: usize,
        n: usize,
        qs: &[i8],
        cutoffs: &[i32],
        mask: &mut [u8],
    ) {
        dispatch_g!(
            qs.len() / r,
            sketch_select_avx512_g,
            codes,
            r,
            n,
            qs,
            cutoffs,
            mask
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn every_isa_selects_as_the_scalar_scores_on_odd_sizes() {
        let mut rng = SplitMix64(3);
        for &(n, r, g) in &[
            (1usize, 4usize, 1usize),
            (15, 8, 2),
            (16, 16, 4),
            (33, 12, 3),
            (1000, 16, 8),
            (40, 32, 5),
        ] {
            let codes: Vec<u8> = (0..n.div_ceil(SKETCH_BLOCK) * block_bytes(r))
                .map(|_| rng.next_u64() as u8)
                .collect();
            let qs: Vec<i8> = (0..g * r).map(|_| rng.next_u64() as i8).collect();
            let mut scores = vec![0i32; g * n];
            sketch_scores(&codes, r, n, &qs, &mut scores);
            // The scores follow the documented layout.
            for (i, h) in [(0, 0), (n - 1, g - 1), (n / 2, g / 2)] {
                let (block, lane) = (i / SKETCH_BLOCK, i % SKETCH_BLOCK);
                let want: i32 = (0..r)
                    .map(|c| {
                        let at = block * block_bytes(r) + (c / 4) * 64 + lane * 4 + c % 4;
                        i32::from(qs[h * r + c]) * i32::from(codes[at])
                    })
                    .sum();
                assert_eq!(scores[h * n + i], want);
            }
            let cutoffs: Vec<i32> = (0..g).map(|h| scores[h * n + n / 2]).collect();
            for isa in Isa::all_supported() {
                let mut got = vec![i32::MIN; g * n + 3];
                sketch_scores_with(isa, &codes, r, n, &qs, &mut got);
                assert_eq!(got[..g * n], scores[..], "{isa:?} n={n} r={r} g={g}");
                assert!(
                    got[g * n..].iter().all(|&x| x == i32::MIN),
                    "wrote past g * n"
                );
                let mut mask: Vec<u8> = (0..n + 5).map(|i| (i as u8 & 1) << 7).collect();
                let before = mask.clone();
                sketch_select_with(isa, &codes, r, n, &qs, &cutoffs, &mut mask);
                for i in 0..n + 5 {
                    let mut expect = before[i];
                    for h in 0..g {
                        if i < n && scores[h * n + i] >= cutoffs[h] {
                            expect |= 1 << h;
                        }
                    }
                    assert_eq!(mask[i], expect, "{isa:?} n={n} r={r} g={g} key {i}");
                }
            }
        }
    }
}
