//! The fidelity check of sampled layers.
//!
//! Sampling serves some layers and fails others: on heads whose attention is
//! spread over thousands of keys (Gemma 3's 256-wide global heads), neither
//! the safety set nor SimHash's sample holds the mass, and the estimate's
//! importance weights add error of their own. Which layers fail depends on
//! the model and on the text, so it is measured on the text at hand: after
//! new content (a step of several rows), each sampled layer's first
//! [`PROBE_STEPS`] single-token steps are attended both sampled and exactly
//! over the same offloaded keys; the exact output is the one used, and each
//! kv head's mean relative error (over its query heads' rows) decides. A kv
//! head above the table's bound (`PolicyTable::fidelity_check`) attends its
//! offloaded keys exactly until the next content arrives; the others go on
//! sampling, the layer's other heads among them.

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
#[derive(Debug, Clone, Default, PartialEq)]
pub enum LayerFidelity {
    /// Not checked: the layer is not sampled, or the check is off.
    #[default]
    Unchecked,
    /// Being probed: steps probed so far and, per kv head, the summed
    /// relative errors of its query rows and how many rows they are.
    Probing {
        /// Steps probed.
        steps: u32,
        /// Per kv head: (sum of the rows' relative errors, rows summed).
        heads: Vec<(f64, u64)>,
    },
    /// Probed: each kv head's mean relative error of the sampled output, and
    /// the heads that now attend exactly.
    Checked {
        /// Per kv head, the mean relative L2 error of its query rows' layer
        /// output, sampled vs exact.
        errors: Vec<f64>,
        /// Bit `h`: kv head `h` exceeded the bound and attends exactly
        /// (heads from 64 on always sample).
        exact_heads: u64,
    },
}

impl LayerFidelity {
    /// The state a checked layer starts from after new content.
    pub(super) const FRESH: LayerFidelity = LayerFidelity::Probing {
        steps: 0,
        heads: Vec::new(),
    };

    /// Whether the layer's next single-token step is probed.
    pub fn is_probing(&self) -> bool {
        matches!(self, LayerFidelity::Probing { .. })
    }

    /// The kv heads (bit `h` for head `h`) that attend their offloaded keys
    /// exactly now.
    pub fn exact_heads(&self) -> u64 {
        match self {
            LayerFidelity::Checked { exact_heads, .. } => *exact_heads,
            _ => 0,
        }
    }

    /// Adds one probed step's row errors (`errors[t * nq + q]` for token `t`
    /// and query head `q`, of `kv_heads` heads of `group` query heads each);
    /// after [`PROBE_STEPS`], decides each kv head against `bound`.
    pub(super) fn record(
        &mut self,
        errors: &[RowError],
        kv_heads: usize,
        group: usize,
        bound: f32,
    ) {
        let LayerFidelity::Probing { steps, heads } = self else {
            return;
        };
        heads.resize(kv_heads, (0.0, 0));
        let (group, nq) = (group.max(1), (kv_heads * group).max(1));
        for (r, e) in errors.iter().enumerate() {
            if let Some((sum, rows)) = heads.get_mut(r % nq / group) {
                *sum += e.rel_l2;
                *rows += 1;
            }
        }
        *steps += 1;
        if *steps >= PROBE_STEPS {
            let errors: Vec<f64> = heads
                .iter()
                .map(|&(sum, rows)| sum / rows.max(1) as f64)
                .collect();
            let exact_heads = errors
                .iter()
                .take(64)
                .enumerate()
                .filter(|(_, &e)| e > f64::from(bound))
                .fold(0u64, |mask, (h, _)| mask | 1 << h);
            *self = LayerFidelity::Checked {
                errors,
                exact_heads,
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

    /// One line on the check's decisions, e.g. `fidelity check: exact
    /// attention for layer 5 kv heads 0,2 (sampled error 0.43, 0.38), layer
    /// 11 (0.21) > 0.15; 3 layers sample (error at most 0.09)`, where a layer
    /// named without heads attends exactly on all of them; `None` before any
    /// layer was decided.
    pub fn fidelity_summary(&self) -> Option<String> {
        let (mut exact, mut sampled, mut worst) = (Vec::new(), 0, None::<f64>);
        for (layer, state) in self.layers.iter().enumerate() {
            let LayerFidelity::Checked {
                errors,
                exact_heads,
            } = &state.fidelity
            else {
                continue;
            };
            let is_exact = |h: usize| h < 64 && exact_heads >> h & 1 == 1;
            let (heads, kept): (Vec<usize>, Vec<usize>) =
                (0..errors.len()).partition(|&h| is_exact(h));
            for e in kept.iter().map(|&h| errors[h]) {
                worst = Some(worst.map_or(e, |w: f64| w.max(e)));
            }
            match exact_part(layer, errors, &heads) {
                Some(part) => exact.push(part),
                None => sampled += 1,
            }
        }
        if exact.is_empty() && sampled == 0 {
            return None;
        }
        let mut parts = Vec::new();
        if !exact.is_empty() {
            parts.push(format!(
                "exact attention for {} > {}",
                exact.join(", "),
                self.table.fidelity_check
            ));
        }
        if let Some(worst) = worst {
            let who = match sampled {
                0 => "the other kv heads sample".to_string(),
                1 => "1 layer samples".to_string(),
                n => format!("{n} layers sample"),
            };
            parts.push(format!("{who} (error at most {worst:.2})"));
        }
        Some(format!("fidelity check: {}", parts.join("; ")))
    }

    /// The kv heads of `layer` that attend their offloaded keys exactly now,
    /// whatever its policy: those the check found sampling astray.
    pub(super) fn checked_exact_heads(&self, layer: usize) -> u64 {
        self.layers[layer].fidelity.exact_heads()
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
        let (kv_heads, group) = (self.shape.n_kv_heads, self.shape.group());
        state
            .fidelity
            .record(&errors, kv_heads, group, self.table.fidelity_check);
        std::mem::swap(&mut state.output, exact);
        // The exact partial's work is counted with the layer's output; the
        // sampled one's, swapped out, here. The device waited for the exact pass.
        let sampled = &*exact;
        self.counters.worker_ns += sampled.total_cpu_ns;
        self.counters.worker_on_cpu_ns += sampled.on_cpu_ns;
        self.counters.retrieval_ns += sampled.retrieval_cpu_ns;
        self.counters.wait_ns += t0.elapsed().as_nanos() as u64;
        Ok(())
    }
}

/// `layer 5 kv heads 0,2 (0.43, 0.38)`, or `layer 5 (0.43, 0.38, 0.41)`
/// when every head of the layer is among `heads` (those attending exactly,
/// of the layer's per-head `errors`); `None` when none is.
fn exact_part(layer: usize, errors: &[f64], heads: &[usize]) -> Option<String> {
    if heads.is_empty() {
        return None;
    }
    let errs: Vec<String> = heads.iter().map(|&h| format!("{:.2}", errors[h])).collect();
    if heads.len() == errors.len() {
        return Some(format!("layer {layer} ({})", errs.join(", ")));
    }
    let list: Vec<String> = heads.iter().map(usize::to_string).collect();
    Some(format!(
        "layer {layer} kv heads {} ({})",
        list.join(","),
        errs.join(", ")
    ))
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

    #[test]
    fn each_kv_head_is_decided_after_the_probe_steps_by_its_mean_error() {
        // Two kv heads of two query heads: head 0's rows err by `low`, head
        // 1's by `high`; one step holds two tokens.
        let step = |low: f64, high: f64| {
            let row = |e: f64| RowError {
                rel_l2: e,
                cosine: 1.0,
            };
            [low, low, high, high, low, low, high, high].map(row)
        };
        for (low, high, mask) in [(0.05, 0.3, 0b10), (0.3, 0.3, 0b11), (0.05, 0.1, 0b00)] {
            let mut f = LayerFidelity::FRESH;
            for _ in 0..PROBE_STEPS - 1 {
                f.record(&step(low, high), 2, 2, 0.15);
                assert!(f.is_probing());
                assert_eq!(f.exact_heads(), 0);
            }
            f.record(&step(low, high), 2, 2, 0.15);
            match &f {
                LayerFidelity::Checked {
                    errors,
                    exact_heads,
                } => {
                    assert!((errors[0] - low).abs() < 1e-12 && (errors[1] - high).abs() < 1e-12);
                    assert_eq!(*exact_heads, mask);
                }
                other => panic!("not decided: {other:?}"),
            }
            // A decided layer ignores further steps.
            f.record(&step(9.0, 9.0), 2, 2, 0.15);
            assert_eq!(f.exact_heads(), mask);
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
