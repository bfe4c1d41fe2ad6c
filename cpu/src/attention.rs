//! Attention over one kv head's offloaded keys for all query heads of its GQA
//! group: LSH retrieval + MagicPIG's importance-weighted estimate, and the dense,
//! exact top-k and oracle-sampling baselines.

// Index loops over heads and keys read several parallel arrays at once.
#![allow(clippy::needless_range_loop)]

use crate::store::HeadStore;
use tandem_kernels::hash::{collect_at_least, table_code};
use tandem_kernels::rng::SplitMix64;
use tandem_kernels::vector::{axpy_bf16, dot_bf16_f32, dot_f32, exp_inplace, prefetch_bf16};

/// LSH retrieval parameters (the tables' K and L are fixed by the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LshParams {
    /// A key is retrieved when it collides with the query in >= `t` tables.
    pub t: u8,
    /// Optional cap: keep at most this many keys per query head (most
    /// collisions first, ties by lower position). The estimator's probabilities
    /// ignore the cap, so capped results are a heuristic.
    pub max_keys: Option<usize>,
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

/// `ln u` tabulated over cos in [-1, 1] (linear interpolation).
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

    #[inline]
    pub(crate) fn eval(&self, cos: f32) -> f32 {
        let x = (cos.clamp(-1.0, 1.0) + 1.0) * 0.5 * LNU_POINTS as f32;
        let i = (x as usize).min(LNU_POINTS - 1);
        let f = x - i as f32;
        self.vals[i] + f * (self.vals[i + 1] - self.vals[i])
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

/// Per-worker scratch, grown only when the store grows past its previous size.
#[derive(Default)]
pub(crate) struct Scratch {
    counts: Vec<u8>,
    mask: Vec<u8>,
    lists: Vec<Vec<u32>>,
    union: Vec<u32>,
    logits: Vec<Vec<f32>>,
    qbits: Vec<u64>,
    qcodes: Vec<u16>,
    tmp: Vec<f32>,
    cdf: Vec<f64>,
}

impl Scratch {
    fn ensure(&mut self, n: usize, g: usize) {
        if self.counts.len() < n {
            self.counts.resize(n, 0);
            self.mask.resize(n, 0);
            self.union.resize(n, 0);
            self.tmp.resize(n, 0.0);
        }
        while self.lists.len() < g {
            self.lists.push(Vec::new());
            self.logits.push(Vec::new());
        }
        for h in 0..g {
            if self.lists[h].len() < n {
                self.lists[h].resize(n, 0);
                self.logits[h].resize(n, 0.0);
            }
        }
    }
}

/// Computes the partials of the `g = queries.len() / d` query heads of one GQA
/// group over one kv head. `out` is `g * d`, `lse` and `touched` are `g`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_group(
    head: &HeadStore,
    d: usize,
    queries: &[f32],
    policy: &Policy,
    scratch: &mut Scratch,
    out: &mut [f32],
    lse: &mut [f32],
    touched: &mut [u32],
    retrieval_ns: &mut u64,
) -> Result<(), String> {
    let g = queries.len() / d;
    *retrieval_ns = 0;
    let n = head.keys.len() / d;
    out.iter_mut().for_each(|x| *x = 0.0);
    lse.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
    touched.iter_mut().for_each(|x| *x = 0);
    if n == 0 {
        return Ok(());
    }
    scratch.ensure(n, g);
    let scale = 1.0 / (d as f32).sqrt();
    let mut lens = [0usize; 8];
    match policy {
        Policy::Dense => {
            for h in 0..g {
                for (i, x) in scratch.lists[h][..n].iter_mut().enumerate() {
                    *x = i as u32;
                }
                lens[h] = n;
            }
        }
        Policy::Lsh(p) => {
            let ix = head
                .index
                .as_ref()
                .ok_or("policy lsh on a store without an index")?;
            let t0 = std::time::Instant::now();
            retrieve(head, ix, d, queries, p, scratch, &mut lens);
            *retrieval_ns = t0.elapsed().as_nanos() as u64;
        }
        Policy::TopK(k) | Policy::Oracle { budget: k, .. } => {
            let k = (*k).min(n);
            let Scratch {
                lists,
                logits,
                tmp,
                cdf,
                mask,
                ..
            } = scratch;
            for h in 0..g {
                let q = &queries[h * d..(h + 1) * d];
                for i in 0..n {
                    logits[h][i] = dot_bf16_f32(&head.keys[i * d..(i + 1) * d], q) * scale;
                }
                if let Policy::Oracle { budget, seed } = policy {
                    oracle(
                        head,
                        d,
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
                // position order, up to k keys; then sort positions.
                let mut m = 0;
                for i in 0..n {
                    if logits[h][i] > thr {
                        lists[h][m] = i as u32;
                        m += 1;
                    }
                }
                for i in 0..n {
                    if m < k && logits[h][i] == thr {
                        lists[h][m] = i as u32;
                        m += 1;
                    }
                }
                lists[h][..m].sort_unstable();
                lens[h] = m;
            }
            if matches!(policy, Policy::Oracle { .. }) {
                return Ok(());
            }
        }
    }
    // Union of the heads' sorted lists with a per-key head mask, so each K/V row
    // is read once for the whole group.
    let mut nu = 0;
    for h in 0..g {
        for &id in &scratch.lists[h][..lens[h]] {
            scratch.mask[id as usize] |= 1 << h;
        }
    }
    nu += collect_at_least(&scratch.mask[..n], 1, 0, &mut scratch.union[..n]);
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
    let mut pos = [0usize; 8];
    const AHEAD: usize = 12;
    for (j, &id) in scratch.union[..nu].iter().enumerate() {
        if let Some(&next) = scratch.union[..nu].get(j + AHEAD) {
            let nx = next as usize;
            prefetch_bf16(&head.keys[nx * d..(nx + 1) * d]);
        }
        let id = id as usize;
        let krow = &head.keys[id * d..(id + 1) * d];
        let m = scratch.mask[id];
        for h in 0..g {
            if m & (1 << h) == 0 {
                continue;
            }
            let dot = dot_bf16_f32(krow, &queries[h * d..(h + 1) * d]);
            let mut logit = dot * scale;
            if let Some(ix) = lsh {
                let den = qnorm[h] * head.knorm[id].to_f32();
                let cos = if den > 0.0 { (dot - qmu[h]) / den } else { 0.0 };
                logit -= ix.ln_u.eval(cos);
            }
            scratch.logits[h][pos[h]] = logit;
            pos[h] += 1;
        }
    }
    for h in 0..g {
        let lg = &mut scratch.logits[h][..pos[h]];
        touched[h] = pos[h] as u32;
        if lg.is_empty() {
            continue;
        }
        let mx = lg.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        lg.iter_mut().for_each(|x| *x -= mx);
        exp_inplace(lg);
        let sum: f32 = lg.iter().sum();
        lse[h] = mx + sum.ln();
        let inv = 1.0 / sum;
        lg.iter_mut().for_each(|x| *x *= inv);
    }
    pos = [0; 8];
    for (j, &id) in scratch.union[..nu].iter().enumerate() {
        if let Some(&next) = scratch.union[..nu].get(j + AHEAD) {
            let nx = next as usize;
            prefetch_bf16(&head.values[nx * d..(nx + 1) * d]);
        }
        let id = id as usize;
        let vrow = &head.values[id * d..(id + 1) * d];
        let m = scratch.mask[id];
        scratch.mask[id] = 0;
        for h in 0..g {
            if m & (1 << h) == 0 {
                continue;
            }
            axpy_bf16(
                &mut out[h * d..(h + 1) * d],
                scratch.logits[h][pos[h]],
                vrow,
            );
            pos[h] += 1;
        }
    }
    Ok(())
}

/// LSH retrieval: fills `scratch.lists[h][..lens[h]]` with sorted key positions.
fn retrieve(
    head: &HeadStore,
    ix: &crate::store::LshIndex,
    d: usize,
    queries: &[f32],
    p: &LshParams,
    scratch: &mut Scratch,
    lens: &mut [usize; 8],
) {
    let g = queries.len() / d;
    let n = head.keys.len() / d;
    let w = ix.projector.words_per_vector();
    scratch.qbits.resize(w * g, 0);
    scratch.qcodes.resize(ix.l * g, 0);
    ix.projector.sign_bits(queries, &mut scratch.qbits);
    for h in 0..g {
        for t in 0..ix.l {
            scratch.qcodes[h * ix.l + t] = table_code(&scratch.qbits[h * w..(h + 1) * w], t, ix.k);
        }
    }
    let t_min = p.t.max(1);
    for h in 0..g {
        let counts = &mut scratch.counts[..n];
        counts.iter_mut().for_each(|c| *c = 0);
        let qc = &scratch.qcodes[h * ix.l..(h + 1) * ix.l];
        for (t, &code) in qc.iter().enumerate() {
            ix.for_each_in_bucket(t, code, |id| {
                let c = &mut counts[id as usize];
                *c = c.saturating_add(1);
            });
        }
        for (j, codes) in ix.tail_codes.chunks_exact(ix.l).enumerate() {
            let c = codes.iter().zip(qc).filter(|(a, b)| a == b).count();
            counts[ix.n_bulk + j] = c.min(255) as u8;
        }
        let list = &mut scratch.lists[h];
        let mut m = collect_at_least(counts, t_min, 0, &mut list[..n]);
        if let Some(cap) = p.max_keys {
            if m > cap {
                list[..m].sort_unstable_by(|a, b| {
                    counts[*b as usize].cmp(&counts[*a as usize]).then(a.cmp(b))
                });
                m = cap;
                list[..m].sort_unstable();
            }
        }
        lens[h] = m;
    }
}

#[allow(clippy::too_many_arguments)]
fn oracle(
    head: &HeadStore,
    d: usize,
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
        axpy_bf16(out, w, &head.values[i * d..(i + 1) * d]);
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
    *touched = distinct;
}
