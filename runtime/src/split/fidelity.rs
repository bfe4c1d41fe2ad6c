//! The fidelity check of sampled layers.
//!
//! Sampling serves some layers and fails others: on heads whose attention is
//! spread over thousands of keys (Gemma 3's 256-wide global heads), neither
//! the safety set nor SimHash's sample holds the mass, and the estimate's
//! importance weights add error of their own. Which layers fail depends on
//! the model and on the text, so it is measured on the text at hand: after
//! new content (a step of several rows), each sampled layer's first
//! [`PROBE_STEPS`] single-token steps are attended both sampled and exactly
//! over the same offloaded keys; the exact output is the one used, and the
//! layer's mean relative error decides. A layer above the table's bound
//! (`PolicyTable::fidelity_check`) attends its offloaded keys exactly until
//! the next content arrives; the others go on sampling.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use tandem_cpu::{merge_partials, LayerOutput, LayerStore, Policy};
use tandem_gpu::DenseDevice;

use super::sequence::SequenceKv;
use crate::error::Result;

/// Single-token steps probed per layer after new content.
pub const PROBE_STEPS: u32 = 4;

/// Where one layer stands in the check.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum LayerFidelity {
    /// Not checked: the layer is not sampled, or the check is off.
    #[default]
    Unchecked,
    /// Being probed: steps probed so far and their summed row errors.
    Probing {
        /// Steps probed.
        steps: u32,
        /// Sum of the rows' relative errors.
        error_sum: f64,
        /// Rows (token, query head) summed.
        rows: u64,
    },
    /// Probed: the mean relative error of the sampled output, and whether
    /// the layer now attends exactly.
    Checked {
        /// Mean relative L2 error of the layer's output, sampled vs exact.
        error: f64,
        /// Whether it exceeded the bound, so the layer attends exactly.
        exact: bool,
    },
}

impl LayerFidelity {
    /// The state a checked layer starts from after new content.
    pub(super) const FRESH: LayerFidelity = LayerFidelity::Probing {
        steps: 0,
        error_sum: 0.0,
        rows: 0,
    };

    /// Whether the layer's next single-token step is probed.
    pub fn is_probing(&self) -> bool {
        matches!(self, LayerFidelity::Probing { .. })
    }

    /// Whether the layer attends its offloaded keys exactly now.
    pub fn is_exact(&self) -> bool {
        matches!(self, LayerFidelity::Checked { exact: true, .. })
    }

    /// Adds one probed step's row errors; after [`PROBE_STEPS`], decides
    /// against `bound`.
    pub(super) fn record(&mut self, errors: &[RowError], bound: f32) {
        let LayerFidelity::Probing {
            steps,
            error_sum,
            rows,
        } = self
        else {
            return;
        };
        *steps += 1;
        *error_sum += errors.iter().map(|e| e.rel_l2).sum::<f64>();
        *rows += errors.len() as u64;
        if *steps >= PROBE_STEPS {
            let error = *error_sum / (*rows).max(1) as f64;
            *self = LayerFidelity::Checked {
                error,
                exact: error > f64::from(bound),
            };
        }
    }
}

/// The exact partial of a probed step, and host copies of the step's
/// queries and of the device's partial.
#[derive(Default)]
pub(super) struct ProbeBuffers {
    exact: LayerOutput,
    queries: Vec<f32>,
    device_out: Vec<f32>,
    device_lse: Vec<f32>,
}

impl<D: DenseDevice> SequenceKv<D> {
    /// Starts every sampled layer's check afresh (none when it is off).
    pub(super) fn restart_fidelity_checks(&mut self) {
        for layer in 0..self.layers.len() {
            self.restart_fidelity_check(layer);
        }
    }

    /// New content reached `layer`: its check starts over.
    pub(super) fn restart_fidelity_check(&mut self, layer: usize) {
        let checked = self.table.fidelity_check > 0.0 && self.table.is_sampled(layer);
        self.layers[layer].fidelity = if checked {
            LayerFidelity::FRESH
        } else {
            LayerFidelity::Unchecked
        };
    }

    /// One line on the check's decisions, e.g. `fidelity check: layers 5,11
    /// attend exactly (sampled error 0.43, 0.38 > 0.15); 3 layers sample
    /// (error at most 0.09)`; `None` before any layer was decided.
    pub fn fidelity_summary(&self) -> Option<String> {
        let (mut exact, mut sampled) = (Vec::new(), Vec::new());
        for (layer, state) in self.layers.iter().enumerate() {
            if let LayerFidelity::Checked { error, exact: e } = state.fidelity {
                if e { &mut exact } else { &mut sampled }.push((layer, error));
            }
        }
        if exact.is_empty() && sampled.is_empty() {
            return None;
        }
        let mut line = String::from("fidelity check:");
        if !exact.is_empty() {
            let layers: Vec<String> = exact.iter().map(|(l, _)| l.to_string()).collect();
            let errors: Vec<String> = exact.iter().map(|(_, e)| format!("{e:.2}")).collect();
            line += &format!(
                " layers {} attend exactly (sampled error {} > {});",
                layers.join(","),
                errors.join(", "),
                self.table.fidelity_check
            );
        }
        if let Some(worst) = sampled.iter().map(|&(_, e)| e).reduce(f64::max) {
            let layers = match sampled.len() {
                1 => "1 layer samples".to_string(),
                n => format!("{n} layers sample"),
            };
            line += &format!(" {layers} (error at most {worst:.2})");
        }
        Some(line.trim_end_matches(';').to_string())
    }

    /// The policy `layer` attends its offloaded keys with now: `policy`, or
    /// dense once the check found sampling astray.
    pub(super) fn checked_policy(&self, layer: usize, policy: Policy) -> Policy {
        if self.layers[layer].fidelity.is_exact() {
            Policy::Dense
        } else {
            policy
        }
    }

    /// While `layer` is probed and the step is one token (`rows`): attends
    /// its offloaded keys exactly too, records how far the sampled output
    /// (in the layer's output, not yet merged into the device's `out` and
    /// `lse`) is from the exact one, and puts the exact partial in its place.
    pub(super) fn probe_fidelity(
        &mut self,
        layer: usize,
        q: &D::Buffer,
        rows: Range<usize>,
        out: &D::Buffer,
        lse: &D::Buffer,
        store: &Arc<LayerStore>,
    ) -> Result<()> {
        let probing = self.layers[layer].fidelity.is_probing();
        let Some(pool) = self.pool.as_ref().filter(|_| probing && rows.len() == 1) else {
            return Ok(());
        };
        let t0 = Instant::now();
        let (width, heads) = (self.shape.n_heads * self.shape.head_dim, self.shape.n_heads);
        let ProbeBuffers {
            exact,
            queries,
            device_out,
            device_lse,
        } = &mut self.probe;
        let queries = self
            .device
            .to_host(q, rows.start * width..rows.end * width, queries)?;
        pool.run_layer(store, queries, Policy::Dense, exact)?;
        let device_out =
            self.device
                .to_host(out, rows.start * width..rows.end * width, device_out)?;
        let device_lse =
            self.device
                .to_host(lse, rows.start * heads..rows.end * heads, device_lse)?;
        let state = &mut self.layers[layer];
        let sampled = (&state.output.out[..], &state.output.lse[..]);
        let errors = merged_row_errors(device_out, device_lse, sampled, (&exact.out, &exact.lse));
        state.fidelity.record(&errors, self.table.fidelity_check);
        std::mem::swap(&mut state.output, exact);
        // The exact partial's work is counted with the layer's output; the
        // sampled one's, swapped out, here. The device waited for the exact pass.
        let sampled = &*exact;
        self.counters.worker_ns += sampled.total_cpu_ns;
        self.counters.retrieval_ns += sampled.retrieval_cpu_ns;
        self.counters.wait_ns += t0.elapsed().as_nanos() as u64;
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

/// Per query row, the layer's whole output with the offloaded partial
/// `approx` and with `reference`, each merged by log-sum-exp with the
/// device's partial (`device_out`, `[rows][d]`, and `device_lse`), compared.
/// The partials are `(out, lse)` laid out like the device's.
pub fn merged_row_errors(
    device_out: &[f32],
    device_lse: &[f32],
    approx: (&[f32], &[f32]),
    reference: (&[f32], &[f32]),
) -> Vec<RowError> {
    let d = device_out.len() / device_lse.len().max(1);
    let (mut exact, mut merged) = (vec![0f32; d], vec![0f32; d]);
    let mut errors = Vec::with_capacity(device_lse.len());
    for (i, dev_lse) in device_lse.iter().enumerate() {
        let rows = i * d..(i + 1) * d;
        let dev = (&device_out[rows.clone()], *dev_lse);
        merge_partials(&[dev, (&approx.0[rows.clone()], approx.1[i])], &mut merged);
        merge_partials(&[dev, (&reference.0[rows], reference.1[i])], &mut exact);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(error: f64, n: usize) -> Vec<RowError> {
        vec![
            RowError {
                rel_l2: error,
                cosine: 1.0,
            };
            n
        ]
    }

    #[test]
    fn a_layer_is_decided_after_its_probe_steps_by_its_mean_error() {
        for (error, exact) in [(0.05, false), (0.3, true)] {
            let mut f = LayerFidelity::FRESH;
            for _ in 0..PROBE_STEPS - 1 {
                f.record(&rows(error, 3), 0.15);
                assert!(f.is_probing());
            }
            f.record(&rows(error, 3), 0.15);
            match f {
                LayerFidelity::Checked { error: e, exact: x } => {
                    assert!((e - error).abs() < 1e-12);
                    assert_eq!(x, exact);
                    assert_eq!(f.is_exact(), exact);
                }
                other => panic!("not decided: {other:?}"),
            }
            // A decided layer ignores further steps.
            f.record(&rows(9.0, 3), 0.15);
            assert_eq!(f.is_exact(), exact);
        }
    }

    #[test]
    fn merged_errors_weigh_the_offloaded_part_by_its_share_of_the_mass() {
        let device_out = [1.0, 0.0];
        let same = ([0.0f32, 1.0].as_slice(), [0.0f32].as_slice());
        let off = ([0.0f32, -1.0].as_slice(), [0.0f32].as_slice());
        // Equal masses: the merged outputs are (0.5, 0.5) and (0.5, -0.5).
        let e = merged_row_errors(&device_out, &[0.0], off, same);
        assert!((e[0].rel_l2 - 2f64.sqrt()).abs() < 1e-6, "{e:?}");
        assert!(e[0].cosine.abs() < 1e-6);
        // A device part holding nearly all the mass hides the difference.
        let e = merged_row_errors(&device_out, &[30.0], off, same);
        assert!(e[0].rel_l2 < 1e-9, "{e:?}");
        let e = merged_row_errors(&device_out, &[0.0], same, same);
        assert_eq!(e[0].rel_l2, 0.0);
    }
}
