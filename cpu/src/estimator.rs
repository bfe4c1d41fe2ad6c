//! MagicPIG's estimator: the sampling probability `u` of a key under LSH
//! retrieval (its logit is corrected by `-ln u`), and the log-sum-exp merge of
//! partial results.

use crate::config::LshIndexParams;
use crate::shared::{shared, SharedCache};
use std::sync::{Arc, OnceLock};

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
/// [`tandem_kernels::vector::corrected_logits`].
pub(crate) struct LnUTable {
    vals: Vec<f32>,
}

const LNU_POINTS: usize = 8192;

impl LnUTable {
    fn new(p: LshIndexParams) -> Self {
        let (k, l, t) = (p.k, p.l, usize::from(p.t));
        let vals = (0..=LNU_POINTS)
            .map(|i| ln_u_exact(-1.0 + 2.0 * i as f64 / LNU_POINTS as f64, k, l, t) as f32)
            .collect();
        LnUTable { vals }
    }

    /// The table for `p`, built once per process and shared by every store
    /// with those parameters, so that one 32 KB copy stays in cache where one
    /// per layer and kv head (7.7 MB at 30 layers of 8) would be read from
    /// memory by every step's gathers.
    pub(crate) fn shared(p: LshIndexParams) -> Arc<LnUTable> {
        static CACHE: SharedCache<LshIndexParams, LnUTable> = OnceLock::new();
        let Ok(table) = shared(&CACHE, p, || {
            Ok::<_, std::convert::Infallible>(LnUTable::new(p))
        });
        table
    }

    /// `ln u` at `cos` (clamped to [-1, 1]), interpolated as the kernel does.
    pub(crate) fn at(&self, cos: f32) -> f32 {
        let x = (cos.clamp(-1.0, 1.0) + 1.0) * 0.5 * LNU_POINTS as f32;
        let i = (x as usize).min(LNU_POINTS - 1);
        let f = x - i as f32;
        self.vals[i] + f * (self.vals[i + 1] - self.vals[i])
    }

    /// The tabulated values, at equal steps of cos over [-1, 1].
    pub(crate) fn values(&self) -> &[f32] {
        &self.vals
    }
}
