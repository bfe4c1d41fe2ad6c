//! Per-block bounds of one kv head's stored keys, for the threshold policy:
//! per block of [`BOUND_BLOCK`] consecutive keys, the box (per channel, the
//! smallest and largest value) that holds them, so that one block's largest
//! possible `q·k` costs two dot products instead of a pass over its keys.
//!
//! The box bounds the keys as pass 1's dot products see them: the stored
//! values of bf16 and f32 rows, the dequantized codes (`offset + scale ·
//! code`) of int8 rows. Logits use the raw (uncentred) keys, so the box is of
//! the raw keys too.

use crate::error::CpuError;
use crate::rows::Rows;
use crate::snapshot::{count, ArrayReader, ArrayWriter};
use tandem_kernels::vector::dot_f32_multi;

/// Keys per bounded block.
pub const BOUND_BLOCK: usize = 64;

/// The boxes of one kv head's keys; kept up to date as keys are appended
/// (the last block may be partial).
pub(crate) struct KeyBounds {
    d: usize,
    /// Per block, its box as `d` centres then `d` radii: the largest `q·k`
    /// over the box is `q·centre + |q|·radius`, two vectorised dot products.
    boxes: Vec<f32>,
    /// Per block, the largest |value| in its box over every channel, which
    /// sizes the rounding slack of the bound.
    mags: Vec<f32>,
    /// The per-channel minima and maxima of the last block, widened as keys
    /// are appended to it.
    lo: Vec<f32>,
    hi: Vec<f32>,
    /// Keys covered.
    covered: usize,
    /// One key row (appends allocate nothing per row).
    row: Vec<f32>,
}

impl KeyBounds {
    pub(crate) fn new(d: usize) -> Self {
        KeyBounds {
            d,
            boxes: Vec::new(),
            mags: Vec::new(),
            lo: vec![0.0; d],
            hi: vec![0.0; d],
            covered: 0,
            row: vec![0.0; d],
        }
    }

    /// Number of blocks (the last may be partial).
    pub(crate) fn blocks(&self) -> usize {
        self.mags.len()
    }

    /// Keys covered by the boxes.
    pub(crate) fn covered(&self) -> usize {
        self.covered
    }

    /// Bytes held, counted in the store's index bytes.
    pub(crate) fn bytes(&self) -> usize {
        (self.boxes.len() + self.mags.len() + self.lo.len() + self.hi.len()) * 4
    }

    /// Writes the boxes, the last block's extent and the keys covered.
    pub(crate) fn save(&self, out: &mut ArrayWriter) {
        out.put(&[self.covered as u64]);
        out.put(&self.boxes);
        out.put(&self.mags);
        out.put(&self.lo);
        out.put(&self.hi);
    }

    /// Replaces these (empty) bounds by those [`KeyBounds::save`] wrote, of
    /// at most `max_keys` keys.
    pub(crate) fn load(
        &mut self,
        max_keys: usize,
        input: &mut ArrayReader,
    ) -> Result<(), CpuError> {
        let d = self.d;
        let covered = input.get::<u64>("bounded keys", 1)?[0];
        let covered = count("bounded keys", covered, max_keys)?;
        let blocks = covered.div_ceil(BOUND_BLOCK);
        self.boxes = input.get("key bounds", 2 * d * blocks)?;
        self.mags = input.get("key bound magnitudes", blocks)?;
        self.lo = input.get("last block minima", d)?;
        self.hi = input.get("last block maxima", d)?;
        self.covered = covered;
        Ok(())
    }

    /// Widens the boxes to the keys of `keys` not yet covered (every key at a
    /// bulk load, the appended ones after).
    pub(crate) fn extend(&mut self, keys: &Rows) {
        let n = keys.rows();
        let first = self.covered;
        for i in first..n {
            keys.row_f32(i, &mut self.row);
            if i % BOUND_BLOCK == 0 {
                self.lo.copy_from_slice(&self.row);
                self.hi.copy_from_slice(&self.row);
                self.boxes.resize(self.boxes.len() + 2 * self.d, 0.0);
                self.mags.push(0.0);
            } else {
                widen(&mut self.lo, &mut self.hi, &self.row);
            }
            if (i + 1) % BOUND_BLOCK == 0 || i + 1 == n {
                self.write_last_box();
            }
        }
        self.covered = n;
    }

    /// Writes the last block's box from `lo` and `hi`.
    fn write_last_box(&mut self) {
        let d = self.d;
        let o = self.boxes.len() - 2 * d;
        let (centres, radii) = self.boxes[o..].split_at_mut(d);
        let mut mag = 0.0f32;
        for (((c, r), &lo), &hi) in centres.iter_mut().zip(radii).zip(&self.lo).zip(&self.hi) {
            *c = 0.5 * lo + 0.5 * hi;
            *r = (hi - *c).max(*c - lo);
            mag = mag.max(lo.abs()).max(hi.abs());
        }
        if let Some(m) = self.mags.last_mut() {
            *m = mag;
        }
    }

    /// Upper bounds on `q·k` over block `j`'s keys for each of the `g =
    /// out.len()` heads of `q`.
    ///
    /// Each bound is the exact box maximum plus a rounding slack, `(4d + 64)
    /// · 2^-24 · |q|₁ · (mag + reach)`, which covers the f32 rounding of this
    /// bound, of the box's centre and radius, of int8's dequantization, and of
    /// any order in which pass 1 sums its dot product (each within `d · 2^-24`
    /// of its sum of |terms|): no key's computed dot product exceeds its
    /// block's bound, so a block whose bound is below a threshold holds no key
    /// at or above it.
    pub(crate) fn upper(&self, j: usize, q: &BoundQueries, out: &mut [f32]) {
        let d = self.d;
        let g = out.len();
        let (centres, radii) = self.boxes[2 * j * d..2 * (j + 1) * d].split_at(d);
        let mut spread = [0.0f32; 8];
        dot_f32_multi(centres, &q.queries[..g * d], out);
        dot_f32_multi(radii, &q.abs[..g * d], &mut spread[..g]);
        let slack = (SLACK_PER_CHANNEL * d as f32 + SLACK_MARGIN) * (self.mags[j] + q.reach);
        for h in 0..g {
            out[h] += spread[h] + slack * q.l1[h];
        }
    }
}

/// The queries of a group in the forms [`KeyBounds::upper`] reads.
pub(crate) struct BoundQueries<'q> {
    /// `[g][d]`.
    pub(crate) queries: &'q [f32],
    /// Their absolute values, `[g][d]`.
    pub(crate) abs: &'q [f32],
    /// Their 1-norms.
    pub(crate) l1: [f32; 8],
    /// The largest |offset| int8 key rows add to their codes (0 for others).
    pub(crate) reach: f32,
}

/// Rounding slack per channel, relative: four times f32's unit roundoff, for
/// the bound's sum and pass 1's (each within `d · 2^-24` of their sums of
/// |terms|), with a factor two to spare.
const SLACK_PER_CHANNEL: f32 = 4.0 / (1u32 << 24) as f32;
/// Slack for the few roundings not proportional to `d`: the box's centre
/// and radius, int8's scaled queries and offset.
const SLACK_MARGIN: f32 = 64.0 / (1u32 << 24) as f32;

/// Widens `lo`/`hi` to hold `row` (NaN values are ignored: their logits are
/// NaN and never reported).
fn widen(lo: &mut [f32], hi: &mut [f32], row: &[f32]) {
    for ((l, h), &x) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
        *l = l.min(x);
        *h = h.max(x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KvDtype;
    use tandem_kernels::rng::SplitMix64;

    #[test]
    fn bounds_hold_every_key_and_follow_appends() {
        let d = 9;
        let mut rng = SplitMix64(4);
        let rows: Vec<f32> = (0..200 * d).map(|_| rng.signed_f32() * 5.0).collect();
        let mut keys = Rows::keys(KvDtype::F32, d);
        let mut bounds = KeyBounds::new(d);
        // A bulk load of 70 keys, then appends in odd chunks.
        keys.extend(&rows[..70 * d]).expect("extend");
        bounds.extend(&keys);
        for chunk in rows[70 * d..].chunks(13 * d) {
            keys.extend(chunk).expect("extend");
            bounds.extend(&keys);
        }
        assert_eq!(bounds.covered(), 200);
        assert_eq!(bounds.blocks(), 200usize.div_ceil(BOUND_BLOCK));
        let q: Vec<f32> = (0..2 * d).map(|_| rng.signed_f32()).collect();
        let abs: Vec<f32> = q.iter().map(|x| x.abs()).collect();
        let mut l1 = [0.0; 8];
        for (l, a) in l1.iter_mut().zip(abs.chunks_exact(d)) {
            *l = a.iter().sum();
        }
        let bq = BoundQueries {
            queries: &q,
            abs: &abs,
            l1,
            reach: 0.0,
        };
        let mut ub = [0.0f32; 2];
        for (i, k) in rows.chunks_exact(d).enumerate() {
            bounds.upper(i / BOUND_BLOCK, &bq, &mut ub);
            for (h, (qh, u)) in q.chunks_exact(d).zip(ub).enumerate() {
                let dot: f32 = k.iter().zip(qh).map(|(a, b)| a * b).sum();
                assert!(dot <= u, "key {i} head {h}: {dot} > {u}");
            }
        }
    }
}
