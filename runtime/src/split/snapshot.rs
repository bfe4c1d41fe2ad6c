//! A sequence's keys and values as arrays, and back, for saved sessions: the
//! device window's rows (through `kv_fork` and `kv_take`, as bf16), each
//! offloaded store's state and the bookkeeping, so that a resumed sequence
//! is the saved one without a prefill.

use std::sync::Arc;

use half::bf16;
use serde::{Deserialize, Serialize};
use tandem_cpu::{ArrayReader, ArrayWriter, LayerStore};
use tandem_gpu::DenseDevice;

use super::sequence::SequenceKv;
use crate::error::{Error, Result};

/// The counts of a saved sequence, which its arrays follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SequenceCounts {
    /// Tokens in the sequence.
    pub(crate) positions: usize,
    /// Whether the sparse layers' older tokens were moved to the CPU stores.
    pub(crate) offloaded: bool,
    /// Rows on the device, per layer.
    pub(crate) device_rows: Vec<usize>,
    /// Tokens in each layer's offloaded store (`None`: the layer has none).
    pub(crate) stored: Vec<Option<usize>>,
}

impl<D: DenseDevice> SequenceKv<D> {
    /// Writes the sequence's state: per layer its device rows' keys then
    /// values (bf16, `[rows][n_kv_heads][head_dim]`), then each offloaded
    /// store's state in layer order.
    pub(crate) fn save_state(&self, out: &mut ArrayWriter) -> Result<SequenceCounts> {
        self.check_usable()?;
        let mut copy = self.device.kv_fork(&self.window)?;
        let mut device_rows = Vec::with_capacity(self.layers.len());
        for layer in 0..self.layers.len() {
            let rows = self.device.kv_len(&copy, layer);
            let (mut keys, mut values) = (Vec::new(), Vec::new());
            self.device
                .kv_take(&mut copy, layer, 0, rows, &mut keys, &mut values)?;
            out.put(&keys);
            out.put(&values);
            device_rows.push(rows);
        }
        let mut stored = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            stored.push(layer.store.as_ref().map(|s| s.len()));
            if let Some(store) = &layer.store {
                store.save(out)?;
            }
        }
        Ok(SequenceCounts {
            positions: self.positions,
            offloaded: self.offloaded,
            device_rows,
            stored,
        })
    }

    /// Fills this empty sequence with the state [`SequenceKv::save_state`]
    /// wrote, after checking `counts` against the policy table and
    /// `max_positions`.
    pub(crate) fn load_state(
        &mut self,
        counts: &SequenceCounts,
        max_positions: usize,
        input: &mut ArrayReader,
    ) -> Result<()> {
        if self.positions != 0 {
            return Err(Error::InvalidRequest(
                "a saved state loads into an empty sequence".into(),
            ));
        }
        self.check_counts(counts, max_positions)?;
        let loaded = self.load_arrays(counts, input);
        if loaded.is_err() {
            self.reset();
            return loaded;
        }
        self.positions = counts.positions;
        self.offloaded = counts.offloaded;
        Ok(())
    }

    fn load_arrays(&mut self, counts: &SequenceCounts, input: &mut ArrayReader) -> Result<()> {
        let width = self.shape.n_kv_heads * self.shape.head_dim;
        for (layer, &rows) in counts.device_rows.iter().enumerate() {
            let keys: Vec<bf16> = input.get("device keys", rows * width)?;
            let values: Vec<bf16> = input.get("device values", rows * width)?;
            let widen = |x: Vec<bf16>| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
            let k = self.device.upload_vector(&widen(keys))?;
            let v = self.device.upload_vector(&widen(values))?;
            self.device
                .kv_append(&mut self.window, layer, &k, &v, 0..rows)?;
        }
        for (layer, stored) in counts.stored.iter().enumerate() {
            let (Some(n), Some(Some(config))) = (stored, self.store_config(layer)) else {
                continue;
            };
            let store = LayerStore::load(config, *n, input)?;
            if store.len() != *n {
                return Err(Error::InvalidRequest(format!(
                    "layer {layer}'s store holds {} tokens, its count says {n}",
                    store.len()
                )));
            }
            self.layers[layer].store = Some(Arc::new(store));
        }
        if input.remaining() != 0 {
            return Err(Error::InvalidRequest(format!(
                "{} arrays more than the sequence holds",
                input.remaining()
            )));
        }
        Ok(())
    }

    /// Whether `counts` describe a sequence of this table and shape.
    fn check_counts(&self, counts: &SequenceCounts, max_positions: usize) -> Result<()> {
        let n = self.layers.len();
        let bad = |problem: String| Err(Error::InvalidRequest(problem));
        if counts.device_rows.len() != n || counts.stored.len() != n {
            return bad(format!("saved with other than {n} layers"));
        }
        let positions = counts.positions;
        if positions > max_positions {
            return bad(format!(
                "{positions} tokens, over the model's {max_positions}"
            ));
        }
        if counts.offloaded && !self.table.is_sparse() {
            return bad("offloaded under a policy that never offloads".into());
        }
        for layer in 0..n {
            let stored = counts.stored[layer];
            let has_store = matches!(self.store_config(layer), Some(Some(_)));
            if counts.device_rows[layer] > positions
                || stored.is_some_and(|s| s > positions)
                || stored.is_some() != (has_store && counts.offloaded)
            {
                return bad(format!("layer {layer}'s counts do not fit the policy"));
            }
        }
        Ok(())
    }
}
