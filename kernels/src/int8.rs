//! Rows of signed 8-bit codes (codes in -127..=127): dot products of a code
//! row with one or several f32 vectors, and the two passes of sampled
//! attention over scattered code rows, whose scales the caller applies once
//! (one scale per channel: folded into the queries before, into the sums
//! after). AVX-512, AVX2+FMA, scalar.
//!
//! A code row of head dimension 128 is two cache lines where a bf16 row is
//! four: the offloaded store takes this form when memory reads, not
//! arithmetic, bound attention.

use crate::vector::checked_rows;
use crate::Isa;

/// `sum_i codes[i] * q[i]` over `min(codes.len(), q.len())` values (the caller
/// multiplies by the row's scale), with an explicit ISA (capped at what the
/// CPU supports).
pub(crate) fn dot_i8_f32_with(isa: Isa, codes: &[i8], q: &[f32]) -> f32 {
    let n = codes.len().min(q.len());
    let mut out = [0f32];
    dot_i8_f32_multi_with(isa, &codes[..n], &q[..n], &mut out);
    out[0]
}

/// Dot products of one code row with several f32 vectors (the query heads of
/// a GQA group): `out[h] = sum_i codes[i] * queries[h * codes.len() + i]` for
/// `h < out.len()`. The row is read once. At most 8 heads, and only those whose
/// query fits in `queries`; the rest of `out` is set to 0. Auto-dispatch.
pub fn dot_i8_f32_multi(codes: &[i8], queries: &[f32], out: &mut [f32]) {
    dot_i8_f32_multi_with(Isa::detect(), codes, queries, out)
}

/// [`dot_i8_f32_multi`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn dot_i8_f32_multi_with(isa: Isa, codes: &[i8], queries: &[f32], out: &mut [f32]) {
    let d = codes.len();
    let fit = queries.len().checked_div(d).unwrap_or(out.len());
    let g = out.len().min(8).min(fit);
    out[g..].iter_mut().for_each(|x| *x = 0.0);
    let (queries, out) = (&queries[..g * d], &mut out[..g]);
    match crate::isa::effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F; `queries` holds `g * d` values, g <= 8.
        Isa::Avx512 => unsafe { x86::dot_multi_avx512(codes, queries, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 and FMA; `queries` holds `g * d` values, g <= 8.
        Isa::Avx2 => unsafe { x86::dot_multi_avx2(codes, queries, out) },
        _ => {
            for (h, o) in out.iter_mut().enumerate() {
                *o = dot_scalar(codes, &queries[h * d..(h + 1) * d]);
            }
        }
    }
}

/// `outs[h] += ws[h] * codes` (each code widened to f32) for the `h <
/// ws.len()` heads whose `codes.len()` outputs fit in `outs`, at most 8: one
/// code row read once for several heads (the caller applies the row's scales
/// once, after summing). Auto-dispatch.
pub fn axpy_i8_multi(outs: &mut [f32], ws: &[f32], codes: &[i8]) {
    axpy_i8_multi_with(Isa::detect(), outs, ws, codes)
}

/// [`axpy_i8_multi`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn axpy_i8_multi_with(isa: Isa, outs: &mut [f32], ws: &[f32], codes: &[i8]) {
    let d = codes.len();
    let g = ws.len().min(8).min(outs.len().checked_div(d).unwrap_or(0));
    let (outs, ws) = (&mut outs[..g * d], &ws[..g]);
    match crate::isa::effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW/VL (`Isa::Avx512` requires
        // them); `outs` holds `ws.len() * d` values.
        Isa::Avx512 => unsafe { x86::axpy_multi_avx512(outs, ws, codes) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 and FMA; `outs` holds `ws.len() * d`
        // values.
        Isa::Avx2 => unsafe { x86::axpy_multi_avx2(outs, ws, codes) },
        _ => {
            for (out, &w) in outs.chunks_exact_mut(d.max(1)).zip(ws) {
                for (o, &c) in out.iter_mut().zip(codes) {
                    *o += w * f32::from(c);
                }
            }
        }
    }
}

/// Weighted sums of scattered int8 rows, each into the query head it is
/// paired with: `outs[heads[p] * d..][..d] += weights[p] * row(ids[p])` (codes
/// widened to f32) for every pair `p`, where `d` is the length of every row.
/// The rows `ahead` pairs ahead are prefetched, once per run of pairs of one
/// row. The caller applies the rows' scales once, after summing.
///
/// # Panics
/// If `ids`, `heads` and `weights` differ in length, a row's length differs
/// from the first's, or a head's `d` outputs are past the end of `outs`.
pub fn axpy_rows_i8<'a>(
    ids: &[u32],
    row: impl Fn(u32) -> &'a [i8],
    heads: &[u8],
    weights: &[f32],
    ahead: usize,
    outs: &mut [f32],
) {
    axpy_rows_i8_with(Isa::detect(), ids, row, heads, weights, ahead, outs)
}

/// [`axpy_rows_i8`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn axpy_rows_i8_with<'a>(
    isa: Isa,
    ids: &[u32],
    row: impl Fn(u32) -> &'a [i8],
    heads: &[u8],
    weights: &[f32],
    ahead: usize,
    outs: &mut [f32],
) {
    let Some((d, row)) = checked_rows("axpy_rows_i8", ids, row, heads, weights.len(), outs.len())
    else {
        return;
    };
    let level = crate::isa::effective(isa);
    #[cfg(target_arch = "x86_64")]
    if level == Isa::Avx512 && d.is_multiple_of(16) {
        // SAFETY: the CPU supports AVX-512F; every row has `d` values, a
        // multiple of 16, and every head's `d` outputs are inside `outs`.
        unsafe { x86::axpy_rows_avx512(ids, row, heads, weights, d, ahead, outs) };
        return;
    }
    for (p, ((&i, &h), &w)) in ids.iter().zip(heads).zip(weights).enumerate() {
        if let Some(&next) = ids.get(p + ahead) {
            crate::vector::prefetch(row(next));
        }
        let h = usize::from(h);
        axpy_i8_multi_with(level, &mut outs[h * d..(h + 1) * d], &[w], row(i));
    }
}

/// Head dimension up to which [`dot_rows_i8`]'s AVX-512 path runs; longer
/// rows take the per-row path.
const ROWS_MAX_D: usize = 256;

/// Dot products of scattered int8 rows with the query head each is paired
/// with, for keys stored with one scale per channel (`k ≈ offset + scales ⊙
/// code`, whose scales the caller folds into the queries): `out[p] =
/// row(ids[p]) · queries[heads[p] * d..][..d]`, where `d` is the length of
/// every row. The rows `ahead` pairs ahead are prefetched, once per run of
/// pairs of one row.
///
/// With `scaled_norms = Some((scales, norms))`, also `norms[p] = |scales ⊙
/// row(ids[p])|` (the key's distance from its offset), from the row already
/// loaded.
///
/// With AVX-512 and `d` a multiple of 32 (up to 256) the pairs go in blocks of
/// 16 with one transposed reduction. Results equal `dot_i8_f32_with` of the same
/// inputs up to summation order.
///
/// # Panics
/// If `ids`, `heads`, `out` (and `norms`) differ in length, a row's length
/// differs from the first's or from `scales`', or a head has no query.
pub fn dot_rows_i8<'a>(
    ids: &[u32],
    row: impl Fn(u32) -> &'a [i8],
    heads: &[u8],
    queries: &[f32],
    ahead: usize,
    out: &mut [f32],
    scaled_norms: Option<(&[f32], &mut [f32])>,
) {
    dot_rows_i8_with(
        Isa::detect(),
        ids,
        row,
        heads,
        queries,
        ahead,
        out,
        scaled_norms,
    )
}

/// [`dot_rows_i8`] with an explicit ISA (capped at what the CPU supports).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_rows_i8_with<'a>(
    isa: Isa,
    ids: &[u32],
    row: impl Fn(u32) -> &'a [i8],
    heads: &[u8],
    queries: &[f32],
    ahead: usize,
    out: &mut [f32],
    scaled_norms: Option<(&[f32], &mut [f32])>,
) {
    let Some((d, row)) = checked_rows("dot_rows_i8", ids, row, heads, out.len(), queries.len())
    else {
        return;
    };
    let g = queries.len().checked_div(d).unwrap_or(0);
    if let Some((scales, norms)) = &scaled_norms {
        assert!(
            scales.len() == d && norms.len() == ids.len(),
            "dot_rows_i8: {} scales for rows of {d}, {} norms for {} ids",
            scales.len(),
            norms.len(),
            ids.len()
        );
    }
    let level = crate::isa::effective(isa);
    #[cfg(target_arch = "x86_64")]
    if level == Isa::Avx512 && d.is_multiple_of(32) && d <= ROWS_MAX_D && g <= 8 {
        // SAFETY: the CPU supports AVX-512F; every row (and `scales`) has `d`
        // values, d is a multiple of 32 up to ROWS_MAX_D, every head < g has
        // `d` query values, and `norms` has a slot per id.
        unsafe {
            match scaled_norms {
                Some((scales, norms)) => x86::dot_rows_avx512::<true>(
                    ids, row, heads, queries, scales, d, ahead, out, norms,
                ),
                None => x86::dot_rows_avx512::<false>(
                    ids,
                    row,
                    heads,
                    queries,
                    &[],
                    d,
                    ahead,
                    out,
                    &mut [],
                ),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level == Isa::Avx2 && d.is_multiple_of(8) {
        // SAFETY: the CPU supports AVX2 and FMA; every row (and `scales`) has
        // `d` values, a multiple of 8, every head has `d` query values, and
        // `norms` has a slot per id.
        unsafe {
            match scaled_norms {
                Some((scales, norms)) => {
                    x86::dot_rows_avx2::<true>(ids, row, heads, queries, scales, ahead, out, norms)
                }
                None => {
                    x86::dot_rows_avx2::<false>(ids, row, heads, queries, &[], ahead, out, &mut [])
                }
            }
        }
        return;
    }
    for (p, ((&i, &h), o)) in ids.iter().zip(heads).zip(out.iter_mut()).enumerate() {
        if let Some(&next) = ids.get(p + ahead) {
            crate::vector::prefetch(row(next));
        }
        let h = usize::from(h);
        *o = dot_i8_f32_with(level, row(i), &queries[h * d..(h + 1) * d]);
    }
    if let Some((scales, norms)) = scaled_norms {
        for (&i, n) in ids.iter().zip(norms.iter_mut()) {
            let s: f32 = row(i)
                .iter()
                .zip(scales)
                .map(|(&c, &s)| (f32::from(c) * s) * (f32::from(c) * s))
                .sum();
            *n = s.sqrt();
        }
    }
}

fn dot_scalar(codes: &[i8], q: &[f32]) -> f32 {
    codes.iter().zip(q).map(|(&c, &x)| f32::from(c) * x).sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::dot_scalar;
    use std::arch::x86_64::*;

    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn dot_multi_avx512_g<const G: usize>(codes: &[i8], qs: &[f32], out: &mut [f32]) {
        let d = codes.len();
        let pc = codes.as_ptr();
        let pq = qs.as_ptr();
        let mut acc0 = [_mm512_setzero_ps(); G];
        let mut acc1 = [_mm512_setzero_ps(); G];
        let mut i = 0;
        while i + 32 <= d {
            let c = _mm256_loadu_si256(pc.add(i) as *const __m256i);
            let k0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c)));
            let k1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(c)));
            for h in 0..G {
                acc0[h] = _mm512_fmadd_ps(k0, _mm512_loadu_ps(pq.add(h * d + i)), acc0[h]);
                acc1[h] = _mm512_fmadd_ps(k1, _mm512_loadu_ps(pq.add(h * d + i + 16)), acc1[h]);
            }
            i += 32;
        }
        for h in 0..G {
            out[h] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[h], acc1[h]))
                + dot_scalar(&codes[i..], &qs[h * d + i..(h + 1) * d]);
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_multi_avx512(codes: &[i8], qs: &[f32], out: &mut [f32]) {
        dispatch_g!(out.len(), dot_multi_avx512_g, codes, qs, out)
    }

    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_multi_avx2_g<const G: usize>(codes: &[i8], qs: &[f32], out: &mut [f32]) {
        let d = codes.len();
        let pc = codes.as_ptr();
        let pq = qs.as_ptr();
        let mut acc0 = [_mm256_setzero_ps(); G];
        let mut acc1 = [_mm256_setzero_ps(); G];
        let mut i = 0;
        while i + 16 <= d {
            let c = _mm_loadu_si128(pc.add(i) as *const __m128i);
            let k0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
            let k1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(c)));
            for h in 0..G {
                acc0[h] = _mm256_fmadd_ps(k0, _mm256_loadu_ps(pq.add(h * d + i)), acc0[h]);
                acc1[h] = _mm256_fmadd_ps(k1, _mm256_loadu_ps(pq.add(h * d + i + 8)), acc1[h]);
            }
            i += 16;
        }
        for h in 0..G {
            out[h] = crate::vector::x86::hsum8(_mm256_add_ps(acc0[h], acc1[h]))
                + dot_scalar(&codes[i..], &qs[h * d + i..(h + 1) * d]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_multi_avx2(codes: &[i8], qs: &[f32], out: &mut [f32]) {
        dispatch_g!(out.len(), dot_multi_avx2_g, codes, qs, out)
    }

    /// Safety: AVX-512F/BW/VL; `outs` holds `ws.len() * codes.len()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn axpy_multi_avx512(outs: &mut [f32], ws: &[f32], codes: &[i8]) {
        let d = codes.len();
        let pc = codes.as_ptr();
        let mut i = 0;
        while i < d {
            let m = if d - i >= 16 {
                0xFFFF
            } else {
                (1u16 << (d - i)) - 1
            };
            let c = _mm_maskz_loadu_epi8(m, pc.add(i));
            let k = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c));
            for (h, &w) in ws.iter().enumerate() {
                let po = outs.as_mut_ptr().add(h * d + i);
                let o = _mm512_fmadd_ps(_mm512_set1_ps(w), k, _mm512_maskz_loadu_ps(m, po));
                _mm512_mask_storeu_ps(po, m, o);
            }
            i += 16;
        }
    }

    /// [`super::axpy_rows_i8`]. Safety: AVX-512F; every row has `d` values, a
    /// multiple of 16; every head's `d` outputs are inside `outs`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn axpy_rows_avx512<'a>(
        ids: &[u32],
        row: impl Fn(u32) -> &'a [i8],
        heads: &[u8],
        weights: &[f32],
        d: usize,
        ahead: usize,
        outs: &mut [f32],
    ) {
        for (p, ((&i, &h), &w)) in ids.iter().zip(heads).zip(weights).enumerate() {
            if let Some(&next) = ids.get(p + ahead) {
                if ids[p + ahead - 1] != next || ahead == 0 {
                    crate::vector::prefetch(row(next));
                }
            }
            let r = row(i).as_ptr();
            let o = outs.as_mut_ptr().add(usize::from(h) * d);
            let wv = _mm512_set1_ps(w);
            for c in (0..d).step_by(16) {
                let k = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    r.add(c) as *const __m128i
                )));
                _mm512_storeu_ps(o.add(c), _mm512_fmadd_ps(wv, k, _mm512_loadu_ps(o.add(c))));
            }
        }
    }

    /// [`super::dot_rows_i8`] in blocks of 16 pairs. Safety: AVX-512F; every
    /// row has `d` values, `d` is a multiple of 32 up to `ROWS_MAX_D`, every
    /// head has `d` query values; with `NORMS`, `scales` has `d` values and
    /// `norms` a slot per id.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_rows_avx512<'a, const NORMS: bool>(
        ids: &[u32],
        row: impl Fn(u32) -> &'a [i8],
        heads: &[u8],
        queries: &[f32],
        scales: &[f32],
        d: usize,
        ahead: usize,
        out: &mut [f32],
        norms: &mut [f32],
    ) {
        let n = ids.len();
        let mut acc = [_mm512_setzero_ps(); 16];
        let mut sq = [_mm512_setzero_ps(); 16];
        let mut p0 = 0;
        while p0 < n {
            let m = (n - p0).min(16);
            for (k, (a, s)) in acc.iter_mut().zip(sq.iter_mut()).enumerate() {
                if k >= m {
                    *a = _mm512_setzero_ps();
                    *s = _mm512_setzero_ps();
                    continue;
                }
                let p = p0 + k;
                // Pairs of one row are adjacent (all heads of a key): fetch it once.
                if let Some(&next) = ids.get(p + ahead) {
                    if p + ahead == 0 || ids[p + ahead - 1] != next {
                        crate::vector::prefetch(row(next));
                    }
                }
                let r = row(ids[p]).as_ptr();
                let q = queries.as_ptr().add(usize::from(heads[p]) * d);
                let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                for c in (0..d).step_by(32) {
                    let x = _mm256_loadu_si256(r.add(c) as *const __m256i);
                    let k0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(x)));
                    let k1 =
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(x)));
                    a0 = _mm512_fmadd_ps(k0, _mm512_loadu_ps(q.add(c)), a0);
                    a1 = _mm512_fmadd_ps(k1, _mm512_loadu_ps(q.add(c + 16)), a1);
                    if NORMS {
                        let y0 = _mm512_mul_ps(k0, _mm512_loadu_ps(scales.as_ptr().add(c)));
                        let y1 = _mm512_mul_ps(k1, _mm512_loadu_ps(scales.as_ptr().add(c + 16)));
                        s0 = _mm512_fmadd_ps(y0, y0, s0);
                        s1 = _mm512_fmadd_ps(y1, y1, s1);
                    }
                }
                *a = _mm512_add_ps(a0, a1);
                *s = _mm512_add_ps(s0, s1);
            }
            let keep = ((1u32 << m) - 1) as u16;
            _mm512_mask_storeu_ps(
                out.as_mut_ptr().add(p0),
                keep,
                crate::vector::x86::reduce16(&acc),
            );
            if NORMS {
                let norm = _mm512_sqrt_ps(crate::vector::x86::reduce16(&sq));
                _mm512_mask_storeu_ps(norms.as_mut_ptr().add(p0), keep, norm);
            }
            p0 += 16;
        }
    }

    /// Loads 8 codes as f32.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn widen8(p: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }

    /// Safety: AVX2 and FMA; `outs` holds `ws.len() * codes.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_multi_avx2(outs: &mut [f32], ws: &[f32], codes: &[i8]) {
        let d = codes.len();
        let whole = d / 8 * 8;
        for i in (0..whole).step_by(8) {
            let k = widen8(codes.as_ptr().add(i));
            for (h, &w) in ws.iter().enumerate() {
                let po = outs.as_mut_ptr().add(h * d + i);
                _mm256_storeu_ps(
                    po,
                    _mm256_fmadd_ps(_mm256_set1_ps(w), k, _mm256_loadu_ps(po)),
                );
            }
        }
        for (h, &w) in ws.iter().enumerate() {
            for (o, &c) in outs[h * d + whole..(h + 1) * d]
                .iter_mut()
                .zip(&codes[whole..])
            {
                *o += w * f32::from(c);
            }
        }
    }

    /// [`super::dot_rows_i8`] eight pairs at a time. Safety: AVX2 and FMA;
    /// every `row(ids[p])` has `d` values with `d % 8 == 0`, every head has
    /// `d` query values; with `NORMS`, `scales` has `d` values and `norms` a
    /// slot per id.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows_avx2<'a, const NORMS: bool>(
        ids: &[u32],
        row: impl Fn(u32) -> &'a [i8],
        heads: &[u8],
        queries: &[f32],
        scales: &[f32],
        ahead: usize,
        out: &mut [f32],
        norms: &mut [f32],
    ) {
        let n = ids.len();
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut sq = [_mm256_setzero_ps(); 8];
        for p0 in (0..n).step_by(8) {
            let m = (n - p0).min(8);
            for (k, (a, s)) in acc.iter_mut().zip(sq.iter_mut()).enumerate() {
                (*a, *s) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let p = p0 + k;
                if k >= m {
                    continue;
                }
                // Pairs of one row are adjacent (all heads of a key): fetch it once.
                if let Some(&next) = ids.get(p + ahead) {
                    if p + ahead == 0 || ids[p + ahead - 1] != next {
                        crate::vector::prefetch(row(next));
                    }
                }
                let r = row(ids[p]);
                let d = r.len();
                let q = queries.as_ptr().add(usize::from(heads[p]) * d);
                for c in (0..d).step_by(8) {
                    let x = widen8(r.as_ptr().add(c));
                    *a = _mm256_fmadd_ps(x, _mm256_loadu_ps(q.add(c)), *a);
                    if NORMS {
                        let t = _mm256_mul_ps(x, _mm256_loadu_ps(scales.as_ptr().add(c)));
                        *s = _mm256_fmadd_ps(t, t, *s);
                    }
                }
            }
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), crate::vector::x86::reduce8(&acc));
            out[p0..p0 + m].copy_from_slice(&lanes[..m]);
            if NORMS {
                let norm = _mm256_sqrt_ps(crate::vector::x86::reduce8(&sq));
                _mm256_storeu_ps(lanes.as_mut_ptr(), norm);
                norms[p0..p0 + m].copy_from_slice(&lanes[..m]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn every_isa_matches_the_scalar_reference_on_odd_sizes() {
        let mut rng = SplitMix64(8);
        for &d in &[1usize, 5, 16, 31, 33, 64, 100, 128, 131] {
            let codes: Vec<i8> = (0..d).map(|_| (rng.next_u64() % 255) as i8).collect();
            for g in 1..=8 {
                let qs: Vec<f32> = (0..g * d).map(|_| rng.signed_f32() * 3.0).collect();
                let want: Vec<f64> = (0..g)
                    .map(|h| {
                        (0..d)
                            .map(|i| f64::from(codes[i]) * f64::from(qs[h * d + i]))
                            .sum()
                    })
                    .collect();
                for isa in Isa::all_supported() {
                    let mut out = vec![f32::NAN; g + 1];
                    dot_i8_f32_multi_with(isa, &codes, &qs, &mut out);
                    for h in 0..g {
                        let tol = 1e-4 * (1.0 + want[h].abs()) + 1e-3 * d as f64;
                        assert!(
                            (f64::from(out[h]) - want[h]).abs() <= tol,
                            "{isa:?} d={d} g={g} h={h}: {} vs {}",
                            out[h],
                            want[h]
                        );
                    }
                    assert_eq!(out[g], 0.0, "heads past the queries are zeroed");
                    let one = dot_i8_f32_with(isa, &codes, &qs[..d]);
                    assert!(
                        (f64::from(one) - want[0]).abs()
                            <= 1e-4 * (1.0 + want[0].abs()) + 1e-3 * d as f64
                    );
                }
            }
        }
    }

    #[test]
    fn gathered_row_dots_match_scalar_for_every_isa() {
        let mut rng = SplitMix64(13);
        for isa in Isa::all_supported() {
            for &d in &[32usize, 64, 128, 96, 256, 7, 100, 288] {
                for &g in &[1usize, 3, 4, 8] {
                    let n_rows = 37;
                    let store: Vec<i8> = (0..n_rows * d)
                        .map(|_| (rng.next_u64() % 255) as i8)
                        .collect();
                    let queries: Vec<f32> = (0..g * d).map(|_| rng.signed_f32() * 3.0).collect();
                    let scales: Vec<f32> = (0..d).map(|_| rng.next_f32() * 0.1).collect();
                    for &pairs in &[0usize, 1, 15, 16, 17, 33, 70] {
                        let ids: Vec<u32> = (0..pairs)
                            .map(|_| (rng.next_u64() % n_rows as u64) as u32)
                            .collect();
                        let heads: Vec<u8> = (0..pairs)
                            .map(|_| (rng.next_u64() % g as u64) as u8)
                            .collect();
                        let row = |i: u32| &store[i as usize * d..(i as usize + 1) * d];
                        let mut out = vec![f32::NAN; pairs];
                        dot_rows_i8_with(isa, &ids, row, &heads, &queries, 5, &mut out, None);
                        let mut with_norms = vec![f32::NAN; pairs];
                        let mut norms = vec![f32::NAN; pairs];
                        dot_rows_i8_with(
                            isa,
                            &ids,
                            row,
                            &heads,
                            &queries,
                            5,
                            &mut with_norms,
                            Some((&scales, &mut norms)),
                        );
                        for p in 0..pairs {
                            let h = heads[p] as usize;
                            let want: f64 = row(ids[p])
                                .iter()
                                .zip(&queries[h * d..(h + 1) * d])
                                .map(|(&c, &q)| f64::from(c) * f64::from(q))
                                .sum();
                            let tol = 1e-4 * (1.0 + want.abs()) + 1e-3 * d as f64;
                            assert!(
                                (f64::from(out[p]) - want).abs() <= tol && out[p] == with_norms[p],
                                "{isa:?} d={d} g={g} pair {p}/{pairs}: {} vs {want}",
                                out[p]
                            );
                            let norm: f64 = row(ids[p])
                                .iter()
                                .zip(&scales)
                                .map(|(&c, &s)| (f64::from(c) * f64::from(s)).powi(2))
                                .sum::<f64>()
                                .sqrt();
                            assert!(
                                (f64::from(norms[p]) - norm).abs() <= 1e-5 * (1.0 + norm),
                                "{isa:?} d={d} pair {p}: norm {} vs {norm}",
                                norms[p]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "rows of unequal length")]
    fn gathered_row_dots_reject_ragged_rows() {
        let store = [1i8; 64];
        let row = |i: u32| if i == 0 { &store[..32] } else { &store[..31] };
        let mut out = [0.0; 2];
        dot_rows_i8(&[0, 1], row, &[0, 0], &[1.0; 32], 1, &mut out, None);
    }

    #[test]
    fn multi_head_axpy_matches_scalar_for_every_isa() {
        let mut rng = SplitMix64(14);
        for &d in &[1usize, 7, 16, 31, 64, 100, 128, 131] {
            let codes: Vec<i8> = (0..d).map(|_| (rng.next_u64() % 255) as i8).collect();
            for g in 1..=8 {
                let ws: Vec<f32> = (0..g).map(|_| rng.signed_f32()).collect();
                let base: Vec<f32> = (0..g * d + 3).map(|_| rng.signed_f32()).collect();
                for isa in Isa::all_supported() {
                    let mut outs = base.clone();
                    axpy_i8_multi_with(isa, &mut outs, &ws, &codes);
                    for h in 0..g {
                        for i in 0..d {
                            let want = base[h * d + i] + ws[h] * f32::from(codes[i]);
                            let got = outs[h * d + i];
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{isa:?} d={d} g={g}"
                            );
                        }
                    }
                    assert_eq!(outs[g * d..], base[g * d..], "{isa:?}: past the heads");
                }
            }
        }
    }

    #[test]
    fn gathered_row_axpys_match_scalar_for_every_isa() {
        let mut rng = SplitMix64(15);
        for isa in Isa::all_supported() {
            for &d in &[16usize, 32, 128, 7, 100] {
                for &g in &[1usize, 3, 8] {
                    let n_rows = 29;
                    let store: Vec<i8> = (0..n_rows * d)
                        .map(|_| (rng.next_u64() % 255) as i8)
                        .collect();
                    for &pairs in &[0usize, 1, 15, 17, 40] {
                        let mut ids: Vec<u32> = (0..pairs)
                            .map(|_| (rng.next_u64() % n_rows as u64) as u32)
                            .collect();
                        ids.sort_unstable();
                        let heads: Vec<u8> = (0..pairs)
                            .map(|_| (rng.next_u64() % g as u64) as u8)
                            .collect();
                        let weights: Vec<f32> = (0..pairs).map(|_| rng.next_f32()).collect();
                        let row = |i: u32| &store[i as usize * d..(i as usize + 1) * d];
                        let base: Vec<f32> = (0..g * d + 2).map(|_| rng.signed_f32()).collect();
                        let mut outs = base.clone();
                        axpy_rows_i8_with(isa, &ids, row, &heads, &weights, 3, &mut outs);
                        let mut want: Vec<f64> = base.iter().map(|&x| f64::from(x)).collect();
                        for p in 0..pairs {
                            let h = heads[p] as usize;
                            for (j, &c) in row(ids[p]).iter().enumerate() {
                                want[h * d + j] += f64::from(weights[p]) * f64::from(c);
                            }
                        }
                        for (j, (&got, &w)) in outs.iter().zip(&want).enumerate() {
                            assert!(
                                (f64::from(got) - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                "{isa:?} d={d} g={g} pairs={pairs} [{j}]: {got} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
