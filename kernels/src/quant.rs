//! Quantized matrices and their products with quantized activation vectors.
//!
//! Every quantized weight format tandem reads (ggml's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//! Q4_K, Q5_K, Q6_K) is repacked at load time into one *affine* form: blocks of 32
//! weights sharing a scale `d` and an offset `m`, each weight `w = d·q + m` with an
//! unsigned code `q` of 4 or 8 bits (Q5's 5-bit codes take a byte each; which
//! formats are repacked exactly is listed in `tandem_runtime::model::weights`). Activations are quantized to signed 8-bit codes per block of 32
//! (`x ≈ s·a`, 16 bits: 8-bit activations, as llama.cpp uses, visibly change greedy
//! output on small models with outlier channels), so that a block's contribution is
//!
//! ```text
//!   Σ w·x  ≈  d·s·Σ q·a  +  m·(s·Σ a)
//! ```
//!
//! where `Σ q·a` is an exact integer product — one `vpdpwssd` per 32 weights with
//! AVX-512 VNNI — and `s·Σ a` is computed once per activation block and shared by
//! every row.
//!
//! Layout of a row's 4-bit codes: groups of 64 weights in 32 bytes, byte `i` holding
//! weight `i` in its low nibble and weight `32 + i` in its high nibble; a final lone
//! block of 32 uses ggml's own layout (byte `i`: weights `i` and `16 + i`). 8-bit codes
//! are stored in order.

use half::f16;

use crate::isa::Isa;

/// Weights (and activations) are grouped in blocks of this many elements.
pub const BLOCK: usize = 32;

/// Largest activation code. Below `i16::MAX` so that a pair of products of a code
/// with an 8-bit weight code, summed by `vpdpwssd`/`vpmaddwd`, fits in an i32.
const ACT_MAX: f32 = 32767.0;

/// A row-major matrix of affine-quantized weights (`w = d·q + m` per block of 32).
#[derive(Clone)]
pub struct AffineMatrix {
    rows: usize,
    cols: usize,
    bits: u32,
    codes: Vec<u8>,
    scales: Vec<f16>,
    offsets: Vec<f16>,
}

impl std::fmt::Debug for AffineMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AffineMatrix({}x{}, {} bits)",
            self.rows, self.cols, self.bits
        )
    }
}

/// Why a block of raw bytes cannot become a matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

impl AffineMatrix {
    /// A matrix from per-block codes, scales and offsets: `codes[r*cols + c]` is the
    /// code of weight (r, c) and must be below `2^bits`; `scales`/`offsets` hold one
    /// value per block of 32 in row-major order.
    pub fn from_codes(
        rows: usize,
        cols: usize,
        bits: u32,
        codes: &[u8],
        scales: &[f16],
        offsets: &[f16],
    ) -> Result<AffineMatrix, ShapeError> {
        if bits != 4 && bits != 8 {
            return Err(ShapeError(format!(
                "{bits}-bit codes are not supported (4 or 8)"
            )));
        }
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(ShapeError(format!(
                "row length {cols} is not a positive multiple of {BLOCK}"
            )));
        }
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| ShapeError("matrix too large".into()))?;
        let n_blocks = n / BLOCK;
        if codes.len() != n || scales.len() != n_blocks || offsets.len() != n_blocks {
            return Err(ShapeError(format!(
                "{rows}x{cols} needs {n} codes and {n_blocks} scales and offsets, got {}, {} and {}",
                codes.len(),
                scales.len(),
                offsets.len()
            )));
        }
        if bits == 4 && codes.iter().any(|&q| q > 15) {
            return Err(ShapeError("a 4-bit code exceeds 15".into()));
        }
        let packed = if bits == 8 {
            codes.to_vec()
        } else {
            let mut packed = Vec::with_capacity(n / 2);
            for row in codes.chunks_exact(cols) {
                pack_nibbles_row(row, &mut packed);
            }
            packed
        };
        Ok(AffineMatrix {
            rows,
            cols,
            bits,
            codes: packed,
            scales: scales.to_vec(),
            offsets: offsets.to_vec(),
        })
    }

    /// Number of rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bits per code: 4 or 8.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Bytes the matrix occupies (codes, scales and offsets).
    pub fn size_bytes(&self) -> usize {
        self.codes.len() + 2 * (self.scales.len() + self.offsets.len())
    }

    /// The code of every weight of row `r`, in column order.
    pub fn row_codes(&self, r: usize) -> Vec<u8> {
        let row = self.row_packed(r);
        if self.bits == 8 {
            return row.to_vec();
        }
        let mut codes = vec![0u8; self.cols];
        unpack_nibbles_row(row, &mut codes);
        codes
    }

    /// Row `r` as floats.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows && out.len() == self.cols,
            "row {r} out of range or wrong output length"
        );
        let codes = self.row_codes(r);
        let nb = self.cols / BLOCK;
        for b in 0..nb {
            let d = self.scales[r * nb + b].to_f32();
            let m = self.offsets[r * nb + b].to_f32();
            for i in 0..BLOCK {
                out[b * BLOCK + i] = d * codes[b * BLOCK + i] as f32 + m;
            }
        }
    }

    /// Asks the CPU to start loading a row that will be needed soon: each row's
    /// scales and offsets live apart from its codes, and the hardware prefetcher
    /// alone leaves the first loads of every row waiting on memory.
    fn prefetch_row(&self, r: usize) {
        let nb = self.cols / BLOCK;
        prefetch(self.scales[r * nb..].as_ptr() as *const u8);
        prefetch(self.offsets[r * nb..].as_ptr() as *const u8);
        let codes = self.row_packed(r);
        for line in (0..codes.len()).step_by(64) {
            prefetch(codes[line..].as_ptr());
        }
    }

    fn row_bytes(&self) -> usize {
        self.cols * self.bits as usize / 8
    }

    fn row_packed(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.codes[r * rb..(r + 1) * rb]
    }

    fn row_view(&self, r: usize) -> RowView<'_> {
        let nb = self.cols / BLOCK;
        RowView {
            codes: self.row_packed(r),
            scales: &self.scales[r * nb..(r + 1) * nb],
            offsets: &self.offsets[r * nb..(r + 1) * nb],
        }
    }

    /// For each input `xs[t]`: `outs[t][i] = row (rows.start + i) · xs[t]`.
    ///
    /// Reads each weight row once for all inputs, which is what makes prefill fast.
    pub fn matmul(
        &self,
        xs: &[QuantizedVector],
        rows: std::ops::Range<usize>,
        outs: &mut [&mut [f32]],
    ) {
        self.matmul_with(Isa::detect(), xs, rows, outs)
    }

    /// [`AffineMatrix::matmul`] with an explicit instruction set.
    pub(crate) fn matmul_with(
        &self,
        isa: Isa,
        xs: &[QuantizedVector],
        rows: std::ops::Range<usize>,
        outs: &mut [&mut [f32]],
    ) {
        assert!(
            rows.end <= self.rows,
            "row range {rows:?} exceeds {} rows",
            self.rows
        );
        assert_eq!(xs.len(), outs.len(), "one output per input");
        for (x, out) in xs.iter().zip(outs.iter()) {
            assert_eq!(x.len, self.cols, "input length must equal the column count");
            assert_eq!(
                out.len(),
                rows.len(),
                "output length must equal the row count"
            );
        }
        // Tiles of up to 4 inputs share one decode of each weight group.
        let mut t0 = 0;
        while t0 < xs.len() {
            let t1 = (t0 + 4).min(xs.len());
            let tile = &xs[t0..t1];
            for (i, r) in rows.clone().enumerate() {
                if r + PREFETCH_ROWS < self.rows {
                    self.prefetch_row(r + PREFETCH_ROWS);
                }
                let row = self.row_view(r);
                let mut dots = [0f32; 4];
                dot_tile(
                    isa,
                    self.bits,
                    self.cols,
                    &row,
                    tile,
                    &mut dots[..tile.len()],
                );
                for (t, &d) in dots[..tile.len()].iter().enumerate() {
                    outs[t0 + t][i] = d;
                }
            }
            t0 = t1;
        }
    }
}

/// How many rows ahead of the one being computed to prefetch.
const PREFETCH_ROWS: usize = 4;

#[inline]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults, whatever the address; SSE is
    // part of the x86-64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A vector quantized to signed 16-bit codes per block of 32: `x ≈ scale·a`.
#[derive(Debug, Clone, Default)]
pub struct QuantizedVector {
    len: usize,
    codes: Vec<i16>,
    scales: Vec<f32>,
    /// `scale · Σ a` per block: what an affine weight's offset multiplies.
    scaled_sums: Vec<f32>,
}

impl QuantizedVector {
    /// An empty vector, to be filled by [`QuantizedVector::quantize`].
    pub fn new() -> QuantizedVector {
        QuantizedVector::default()
    }

    /// Quantizes `x` (whose length must be a multiple of 32) in place, reusing storage.
    pub fn quantize(&mut self, x: &[f32]) {
        assert!(
            x.len().is_multiple_of(BLOCK),
            "vector length {} is not a multiple of {BLOCK}",
            x.len()
        );
        let nb = x.len() / BLOCK;
        self.len = x.len();
        self.codes.resize(x.len(), 0);
        self.scales.resize(nb, 0.0);
        self.scaled_sums.resize(nb, 0.0);
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / ACT_MAX;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in self.codes[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(block) {
                // Round half away from zero without a libm call (`f32::round` is
                // not inlined on baseline x86-64): |v·inv| <= ACT_MAX by construction.
                let scaled = v * inv;
                let a = (scaled + 0.5f32.copysign(scaled)) as i32 as i16;
                *q = a;
                sum += a as i32;
            }
            self.scales[b] = scale;
            self.scaled_sums[b] = scale * sum as f32;
        }
    }

    /// The quantized vector of `x`.
    pub fn from_f32(x: &[f32]) -> QuantizedVector {
        let mut q = QuantizedVector::new();
        q.quantize(x);
        q
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the vector has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

struct RowView<'a> {
    codes: &'a [u8],
    scales: &'a [f16],
    offsets: &'a [f16],
}

fn pack_nibbles_row(row: &[u8], out: &mut Vec<u8>) {
    let mut groups = row.chunks_exact(2 * BLOCK);
    for g in &mut groups {
        for i in 0..BLOCK {
            out.push(g[i] | (g[BLOCK + i] << 4));
        }
    }
    let tail = groups.remainder();
    if !tail.is_empty() {
        for i in 0..BLOCK / 2 {
            out.push(tail[i] | (tail[BLOCK / 2 + i] << 4));
        }
    }
}

fn unpack_nibbles_row(packed: &[u8], out: &mut [u8]) {
    let cols = out.len();
    let n_groups = cols / (2 * BLOCK);
    for g in 0..n_groups {
        let src = &packed[g * BLOCK..(g + 1) * BLOCK];
        let dst = &mut out[g * 2 * BLOCK..(g + 1) * 2 * BLOCK];
        for i in 0..BLOCK {
            dst[i] = src[i] & 15;
            dst[BLOCK + i] = src[i] >> 4;
        }
    }
    if !cols.is_multiple_of(2 * BLOCK) {
        let src = &packed[n_groups * BLOCK..];
        let dst = &mut out[n_groups * 2 * BLOCK..];
        for i in 0..BLOCK / 2 {
            dst[i] = src[i] & 15;
            dst[BLOCK / 2 + i] = src[i] >> 4;
        }
    }
}

fn dot_tile(
    isa: Isa,
    bits: u32,
    cols: usize,
    row: &RowView,
    xs: &[QuantizedVector],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if isa == Isa::Avx512 {
            // SAFETY: Isa::Avx512 is only reported when AVX-512 F/BW/VL/VNNI are present.
            unsafe { x86::dot_tile_avx512(bits, cols, row, xs, out) };
            return;
        }
        if isa == Isa::Avx2 {
            // SAFETY: Isa::Avx2 is only reported when AVX2 and FMA are present.
            unsafe { x86::dot_tile_avx2(bits, cols, row, xs, out) };
            return;
        }
    }
    let _ = isa;
    dot_tile_scalar(bits, cols, row, xs, out)
}

/// The reference: exact integer block products, then the affine correction.
fn dot_tile_scalar(bits: u32, cols: usize, row: &RowView, xs: &[QuantizedVector], out: &mut [f32]) {
    let mut codes = vec![0u8; cols];
    if bits == 8 {
        codes.copy_from_slice(row.codes);
    } else {
        unpack_nibbles_row(row.codes, &mut codes);
    }
    for (x, o) in xs.iter().zip(out.iter_mut()) {
        let mut acc = 0f32;
        for b in 0..cols / BLOCK {
            let range = b * BLOCK..(b + 1) * BLOCK;
            let isum: i32 = codes[range.clone()]
                .iter()
                .zip(&x.codes[range])
                .map(|(&q, &a)| q as i32 * a as i32)
                .sum();
            acc += row.scales[b].to_f32() * x.scales[b] * isum as f32
                + row.offsets[b].to_f32() * x.scaled_sums[b];
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QuantizedVector, RowView, BLOCK};
    use half::f16;
    use std::arch::x86_64::*;

    /// `x` as f32 by F16C, inlined where `half`'s `to_f32` is a call that
    /// checks for F16C on every use.
    #[target_feature(enable = "f16c")]
    #[inline]
    unsafe fn f32_of(x: f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(x.to_bits()))))
    }

    /// Scalar contribution of a lone trailing block (rows whose length is an odd
    /// multiple of 32); shared by both SIMD paths.
    fn lone_block(bits: u32, cols: usize, row: &RowView, x: &QuantizedVector) -> f32 {
        let b = cols / BLOCK - 1;
        let mut codes = [0u8; BLOCK];
        if bits == 8 {
            codes.copy_from_slice(&row.codes[b * BLOCK..]);
        } else {
            let src = &row.codes[b * BLOCK / 2..];
            for i in 0..BLOCK / 2 {
                codes[i] = src[i] & 15;
                codes[BLOCK / 2 + i] = src[i] >> 4;
            }
        }
        let isum: i32 = codes
            .iter()
            .zip(&x.codes[b * BLOCK..])
            .map(|(&q, &a)| q as i32 * a as i32)
            .sum();
        row.scales[b].to_f32() * x.scales[b] * isum as f32
            + row.offsets[b].to_f32() * x.scaled_sums[b]
    }

    /// The codes of one group of 64 weights as two blocks of 32 unsigned bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_group(bits: u32, codes: *const u8, g: usize) -> (__m256i, __m256i) {
        if bits == 8 {
            (
                _mm256_loadu_si256(codes.add(g * 64) as *const __m256i),
                _mm256_loadu_si256(codes.add(g * 64 + 32) as *const __m256i),
            )
        } else {
            let packed = _mm256_loadu_si256(codes.add(g * 32) as *const __m256i);
            let mask = _mm256_set1_epi8(0x0f);
            (
                _mm256_and_si256(packed, mask),
                _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask),
            )
        }
    }

    /// Dot products of one row with up to 4 quantized vectors.
    ///
    /// Per block of 32 weights: codes widened to 16 bits, one `vpdpwssd` per input
    /// gives 16 lanes of 2-weight integer sums, scaled by the block's `d·s`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    pub(super) unsafe fn dot_tile_avx512(
        bits: u32,
        cols: usize,
        row: &RowView,
        xs: &[QuantizedVector],
        out: &mut [f32],
    ) {
        let n_blocks_even = (cols / BLOCK) & !1;
        let nt = xs.len();
        // Two accumulator chains per input: one fma chain would be latency-bound.
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut acc_odd = [_mm512_setzero_ps(); 4];
        let mut acc_offset = [_mm512_setzero_ps(); 4];
        let codes = row.codes.as_ptr();
        let mut lane_scales = [[0f32; 16]; 4];
        let mut b0 = 0;
        while b0 < n_blocks_even {
            let nb = (n_blocks_even - b0).min(16);
            let mask: __mmask16 = if nb == 16 { 0xffff } else { (1u16 << nb) - 1 };
            let d_w = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                mask,
                row.scales.as_ptr().add(b0) as *const i16,
            ));
            let m_w = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                mask,
                row.offsets.as_ptr().add(b0) as *const i16,
            ));
            for t in 0..nt {
                let x = &xs[t];
                let s = _mm512_maskz_loadu_ps(mask, x.scales.as_ptr().add(b0));
                _mm512_storeu_ps(lane_scales[t].as_mut_ptr(), _mm512_mul_ps(d_w, s));
                let sums = _mm512_maskz_loadu_ps(mask, x.scaled_sums.as_ptr().add(b0));
                acc_offset[t] = _mm512_fmadd_ps(m_w, sums, acc_offset[t]);
            }
            for k in 0..nb / 2 {
                let g = b0 / 2 + k;
                let (w0, w1) = load_group(bits, codes, g);
                let w0 = _mm512_cvtepu8_epi16(w0);
                let w1 = _mm512_cvtepu8_epi16(w1);
                for t in 0..nt {
                    let a = xs[t].codes.as_ptr().add(g * 64);
                    let i0 = _mm512_dpwssd_epi32(
                        _mm512_setzero_si512(),
                        w0,
                        _mm512_loadu_si512(a as *const _),
                    );
                    let i1 = _mm512_dpwssd_epi32(
                        _mm512_setzero_si512(),
                        w1,
                        _mm512_loadu_si512(a.add(32) as *const _),
                    );
                    acc[t] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(i0),
                        _mm512_set1_ps(lane_scales[t][2 * k]),
                        acc[t],
                    );
                    acc_odd[t] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(i1),
                        _mm512_set1_ps(lane_scales[t][2 * k + 1]),
                        acc_odd[t],
                    );
                }
            }
            b0 += 16;
        }
        for t in 0..nt {
            let sum = _mm512_add_ps(_mm512_add_ps(acc[t], acc_odd[t]), acc_offset[t]);
            let mut total = _mm512_reduce_add_ps(sum);
            if !cols.is_multiple_of(2 * BLOCK) {
                total += lone_block(bits, cols, row, &xs[t]);
            }
            out[t] = total;
        }
    }

    /// Integer dot product of 32 unsigned byte codes with 32 i16 activations, as 8 i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_isum_avx2(w: __m256i, a: *const i16) -> __m256i {
        let w_lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(w));
        let w_hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(w, 1));
        let p0 = _mm256_madd_epi16(w_lo, _mm256_loadu_si256(a as *const __m256i));
        let p1 = _mm256_madd_epi16(w_hi, _mm256_loadu_si256(a.add(16) as *const __m256i));
        _mm256_add_epi32(p0, p1)
    }

    /// AVX2 path: one block (32 weights) per step, integer sums by `vpmaddwd`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_tile_avx2(
        bits: u32,
        cols: usize,
        row: &RowView,
        xs: &[QuantizedVector],
        out: &mut [f32],
    ) {
        let n_blocks_even = (cols / BLOCK) & !1;
        let nt = xs.len();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut offset_sum = [0f32; 4];
        let codes = row.codes.as_ptr();
        for g in 0..n_blocks_even / 2 {
            let (w0, w1) = load_group(bits, codes, g);
            let (d0, d1) = (f32_of(row.scales[2 * g]), f32_of(row.scales[2 * g + 1]));
            let (m0, m1) = (f32_of(row.offsets[2 * g]), f32_of(row.offsets[2 * g + 1]));
            for t in 0..nt {
                let x = &xs[t];
                let a = x.codes.as_ptr().add(g * 64);
                let s0 = _mm256_cvtepi32_ps(block_isum_avx2(w0, a));
                let s1 = _mm256_cvtepi32_ps(block_isum_avx2(w1, a.add(32)));
                acc[t] = _mm256_fmadd_ps(s0, _mm256_set1_ps(d0 * x.scales[2 * g]), acc[t]);
                acc[t] = _mm256_fmadd_ps(s1, _mm256_set1_ps(d1 * x.scales[2 * g + 1]), acc[t]);
                offset_sum[t] += m0 * x.scaled_sums[2 * g] + m1 * x.scaled_sums[2 * g + 1];
            }
        }
        for t in 0..nt {
            let mut total = crate::vector::x86::hsum8(acc[t]) + offset_sum[t];
            if !cols.is_multiple_of(2 * BLOCK) {
                total += lone_block(bits, cols, row, &xs[t]);
            }
            out[t] = total;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rng::SplitMix64 as Rng;

    fn random_matrix(rng: &mut Rng, rows: usize, cols: usize, bits: u32) -> AffineMatrix {
        let max = (1u64 << bits) - 1;
        let codes: Vec<u8> = (0..rows * cols)
            .map(|_| (rng.next_u64() % (max + 1)) as u8)
            .collect();
        let nb = rows * cols / BLOCK;
        let scales: Vec<f16> = (0..nb)
            .map(|_| f16::from_f32(rng.signed_f32() * 0.1))
            .collect();
        let offsets: Vec<f16> = (0..nb)
            .map(|_| f16::from_f32(rng.signed_f32() * 0.5))
            .collect();
        AffineMatrix::from_codes(rows, cols, bits, &codes, &scales, &offsets).expect("valid")
    }

    #[test]
    fn packing_round_trips() {
        let mut rng = Rng(1);
        for cols in [32, 64, 96, 576] {
            let codes: Vec<u8> = (0..3 * cols).map(|_| (rng.next_u64() % 16) as u8).collect();
            let nb = 3 * cols / BLOCK;
            let ones = vec![f16::ONE; nb];
            let m = AffineMatrix::from_codes(3, cols, 4, &codes, &ones, &ones).expect("valid");
            for r in 0..3 {
                assert_eq!(m.row_codes(r), &codes[r * cols..(r + 1) * cols]);
            }
        }
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn every_isa_matches_the_scalar_reference_and_float_math() {
        let mut rng = Rng(7);
        for bits in [4, 8] {
            for cols in [32, 96, 160, 544, 576, 1568] {
                let rows = 7;
                let m = random_matrix(&mut rng, rows, cols, bits);
                for n_inputs in [1, 3, 4, 5] {
                    let xs_f: Vec<Vec<f32>> = (0..n_inputs)
                        .map(|_| (0..cols).map(|_| rng.signed_f32() * 3.0).collect())
                        .collect();
                    let xs: Vec<QuantizedVector> =
                        xs_f.iter().map(|x| QuantizedVector::from_f32(x)).collect();
                    let mut reference = vec![vec![0f32; rows]; n_inputs];
                    {
                        let mut outs: Vec<&mut [f32]> =
                            reference.iter_mut().map(|v| v.as_mut_slice()).collect();
                        m.matmul_with(Isa::Scalar, &xs, 0..rows, &mut outs);
                    }
                    // The quantized product is close to the float product.
                    let mut w = vec![0f32; cols];
                    for r in 0..rows {
                        m.dequantize_row(r, &mut w);
                        for t in 0..n_inputs {
                            let exact: f32 = w.iter().zip(&xs_f[t]).map(|(a, b)| a * b).sum();
                            let norm: f32 =
                                w.iter().zip(&xs_f[t]).map(|(a, b)| (a * b).abs()).sum();
                            assert!(
                                (exact - reference[t][r]).abs() <= 1e-4 * norm + 1e-4,
                                "bits {bits} cols {cols}: {exact} vs {}",
                                reference[t][r]
                            );
                        }
                    }
                    for isa in Isa::all_supported() {
                        let mut got = vec![vec![0f32; rows - 2]; n_inputs];
                        let mut outs: Vec<&mut [f32]> =
                            got.iter_mut().map(|v| v.as_mut_slice()).collect();
                        m.matmul_with(isa, &xs, 1..rows - 1, &mut outs);
                        for t in 0..n_inputs {
                            for i in 0..rows - 2 {
                                let want = reference[t][i + 1];
                                let tol = 1e-4 * (1.0 + want.abs()) + 1e-3;
                                assert!((got[t][i] - want).abs() <= tol,
                                    "{isa:?} bits {bits} cols {cols} input {t} row {i}: {} vs {want}", got[t][i]);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(AffineMatrix::from_codes(1, 33, 4, &[0; 33], &[f16::ONE], &[f16::ONE]).is_err());
        assert!(AffineMatrix::from_codes(1, 32, 4, &[16; 32], &[f16::ONE], &[f16::ONE]).is_err());
        assert!(AffineMatrix::from_codes(1, 32, 3, &[0; 32], &[f16::ONE], &[f16::ONE]).is_err());
        assert!(AffineMatrix::from_codes(2, 32, 8, &[0; 32], &[f16::ONE], &[f16::ONE]).is_err());
    }

    #[test]
    fn zero_vector_quantizes_to_zero() {
        let q = QuantizedVector::from_f32(&[0.0; 64]);
        assert!(q.codes.iter().all(|&c| c == 0));
        assert!(q.scales.iter().all(|&s| s == 0.0));
    }
}
