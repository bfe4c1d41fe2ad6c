//! Each offloaded layer's sensitivity to each pair: the relative error of
//! its attention output when the offloaded keys are attended exactly over a
//! store of that pair instead of the bf16 store, on the same queries.
//!
//! The context's first tokens are prefilled once, densely; per pair, a fork
//! offloads with the base policy over bf16 stores and decodes the last
//! tokens teacher-forced. Beside each layer's bf16 store the observer keeps
//! a copy in the pair's format, built from the same rows and fed the same
//! evicted rows, and attends both exactly with the same queries: the model
//! runs on the bf16 stores, so every layer is measured on the inputs it
//! would see with the others unquantized. Exact attention measures the
//! rounding alone; under the base policy's own sampling, the two stores'
//! samples part wherever rounding reorders a key, and that sampling noise
//! would swamp the rounding of int8 and int4 pairs.

use std::sync::{Arc, Mutex};

use tandem_cpu::{KvDtype, LayerOutput, LayerStore, Policy, WorkerPool};
use tandem_gpu::DenseDevice;
use tandem_runtime::model::{Llama, Logits};
use tandem_runtime::policy::{LayerAttention, PolicyTable};
use tandem_runtime::split::{OffloadedStep, SequenceKv, SplitObserver};
use tandem_runtime::Result;

use crate::calibrate::pairs::BitPair;
use crate::calibrate::pareto::Candidate;
use crate::calibrate::CalibrateError;
use crate::eval::probe::merged_row_errors;
use crate::eval::run::prefill_dense;

/// Summed errors of one layer.
#[derive(Debug, Clone, Copy, Default)]
struct ErrorSum {
    rel_l2: f64,
    samples: u64,
}

/// Attends each layer's copy in the pair's format and its bf16 store, both
/// exactly, and compares the two outputs of the same step.
struct PairObserver {
    /// Per layer: the copy, or `None` where the layer does not offload.
    copies: Vec<Option<Arc<LayerStore>>>,
    output: LayerOutput,
    reference: LayerOutput,
    sums: Arc<Mutex<Vec<ErrorSum>>>,
}

impl SplitObserver for PairObserver {
    fn observe(&mut self, step: &OffloadedStep<'_>) -> Result<()> {
        let Some(Some(copy)) = self.copies.get(step.layer) else {
            return Ok(());
        };
        append_new_rows(copy, step.store)?;
        step.pool
            .run_layer(copy, step.queries, Policy::Dense, &mut self.output)?;
        step.pool
            .run_layer(step.store, step.queries, Policy::Dense, &mut self.reference)?;
        let errors = merged_row_errors(step, &self.output, &self.reference);
        let mut sums = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sum) = sums.get_mut(step.layer) {
            sum.rel_l2 += errors.iter().map(|e| e.rel_l2).sum::<f64>();
            sum.samples += errors.len() as u64;
        }
        Ok(())
    }
}

/// Rows `from..` of `store`, every kv head, as `[n][n_kv_heads][head_dim]`.
fn rows_from(store: &LayerStore, from: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let cfg = store.config();
    let (nh, d) = (cfg.n_kv_heads, cfg.head_dim);
    let n = store.len().saturating_sub(from);
    let (mut keys, mut values) = (vec![0.0; n * nh * d], vec![0.0; n * nh * d]);
    for h in 0..nh {
        let (k, v) = store.stored_rows(h)?;
        for i in 0..n {
            let (src, dst) = ((from + i) * d, (i * nh + h) * d);
            keys[dst..dst + d].copy_from_slice(&k[src..src + d]);
            values[dst..dst + d].copy_from_slice(&v[src..src + d]);
        }
    }
    Ok((keys, values))
}

/// `store`'s rows in a new store of `kv_dtype`, otherwise configured alike
/// (index, seed, sketch), so that only the rows' format differs.
fn copy_store(store: &LayerStore, kv_dtype: KvDtype, threads: usize) -> Result<LayerStore> {
    let mut copy = LayerStore::new(tandem_cpu::LayerConfig {
        kv_dtype,
        ..store.config().clone()
    })?;
    let (keys, values) = rows_from(store, 0)?;
    copy.load_prefill_f32(&keys, &values, threads)?;
    Ok(copy)
}

/// Appends to `copy` the rows `store` received since.
fn append_new_rows(copy: &LayerStore, store: &LayerStore) -> Result<()> {
    if copy.len() < store.len() {
        let (keys, values) = rows_from(store, copy.len())?;
        copy.append_f32(&keys, &values)?;
    }
    Ok(())
}

/// What [`measure`] runs on.
pub struct MeasureInput<'a, D: DenseDevice> {
    /// The model.
    pub model: &'a Llama<D>,
    /// The base table: the offloaded layers' policies over bf16 stores.
    pub table: &'a Arc<PolicyTable>,
    /// The context's tokens.
    pub tokens: &'a [u32],
    /// Tokens decoded at the end of the context, whose queries are compared.
    pub queries: usize,
    /// The pairs, each with the store format it gives.
    pub pairs: &'a [(BitPair, KvDtype)],
    /// Threads of the store builds and CPU workers.
    pub threads: usize,
}

/// The context's prefix prefilled densely, the tokens left to decode, and
/// the CPU workers the forks share.
pub(crate) struct Prefilled<'a, D: DenseDevice> {
    pub(crate) base: SequenceKv<D>,
    pub(crate) decoded: &'a [u32],
    pub(crate) pool: Arc<WorkerPool>,
}

impl<'a, D: DenseDevice> MeasureInput<'a, D> {
    /// All but the last `queries` tokens prefilled densely, once for every
    /// pair or layer measured on them.
    pub(crate) fn prefill(&self, note: &mut dyn FnMut(&str)) -> Result<Prefilled<'a, D>> {
        let tokens = self.tokens;
        let (prefix, decoded) = tokens.split_at(tokens.len().saturating_sub(self.queries));
        note(&format!("dense prefill of {} tokens", prefix.len()));
        let (base, _) = prefill_dense(self.model, prefix)?;
        Ok(Prefilled {
            base,
            decoded,
            pool: Arc::new(WorkerPool::new(self.threads)?),
        })
    }
}

/// Per offloaded layer of the table (ascending), each pair's mean relative
/// error of the exact attention output over the decoded tokens and query
/// heads.
pub fn measure<D: DenseDevice>(
    input: &MeasureInput<'_, D>,
    note: &mut dyn FnMut(&str),
) -> std::result::Result<Vec<(usize, Vec<Candidate>)>, CalibrateError> {
    let MeasureInput {
        model,
        table,
        pairs,
        ..
    } = *input;
    let Prefilled {
        base,
        decoded,
        pool,
    } = input.prefill(note)?;
    let layers = offloaded_layers(table);
    let heads = model.config().attention_shape().n_kv_heads;
    let mut measured: Vec<(usize, Vec<Candidate>)> =
        layers.iter().map(|&(l, _)| (l, Vec::new())).collect();
    for &(pair, kv_dtype) in pairs {
        let sums = measure_pair(input, &base, &pool, kv_dtype, decoded)?;
        for (layer, candidates) in &mut measured {
            let sum = sums[*layer];
            if sum.samples == 0 {
                return Err(CalibrateError::Measure(format!(
                    "layer {layer} attended no offloaded keys with {pair}"
                )));
            }
            let error = sum.rel_l2 / sum.samples as f64;
            candidates.push(Candidate::new(pair, error, heads));
        }
        let mean = measured
            .iter()
            .map(|(_, c)| c[c.len() - 1].error)
            .sum::<f64>()
            / measured.len().max(1) as f64;
        note(&format!(
            "{pair}: mean error {mean:.5} over {} layers",
            measured.len()
        ));
    }
    Ok(measured)
}

/// Per layer, the summed errors of exact attention over stores of `kv_dtype`
/// against the bf16 stores, while `decoded` runs through a fork of `base`.
fn measure_pair<D: DenseDevice>(
    input: &MeasureInput<'_, D>,
    base: &SequenceKv<D>,
    pool: &Arc<WorkerPool>,
    kv_dtype: KvDtype,
    decoded: &[u32],
) -> Result<Vec<ErrorSum>> {
    let (table, threads) = (input.table, input.threads);
    let mut kv = base.fork(Arc::clone(table), Some(Arc::clone(pool)))?;
    kv.offload_if_due(threads)?;
    let mut copies = vec![None; table.layers.len()];
    for (layer, _) in offloaded_layers(table) {
        if let Some(store) = kv.store(layer) {
            copies[layer] = Some(Arc::new(copy_store(store, kv_dtype, threads)?));
        }
    }
    let sums = Arc::new(Mutex::new(vec![ErrorSum::default(); table.layers.len()]));
    kv.set_observer(Some(Box::new(PairObserver {
        copies,
        output: LayerOutput::default(),
        reference: LayerOutput::default(),
        sums: Arc::clone(&sums),
    })));
    for &t in decoded {
        kv.offload_if_due(threads)?;
        input.model.forward(&[t], &mut kv, Logits::Last)?;
    }
    kv.set_observer(None);
    let sums = sums.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(sums)
}

/// The layers that offload under `table`, with their policies.
pub fn offloaded_layers(table: &PolicyTable) -> Vec<(usize, Policy)> {
    table
        .layers
        .iter()
        .enumerate()
        .filter_map(|(l, p)| match p.attention {
            LayerAttention::Offloaded { policy, .. } => Some((l, policy)),
            _ => None,
        })
        .collect()
}
