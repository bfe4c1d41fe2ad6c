//! LSH retrieval: the keys of one kv head that collide with each query head
//! of its group in at least t of the index's tables.

// Index loops over heads and keys read several parallel arrays at once.
#![allow(clippy::needless_range_loop)]

use crate::index::{Csr, LshIndex};
use crate::policy::LshParams;
use tandem_kernels::gaps::Bucket;
use tandem_kernels::hash::{
    collect_at_least, collect_lanes, collect_pairs, count_equal_u16, pair_count, Lanes,
};
use tandem_kernels::vector::touch_lines;

/// The keys selected for a group of query heads.
#[derive(Default)]
pub(crate) struct Selection {
    /// Sorted positions of the keys selected for at least one head.
    pub(crate) union: Vec<u32>,
    /// Per entry of `union`, the heads (bits) that selected it.
    pub(crate) umask: Vec<u8>,
    /// Per key position, the heads that selected it while a selection is
    /// gathered; all zero between calls.
    pub(crate) mask: Vec<u8>,
    /// Room for a merge ([`Selection::merge_sorted`]).
    spare: (Vec<u32>, Vec<u8>),
}

impl Selection {
    /// Room for a store of `n` keys.
    pub(crate) fn ensure(&mut self, n: usize) {
        if self.union.len() < n {
            self.union.resize(n, 0);
            self.umask.resize(n, 0);
            self.mask.resize(n, 0);
        }
    }

    /// Adds `keys` (sorted, distinct), each for the heads `heads[key]`, to
    /// the first `nu` keys selected; returns the number selected.
    pub(crate) fn merge_sorted(&mut self, nu: usize, keys: &[u32], heads: &[u8]) -> usize {
        let (mut ids, mut masks) = std::mem::take(&mut self.spare);
        let total = nu + keys.len();
        if ids.len() < total {
            ids.resize(total, 0);
            masks.resize(total, 0);
        }
        let (mut a, mut b, mut w) = (0, 0, 0);
        while a < nu || b < keys.len() {
            let next_a = self.union[..nu].get(a).copied().unwrap_or(u32::MAX);
            let next_b = keys.get(b).copied().unwrap_or(u32::MAX);
            let id = next_a.min(next_b);
            let mut m = 0;
            if next_a == id {
                m |= self.umask[a];
                a += 1;
            }
            if next_b == id {
                m |= heads[id as usize];
                b += 1;
            }
            (ids[w], masks[w]) = (id, m);
            w += 1;
        }
        ids[..w].swap_with_slice(&mut self.union[..w]);
        masks[..w].swap_with_slice(&mut self.umask[..w]);
        self.spare = (ids, masks);
        w
    }

    /// Fills `union`/`umask` from the per-key head bits in `mask` (then
    /// cleared); returns the number of keys.
    pub(crate) fn collect_mask(&mut self, n: usize) -> usize {
        let nu = collect_at_least(&self.mask[..n], 1, 0, &mut self.union[..n]);
        for (u, m) in self.union[..nu].iter().zip(&mut self.umask[..nu]) {
            *m = std::mem::take(&mut self.mask[*u as usize]);
        }
        nu
    }
}

/// Buffers of [`retrieve`], grown only when the store grows past its previous
/// size. `counts` and `pairs` are all zero between calls.
#[derive(Default)]
pub(crate) struct RetrievalScratch {
    counts: Vec<u32>,
    tmp_ids: Vec<u32>,
    tmp_masks: Vec<u8>,
    qbits: Vec<u64>,
    qcodes: Vec<u16>,
    qflip: Vec<f32>,
    /// One decoded bucket.
    bucket: Vec<u32>,
    /// Per index level, the buckets the query heads hash to.
    buckets: Vec<Vec<Bucket>>,
    /// Pair counters (see `tandem_kernels::hash::pair_count`).
    pairs: Vec<u8>,
}

impl RetrievalScratch {
    /// Room for a store of `n` keys.
    pub(crate) fn ensure(&mut self, n: usize) {
        if self.counts.len() < n {
            self.counts.resize(n, 0);
            self.tmp_ids.resize(n, 0);
            self.tmp_masks.resize(n, 0);
        }
    }

    /// Fills `qcodes` (`[g][l]`) with the query heads' codes, from
    /// `query_bits` when they are the queries' sign bits, else hashing them.
    fn query_codes(
        &mut self,
        ix: &LshIndex,
        queries: &[f32],
        query_bits: Option<&[u64]>,
        g: usize,
    ) {
        let l = ix.params.l;
        let w = ix.projector.words_per_vector();
        self.qcodes.resize(l * g, 0);
        let qbits = match query_bits {
            Some(bits) if bits.len() == w * g => bits,
            _ => {
                self.qbits.resize(w * g, 0);
                self.qflip.clear();
                self.qflip.extend_from_slice(queries);
                ix.flip(&mut self.qflip);
                ix.projector.sign_bits(&self.qflip, &mut self.qbits);
                &self.qbits[..]
            }
        };
        for h in 0..g {
            for t in 0..l {
                self.qcodes[h * l + t] = ix.code(&qbits[h * w..(h + 1) * w], t);
            }
        }
    }
}

/// LSH retrieval over the `n` keys of `ix`: fills `sel.union[..nu]` with the
/// sorted positions of keys retrieved for at least one head and `sel.umask`
/// with the heads (bits) that retrieved each; returns `nu`. A key is retrieved
/// for a head when it collides with the head's query in at least the index's
/// `t` tables.
///
/// A group of up to 4 heads with `t <= 2` and no cap counts in 2-bit pair
/// counters, a byte per key. Otherwise the counters of the heads of one pass
/// are packed in one u32 per key (8-bit lanes, or 16-bit when L > 255).
/// Either way, per table, heads whose query codes are equal share one decode
/// of the bucket.
#[allow(clippy::too_many_arguments)]
pub(crate) fn retrieve(
    ix: &LshIndex,
    n: usize,
    d: usize,
    queries: &[f32],
    query_bits: Option<&[u64]>,
    p: &LshParams,
    rs: &mut RetrievalScratch,
    sel: &mut Selection,
) -> usize {
    let g = queries.len() / d;
    rs.query_codes(ix, queries, query_bits, g);
    let t_min = ix.params.t.max(1);
    let levels: Vec<&Csr> = ix.levels().collect();
    if g <= 4 && t_min <= 2 && p.max_keys.is_none() {
        return count_in_pairs(ix, &levels, n, g, t_min, rs, sel);
    }
    count_in_lanes(ix, &levels, n, g, t_min, p.max_keys, rs, sel)
}

/// [`retrieve`] with 2-bit counters, a byte per key for the whole group
/// (`g <= 4`, `t_min <= 2`, no cap): the common case.
fn count_in_pairs(
    ix: &LshIndex,
    levels: &[&Csr],
    n: usize,
    g: usize,
    t_min: u8,
    rs: &mut RetrievalScratch,
    sel: &mut Selection,
) -> usize {
    let l = ix.params.l;
    if rs.pairs.len() < n {
        rs.pairs.resize(n, 0);
    }
    let pairs = &mut rs.pairs[..n];
    // The counters come back from memory in one sequential sweep, not one
    // counting miss at a time.
    std::hint::black_box(touch_lines(pairs));
    gather_buckets(levels, &rs.qcodes, l, 0, g, &mut rs.buckets);
    for (lv, level_buckets) in levels.iter().zip(rs.buckets.iter()) {
        lv.count_pairs(level_buckets, pairs);
    }
    let n_bucketed = ix.n_bucketed();
    for (j, kc) in ix.raw_codes.chunks_exact(l).enumerate() {
        let mut b = 0u8;
        for h in 0..g {
            let c = count_equal_u16(kc, &rs.qcodes[h * l..(h + 1) * l]).min(2);
            for _ in 0..c {
                b = pair_count(b, 1 << h);
            }
        }
        if let Some(x) = pairs.get_mut(n_bucketed + j) {
            *x = b;
        }
    }
    collect_pairs(pairs, t_min, 0, &mut sel.union[..n], &mut sel.umask[..n])
}

/// [`retrieve`] with lane counters, in passes of as many heads as a u32
/// holds lanes.
#[allow(clippy::too_many_arguments)]
fn count_in_lanes(
    ix: &LshIndex,
    levels: &[&Csr],
    n: usize,
    g: usize,
    t_min: u8,
    max_keys: Option<usize>,
    rs: &mut RetrievalScratch,
    sel: &mut Selection,
) -> usize {
    let lanes = if ix.params.l <= 255 {
        Lanes::U8x4
    } else {
        Lanes::U16x2
    };
    let per = lanes.count();
    let passes = g.div_ceil(per);
    let simple = passes == 1 && max_keys.is_none();
    for pass in 0..passes {
        let (h0, h1) = (pass * per, ((pass + 1) * per).min(g));
        count_pass(ix, levels, n, h0, h1, lanes, rs);
        let counts = &mut rs.counts[..n];
        if simple {
            let (union, umask) = (&mut sel.union[..n], &mut sel.umask[..n]);
            return collect_lanes(counts, lanes, u16::from(t_min), 0, union, umask);
        }
        if let Some(cap) = max_keys {
            cap_per_head(counts, lanes, h0, h1, t_min, cap, &mut sel.mask);
            counts.iter_mut().for_each(|c| *c = 0);
        } else {
            let m = collect_lanes(
                counts,
                lanes,
                u16::from(t_min),
                0,
                &mut rs.tmp_ids[..n],
                &mut rs.tmp_masks[..n],
            );
            for (&i, &mk) in rs.tmp_ids[..m].iter().zip(&rs.tmp_masks[..m]) {
                sel.mask[i as usize] |= mk << h0;
            }
        }
    }
    sel.collect_mask(n)
}

/// Counts, in `rs.counts` (lane `h - h0` of each key's counter), the tables in
/// which each key collides with query head `h` of `h0..h1`.
fn count_pass(
    ix: &LshIndex,
    levels: &[&Csr],
    n: usize,
    h0: usize,
    h1: usize,
    lanes: Lanes,
    rs: &mut RetrievalScratch,
) {
    let l = ix.params.l;
    let counts = &mut rs.counts[..n];
    // The lane increments of each set of the pass's heads.
    let inc: [u32; 16] = std::array::from_fn(|heads| {
        (0..h1 - h0)
            .filter(|h| heads >> h & 1 == 1)
            .map(|h| 1u32 << (lanes.bits() * h as u32))
            .sum()
    });
    gather_buckets(levels, &rs.qcodes, l, h0, h1, &mut rs.buckets);
    for (lv, level_buckets) in levels.iter().zip(rs.buckets.iter()) {
        let base = lv.base as usize;
        for b in level_buckets {
            for &id in lv.decode_units(b.start as usize, b.end as usize, &mut rs.bucket) {
                if let Some(x) = counts.get_mut(base + id as usize) {
                    *x += inc[usize::from(b.heads)];
                }
            }
        }
    }
    // Raw (newest) keys: compare their codes with the query's.
    let n_bucketed = ix.n_bucketed();
    for (j, kc) in ix.raw_codes.chunks_exact(l).enumerate() {
        let mut v = 0u32;
        for h in h0..h1 {
            let c = count_equal_u16(kc, &rs.qcodes[h * l..(h + 1) * l]) as u32;
            v += c << (lanes.bits() * (h - h0) as u32);
        }
        if let Some(x) = counts.get_mut(n_bucketed + j) {
            *x = v;
        }
    }
}

/// Per head `h` of `h0..h1`: marks in `mask` the `cap` keys with the most
/// collisions (at least `t_min`; ties by position).
fn cap_per_head(
    counts: &[u32],
    lanes: Lanes,
    h0: usize,
    h1: usize,
    t_min: u8,
    cap: usize,
    mask: &mut [u8],
) {
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
}

/// Fills `per_level[i]` with the buckets of level `levels[i]` that the query
/// heads `h0..h1` hash to (some empty), one per distinct code of each table,
/// with the heads (bit `h - h0`) whose code it is: heads with equal codes
/// share a decode.
/// Every line of those buckets is read here, with many misses in flight, so
/// that the decoding finds them in cache (reading them only a few tables
/// ahead of the decoding leaves it waiting on memory).
fn gather_buckets(
    levels: &[&Csr],
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
        let (codes, nc) = distinct_codes(qcodes, l, t, h0, h1);
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
    // memory would keep the touches from running ahead.
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

/// The distinct codes of table `t` among the heads `h0..h1`, with the heads
/// (bit `h - h0`) that have each, and how many there are.
#[inline(always)]
fn distinct_codes(
    qcodes: &[u16],
    l: usize,
    t: usize,
    h0: usize,
    h1: usize,
) -> ([(u16, u8); 8], usize) {
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
    (codes, nc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ln_u_exact, LayerConfig, LayerStore, LshIndexParams};
    use half::bf16;
    use tandem_kernels::rng::SplitMix64;

    /// Retrieval and the estimator both follow the store's t: the keys
    /// retrieved for each head are exactly those colliding with its query in
    /// at least t tables (counted here key by key), and the `ln u` table is
    /// `ln_u_exact` for that t.
    #[test]
    fn retrieval_and_estimator_follow_the_stores_t() {
        let (d, g, k, l, n, appended) = (16, 3, 3, 12, 300, 40);
        for t in [1u8, 2, 3] {
            let cfg = LayerConfig {
                n_kv_heads: 1,
                group: g,
                head_dim: d,
                lsh: Some(LshIndexParams { k, l, t }),
                seed: 9,
                ..LayerConfig::default()
            };
            let mut rng = SplitMix64(4);
            let mut rows = |m: usize| -> Vec<bf16> {
                (0..m * d)
                    .map(|_| bf16::from_f32(rng.signed_f32() + 0.2))
                    .collect()
            };
            let (prefill, more) = (rows(n), rows(appended));
            let queries: Vec<f32> = rows(g).iter().map(|x| x.to_f32() * 3.0).collect();
            let mut store = LayerStore::new(cfg).expect("config");
            store.load_prefill(&prefill, &prefill, 1).expect("prefill");
            store.append(&more, &more).expect("append");
            let head = store.head(0).expect("head");
            let ix = head.index.as_ref().expect("index");
            let total = head.len();
            // Every key's codes against every query's (queries are not centred).
            let w = ix.projector.words_per_vector();
            let codes = |mut x: Vec<f32>| -> Vec<u16> {
                ix.flip(&mut x);
                let mut b = vec![0u64; w];
                ix.projector.sign_bits(&x, &mut b);
                (0..l).map(|table| ix.code(&b, table)).collect()
            };
            let qcodes: Vec<Vec<u16>> =
                queries.chunks_exact(d).map(|q| codes(q.to_vec())).collect();
            let mut want = Vec::new();
            let mut row = vec![0.0; d];
            for i in 0..total {
                head.keys.row_f32(i, &mut row);
                let kc = codes(row.iter().zip(&head.mean).map(|(x, m)| x - m).collect());
                let heads = (0..g)
                    .filter(|&h| {
                        let same = qcodes[h].iter().zip(&kc).filter(|(a, b)| a == b);
                        same.count() >= usize::from(t)
                    })
                    .fold(0u8, |m, h| m | 1 << h);
                if heads != 0 {
                    want.push((i as u32, heads));
                }
            }
            assert!(!want.is_empty(), "t={t}");
            let (mut rs, mut sel) = (RetrievalScratch::default(), Selection::default());
            rs.ensure(total);
            sel.ensure(total);
            let p = LshParams {
                max_keys: None,
                value_skip: 0,
                top: 0,
                per: 0,
            };
            let nu = retrieve(ix, total, d, &queries, None, &p, &mut rs, &mut sel);
            let got: Vec<(u32, u8)> = sel.union[..nu]
                .iter()
                .copied()
                .zip(sel.umask[..nu].iter().copied())
                .collect();
            assert_eq!(got, want, "t={t}");
            let ln_u = ix.ln_u.values();
            for i in (0..ln_u.len()).step_by(97) {
                let cos = -1.0 + 2.0 * i as f64 / (ln_u.len() - 1) as f64;
                let exact = ln_u_exact(cos, k, l, usize::from(t)) as f32;
                assert_eq!(ln_u[i], exact, "t={t} cos={cos}");
            }
        }
    }
}
