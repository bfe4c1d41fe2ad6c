//! Per-layer probes: each sparse layer's attention output under the policy,
//! compared with exact attention over the same keys, and optionally where
//! LSH retrieval loses attention mass per kv head, as a split observer.

use std::sync::{Arc, Mutex};

use tandem_cpu::{LayerOutput, Policy};
use tandem_runtime::split::{self, OffloadedStep, RowError, SplitObserver};
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

/// Per query row of `step`, the output of `approx` and of `reference`
/// (partials over the offloaded keys), each merged with the device's partial
/// by log-sum-exp, compared: the layer's whole attention output, as the
/// decode step would see it.
pub fn merged_row_errors(
    step: &OffloadedStep<'_>,
    approx: &LayerOutput,
    reference: &LayerOutput,
) -> Vec<RowError> {
    split::merged_row_errors(
        step.device_out,
        step.device_lse,
        (&approx.out, &approx.lse),
        (&reference.out, &reference.lse),
    )
}
