//! One layer's attention for a batch of sequences: the split protocol.
//!
//! Per sequence, (1) the rows that left the device window at the end of the
//! previous step move to the CPU workers, which append and hash them before
//! anything else, (2) the new rows are appended on the device, (3) the new
//! queries go to the workers; then (4) the device attends its rows while the
//! workers attend theirs, and (5) the workers' partial comes back and merges
//! into the device's by log-sum-exp. Every token is attended exactly once: on
//! the device while it is a sink or among the `window + T` most recent rows,
//! else in the offloaded store. The workers serve one sequence while the
//! device attends another.

use std::ops::Range;
use std::time::Instant;

use tandem_cpu::{Attend, BOUND_BLOCK};
use tandem_gpu::{DenseDevice, KvLayer};

use super::observer::OffloadedStep;
use super::sequence::SequenceKv;
use crate::error::{Error, Result};
use crate::policy::LayerAttention;

/// Layer `layer`'s attention for every sequence of a batch. Sequence `i` owns
/// rows `seqs[i].1` of the stacked activations: `q` (`n_heads × head_dim` per
/// row), `k` and `v` (`n_kv_heads × head_dim`), all with RoPE applied. Writes
/// the attention output of those rows into `out`; `lse` is scratch of
/// `n_heads` per row.
#[allow(clippy::too_many_arguments)]
pub fn attend<D: DenseDevice>(
    device: &D,
    layer: usize,
    seqs: &mut [(&mut SequenceKv<D>, Range<usize>)],
    q: &D::Buffer,
    k: &D::Buffer,
    v: &D::Buffer,
    out: &mut D::Buffer,
    lse: &mut D::Buffer,
) -> Result<()> {
    for (kv, rows) in seqs.iter_mut() {
        kv.begin_layer(layer, q, k, v, rows.clone())?;
    }
    for (kv, rows) in seqs.iter() {
        let keys = KvLayer {
            kv: &kv.window,
            layer: kv.table.source(layer),
            window: kv.table.sliding_window(layer),
            softmax: kv.table.softmax(layer),
        };
        device.attention(keys, q, rows.clone(), out, lse)?;
    }
    for (kv, rows) in seqs.iter_mut() {
        kv.finish_layer(layer, q, rows.clone(), out, lse)?;
    }
    Ok(())
}

impl<D: DenseDevice> SequenceKv<D> {
    /// Steps (1)–(3) for `layer`.
    fn begin_layer(
        &mut self,
        layer: usize,
        q: &D::Buffer,
        k: &D::Buffer,
        v: &D::Buffer,
        rows: Range<usize>,
    ) -> Result<()> {
        self.check_usable()?;
        if rows.len() > 1 {
            self.restart_fidelity_check(layer);
        }
        let r = self.evict_append_submit(layer, q, k, v, rows);
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    fn evict_append_submit(
        &mut self,
        layer: usize,
        q: &D::Buffer,
        k: &D::Buffer,
        v: &D::Buffer,
        rows: Range<usize>,
    ) -> Result<()> {
        let source = self.table.source(layer);
        if source == layer {
            self.evict(layer)?;
            self.device
                .kv_append(&mut self.window, layer, k, v, rows.clone())?;
        }
        self.submit(layer, source, q, rows)
    }

    /// Step (1): the rows that leave `layer`'s device window before this
    /// step's rows arrive.
    fn evict(&mut self, layer: usize) -> Result<()> {
        let state = &mut self.layers[layer];
        state.evict_keys.clear();
        state.evict_values.clear();
        let held = self.device.kv_len(&self.window, layer);
        let (sinks, keep) = (self.table.sinks, self.table.sinks + self.table.window);
        match self.table.layers[layer].attention {
            // The first new query sees the last w - 1 rows; a window more is
            // kept so that the last reply can be undone (`truncate`), and rows
            // then move once per w steps rather than at every step.
            LayerAttention::Window { size: Some(w) } if held + 1 >= 3 * w => {
                self.device
                    .kv_discard(&mut self.window, layer, 0, held + 1 - 2 * w)?;
            }
            LayerAttention::Window { size: None } if self.offloaded => {
                let excess = held.saturating_sub(keep);
                self.device
                    .kv_discard(&mut self.window, layer, sinks, excess)?;
            }
            LayerAttention::Offloaded { .. } if self.offloaded => {
                let excess = held.saturating_sub(keep);
                self.device.kv_take(
                    &mut self.window,
                    layer,
                    sinks,
                    excess,
                    &mut state.evict_keys,
                    &mut state.evict_values,
                )?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Step (3): `layer`'s queries go to the workers that hold `source`'s
    /// offloaded keys, with the rows `layer` itself evicted, if any.
    fn submit(
        &mut self,
        layer: usize,
        source: usize,
        q: &D::Buffer,
        rows: Range<usize>,
    ) -> Result<()> {
        let (Some(store), Some(pool)) = (self.layers[source].store.clone(), &self.pool) else {
            return Ok(());
        };
        let LayerAttention::Offloaded { policy, .. } = &self.table.layers[source].attention else {
            return Err(Error::InvalidRequest(format!(
                "layer {source} has an offloaded store but a policy that does not offload"
            )));
        };
        let attend = Attend {
            policy: *policy,
            softmax: self.table.softmax(source),
            exact_heads: self.checked_exact_heads(layer),
        };
        let width = self.shape.n_heads * self.shape.head_dim;
        let queries =
            self.device
                .to_host(q, rows.start * width..rows.end * width, &mut self.staging)?;
        let state = &mut self.layers[layer];
        let evicted = (source == layer).then_some((&state.evict_keys[..], &state.evict_values[..]));
        pool.submit(&store, queries, evicted, attend, &mut state.output)?;
        state.in_flight = true;
        Ok(())
    }

    /// Step (5) for `layer`: waits for the workers' partial and merges it into
    /// the device's rows `rows` of `out` and `lse`.
    fn finish_layer(
        &mut self,
        layer: usize,
        q: &D::Buffer,
        rows: Range<usize>,
        out: &mut D::Buffer,
        lse: &D::Buffer,
    ) -> Result<()> {
        let source = self.table.source(layer);
        let store = self.layers[source].store.clone();
        let state = &mut self.layers[layer];
        if !state.in_flight {
            return Ok(());
        }
        state.in_flight = false;
        let (Some(pool), Some(store)) = (self.pool.clone(), &store) else {
            return Ok(());
        };
        let t0 = Instant::now();
        let waited = pool.wait(&mut state.output);
        self.counters.wait_ns += t0.elapsed().as_nanos() as u64;
        let probed = waited
            .map_err(Into::into)
            .and_then(|()| self.probe_fidelity(layer, q, rows.clone(), out, lse, store));
        if let Err(e) = probed {
            self.broken = true;
            return Err(e);
        }
        let part = &self.layers[layer].output;
        self.counters.worker_ns += part.total_cpu_ns;
        self.counters.worker_on_cpu_ns += part.on_cpu_ns;
        self.counters.retrieval_ns += part.retrieval_cpu_ns;
        self.counters.keys_touched += part.keys_touched.iter().map(|&k| u64::from(k)).sum::<u64>();
        self.counters.keys_offloaded += (store.len() * part.keys_touched.len()) as u64;
        let blocks = store.len().div_ceil(BOUND_BLOCK);
        self.counters.blocks_scanned += part
            .blocks_scanned
            .iter()
            .map(|&b| u64::from(b))
            .sum::<u64>();
        self.counters.blocks_offloaded += (blocks * part.blocks_scanned.len()) as u64;
        if let Some(observer) = &mut self.observer {
            let (width, heads) = (self.shape.n_heads * self.shape.head_dim, self.shape.n_heads);
            let (mut qs, mut os) = (Vec::new(), Vec::new());
            let step = OffloadedStep {
                layer,
                queries: self
                    .device
                    .to_host(q, rows.start * width..rows.end * width, &mut qs)?,
                device_out: self.device.to_host(
                    out,
                    rows.start * width..rows.end * width,
                    &mut os,
                )?,
                device_lse: self.device.to_host(
                    lse,
                    rows.start * heads..rows.end * heads,
                    &mut self.staging,
                )?,
                device_rows: self.device.kv_len(&self.window, source),
                offloaded: part,
                store,
                pool: &pool,
            };
            if let Err(e) = observer.observe(&step) {
                self.broken = true;
                return Err(e);
            }
        }
        self.device
            .merge_partials(out, lse, rows, &part.out, &part.lse)?;
        Ok(())
    }
}
