//! Per-worker buffers of attention.

use super::passes::PairLists;
use crate::retrieval::{RetrievalScratch, Selection};

/// Per-worker scratch, grown only when the store grows past its previous size.
#[derive(Default)]
pub(crate) struct Scratch {
    /// The keys attended and the heads of each.
    pub(crate) sel: Selection,
    pub(crate) retrieval: RetrievalScratch,
    /// Per head, the logit of every key (top-k and oracle).
    pub(crate) logits: Vec<Vec<f32>>,
    /// One head's logits, reordered by the top-k selection.
    pub(crate) tmp: Vec<f32>,
    /// The oracle's cumulative weights.
    pub(crate) cdf: Vec<f64>,
    pub(crate) pass1: PairLists,
}

impl Scratch {
    /// Room for a store of `n` keys and `g` query heads.
    pub(crate) fn ensure(&mut self, n: usize, g: usize) {
        self.sel.ensure(n);
        self.retrieval.ensure(n);
        if self.tmp.len() < n {
            self.tmp.resize(n, 0.0);
        }
        while self.logits.len() < g {
            self.logits.push(Vec::new());
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
