//! Where sampled attention loses its mass: per query head, how the exact
//! softmax over the offloaded keys is spread, how much of it LSH retrieval is
//! expected to miss under the store's (K, L, t), and whether what it misses
//! are keys of large norm or of large angle with the query.
//!
//! Off the decode path: it scores every key of every head in f32.

use crate::error::CpuError;
use crate::estimator::LnUTable;
use crate::store::{HeadStore, LayerStore};
use tandem_kernels::vector::dot_f32;

/// One query head's attention over the offloaded keys.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HeadMass {
    /// Log-sum-exp of the head's exact logits over the offloaded keys.
    pub lse: f32,
    /// Softmax mass (of the offloaded keys' total) outside the head's `top`
    /// keys of largest logit.
    pub tail: f64,
    /// Mass LSH retrieval is expected to miss, `Σ p_i (1 − u_i)` with `u_i`
    /// a key's probability of being retrieved; 0 without an index.
    pub lsh_missed: f64,
    /// The same, when the `top` keys are attended exactly besides (a safety
    /// set, [`crate::LshParams::top`]).
    pub lsh_missed_with_top: f64,
    /// Over the missed mass, the mean rank of the keys' centred norms among
    /// the head's keys: 0 the smallest, 1 the largest.
    pub missed_norm_rank: f64,
    /// Over the missed mass, the mean cosine of the centred keys with the
    /// query.
    pub missed_cos: f64,
}

impl LayerStore {
    /// Diagnoses each query row of `queries` (rows of `head_dim`, query head
    /// `r % (n_kv_heads · group)` for row `r`), with safety sets of `top`
    /// keys. Keys and queries are taken as the store holds them.
    pub fn head_mass(&self, queries: &[f32], top: usize) -> Result<Vec<HeadMass>, CpuError> {
        let cfg = self.config();
        let (d, heads) = (cfg.head_dim, cfg.n_kv_heads * cfg.group);
        if d == 0 || !queries.len().is_multiple_of(d) {
            return Err(CpuError::Shape(format!(
                "{} query values are not rows of {d}",
                queries.len()
            )));
        }
        let ln_u = cfg.lsh.map(LnUTable::shared);
        let mut out = vec![HeadMass::default(); queries.len() / d];
        for kvh in 0..cfg.n_kv_heads {
            let head = self.head(kvh)?;
            let keys = KeyView::new(&head);
            for (r, q) in queries.chunks_exact(d).enumerate() {
                if (r % heads) / cfg.group == kvh {
                    out[r] = keys.diagnose(q, top, ln_u.as_deref());
                }
            }
        }
        Ok(out)
    }
}

/// One kv head's keys in f32, centred, with their norms' ranks.
struct KeyView {
    d: usize,
    keys: Vec<f32>,
    centred: Vec<f32>,
    norms: Vec<f32>,
    norm_rank: Vec<f32>,
}

impl KeyView {
    fn new(head: &HeadStore) -> Self {
        let (n, d) = (head.len(), head.d);
        let mut keys = vec![0.0; n * d];
        for (i, row) in keys.chunks_exact_mut(d).enumerate() {
            head.keys.row_f32(i, row);
        }
        let mut centred = keys.clone();
        for row in centred.chunks_exact_mut(d) {
            row.iter_mut().zip(&head.mean).for_each(|(x, m)| *x -= m);
        }
        let norms: Vec<f32> = centred
            .chunks_exact(d)
            .map(|k| dot_f32(k, k).sqrt())
            .collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| norms[a].total_cmp(&norms[b]));
        let mut norm_rank = vec![0.0; n];
        for (rank, &i) in order.iter().enumerate() {
            norm_rank[i] = rank as f32 / (n.max(2) - 1) as f32;
        }
        KeyView {
            d,
            keys,
            centred,
            norms,
            norm_rank,
        }
    }

    fn diagnose(&self, q: &[f32], top: usize, ln_u: Option<&LnUTable>) -> HeadMass {
        let d = self.d;
        let n = self.norms.len();
        if n == 0 {
            return HeadMass {
                lse: f32::NEG_INFINITY,
                ..HeadMass::default()
            };
        }
        let scale = 1.0 / (d as f32).sqrt();
        let logits: Vec<f32> = self
            .keys
            .chunks_exact(d)
            .map(|k| dot_f32(k, q) * scale)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut in_top = vec![false; n];
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        for &i in order.iter().take(top) {
            in_top[i] = true;
        }
        let qn = dot_f32(q, q).sqrt();
        let mut m = HeadMass {
            lse: max + total.ln() as f32,
            ..HeadMass::default()
        };
        for i in 0..n {
            let p = weights[i] / total;
            if !in_top[i] {
                m.tail += p;
            }
            let Some(table) = ln_u else { continue };
            let k = &self.centred[i * d..(i + 1) * d];
            let cos = dot_f32(k, q) / (self.norms[i] * qn).max(f32::MIN_POSITIVE);
            let missed = p * (1.0 - f64::from(table.at(cos)).exp());
            m.lsh_missed += missed;
            if !in_top[i] {
                m.lsh_missed_with_top += missed;
            }
            m.missed_norm_rank += missed * f64::from(self.norm_rank[i]);
            m.missed_cos += missed * f64::from(cos);
        }
        if m.lsh_missed > 0.0 {
            m.missed_norm_rank /= m.lsh_missed;
            m.missed_cos /= m.lsh_missed;
        }
        m
    }
}
