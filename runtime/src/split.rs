//! One sequence's keys and values, split between the dense device and the CPU
//! attention workers, and the attention step over both.
//!
//! Per layer, a step (1) moves the rows that left the device window at the end
//! of the previous step to the CPU workers, which append and hash them before
//! anything else, (2) appends the new rows to the device, (3) sends the new
//! queries to the workers, (4) lets the device attend its rows meanwhile, and
//! (5) merges the two partial results by log-sum-exp. Every token is thus
//! attended exactly once: on the device while it is a sink or among the
//! `window + T` most recent rows, else in the offloaded store.

use std::sync::Arc;
use std::time::Instant;

use half::bf16;
use tandem_cpu::{
    merge_partials, KvDtype, LayerConfig, LayerOutput, LayerStore, Policy, WorkerPool,
};
use tandem_gpu::{AttentionShape, KvCache};

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
    /// The part of `worker_ns` spent in LSH retrieval (collision counting,
    /// and query hashing when no key was evicted that step: with one, the
    /// queries are hashed with it), nanoseconds.
    pub retrieval_ns: u64,
    /// Sum over (token, sparse layer, query head) of offloaded keys touched.
    pub keys_touched: u64,
    /// Sum over the same of offloaded keys held.
    pub keys_offloaded: u64,
}

/// A per-layer comparison of the policy's attention output with exact
/// attention over the same keys, for the quality harness.
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

struct LayerState {
    store: Option<Arc<LayerStore>>,
    output: LayerOutput,
    evict_keys: Vec<bf16>,
    evict_values: Vec<bf16>,
    in_flight: bool,
}

/// The keys and values of one sequence: the device cache (all of a dense
/// layer's rows; a sparse layer's sinks and recent window once the context is
/// long) and the offloaded stores of the sparse layers.
pub struct SequenceKv {
    device: KvCache,
    table: Arc<PolicyTable>,
    pool: Option<Arc<WorkerPool>>,
    layers: Vec<LayerState>,
    positions: usize,
    offloaded: bool,
    /// Set when a step failed half-way: the rows no longer match `positions`.
    broken: bool,
    counters: StepCounters,
    probes: Option<Vec<LayerProbe>>,
    /// The exact offloaded partial, for probes.
    exact: LayerOutput,
    merged: Vec<f32>,
}

impl SequenceKv {
    /// An empty sequence. `pool` may be `None` only if no layer is sparse.
    pub fn new(
        n_layers: usize,
        shape: AttentionShape,
        table: Arc<PolicyTable>,
        pool: Option<Arc<WorkerPool>>,
    ) -> Result<SequenceKv> {
        if table.layers.len() != n_layers {
            return Err(Error::InvalidRequest(format!(
                "the policy table has {} layers, the model {n_layers}",
                table.layers.len()
            )));
        }
        if table.is_sparse() && pool.is_none() {
            return Err(Error::InvalidRequest(
                "a sparse policy needs CPU attention workers".into(),
            ));
        }
        Ok(SequenceKv::unchecked(n_layers, shape, table, pool))
    }

    /// Every layer dense, no workers: the plain decode.
    pub fn dense(n_layers: usize, shape: AttentionShape) -> SequenceKv {
        SequenceKv::unchecked(
            n_layers,
            shape,
            Arc::new(PolicyTable::dense(n_layers)),
            None,
        )
    }

    fn unchecked(
        n_layers: usize,
        shape: AttentionShape,
        table: Arc<PolicyTable>,
        pool: Option<Arc<WorkerPool>>,
    ) -> SequenceKv {
        SequenceKv {
            device: KvCache::new(n_layers, shape),
            table,
            pool,
            layers: (0..n_layers)
                .map(|_| LayerState {
                    store: None,
                    output: LayerOutput::default(),
                    evict_keys: Vec::new(),
                    evict_values: Vec::new(),
                    in_flight: false,
                })
                .collect(),
            positions: 0,
            offloaded: false,
            broken: false,
            counters: StepCounters::default(),
            probes: None,
            exact: LayerOutput::default(),
            merged: Vec::new(),
        }
    }

    /// A copy of this sequence under another policy table, before anything was
    /// offloaded (e.g. one prefill measured under several policies).
    pub fn fork(
        &self,
        table: Arc<PolicyTable>,
        pool: Option<Arc<WorkerPool>>,
    ) -> Result<SequenceKv> {
        if self.offloaded {
            return Err(Error::InvalidRequest(
                "an offloaded sequence cannot be forked".into(),
            ));
        }
        self.check_usable()?;
        let shape = self.device.shape();
        let mut kv = SequenceKv::new(self.layers.len(), shape, table, pool)?;
        kv.device = self.device.clone();
        kv.positions = self.positions;
        Ok(kv)
    }

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
            self.device
                .append(layer, &k, &v)
                .map_err(|e| Error::Engine(e.to_string()))?;
            if self.device.len(layer) != n {
                self.broken = true;
                return Err(Error::InvalidRequest(format!(
                    "fill: layer {layer} got {} rows, expected {n}",
                    self.device.len(layer)
                )));
            }
            if due {
                if let Err(e) = self.offload_layer(layer, build_threads) {
                    self.broken = true;
                    return Err(e);
                }
            }
        }
        self.positions = n;
        self.offloaded = due;
        Ok(())
    }

    /// Tokens in the sequence.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// The device cache.
    pub fn device_cache(&self) -> &KvCache {
        &self.device
    }

    /// The policy table.
    pub fn table(&self) -> &PolicyTable {
        &self.table
    }

    /// Whether the sparse layers' older tokens have moved to the CPU workers.
    pub fn is_offloaded(&self) -> bool {
        self.offloaded
    }

    /// Tokens held by layer `layer`: (on the device, in the CPU store).
    pub fn layer_tokens(&self, layer: usize) -> (usize, usize) {
        let cpu = self.layers[layer].store.as_ref().map_or(0, |s| s.len());
        (self.device.len(layer), cpu)
    }

    /// Bytes held on the device and by the CPU workers (K/V rows and index).
    pub fn bytes(&self) -> (usize, usize) {
        let cpu = self
            .layers
            .iter()
            .filter_map(|l| l.store.as_ref())
            .map(|s| s.kv_bytes() + s.index_bytes())
            .sum();
        (self.device.size_bytes(), cpu)
    }

    /// Counters since the last call, which resets them.
    pub fn take_counters(&mut self) -> StepCounters {
        std::mem::take(&mut self.counters)
    }

    /// Starts (or stops, with `false`) comparing every sparse layer's output with
    /// exact attention over the same keys; see [`SequenceKv::take_probes`].
    pub fn set_probes(&mut self, on: bool) {
        self.probes = on.then(|| vec![LayerProbe::default(); self.layers.len()]);
    }

    /// Per-layer probes since the last call (empty if probes are off).
    pub fn take_probes(&mut self) -> Vec<LayerProbe> {
        match &mut self.probes {
            Some(p) => std::mem::replace(p, vec![LayerProbe::default(); p.len()]),
            None => Vec::new(),
        }
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        self.settle();
        self.device.truncate(0);
        for l in &mut self.layers {
            l.store = None;
        }
        self.positions = 0;
        self.offloaded = false;
        self.broken = false;
    }

    /// Drops tokens from `len` on. Only tokens still on the device can be
    /// dropped: offloaded stores are append-only.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.positions {
            return Ok(());
        }
        let drop = self.positions - len;
        let n_layers = self.layers.len();
        for layer in 0..n_layers {
            let held = self.device.len(layer);
            let recent = if self.layers[layer].store.is_some() || self.offloaded {
                held.saturating_sub(self.table.sinks)
            } else {
                held
            };
            if drop > recent {
                return Err(Error::InvalidRequest(format!(
                    "cannot drop {drop} tokens: only the {recent} most recent are still on the device"
                )));
            }
        }
        for layer in 0..n_layers {
            let held = self.device.len(layer);
            let (mut k, mut v) = (Vec::new(), Vec::new());
            self.device
                .take_rows(layer, held - drop, drop, &mut k, &mut v)
                .map_err(|e| Error::Engine(e.to_string()))?;
        }
        self.positions = len;
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
        for li in 0..self.layers.len() {
            if let Err(e) = self.offload_layer(li, build_threads) {
                self.broken = true;
                return Err(e);
            }
        }
        self.offloaded = true;
        Ok(())
    }

    fn offload_layer(&mut self, li: usize, build_threads: usize) -> Result<()> {
        let shape = self.device.shape();
        let (sinks, window) = (self.table.sinks, self.table.window);
        let engine = |e: String| Error::Engine(e);
        let policy = &self.table.layers[li];
        let (lsh, lsh_t, kv_dtype) = match &policy.attention {
            LayerAttention::Dense => return Ok(()),
            LayerAttention::Window => (None, 2, KvDtype::Bf16),
            LayerAttention::Offloaded {
                lsh,
                policy: Policy::Lsh(p),
                kv_dtype,
            } => (*lsh, p.t, *kv_dtype),
            LayerAttention::Offloaded { lsh, kv_dtype, .. } => (*lsh, 2, *kv_dtype),
        };
        let held = self.device.len(li);
        let middle = held.saturating_sub(sinks + window);
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        self.device
            .take_rows(li, sinks.min(held), middle, &mut keys, &mut values)
            .map_err(|e| engine(e.to_string()))?;
        if policy.attention == LayerAttention::Window {
            return Ok(());
        }
        // The update keeps this literal valid as the engine's config grows.
        #[allow(clippy::needless_update)]
        let config = LayerConfig {
            n_kv_heads: shape.n_kv_heads,
            group: shape.group(),
            head_dim: shape.head_dim,
            lsh,
            lsh_t,
            seed: self.table.seed,
            layer: li as u32,
            kv_dtype,
            ..LayerConfig::default()
        };
        let mut store = LayerStore::new(config).map_err(|e| engine(e.to_string()))?;
        store
            .load_prefill(&keys, &values, build_threads)
            .map_err(|e| engine(e.to_string()))?;
        self.layers[li].store = Some(Arc::new(store));
        Ok(())
    }

    pub(crate) fn check_usable(&self) -> Result<()> {
        if self.broken {
            return Err(Error::Engine(
                "this sequence was left inconsistent by a failed step; reset it".into(),
            ));
        }
        Ok(())
    }

    /// Step parts (1)–(3) for layer `layer`: `k`, `v` are the new tokens'
    /// `T × n_kv_heads × head_dim` rows, `q` their `T × n_heads × head_dim`
    /// queries (RoPE applied).
    pub(crate) fn begin_layer(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        q: &[f32],
    ) -> Result<()> {
        self.check_usable()?;
        let sparse = self.offloaded && self.table.layers[layer].is_sparse();
        let state = &mut self.layers[layer];
        state.evict_keys.clear();
        state.evict_values.clear();
        let r = (|| -> Result<()> {
            let engine = |e: String| Error::Engine(e);
            if sparse {
                let keep = self.table.sinks + self.table.window;
                let excess = self.device.len(layer).saturating_sub(keep);
                self.device
                    .take_rows(
                        layer,
                        self.table.sinks,
                        excess,
                        &mut state.evict_keys,
                        &mut state.evict_values,
                    )
                    .map_err(|e| engine(e.to_string()))?;
            }
            self.device
                .append(layer, k, v)
                .map_err(|e| engine(e.to_string()))?;
            if let (Some(store), Some(pool)) = (&state.store, &self.pool) {
                let LayerAttention::Offloaded { policy, .. } = &self.table.layers[layer].attention
                else {
                    return Err(engine("an offloaded store on a non-offloaded layer".into()));
                };
                pool.submit(
                    store,
                    q,
                    Some((&state.evict_keys, &state.evict_values)),
                    *policy,
                    &mut state.output,
                )
                .map_err(|e| engine(e.to_string()))?;
                state.in_flight = true;
            }
            Ok(())
        })();
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Step part (5): waits for the workers' partial of layer `layer` and merges
    /// it into the device's (`out`: `T × n_heads × head_dim`, normalised;
    /// `lse`: `T × n_heads`). `q` are the queries given to `begin_layer`.
    pub(crate) fn finish_layer(
        &mut self,
        layer: usize,
        q: &[f32],
        out: &mut [f32],
        lse: &[f32],
    ) -> Result<()> {
        let state = &mut self.layers[layer];
        if !state.in_flight {
            return Ok(());
        }
        state.in_flight = false;
        let (Some(pool), Some(store)) = (&self.pool, &state.store) else {
            return Ok(());
        };
        let t0 = Instant::now();
        let waited = pool.wait(&mut state.output);
        self.counters.wait_ns += t0.elapsed().as_nanos() as u64;
        if let Err(e) = waited {
            self.broken = true;
            return Err(Error::Engine(format!("CPU attention workers: {e}")));
        }
        let part = &state.output;
        let offloaded_keys = store.len();
        self.counters.worker_ns += part.total_cpu_ns;
        self.counters.retrieval_ns += part.retrieval_cpu_ns;
        self.counters.keys_touched += part.keys_touched.iter().map(|&k| u64::from(k)).sum::<u64>();
        self.counters.keys_offloaded += (offloaded_keys * part.keys_touched.len()) as u64;
        let d = self.device.shape().head_dim;
        if let Some(probes) = &mut self.probes {
            // Exact attention over the same offloaded keys, merged the same way.
            if let Err(e) = pool.run_layer(store, q, Policy::Dense, &mut self.exact) {
                self.broken = true;
                return Err(Error::Engine(format!("CPU attention workers: {e}")));
            }
            let device_rows = self.device.len(layer);
            let probe = &mut probes[layer];
            let mut exact = vec![0f32; d];
            let mut approx = vec![0f32; d];
            for (i, dev_lse) in lse.iter().enumerate() {
                let dev = &out[i * d..(i + 1) * d];
                let cpu = (&part.out[i * d..(i + 1) * d], part.lse[i]);
                let ex = (&self.exact.out[i * d..(i + 1) * d], self.exact.lse[i]);
                merge_partials(&[(dev, *dev_lse), cpu], &mut approx);
                merge_partials(&[(dev, *dev_lse), ex], &mut exact);
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
                probe.touched_fraction += (part.keys_touched[i] as usize + device_rows) as f64
                    / (offloaded_keys + device_rows) as f64;
                probe.samples += 1;
            }
        }
        self.merged.resize(d, 0.0);
        for (i, dev_lse) in lse.iter().enumerate() {
            let dev = &out[i * d..(i + 1) * d];
            let cpu = &part.out[i * d..(i + 1) * d];
            merge_partials(&[(dev, *dev_lse), (cpu, part.lse[i])], &mut self.merged);
            out[i * d..(i + 1) * d].copy_from_slice(&self.merged);
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

    /// Marks the sequence inconsistent (a step failed part-way).
    pub(crate) fn mark_broken(&mut self) {
        self.broken = true;
    }
}
