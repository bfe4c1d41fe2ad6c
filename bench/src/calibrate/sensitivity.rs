//! Each offloaded layer's end-to-end sensitivity to each pair: the mean
//! KL divergence of the model's next-token distributions when that layer
//! alone holds its offloaded keys and values in the pair's format, against
//! the same layer over a bf16 store.
//!
//! A layer's relative attention-output error ([`crate::calibrate::measure`])
//! says how far a pair moves the layer, not how far it moves the model's
//! answer: the layers do not weigh alike, and an error that one layer's
//! successors wash out can, in another, change the next token. Measured at
//! the output, each layer's cost is in the unit the search should minimise;
//! summing the layers' divergences treats their perturbations as
//! independent, which holds to first order for small ones.
//!
//! The context's first tokens are prefilled once, densely. Per offloaded
//! layer, one fork per store format offloads that layer alone, attended
//! exactly (the rounding alone, as in [`crate::calibrate::measure`]); every
//! other layer stays dense on the device. The forks decode the last tokens
//! teacher-forced in one batch, so the weights are read once per token for
//! all formats, and each pair's logits are compared with the bf16 fork's.

use std::sync::Arc;

use tandem_cpu::{KvDtype, Policy, WorkerPool};
use tandem_gpu::DenseDevice;
use tandem_runtime::model::{Logits, Step};
use tandem_runtime::policy::{LayerAttention, LayerPolicy, PolicyTable};
use tandem_runtime::split::SequenceKv;

use crate::calibrate::measure::{offloaded_layers, MeasureInput, Prefilled};
use crate::calibrate::pairs::BitPair;
use crate::calibrate::pareto::Candidate;
use crate::calibrate::CalibrateError;
use crate::eval::metrics::kl_divergence;

/// Per offloaded layer of the table (ascending), each pair's mean
/// KL(bf16 store ‖ pair's store) in nats over the decoded tokens, with that
/// layer alone offloaded.
pub fn measure_kl<D: DenseDevice>(
    input: &MeasureInput<'_, D>,
    note: &mut dyn FnMut(&str),
) -> Result<Vec<(usize, Vec<Candidate>)>, CalibrateError> {
    let Prefilled {
        base,
        decoded,
        pool,
    } = input.prefill(note)?;
    let (formats, fork_of_pair) = distinct_formats(input.pairs);
    let layers = offloaded_layers(input.table);
    let heads = input.model.config().attention_shape().n_kv_heads;
    let mut measured = Vec::with_capacity(layers.len());
    for (i, &(layer, _)) in layers.iter().enumerate() {
        let logits = decode_forks(input, &base, &pool, layer, &formats, decoded)?;
        let candidates = input
            .pairs
            .iter()
            .zip(&fork_of_pair)
            .map(|(&(pair, _), &fork)| {
                mean_kl(&logits[0], &logits[fork]).map(|error| Candidate::new(pair, error, heads))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let line: Vec<String> = candidates
            .iter()
            .map(|c| format!("{} {:.5}", c.pair, c.error))
            .collect();
        note(&format!(
            "layer {layer} ({} of {}): KL {}",
            i + 1,
            layers.len(),
            line.join(", ")
        ));
        measured.push((layer, candidates));
    }
    Ok(measured)
}

/// The pairs' store formats without repeats, bf16 (the reference) first,
/// and the index of each pair's format among them: one fork per format.
pub(crate) fn distinct_formats(pairs: &[(BitPair, KvDtype)]) -> (Vec<KvDtype>, Vec<usize>) {
    let mut formats = vec![KvDtype::BF16];
    let mut fork_of_pair = Vec::with_capacity(pairs.len());
    for &(_, dtype) in pairs {
        let fork = match formats.iter().position(|&f| f == dtype) {
            Some(fork) => fork,
            None => {
                formats.push(dtype);
                formats.len() - 1
            }
        };
        fork_of_pair.push(fork);
    }
    (formats, fork_of_pair)
}

/// The table under which `layer` alone offloads, over a store of `kv_dtype`
/// attended exactly, with `base`'s sinks, window and softmax; the other
/// layers as in the plain decode.
fn one_layer_table(
    base: &PolicyTable,
    windows: &[Option<usize>],
    layer: usize,
    kv_dtype: KvDtype,
) -> PolicyTable {
    let mut table = PolicyTable::dense(windows);
    table.sinks = base.sinks;
    table.window = base.window;
    table.dense_below = base.sinks + base.window;
    table.seed = base.seed;
    table.layers[layer] = LayerPolicy {
        attention: LayerAttention::Offloaded {
            policy: Policy::Dense,
            lsh: None,
            kv_dtype,
        },
        name: "exact".into(),
        softmax: base.layers[layer].softmax,
    };
    table
}

/// Per format, the logits of each decoded token (teacher-forced) with
/// `layer` alone offloaded in that format; all forks of `base` in one batch.
fn decode_forks<D: DenseDevice>(
    input: &MeasureInput<'_, D>,
    base: &SequenceKv<D>,
    pool: &Arc<WorkerPool>,
    layer: usize,
    formats: &[KvDtype],
    decoded: &[u32],
) -> tandem_runtime::Result<Vec<Vec<Vec<f32>>>> {
    let windows = input.model.config().sliding_windows();
    let mut forks = formats
        .iter()
        .map(|&dtype| {
            let table = one_layer_table(input.table, &windows, layer, dtype);
            base.fork(Arc::new(table), Some(Arc::clone(pool)))
        })
        .collect::<tandem_runtime::Result<Vec<_>>>()?;
    let mut logits = vec![Vec::with_capacity(decoded.len()); forks.len()];
    for t in decoded {
        for kv in &mut forks {
            kv.offload_if_due(input.threads)?;
        }
        let mut steps: Vec<Step<'_, D>> = forks
            .iter_mut()
            .map(|kv| Step {
                tokens: std::slice::from_ref(t),
                kv,
                want: Logits::Last,
            })
            .collect();
        for (out, row) in logits
            .iter_mut()
            .zip(input.model.forward_batch(&mut steps)?)
        {
            out.push(row);
        }
    }
    Ok(logits)
}

/// The mean KL(reference ‖ other) over the rows of two runs.
fn mean_kl(reference: &[Vec<f32>], other: &[Vec<f32>]) -> Result<f64, CalibrateError> {
    let mut sum = 0.0;
    for (r, o) in reference.iter().zip(other) {
        sum += kl_divergence(r, o)?;
    }
    Ok(sum / reference.len().max(1) as f64)
}
