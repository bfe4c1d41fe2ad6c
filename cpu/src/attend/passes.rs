//! The two passes of attention over a selection of keys, shared by every
//! policy: pass 1 computes the logit of every (key, head) pair selected (Q·K,
//! corrected by the estimator under LSH), then the softmax; pass 2 sums the V
//! rows of the pairs whose weight matters.

// Index loops over heads and keys read several parallel arrays at once.
#![allow(clippy::needless_range_loop)]

use crate::config::MAX_VALUE_GROUPS;
use crate::estimator::LnUTable;
use crate::packed::{PackedKeys, PackedValues};
use crate::reads::{packed_key_dots, KeyQueries, RunDots};
use crate::retrieval::Selection;
use crate::rows::{CodeRows, Rows};
use crate::store::HeadStore;
use half::f16;
use tandem_kernels::heads::add_per_head;
use tandem_kernels::int8::{axpy_rows_i8, dot_rows_i8};
use tandem_kernels::packed::axpy_packed;
use tandem_kernels::sas::Softmax;
use tandem_kernels::vector::{
    corrected_logits, dot_f32, dot_rows_bf16, fold_lanes, prefetch, prefetch_at,
};

/// How many cache lines of K rows are prefetched ahead of the dot products:
/// 8 bf16 rows of d=128. Rows of a cold store come from DRAM at random: 8 rows
/// ahead keep more misses in flight than 4, while 16 gain nothing more.
/// Shorter rows (int8) go more rows ahead.
const K_LINES_AHEAD: usize = 32;
/// How many keys ahead the V rows are prefetched.
const V_AHEAD: usize = 8;
/// V rows whose softmax weight relative to the head's largest is below this
/// (2^-30, a logit more than 20.8 below the max) for every head are not read:
/// each such key would change the normalised output by less than 2^-30 of the
/// largest |value| (the sum of weights is at least 1), i.e. by less than f32
/// rounding, and the log-sum-exp still includes it. On peaked attention this
/// skips most V rows.
pub(crate) const NEGLIGIBLE_WEIGHT: f32 = 1.0 / (1u64 << 30) as f32;

/// The (key, head) pairs of one step's pass 1, key-major.
#[derive(Default)]
pub(crate) struct PairLists {
    /// Key position.
    keys: Vec<u32>,
    /// Query head of the group.
    heads: Vec<u8>,
    /// The dot product of the key with the head's query, then its logit,
    /// then its softmax weight.
    dots: Vec<f32>,
    /// The pairs whose V rows are read.
    needed: Vec<u32>,
    /// The centred norm of the pair's key (LSH only).
    norms: Vec<f32>,
    /// Key, head and normalised weight of each pair whose V row is read, for
    /// int8 values (summed by one kernel call).
    value_pairs: (Vec<u32>, Vec<u8>, Vec<f32>),
    /// The pairs of a safety set and their exact logits.
    exact: Vec<(u32, f32)>,
}

impl PairLists {
    /// One pair per head bit of each key's mask; prefetches the keys' norms
    /// (`knorm`) for the logits computed after the dot products. Returns the
    /// number of pairs.
    fn fill(&mut self, ids: &[u32], masks: &[u8], knorm: Option<&[f16]>) -> usize {
        let most = masks.iter().map(|m| m.count_ones() as usize).sum();
        if self.keys.len() < most {
            self.keys.resize(most, 0);
            self.heads.resize(most, 0);
            self.dots.resize(most, 0.0);
            self.needed.resize(most, 0);
            self.norms.resize(most, 0.0);
            self.value_pairs.0.resize(most, 0);
            self.value_pairs.1.resize(most, 0);
            self.value_pairs.2.resize(most, 0.0);
        }
        let mut np = 0;
        for (&id, &m) in ids.iter().zip(masks) {
            if let Some(kn) = knorm {
                prefetch_at(kn, id as usize);
            }
            let mut bits = m;
            while bits != 0 {
                self.keys[np] = id;
                self.heads[np] = bits.trailing_zeros() as u8;
                np += 1;
                bits &= bits - 1;
            }
        }
        np
    }
}

/// The logit of every one of `n` keys for each of the `g` heads of `kq`,
/// into `logits[h][..n]`, streamed over runs of consecutive rows; returns
/// each head's largest logit (NaN never is; -∞ for none).
pub(crate) fn every_logit(
    head: &HeadStore,
    kq: &KeyQueries,
    scale: f32,
    g: usize,
    n: usize,
    logits: &mut [Vec<f32>],
) -> [f32; 8] {
    let mut run = RunDots::new();
    let mut max = [f32::NEG_INFINITY; 8];
    let mut first = 0;
    while first < n {
        let m = head.keys.run_dots(first, g, kq, &mut run).min(n - first);
        for (h, dots) in run.out.chunks_exact(m.max(1)).take(g).enumerate() {
            let out = &mut logits[h][first..first + m];
            out.iter_mut()
                .zip(dots)
                .for_each(|(x, &dot)| *x = dot * scale);
            // NaN never wins: `>` is false for it.
            max[h] = fold_lanes(out, max[h], |a, b| if b > a { b } else { a });
        }
        first += m.max(1);
    }
    max
}

/// What the two passes need besides the store and the selection.
pub(crate) struct Step<'a> {
    /// Head dimension.
    pub(crate) d: usize,
    /// The group's queries, `[g][d]`.
    pub(crate) queries: &'a [f32],
    pub(crate) kq: &'a KeyQueries<'a>,
    /// `1 / sqrt(d)`.
    pub(crate) scale: f32,
    /// Under LSH, the estimator's `ln u` table: logits are corrected by
    /// `-ln u` of the key's angle with the query.
    pub(crate) ln_u: Option<&'a LnUTable>,
    /// V rows left out, see [`crate::policy::LshParams::value_skip`].
    pub(crate) value_skip: u8,
    /// Under LSH with a safety set ([`crate::policy::LshParams::top`]), per
    /// key position the heads (bits) whose set holds it: those pairs are
    /// attended with their exact logits, never the estimator's.
    pub(crate) exact: Option<&'a [u8]>,
    /// How logits become softmax weights.
    pub(crate) softmax: Softmax,
}

/// One group's partial results: each head's output (normalised within the
/// part, `[g][d]`), log-sum-exp, keys touched and blocks of
/// [`crate::bounds::BOUND_BLOCK`] keys scanned (`[g]`).
pub(crate) struct Partials<'o> {
    pub(crate) out: &'o mut [f32],
    pub(crate) lse: &'o mut [f32],
    pub(crate) touched: &'o mut [u32],
    pub(crate) blocks: &'o mut [u32],
}

/// Attends the first `nu` keys of `sel` with both passes.
pub(crate) fn attend_selected(
    head: &HeadStore,
    step: &Step,
    sel: &Selection,
    nu: usize,
    pairs: &mut PairLists,
    parts: Partials,
) {
    let g = step.queries.len() / step.d;
    let np = pass1(head, step, sel, nu, pairs);
    let (inv, needed) = softmax(pairs, np, g, step, parts.lse, parts.touched);
    pass2(head, step.d, g, np, nu, &inv, &needed, pairs, parts.out);
}

/// Pass 1: the logits of every (key, head) pair selected, key-major, so that
/// a row shared by heads comes from memory once. Returns the number of pairs.
fn pass1(
    head: &HeadStore,
    step: &Step,
    sel: &Selection,
    nu: usize,
    pairs: &mut PairLists,
) -> usize {
    let (d, queries) = (step.d, step.queries);
    let g = queries.len() / d;
    let mut qmu = [0.0f32; 8];
    let mut qnorm = [0.0f32; 8];
    for h in 0..g {
        let q = &queries[h * d..(h + 1) * d];
        qmu[h] = dot_f32(q, &head.mean);
        qnorm[h] = dot_f32(q, q).sqrt();
    }
    // bf16 rows give their centred norms with the dot products; other rows
    // read them from the store.
    let stored_norms = (step.ln_u.is_some() && head.keeps_norms()).then_some(&head.knorm[..]);
    let np = pairs.fill(&sel.union[..nu], &sel.umask[..nu], stored_norms);
    // In pairs: the pairs of one key (dense) count as one row.
    let k_ahead = (K_LINES_AHEAD / head.keys.lines_per_row()).clamp(1, 32) * np.div_ceil(nu.max(1));
    let PairLists {
        keys,
        heads,
        dots,
        norms,
        exact,
        ..
    } = pairs;
    let (keys, heads, dots, norms) = (&keys[..np], &heads[..np], &mut dots[..np], &mut norms[..np]);
    dot_products(head, step, keys, heads, k_ahead, dots, norms);
    if let Some(stored) = stored_norms {
        for (n, &id) in norms.iter_mut().zip(keys.iter()) {
            *n = stored[id as usize].to_f32();
        }
    }
    // Logits, in place of the dot products.
    let (logits, scale) = (dots, step.scale);
    exact.clear();
    if let Some(safety) = step.exact {
        let pairs = keys.iter().zip(heads).enumerate();
        let held = pairs.filter(|(_, (&id, &h))| (safety[id as usize] >> h) & 1 == 1);
        exact.extend(held.map(|(p, _)| (p as u32, logits[p] * scale)));
    }
    match step.ln_u {
        Some(ln_u) => corrected_logits(logits, heads, norms, &qmu, &qnorm, scale, ln_u.values()),
        None => logits.iter_mut().for_each(|x| *x *= scale),
    }
    for &(p, logit) in exact.iter() {
        logits[p as usize] = logit;
    }
    np
}

/// The dot product of each pair's key with its head's query into `dots`,
/// prefetching `k_ahead` pairs ahead. Under LSH, bf16 and int8 rows also
/// write their keys' centred norms into `norms`.
fn dot_products(
    head: &HeadStore,
    step: &Step,
    keys: &[u32],
    heads: &[u8],
    k_ahead: usize,
    dots: &mut [f32],
    norms: &mut [f32],
) {
    let (d, queries, lsh) = (step.d, step.queries, step.ln_u.is_some());
    match &head.keys {
        Rows::Bf16(b) => dot_rows_bf16(
            keys,
            |i| b.row(i as usize),
            heads,
            queries,
            k_ahead,
            dots,
            lsh.then_some((&head.mean[..], norms)),
        ),
        Rows::I8(c) => {
            dot_rows_i8(
                keys,
                |i| c.codes.row(i as usize),
                heads,
                &step.kq.scaled,
                k_ahead,
                dots,
                lsh.then_some((&c.channels.scales[..], norms)),
            );
            add_per_head(dots, heads, &step.kq.offsets);
        }
        Rows::PackedKeys(p) => packed_dot_products(p, step.kq, keys, heads, k_ahead, dots),
        // Value rows are never keys.
        Rows::PackedValues(_) => dots.fill(0.0),
        Rows::F32(b) => {
            for (p, ((&id, &h), dot)) in keys.iter().zip(heads).zip(dots.iter_mut()).enumerate() {
                if let Some(&next) = keys.get(p + k_ahead) {
                    prefetch(b.row(next as usize));
                }
                let h = usize::from(h);
                *dot = dot_f32(b.row(id as usize), &queries[h * d..(h + 1) * d]);
            }
        }
    }
}

/// [`dot_products`] over int4 or int2 keys: each key's row is read once for
/// all the heads of the group, on integers.
fn packed_dot_products(
    p: &PackedKeys,
    kq: &KeyQueries,
    keys: &[u32],
    heads: &[u8],
    k_ahead: usize,
    dots: &mut [f32],
) {
    let g = (kq.scaled.len() / p.d.max(1)).min(8);
    let mut all = [0.0f32; 8];
    let mut last = None;
    for (k, (&id, &h)) in keys.iter().zip(heads).enumerate() {
        if let Some(&next) = keys.get(k + k_ahead) {
            prefetch(p.rows.row(next as usize));
        }
        if last != Some(id) {
            packed_key_dots(p, id as usize, kq, &mut all[..g]);
            last = Some(id);
        }
        dots[k] = all[usize::from(h) & 7];
    }
}

/// The softmax of the `np` logits of pass 1, in place: weights relative to
/// each head's max, by `step.softmax`. Writes each head's log-sum-exp (of
/// those weights) and pairs; returns per head the inverse of its weights' sum
/// and the weight below which it does not need a key's V row.
fn softmax(
    pairs: &mut PairLists,
    np: usize,
    g: usize,
    step: &Step,
    lse: &mut [f32],
    touched: &mut [u32],
) -> ([f32; 8], [f32; 8]) {
    let heads = &pairs.heads[..np];
    let logits = &mut pairs.dots[..np];
    let run_max = per_head(logits, heads, f32::NEG_INFINITY, f32::max, f32::max);
    let counts = per_head(logits, heads, 0u32, |n, _| n + 1, |a, b| a + b);
    touched[..g].copy_from_slice(&counts[..g]);
    let weights = logits;
    add_per_head(weights, heads, &run_max.map(|m| -m));
    step.softmax.weights_inplace(weights);
    let value_skip = step.value_skip;
    let sums = per_head(weights, heads, 0.0f32, |a, w| a + w, |a, b| a + b);
    let mut inv = [0.0f32; 8];
    let mut needed = [NEGLIGIBLE_WEIGHT; 8];
    let mut budgets = [0.0f32; 8];
    for h in 0..g {
        if run_max[h] > f32::NEG_INFINITY {
            lse[h] = run_max[h] + sums[h].ln();
            inv[h] = 1.0 / sums[h];
            if value_skip > 0 {
                budgets[h] = sums[h] * (-f32::from(value_skip)).exp2();
            }
        }
    }
    if value_skip > 0 {
        let skippable = skippable_below(weights, heads, &budgets);
        for (n, s) in needed.iter_mut().zip(skippable) {
            *n = n.max(s);
        }
    }
    (inv, needed)
}

/// Pass 2: the weighted sum of the V rows of the pairs whose weight is at
/// least `needed` of its head, into `out` (`[g][d]`).
#[allow(clippy::too_many_arguments)]
fn pass2(
    head: &HeadStore,
    d: usize,
    g: usize,
    np: usize,
    nu: usize,
    inv: &[f32; 8],
    needed: &[f32; 8],
    pairs: &mut PairLists,
    out: &mut [f32],
) {
    let PairLists {
        keys,
        heads,
        dots: weights,
        needed: vlist,
        value_pairs,
        ..
    } = pairs;
    let (keys, heads, weights) = (&keys[..np], &heads[..np], &weights[..np]);
    // Branch-free: about half the pairs are kept, at random.
    let mut nv = 0;
    for (p, (&w, &h)) in weights.iter().zip(heads).enumerate() {
        vlist[nv] = p as u32;
        nv += usize::from(w >= needed[usize::from(h) & 7]);
    }
    let kept = Kept {
        vlist: &vlist[..nv],
        keys,
        heads,
        weights,
        inv,
        v_ahead: V_AHEAD * np.div_ceil(nu.max(1)),
    };
    for &p in kept.vlist.iter().take(kept.v_ahead) {
        head.values.prefetch_row(keys[p as usize] as usize);
    }
    // Pairs of one key are adjacent: its row is read once for all its heads.
    match &head.values {
        Rows::I8(c) => {
            let weight_sums = sum_codes(c, &kept, value_pairs, out);
            head.values.finish_sums(out, &weight_sums[..g]);
        }
        Rows::PackedValues(p) => sum_packed(p, d, g, &kept, out),
        _ => sum_rows(&head.values, d, g, &kept, out),
    }
}

/// The pairs whose V rows pass 2 reads, and their weights.
struct Kept<'a> {
    /// Indices of the kept pairs in `keys`, `heads` and `weights`.
    vlist: &'a [u32],
    keys: &'a [u32],
    heads: &'a [u8],
    /// Softmax weights relative to each head's max.
    weights: &'a [f32],
    /// Per head, the inverse of its weights' sum.
    inv: &'a [f32; 8],
    /// How many pairs ahead the V rows are prefetched.
    v_ahead: usize,
}

impl Kept<'_> {
    /// The normalised weight of pair `p` and its head.
    #[inline(always)]
    fn weight(&self, p: u32) -> (f32, usize) {
        let (p, h) = (p as usize, usize::from(self.heads[p as usize]) & 7);
        (self.weights[p] * self.inv[h], h)
    }
}

/// Pass 2 over int8 value rows: one kernel call over the kept pairs, summing
/// their codes (the channel scales are applied after, see
/// [`Rows::finish_sums`]). Returns the sum of the weights of each head.
fn sum_codes(
    c: &CodeRows,
    kept: &Kept,
    value_pairs: &mut (Vec<u32>, Vec<u8>, Vec<f32>),
    out: &mut [f32],
) -> [f32; 8] {
    let (vkeys, vheads, vweights) = value_pairs;
    let nv = kept.vlist.len();
    let mut weight_sums = [0.0f32; 8];
    for (i, &p) in kept.vlist.iter().enumerate() {
        let (w, h) = kept.weight(p);
        weight_sums[h] += w;
        vkeys[i] = kept.keys[p as usize];
        vheads[i] = h as u8;
        vweights[i] = w;
    }
    axpy_rows_i8(
        &vkeys[..nv],
        |i| c.codes.row(i as usize),
        &vheads[..nv],
        &vweights[..nv],
        kept.v_ahead,
        out,
    );
    weight_sums
}

/// Pass 2 over int4 or int2 value rows: each kept pair adds its row's codes
/// to its head's sum with one weight per group (`w · step_g`), decoded in
/// registers straight into the head's output; each head's `Σ w · lo` per
/// group is added once at the end. A key's ranges are read once for the run
/// of its pairs.
fn sum_packed(p: &PackedValues, d: usize, g: usize, kept: &Kept, out: &mut [f32]) {
    let (group, groups) = (p.group(), p.groups().min(MAX_VALUE_GROUPS));
    let mut lo_sums = [[0.0f32; MAX_VALUE_GROUPS]; 8];
    let mut steps = [0.0f32; MAX_VALUE_GROUPS];
    let mut los = [0.0f32; MAX_VALUE_GROUPS];
    let mut muls = [0.0f32; MAX_VALUE_GROUPS];
    let (vlist, keys) = (kept.vlist, kept.keys);
    let mut ranges_of = usize::MAX;
    for (k, &pair) in vlist.iter().enumerate() {
        if let Some(&next) = vlist.get(k + kept.v_ahead) {
            prefetch(p.rows.row(keys[next as usize] as usize));
        }
        let key = keys[pair as usize] as usize;
        if key != ranges_of {
            for (j, (s, l)) in steps[..groups].iter_mut().zip(&mut los).enumerate() {
                (*l, *s) = p.range(key, j);
            }
            ranges_of = key;
        }
        let (w, h) = kept.weight(pair);
        for (j, m) in muls[..groups].iter_mut().enumerate() {
            *m = w * steps[j];
            lo_sums[h][j] += w * los[j];
        }
        axpy_packed(
            p.bits,
            p.codes(key),
            group,
            &muls[..groups],
            &mut out[h * d..(h + 1) * d],
        );
    }
    for (o, sums) in out.chunks_exact_mut(d.max(1)).take(g).zip(&lo_sums) {
        for (c, x) in o.iter_mut().enumerate() {
            *x += sums[c / group];
        }
    }
}

/// Pass 2 over bf16 and f32 value rows, summed as they are; each run of
/// pairs of one key reads its row once.
fn sum_rows(values: &Rows, d: usize, g: usize, kept: &Kept, out: &mut [f32]) {
    let (vlist, keys, heads) = (kept.vlist, kept.keys, kept.heads);
    let (weights, inv) = (kept.weights, kept.inv);
    let nv = vlist.len();
    let mut k = 0;
    while k < nv {
        if let Some(&next) = vlist.get(k + kept.v_ahead) {
            values.prefetch_row(keys[next as usize] as usize);
        }
        let key = keys[vlist[k] as usize];
        let run = vlist[k..]
            .iter()
            .take_while(|&&p| keys[p as usize] == key)
            .count();
        if run == 1 {
            let p = vlist[k] as usize;
            let h = usize::from(heads[p]);
            values.axpy(
                key as usize,
                &mut out[h * d..(h + 1) * d],
                weights[p] * inv[h],
            );
        } else {
            let mut ws = [0.0f32; 8];
            for &p in &vlist[k..k + run] {
                let h = usize::from(heads[p as usize]);
                ws[h] = weights[p as usize] * inv[h];
            }
            values.axpys(key as usize, out, &ws[..g]);
        }
        k += run;
    }
}

/// Folds `values` into one accumulator per head with `f` from `init`;
/// `heads[i] < 8` is the head of `values[i]`. Four interleaved sets of
/// accumulators, joined at the end by `join`, keep consecutive pairs of one
/// head (most are) from waiting on each other's result.
fn per_head<T: Copy>(
    values: &[f32],
    heads: &[u8],
    init: T,
    f: impl Fn(T, f32) -> T,
    join: impl Fn(T, T) -> T,
) -> [T; 8] {
    let mut acc = [[init; 8]; 4];
    let (mut vs, mut hs) = (values.chunks_exact(4), heads.chunks_exact(4));
    for (v, h) in (&mut vs).zip(&mut hs) {
        for j in 0..4 {
            let a = &mut acc[j][usize::from(h[j]) & 7];
            *a = f(*a, v[j]);
        }
    }
    for (&v, &h) in vs.remainder().iter().zip(hs.remainder()) {
        let a = &mut acc[0][usize::from(h) & 7];
        *a = f(*a, v);
    }
    std::array::from_fn(|h| join(join(acc[0][h], acc[1][h]), join(acc[2][h], acc[3][h])))
}

/// Per head `h`, the largest power of two `w` such that the weights of that
/// head below `w` sum to at most `budgets[h]` (weights are in `[0, 1]`; 0 when
/// no power of two qualifies). `heads[i]` is the head of `weights[i]`. Weights
/// are binned by binary exponent, so one pass finds it.
fn skippable_below(weights: &[f32], heads: &[u8], budgets: &[f32; 8]) -> [f32; 8] {
    // Bin b holds weights in [2^-(b+1), 2^-b); the last bin also holds smaller ones.
    const BINS: usize = 64;
    let bin = |w: f32| (126i32 - ((w.to_bits() >> 23) & 0xFF) as i32).clamp(0, BINS as i32 - 1);
    // Four interleaved tables, as in `per_head`: neighbouring weights often
    // share a bin.
    let mut mass = [[[0.0f32; BINS]; 8]; 4];
    let (mut ws, mut hs) = (weights.chunks_exact(4), heads.chunks_exact(4));
    for (w, h) in (&mut ws).zip(&mut hs) {
        for j in 0..4 {
            mass[j][usize::from(h[j]) & 7][bin(w[j]) as usize] += w[j];
        }
    }
    for (&w, &h) in ws.remainder().iter().zip(hs.remainder()) {
        mass[0][usize::from(h) & 7][bin(w) as usize] += w;
    }
    std::array::from_fn(|h| {
        let mut dropped = 0.0f32;
        let mut threshold = 0.0f32;
        for b in (0..BINS).rev() {
            dropped += mass[0][h][b] + mass[1][h][b] + mass[2][h][b] + mass[3][h][b];
            if dropped > budgets[h] {
                break;
            }
            threshold = (-(b as f32)).exp2();
        }
        threshold
    })
}

#[cfg(test)]
mod tests {
    use super::skippable_below;
    use tandem_kernels::rng::SplitMix64;

    #[test]
    fn skippable_below_is_the_largest_power_of_two_within_each_heads_budget() {
        let mut rng = SplitMix64(3);
        for case in 0..200 {
            let n = 1 + case % 97;
            let w: Vec<f32> = (0..n)
                .map(|_| (rng.signed_f32() * 30.0 - 15.0).exp2().min(1.0))
                .chain([1.0, 0.0])
                .collect();
            // The head under test (2) shares the list with another (0).
            let heads: Vec<u8> = (0..w.len())
                .map(|i| if i % 3 == 0 { 0 } else { 2 })
                .collect();
            let w: Vec<f32> = w
                .iter()
                .zip(&heads)
                .map(|(&x, &h)| if h == 2 { x } else { 0.5 })
                .collect();
            let sum: f32 = w
                .iter()
                .zip(&heads)
                .filter(|p| *p.1 == 2)
                .map(|p| p.0)
                .sum();
            let budget = sum * (-((case % 12) as f32)).exp2();
            let below = |x: f32| {
                w.iter()
                    .zip(&heads)
                    .filter(|p| *p.1 == 2 && *p.0 < x)
                    .map(|p| p.0)
                    .sum::<f32>()
            };
            let mut budgets = [0.0; 8];
            budgets[2] = budget;
            let thr = skippable_below(&w, &heads, &budgets)[2];
            assert!(below(thr) <= budget, "case {case}: {thr}");
            if thr == 0.0 {
                assert!(below(2f32.powi(-63)) > budget, "case {case}");
            } else {
                assert_eq!(thr, thr.log2().round().exp2(), "case {case}: {thr}");
                // Bins are [2^-(b+1), 2^-b) with 1.0 in the top one, so 0.5 is
                // the largest threshold short of dropping everything.
                assert!(
                    thr >= 0.5 || below(thr * 2.0) > budget,
                    "case {case}: {thr}"
                );
            }
        }
    }
}
