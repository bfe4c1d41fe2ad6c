//! Per-layer probes: each sparse layer's attention output under the policy,
//! compared with exact attention over the same keys, as a split observer.

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
    /// (token, query head) pairs summed.
    pub samples: u64,
}

/// Accumulates [`LayerProbe`]s; clone the handle from [`Probes::shared`]
/// before giving the observer to a sequence.
pub struct Probes {
    layers: Arc<Mutex<Vec<LayerProbe>>>,
    exact: LayerOutput,
}

impl Probes {
    /// Probes for a model of `n_layers` layers.
    pub fn new(n_layers: usize) -> Probes {
        Probes {
            layers: Arc::new(Mutex::new(vec![LayerProbe::default(); n_layers])),
            exact: LayerOutput::default(),
        }
    }

    /// The accumulated probes, readable while the observer is in use.
    pub fn shared(&self) -> Arc<Mutex<Vec<LayerProbe>>> {
        Arc::clone(&self.layers)
    }
}

impl SplitObserver for Probes {
    fn observe(&mut self, step: &OffloadedStep<'_>) -> Result<()> {
        // Exact attention over the same offloaded keys, merged the same way.
        step.pool
            .run_layer(step.store, step.queries, Policy::Dense, &mut self.exact)?;
        let mut layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        let Some(probe) = layers.get_mut(step.layer) else {
            return Ok(());
        };
        let part = step.offloaded;
        let d = step.queries.len() / step.device_lse.len().max(1);
        let offloaded_keys = step.store.len();
        let (mut exact, mut approx) = (vec![0f32; d], vec![0f32; d]);
        for (i, dev_lse) in step.device_lse.iter().enumerate() {
            let dev = (&step.device_out[i * d..(i + 1) * d], *dev_lse);
            let cpu = (&part.out[i * d..(i + 1) * d], part.lse[i]);
            let ex = (&self.exact.out[i * d..(i + 1) * d], self.exact.lse[i]);
            merge_partials(&[dev, cpu], &mut approx);
            merge_partials(&[dev, ex], &mut exact);
            let (mut diff, mut norm, mut dot, mut norm_a) = (0f64, 0f64, 0f64, 0f64);
            for (a, e) in approx.iter().zip(&exact) {
                let (a, e) = (f64::from(*a), f64::from(*e));
                diff += (a - e) * (a - e);
                norm += e * e;
                dot += a * e;
                norm_a += a * a;
            }
            probe.rel_l2_error += (diff / norm.max(1e-30)).sqrt();
            probe.cosine += dot / (norm * norm_a).sqrt().max(1e-30);
            probe.touched_fraction += (part.keys_touched[i] as usize + step.device_rows) as f64
                / (offloaded_keys + step.device_rows) as f64;
            probe.samples += 1;
        }
        Ok(())
    }
}
