//! The stored K and V rows of one kv head: bf16 or f32 values, or int8 codes
//! with one scale per channel ([`KvDtype`]), in blocks that grow without
//! copying.

use crate::config::KvDtype;
use crate::error::CpuError;
use crate::snapshot::{ArrayReader, ArrayWriter, LeElem};
use half::bf16;
use std::borrow::Cow;
use tandem_kernels::int8::{axpy_i8_multi, dot_i8_f32_multi};
use tandem_kernels::mem::{HugeBuf, OutOfMemory, Plain, HUGE_PAGE};
use tandem_kernels::vector::{
    axpy_bf16, axpy_bf16_multi, axpy_f32, axpy_f32_multi, dot_bf16_f32_multi, dot_f32,
    dot_f32_multi, prefetch,
};

/// Bytes per block of stored rows: two huge pages.
const BLOCK_BYTES: usize = 2 * HUGE_PAGE;

/// Rows of `d` values in fixed blocks of a power-of-two number of rows, so
/// that the store grows by adding a block and never copies what it holds.
pub(crate) struct Blocks<T: Plain> {
    blocks: Vec<HugeBuf<T>>,
    pub(crate) d: usize,
    shift: u32,
    rows: usize,
}

impl<T: Plain> Blocks<T> {
    fn new(d: usize) -> Self {
        let fit = (BLOCK_BYTES / (d.max(1) * std::mem::size_of::<T>())).max(1);
        // The largest power of two that fits (a row index splits by shift and mask).
        let shift = usize::BITS - 1 - fit.leading_zeros();
        Blocks {
            blocks: Vec::new(),
            d,
            shift,
            rows: 0,
        }
    }

    fn rows_per_block(&self) -> usize {
        1 << self.shift
    }

    /// Row `i`; panics if `i` is out of range.
    #[inline(always)]
    pub(crate) fn row(&self, i: usize) -> &[T] {
        let block = &self.blocks[i >> self.shift];
        let o = (i & (self.rows_per_block() - 1)) * self.d;
        &block[o..o + self.d]
    }

    fn bytes(&self) -> usize {
        self.rows * self.d * std::mem::size_of::<T>()
    }

    /// Allocates blocks for `n` more rows, advised for huge pages at once:
    /// they are about to be filled.
    fn reserve(&mut self, n: usize) -> Result<(), OutOfMemory> {
        let want = self.rows + n;
        while self.blocks.len() * self.rows_per_block() < want {
            self.blocks.push(HugeBuf::with_capacity(
                self.rows_per_block() * self.d,
                true,
            )?);
        }
        Ok(())
    }

    /// Appends whole rows (`src.len()` a multiple of `d`), converting each value.
    fn extend<S: Copy>(&mut self, src: &[S], f: impl Fn(S) -> T) -> Result<(), OutOfMemory> {
        let mut rest = src;
        while !rest.is_empty() {
            // Every block before the one holding row `rows` is full.
            let index = self.rows >> self.shift;
            if index == self.blocks.len() {
                // A block filled by decode appends, a few rows per step, is
                // advised once it has a huge page's worth (below): advising it
                // now would fault a whole huge page for its first row.
                let cap = self.rows_per_block() * self.d;
                self.blocks.push(HugeBuf::with_capacity(cap, false)?);
            }
            let block = &mut self.blocks[index];
            let before = block.len();
            let taken = block.extend_map(rest, &f);
            let size = std::mem::size_of::<T>();
            if before * size < HUGE_PAGE && block.len() * size >= HUGE_PAGE {
                block.advise();
            }
            self.rows += taken / self.d;
            rest = &rest[taken..];
        }
        Ok(())
    }
}

impl<T: Plain + LeElem> Blocks<T> {
    /// Writes the rows as one array, `[rows][d]`.
    fn save(&self, out: &mut ArrayWriter) {
        let values = (0..self.rows).flat_map(|i| self.row(i).iter().copied());
        out.put_iter(self.rows * self.d, values);
    }

    /// Appends the `n` rows of the next array (written by [`Blocks::save`]).
    fn load(&mut self, n: usize, what: &str, input: &mut ArrayReader) -> Result<(), CpuError> {
        let flat: Vec<T> = input.get(what, n.saturating_mul(self.d))?;
        self.reserve(n)?;
        self.extend(&flat, |x| x)?;
        Ok(())
    }
}

/// Stored rows of one kv head, `[n][head_dim]`.
pub(crate) enum Rows {
    Bf16(Blocks<bf16>),
    F32(Blocks<f32>),
    I8(CodeRows),
}

/// How far past the largest |k - mean| of the rows that fix an int8 store's
/// channel scales later keys may go before they are clamped: one step is
/// then `1.25 · max / 127`, under 1% of the channel's range, and keys appended
/// during decode have a quarter of the range to spare.
const KEY_RANGE_HEADROOM: f32 = 1.25;

/// The extra range an int8 store gives its rows when its scales are fixed by
/// appended rows (a store that was never prefilled, whose first rows may be a
/// single token's).
const UNPREFILLED_HEADROOM: f32 = 4.0;

/// int8 key rows with one scale per channel: `k ≈ offset + scales ⊙ code`.
pub(crate) struct CodeRows {
    pub(crate) codes: Blocks<i8>,
    /// Per channel; empty until the first rows fix them.
    pub(crate) scales: Vec<f32>,
    /// `1 / scales` (0 where a scale is 0).
    inverse: Vec<f32>,
    /// The head's centring mean when the scales were fixed.
    pub(crate) offset: Vec<f32>,
    /// One row being quantized (appends allocate nothing per row).
    row_codes: Vec<i8>,
}

impl CodeRows {
    /// Fixes the channel scales from `rows` around `offset`. With `rotary`
    /// (keys), a channel's scale also covers its rotary partners (the channel
    /// `d/2` away, and its neighbour, as the two RoPE layouts pair them), whose
    /// values a later position may rotate into it.
    pub(crate) fn fix_range<'r, T: Elem + 'r>(
        &mut self,
        offset: &[f32],
        rotary: bool,
        rows: impl Iterator<Item = &'r [T]>,
    ) {
        let d = self.codes.d;
        let mut max = vec![0.0f32; d];
        for r in rows {
            for ((m, x), o) in max.iter_mut().zip(r).zip(offset) {
                let v = (x.to_f32() - o).abs();
                if v.is_finite() {
                    *m = m.max(v);
                }
            }
        }
        let half = d / 2;
        self.scales = (0..d)
            .map(|c| {
                let mut m = max[c];
                if rotary {
                    m = m
                        .max(max[(c + half) % d])
                        .max(max.get(c ^ 1).copied().unwrap_or(0.0));
                }
                m * KEY_RANGE_HEADROOM / 127.0
            })
            .collect();
        self.inverse = self
            .scales
            .iter()
            .map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 })
            .collect();
        self.offset = offset.to_vec();
    }

    fn push<T: Elem>(&mut self, row: &[T]) -> Result<(), OutOfMemory> {
        for (((c, x), o), inv) in self
            .row_codes
            .iter_mut()
            .zip(row)
            .zip(&self.offset)
            .zip(&self.inverse)
        {
            let v = (x.to_f32() - o) * inv;
            // NaN (a non-finite key) becomes 0: `as` saturates and maps NaN to 0.
            *c = v.round().clamp(-127.0, 127.0) as i8;
        }
        self.codes.extend(&self.row_codes, |x| x)
    }
}

impl Rows {
    /// Key rows of a store of `dtype`.
    pub(crate) fn keys(dtype: KvDtype, d: usize) -> Self {
        match dtype {
            KvDtype::Bf16 => Rows::Bf16(Blocks::new(d)),
            KvDtype::F32 => Rows::F32(Blocks::new(d)),
            KvDtype::K8 | KvDtype::K8V8 => Rows::codes(d),
        }
    }

    /// Value rows of a store of `dtype`.
    pub(crate) fn values(dtype: KvDtype, d: usize) -> Self {
        match dtype {
            KvDtype::Bf16 | KvDtype::K8 => Rows::Bf16(Blocks::new(d)),
            KvDtype::F32 => Rows::F32(Blocks::new(d)),
            KvDtype::K8V8 => Rows::codes(d),
        }
    }

    fn codes(d: usize) -> Self {
        Rows::I8(CodeRows {
            codes: Blocks::new(d),
            scales: Vec::new(),
            inverse: Vec::new(),
            offset: Vec::new(),
            row_codes: vec![0; d],
        })
    }

    /// Number of stored rows.
    pub(crate) fn rows(&self) -> usize {
        match self {
            Rows::Bf16(b) => b.rows,
            Rows::F32(b) => b.rows,
            Rows::I8(c) => c.codes.rows,
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        match self {
            Rows::Bf16(b) => b.bytes(),
            Rows::F32(b) => b.bytes(),
            Rows::I8(c) => c.codes.bytes() + (c.scales.len() + c.offset.len()) * 4,
        }
    }

    /// Reserves room for `n` more rows, backed by huge pages where the OS
    /// allows (rows are read in random order).
    pub(crate) fn reserve(&mut self, n: usize) -> Result<(), OutOfMemory> {
        match self {
            Rows::Bf16(b) => b.reserve(n),
            Rows::F32(b) => b.reserve(n),
            Rows::I8(c) => c.codes.reserve(n),
        }
    }

    pub(crate) fn extend<T: Elem>(&mut self, src: &[T]) -> Result<(), OutOfMemory> {
        match self {
            Rows::Bf16(b) => b.extend(src, Elem::to_bf16),
            Rows::F32(b) => b.extend(src, Elem::to_f32),
            Rows::I8(c) => {
                if c.scales.is_empty() {
                    // No prefill fixed the range: these rows do, around zero
                    // (the mean of a store that was never prefilled), with
                    // their rotary partners, as they may be keys, and with
                    // room for the rows to come, which they sample poorly.
                    let d = c.codes.d;
                    c.fix_range(&vec![0.0; d], true, src.chunks_exact(d));
                    c.scales.iter_mut().for_each(|s| *s *= UNPREFILLED_HEADROOM);
                    c.inverse
                        .iter_mut()
                        .for_each(|s| *s /= UNPREFILLED_HEADROOM);
                }
                for r in src.chunks_exact(c.codes.d) {
                    c.push(r)?;
                }
                Ok(())
            }
        }
    }

    /// Writes the rows as stored (int8 codes with their scales and offsets).
    pub(crate) fn save(&self, out: &mut ArrayWriter) {
        match self {
            Rows::Bf16(b) => b.save(out),
            Rows::F32(b) => b.save(out),
            Rows::I8(c) => {
                c.codes.save(out);
                out.put(&c.scales);
                out.put(&c.inverse);
                out.put(&c.offset);
            }
        }
    }

    /// Loads `n` rows written by [`Rows::save`] into these empty rows.
    pub(crate) fn load(&mut self, n: usize, input: &mut ArrayReader) -> Result<(), CpuError> {
        match self {
            Rows::Bf16(b) => b.load(n, "bf16 rows", input),
            Rows::F32(b) => b.load(n, "f32 rows", input),
            Rows::I8(c) => {
                let d = c.codes.d;
                c.codes.load(n, "int8 rows", input)?;
                let scales: Vec<f32> = input.get_at_most("int8 scales", d)?;
                // Rows fix their scales: only a store without rows has none.
                if scales.len() != d && !(scales.is_empty() && n == 0) {
                    return Err(CpuError::Snapshot(format!(
                        "{} int8 scales for {n} rows of {d}",
                        scales.len()
                    )));
                }
                c.inverse = input.get("int8 inverse scales", scales.len())?;
                c.offset = input.get("int8 offsets", scales.len())?;
                c.scales = scales;
                Ok(())
            }
        }
    }

    /// Row `i` widened to f32 into `dst` (`dst.len()` values).
    pub(crate) fn row_f32(&self, i: usize, dst: &mut [f32]) {
        match self {
            Rows::Bf16(b) => {
                for (o, x) in dst.iter_mut().zip(b.row(i)) {
                    *o = x.to_f32();
                }
            }
            Rows::F32(b) => dst.copy_from_slice(b.row(i)),
            Rows::I8(c) => {
                for (((o, &x), s), m) in dst
                    .iter_mut()
                    .zip(c.codes.row(i))
                    .zip(&c.scales)
                    .zip(&c.offset)
                {
                    *o = m + s * f32::from(x);
                }
            }
        }
    }
}

/// An input element type for loads and appends (bf16 or f32).
pub(crate) trait Elem: Copy + Send + Sync {
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Rounding to bf16 (exact for bf16).
    fn to_bf16(self) -> bf16;
}

impl Elem for bf16 {
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn to_bf16(self) -> bf16 {
        self
    }
}

impl Elem for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn to_bf16(self) -> bf16 {
        bf16::from_f32(self)
    }
}

/// The query heads of a group in the form a store's keys take them.
pub(crate) struct KeyQueries<'q> {
    /// The queries; for int8 keys, a copy scaled by the keys' channel scales.
    pub(crate) scaled: Cow<'q, [f32]>,
    /// For int8 keys, each query's dot product with the keys' offset: with
    /// `k = offset + scales ⊙ code`, `q · k = q · offset + (q ⊙ scales) · code`.
    pub(crate) offsets: [f32; 8],
}

impl<'q> KeyQueries<'q> {
    /// The queries (`[g][d]`, `g <= 8`) for the key rows `keys`.
    pub(crate) fn new(keys: &Rows, queries: &'q [f32], d: usize) -> Self {
        let mut kq = KeyQueries {
            scaled: queries.into(),
            offsets: [0.0; 8],
        };
        if let Rows::I8(c) = keys {
            let scaled = kq.scaled.to_mut();
            for (h, q) in scaled.chunks_exact_mut(d.max(1)).enumerate().take(8) {
                kq.offsets[h] = dot_f32(q, &c.offset);
                q.iter_mut().zip(&c.scales).for_each(|(x, s)| *x *= s);
            }
        }
        kq
    }
}

/// The reads of attention: dot products with key rows, weighted sums of
/// value rows.
impl Rows {
    /// Dot products of key row `i` with the query heads of `kq`, `out.len()`
    /// of them.
    #[inline(always)]
    pub(crate) fn dots(&self, i: usize, kq: &KeyQueries, out: &mut [f32]) {
        match self {
            Rows::Bf16(b) => dot_bf16_f32_multi(b.row(i), &kq.scaled, out),
            Rows::F32(b) => dot_f32_multi(b.row(i), &kq.scaled, out),
            Rows::I8(c) => {
                dot_i8_f32_multi(c.codes.row(i), &kq.scaled, out);
                out.iter_mut().zip(&kq.offsets).for_each(|(x, o)| *x += o);
            }
        }
    }

    /// `outs[h] += ws[h] * row i` for every head; int8 rows add their codes,
    /// which [`Rows::finish_sums`] turns into values.
    #[inline(always)]
    pub(crate) fn axpys(&self, i: usize, outs: &mut [f32], ws: &[f32]) {
        match self {
            Rows::Bf16(b) => axpy_bf16_multi(outs, ws, b.row(i)),
            Rows::F32(b) => axpy_f32_multi(outs, ws, b.row(i)),
            Rows::I8(c) => axpy_i8_multi(outs, ws, c.codes.row(i)),
        }
    }

    /// `out += w * row i`, as [`Rows::axpys`] for one head.
    #[inline(always)]
    pub(crate) fn axpy(&self, i: usize, out: &mut [f32], w: f32) {
        match self {
            Rows::Bf16(b) => axpy_bf16(out, w, b.row(i)),
            Rows::F32(b) => axpy_f32(out, w, b.row(i)),
            Rows::I8(c) => axpy_i8_multi(out, &[w], c.codes.row(i)),
        }
    }

    /// After [`Rows::axpys`] summed int8 codes with weights whose sum per head
    /// is `weight_sums[h]`, turns each head's `out` into the weighted sum of
    /// the rows themselves, `offset · weight_sum + scales ⊙ out`. Other rows
    /// are summed as they are.
    pub(crate) fn finish_sums(&self, outs: &mut [f32], weight_sums: &[f32]) {
        if let Rows::I8(c) = self {
            let d = c.codes.d.max(1);
            for (out, &w) in outs.chunks_exact_mut(d).zip(weight_sums) {
                for ((o, s), m) in out.iter_mut().zip(&c.scales).zip(&c.offset) {
                    *o = m * w + s * *o;
                }
            }
        }
    }

    /// Cache lines of one row.
    pub(crate) fn lines_per_row(&self) -> usize {
        let bytes = match self {
            Rows::Bf16(b) => b.d * 2,
            Rows::F32(b) => b.d * 4,
            Rows::I8(c) => c.codes.d,
        };
        bytes.div_ceil(64).max(1)
    }

    /// Prefetches row `i`, if there is one.
    #[inline(always)]
    pub(crate) fn prefetch_row(&self, i: usize) {
        if i < self.rows() {
            match self {
                Rows::Bf16(b) => prefetch(b.row(i)),
                Rows::F32(b) => prefetch(b.row(i)),
                Rows::I8(c) => prefetch(c.codes.row(i)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_hold_every_row_across_block_boundaries() {
        let d = 1000; // 1024 rows of 4000 bytes per block
        let mut b = Blocks::<f32>::new(d);
        assert_eq!(b.rows_per_block(), 1024);
        let value = |row: usize, j: usize| (row * 7 + j) as f32;
        let rows: Vec<f32> = (0..1500)
            .flat_map(|r| (0..d).map(move |j| value(r, j)))
            .collect();
        b.reserve(1500).expect("reserve");
        b.extend(&rows, |x| x).expect("load");
        // Decode-style appends in odd-sized chunks across the next boundary.
        let more: Vec<f32> = (1500..2600)
            .flat_map(|r| (0..d).map(move |j| value(r, j)))
            .collect();
        for chunk in more.chunks(7 * d) {
            b.extend(chunk, |x| x).expect("append");
        }
        assert_eq!(b.rows, 2600);
        assert_eq!(b.blocks.len(), 3);
        for r in [0, 1, 1023, 1024, 1499, 1500, 2047, 2048, 2599] {
            assert!(
                b.row(r).iter().enumerate().all(|(j, &x)| x == value(r, j)),
                "row {r}"
            );
        }
        assert_eq!(b.bytes(), 2600 * d * 4);
    }

    #[test]
    fn tiny_rows_get_one_block() {
        let mut b = Blocks::<bf16>::new(4);
        b.reserve(3).expect("reserve");
        let src: Vec<f32> = (0..12).map(|i| i as f32).collect();
        b.extend(&src, bf16::from_f32).expect("extend");
        assert_eq!(b.blocks.len(), 1);
        assert_eq!(b.row(2)[3].to_f32(), 11.0);
    }
}
