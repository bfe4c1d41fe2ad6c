//! The safety set of LSH sampling ([`crate::policy::LshParams::top`]): per
//! query head, its `top` keys of largest logit.
//!
//! A store with a key sketch ([`crate::sketch`]) scores every key through
//! it, takes each head's best few times `top` as candidates
//! and keeps the `top` of largest exact logit among them: the set found is
//! the exact top wherever the sketch ranks those keys within the candidates.
//!
//! Without a sketch, the set is found exactly by a
//! best-first search over the store's key bounds. Blocks are visited by
//! descending bound; a block is skipped when its bound is below the
//! `top`-th largest logit found so far for every head, and the search ends
//! at the first block whose bound is below that for every head (no later
//! block holds a larger logit). Peaked heads end early; on flat heads, whose
//! bounds all reach the top logits, the search scans every block.

// Index loops over heads read several per-head arrays at once.
#![allow(clippy::needless_range_loop)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::blocks::{block_logits, prepare_blocks};
use super::passes::Step;
use super::scratch::Scratch;
use crate::bounds::BOUND_BLOCK;
use crate::error::CpuError;
use crate::sketch::KeySketch;
use crate::store::HeadStore;
use tandem_kernels::hash::collect_at_least;
use tandem_kernels::masks::keep_at_least;
use tandem_kernels::vector::fold_lanes;

/// Candidates rescored per key of a safety set where every key's sketch
/// score is known (the cutoff is exact and the store small).
const CANDIDATES_PER_TOP_ALL_SCORED: usize = 4;
/// Candidates rescored per key of a safety set where the cutoff is placed on
/// a sample, before its margin: each is a scattered row read of a long
/// context, and the margin already adds half again.
const CANDIDATES_PER_TOP_SAMPLED: usize = 2;

/// Scores sampled to place the candidates' cutoff, about.
const CUTOFF_SAMPLE: usize = 4096;
/// How many more candidates than wanted a sampled cutoff lets through.
const CUTOFF_MARGIN: f64 = 1.5;
/// Candidate rows prefetched ahead of their rescoring.
const PREFETCH_AHEAD: usize = 8;

/// Marks each head's `top` keys of largest logit in `scratch.safety` (bit
/// `h` for head `h`) and lists them, sorted, in `scratch.safety_keys`.
/// Returns the number of blocks of keys read in full.
pub(super) fn mark_safety_sets(
    head: &HeadStore,
    step: &Step,
    top: usize,
    scratch: &mut Scratch,
) -> Result<usize, CpuError> {
    match &head.sketch {
        Some(sketch) if sketch.len() == head.len() => {
            Ok(through_sketch(head, sketch, step, top, scratch))
        }
        _ => through_bounds(head, step, top, scratch),
    }
}

/// The safety sets through the key sketch (see the module documentation).
fn through_sketch(
    head: &HeadStore,
    sketch: &KeySketch,
    step: &Step,
    top: usize,
    scratch: &mut Scratch,
) -> usize {
    let (n, g) = (head.len(), step.queries.len() / step.d);
    let top = top.min(n);
    let every = n.div_ceil(CUTOFF_SAMPLE);
    let per_top = if every == 1 {
        CANDIDATES_PER_TOP_ALL_SCORED
    } else {
        CANDIDATES_PER_TOP_SAMPLED
    };
    let wanted = (per_top * top).min(n);
    let projected = &mut scratch.sketch_queries;
    sketch.project(step.queries, projected);
    let sample = &mut scratch.sketch_sample;
    let m = sketch.sample_scores(projected, every, sample, &mut scratch.sketch_scores);
    let mut cutoffs = [f32::MIN; 8];
    for (h, c) in cutoffs[..g].iter_mut().enumerate() {
        let scores = &scratch.sketch_scores[h * m..(h + 1) * m];
        *c = cutoff(scores, wanted, n, &mut scratch.cutoff_sample);
    }
    // Candidates of each head, marked in `sel.mask` (all zero between calls).
    let mask = &mut scratch.sel.mask;
    sketch.select(projected, &cutoffs[..g], &mut mask[..n]);
    let candidates = &mut scratch.candidates;
    candidates.resize(n, 0);
    let nc = collect_at_least(&mask[..n], 1, 0, candidates);
    let candidates = &candidates[..nc];
    let (logits, heads) = (&mut scratch.candidate_logits, &mut scratch.candidate_heads);
    logits.resize(nc * g, 0.0);
    heads.resize(nc, 0);
    let mut blocks = 0;
    let mut last_block = usize::MAX;
    for (p, &i) in candidates.iter().enumerate() {
        if let Some(&next) = candidates.get(p + PREFETCH_AHEAD) {
            head.keys.prefetch_row(next as usize);
        }
        let i = i as usize;
        let dots = &mut logits[p * g..(p + 1) * g];
        head.keys.dots(i, step.kq, dots);
        dots.iter_mut().for_each(|x| *x *= step.scale);
        heads[p] = std::mem::take(&mut mask[i]);
        blocks += usize::from(i / BOUND_BLOCK != last_block);
        last_block = i / BOUND_BLOCK;
    }
    // Each head's candidates, logit and position, in one pass.
    let ranked = &mut scratch.ranked;
    ranked.resize_with(g.max(ranked.len()), Vec::new);
    ranked.iter_mut().for_each(Vec::clear);
    for (p, (&i, &m)) in candidates.iter().zip(heads.iter()).enumerate() {
        let mut bits = m;
        while bits != 0 {
            let h = bits.trailing_zeros() as usize;
            ranked[h].push((logits[p * g + h], i));
            bits &= bits - 1;
        }
    }
    for (h, ranked) in ranked.iter_mut().take(g).enumerate() {
        let keep = top.min(ranked.len());
        if keep == 0 {
            continue;
        }
        // By logit, then by position: the set `mark` would choose.
        let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if keep < ranked.len() {
            ranked.select_nth_unstable_by(keep - 1, order);
        }
        for &(_, i) in &ranked[..keep] {
            scratch.safety[i as usize] |= 1 << h;
        }
    }
    let safety = &scratch.safety;
    let held = candidates.iter().filter(|&&i| safety[i as usize] != 0);
    scratch.safety_keys.clear();
    scratch.safety_keys.extend(held);
    blocks
}

/// The score above which about `wanted` of `n` keys lie, placed on `sample`
/// (the scores of an even sample of them): exact when the sample
/// is every key, else with [`CUTOFF_MARGIN`] times the share, so that fewer
/// than `wanted` pass only by a sampling fluke.
/// `tmp` is room for the scores that may be that one.
fn cutoff(sample: &[f32], wanted: usize, n: usize, tmp: &mut Vec<f32>) -> f32 {
    let m = sample.iter().filter(|x| !x.is_nan()).count();
    let share = if sample.len() == n {
        wanted
    } else {
        (wanted as f64 * CUTOFF_MARGIN * sample.len() as f64 / n as f64).ceil() as usize
    };
    if share == 0 {
        return f32::INFINITY;
    }
    if share >= m {
        return f32::NEG_INFINITY;
    }
    kth_largest(sample, share, tmp)
}

/// The `k`-th largest of the scores that are not NaN (by `total_cmp`; `k`
/// from 1 to their number). Each of `k` slices of `scores` has its largest
/// at least as large as the smallest of those maxima, which thus bounds
/// the `k`-th largest from below: only the scores above it are ordered,
/// copied to `tmp`.
fn kth_largest(scores: &[f32], k: usize, tmp: &mut Vec<f32>) -> f32 {
    let width = scores.len() / k;
    // A slice of NaN alone leaves its maximum at −∞, which lets every
    // score through: still exact.
    let floor = scores
        .chunks(width)
        .take(k)
        .enumerate()
        .map(|(j, part)| {
            let part = if j + 1 == k {
                &scores[j * width..]
            } else {
                part
            };
            fold_lanes(part, f32::NEG_INFINITY, |a, x| if x > a { x } else { a })
        })
        .fold(f32::INFINITY, f32::min);
    tmp.resize(scores.len(), 0.0);
    let kept = keep_at_least(scores, floor, tmp);
    let kept = &mut tmp[..kept];
    *kept
        .select_nth_unstable_by(kept.len() - k, f32::total_cmp)
        .1
}

/// The safety sets found exactly through the key bounds (see the module
/// documentation).
fn through_bounds(
    head: &HeadStore,
    step: &Step,
    top: usize,
    scratch: &mut Scratch,
) -> Result<usize, CpuError> {
    let (n, g) = (head.len(), step.queries.len() / step.d);
    let nb = prepare_blocks(head, step, scratch)?;
    let blocks = &mut scratch.blocks;
    let order = &mut blocks.order[..nb];
    let bound = &blocks.top;
    order.sort_unstable_by(|&a, &b| bound[b as usize].total_cmp(&bound[a as usize]));
    let top = top.min(n);
    let mut best: Vec<TopLogits> = (0..g).map(|_| TopLogits::new(top)).collect();
    let mut max = [f32::NEG_INFINITY; 8];
    let mut nv = 0;
    for &j in order.iter() {
        let j = j as usize;
        let kth: Vec<f32> = best.iter().map(TopLogits::kth).collect();
        let lowest = kth.iter().fold(f32::INFINITY, |a, &k| a.min(k));
        if blocks.top[j] < lowest {
            break;
        }
        let upper = &blocks.upper[j * 8..j * 8 + g];
        if (0..g).all(|h| upper[h] < kth[h]) {
            continue;
        }
        let keys = j * BOUND_BLOCK..((j + 1) * BOUND_BLOCK).min(n);
        block_logits(
            &head.keys,
            step.kq,
            step.scale,
            g,
            keys.clone(),
            &mut scratch.logits,
            &mut max,
        );
        for (h, b) in best.iter_mut().enumerate() {
            keys.clone().for_each(|i| b.offer(scratch.logits[h][i]));
        }
        blocks.visited[nv] = j as u32;
        nv += 1;
    }
    let visited = &mut blocks.visited[..nv];
    visited.sort_unstable();
    let visited = &*visited;
    let keys = || {
        visited
            .iter()
            .flat_map(move |&j| j as usize * BOUND_BLOCK..((j as usize + 1) * BOUND_BLOCK).min(n))
    };
    for (h, b) in best.iter().enumerate() {
        let logits = &scratch.logits[h];
        let pairs = || keys().map(|i| (i, logits[i]));
        mark(pairs, b.kth(), top, 1 << h, &mut scratch.safety);
    }
    let safety = &scratch.safety;
    scratch.safety_keys.clear();
    scratch
        .safety_keys
        .extend(keys().filter(|&i| safety[i] != 0).map(|i| i as u32));
    Ok(nv)
}

/// Sets `bit` in `mask` for the keys of `pairs` (key, logit; in position
/// order) whose logit is above `kth`, then for those equal to it until `top`
/// keys are marked.
fn mark<I: Iterator<Item = (usize, f32)>>(
    pairs: impl Fn() -> I,
    kth: f32,
    top: usize,
    bit: u8,
    mask: &mut [u8],
) {
    let mut marked = 0;
    for (i, _) in pairs().filter(|&(_, logit)| logit > kth) {
        mask[i] |= bit;
        marked += 1;
    }
    for (i, _) in pairs().filter(|&(_, logit)| logit == kth) {
        if marked == top {
            break;
        }
        mask[i] |= bit;
        marked += 1;
    }
}

/// The `cap` largest logits offered so far (NaN ignored).
struct TopLogits {
    cap: usize,
    heap: BinaryHeap<Reverse<Logit>>,
    /// The smallest of them once `cap` were offered (see [`TopLogits::kth`]),
    /// so that most offers are one comparison.
    kth: f32,
}

impl TopLogits {
    fn new(cap: usize) -> Self {
        TopLogits {
            cap,
            heap: BinaryHeap::with_capacity(cap + 1),
            kth: if cap == 0 {
                f32::INFINITY
            } else {
                f32::NEG_INFINITY
            },
        }
    }

    fn offer(&mut self, x: f32) {
        if x.is_nan() || self.cap == 0 {
            return;
        }
        if self.heap.len() < self.cap {
            self.heap.push(Reverse(Logit(x)));
        } else if x > self.kth {
            self.heap.pop();
            self.heap.push(Reverse(Logit(x)));
        } else {
            return;
        }
        if self.heap.len() == self.cap {
            self.kth = self.heap.peek().map_or(f32::NEG_INFINITY, |low| low.0 .0);
        }
    }

    /// The `cap`-th largest logit offered; −∞ until `cap` were offered
    /// (+∞ with `cap` 0: nothing to find).
    fn kth(&self) -> f32 {
        self.kth
    }
}

/// A logit or score ordered by `total_cmp` (NaN never enters).
#[derive(Clone, Copy, PartialEq)]
struct Logit(f32);

impl Eq for Logit {}

impl PartialOrd for Logit {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Logit {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_kernels::rng::SplitMix64;

    /// The `k`-th largest by ordering a copy of every score.
    fn by_sorting(scores: &[f32], k: usize) -> f32 {
        let mut all: Vec<f32> = scores.iter().copied().filter(|x| !x.is_nan()).collect();
        all.sort_by(f32::total_cmp);
        all[all.len() - k]
    }

    #[test]
    fn the_kth_largest_equals_ordering_every_score() {
        let mut rng = SplitMix64(11);
        let mut tmp = Vec::new();
        for &(n, k) in &[
            (1usize, 1usize),
            (7, 3),
            (100, 1),
            (100, 100),
            (4097, 33),
            (999, 250),
        ] {
            for trial in 0..20 {
                let mut scores: Vec<f32> = (0..n)
                    .map(|_| match rng.next_u64() % 10 {
                        // Ties, both zeros and NaN among ordinary scores.
                        0 => 1.5,
                        1 => -0.0,
                        2 => 0.0,
                        3 if trial % 2 == 0 => f32::NAN,
                        _ => rng.normal() as f32,
                    })
                    .collect();
                if trial == 1 {
                    // One slice of NaN alone, when there are several.
                    let width = n / k;
                    if k > 1 && width > 0 {
                        scores[..width].fill(f32::NAN);
                    }
                }
                let valid = scores.iter().filter(|x| !x.is_nan()).count();
                if k > valid {
                    continue;
                }
                let got = kth_largest(&scores, k, &mut tmp);
                let want = by_sorting(&scores, k);
                assert_eq!(got.to_bits(), want.to_bits(), "n={n} k={k} trial {trial}");
            }
        }
    }
}
