//! The per-channel centring and scales of a head's quantized rows, fixed
//! once from the rows that come first (the prefill).

use crate::error::CpuError;
use crate::row_blocks::Elem;
use crate::snapshot::{ArrayReader, ArrayWriter};

/// How far past the largest |k - mean| of the rows that fix the scales later
/// keys may go before int8 clamps them: one int8 step is then `1.25 · max /
/// 127`, under 1% of the channel's range, and keys appended during decode
/// have a quarter of the range to spare.
const KEY_RANGE_HEADROOM: f32 = 1.25;

/// The extra range given when the scales are fixed by appended rows (a store
/// that was never prefilled, whose first rows may be a single token's).
const UNPREFILLED_HEADROOM: f32 = 4.0;

/// Per channel `c`, the offset `m_c` and scale `s_c` of `x_c ≈ m_c + s_c ·
/// u_c`, where `u_c` is what the rows store (an int8 code, or a value the
/// row's own range quantizes).
#[derive(Default)]
pub(crate) struct ChannelScales {
    /// Per channel; empty until the first rows fix them.
    pub(crate) scales: Vec<f32>,
    /// `1 / scales` (0 where a scale is 0).
    pub(crate) inverse: Vec<f32>,
    /// The head's centring mean when the scales were fixed.
    pub(crate) offset: Vec<f32>,
}

impl ChannelScales {
    /// Whether rows have fixed the scales.
    pub(crate) fn is_fixed(&self) -> bool {
        !self.scales.is_empty()
    }

    /// Fixes the scales from `rows` of `d` channels around `offset`, for int8
    /// codes within ±127. With `rotary` (keys), a channel's scale also covers
    /// its rotary partners (the channel `d/2` away, and its neighbour, as the
    /// two RoPE layouts pair them), whose values a later position may rotate
    /// into it.
    pub(crate) fn fix<'r, T: Elem + 'r>(
        &mut self,
        d: usize,
        offset: &[f32],
        rotary: bool,
        rows: impl Iterator<Item = &'r [T]>,
    ) {
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

    /// Fixes the scales of a store that no prefill fixed from its first
    /// appended rows (`[n][d]`), around zero (the mean of a store that was
    /// never prefilled), with their rotary partners, as they may be keys, and
    /// with room for the rows to come, which they sample poorly.
    pub(crate) fn fix_unprefilled<T: Elem>(&mut self, d: usize, rows: &[T]) {
        self.fix(d, &vec![0.0; d], true, rows.chunks_exact(d.max(1)));
        self.scales
            .iter_mut()
            .for_each(|s| *s *= UNPREFILLED_HEADROOM);
        self.inverse
            .iter_mut()
            .for_each(|s| *s /= UNPREFILLED_HEADROOM);
    }

    /// Gives every channel the root mean square of the channels' scales.
    pub(crate) fn share_one_scale(&mut self) {
        let n = self.scales.len().max(1) as f32;
        let rms = (self.scales.iter().map(|s| s * s).sum::<f32>() / n).sqrt();
        let inverse = if rms > 0.0 { 1.0 / rms } else { 0.0 };
        self.scales.iter_mut().for_each(|s| *s = rms);
        self.inverse.iter_mut().for_each(|s| *s = inverse);
    }

    /// `(x_c - m_c) / s_c` of each channel of `row` into `out`.
    pub(crate) fn normalise<T: Elem>(&self, row: &[T], out: &mut [f32]) {
        for (((u, x), o), inv) in out.iter_mut().zip(row).zip(&self.offset).zip(&self.inverse) {
            *u = (x.to_f32() - o) * inv;
        }
    }

    /// Writes the scales, their inverses and the offsets.
    pub(crate) fn save(&self, out: &mut ArrayWriter) {
        out.put(&self.scales);
        out.put(&self.inverse);
        out.put(&self.offset);
    }

    /// Reads what [`ChannelScales::save`] wrote for a head of `d` channels
    /// holding `n` rows.
    pub(crate) fn load(
        &mut self,
        d: usize,
        n: usize,
        input: &mut ArrayReader,
    ) -> Result<(), CpuError> {
        let scales: Vec<f32> = input.get_at_most("int8 scales", d)?;
        // Rows fix their scales: only a store without rows has none.
        if scales.len() != d && !(scales.is_empty() && n == 0) {
            return Err(CpuError::Snapshot(format!(
                "{} channel scales for {n} rows of {d}",
                scales.len()
            )));
        }
        self.inverse = input.get("int8 inverse scales", scales.len())?;
        self.offset = input.get("int8 offsets", scales.len())?;
        self.scales = scales;
        Ok(())
    }
}
