//! Attention over one kv head's offloaded keys for all query heads of its GQA
//! group: LSH retrieval + MagicPIG's importance-weighted estimate, and the dense,
//! exact top-k and oracle-sampling baselines.

// Index loops over heads and keys read several parallel arrays at once.
#![allow(clippy::needless_range_loop)]

use crate::store::{HeadStore, LshIndex, Rows};
use half::f16;
use tandem_kernels::gaps::Bucket;
use tandem_kernels::hash::{
    collect_at_least, collect_lanes, collect_pairs, count_equal_u16, pair_count, table_code, Lanes,
};
use tandem_kernels::heads::add_per_head;
use tandem_kernels::int8::{axpy_i8_multi, axpy_rows_i8, dot_i8_f32_multi, dot_rows_i8};
use tandem_kernels::rng::SplitMix64;
use tandem_kernels::vector::{
    axpy_bf16, axpy_bf16_multi, axpy_f32, axpy_f32_multi, corrected_logits, dot_bf16_f32_multi,
    dot_f32, dot_f32_multi, dot_rows_bf16, exp_inplace, prefetch, prefetch_at, touch_lines,
};

/// LSH retrieval parameters (the tables' K and L are fixed by the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LshParams {
    /// A key is retrieved when it collides with the query in >= `t` tables.
    pub t: u8,
    /// Optional cap: keep at most this many keys per query head (most
    /// collisions first, ties by lower position). The estimator's probabilities
    /// ignore the cap, so capped results are a heuristic.
    pub max_keys: Option<usize>,
    /// V rows left out, as a power of two of the softmax mass: with `n > 0`,
    /// each head leaves out the V rows of its smallest weights whose sum is at
    /// most `2^-n` of its total (the log-sum-exp still counts them), which moves
    /// the output by at most `2^-n` of the largest |value|. `0` reads the V row
    /// of every retrieved key. [`LshParams::DEFAULT_VALUE_SKIP`] is one bf16
    /// rounding step, the error the bf16 store already makes.
    pub value_skip: u8,
}

impl LshParams {
    /// `value_skip` of the default policy: 2^-9 of the mass.
    pub const DEFAULT_VALUE_SKIP: u8 = 9;
}

/// How one layer's offloaded part is attended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// Exact attention over every stored key.
    Dense,
    /// LSH sampling (MagicPIG); needs a store built with `lsh: Some(..)`.
    Lsh(LshParams),
    /// Exact attention over the `k` keys with the largest logits.
    TopK(usize),
    /// Oracle sampling: `budget` keys drawn i.i.d. from the exact softmax; the
    /// output is their mean value and the lse is exact.
    Oracle {
        /// Samples per query head.
        budget: usize,
        /// Sampling seed.
        seed: u64,
    },
}

/// One query head's partial result.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadOutput {
    /// Output normalised within the part, `[head_dim]`.
    pub out: Vec<f32>,
    /// ln of the sum of exp(logits) over the part; `-inf` when empty.
    pub lse: f32,
    /// Distinct keys that contributed.
    pub keys_touched: u32,
}

/// Largest correction `-ln u` applied, so logits stay finite for any key.
const MAX_NEG_LN_U: f64 = 700.0;

/// `ln u` with `u = P[Binomial(L, p^K) >= t]`, `p = 1 - acos(cos)/pi`, in f64.
/// `cos` is clamped to [-1, 1]; the result is clamped to `>= -700`.
pub fn ln_u_exact(cos: f64, k: usize, l: usize, t: usize) -> f64 {
    let p = 1.0 - cos.clamp(-1.0, 1.0).acos() / std::f64::consts::PI;
    let pk = p.powi(k as i32);
    if t == 0 {
        return 0.0;
    }
    if pk <= 0.0 {
        return -MAX_NEG_LN_U;
    }
    if pk >= 1.0 {
        return 0.0;
    }
    let ln_pk = pk.ln();
    let ln_q = (-pk).ln_1p();
    // ln C(l, i) for every i, built incrementally (O(l)).
    let mut ln_c = Vec::with_capacity(l + 1);
    let mut c = 0.0f64;
    for i in 0..=l {
        ln_c.push(c);
        if i < l {
            c += ((l - i) as f64).ln() - ((i + 1) as f64).ln();
        }
    }
    let ln_pmf = |i: usize| ln_c[i] + i as f64 * ln_pk + (l - i) as f64 * ln_q;
    let lower: f64 = (0..t.min(l + 1)).map(|i| ln_pmf(i).exp()).sum();
    let u_ln = if lower < 0.5 {
        (-lower).ln_1p()
    } else {
        // Upper tail summed directly (log-sum-exp) to avoid cancellation.
        let terms: Vec<f64> = (t..=l).map(ln_pmf).collect();
        let m = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return -MAX_NEG_LN_U;
        }
        m + terms.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    };
    u_ln.max(-MAX_NEG_LN_U)
}

/// `ln u` tabulated over cos in [-1, 1], interpolated linearly by
/// [`corrected_logits`].
pub(crate) struct LnUTable {
    vals: Vec<f32>,
}

const LNU_POINTS: usize = 8192;

impl LnUTable {
    pub(crate) fn new(k: usize, l: usize, t: u8) -> Self {
        let vals = (0..=LNU_POINTS)
            .map(|i| ln_u_exact(-1.0 + 2.0 * i as f64 / LNU_POINTS as f64, k, l, t as usize) as f32)
            .collect();
        LnUTable { vals }
    }

    /// The tabulated values, at equal steps of cos over [-1, 1].
    pub(crate) fn values(&self) -> &[f32] {
        &self.vals
    }
}

/// Merges partial results `(out, lse)` (outputs normalised within each part)
/// into `out`, returning the merged lse. Parts with `lse = -inf` contribute
/// nothing; if all are empty, `out` is zero and the lse is `-inf`. Only the
/// first `out.len()` elements of each part are read.
pub fn merge_partials(parts: &[(&[f32], f32)], out: &mut [f32]) -> f32 {
    out.iter_mut().for_each(|x| *x = 0.0);
    let m = parts.iter().map(|p| p.1).fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY || m.is_nan() {
        return f32::NEG_INFINITY;
    }
    let total: f64 = parts.iter().map(|p| ((p.1 - m) as f64).exp()).sum();
    for (o, lse) in parts {
        let w = (((*lse - m) as f64).exp() / total) as f32;
        if w > 0.0 {
            for (dst, x) in out.iter_mut().zip(o.iter()) {
                *dst += w * x;
            }
        }
    }
    m + total.ln() as f32
}

impl Rows {
    /// Dot products of key row `i` with the query heads of `kq` (see
    /// [`key_queries`]), `out.len()` of them.
    #[inline(always)]
    fn dots(&self, i: usize, kq: &KeyQueries, out: &mut [f32]) {
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
    fn axpys(&self, i: usize, outs: &mut [f32], ws: &[f32]) {
        match self {
            Rows::Bf16(b) => axpy_bf16_multi(outs, ws, b.row(i)),
            Rows::F32(b) => axpy_f32_multi(outs, ws, b.row(i)),
            Rows::I8(c) => axpy_i8_multi(outs, ws, c.codes.row(i)),
        }
    }

    /// `out += w * row i`, as [`Rows::axpys`] for one head.
    #[inline(always)]
    fn axpy(&self, i: usize, out: &mut [f32], w: f32) {
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
    fn finish_sums(&self, outs: &mut [f32], weight_sums: &[f32]) {
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
    fn lines_per_row(&self) -> usize {
        let bytes = match self {
            Rows::Bf16(b) => b.d * 2,
            Rows::F32(b) => b.d * 4,
            Rows::I8(c) => c.codes.d,
        };
        bytes.div_ceil(64).max(1)
    }

    #[inline(always)]
    fn prefetch_row(&self, i: usize) {
        if i < self.rows() {
            match self {
                Rows::Bf16(b) => prefetch(b.row(i)),
                Rows::F32(b) => prefetch(b.row(i)),
                Rows::I8(c) => prefetch(c.codes.row(i)),
            }
        }
    }
}

/// Per-worker scratch, grown only when the store grows past its previous size.
/// `counts` and `mask` are all zero between calls.
#[derive(Default)]
pub(crate) struct Scratch {
    counts: Vec<u32>,
    mask: Vec<u8>,
    union: Vec<u32>,
    umask: Vec<u8>,
    tmp_ids: Vec<u32>,
    tmp_masks: Vec<u8>,
    logits: Vec<Vec<f32>>,
    qbits: Vec<u64>,
    qcodes: Vec<u16>,
    qflip: Vec<f32>,
    /// One decoded bucket.
    bucket: Vec<u32>,
    /// Per index level, the buckets the query heads hash to.
    buckets: Vec<Vec<Bucket>>,
    /// Pair counters (see `tandem_kernels::hash::pair_count`), all zero
    /// between calls.
    pairs: Vec<u8>,
    tmp: Vec<f32>,
    cdf: Vec<f64>,
    pass1: PairLists,
}

/// The (key, head) pairs of one step's pass 1, key-major.
#[derive(Default)]
struct PairLists {
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

impl Scratch {
    fn ensure(&mut self, n: usize, g: usize) {
        if self.counts.len() < n {
            self.counts.resize(n, 0);
            self.mask.resize(n, 0);
            self.union.resize(n, 0);
            self.umask.resize(n, 0);
            self.tmp_ids.resize(n, 0);
            self.tmp_masks.resize(n, 0);
            self.tmp.resize(n, 0.0);
        }
        while self.logits.len() < g {
            self.logits.push(Vec::new());
        }
    }

    fn ensure_lists(&mut self, n: usize, g: usize) {
        for h in 0..g {
            if self.logits[h].len() < n {
                self.logits[h].resize(n, 0.0);
            }
        }
    }
}

/// How many cache lines of K rows are prefetched ahead of the dot products:
/// 8 bf16 rows of d=128. Rows of a cold store come from DRAM at random: 8 rows
/// ahead keep more misses in flight than 4 (at 96k, 140 ms of CPU attention per
/// token against 175 ms; `memprobe` shows the same for scattered rows), while
/// 16 gain nothing more. Shorter rows (int8) go more rows ahead.
const K_LINES_AHEAD: usize = 32;
/// How many keys ahead the V rows are prefetched.
const V_AHEAD: usize = 8;
/// V rows whose softmax weight relative to the head's largest is below this
/// (2^-30, a logit more than 20.8 below the max) for every head are not read:
/// each such key would change the normalised output by less than 2^-30 of the
/// largest |value| (the sum of weights is at least 1), i.e. by less than f32
/// rounding, and the log-sum-exp still includes it. On peaked attention this
/// skips most V rows.
const NEGLIGIBLE_WEIGHT: f32 = 1.0 / (1u64 << 30) as f32;

/// The query heads of a group in the form a store's keys take them.
struct KeyQueries<'q> {
    /// The queries; for int8 keys, a copy scaled by the keys' channel scales.
    scaled: std::borrow::Cow<'q, [f32]>,
    /// For int8 keys, each query's dot product with the keys' offset: with
    /// `k = offset + scales ⊙ code`, `q · k = q · offset + (q ⊙ scales) · code`.
    offsets: [f32; 8],
}

fn key_queries<'q>(keys: &Rows, queries: &'q [f32], d: usize) -> KeyQueries<'q> {
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

/// Computes the partials of the `g = queries.len() / d` query heads of one GQA
/// group over one kv head. `out` is `g * d`, `lse` and `touched` are `g`.
/// `query_bits`, when given, are the queries' sign bits for the head's LSH
/// tables (as `HeadStore::append_hashing` writes them), else they are computed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_group(
    head: &HeadStore,
    d: usize,
    queries: &[f32],
    query_bits: Option<&[u64]>,
    policy: &Policy,
    scratch: &mut Scratch,
    out: &mut [f32],
    lse: &mut [f32],
    touched: &mut [u32],
    retrieval_ns: &mut u64,
) -> Result<(), String> {
    let g = queries.len() / d;
    *retrieval_ns = 0;
    let n = head.len();
    out.iter_mut().for_each(|x| *x = 0.0);
    lse.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
    touched.iter_mut().for_each(|x| *x = 0);
    if n == 0 || g == 0 {
        return Ok(());
    }
    if g > 8 {
        return Err(format!("group of {g} query heads (at most 8)"));
    }
    scratch.ensure(n, g);
    let kq = key_queries(&head.keys, queries, d);
    let scale = 1.0 / (d as f32).sqrt();
    let all = ((1u32 << g) - 1) as u8;
    let nu = match policy {
        Policy::Dense => {
            for (i, (u, m)) in scratch.union[..n]
                .iter_mut()
                .zip(&mut scratch.umask[..n])
                .enumerate()
            {
                *u = i as u32;
                *m = all;
            }
            n
        }
        Policy::Lsh(p) => {
            let ix = head
                .index
                .as_ref()
                .ok_or("policy lsh on a store without an index")?;
            let t0 = std::time::Instant::now();
            let nu = retrieve(ix, n, d, queries, query_bits, p, scratch);
            *retrieval_ns = t0.elapsed().as_nanos() as u64;
            nu
        }
        Policy::TopK(k) | Policy::Oracle { budget: k, .. } => {
            let k = (*k).min(n);
            scratch.ensure_lists(n, g);
            let Scratch {
                logits,
                tmp,
                cdf,
                mask,
                ..
            } = scratch;
            let mut dots = [0.0f32; 8];
            for i in 0..n {
                head.keys.dots(i, &kq, &mut dots[..g]);
                for h in 0..g {
                    logits[h][i] = dots[h] * scale;
                }
            }
            for h in 0..g {
                if let Policy::Oracle { budget, seed } = policy {
                    oracle(
                        head,
                        &logits[h][..n],
                        *budget,
                        *seed ^ h as u64,
                        cdf,
                        &mut out[h * d..(h + 1) * d],
                        &mut lse[h],
                        &mut touched[h],
                        mask,
                    );
                    continue;
                }
                if k == 0 {
                    continue;
                }
                tmp[..n].copy_from_slice(&logits[h][..n]);
                let (_, kth, _) = tmp[..n].select_nth_unstable_by(n - k, |a, b| a.total_cmp(b));
                let thr = *kth;
                // Everything above the k-th largest, then ties at it in
                // position order, up to k keys.
                let mut m = 0;
                for i in 0..n {
                    if logits[h][i] > thr {
                        mask[i] |= 1 << h;
                        m += 1;
                    }
                }
                for i in 0..n {
                    if m < k && logits[h][i] == thr {
                        mask[i] |= 1 << h;
                        m += 1;
                    }
                }
            }
            if matches!(policy, Policy::Oracle { .. }) {
                return Ok(());
            }
            union_from_mask(scratch, n)
        }
    };
    let lsh = match policy {
        Policy::Lsh(_) => head.index.as_ref(),
        _ => None,
    };
    let mut qmu = [0.0f32; 8];
    let mut qnorm = [0.0f32; 8];
    for h in 0..g {
        let q = &queries[h * d..(h + 1) * d];
        qmu[h] = dot_f32(q, &head.mean);
        qnorm[h] = dot_f32(q, q).sqrt();
    }
    // Pass 1: the logits of every (key, head) pair retrieved, key-major, so
    // that a row shared by heads comes from memory once.
    let Scratch {
        union,
        umask,
        pass1,
        ..
    } = scratch;
    // bf16 rows give their centred norms with the dot products; other rows
    // read them from the store.
    let stored_norms = (lsh.is_some() && head.keeps_norms()).then_some(&head.knorm[..]);
    let np = pass1.fill(&union[..nu], &umask[..nu], stored_norms);
    // In pairs: the pairs of one key (dense) count as one row.
    let k_ahead = (K_LINES_AHEAD / head.keys.lines_per_row()).clamp(1, 32) * np.div_ceil(nu.max(1));
    let PairLists {
        keys,
        heads,
        dots,
        needed: vlist,
        norms,
        value_pairs,
    } = pass1;
    let (keys, heads, dots, norms) = (&keys[..np], &heads[..np], &mut dots[..np], &mut norms[..np]);
    match &head.keys {
        Rows::Bf16(b) => dot_rows_bf16(
            keys,
            |i| b.row(i as usize),
            heads,
            queries,
            k_ahead,
            dots,
            lsh.map(|_| (&head.mean[..], &mut norms[..])),
        ),
        Rows::I8(c) => {
            dot_rows_i8(
                keys,
                |i| c.codes.row(i as usize),
                heads,
                &kq.scaled,
                k_ahead,
                dots,
                lsh.map(|_| (&c.scales[..], &mut norms[..])),
            );
            add_per_head(dots, heads, &kq.offsets);
        }
        Rows::F32(b) => {
            for (p, ((&id, &h), dot)) in keys.iter().zip(heads).zip(dots.iter_mut()).enumerate() {
                if let Some(&next) = keys.get(p + k_ahead) {
                    prefetch(b.row(next as usize));
                }
                let h = usize::from(h);
                *dot = dot_f32(b.row(id as usize), &queries[h * d..(h + 1) * d]);
            }
            if let Some(stored) = stored_norms {
                for (n, &id) in norms.iter_mut().zip(keys.iter()) {
                    *n = stored[id as usize].to_f32();
                }
            }
        }
    }
    // Logits, in place of the dot products.
    let logits = dots;
    match lsh {
        Some(ix) => corrected_logits(logits, heads, norms, &qmu, &qnorm, scale, ix.ln_u.values()),
        None => logits.iter_mut().for_each(|x| *x *= scale),
    }
    let run_max = per_head(logits, heads, f32::NEG_INFINITY, f32::max, f32::max);
    let counts = per_head(logits, heads, 0u32, |n, _| n + 1, |a, b| a + b);
    touched[..g].copy_from_slice(&counts[..g]);
    // Softmax weights relative to each head's max, the log-normalisers, and
    // the weight below which a head does not need a key's V row.
    let weights = logits;
    add_per_head(weights, heads, &run_max.map(|m| -m));
    exp_inplace(weights);
    let sums = per_head(weights, heads, 0.0f32, |a, w| a + w, |a, b| a + b);
    let value_skip = match policy {
        Policy::Lsh(p) => p.value_skip,
        _ => 0,
    };
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
    // Pass 2 over the V rows of the pairs whose weight is needed.
    // Branch-free: about half the pairs are kept, at random.
    let mut nv = 0;
    for (p, (&w, &h)) in weights.iter().zip(heads).enumerate() {
        vlist[nv] = p as u32;
        nv += usize::from(w >= needed[usize::from(h) & 7]);
    }
    let vlist = &vlist[..nv];
    let v_ahead = V_AHEAD * np.div_ceil(nu.max(1));
    for &p in vlist.iter().take(v_ahead) {
        head.values.prefetch_row(keys[p as usize] as usize);
    }
    // Pairs of one key are adjacent: its row is read once for all its heads.
    if let Rows::I8(c) = &head.values {
        // One kernel call over the kept pairs, then the channel scales once.
        let mut weight_sums = [0.0f32; 8];
        let (vkeys, vheads, vweights) = value_pairs;
        for (i, &p) in vlist.iter().enumerate() {
            let (p, h) = (p as usize, usize::from(heads[p as usize]) & 7);
            let w = weights[p] * inv[h];
            weight_sums[h] += w;
            vkeys[i] = keys[p];
            vheads[i] = h as u8;
            vweights[i] = w;
        }
        axpy_rows_i8(
            &vkeys[..nv],
            |i| c.codes.row(i as usize),
            &vheads[..nv],
            &vweights[..nv],
            v_ahead,
            out,
        );
        head.values.finish_sums(out, &weight_sums[..g]);
        return Ok(());
    }
    // bf16 and f32 rows, summed as they are.
    let mut k = 0;
    while k < nv {
        if let Some(&next) = vlist.get(k + v_ahead) {
            head.values.prefetch_row(keys[next as usize] as usize);
        }
        let key = keys[vlist[k] as usize];
        let run = vlist[k..]
            .iter()
            .take_while(|&&p| keys[p as usize] == key)
            .count();
        if run == 1 {
            let p = vlist[k] as usize;
            let h = usize::from(heads[p]);
            head.values.axpy(
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
            head.values.axpys(key as usize, out, &ws[..g]);
        }
        k += run;
    }
    Ok(())
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

/// Fills `union`/`umask` from the per-key head bits in `mask` (then cleared).
fn union_from_mask(scratch: &mut Scratch, n: usize) -> usize {
    let nu = collect_at_least(&scratch.mask[..n], 1, 0, &mut scratch.union[..n]);
    for (u, m) in scratch.union[..nu].iter().zip(&mut scratch.umask[..nu]) {
        *m = std::mem::take(&mut scratch.mask[*u as usize]);
    }
    nu
}

/// LSH retrieval: fills `scratch.union[..nu]` with the sorted positions of keys
/// retrieved for at least one head and `scratch.umask` with the heads (bits)
/// that retrieved each; returns `nu`.
///
/// A group of up to 4 heads with `t <= 2` and no cap counts in 2-bit pair
/// counters, a byte per key. Otherwise the counters of the heads of one pass
/// are packed in one u32 per key (8-bit lanes, or 16-bit when L > 255).
/// Either way, per table, heads whose query codes are equal share one decode
/// of the bucket.
fn retrieve(
    ix: &LshIndex,
    n: usize,
    d: usize,
    queries: &[f32],
    query_bits: Option<&[u64]>,
    p: &LshParams,
    scratch: &mut Scratch,
) -> usize {
    let g = queries.len() / d;
    let l = ix.l;
    let w = ix.projector.words_per_vector();
    scratch.qcodes.resize(l * g, 0);
    let qbits = match query_bits {
        Some(bits) if bits.len() == w * g => bits,
        _ => {
            scratch.qbits.resize(w * g, 0);
            scratch.qflip.clear();
            scratch.qflip.extend_from_slice(queries);
            ix.flip(&mut scratch.qflip);
            ix.projector.sign_bits(&scratch.qflip, &mut scratch.qbits);
            &scratch.qbits[..]
        }
    };
    for h in 0..g {
        for t in 0..l {
            scratch.qcodes[h * l + t] = table_code(&qbits[h * w..(h + 1) * w], t, ix.k);
        }
    }
    let t_min = p.t.max(1);
    let n_bucketed = ix.n_bucketed();
    let levels: Vec<&crate::store::Csr> = ix.levels().collect();
    let Scratch {
        counts,
        pairs,
        qcodes,
        bucket,
        buckets,
        union,
        umask,
        mask,
        tmp_ids,
        tmp_masks,
        ..
    } = scratch;
    if g <= 4 && t_min <= 2 && p.max_keys.is_none() {
        // The common case: 2-bit counters, a byte per key for the whole group.
        if pairs.len() < n {
            pairs.resize(n, 0);
        }
        let pairs = &mut pairs[..n];
        // The counters come back from memory in one sequential sweep, not
        // one counting miss at a time (at 96k, 26.2 -> 24.4 ms of retrieval
        // per token).
        std::hint::black_box(touch_lines(pairs));
        gather_buckets(&levels, qcodes, l, 0, g, buckets);
        for (lv, level_buckets) in levels.iter().zip(buckets.iter()) {
            lv.count_pairs(level_buckets, pairs);
        }
        for (j, kc) in ix.raw_codes.chunks_exact(l).enumerate() {
            let mut b = 0u8;
            for h in 0..g {
                let c = count_equal_u16(kc, &qcodes[h * l..(h + 1) * l]).min(2);
                for _ in 0..c {
                    b = pair_count(b, 1 << h);
                }
            }
            if let Some(x) = pairs.get_mut(n_bucketed + j) {
                *x = b;
            }
        }
        return collect_pairs(pairs, t_min, 0, &mut union[..n], &mut umask[..n]);
    }
    let lanes = if l <= 255 { Lanes::U8x4 } else { Lanes::U16x2 };
    let per = lanes.count();
    let passes = g.div_ceil(per);
    let simple = passes == 1 && p.max_keys.is_none();
    for pass in 0..passes {
        let (h0, h1) = (pass * per, ((pass + 1) * per).min(g));
        let counts = &mut counts[..n];
        // The lane increments of each set of the pass's heads.
        let inc: [u32; 16] = std::array::from_fn(|heads| {
            (0..h1 - h0)
                .filter(|h| heads >> h & 1 == 1)
                .map(|h| 1u32 << (lanes.bits() * h as u32))
                .sum()
        });
        gather_buckets(&levels, qcodes, l, h0, h1, buckets);
        for (lv, level_buckets) in levels.iter().zip(buckets.iter()) {
            let base = lv.base as usize;
            for b in level_buckets {
                for &id in lv.decode_units(b.start as usize, b.end as usize, bucket) {
                    if let Some(x) = counts.get_mut(base + id as usize) {
                        *x += inc[usize::from(b.heads)];
                    }
                }
            }
        }
        // Raw (newest) keys: compare their codes with the query's.
        for (j, kc) in ix.raw_codes.chunks_exact(l).enumerate() {
            let mut v = 0u32;
            for h in h0..h1 {
                let c = count_equal_u16(kc, &qcodes[h * l..(h + 1) * l]) as u32;
                v += c << (lanes.bits() * (h - h0) as u32);
            }
            if let Some(x) = counts.get_mut(n_bucketed + j) {
                *x = v;
            }
        }
        if simple {
            return collect_lanes(
                counts,
                lanes,
                u16::from(t_min),
                0,
                &mut union[..n],
                &mut umask[..n],
            );
        }
        if let Some(cap) = p.max_keys {
            // Per head: the `cap` keys with the most collisions (ties by position).
            let lane_max = (1u32 << lanes.bits()) - 1;
            for h in h0..h1 {
                let sh = lanes.bits() * (h - h0) as u32;
                let mut cand: Vec<(u32, u32)> = counts
                    .iter()
                    .enumerate()
                    .filter_map(|(i, &c)| {
                        let c = (c >> sh) & lane_max;
                        (c >= u32::from(t_min)).then_some((c, i as u32))
                    })
                    .collect();
                if cand.len() > cap {
                    cand.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                    cand.truncate(cap);
                }
                for (_, i) in cand {
                    mask[i as usize] |= 1 << h;
                }
            }
            counts.iter_mut().for_each(|c| *c = 0);
        } else {
            let m = collect_lanes(
                counts,
                lanes,
                u16::from(t_min),
                0,
                &mut tmp_ids[..n],
                &mut tmp_masks[..n],
            );
            for (&i, &mk) in tmp_ids[..m].iter().zip(&tmp_masks[..m]) {
                mask[i as usize] |= mk << h0;
            }
        }
    }
    union_from_mask(scratch, n)
}

/// Fills `per_level[i]` with the buckets of level `levels[i]` that the query
/// heads `h0..h1` hash to (some empty), one per distinct code of each table,
/// with the heads (bit `h - h0`) whose code it is: heads with equal codes
/// share a decode.
/// Every line of those buckets is read here, with many misses in flight, so
/// that the decoding finds them in cache (at 96k, reading them only a few
/// tables ahead of the decoding left it waiting on memory).
fn gather_buckets(
    levels: &[&crate::store::Csr],
    qcodes: &[u16],
    l: usize,
    h0: usize,
    h1: usize,
    per_level: &mut Vec<Vec<Bucket>>,
) {
    per_level.resize_with(levels.len(), Vec::new);
    for lv in levels {
        for t in 0..l {
            for h in h0..h1 {
                lv.prefetch_offsets(t, qcodes[h * l + t] as usize);
            }
        }
    }
    per_level.iter_mut().for_each(Vec::clear);
    for t in 0..l {
        // Distinct codes among the heads, with the heads that have each.
        let mut codes = [(0u16, 0u8); 8];
        let mut nc = 0;
        for h in h0..h1 {
            let c = qcodes[h * l + t];
            let bit = 1u8 << (h - h0);
            match codes[..nc].iter_mut().find(|x| x.0 == c) {
                Some(x) => x.1 |= bit,
                None => {
                    codes[nc] = (c, bit);
                    nc += 1;
                }
            }
        }
        // No branch on the offsets read here: the reads of every table
        // overlap.
        for (lv, buckets) in levels.iter().zip(per_level.iter_mut()) {
            for &(code, heads) in &codes[..nc] {
                let (start, end) = lv.bucket(t, code as usize);
                buckets.push(Bucket {
                    start: start as u32,
                    end: end as u32,
                    heads,
                });
            }
        }
    }
    // A full fence: every offset is read before the touching starts. Its
    // loop counts depend on the offsets, and mispredicted counts waiting on
    // memory kept the touches from running ahead (at 96k, 160 us per task
    // with no fence, 58 with it).
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let mut touched = 0u8;
    for (lv, buckets) in levels.iter().zip(per_level.iter()) {
        for b in buckets {
            touched ^= lv.touch(b);
        }
    }
    std::hint::black_box(touched);
    // And every line is in cache before the counting starts.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

#[allow(clippy::too_many_arguments)]
fn oracle(
    head: &HeadStore,
    logits: &[f32],
    budget: usize,
    seed: u64,
    cdf: &mut Vec<f64>,
    out: &mut [f32],
    lse: &mut f32,
    touched: &mut u32,
    seen: &mut [u8],
) {
    let n = logits.len();
    let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    cdf.clear();
    let mut acc = 0.0f64;
    for &x in logits {
        acc += ((x - mx) as f64).exp();
        cdf.push(acc);
    }
    *lse = mx + acc.ln() as f32;
    if budget == 0 {
        *lse = f32::NEG_INFINITY;
        return;
    }
    let mut rng = SplitMix64(seed);
    let w = 1.0 / budget as f32;
    let mut distinct = 0;
    let mut picked = Vec::with_capacity(0);
    for _ in 0..budget {
        let r = rng.next_f64() * acc;
        let i = cdf.partition_point(|&c| c <= r).min(n - 1);
        head.values.axpys(i, out, &[w]);
        if seen[i] == 0 {
            seen[i] = 1;
            distinct += 1;
            if picked.capacity() == 0 {
                picked.reserve(budget);
            }
            picked.push(i);
        }
    }
    for i in picked {
        seen[i] = 0;
    }
    // `budget` draws of weight 1/budget each.
    head.values.finish_sums(out, &[1.0]);
    *touched = distinct;
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
