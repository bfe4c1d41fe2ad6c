//! Exact attention over every stored key, streamed: each key row is read
//! once for all the query heads of the group, the logits of one head lie
//! contiguous for a vectorised softmax, and the value rows are read in
//! order. No per-(key, head) lists as the selective policies keep.

// Index loops over heads read several per-head arrays at once.
#![allow(clippy::needless_range_loop)]

use super::passes::{every_logit, Partials, Step, NEGLIGIBLE_WEIGHT};
use super::scratch::Scratch;
use crate::config::{MAX_VALUE_GROUPS, VALUE_GROUP};
use crate::packed::PackedValues;
use crate::rows::Rows;
use crate::store::HeadStore;
use tandem_kernels::masks::{or_at_least, MASK_WORD};
use tandem_kernels::vector::{axpy_f32_multi, prefetch};

/// Value rows prefetched ahead of their sum (rows are read in order, but a
/// skipped row breaks the hardware prefetcher's stride).
const V_AHEAD: usize = 4;

/// Attends every key of `head` with every query head of `step`.
pub(super) fn attend(head: &HeadStore, step: &Step, scratch: &mut Scratch, parts: Partials) {
    let (n, g) = (head.len(), step.queries.len() / step.d);
    scratch.ensure_logits(n, g);
    let maxima = every_logit(head, step.kq, step.scale, g, n, &mut scratch.logits);
    // Per head: weights relative to its max, their sum and log-sum-exp.
    let mut inv = [0.0f32; 8];
    for (h, &max) in maxima.iter().enumerate().take(g) {
        let weights = &mut scratch.logits[h][..n];
        parts.touched[h] = n as u32;
        if max == f32::NEG_INFINITY || max.is_nan() {
            weights.fill(0.0);
            continue;
        }
        let sum = step.softmax.weights_relative(weights, max);
        parts.lse[h] = max + sum.ln();
        inv[h] = 1.0 / sum;
    }
    let needed = &mut scratch.needed;
    needed.clear();
    needed.resize(n.div_ceil(MASK_WORD), 0);
    for relative in &scratch.logits[..g] {
        or_at_least(&relative[..n], NEGLIGIBLE_WEIGHT, needed);
    }
    let weights = KeyWeights {
        relative: &scratch.logits[..g],
        inv,
        needed,
    };
    let out = &mut parts.out[..g * step.d];
    match &head.values {
        Rows::PackedValues(p) => sum_packed(p, step.d, &weights, n, out),
        values => sum_rows(values, &weights, out),
    }
}

/// Each head's softmax weights, relative to its largest, the inverse of
/// their sum, and the keys some head needs: bit `k` of `needed[c]` for key
/// `32 c + k` (a key every head weighs as negligible is not read).
struct KeyWeights<'a> {
    relative: &'a [Vec<f32>],
    inv: [f32; 8],
    needed: &'a [u32],
}

impl KeyWeights<'_> {
    /// The normalised weights of key `i` for each head into `ws`.
    #[inline(always)]
    fn of(&self, i: usize, ws: &mut [f32]) {
        for ((w, relative), inv) in ws.iter_mut().zip(self.relative).zip(self.inv) {
            *w = relative[i] * inv;
        }
    }

    /// The keys some head needs, in order.
    fn keys(&self) -> impl Iterator<Item = usize> + '_ {
        self.needed.iter().enumerate().flat_map(move |(c, &mask)| {
            let (first, mut mask) = (c * MASK_WORD, mask);
            std::iter::from_fn(move || {
                (mask != 0).then(|| {
                    let k = mask.trailing_zeros() as usize;
                    mask &= mask - 1;
                    first + k
                })
            })
        })
    }
}

/// `out[h] = Σ_i w[h][i] · v_i` over bf16, f32 or int8 value rows (int8
/// rows sum their codes, then [`Rows::finish_sums`] applies the scales).
fn sum_rows(values: &Rows, weights: &KeyWeights, out: &mut [f32]) {
    let g = weights.relative.len();
    let mut weight_sums = [0.0f32; 8];
    let mut ws = [0.0f32; 8];
    for i in weights.keys() {
        values.prefetch_row(i + V_AHEAD);
        weights.of(i, &mut ws[..g]);
        for (s, w) in weight_sums.iter_mut().zip(&ws[..g]) {
            *s += w;
        }
        values.axpys(i, out, &ws[..g]);
    }
    values.finish_sums(out, &weight_sums[..g]);
}

/// [`sum_rows`] over int4 or int2 value rows: each row is decoded once and
/// added to every head.
fn sum_packed(p: &PackedValues, d: usize, weights: &KeyWeights, n: usize, out: &mut [f32]) {
    let g = weights.relative.len();
    // Packed values hold at most this many channels (`LayerConfig` checks).
    let mut row = [0.0f32; VALUE_GROUP * MAX_VALUE_GROUPS];
    let decoded = &mut row[..d];
    let mut ws = [0.0f32; 8];
    for i in weights.keys() {
        if i + V_AHEAD < n {
            prefetch(p.rows.row(i + V_AHEAD));
        }
        p.decode(i, decoded);
        weights.of(i, &mut ws[..g]);
        axpy_f32_multi(out, &ws[..g], decoded);
    }
}
