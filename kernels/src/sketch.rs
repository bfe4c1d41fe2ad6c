//! Scores of a key sketch: each key projected onto `r` components (a
//! multiple of 8) and stored as one scale and 4-bit codes, offset by 8 to
//! `1..=15`: component `c` is `scale · (code_c − 8)`. Keys go
//! [`SKETCH_BLOCK`] to a block; within a block, each group of eight
//! components is 64 bytes, four of key 0, then four of key 1, and so on: the
//! byte `b` of a key holds component `b` of the group in its low nibble and
//! component `b + 4` in its high nibble, so that one mask and one shift give
//! two vectors of which one VNNI instruction each adds four components'
//! products for 16 keys.
//!
//! Queries come as int8 components; a key's score is
//! `scale · Σ_c q_c · (code_c − 8)`, computed as the unsigned codes' product
//! less `8 · Σ_c q_c`, then scaled.

use crate::isa::effective;
use crate::Isa;

/// Keys per block of a sketch.
pub const SKETCH_BLOCK: usize = 16;

/// Components per group of a block (the multiple `r` must be of).
pub const GROUP: usize = 8;

/// The code of a zero component.
pub const ZERO_CODE: u8 = 8;

/// Bytes of codes of one block of a sketch of `r` components.
pub const fn block_bytes(r: usize) -> usize {
    r * SKETCH_BLOCK / 2
}

/// Where key `lane` of a block holds component `c`, within the block: the
/// byte and the shift of its nibble.
pub const fn code_place(lane: usize, c: usize) -> (usize, u32) {
    let within = c % GROUP;
    let byte = (c / GROUP) * 64 + lane * 4 + within % 4;
    (byte, if within < 4 { 0 } else { 4 })
}

/// `n` sketched keys of `r` components: their codes, in blocks laid out as
/// the module documentation says, and one scale per key.
#[derive(Clone, Copy)]
pub struct Sketched<'a> {
    pub codes: &'a [u8],
    pub scales: &'a [f32],
    pub r: usize,
    pub n: usize,
}

/// Scores of the sketched `keys` for `g = qs.len() / r` queries (at most
/// 8): `out[h * n + i]` is key `i`'s score for query `h` (see the module
/// documentation).
///
/// # Panics
/// If `r` is not a positive multiple of 8, `codes` is shorter than
/// `n.div_ceil(16)` blocks, `scales` than `n`, `qs` is not 1 to 8
/// `r`-vectors, or `out` is shorter than `g * n`.
pub fn sketch_scores(keys: Sketched, qs: &[i8], out: &mut [f32]) {
    sketch_scores_with(Isa::detect(), keys, qs, out)
}

/// [`sketch_scores`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn sketch_scores_with(isa: Isa, keys: Sketched, qs: &[i8], out: &mut [f32]) {
    let g = check(keys, qs);
    let n = keys.n;
    assert!(out.len() >= g * n, "out too short");
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW/VL/VNNI (the Avx512 level);
        // the lengths were checked above.
        Isa::Avx512 => unsafe { x86::sketch_scores_avx512(keys, qs, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2; the lengths were checked above.
        Isa::Avx2 => unsafe { x86::sketch_scores_avx2(keys, qs, out) },
        _ => {
            let mut scores = [0.0f32; 8];
            for i in 0..n {
                score_one(keys, i, qs, &mut scores[..g]);
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
pub fn sketch_select(keys: Sketched, qs: &[i8], cutoffs: &[f32], mask: &mut [u8]) {
    sketch_select_with(Isa::detect(), keys, qs, cutoffs, mask)
}

/// [`sketch_select`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn sketch_select_with(
    isa: Isa,
    keys: Sketched,
    qs: &[i8],
    cutoffs: &[f32],
    mask: &mut [u8],
) {
    let g = check(keys, qs);
    assert!(cutoffs.len() == g, "{g} queries, {} cutoffs", cutoffs.len());
    assert!(mask.len() >= keys.n, "mask too short");
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW/VL/VNNI (the Avx512 level);
        // the lengths were checked above.
        Isa::Avx512 => unsafe { x86::sketch_select_avx512(keys, qs, cutoffs, mask) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2; the lengths were checked above.
        Isa::Avx2 => unsafe { x86::sketch_select_avx2(keys, qs, cutoffs, mask) },
        _ => {
            let mut scores = [0.0f32; 8];
            for (i, m) in mask[..keys.n].iter_mut().enumerate() {
                score_one(keys, i, qs, &mut scores[..g]);
                for (h, (&s, &c)) in scores[..g].iter().zip(cutoffs).enumerate() {
                    *m |= u8::from(s >= c) << h;
                }
            }
        }
    }
}

/// Checks the shapes; returns the number of queries.
fn check(keys: Sketched, qs: &[i8]) -> usize {
    let r = keys.r;
    assert!(
        r > 0 && r.is_multiple_of(GROUP),
        "{r} components (a positive multiple of {GROUP})"
    );
    assert!(qs.len().is_multiple_of(r), "queries are not {r}-vectors");
    let g = qs.len() / r;
    assert!(g <= 8, "{g} queries (at most 8)");
    assert!(
        keys.codes.len() >= keys.n.div_ceil(SKETCH_BLOCK) * block_bytes(r),
        "codes too short"
    );
    assert!(keys.scales.len() >= keys.n, "scales too short");
    g
}

/// `8 · Σ_c q_c` of each query: what the offset codes add to its products.
fn offsets(r: usize, qs: &[i8]) -> [i32; 8] {
    let mut out = [0i32; 8];
    for (o, q) in out.iter_mut().zip(qs.chunks_exact(r)) {
        *o = i32::from(ZERO_CODE) * q.iter().map(|&x| i32::from(x)).sum::<i32>();
    }
    out
}

/// The scores of key `i` for each query of `qs` into `out`.
fn score_one(keys: Sketched, i: usize, qs: &[i8], out: &mut [f32]) {
    let r = keys.r;
    let (block, lane) = (i / SKETCH_BLOCK, i % SKETCH_BLOCK);
    let base = block * block_bytes(r);
    let offsets = offsets(r, qs);
    for (h, o) in out.iter_mut().enumerate() {
        let dot: i32 = (0..r)
            .map(|c| {
                let (byte, shift) = code_place(lane, c);
                let code = (keys.codes[base + byte] >> shift) & 0x0f;
                i32::from(qs[h * r + c]) * i32::from(code)
            })
            .sum();
        *o = keys.scales[i] * (dot - offsets[h]) as f32;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{block_bytes, offsets, Sketched, GROUP, SKETCH_BLOCK};
    use std::arch::x86_64::*;

    /// One block's scores for each of the `G` queries: the scaled products
    /// of the codes, less each query's offset.
    #[inline(always)]
    unsafe fn block_scores<const G: usize>(
        keys: Sketched,
        block: usize,
        qs: &[i8],
        offsets: &[i32; 8],
    ) -> [__m512; G] {
        let r = keys.r;
        let pb = keys.codes.as_ptr().add(block * block_bytes(r));
        let mut acc = [_mm512_setzero_si512(); G];
        let nibble = _mm512_set1_epi8(0x0f);
        for grp in 0..r / GROUP {
            let v = _mm512_loadu_si512(pb.add(grp * 64) as *const _);
            let low = _mm512_and_si512(v, nibble);
            let high = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
            for (h, a) in acc.iter_mut().enumerate() {
                let q = qs.as_ptr().add(h * r + grp * GROUP) as *const i32;
                *a = _mm512_dpbusd_epi32(*a, low, _mm512_set1_epi32(q.read_unaligned()));
                *a = _mm512_dpbusd_epi32(*a, high, _mm512_set1_epi32(q.add(1).read_unaligned()));
            }
        }
        let first = block * SKETCH_BLOCK;
        let scales =
            _mm512_maskz_loadu_ps(tail_mask(first, keys.n), keys.scales.as_ptr().add(first));
        let mut out = [_mm512_setzero_ps(); G];
        for (h, (o, a)) in out.iter_mut().zip(acc).enumerate() {
            let dot = _mm512_sub_epi32(a, _mm512_set1_epi32(offsets[h]));
            *o = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), scales);
        }
        out
    }

    /// How many blocks ahead of the one scored its codes are prefetched: the
    /// hardware's prefetcher alone leaves the loads of a whole scan waiting.
    const PREFETCH_BLOCKS: usize = 8;

    /// Prefetches the codes of `block`, `bytes` of them (nothing past the end).
    #[inline(always)]
    fn prefetch_block(keys: Sketched, block: usize, bytes: usize) {
        if let Some(codes) = keys.codes.get(block * bytes..(block + 1) * bytes) {
            crate::vector::prefetch(codes);
        }
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
    unsafe fn sketch_scores_avx512_g<const G: usize>(keys: Sketched, qs: &[i8], out: &mut [f32]) {
        let (n, po) = (keys.n, out.as_mut_ptr());
        let offsets = offsets(keys.r, qs);
        for block in 0..n.div_ceil(SKETCH_BLOCK) {
            let scores = block_scores::<G>(keys, block, qs, &offsets);
            let first = block * SKETCH_BLOCK;
            let tail = tail_mask(first, n);
            for (h, s) in scores.iter().enumerate() {
                _mm512_mask_storeu_ps(po.add(h * n + first), tail, *s);
            }
        }
    }

    /// # Safety
    /// The CPU supports AVX-512F/BW/VL/VNNI; `keys` holds every block and
    /// scale of its `n` keys, `qs` 1 to 8 `r`-vectors (`r` a multiple of 8)
    /// and `out` their `g * n` scores.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn sketch_scores_avx512(keys: Sketched, qs: &[i8], out: &mut [f32]) {
        dispatch_g!(qs.len() / keys.r, sketch_scores_avx512_g, keys, qs, out)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn sketch_select_avx512_g<const G: usize>(
        keys: Sketched,
        qs: &[i8],
        cutoffs: &[f32],
        mask: &mut [u8],
    ) {
        let (n, pm) = (keys.n, mask.as_mut_ptr());
        let offsets = offsets(keys.r, qs);
        let bytes = block_bytes(keys.r);
        for block in 0..n.div_ceil(SKETCH_BLOCK) {
            prefetch_block(keys, block + PREFETCH_BLOCKS, bytes);
            let scores = block_scores::<G>(keys, block, qs, &offsets);
            let mut bits = _mm_setzero_si128();
            for (h, s) in scores.iter().enumerate() {
                let hit = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(*s, _mm512_set1_ps(cutoffs[h]));
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
    /// The CPU supports AVX-512F/BW/VL/VNNI; `keys` holds every block and
    /// scale of its `n` keys, `qs` 1 to 8 `r`-vectors (`r` a multiple of 8),
    /// `cutoffs` one per query and `mask` at least `n` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn sketch_select_avx512(
        keys: Sketched,
        qs: &[i8],
        cutoffs: &[f32],
        mask: &mut [u8],
    ) {
        dispatch_g!(
            qs.len() / keys.r,
            sketch_select_avx512_g,
            keys,
            qs,
            cutoffs,
            mask
        )
    }

    /// Keys per AVX2 half-block: a 32-byte load of a group holds four
    /// components of each of eight keys.
    const HALF: usize = SKETCH_BLOCK / 2;

    /// Groups whose products an i16 lane sums before widening: each adds
    /// four products of at most 15 · 128 in magnitude, so four groups stay
    /// within 16 · 1920 = 30720.
    const I16_GROUPS: usize = 4;

    /// The scores of keys `8·half .. 8·half + 8` of one block for each of
    /// the `G` queries. Without VNNI, `maddubs` adds pairs of unsigned code ×
    /// signed query products into i16 lanes, and `madd` with ones widens
    /// them to i32 every [`I16_GROUPS`] groups.
    #[inline(always)]
    unsafe fn half_scores<const G: usize>(
        keys: Sketched,
        block: usize,
        half: usize,
        qv: &[__m256i],
        offsets: &[i32; 8],
    ) -> [__m256; G] {
        let r = keys.r;
        let groups = r / GROUP;
        let pb = keys.codes.as_ptr().add(block * block_bytes(r) + half * 32);
        let mut acc = [_mm256_setzero_si256(); G];
        let nibble = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        for run in (0..groups).step_by(I16_GROUPS) {
            let mut part = [_mm256_setzero_si256(); G];
            for grp in run..(run + I16_GROUPS).min(groups) {
                let v = _mm256_loadu_si256(pb.add(grp * 64) as *const __m256i);
                let low = _mm256_and_si256(v, nibble);
                let high = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                for (h, p) in part.iter_mut().enumerate() {
                    let q = qv.as_ptr().add(2 * (h * groups + grp));
                    let lo = _mm256_maddubs_epi16(low, *q);
                    let hi = _mm256_maddubs_epi16(high, *q.add(1));
                    *p = _mm256_add_epi16(*p, _mm256_add_epi16(lo, hi));
                }
            }
            for (a, p) in acc.iter_mut().zip(part) {
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(p, ones));
            }
        }
        let first = block * SKETCH_BLOCK + half * HALF;
        let scales = _mm256_maskload_ps(keys.scales.as_ptr().add(first), lane_mask(first, keys.n));
        let mut out = [_mm256_setzero_ps(); G];
        for (h, (o, a)) in out.iter_mut().zip(acc).enumerate() {
            let dot = _mm256_sub_epi32(a, _mm256_set1_epi32(offsets[h]));
            *o = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), scales);
        }
        out
    }

    /// Each query's components broadcast four at a time, in the order
    /// [`half_scores`] reads them: `2 · (h · r/8 + group) + nibble`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn broadcast_queries(qs: &[i8]) -> Vec<__m256i> {
        qs.chunks_exact(4)
            .map(|c| {
                _mm256_set1_epi32(i32::from_le_bytes(
                    [c[0], c[1], c[2], c[3]].map(|x| x as u8),
                ))
            })
            .collect()
    }

    /// The lanes of the half-block starting at key `first` of `n`, as the
    /// sign bits of a mask for `maskload`/`maskstore`.
    #[inline(always)]
    unsafe fn lane_mask(first: usize, n: usize) -> __m256i {
        let lanes = (n - first).min(HALF) as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(lanes),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// The half-blocks of `n` keys: `(block, half, first key)`.
    fn halves(n: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        (0..n.div_ceil(HALF)).map(|i| (i / 2, i % 2, i * HALF))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn sketch_scores_avx2_g<const G: usize>(keys: Sketched, qs: &[i8], out: &mut [f32]) {
        let (n, po) = (keys.n, out.as_mut_ptr());
        let offsets = offsets(keys.r, qs);
        let qv = broadcast_queries(qs);
        for (block, half, first) in halves(n) {
            let scores = half_scores::<G>(keys, block, half, &qv, &offsets);
            let lanes = lane_mask(first, n);
            for (h, s) in scores.iter().enumerate() {
                _mm256_maskstore_ps(po.add(h * n + first), lanes, *s);
            }
        }
    }

    /// # Safety
    /// The CPU supports AVX2 and FMA; `keys` holds every block and scale of
    /// its `n` keys, `qs` 1 to 8 `r`-vectors (`r` a multiple of 8) and
    /// `out` their `g * n` scores.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sketch_scores_avx2(keys: Sketched, qs: &[i8], out: &mut [f32]) {
        dispatch_g!(qs.len() / keys.r, sketch_scores_avx2_g, keys, qs, out)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn sketch_select_avx2_g<const G: usize>(
        keys: Sketched,
        qs: &[i8],
        cutoffs: &[f32],
        mask: &mut [u8],
    ) {
        let n = keys.n;
        let offsets = offsets(keys.r, qs);
        let bytes = block_bytes(keys.r);
        let qv = broadcast_queries(qs);
        for (block, half, first) in halves(n) {
            if half == 0 {
                prefetch_block(keys, block + PREFETCH_BLOCKS, bytes);
            }
            let scores = half_scores::<G>(keys, block, half, &qv, &offsets);
            let mut bits = _mm256_setzero_si256();
            for (h, s) in scores.iter().enumerate() {
                let hit = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(
                    *s,
                    _mm256_set1_ps(cutoffs[h]),
                ));
                bits = _mm256_or_si256(bits, _mm256_and_si256(hit, _mm256_set1_epi32(1 << h)));
            }
            // Byte 0 of each lane's i32, gathered into the low 4 bytes of
            // each 128-bit half.
            let pick = _mm256_setr_epi8(
                0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1,
                -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
            );
            let packed = _mm256_shuffle_epi8(bits, pick);
            let low = _mm256_extract_epi32::<0>(packed) as u32;
            let high = _mm256_extract_epi32::<4>(packed) as u32;
            let bits = u64::from(high) << 32 | u64::from(low);
            let lanes = n.min(first + HALF) - first;
            if lanes == HALF {
                let m: &mut [u8; HALF] = (&mut mask[first..first + HALF])
                    .try_into()
                    .unwrap_or_else(|_| unreachable!());
                *m = (u64::from_le_bytes(*m) | bits).to_le_bytes();
            } else {
                for (m, b) in mask[first..first + lanes]
                    .iter_mut()
                    .zip(bits.to_le_bytes())
                {
                    *m |= b;
                }
            }
        }
    }

    /// # Safety
    /// The CPU supports AVX2 and FMA; `keys` holds every block and scale of
    /// its `n` keys, `qs` 1 to 8 `r`-vectors (`r` a multiple of 8),
    /// `cutoffs` one per query and `mask` at least `n` bytes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sketch_select_avx2(
        keys: Sketched,
        qs: &[i8],
        cutoffs: &[f32],
        mask: &mut [u8],
    ) {
        dispatch_g!(
            qs.len() / keys.r,
            sketch_select_avx2_g,
            keys,
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
            (1usize, 8usize, 1usize),
            (15, 8, 2),
            (16, 16, 4),
            (33, 24, 3),
            (1000, 16, 8),
            (40, 32, 5),
            (77, 64, 7),
        ] {
            let codes: Vec<u8> = (0..n.div_ceil(SKETCH_BLOCK) * block_bytes(r))
                .map(|_| rng.next_u64() as u8)
                .collect();
            let scales: Vec<f32> = (0..n)
                .map(|_| rng.next_u64() as u16 as f32 / 4096.0)
                .collect();
            let keys = Sketched {
                codes: &codes,
                scales: &scales,
                r,
                n,
            };
            let qs: Vec<i8> = (0..g * r).map(|_| rng.next_u64() as i8).collect();
            let mut scores = vec![0.0f32; g * n];
            sketch_scores(keys, &qs, &mut scores);
            // The scores follow the documented layout.
            for (i, h) in [(0, 0), (n - 1, g - 1), (n / 2, g / 2)] {
                let (block, lane) = (i / SKETCH_BLOCK, i % SKETCH_BLOCK);
                let want: i32 = (0..r)
                    .map(|c| {
                        let (group, within) = (c / 8, c % 8);
                        let at = block * block_bytes(r) + group * 64 + lane * 4 + within % 4;
                        let code = if within < 4 {
                            codes[at] & 15
                        } else {
                            codes[at] >> 4
                        };
                        i32::from(qs[h * r + c]) * (i32::from(code) - 8)
                    })
                    .sum();
                assert_eq!(scores[h * n + i], scales[i] * want as f32);
            }
            let cutoffs: Vec<f32> = (0..g).map(|h| scores[h * n + n / 2]).collect();
            for isa in Isa::all_supported() {
                let mut got = vec![f32::MIN; g * n + 3];
                sketch_scores_with(isa, keys, &qs, &mut got);
                assert_eq!(got[..g * n], scores[..], "{isa:?} n={n} r={r} g={g}");
                assert!(
                    got[g * n..].iter().all(|&x| x == f32::MIN),
                    "wrote past g * n"
                );
                let mut mask: Vec<u8> = (0..n + 5).map(|i| (i as u8 & 1) << 7).collect();
                let before = mask.clone();
                sketch_select_with(isa, keys, &qs, &cutoffs, &mut mask);
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
