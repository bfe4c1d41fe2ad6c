//! One sequence's keys and values: its device window and its offloaded stores.

use std::sync::Arc;

use half::bf16;
use tandem_cpu::{LayerOutput, LayerStore, WorkerPool};
use tandem_gpu::{AttentionShape, DenseDevice};

use super::fidelity::{LayerFidelity, ProbeBuffers};
use super::observer::SplitObserver;
use crate::error::{Error, Result};
use crate::policy::{LayerAttention, PolicyTable};

/// Where the time of a sequence's steps went, summed since the last reset.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepCounters {
    /// Time the calling thread waited for the CPU workers, nanoseconds.
    pub wait_ns: u64,
    /// Worker time on this sequence's offloaded attention (eviction, hashing,
    /// retrieval, attention), summed over workers, nanoseconds.
    pub worker_ns: u64,
    /// The workers' own CPU time in `worker_ns`: less where other threads
    /// (a CPU device's) held their cores, nanoseconds.
    pub worker_on_cpu_ns: u64,
    /// The part of `worker_ns` spent in LSH retrieval (collision counting,
    /// and query hashing when no key was evicted that step: with one, the
    /// queries are hashed with it), nanoseconds.
    pub retrieval_ns: u64,
    /// Sum over (token, sparse layer, query head) of offloaded keys touched.
    pub keys_touched: u64,
    /// Sum over the same of offloaded keys held.
    pub keys_offloaded: u64,
    /// Sum over the same of offloaded blocks of keys scanned (see
    /// `tandem_cpu::LayerOutput::blocks_scanned`).
    pub blocks_scanned: u64,
    /// Sum over the same of offloaded blocks held.
    pub blocks_offloaded: u64,
}

/// One layer's offloaded part: its store, and the step in flight over it.
#[derive(Default)]
pub(super) struct OffloadedLayer {
    pub(super) store: Option<Arc<LayerStore>>,
    pub(super) output: LayerOutput,
    pub(super) evict_keys: Vec<bf16>,
    pub(super) evict_values: Vec<bf16>,
    pub(super) in_flight: bool,
    pub(super) fidelity: LayerFidelity,
}

/// The keys and values of one sequence: the device's (all of a dense layer's
/// rows; a sparse layer's sinks and recent window once the context is long)
/// and the offloaded stores of the sparse layers.
pub struct SequenceKv<D: DenseDevice> {
    pub(super) device: Arc<D>,
    pub(super) window: D::Kv,
    pub(super) shape: AttentionShape,
    pub(super) table: Arc<PolicyTable>,
    pub(super) pool: Option<Arc<WorkerPool>>,
    pub(super) layers: Vec<OffloadedLayer>,
    pub(super) positions: usize,
    pub(super) offloaded: bool,
    /// Set when a step failed half-way: the rows no longer match `positions`.
    pub(super) broken: bool,
    pub(super) counters: StepCounters,
    pub(super) observer: Option<Box<dyn SplitObserver>>,
    /// Host copies of device data, used only where the device is not the host.
    pub(super) staging: Vec<f32>,
    /// The fidelity check's exact partials and host copies.
    pub(super) probe: ProbeBuffers,
}

impl<D: DenseDevice> SequenceKv<D> {
    /// An empty sequence on `device`. `pool` may be `None` only if no layer is sparse.
    pub fn new(
        device: Arc<D>,
        n_layers: usize,
        shape: AttentionShape,
        table: Arc<PolicyTable>,
        pool: Option<Arc<WorkerPool>>,
    ) -> Result<SequenceKv<D>> {
        if table.layers.len() != n_layers {
            return Err(Error::InvalidRequest(format!(
                "the policy table has {} layers, the model {n_layers}",
                table.layers.len()
            )));
        }
        if table.needs_workers() && pool.is_none() {
            return Err(Error::InvalidRequest(
                "a sparse policy needs CPU attention workers".into(),
            ));
        }
        let window = device.kv_new(n_layers, shape)?;
        let mut kv = SequenceKv {
            device,
            window,
            shape,
            table,
            pool,
            layers: (0..n_layers).map(|_| OffloadedLayer::default()).collect(),
            positions: 0,
            offloaded: false,
            broken: false,
            counters: StepCounters::default(),
            observer: None,
            staging: Vec::new(),
            probe: ProbeBuffers::default(),
        };
        kv.restart_fidelity_checks();
        Ok(kv)
    }

    /// Every layer dense but the model's sliding-window layers (`windows`, one
    /// per layer), no workers: the plain decode.
    pub fn dense(
        device: Arc<D>,
        windows: &[Option<usize>],
        shape: AttentionShape,
    ) -> Result<SequenceKv<D>> {
        let table = Arc::new(PolicyTable::dense(windows));
        SequenceKv::new(device, windows.len(), shape, table, None)
    }

    /// A copy of this sequence under another policy table, before anything was
    /// offloaded (e.g. one prefill measured under several policies).
    pub fn fork(
        &self,
        table: Arc<PolicyTable>,
        pool: Option<Arc<WorkerPool>>,
    ) -> Result<SequenceKv<D>> {
        if self.offloaded {
            return Err(Error::InvalidRequest(
                "an offloaded sequence cannot be forked".into(),
            ));
        }
        self.check_usable()?;
        let device = Arc::clone(&self.device);
        let mut kv = SequenceKv::new(device, self.layers.len(), self.shape, table, pool)?;
        kv.window = self.device.kv_fork(&self.window)?;
        kv.positions = self.positions;
        kv.fit_windows()?;
        Ok(kv)
    }

    /// Drops the rows this table's layers do not keep: all of a shared
    /// layer's, and all but the `w - 1` most recent of a sliding window's
    /// (what its next query still sees).
    fn fit_windows(&mut self) -> Result<()> {
        for layer in 0..self.layers.len() {
            let held = self.device.kv_len(&self.window, layer);
            let keep = match self.table.layers[layer].attention {
                LayerAttention::Shared { .. } => 0,
                LayerAttention::Window { size: Some(w) } => held.min(w - 1),
                _ => continue,
            };
            self.device
                .kv_discard(&mut self.window, layer, 0, held - keep)?;
        }
        Ok(())
    }

    /// Tokens in the sequence.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Whether the sparse layers' older tokens have moved to the CPU workers.
    pub fn is_offloaded(&self) -> bool {
        self.offloaded
    }

    /// Tokens held by layer `layer`: (on the device, in the CPU store).
    pub fn layer_tokens(&self, layer: usize) -> (usize, usize) {
        let cpu = self
            .layers
            .get(layer)
            .and_then(|l| l.store.as_ref())
            .map_or(0, |s| s.len());
        (self.device.kv_len(&self.window, layer), cpu)
    }

    /// Layer `layer`'s offloaded store, once the context has been offloaded
    /// (none for a dense, window or shared layer).
    pub fn store(&self, layer: usize) -> Option<&Arc<LayerStore>> {
        self.layers.get(layer).and_then(|l| l.store.as_ref())
    }

    /// Bytes held on the device and by the CPU workers (K/V rows and index).
    pub fn bytes(&self) -> (usize, usize) {
        let cpu = self
            .layers
            .iter()
            .filter_map(|l| l.store.as_ref())
            .map(|s| s.kv_bytes() + s.index_bytes())
            .sum();
        (self.device.kv_bytes(&self.window), cpu)
    }

    /// Counters since the last call, which resets them.
    pub fn take_counters(&mut self) -> StepCounters {
        std::mem::take(&mut self.counters)
    }

    /// Sets (or, with `None`, removes) the observer that sees every offloaded
    /// layer's partials before they merge; returns the previous one.
    pub fn set_observer(
        &mut self,
        observer: Option<Box<dyn SplitObserver>>,
    ) -> Option<Box<dyn SplitObserver>> {
        std::mem::replace(&mut self.observer, observer)
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        self.settle();
        self.device.kv_truncate(&mut self.window, 0);
        for l in &mut self.layers {
            l.store = None;
        }
        self.positions = 0;
        self.offloaded = false;
        self.broken = false;
        self.restart_fidelity_checks();
    }

    /// Each layer's standing in the fidelity check (see
    /// [`LayerFidelity`]): whether it is probed, its kv heads' measured
    /// errors, and which of them attend exactly.
    pub fn fidelity(&self) -> Vec<LayerFidelity> {
        self.layers.iter().map(|l| l.fidelity.clone()).collect()
    }

    /// Drops tokens from `len` on. Only tokens still on the device can be
    /// dropped: offloaded stores are append-only.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.positions {
            return Ok(());
        }
        let drop = self.positions - len;
        for layer in 0..self.layers.len() {
            let held = self.device.kv_len(&self.window, layer);
            let recent = match self.table.layers[layer].attention {
                LayerAttention::Shared { .. } => continue,
                // A sliding window forgot its oldest rows: the next query
                // must still find its w - 1 predecessors.
                LayerAttention::Window { size: Some(w) } if held < self.positions => {
                    held.saturating_sub(w - 1)
                }
                _ if self.layers[layer].store.is_some() || self.offloaded => {
                    held.saturating_sub(self.table.sinks)
                }
                _ => held,
            };
            if drop > recent {
                return Err(Error::InvalidRequest(format!(
                    "cannot drop {drop} tokens: only the {recent} most recent are still on the device"
                )));
            }
        }
        for layer in 0..self.layers.len() {
            if self.table.source(layer) == layer {
                let held = self.device.kv_len(&self.window, layer);
                self.device
                    .kv_discard(&mut self.window, layer, held - drop, drop)?;
            }
        }
        self.positions = len;
        Ok(())
    }

    pub(crate) fn check_usable(&self) -> Result<()> {
        if self.broken {
            return Err(Error::BrokenSequence);
        }
        Ok(())
    }

    /// Marks `tokens` more positions done (after every layer ran).
    pub(crate) fn advance(&mut self, tokens: usize) {
        self.positions += tokens;
    }

    /// Waits for anything in flight (after a failure elsewhere in a batch), so
    /// the outputs can be reused; marks the sequence broken if it was mid-step.
    pub(crate) fn settle(&mut self) {
        for state in &mut self.layers {
            if state.in_flight {
                state.in_flight = false;
                self.broken = true;
                if let Some(pool) = &self.pool {
                    let _ = pool.wait(&mut state.output);
                }
            }
        }
    }

    /// The rows each layer holds on the device.
    pub(crate) fn device_rows(&self) -> Vec<usize> {
        (0..self.layers.len())
            .map(|layer| self.device.kv_len(&self.window, layer))
            .collect()
    }

    /// Takes back a step stopped after its first `layers` layers, each of
    /// which appended `rows` rows to the `before` it held; a layer that did
    /// anything else (moved rows off the device) leaves the sequence broken.
    pub(crate) fn undo_step(&mut self, before: &[usize], layers: usize, rows: usize) {
        self.settle();
        for (layer, &held) in before.iter().enumerate().take(layers) {
            if self.table.source(layer) != layer {
                continue;
            }
            let now = self.device.kv_len(&self.window, layer);
            let undone = now == held + rows
                && self
                    .device
                    .kv_discard(&mut self.window, layer, held, rows)
                    .is_ok();
            if !undone && now != held {
                self.broken = true;
            }
        }
    }

    /// Marks the sequence inconsistent (a step failed part-way).
    pub(crate) fn mark_broken(&mut self) {
        self.broken = true;
    }
}
