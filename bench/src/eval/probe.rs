//! Per-layer probes: each sparse layer's attention output under the policy,
//! compared with exact attention over the same keys, and optionally where
//! LSH retrieval loses attention mass per kv head, as a split observer.

use std::sync::{Arc, Mutex};

use tandem_cpu::{merge_partials, LayerOutput, Policy};
use tandem_runtime::split::{OffloadedStep, SplitObserver};
use tandem_runtime::Result;

/// A per-layer comparison of the policy's attention output with exact
/// attention over the same keys.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LayerProbe {
    /// Sum over (token, query head) of |o - o_exact| / |o_exact|.
    pub rel_l2_error: f64,
    /// Sum over the same of cos(o, o_exact).
    pub cosine: f64,
    /// Sum over the same of keys touched / keys in the context.
    pub touched_fraction: f64,
    /// Sum over the same of offloaded keys touched / offloaded keys.
    pub offloaded_touched_fraction: f64,
    /// (token, query head) pairs summed.
    pub samples: u64,
}

/// Where one kv head's attention mass goes, summed over its query heads and
/// the steps probed (see [`tandem_cpu::HeadMass`]); masses are fractions of
/// the head's whole attention (device and offloaded keys).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HeadProbe {
    /// Mass on the offloaded keys.
    pub offloaded: f64,
    /// Offloaded mass outside each query head's top keys.
    pub tail: f64,
    /// Offloaded mass LSH is expected to miss.
    pub lsh_missed: f64,
    /// The same with the top keys attended exactly besides.
    pub lsh_missed_with_top: f64,
    /// Missed mass times the missed keys' norm rank, and times their cosine.
    pub missed_norm_rank: f64,
    pub missed_cos: f64,
    /// (token, query head) pairs summed.
    pub samples: u64,
}

/// Accumulates [`LayerProbe`]s (and [`HeadProbe`]s when diagnosing); clone
/// the handles before giving the observer to a sequence.
pub struct Probes {
    layers: Arc<Mutex<Vec<LayerProbe>>>,
    heads: Arc<Mutex<Vec<Vec<HeadProbe>>>>,
    /// With `Some(top)`, diagnose each kv head with safety sets of `top` keys.
    diagnose: Option<usize>,
    exact: LayerOutput,
}

impl Probes {
    /// Probes for a model of `n_layers` layers; `diagnose` as in
    /// [`crate::eval::EvalOptions::diagnose`].
    pub fn new(n_layers: usize, diagnose: Option<usize>) -> Probes {
        Probes {
            layers: Arc::new(Mutex::new(vec![LayerProbe::default(); n_layers])),
            heads: Arc::new(Mutex::new(vec![Vec::new(); n_layers])),
            diagnose,
            exact: LayerOutput::default(),
        }
    }

    /// The accumulated layer probes, readable while the observer is in use.
    pub fn shared(&self) -> Arc<Mutex<Vec<LayerProbe>>> {
        Arc::clone(&self.layers)
    }

    /// The accumulated head probes, `[layer][kv head]` (empty unless
    /// diagnosing).
    pub fn shared_heads(&self) -> Arc<Mutex<Vec<Vec<HeadProbe>>>> {
        Arc::clone(&self.heads)
    }

    fn diagnose(&self, step: &OffloadedStep<'_>, top: usize) -> Result<()> {
        let masses = step.store.head_mass(step.queries, top)?;
        let cfg = step.store.config();
        let n_heads = cfg.n_kv_heads * cfg.group;
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        let Some(layer) = heads.get_mut(step.layer) else {
            return Ok(());
        };
        layer.resize(cfg.n_kv_heads, HeadProbe::default());
        for (r, (m, &device_lse)) in masses.iter().zip(step.device_lse).enumerate() {
            // The offloaded keys' share of the head's whole softmax.
            let share = 1.0 / (1.0 + f64::from(device_lse - m.lse).exp());
            let probe = &mut layer[(r % n_heads) / cfg.group];
            let missed = share * m.lsh_missed;
            probe.offloaded += share;
            probe.tail += share * m.tail;
            probe.lsh_missed += missed;
            probe.lsh_missed_with_top += share * m.lsh_missed_with_top;
            probe.missed_norm_rank += missed * m.missed_norm_rank;
            probe.missed_cos += missed * m.missed_cos;
            probe.samples += 1;
        }
        Ok(())
    }
}

impl SplitObserver for Probes {
    fn observe(&mut self, step: &OffloadedStep<'_>) -> Result<()> {
        if let Some(top) = self.diagnose {
            self.diagnose(step, top)?;
        }
        // Exact attention over the same offloaded keys, merged the same way.
        step.pool
            .run_layer(step.store, step.queries, Policy::Dense, &mut self.exact)?;
        let mut layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        let Some(probe) = layers.get_mut(step.layer) else {
            return Ok(());
        };
        let part = step.offloaded;
        let offloaded_keys = step.store.len();
        let errors = merged_row_errors(step, part, &self.exact);
        for (e, &touched) in errors.iter().zip(&part.keys_touched) {
            probe.rel_l2_error += e.rel_l2;
            probe.cosine += e.cosine;
            let touched = touched as usize;
            probe.touched_fraction +=
                (touched + step.device_rows) as f64 / (offloaded_keys + step.device_rows) as f64;
            probe.offloaded_touched_fraction += touched as f64 / offloaded_keys.max(1) as f64;
            probe.samples += 1;
        }
        Ok(())
    }
}

/// How far one query row's attention output is from a reference's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowError {
    /// |o - o_ref| / |o_ref|.
    pub rel_l2: f64,
    /// cos(o, o_ref).
    pub cosine: f64,
}

/// Per query row of `step`, the output of `approx` and of `reference`
/// (partials over the offloaded keys), each merged with the device's partial
/// by log-sum-exp, compared: the layer's whole attention output, as the
/// decode step would see it.
pub fn merged_row_errors(
    step: &OffloadedStep<'_>,
    approx: &LayerOutput,
    reference: &LayerOutput,
) -> Vec<RowError> {
    let d = step.queries.len() / step.device_lse.len().max(1);
    let (mut exact, mut merged) = (vec![0f32; d], vec![0f32; d]);
    let mut errors = Vec::with_capacity(step.device_lse.len());
    for (i, dev_lse) in step.device_lse.iter().enumerate() {
        let rows = i * d..(i + 1) * d;
        let dev = (&step.device_out[rows.clone()], *dev_lse);
        let cpu = (&approx.out[rows.clone()], approx.lse[i]);
        let ex = (&reference.out[rows], reference.lse[i]);
        merge_partials(&[dev, cpu], &mut merged);
        merge_partials(&[dev, ex], &mut exact);
        let (mut diff, mut norm, mut dot, mut norm_a) = (0f64, 0f64, 0f64, 0f64);
        for (a, e) in merged.iter().zip(&exact) {
            let (a, e) = (f64::from(*a), f64::from(*e));
            diff += (a - e) * (a - e);
            norm += e * e;
            dot += a * e;
            norm_a += a * a;
        }
        errors.push(RowError {
            rel_l2: (diff / norm.max(1e-30)).sqrt(),
            cosine: dot / (norm * norm_a).sqrt().max(1e-30),
        });
    }
    errors
}
