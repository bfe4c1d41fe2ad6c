//! Per-worker buffers of attention.

use super::passes::PairLists;
use crate::retrieval::{RetrievalScratch, Selection};
use crate::sketch::SketchSample;

/// Per-worker scratch, grown only when the store grows past its previous size.
#[derive(Default)]
pub(crate) struct Scratch {
    /// The keys attended and the heads of each.
    pub(crate) sel: Selection,
    pub(crate) retrieval: RetrievalScratch,
    /// Per head, the logit of every key (top-k and oracle).
    pub(crate) logits: Vec<Vec<f32>>,
    /// Dense attention's keys that some head needs, 32 to a word.
    pub(crate) needed: Vec<u32>,
    /// One head's logits, reordered by the top-k selection.
    pub(crate) tmp: Vec<f32>,
    /// The oracle's cumulative weights.
    pub(crate) cdf: Vec<f64>,
    /// The threshold policy's per-block buffers, see [`BlockScratch`].
    pub(crate) blocks: BlockScratch,
    pub(crate) pass1: PairLists,
    /// Per key, the heads whose LSH safety set holds it; all zero between
    /// calls.
    pub(crate) safety: Vec<u8>,
    /// The sketch scores of the sampled keys, `[g][m]`, the blocks sampled,
    /// the queries projected for them, and the safety sets' candidates.
    pub(crate) sketch_scores: Vec<f32>,
    pub(crate) sketch_sample: SketchSample,
    pub(crate) sketch_queries: Vec<i8>,
    /// One head's sampled sketch scores, reordered to place its cutoff.
    pub(crate) cutoff_sample: Vec<f32>,
    pub(crate) candidates: Vec<u32>,
    /// The candidates' exact logits, `[nc][g]`, and the heads of each.
    pub(crate) candidate_logits: Vec<f32>,
    pub(crate) candidate_heads: Vec<u8>,
    /// Per head, its candidates' logits and positions.
    pub(crate) ranked: Vec<Vec<(f32, u32)>>,
    /// The keys of the safety sets, sorted.
    pub(crate) safety_keys: Vec<u32>,
}

impl Scratch {
    /// Room for a store of `n` keys and `g` query heads.
    pub(crate) fn ensure(&mut self, n: usize, g: usize) {
        self.sel.ensure(n);
        self.retrieval.ensure(n);
        if self.tmp.len() < n {
            self.tmp.resize(n, 0.0);
        }
        if self.safety.len() < n {
            self.safety.resize(n, 0);
        }
        while self.logits.len() < g {
            self.logits.push(Vec::new());
        }
    }

    /// Room for `nb` blocks of the threshold policy and a group's `gd`
    /// query values.
    pub(crate) fn ensure_blocks(&mut self, nb: usize, gd: usize) {
        let b = &mut self.blocks;
        if b.top.len() < nb {
            b.upper.resize(nb * 8, 0.0);
            b.top.resize(nb, 0.0);
            b.order.resize(nb, 0);
            b.visited.resize(nb, 0);
        }
        if b.abs_queries.len() < gd {
            b.abs_queries.resize(gd, 0.0);
        }
    }

    /// Room for every key's logit of `g` heads.
    pub(crate) fn ensure_logits(&mut self, n: usize, g: usize) {
        for h in 0..g {
            if self.logits[h].len() < n {
                self.logits[h].resize(n, 0.0);
            }
        }
    }
}

/// Buffers of the threshold policy, one entry per block of keys.
#[derive(Default)]
pub(crate) struct BlockScratch {
    /// Per block, each head's upper bound on its keys' logits, `[nb][8]`.
    pub(crate) upper: Vec<f32>,
    /// Per block, the largest of its heads' bounds (the visiting order).
    pub(crate) top: Vec<f32>,
    /// Blocks in visiting order.
    pub(crate) order: Vec<u32>,
    /// The blocks scanned.
    pub(crate) visited: Vec<u32>,
    /// The group's queries' absolute values, `[g][d]`.
    pub(crate) abs_queries: Vec<f32>,
}
