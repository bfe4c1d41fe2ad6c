//! Rows of signed 8-bit codes with one scale per row (`x ≈ scale · code`,
//! symmetric, codes in -127..=127): quantization, and dot products of a code row
//! with one or several f32 vectors (AVX-512, AVX2+FMA, scalar).
//!
//! A code row of head dimension 128 is two cache lines where a bf16 row is
//! four: the keys of the offloaded store take this form when memory reads,
//! not arithmetic, bound attention.

use crate::Isa;

/// Quantizes `x` into `codes` (`codes.len()` values) and returns the scale:
/// `max |x| / 127`, rounding to nearest. Each value is off by at most half a
/// step, `scale / 2`. An all-zero (or empty) row has scale 0 and zero codes;
/// non-finite values are treated as 0.
pub fn quantize_i8(x: &[f32], codes: &mut [i8]) -> f32 {
    let n = x.len().min(codes.len());
    let finite = |v: f32| if v.is_finite() { v } else { 0.0 };
    let max = x[..n].iter().fold(0f32, |m, &v| m.max(finite(v).abs()));
    if max == 0.0 {
        codes[..n].iter_mut().for_each(|c| *c = 0);
        return 0.0;
    }
    let scale = max / 127.0;
    let inv = 127.0 / max;
    for (c, &v) in codes[..n].iter_mut().zip(&x[..n]) {
        *c = (finite(v) * inv).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// `sum_i codes[i] * q[i]` over `min(codes.len(), q.len())` values (the caller
/// multiplies by the row's scale). Auto-dispatch.
pub fn dot_i8_f32(codes: &[i8], q: &[f32]) -> f32 {
    dot_i8_f32_with(Isa::detect(), codes, q)
}

/// [`dot_i8_f32`] with an explicit ISA (capped at what the CPU supports).
pub fn dot_i8_f32_with(isa: Isa, codes: &[i8], q: &[f32]) -> f32 {
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
pub fn dot_i8_f32_multi_with(isa: Isa, codes: &[i8], queries: &[f32], out: &mut [f32]) {
    let d = codes.len();
    let fit = queries.len().checked_div(d).unwrap_or(out.len());
    let g = out.len().min(8).min(fit);
    out[g..].iter_mut().for_each(|x| *x = 0.0);
    let (queries, out) = (&queries[..g * d], &mut out[..g]);
    match isa.min(crate::vector::best_supported()) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn quantization_is_within_half_a_step() {
        let mut rng = SplitMix64(5);
        for n in [0usize, 1, 7, 128, 131] {
            let x: Vec<f32> = (0..n)
                .map(|i| rng.signed_f32() * (1 + i % 9) as f32)
                .collect();
            let mut codes = vec![0i8; n];
            let scale = quantize_i8(&x, &mut codes);
            let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((scale - max / 127.0).abs() <= f32::EPSILON * max);
            for (&c, &v) in codes.iter().zip(&x) {
                assert!(
                    (f32::from(c) * scale - v).abs() <= scale * 0.5 + 1e-6,
                    "{v} {c}"
                );
            }
        }
        let mut codes = [5i8; 3];
        assert_eq!(
            quantize_i8(&[0.0, f32::NAN, f32::INFINITY], &mut codes),
            0.0
        );
        assert_eq!(codes, [0, 0, 0]);
    }

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
}
