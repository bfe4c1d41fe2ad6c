//! Dot products of a run of consecutive key rows with each query head of a
//! group: the logits of exact attention over every key, `out[h * n + k]` for
//! row `k` of `n` and head `h`. Each row is read once for all heads. On
//! AVX-512, four rows' lane sums for four heads are reduced together, one
//! tree of shuffles for sixteen (row, head) pairs where a horizontal sum
//! each would cost four times as many instructions. On AVX2, two rows' sums
//! for every head are reduced eight at a time; the scalar level (and AVX2
//! rows of other sizes) call the one-row kernels row by row.

use crate::int8::dot_i8_f32_multi_with;
use crate::isa::effective;
use crate::packed::{dot_packed_i8_multi_with, CodeBits};
use crate::vector::dot_bf16_f32_multi_with;
use crate::Isa;
use half::{bf16, f16};

/// Rows of packed codes ([`crate::packed`]) laid one after another: row `k`'s
/// `len` code bytes start at byte `k · stride` of `bytes` (a row may carry
/// other bytes after its codes).
#[derive(Clone, Copy)]
pub struct PackedRun<'a> {
    pub bits: CodeBits,
    pub bytes: &'a [u8],
    pub stride: usize,
    pub len: usize,
}

impl PackedRun<'_> {
    /// The number of rows.
    pub fn rows(&self) -> usize {
        if self.stride == 0 || self.bytes.len() < self.len {
            0
        } else {
            (self.bytes.len() - self.len) / self.stride + 1
        }
    }
}

/// `out[h * n + k] = rows[k] · queries[h]` for the `n = rows.len() / d` bf16
/// rows of `d` values and the `g = queries.len() / d` f32 queries.
///
/// # Panics
/// If `d` is 0, `g` is 0 or above 8, or `out` is shorter than `g · n`.
pub fn dots_bf16(rows: &[bf16], d: usize, queries: &[f32], out: &mut [f32]) {
    dots_bf16_with(Isa::detect(), rows, d, queries, out)
}

/// [`dots_bf16`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn dots_bf16_with(isa: Isa, rows: &[bf16], d: usize, queries: &[f32], out: &mut [f32]) {
    let (n, g) = check(rows.len(), d, queries.len(), out.len());
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW/VL; `check` bounded n, g and out.
        Isa::Avx512 => unsafe { x86::dots_bf16(rows, d, &queries[..g * d], n, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 and FMA; `check` bounded n, g and
        // out, and d is a multiple of 8.
        Isa::Avx2 if d.is_multiple_of(8) => unsafe {
            avx2::dots_bf16(rows, d, &queries[..g * d], n, out)
        },
        isa => {
            let mut row_out = [0.0f32; 8];
            for (k, row) in rows.chunks_exact(d).enumerate() {
                dot_bf16_f32_multi_with(isa, row, queries, &mut row_out[..g]);
                scatter(&row_out[..g], k, n, out);
            }
        }
    }
}

/// [`dots_bf16`] over int8 rows (each code widened to f32).
pub fn dots_i8(rows: &[i8], d: usize, queries: &[f32], out: &mut [f32]) {
    dots_i8_with(Isa::detect(), rows, d, queries, out)
}

/// [`dots_i8`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn dots_i8_with(isa: Isa, rows: &[i8], d: usize, queries: &[f32], out: &mut [f32]) {
    let (n, g) = check(rows.len(), d, queries.len(), out.len());
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW/VL; `check` bounded n, g and out.
        Isa::Avx512 => unsafe { x86::dots_i8(rows, d, &queries[..g * d], n, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as for `dots_bf16_with`.
        Isa::Avx2 if d.is_multiple_of(8) => unsafe {
            avx2::dots_i8(rows, d, &queries[..g * d], n, out)
        },
        isa => {
            let mut row_out = [0.0f32; 8];
            for (k, row) in rows.chunks_exact(d).enumerate() {
                dot_i8_f32_multi_with(isa, row, queries, &mut row_out[..g]);
                scatter(&row_out[..g], k, n, out);
            }
        }
    }
}

/// `out[h * n + k] = Σ_c code_c · queries[h][c]` for the `n` packed rows of
/// `run` and the `g = queries.len() / w` int8 queries, `w = planes · len` the
/// padded width [`crate::packed::dot_packed_i8_multi`] takes.
///
/// # Panics
/// If `run.len` is 0 or `run.stride < run.len`, `g` is 0 or above 8, or
/// `out` is shorter than `g · n`.
pub fn dots_packed(run: PackedRun, queries: &[i8], out: &mut [i32]) {
    dots_packed_with(Isa::detect(), run, queries, out)
}

/// [`dots_packed`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn dots_packed_with(isa: Isa, run: PackedRun, queries: &[i8], out: &mut [i32]) {
    assert!(
        run.len > 0 && run.stride >= run.len,
        "rows of {} bytes",
        run.len
    );
    let n = run.rows();
    let w = run.bits.planes() * run.len;
    let g = queries.len() / w;
    assert!((1..=8).contains(&g), "{g} queries (1 to 8)");
    assert!(
        out.len() >= g * n,
        "out holds {} of {} dots",
        out.len(),
        g * n
    );
    let queries = &queries[..g * w];
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW/VL/VNNI; rows, queries and out
        // were bounded above.
        Isa::Avx512 => unsafe { x86::dots_packed(run, queries, n, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 and FMA; rows, queries and out were
        // bounded above, and a row's codes are whole 32-byte chunks.
        Isa::Avx2 if run.len.is_multiple_of(32) => unsafe {
            avx2::dots_packed(run, queries, n, out)
        },
        isa => {
            let mut row_out = [0i32; 8];
            for k in 0..n {
                let row = &run.bytes[k * run.stride..k * run.stride + run.len];
                dot_packed_i8_multi_with(isa, run.bits, row, queries, &mut row_out[..g]);
                scatter(&row_out[..g], k, n, out);
            }
        }
    }
}

/// The two f16 values at byte `at` of each row of `run` (a packed row's
/// range, `lo` then `step`), widened to f32 into `lo` and `step`.
///
/// # Panics
/// If a row holds no 4 bytes at `at`, or `lo` or `step` holds fewer values
/// than `run` rows.
pub fn packed_ranges(run: PackedRun, at: usize, lo: &mut [f32], step: &mut [f32]) {
    packed_ranges_with(Isa::detect(), run, at, lo, step)
}

/// [`packed_ranges`] with an explicit ISA (capped at what the CPU supports).
pub(crate) fn packed_ranges_with(
    isa: Isa,
    run: PackedRun,
    at: usize,
    lo: &mut [f32],
    step: &mut [f32],
) {
    let n = run.rows();
    if n == 0 {
        return;
    }
    let end = (n - 1) * run.stride + at + 4;
    assert!(
        run.stride >= at + 4 && run.bytes.len() >= end,
        "rows without a range at {at}"
    );
    assert!(lo.len() >= n && step.len() >= n, "room for {n} ranges");
    let bytes = &run.bytes[..end];
    match effective(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F; every row holds `at + 4` bytes
        // (checked above), `lo` and `step` room for `n` values.
        Isa::Avx512 if n * run.stride <= i32::MAX as usize => unsafe {
            x86::packed_ranges(bytes, run.stride, at, n, lo, step)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2, FMA and F16C; every row holds
        // `at + 4` bytes (checked above), `lo` and `step` room for `n` values.
        Isa::Avx2 => unsafe { avx2::packed_ranges(bytes, run.stride, at, n, lo, step) },
        _ => {
            for k in 0..n {
                let b = &bytes[k * run.stride + at..k * run.stride + at + 4];
                lo[k] = f16::from_le_bytes([b[0], b[1]]).to_f32_const();
                step[k] = f16::from_le_bytes([b[2], b[3]]).to_f32_const();
            }
        }
    }
}

/// Checks the shapes of a run of `len / d` rows; returns `(n, g)`.
fn check(len: usize, d: usize, queries: usize, out: usize) -> (usize, usize) {
    assert!(d > 0, "rows of 0 values");
    let (n, g) = (len / d, queries / d);
    assert!((1..=8).contains(&g), "{g} queries (1 to 8)");
    assert!(out >= g * n, "out holds {out} of {} dots", g * n);
    (n, g)
}

/// Writes one row's dots, one per head, into the head-major `out`.
fn scatter<T: Copy>(row_out: &[T], k: usize, n: usize, out: &mut [T]) {
    for (h, &x) in row_out.iter().enumerate() {
        out[h * n + k] = x;
    }
}

#[cfg(target_arch = "x86_64")]
// Index loops over heads fill two rows' sums at once.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use super::PackedRun;
    use crate::packed::CodeBits;
    use half::bf16;
    use std::arch::x86_64::*;

    /// How lanes add: as f32 or as i32 (the shuffles move bits either way).
    trait Lanes {
        unsafe fn add(a: __m512, b: __m512) -> __m512;
    }

    struct F32;
    struct I32;

    impl Lanes for F32 {
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
    }

    impl Lanes for I32 {
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_castsi512_ps(_mm512_add_epi32(
                _mm512_castps_si512(a),
                _mm512_castps_si512(b),
            ))
        }
    }

    /// Four heads' lane sums of one row into one vector whose 128-bit block
    /// `h` holds four partial sums of head `h`.
    #[inline(always)]
    unsafe fn fold_heads<L: Lanes>(a: [__m512; 4]) -> __m512 {
        let v0 = L::add(
            _mm512_shuffle_f32x4::<0x44>(a[0], a[1]),
            _mm512_shuffle_f32x4::<0xEE>(a[0], a[1]),
        );
        let v1 = L::add(
            _mm512_shuffle_f32x4::<0x44>(a[2], a[3]),
            _mm512_shuffle_f32x4::<0xEE>(a[2], a[3]),
        );
        L::add(
            _mm512_shuffle_f32x4::<0x88>(v0, v1),
            _mm512_shuffle_f32x4::<0xDD>(v0, v1),
        )
    }

    /// Four rows' [`fold_heads`] into one vector: lane `4h + k` is row `k`'s
    /// sum for head `h`.
    #[inline(always)]
    unsafe fn fold_rows<L: Lanes>(w: [__m512; 4]) -> __m512 {
        let u0 = L::add(
            _mm512_unpacklo_ps(w[0], w[1]),
            _mm512_unpackhi_ps(w[0], w[1]),
        );
        let u1 = L::add(
            _mm512_unpacklo_ps(w[2], w[3]),
            _mm512_unpackhi_ps(w[2], w[3]),
        );
        L::add(
            _mm512_shuffle_ps::<0x44>(u0, u1),
            _mm512_shuffle_ps::<0xEE>(u0, u1),
        )
    }

    /// The lane sums of two rows for each of `G` heads: two rows at once
    /// share each load of the queries and keep enough sums in flight.
    trait RowSums<const G: usize> {
        unsafe fn sums(&self, rows: [usize; 2]) -> [[__m512; G]; 2];
        /// Row `k`'s first byte and the bytes of a row.
        fn row_bytes(&self, k: usize) -> (*const u8, usize);
    }

    /// How far ahead of the rows summed their lines are prefetched: the
    /// hardware's stream prefetcher alone leaves the loads waiting.
    const PREFETCH_BYTES: usize = 2048;

    /// Prefetches the lines of the row `PREFETCH_BYTES` ahead of row `k`
    /// (past the run's end too: the store's next rows follow it).
    #[inline(always)]
    fn prefetch_ahead<const G: usize, S: RowSums<G>>(src: &S, k: usize) {
        let (row, bytes) = src.row_bytes(k);
        crate::vector::prefetch_bytes(row.wrapping_add(PREFETCH_BYTES), bytes);
    }

    /// Runs `src` over `n` rows, four at a time, and writes the reduced sums
    /// (as bits) to `out[h * n + k]`.
    #[inline(always)]
    unsafe fn stream<const G: usize, L: Lanes, S: RowSums<G>>(src: &S, n: usize, out: *mut u32) {
        let groups = G.div_ceil(4);
        let mut k = 0;
        while k < n {
            let rows = (n - k).min(4);
            let mut folded = [[_mm512_setzero_ps(); 4]; 2];
            for pair in 0..rows.div_ceil(2) {
                let (a, b) = (k + 2 * pair, (k + 2 * pair + 1).min(n - 1));
                prefetch_ahead(src, a);
                prefetch_ahead(src, b);
                let sums = src.sums([a, b]);
                for (j, row) in sums.iter().enumerate() {
                    for (grp, f) in folded.iter_mut().enumerate().take(groups) {
                        let mut four = [_mm512_setzero_ps(); 4];
                        for (h, x) in four.iter_mut().enumerate().take(G - grp * 4) {
                            *x = row[grp * 4 + h];
                        }
                        f[2 * pair + j] = fold_heads::<L>(four);
                    }
                }
            }
            for (grp, f) in folded.iter().enumerate().take(groups) {
                let mut lanes = [0u32; 16];
                let r = fold_rows::<L>(*f);
                _mm512_storeu_si512(lanes.as_mut_ptr() as *mut _, _mm512_castps_si512(r));
                for h in 0..(G - grp * 4).min(4) {
                    let at = out.add((grp * 4 + h) * n + k);
                    if rows == 4 {
                        let four = [
                            lanes[4 * h],
                            lanes[4 * h + 1],
                            lanes[4 * h + 2],
                            lanes[4 * h + 3],
                        ];
                        std::ptr::write_unaligned(at as *mut [u32; 4], four);
                    } else {
                        for j in 0..rows {
                            *at.add(j) = lanes[4 * h + j];
                        }
                    }
                }
            }
            k += rows;
        }
    }

    /// The lanes of the 16-value chunk at `i` of a row of `d`, as a mask.
    #[inline(always)]
    fn mask16(i: usize, d: usize) -> __mmask16 {
        if d - i >= 16 {
            0xffff
        } else {
            (1u16 << (d - i)) - 1
        }
    }

    /// Rows of `d` values of type `T`, each widened to f32 by `widen`.
    struct WideRows<T> {
        rows: *const T,
        queries: *const f32,
        d: usize,
    }

    /// Loads 16 (masked) values of a row as f32.
    trait Widen {
        unsafe fn widen(p: *const Self, m: __mmask16) -> __m512;
    }

    impl Widen for u16 {
        #[inline(always)]
        unsafe fn widen(p: *const u16, m: __mmask16) -> __m512 {
            let wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p as *const i16));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
    }

    impl Widen for i8 {
        #[inline(always)]
        unsafe fn widen(p: *const i8, m: __mmask16) -> __m512 {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)))
        }
    }

    impl<const G: usize, T: Widen> RowSums<G> for WideRows<T> {
        fn row_bytes(&self, k: usize) -> (*const u8, usize) {
            let size = std::mem::size_of::<T>();
            (
                self.rows.wrapping_add(k * self.d) as *const u8,
                size * self.d,
            )
        }

        #[inline(always)]
        unsafe fn sums(&self, rows: [usize; 2]) -> [[__m512; G]; 2] {
            let d = self.d;
            let (r0, r1) = (self.rows.add(rows[0] * d), self.rows.add(rows[1] * d));
            let mut acc = [[_mm512_setzero_ps(); G]; 2];
            let mut i = 0;
            while i < d {
                let m = mask16(i, d);
                let (x0, x1) = (T::widen(r0.add(i), m), T::widen(r1.add(i), m));
                for h in 0..G {
                    let q = _mm512_maskz_loadu_ps(m, self.queries.add(h * d + i));
                    acc[0][h] = _mm512_fmadd_ps(x0, q, acc[0][h]);
                    acc[1][h] = _mm512_fmadd_ps(x1, q, acc[1][h]);
                }
                i += 16;
            }
            acc
        }
    }

    /// Packed rows of `P` planes.
    struct PackedRows<'a, const P: usize> {
        run: PackedRun<'a>,
        queries: *const i8,
    }

    impl<const G: usize, const P: usize> RowSums<G> for PackedRows<'_, P> {
        fn row_bytes(&self, k: usize) -> (*const u8, usize) {
            let row = self.run.bytes.as_ptr().wrapping_add(k * self.run.stride);
            (row, self.run.stride)
        }

        #[inline(always)]
        unsafe fn sums(&self, rows: [usize; 2]) -> [[__m512; G]; 2] {
            let (bits, len, stride) = (self.run.bits, self.run.len, self.run.stride);
            let base = self.run.bytes.as_ptr();
            let (r0, r1) = (base.add(rows[0] * stride), base.add(rows[1] * stride));
            let w = P * len;
            let low = _mm512_set1_epi8(bits.max_code() as i8);
            let mut acc = [[_mm512_setzero_si512(); G]; 2];
            let mut j = 0;
            while j < len {
                // Masked loads read nothing past the row or a plane's query.
                let m = if len - j >= 64 {
                    u64::MAX
                } else {
                    (1u64 << (len - j)) - 1
                };
                let c0 = _mm512_maskz_loadu_epi8(m, r0.add(j) as *const i8);
                let c1 = _mm512_maskz_loadu_epi8(m, r1.add(j) as *const i8);
                for p in 0..P {
                    let shift = _mm_cvtsi32_si128((bits.bits() as usize * p) as i32);
                    let codes0 = _mm512_and_si512(_mm512_srl_epi16(c0, shift), low);
                    let codes1 = _mm512_and_si512(_mm512_srl_epi16(c1, shift), low);
                    for h in 0..G {
                        let q = _mm512_maskz_loadu_epi8(m, self.queries.add(h * w + p * len + j));
                        acc[0][h] = _mm512_dpbusd_epi32(acc[0][h], codes0, q);
                        acc[1][h] = _mm512_dpbusd_epi32(acc[1][h], codes1, q);
                    }
                }
                j += 64;
            }
            let mut out = [[_mm512_setzero_ps(); G]; 2];
            for (o, a) in out.iter_mut().zip(&acc) {
                for (x, &y) in o.iter_mut().zip(a) {
                    *x = _mm512_castsi512_ps(y);
                }
            }
            out
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn dots_bf16_g<const G: usize>(rows: &WideRows<u16>, n: usize, out: *mut u32) {
        stream::<G, F32, WideRows<u16>>(rows, n, out)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn dots_i8_g<const G: usize>(rows: &WideRows<i8>, n: usize, out: *mut u32) {
        stream::<G, F32, WideRows<i8>>(rows, n, out)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dots_int4_g<const G: usize>(rows: &PackedRows<2>, n: usize, out: *mut u32) {
        stream::<G, I32, PackedRows<2>>(rows, n, out)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dots_int2_g<const G: usize>(rows: &PackedRows<4>, n: usize, out: *mut u32) {
        stream::<G, I32, PackedRows<4>>(rows, n, out)
    }

    /// # Safety
    /// AVX-512F; each of the `n` rows of `bytes` (at `stride`, which fits
    /// i32 times `n`) holds `at + 4` bytes; `lo` and `step` room for `n`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn packed_ranges(
        bytes: &[u8],
        stride: usize,
        at: usize,
        n: usize,
        lo: &mut [f32],
        step: &mut [f32],
    ) {
        let base = bytes.as_ptr().add(at);
        let lanes = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(stride as i32),
        );
        let mut k = 0;
        while k < n {
            let m: __mmask16 = if n - k >= 16 {
                0xffff
            } else {
                (1u16 << (n - k)) - 1
            };
            let first = base.add(k * stride);
            let both = _mm512_mask_i32gather_epi32::<1>(
                _mm512_setzero_si512(),
                m,
                lanes,
                first as *const i32,
            );
            let low = _mm512_cvtepi32_epi16(_mm512_and_si512(both, _mm512_set1_epi32(0xffff)));
            let high = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(both));
            _mm512_mask_storeu_ps(lo.as_mut_ptr().add(k), m, _mm512_cvtph_ps(low));
            _mm512_mask_storeu_ps(step.as_mut_ptr().add(k), m, _mm512_cvtph_ps(high));
            k += 16;
        }
    }

    /// # Safety
    /// AVX-512F/BW/VL; `rows` holds `n` rows of `d`, `queries` 1 to 8 of
    /// `d`, `out` at least `g · n` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn dots_bf16(
        rows: &[bf16],
        d: usize,
        queries: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        let src = WideRows {
            rows: rows.as_ptr() as *const u16,
            queries: queries.as_ptr(),
            d,
        };
        let out = out.as_mut_ptr() as *mut u32;
        dispatch_g!(queries.len() / d, dots_bf16_g, &src, n, out)
    }

    /// # Safety
    /// As [`dots_bf16`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn dots_i8(
        rows: &[i8],
        d: usize,
        queries: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        let src = WideRows {
            rows: rows.as_ptr(),
            queries: queries.as_ptr(),
            d,
        };
        let out = out.as_mut_ptr() as *mut u32;
        dispatch_g!(queries.len() / d, dots_i8_g, &src, n, out)
    }

    /// # Safety
    /// AVX-512F/BW/VL/VNNI; `run` holds `n` rows, `queries` 1 to 8 of
    /// `planes · run.len`, `out` at least `g · n` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn dots_packed(run: PackedRun, queries: &[i8], n: usize, out: &mut [i32]) {
        let g = queries.len() / (run.bits.planes() * run.len);
        let out = out.as_mut_ptr() as *mut u32;
        let queries = queries.as_ptr();
        match run.bits {
            CodeBits::Four => {
                let src = PackedRows::<2> { run, queries };
                dispatch_g!(g, dots_int4_g, &src, n, out)
            }
            CodeBits::Two => {
                let src = PackedRows::<4> { run, queries };
                dispatch_g!(g, dots_int2_g, &src, n, out)
            }
        }
    }
}

/// The AVX2 level: two rows for every head of the group per step, their
/// lane sums reduced eight at a time by one tree of horizontal adds.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::PackedRun;
    use crate::packed::CodeBits;
    use std::arch::x86_64::*;

    /// How lanes add: as f32 or as i32.
    trait Lanes {
        unsafe fn hadd(a: __m256, b: __m256) -> __m256;
        unsafe fn add(a: __m256, b: __m256) -> __m256;
    }

    struct F32;
    struct I32;

    impl Lanes for F32 {
        #[inline(always)]
        unsafe fn hadd(a: __m256, b: __m256) -> __m256 {
            _mm256_hadd_ps(a, b)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
    }

    impl Lanes for I32 {
        #[inline(always)]
        unsafe fn hadd(a: __m256, b: __m256) -> __m256 {
            _mm256_castsi256_ps(_mm256_hadd_epi32(
                _mm256_castps_si256(a),
                _mm256_castps_si256(b),
            ))
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_castsi256_ps(_mm256_add_epi32(
                _mm256_castps_si256(a),
                _mm256_castps_si256(b),
            ))
        }
    }

    /// Lane `i` of the result is the sum of the 8 lanes of `v[i]`.
    #[inline(always)]
    unsafe fn reduce8<L: Lanes>(v: &[__m256]) -> __m256 {
        let t = [
            L::hadd(v[0], v[1]),
            L::hadd(v[2], v[3]),
            L::hadd(v[4], v[5]),
            L::hadd(v[6], v[7]),
        ];
        // Lanes 0-3 and 4-7 of u[k] are partials of v[4k..4k + 4].
        let u = [L::hadd(t[0], t[1]), L::hadd(t[2], t[3])];
        L::add(
            _mm256_permute2f128_ps::<0x20>(u[0], u[1]),
            _mm256_permute2f128_ps::<0x31>(u[0], u[1]),
        )
    }

    /// The lane sums of two rows for each of `G` heads.
    trait RowSums<const G: usize> {
        unsafe fn sums(&self, rows: [usize; 2]) -> [[__m256; G]; 2];
        /// Row `k`'s first byte and the bytes of a row.
        fn row_bytes(&self, k: usize) -> (*const u8, usize);
    }

    /// How far ahead of the rows summed their lines are prefetched.
    const PREFETCH_BYTES: usize = 2048;

    /// Runs `src` over `n` rows, two at a time, and writes the reduced sums
    /// (as bits) to `out[h * n + k]`.
    #[inline(always)]
    unsafe fn stream<const G: usize, L: Lanes, S: RowSums<G>>(src: &S, n: usize, out: *mut u32) {
        let mut k = 0;
        while k < n {
            let pair = [k, (k + 1).min(n - 1)];
            for row in pair {
                let (p, bytes) = src.row_bytes(row);
                crate::vector::prefetch_bytes(p.wrapping_add(PREFETCH_BYTES), bytes);
            }
            let sums = src.sums(pair);
            // (head, row) pairs in order, padded to a multiple of 8, so that
            // each head's two sums land side by side.
            let mut flat = [_mm256_setzero_ps(); 16];
            for h in 0..G {
                flat[2 * h] = sums[0][h];
                flat[2 * h + 1] = sums[1][h];
            }
            let both = n - k >= 2;
            for chunk in 0..G.div_ceil(4) {
                let mut lanes = [0u32; 8];
                let r = reduce8::<L>(&flat[8 * chunk..8 * chunk + 8]);
                _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, _mm256_castps_si256(r));
                for h in 4 * chunk..G.min(4 * chunk + 4) {
                    let (i, at) = (2 * (h - 4 * chunk), out.add(h * n + k));
                    if both {
                        std::ptr::write_unaligned(at as *mut [u32; 2], [lanes[i], lanes[i + 1]]);
                    } else {
                        *at = lanes[i];
                    }
                }
            }
            k += 2;
        }
    }

    /// Rows of `d` values (a multiple of 8) of type `T`, widened to f32.
    struct WideRows<T> {
        rows: *const T,
        queries: *const f32,
        d: usize,
    }

    /// Loads 8 values of a row as f32.
    trait Widen {
        unsafe fn widen(p: *const Self) -> __m256;
    }

    impl Widen for u16 {
        #[inline(always)]
        unsafe fn widen(p: *const u16) -> __m256 {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
    }

    impl Widen for i8 {
        #[inline(always)]
        unsafe fn widen(p: *const i8) -> __m256 {
            let bytes = _mm_loadl_epi64(p as *const __m128i);
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))
        }
    }

    impl<const G: usize, T: Widen> RowSums<G> for WideRows<T> {
        fn row_bytes(&self, k: usize) -> (*const u8, usize) {
            let size = std::mem::size_of::<T>();
            (
                self.rows.wrapping_add(k * self.d) as *const u8,
                size * self.d,
            )
        }

        #[inline(always)]
        unsafe fn sums(&self, rows: [usize; 2]) -> [[__m256; G]; 2] {
            let d = self.d;
            let (r0, r1) = (self.rows.add(rows[0] * d), self.rows.add(rows[1] * d));
            let mut acc = [[_mm256_setzero_ps(); G]; 2];
            for i in (0..d).step_by(8) {
                let (x0, x1) = (T::widen(r0.add(i)), T::widen(r1.add(i)));
                for h in 0..G {
                    let q = _mm256_loadu_ps(self.queries.add(h * d + i));
                    acc[0][h] = _mm256_fmadd_ps(x0, q, acc[0][h]);
                    acc[1][h] = _mm256_fmadd_ps(x1, q, acc[1][h]);
                }
            }
            acc
        }
    }

    /// 32-byte chunks whose products an i16 lane sums before widening: each
    /// chunk adds two products per plane, at most 2 · 2 · 15 · 128 = 7680 in
    /// magnitude for int4 (3072 for int2), so four stay within 30720.
    const I16_CHUNKS: usize = 4;

    /// Packed rows of `P` planes, `run.len` a multiple of 32: `C` chunks of
    /// 32 bytes when `C > 0`, so that the common widths unroll with their
    /// shifts and masks as constants, else `run.len / 32` read at run time.
    struct PackedRows<'a, const P: usize, const C: usize> {
        run: PackedRun<'a>,
        queries: *const i8,
    }

    impl<const G: usize, const P: usize, const C: usize> RowSums<G> for PackedRows<'_, P, C> {
        fn row_bytes(&self, k: usize) -> (*const u8, usize) {
            let row = self.run.bytes.as_ptr().wrapping_add(k * self.run.stride);
            (row, self.run.stride)
        }

        #[inline(always)]
        unsafe fn sums(&self, rows: [usize; 2]) -> [[__m256; G]; 2] {
            let stride = self.run.stride;
            let len = if C > 0 { 32 * C } else { self.run.len };
            let bits = 8 / P;
            let base = self.run.bytes.as_ptr();
            let (r0, r1) = (base.add(rows[0] * stride), base.add(rows[1] * stride));
            let w = P * len;
            let low = _mm256_set1_epi8(((1 << bits) - 1) as i8);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [[_mm256_setzero_si256(); G]; 2];
            for run in (0..len).step_by(32 * I16_CHUNKS) {
                let mut part = [[_mm256_setzero_si256(); G]; 2];
                for j in (run..len.min(run + 32 * I16_CHUNKS)).step_by(32) {
                    let c0 = _mm256_loadu_si256(r0.add(j) as *const __m256i);
                    let c1 = _mm256_loadu_si256(r1.add(j) as *const __m256i);
                    for p in 0..P {
                        let shift = _mm_cvtsi32_si128((bits * p) as i32);
                        let codes0 = _mm256_and_si256(_mm256_srl_epi16(c0, shift), low);
                        let codes1 = _mm256_and_si256(_mm256_srl_epi16(c1, shift), low);
                        for h in 0..G {
                            let at = self.queries.add(h * w + p * len + j);
                            let q = _mm256_loadu_si256(at as *const __m256i);
                            let x0 = _mm256_maddubs_epi16(codes0, q);
                            let x1 = _mm256_maddubs_epi16(codes1, q);
                            part[0][h] = _mm256_add_epi16(part[0][h], x0);
                            part[1][h] = _mm256_add_epi16(part[1][h], x1);
                        }
                    }
                }
                for r in 0..2 {
                    for h in 0..G {
                        let wide = _mm256_madd_epi16(part[r][h], ones);
                        acc[r][h] = _mm256_add_epi32(acc[r][h], wide);
                    }
                }
            }
            let mut out = [[_mm256_setzero_ps(); G]; 2];
            for r in 0..2 {
                for h in 0..G {
                    out[r][h] = _mm256_castsi256_ps(acc[r][h]);
                }
            }
            out
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_bf16_g<const G: usize>(rows: &WideRows<u16>, n: usize, out: *mut u32) {
        stream::<G, F32, WideRows<u16>>(rows, n, out)
    }

    /// # Safety
    /// AVX2, FMA and F16C; each of the `n` rows of `bytes` (at `stride`)
    /// holds `at + 4` bytes; `lo` and `step` room for `n`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn packed_ranges(
        bytes: &[u8],
        stride: usize,
        at: usize,
        n: usize,
        lo: &mut [f32],
        step: &mut [f32],
    ) {
        let base = bytes.as_ptr().add(at);
        let word = |k: usize| (base.add(k * stride) as *const i32).read_unaligned();
        // Within each 128-bit half: the low f16 of each row, then the high.
        let split = _mm256_setr_epi8(
            0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12, 13, 2, 3,
            6, 7, 10, 11, 14, 15,
        );
        let whole = n / 8 * 8;
        for k in (0..whole).step_by(8) {
            let v = _mm256_setr_epi32(
                word(k),
                word(k + 1),
                word(k + 2),
                word(k + 3),
                word(k + 4),
                word(k + 5),
                word(k + 6),
                word(k + 7),
            );
            let halves = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(v, split));
            let (l, s) = (
                _mm256_castsi256_si128(halves),
                _mm256_extracti128_si256::<1>(halves),
            );
            _mm256_storeu_ps(lo.as_mut_ptr().add(k), _mm256_cvtph_ps(l));
            _mm256_storeu_ps(step.as_mut_ptr().add(k), _mm256_cvtph_ps(s));
        }
        for k in whole..n {
            let [a, b, c, d] = word(k).to_le_bytes();
            lo[k] = half::f16::from_le_bytes([a, b]).to_f32_const();
            step[k] = half::f16::from_le_bytes([c, d]).to_f32_const();
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_i8_g<const G: usize>(rows: &WideRows<i8>, n: usize, out: *mut u32) {
        stream::<G, F32, WideRows<i8>>(rows, n, out)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_packed_g<const G: usize, const P: usize, const C: usize>(
        rows: &PackedRows<P, C>,
        n: usize,
        out: *mut u32,
    ) {
        stream::<G, I32, PackedRows<P, C>>(rows, n, out)
    }

    /// [`dots_packed`] over rows of `P` planes and `C` chunks (0: any).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_planes<const P: usize, const C: usize>(
        run: PackedRun,
        queries: *const i8,
        g: usize,
        n: usize,
        out: *mut u32,
    ) {
        let src = PackedRows::<P, C> { run, queries };
        match g {
            1 => dots_packed_g::<1, P, C>(&src, n, out),
            2 => dots_packed_g::<2, P, C>(&src, n, out),
            3 => dots_packed_g::<3, P, C>(&src, n, out),
            4 => dots_packed_g::<4, P, C>(&src, n, out),
            5 => dots_packed_g::<5, P, C>(&src, n, out),
            6 => dots_packed_g::<6, P, C>(&src, n, out),
            7 => dots_packed_g::<7, P, C>(&src, n, out),
            8 => dots_packed_g::<8, P, C>(&src, n, out),
            _ => {}
        }
    }

    /// [`dots_planes`] with the row's chunks as a constant where they are
    /// one, two or four (heads of 64, 128 or 256 at int4).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_chunks<const P: usize>(
        run: PackedRun,
        queries: *const i8,
        g: usize,
        n: usize,
        out: *mut u32,
    ) {
        match run.len / 32 {
            1 => dots_planes::<P, 1>(run, queries, g, n, out),
            2 => dots_planes::<P, 2>(run, queries, g, n, out),
            4 => dots_planes::<P, 4>(run, queries, g, n, out),
            _ => dots_planes::<P, 0>(run, queries, g, n, out),
        }
    }

    /// # Safety
    /// AVX2 and FMA; `d` is a multiple of 8, `rows` holds `n` rows of `d`
    /// values, `queries` 1 to 8 of `d` and `out` at least `g · n` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots_bf16(
        rows: &[half::bf16],
        d: usize,
        queries: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        let src = WideRows {
            rows: rows.as_ptr() as *const u16,
            queries: queries.as_ptr(),
            d,
        };
        let out = out.as_mut_ptr() as *mut u32;
        dispatch_g!(queries.len() / d, dots_bf16_g, &src, n, out)
    }

    /// # Safety
    /// As [`dots_bf16`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots_i8(
        rows: &[i8],
        d: usize,
        queries: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        let src = WideRows {
            rows: rows.as_ptr(),
            queries: queries.as_ptr(),
            d,
        };
        let out = out.as_mut_ptr() as *mut u32;
        dispatch_g!(queries.len() / d, dots_i8_g, &src, n, out)
    }

    /// # Safety
    /// AVX2 and FMA; `run.len` is a multiple of 32, `run` holds `n` rows,
    /// `queries` 1 to 8 of `planes · run.len`, `out` at least `g · n` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots_packed(run: PackedRun, queries: &[i8], n: usize, out: &mut [i32]) {
        let g = queries.len() / (run.bits.planes() * run.len);
        let out = out.as_mut_ptr() as *mut u32;
        let queries = queries.as_ptr();
        match run.bits {
            CodeBits::Four => dots_chunks::<2>(run, queries, g, n, out),
            CodeBits::Two => dots_chunks::<4>(run, queries, g, n, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::{pack, packed_len};
    use crate::rng::SplitMix64;

    const SHAPES: [(usize, usize, usize); 10] = [
        (1, 8, 1),
        (3, 16, 2),
        (4, 128, 4),
        (5, 24, 3),
        (7, 64, 8),
        (9, 130, 5),
        (13, 33, 6),
        (17, 128, 7),
        (2, 256, 4),
        (3, 512, 2),
    ];

    /// `row · q` in f64, and `Σ |row_c · q_c|`, the scale of its rounding.
    fn reference(row: impl Fn(usize) -> f32, q: &[f32]) -> (f64, f64) {
        let terms = q
            .iter()
            .enumerate()
            .map(|(c, &x)| f64::from(row(c)) * f64::from(x));
        terms.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()))
    }

    fn close(got: f32, want: f64, scale: f64) -> bool {
        (f64::from(got) - want).abs() <= 1e-5 * scale.max(1.0)
    }

    #[test]
    fn every_isa_streams_the_dots_of_bf16_and_int8_rows_as_the_f64_reference() {
        let mut rng = SplitMix64(11);
        for &(n, d, g) in &SHAPES {
            let rows: Vec<f32> = (0..n * d).map(|_| rng.signed_f32() * 4.0).collect();
            let b: Vec<bf16> = rows.iter().map(|&x| bf16::from_f32(x)).collect();
            let codes: Vec<i8> = (0..n * d).map(|_| rng.next_u64() as i8).collect();
            let queries: Vec<f32> = (0..g * d).map(|_| rng.signed_f32()).collect();
            for isa in Isa::all_supported() {
                let mut got_b = vec![f32::NAN; g * n + 2];
                let mut got_i = vec![f32::NAN; g * n + 2];
                dots_bf16_with(isa, &b, d, &queries, &mut got_b);
                dots_i8_with(isa, &codes, d, &queries, &mut got_i);
                for (h, k) in (0..g).flat_map(|h| (0..n).map(move |k| (h, k))) {
                    let q = &queries[h * d..(h + 1) * d];
                    let (want_b, mag_b) = reference(|c| b[k * d + c].to_f32(), q);
                    let (want_i, mag_i) = reference(|c| f32::from(codes[k * d + c]), q);
                    let at = h * n + k;
                    assert!(
                        close(got_b[at], want_b, mag_b),
                        "{isa:?} bf16 n={n} d={d} g={g} ({h},{k})"
                    );
                    assert!(
                        close(got_i[at], want_i, mag_i),
                        "{isa:?} i8 n={n} d={d} g={g} ({h},{k})"
                    );
                }
                assert!(
                    got_b[g * n..].iter().all(|x| x.is_nan()),
                    "{isa:?} wrote past g·n"
                );
            }
        }
    }

    #[test]
    fn every_isa_reads_the_ranges_of_packed_rows() {
        let mut rng = SplitMix64(13);
        for n in [1usize, 5, 16, 17, 40] {
            let (stride, at) = (13 + n % 5, 7);
            let mut bytes = vec![0u8; n * stride];
            let mut want = Vec::new();
            for k in 0..n {
                let pair = [rng.signed_f32() * 9.0, rng.signed_f32() / 64.0].map(f16::from_f32);
                bytes[k * stride + at..k * stride + at + 2].copy_from_slice(&pair[0].to_le_bytes());
                bytes[k * stride + at + 2..k * stride + at + 4]
                    .copy_from_slice(&pair[1].to_le_bytes());
                want.push(pair.map(f16::to_f32));
            }
            // The last row ends at its range.
            let bytes = &bytes[..(n - 1) * stride + at + 4];
            let run = PackedRun {
                bits: CodeBits::Four,
                bytes,
                stride,
                len: 4,
            };
            for isa in Isa::all_supported() {
                let (mut lo, mut step) = (vec![f32::NAN; n + 1], vec![f32::NAN; n + 1]);
                packed_ranges_with(isa, run, at, &mut lo, &mut step);
                for (k, w) in want.iter().enumerate() {
                    assert_eq!([lo[k], step[k]], *w, "{isa:?} n={n} row {k}");
                }
                assert!(lo[n].is_nan() && step[n].is_nan(), "{isa:?} wrote past n");
            }
        }
    }

    #[test]
    fn every_isa_streams_the_dots_of_packed_rows_exactly() {
        let mut rng = SplitMix64(12);
        for bits in [CodeBits::Four, CodeBits::Two] {
            for &(n, d, g) in &SHAPES {
                let len = packed_len(d, bits);
                let stride = len + 4 + n % 3;
                let mut bytes = vec![0xAAu8; (n - 1) * stride + len];
                let mut codes = vec![vec![0u8; d]; n];
                for (k, row) in codes.iter_mut().enumerate() {
                    row.iter_mut()
                        .for_each(|c| *c = rng.next_u64() as u8 & bits.max_code());
                    pack(bits, row, &mut bytes[k * stride..k * stride + len]);
                }
                let w = bits.planes() * len;
                let mut queries = vec![0i8; g * w];
                for (h, q) in queries.chunks_exact_mut(w).enumerate() {
                    q[..d].iter_mut().for_each(|x| *x = rng.next_u64() as i8);
                    q[0] = if h % 2 == 0 { -128 } else { 127 };
                }
                let run = PackedRun {
                    bits,
                    bytes: &bytes,
                    stride,
                    len,
                };
                assert_eq!(run.rows(), n);
                for isa in Isa::all_supported() {
                    let mut got = vec![i32::MIN; g * n + 1];
                    dots_packed_with(isa, run, &queries, &mut got);
                    for (h, k) in (0..g).flat_map(|h| (0..n).map(move |k| (h, k))) {
                        let q = &queries[h * w..h * w + d];
                        let want: i32 = codes[k]
                            .iter()
                            .zip(q)
                            .map(|(&c, &x)| i32::from(c) * i32::from(x))
                            .sum();
                        assert_eq!(
                            got[h * n + k],
                            want,
                            "{isa:?} {bits:?} n={n} d={d} g={g} ({h},{k})"
                        );
                    }
                    assert_eq!(got[g * n], i32::MIN, "{isa:?} wrote past g·n");
                }
            }
        }
    }
}
