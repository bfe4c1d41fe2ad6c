//! int4 and int2 rows of one kv head: keys centred and scaled per channel
//! (one shared scale for rotated int4 rows), rotated, then quantized per
//! row; values quantized per row and group
//! of channels. Every row is quantized when it arrives, so appends need no
//! staging buffer and have no cap (see [`crate::KvDtype`]).

use crate::channels::ChannelScales;
use crate::config::{MAX_VALUE_GROUPS, RANGE_BYTES, VALUE_GROUP};
use crate::error::CpuError;
use crate::rotation::Rotation;
use crate::row_blocks::{Blocks, Elem};
use crate::snapshot::{ArrayReader, ArrayWriter};
use half::f16;
use tandem_kernels::mem::OutOfMemory;
use tandem_kernels::packed::{axpy_packed, code_at, pack, packed_len, CodeBits};

/// The largest |lo| and step a range holds (f16's largest finite value).
const RANGE_LIMIT: f32 = 65504.0;

/// Quantizes `xs` over their own range to codes of `bits`, returning the
/// range `(lo, step)` as stored: `x ≈ lo + step · code`. Non-finite values
/// count as 0.
fn quantize_range(bits: CodeBits, xs: &mut [f32], codes: &mut [u8]) -> [f16; 2] {
    zero_non_finite(xs);
    let (lo, hi) = extremes(xs);
    encode(bits, xs, lo, range_step(bits, lo, hi), codes)
}

/// The step of codes of `bits` from `lo` (as f16 rounds it) up to `hi`.
fn range_step(bits: CodeBits, lo: f32, hi: f32) -> f32 {
    let lo = f16::from_f32(lo.clamp(-RANGE_LIMIT, RANGE_LIMIT)).to_f32();
    (hi - lo).max(0.0) / f32::from(bits.max_code())
}

/// Per code width, the step of the uniform quantizer of least mean squared
/// error for Gaussian values, in standard deviations (Max, 1960).
fn gaussian_step(bits: CodeBits) -> f32 {
    match bits {
        CodeBits::Two => 0.9957,
        CodeBits::Four => 0.3352,
    }
}

/// [`quantize_range`] for rows a [`Rotation`] made near Gaussian: the codes
/// are centred on the row's mean at [`gaussian_step`] times its standard
/// deviation, which clips the tails where that step is finer than the
/// range's. Four int2 codes stretched over a row's whole range leave most
/// values between two of them; clipped, the squared error halves.
fn quantize_rotated(bits: CodeBits, xs: &mut [f32], codes: &mut [u8]) -> [f16; 2] {
    zero_non_finite(xs);
    let n = xs.len().max(1) as f32;
    let mean = xs.iter().sum::<f32>() / n;
    let sd = (xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n).sqrt();
    let levels = f32::from(bits.max_code());
    let (lo, hi) = extremes(xs);
    let (ranged, clipped) = (range_step(bits, lo, hi), gaussian_step(bits) * sd);
    if clipped >= ranged {
        return encode(bits, xs, lo, ranged, codes);
    }
    encode(bits, xs, mean - clipped * levels / 2.0, clipped, codes)
}

/// Quantizes a key row that `rotation` turned: int2 codes clipped as
/// [`quantize_rotated`] does, where the rotation made the values near
/// Gaussian; int4 codes, and rows it left alone, over their range (16 codes
/// over a rotated row's range err no more than clipped ones).
fn quantize_key(bits: CodeBits, rotation: &Rotation, xs: &mut [f32], codes: &mut [u8]) -> [f16; 2] {
    if bits == CodeBits::Two && !rotation.is_identity() {
        quantize_rotated(bits, xs, codes)
    } else {
        quantize_range(bits, xs, codes)
    }
}

fn zero_non_finite(xs: &mut [f32]) {
    xs.iter_mut()
        .filter(|x| !x.is_finite())
        .for_each(|x| *x = 0.0);
}

/// The smallest and largest of `xs`.
fn extremes(xs: &[f32]) -> (f32, f32) {
    let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (lo, hi)
}

/// The codes of `xs` on the grid `lo + step · code` (both rounded to f16 as
/// stored), clamped to the grid; returns the stored `(lo, step)`.
fn encode(bits: CodeBits, xs: &[f32], lo: f32, step: f32, codes: &mut [u8]) -> [f16; 2] {
    let lo = f16::from_f32(lo.clamp(-RANGE_LIMIT, RANGE_LIMIT));
    let step = f16::from_f32(step.min(RANGE_LIMIT));
    let inv = if step.to_f32() > 0.0 {
        1.0 / step.to_f32()
    } else {
        0.0
    };
    for (c, x) in codes.iter_mut().zip(xs.iter()) {
        let code = ((x - lo.to_f32()) * inv).round();
        *c = code.clamp(0.0, f32::from(bits.max_code())) as u8;
    }
    [lo, step]
}

/// The f16 at byte `at` of `row`.
#[inline(always)]
fn f16_at(row: &[u8], at: usize) -> f32 {
    // The conversion in plain code inlines; `to_f32` calls out to check
    // for F16C on every use.
    f16::from_le_bytes([row[at], row[at + 1]]).to_f32_const()
}

/// Writes `range` at byte `at` of `row`.
fn put_range(row: &mut [u8], at: usize, range: [f16; 2]) {
    row[at..at + 2].copy_from_slice(&range[0].to_le_bytes());
    row[at + 2..at + 4].copy_from_slice(&range[1].to_le_bytes());
}

/// int4 or int2 key rows: `k ≈ m + s ⊙ Rᵀ(lo + step · code)`, the channel
/// offsets `m` and scales `s` fixed per head ([`PackedKeys::fix_channels`]),
/// `R` the [`Rotation`], `lo` and `step` per row. A row is its packed codes,
/// then `lo` and `step` (f16).
pub(crate) struct PackedKeys {
    pub(crate) rows: Blocks<u8>,
    pub(crate) bits: CodeBits,
    /// Channels.
    pub(crate) d: usize,
    pub(crate) channels: ChannelScales,
    /// The largest `Σ_c |lo + step · code_c|` of a stored row, which bounds
    /// what quantizing a query to int8 changes of its dot products.
    pub(crate) max_l1: f32,
    /// The rotation of the normalised rows before they are quantized.
    pub(crate) rotation: Rotation,
    /// One row being quantized (appends allocate nothing per row).
    normalised: Vec<f32>,
    codes: Vec<u8>,
    row: Vec<u8>,
}

impl PackedKeys {
    pub(crate) fn new(bits: CodeBits, d: usize) -> Self {
        PackedKeys {
            rows: Blocks::new(packed_len(d, bits) + RANGE_BYTES),
            bits,
            d,
            channels: ChannelScales::default(),
            max_l1: 0.0,
            rotation: Rotation::new(d),
            normalised: vec![0.0; d],
            codes: vec![0; d],
            row: vec![0; packed_len(d, bits) + RANGE_BYTES],
        }
    }

    /// Bytes of a row's codes.
    pub(crate) fn code_len(&self) -> usize {
        self.rows.d - RANGE_BYTES
    }

    /// Fixes the channels' centring and scales from the prefill `rows`,
    /// around `offset` ([`ChannelScales::fix`]).
    pub(crate) fn fix_channels<'r, T: Elem + 'r>(
        &mut self,
        offset: &[f32],
        rows: impl Iterator<Item = &'r [T]>,
    ) {
        self.channels.fix(self.d, offset, true, rows);
        self.share_scale_when_rotated();
    }

    /// Fixes them from the first appended rows `src` of a store no prefill
    /// filled ([`ChannelScales::fix_unprefilled`]).
    pub(crate) fn fix_channels_unprefilled<T: Elem>(&mut self, src: &[T]) {
        self.channels.fix_unprefilled(self.d, src);
        self.share_scale_when_rotated();
    }

    /// int4 rows that the rotation turns share one scale over their
    /// channels: the rotation already spreads a large channel over all of
    /// them, and scaling each channel to its own range first would hand the
    /// small channels' rounding back to the large ones, where the queries
    /// are large too. int2 rows, clipped at the Gaussian step, keep a scale
    /// per channel, which rounds them better.
    fn share_scale_when_rotated(&mut self) {
        if self.bits == CodeBits::Four && !self.rotation.is_identity() {
            self.channels.share_one_scale();
        }
    }

    /// The packed codes of row `i`.
    #[inline(always)]
    pub(crate) fn codes(&self, i: usize) -> &[u8] {
        &self.rows.row(i)[..self.code_len()]
    }

    /// `(lo, step)` of row `i`.
    #[inline(always)]
    pub(crate) fn range(&self, i: usize) -> (f32, f32) {
        let (row, at) = (self.rows.row(i), self.code_len());
        (f16_at(row, at), f16_at(row, at + 2))
    }

    pub(crate) fn push<T: Elem>(&mut self, src: &[T]) -> Result<(), OutOfMemory> {
        let len = self.code_len();
        for r in src.chunks_exact(self.d) {
            self.channels.normalise(r, &mut self.normalised);
            self.rotation.apply(&mut self.normalised);
            let range = quantize_key(
                self.bits,
                &self.rotation,
                &mut self.normalised,
                &mut self.codes,
            );
            pack(self.bits, &self.codes, &mut self.row[..len]);
            put_range(&mut self.row, len, range);
            let (lo, step) = (range[0].to_f32(), range[1].to_f32());
            let l1: f32 = self
                .codes
                .iter()
                .map(|&c| (lo + step * f32::from(c)).abs())
                .sum();
            self.max_l1 = self.max_l1.max(l1);
            self.rows.extend(&self.row, |x| x)?;
        }
        Ok(())
    }

    /// Row `i` dequantized into `dst`.
    pub(crate) fn row_f32(&self, i: usize, dst: &mut [f32]) {
        let (codes, (lo, step)) = (self.codes(i), self.range(i));
        for (c, o) in dst.iter_mut().enumerate() {
            *o = lo + step * f32::from(code_at(self.bits, codes, c));
        }
        self.rotation.invert(dst);
        let ChannelScales { scales, offset, .. } = &self.channels;
        for ((o, s), m) in dst.iter_mut().zip(scales).zip(offset) {
            *o = m + s * *o;
        }
    }

    pub(crate) fn save(&self, out: &mut ArrayWriter) {
        self.rows.save(out);
        self.channels.save(out);
    }

    pub(crate) fn load(&mut self, n: usize, input: &mut ArrayReader) -> Result<(), CpuError> {
        self.rows.load(n, "packed key rows", input)?;
        self.channels.load(self.d, n, input)?;
        self.max_l1 = (0..n).map(|i| self.row_l1(i)).fold(0.0, f32::max);
        Ok(())
    }

    fn row_l1(&self, i: usize) -> f32 {
        let (codes, (lo, step)) = (self.codes(i), self.range(i));
        (0..self.d)
            .map(|c| (lo + step * f32::from(code_at(self.bits, codes, c))).abs())
            .sum()
    }
}

/// int4 or int2 value rows, per row and group of [`VALUE_GROUP`] channels
/// (or the whole row, if shorter) `v ≈ lo_g + step_g · code`. A row is its
/// packed codes, then each group's `lo` and `step` (f16).
pub(crate) struct PackedValues {
    pub(crate) rows: Blocks<u8>,
    pub(crate) bits: CodeBits,
    /// Channels.
    pub(crate) d: usize,
    /// One row being quantized.
    values: Vec<f32>,
    codes: Vec<u8>,
    row: Vec<u8>,
}

impl PackedValues {
    pub(crate) fn new(bits: CodeBits, d: usize) -> Self {
        let width = packed_len(d, bits) + RANGE_BYTES * d.div_ceil(VALUE_GROUP);
        PackedValues {
            rows: Blocks::new(width),
            bits,
            d,
            values: vec![0.0; d],
            codes: vec![0; d],
            row: vec![0; width],
        }
    }

    /// Channels per group.
    pub(crate) fn group(&self) -> usize {
        VALUE_GROUP.min(self.d)
    }

    /// Groups per row.
    pub(crate) fn groups(&self) -> usize {
        self.d.div_ceil(self.group())
    }

    fn code_len(&self) -> usize {
        packed_len(self.d, self.bits)
    }

    /// The packed codes of row `i`.
    #[inline(always)]
    pub(crate) fn codes(&self, i: usize) -> &[u8] {
        &self.rows.row(i)[..self.code_len()]
    }

    /// `(lo, step)` of group `g` of row `i`.
    #[inline(always)]
    pub(crate) fn range(&self, i: usize, g: usize) -> (f32, f32) {
        let (row, at) = (self.rows.row(i), self.code_len() + RANGE_BYTES * g);
        (f16_at(row, at), f16_at(row, at + 2))
    }

    /// Row `i` decoded into `out` (its `d` values): `lo_j + step_j · code`
    /// per channel of group `j`, the codes decoded in registers.
    pub(crate) fn decode(&self, i: usize, out: &mut [f32]) {
        let (group, groups) = (self.group(), self.groups().min(MAX_VALUE_GROUPS));
        let mut steps = [0.0f32; MAX_VALUE_GROUPS];
        for (j, (step, channels)) in steps[..groups]
            .iter_mut()
            .zip(out.chunks_mut(group))
            .enumerate()
        {
            let lo;
            (lo, *step) = self.range(i, j);
            channels.fill(lo);
        }
        axpy_packed(self.bits, self.codes(i), group, &steps[..groups], out);
    }

    pub(crate) fn push<T: Elem>(&mut self, src: &[T]) -> Result<(), OutOfMemory> {
        let (len, group) = (self.code_len(), self.group());
        for r in src.chunks_exact(self.d) {
            for (v, x) in self.values.iter_mut().zip(r) {
                *v = x.to_f32();
            }
            let groups = self
                .values
                .chunks_mut(group)
                .zip(self.codes.chunks_mut(group));
            for (g, (xs, codes)) in groups.enumerate() {
                let range = quantize_range(self.bits, xs, codes);
                put_range(&mut self.row, len + RANGE_BYTES * g, range);
            }
            pack(self.bits, &self.codes, &mut self.row[..len]);
            self.rows.extend(&self.row, |x| x)?;
        }
        Ok(())
    }

    /// Row `i` dequantized into `dst`.
    pub(crate) fn row_f32(&self, i: usize, dst: &mut [f32]) {
        let (codes, group) = (self.codes(i), self.group());
        for (c, o) in dst.iter_mut().enumerate().take(self.d) {
            let (lo, step) = self.range(i, c / group);
            *o = lo + step * f32::from(code_at(self.bits, codes, c));
        }
    }

    pub(crate) fn save(&self, out: &mut ArrayWriter) {
        self.rows.save(out);
    }

    pub(crate) fn load(&mut self, n: usize, input: &mut ArrayReader) -> Result<(), CpuError> {
        self.rows.load(n, "packed value rows", input)
    }
}

#[cfg(test)]
#[path = "packed_tests.rs"]
mod tests;
