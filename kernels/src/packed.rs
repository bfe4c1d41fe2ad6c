//! Rows of unsigned 4-bit or 2-bit codes packed into bytes by planes: a row
//! of `d` channels is [`packed_len`] bytes, and channel `c` sits in byte `c %
//! len` at bit `bits · (c / len)` (int4: low nibbles hold channels `[0,
//! d/2)`, high nibbles `[d/2, d)`; int2: four quarters). A plane unpacks
//! with one shift and one mask over a whole register, no shuffles.
//!
//! Two reads of attention over such rows: the integer dot product of a row
//! with int8 queries (u8 codes × i8 query, i32 sums: AVX-512 VNNI
//! `vpdpbusd`, AVX2 `vpmaddubsw` + `vpmaddwd`, scalar), and the weighted sum
//! of a row's codes with one weight per group of channels, decoded in
//! registers (AVX-512, AVX2+FMA, scalar).

use crate::Isa;

/// Bits per code of a packed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodeBits {
    /// Codes 0..=3, four per byte.
    Two,
    /// Codes 0..=15, two per byte.
    Four,
}

impl CodeBits {
    /// Bits per code.
    pub fn bits(self) -> u32 {
        match self {
            CodeBits::Two => 2,
            CodeBits::Four => 4,
        }
    }

    /// The largest code.
    pub fn max_code(self) -> u8 {
        (1u8 << self.bits()) - 1
    }

    /// Codes per byte: the number of planes of a row.
    pub fn planes(self) -> usize {
        8 / self.bits() as usize
    }
}

/// Bytes of a packed row of `d` channels: the length of one plane.
pub fn packed_len(d: usize, bits: CodeBits) -> usize {
    d.div_ceil(bits.planes())
}

/// Packs `codes` (one per channel, each at most `bits.max_code()`; higher
/// bits are dropped) into `out`, [`packed_len`] bytes.
pub fn pack(bits: CodeBits, codes: &[u8], out: &mut [u8]) {
    let len = packed_len(codes.len(), bits);
    let out = &mut out[..len];
    out.fill(0);
    let b = bits.bits();
    for (c, &code) in codes.iter().enumerate() {
        out[c % len] |= (code & bits.max_code()) << (b * (c / len) as u32);
    }
}

/// The code of channel `c` of a packed `row` (of any `d` with this length).
#[inline]
pub fn code_at(bits: CodeBits, row: &[u8], c: usize) -> u8 {
    let len = row.len().max(1);
    (row[c % len] >> (bits.bits() * (c / len) as u32)) & bits.max_code()
}

/// Integer dot products of one packed row with the int8 queries of several
/// heads: `out[h] = Σ_c code_c · queries[h · w + c]` for `h < out.len()` (at
/// most 8), where `w = planes · row.len()` is the padded width of one query
/// (channels past `d` must have query 0). The row is read once. Heads whose
/// query does not fit in `queries` get 0. Auto-dispatch.
pub fn dot_packed_i8_multi(bits: CodeBits, row: &[u8], queries: &[i8], out: &mut [i32]) {
    dot_packed_i8_multi_with(Isa::detect(), bits, row, queries, out)
}

/// [`dot_packed_i8_multi`] with an explicit ISA (capped at what the CPU
/// supports).
pub(crate) fn dot_packed_i8_multi_with(
    isa: Isa,
    bits: CodeBits,
    row: &[u8],
    queries: &[i8],
    out: &mut [i32],
) {
    let w = bits.planes() * row.len();
    let fit = queries.len().checked_div(w).unwrap_or(out.len());
    let g = out.len().min(8).min(fit);
    out[g..].iter_mut().for_each(|x| *x = 0);
    let (queries, out) = (&queries[..g * w], &mut out[..g]);
    match crate::isa::effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW with VNNI; `queries` holds
        // `g` queries of `planes · row.len()` values, g <= 8.
        Isa::Avx512 => unsafe { x86::dot_avx512(bits, row, queries, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2; `queries` as above.
        Isa::Avx2 => unsafe { x86::dot_avx2(bits, row, queries, out) },
        _ => {
            for (h, o) in out.iter_mut().enumerate() {
                *o = dot_scalar(bits, row, &queries[h * w..(h + 1) * w], 0);
            }
        }
    }
}

/// `Σ code_c · q[c]` over the channels of `row` from byte `from` of each
/// plane on.
fn dot_scalar(bits: CodeBits, row: &[u8], q: &[i8], from: usize) -> i32 {
    let len = row.len();
    let mut sum = 0i32;
    for p in 0..bits.planes() {
        for j in from..len {
            let code = (row[j] >> (bits.bits() * p as u32)) & bits.max_code();
            sum += i32::from(code) * i32::from(q[p * len + j]);
        }
    }
    sum
}

/// `out[c] += muls[c / group] · code_c` for the `c < out.len()` channels of
/// a packed `row` (`out.len()` is the row's `d`): one weight per group of
/// `group` channels, codes decoded in registers. Groups past the end of
/// `muls` add nothing. Auto-dispatch.
pub fn axpy_packed(bits: CodeBits, row: &[u8], group: usize, muls: &[f32], out: &mut [f32]) {
    axpy_packed_with(Isa::detect(), bits, row, group, muls, out)
}

/// [`axpy_packed`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn axpy_packed_with(
    isa: Isa,
    bits: CodeBits,
    row: &[u8],
    group: usize,
    muls: &[f32],
    out: &mut [f32],
) {
    let group = group.max(1);
    let d = out
        .len()
        .min(row.len() * bits.planes())
        .min(muls.len() * group);
    let out = &mut out[..d];
    match crate::isa::effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW; every channel written is
        // below `d`, inside `out`, and its group inside `muls`.
        Isa::Avx512 => unsafe { x86::axpy_avx512(bits, row, group, muls, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 and FMA; as above.
        Isa::Avx2 => unsafe { x86::axpy_avx2(bits, row, group, muls, out) },
        _ => axpy_span(bits, row, group, muls, out, 0, d),
    }
}

/// The scalar [`axpy_packed`] over channels `[c0, c1)`.
fn axpy_span(
    bits: CodeBits,
    row: &[u8],
    group: usize,
    muls: &[f32],
    out: &mut [f32],
    c0: usize,
    c1: usize,
) {
    for c in c0..c1 {
        out[c] += muls[c / group] * f32::from(code_at(bits, row, c));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{axpy_span, dot_scalar, CodeBits};
    use std::arch::x86_64::*;

    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn dot_avx512_g<const G: usize>(bits: CodeBits, row: &[u8], qs: &[i8], out: &mut [i32]) {
        let len = row.len();
        let w = bits.planes() * len;
        let mask = _mm512_set1_epi8(bits.max_code() as i8);
        let mut acc = [_mm512_setzero_si512(); G];
        let mut j = 0;
        while j < len {
            // Masked loads read nothing past the row or a plane's query.
            let m: u64 = if len - j >= 64 {
                u64::MAX
            } else {
                (1u64 << (len - j)) - 1
            };
            let c = _mm512_maskz_loadu_epi8(m, row.as_ptr().add(j) as *const i8);
            for p in 0..bits.planes() {
                let shift = _mm_cvtsi32_si128((bits.bits() as usize * p) as i32);
                let codes = _mm512_and_si512(_mm512_srl_epi16(c, shift), mask);
                for h in 0..G {
                    let q = _mm512_maskz_loadu_epi8(m, qs.as_ptr().add(h * w + p * len + j));
                    acc[h] = _mm512_dpbusd_epi32(acc[h], codes, q);
                }
            }
            j += 64;
        }
        for h in 0..G {
            out[h] = _mm512_reduce_add_epi32(acc[h]);
        }
    }

    /// Safety: AVX-512F/BW/VNNI; `qs` holds `out.len()` queries of `planes ·
    /// row.len()` values, at most 8.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dot_avx512(bits: CodeBits, row: &[u8], qs: &[i8], out: &mut [i32]) {
        dispatch_g!(out.len(), dot_avx512_g, bits, row, qs, out)
    }

    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2")]
    unsafe fn dot_avx2_g<const G: usize>(bits: CodeBits, row: &[u8], qs: &[i8], out: &mut [i32]) {
        let len = row.len();
        let w = bits.planes() * len;
        let mask = _mm256_set1_epi8(bits.max_code() as i8);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); G];
        let mut j = 0;
        while j + 32 <= len {
            let c = _mm256_loadu_si256(row.as_ptr().add(j) as *const __m256i);
            for p in 0..bits.planes() {
                let shift = _mm_cvtsi32_si128((bits.bits() as usize * p) as i32);
                let codes = _mm256_and_si256(_mm256_srl_epi16(c, shift), mask);
                for h in 0..G {
                    let q = _mm256_loadu_si256(qs.as_ptr().add(h * w + p * len + j) as *const _);
                    // Pairs of code · query fit i16: 2 · 15 · 128 < 2^15.
                    let pairs = _mm256_maddubs_epi16(codes, q);
                    acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(pairs, ones));
                }
            }
            j += 32;
        }
        for h in 0..G {
            let s = _mm_add_epi32(
                _mm256_castsi256_si128(acc[h]),
                _mm256_extracti128_si256::<1>(acc[h]),
            );
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            out[h] = _mm_cvtsi128_si32(s) + dot_scalar(bits, row, &qs[h * w..(h + 1) * w], j);
        }
    }

    /// Safety: AVX2; `qs` as for [`dot_avx512`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_avx2(bits: CodeBits, row: &[u8], qs: &[i8], out: &mut [i32]) {
        dispatch_g!(out.len(), dot_avx2_g, bits, row, qs, out)
    }

    /// Safety: AVX-512F/BW; `out.len() <= planes · row.len()` and every
    /// channel's group is inside `muls`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn axpy_avx512(
        bits: CodeBits,
        row: &[u8],
        group: usize,
        muls: &[f32],
        out: &mut [f32],
    ) {
        let (len, d) = (row.len(), out.len());
        let mask = _mm512_set1_epi32(i32::from(bits.max_code()));
        for p in 0..bits.planes() {
            let shift = _mm_cvtsi32_si128((bits.bits() as usize * p) as i32);
            let mut j = 0;
            while j < len && p * len + j < d {
                let c0 = p * len + j;
                let n = 16.min(len - j).min(d - c0);
                if c0 / group != (c0 + n - 1) / group {
                    axpy_span(bits, row, group, muls, out, c0, c0 + n);
                } else {
                    let m = ((1u32 << n) - 1) as u16;
                    let bytes = _mm_maskz_loadu_epi8(m, row.as_ptr().add(j) as *const i8);
                    let codes = _mm512_and_si512(
                        _mm512_srl_epi32(_mm512_cvtepu8_epi32(bytes), shift),
                        mask,
                    );
                    let po = out.as_mut_ptr().add(c0);
                    let o = _mm512_fmadd_ps(
                        _mm512_set1_ps(muls[c0 / group]),
                        _mm512_cvtepi32_ps(codes),
                        _mm512_maskz_loadu_ps(m, po),
                    );
                    _mm512_mask_storeu_ps(po, m, o);
                }
                j += 16;
            }
        }
    }

    /// Safety: AVX2 and FMA; as for [`axpy_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_avx2(
        bits: CodeBits,
        row: &[u8],
        group: usize,
        muls: &[f32],
        out: &mut [f32],
    ) {
        let (len, d) = (row.len(), out.len());
        let mask = _mm256_set1_epi32(i32::from(bits.max_code()));
        for p in 0..bits.planes() {
            let shift = _mm_cvtsi32_si128((bits.bits() as usize * p) as i32);
            let end = d.min((p + 1) * len);
            let mut c0 = p * len;
            while c0 < end {
                let n = 8.min(end - c0);
                if n < 8 || c0 / group != (c0 + 7) / group {
                    axpy_span(bits, row, group, muls, out, c0, c0 + n);
                } else {
                    let bytes = _mm_loadl_epi64(row.as_ptr().add(c0 - p * len) as *const __m128i);
                    let codes = _mm256_and_si256(
                        _mm256_srl_epi32(_mm256_cvtepu8_epi32(bytes), shift),
                        mask,
                    );
                    let po = out.as_mut_ptr().add(c0);
                    let o = _mm256_fmadd_ps(
                        _mm256_set1_ps(muls[c0 / group]),
                        _mm256_cvtepi32_ps(codes),
                        _mm256_loadu_ps(po),
                    );
                    _mm256_storeu_ps(po, o);
                }
                c0 += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    const BITS: [CodeBits; 2] = [CodeBits::Two, CodeBits::Four];

    fn random_codes(rng: &mut SplitMix64, bits: CodeBits, d: usize) -> Vec<u8> {
        (0..d)
            .map(|_| (rng.next_u64() % (u64::from(bits.max_code()) + 1)) as u8)
            .collect()
    }

    #[test]
    fn pack_keeps_every_code_in_its_plane() {
        let mut rng = SplitMix64(1);
        for bits in BITS {
            for d in [1usize, 3, 7, 64, 80, 127, 128] {
                let codes = random_codes(&mut rng, bits, d);
                let mut row = vec![0xAAu8; packed_len(d, bits)];
                pack(bits, &codes, &mut row);
                let back: Vec<u8> = (0..d).map(|c| code_at(bits, &row, c)).collect();
                assert_eq!(back, codes, "{bits:?} d={d}");
            }
        }
    }

    #[test]
    fn every_isa_dot_equals_the_integer_sum() {
        let mut rng = SplitMix64(2);
        for bits in BITS {
            for d in [1usize, 5, 33, 64, 80, 100, 128, 131, 257, 300] {
                let codes = random_codes(&mut rng, bits, d);
                let mut row = vec![0u8; packed_len(d, bits)];
                pack(bits, &codes, &mut row);
                let w = bits.planes() * row.len();
                for g in 1..=8 {
                    let mut qs = vec![0i8; g * w];
                    for h in 0..g {
                        for c in 0..d {
                            // -128 included: the kernels must take the full i8 range.
                            qs[h * w + c] = (rng.next_u64() % 256) as u8 as i8;
                        }
                    }
                    let want: Vec<i32> = (0..g)
                        .map(|h| {
                            let q = &qs[h * w..];
                            (0..d).map(|c| i32::from(codes[c]) * i32::from(q[c])).sum()
                        })
                        .collect();
                    for isa in Isa::all_supported() {
                        let mut out = vec![i32::MIN; g + 1];
                        dot_packed_i8_multi_with(isa, bits, &row, &qs, &mut out);
                        assert_eq!(&out[..g], &want[..], "{isa:?} {bits:?} d={d} g={g}");
                        assert_eq!(out[g], 0, "{isa:?}: a head past the queries");
                    }
                }
            }
        }
    }

    #[test]
    fn every_isa_axpy_matches_the_scalar_sum() {
        let mut rng = SplitMix64(3);
        for bits in BITS {
            for d in [1usize, 3, 17, 40, 64, 80, 96, 128, 131] {
                for group in [8usize, 32, d] {
                    let codes = random_codes(&mut rng, bits, d);
                    let mut row = vec![0u8; packed_len(d, bits)];
                    pack(bits, &codes, &mut row);
                    let muls: Vec<f32> = (0..d.div_ceil(group))
                        .map(|_| rng.signed_f32() * 2.0)
                        .collect();
                    let base: Vec<f32> = (0..d).map(|_| rng.signed_f32()).collect();
                    let want: Vec<f32> = (0..d)
                        .map(|c| base[c] + muls[c / group] * f32::from(codes[c]))
                        .collect();
                    for isa in Isa::all_supported() {
                        let mut out = base.clone();
                        axpy_packed_with(isa, bits, &row, group, &muls, &mut out);
                        for c in 0..d {
                            // One fused or one rounded multiply-add apart.
                            let tol = 1e-6 * (1.0 + want[c].abs());
                            assert!(
                                (out[c] - want[c]).abs() <= tol,
                                "{isa:?} {bits:?} d={d} group={group} c={c}: {} vs {}",
                                out[c],
                                want[c]
                            );
                        }
                    }
                }
            }
        }
    }
}
