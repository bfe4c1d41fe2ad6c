//! Moving a long context off the device: each sparse layer's tokens between
//! the sinks and the recent window go to an offloaded store on the CPU
//! workers, which indexes them for its policy.

use std::sync::Arc;

use tandem_cpu::{LayerConfig, LayerStore};
use tandem_gpu::DenseDevice;

use super::sequence::SequenceKv;
use crate::error::{Error, Result};
use crate::policy::LayerAttention;

impl<D: DenseDevice> SequenceKv<D> {
    /// Fills an empty sequence with `n` tokens of given keys and values without
    /// running the model (synthetic contexts for benchmarks): `rows(layer, k, v)`
    /// writes layer `layer`'s `n × n_kv_heads × head_dim` keys and values,
    /// RoPE applied, into the emptied vectors.
    ///
    /// If the context is long enough to offload, each layer is offloaded as
    /// soon as it is filled, so the whole context never sits on the device.
    pub fn fill(
        &mut self,
        n: usize,
        build_threads: usize,
        mut rows: impl FnMut(usize, &mut Vec<f32>, &mut Vec<f32>),
    ) -> Result<()> {
        if self.positions != 0 {
            return Err(Error::InvalidRequest("fill needs an empty sequence".into()));
        }
        let due = self.table.is_sparse() && n >= self.table.dense_below;
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for layer in 0..self.layers.len() {
            k.clear();
            v.clear();
            rows(layer, &mut k, &mut v);
            let filled = self.fill_layer(layer, n, &k, &v);
            let offloaded = filled.and_then(|()| match due {
                true => self.offload_layer(layer, build_threads),
                false => Ok(()),
            });
            if let Err(e) = offloaded {
                self.broken = true;
                return Err(e);
            }
        }
        self.positions = n;
        self.offloaded = due;
        Ok(())
    }

    fn fill_layer(&mut self, layer: usize, n: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let width = self.shape.n_kv_heads * self.shape.head_dim;
        if k.len() != n * width || v.len() != n * width {
            return Err(Error::InvalidRequest(format!(
                "fill: layer {layer} got {} keys and {} values, expected {n} rows of {width}",
                k.len(),
                v.len()
            )));
        }
        let skip = match self.table.layers[layer].attention {
            LayerAttention::Shared { .. } => return Ok(()),
            // Only the w - 1 rows the next query still sees.
            LayerAttention::Window { size: Some(w) } => n - n.min(w - 1),
            _ => 0,
        };
        let k = self.device.upload_vector(&k[skip * width..])?;
        let v = self.device.upload_vector(&v[skip * width..])?;
        self.device
            .kv_append(&mut self.window, layer, &k, &v, 0..n - skip)?;
        Ok(())
    }

    /// Moves the sparse layers' tokens between the sinks and the recent window
    /// to the CPU workers and indexes them, once the context reaches the
    /// table's `dense_below`. Called after a prompt and before each decode step.
    pub fn offload_if_due(&mut self, build_threads: usize) -> Result<()> {
        if self.offloaded || !self.table.is_sparse() || self.positions < self.table.dense_below {
            return Ok(());
        }
        self.check_usable()?;
        for layer in 0..self.layers.len() {
            if let Err(e) = self.offload_layer(layer, build_threads) {
                self.broken = true;
                return Err(e);
            }
        }
        self.offloaded = true;
        Ok(())
    }

    fn offload_layer(&mut self, layer: usize, build_threads: usize) -> Result<()> {
        let Some(config) = self.store_config(layer) else {
            return Ok(());
        };
        let (sinks, window) = (self.table.sinks, self.table.window);
        let held = self.device.kv_len(&self.window, layer);
        let middle = held.saturating_sub(sinks + window);
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        self.device.kv_take(
            &mut self.window,
            layer,
            sinks.min(held),
            middle,
            &mut keys,
            &mut values,
        )?;
        let Some(config) = config else {
            // A window layer drops what leaves its window.
            return Ok(());
        };
        let mut store = LayerStore::new(config)?;
        store.load_prefill(&keys, &values, build_threads)?;
        self.layers[layer].store = Some(Arc::new(store));
        Ok(())
    }

    /// What offloading does to `layer`: `None` keeps it whole on the device,
    /// `Some(None)` drops what leaves the window, `Some(Some(config))` builds a
    /// store of that configuration.
    pub(super) fn store_config(&self, layer: usize) -> Option<Option<LayerConfig>> {
        let (policy, lsh, kv_dtype) = match &self.table.layers[layer].attention {
            // A sliding window and a shared layer never hold a long context.
            LayerAttention::Dense
            | LayerAttention::Window { size: Some(_) }
            | LayerAttention::Shared { .. } => return None,
            LayerAttention::Window { size: None } => return Some(None),
            LayerAttention::Offloaded {
                policy,
                lsh,
                kv_dtype,
            } => (policy, *lsh, *kv_dtype),
        };
        Some(Some(LayerConfig {
            n_kv_heads: self.shape.n_kv_heads,
            group: self.shape.group(),
            head_dim: self.shape.head_dim,
            lsh,
            seed: self.table.seed,
            layer: layer as u32,
            kv_dtype,
            sketch: policy.sketch_rank(self.shape.head_dim),
        }))
    }
}
