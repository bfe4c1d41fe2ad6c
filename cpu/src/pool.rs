//! The pinned worker pool: one task per (layer store, kv head), fed through a
//! crossbeam channel; each caller's [`LayerOutput`] owns the channel its results
//! come back on, so several sequences can have steps in flight at once. Each
//! worker owns its scratch, and buffers travel with the tasks, so steady-state
//! steps do not allocate.

use crate::attend::{attend_group, Partials, Scratch};
use crate::config::LayerConfig;
use crate::error::CpuError;
use crate::policy::{Attend, Policy};
use crate::store::LayerStore;
use cpu_time::ThreadTime;
use crossbeam::channel::{unbounded, Receiver, Sender};
use half::bf16;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Buffers of one GQA group, moved to a worker and back (no copies, no allocation).
#[derive(Default)]
struct GroupBuf {
    /// `[tokens][group][head_dim]`.
    q: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
    touched: Vec<u32>,
    blocks: Vec<u32>,
    /// Rows of this kv head leaving the device window: `[n][head_dim]`.
    evict_keys: Vec<bf16>,
    evict_values: Vec<bf16>,
    /// The queries' LSH sign bits, written when the evicted keys are hashed.
    query_bits: Vec<u64>,
    retrieval_ns: u64,
    total_ns: u64,
    /// The worker thread's own CPU time in the task (below `total_ns` when
    /// other threads held its core).
    on_cpu_ns: u64,
}

impl GroupBuf {
    /// Takes kv head `h`'s part of a step of a store configured by `cfg`
    /// (`queries` and the evicted rows `ek`, `ev` as [`WorkerPool::submit`]
    /// takes them, checked by [`check_step`]).
    fn load(&mut self, cfg: &LayerConfig, h: usize, queries: &[f32], ek: &[bf16], ev: &[bf16]) {
        let (nkv, g, d) = (cfg.n_kv_heads, cfg.group, cfg.head_dim);
        let tokens = queries.len() / (nkv * g * d);
        self.q.clear();
        for q in queries.chunks_exact(nkv * g * d) {
            self.q.extend_from_slice(&q[h * g * d..(h + 1) * g * d]);
        }
        self.evict_keys.clear();
        self.evict_values.clear();
        for (k, v) in ek.chunks_exact(nkv * d).zip(ev.chunks_exact(nkv * d)) {
            self.evict_keys.extend_from_slice(&k[h * d..(h + 1) * d]);
            self.evict_values.extend_from_slice(&v[h * d..(h + 1) * d]);
        }
        self.out.resize(tokens * g * d, 0.0);
        self.lse.resize(tokens * g, 0.0);
        self.touched.resize(tokens * g, 0);
        self.blocks.resize(tokens * g, 0);
    }
}

/// The number of tokens of a step of `queries` evicting `ek`, `ev` with
/// `policy` (see [`WorkerPool::submit`]), if the shapes fit the store
/// configured by `cfg`.
fn check_step(
    cfg: &LayerConfig,
    queries: &[f32],
    ek: &[bf16],
    ev: &[bf16],
    policy: Policy,
) -> Result<usize, CpuError> {
    let (nkv, g, d) = (cfg.n_kv_heads, cfg.group, cfg.head_dim);
    let row = nkv * g * d;
    if !queries.len().is_multiple_of(row) {
        return Err(CpuError::Shape(format!(
            "queries has {} values, not a multiple of {row}",
            queries.len()
        )));
    }
    if ek.len() != ev.len() || !ek.len().is_multiple_of(nkv * d) {
        return Err(CpuError::Shape(format!(
            "evicted rows: {} keys and {} values, rows of {}",
            ek.len(),
            ev.len(),
            nkv * d
        )));
    }
    if matches!(policy, Policy::Lsh(_)) && cfg.lsh.is_none() {
        return Err(CpuError::Config(
            "policy lsh needs a store with an LSH index".into(),
        ));
    }
    Ok(queries.len() / row)
}

struct Task {
    slot: usize,
    store: Arc<LayerStore>,
    kv_head: usize,
    attend: Attend,
    buf: GroupBuf,
    reply: Sender<Reply>,
    panic_for_test: bool,
}

type Reply = (usize, GroupBuf, Result<(), CpuError>);

/// One layer's offloaded-attention results for every query head, and the
/// channel they arrive on. Reuse one per (sequence, layer) or per sequence:
/// its buffers are kept across steps.
pub struct LayerOutput {
    /// `[tokens][n_q_heads][head_dim]`, each head normalised within the offloaded part.
    pub out: Vec<f32>,
    /// `[tokens][n_q_heads]` log-sum-exp (`-inf` when no key was used).
    pub lse: Vec<f32>,
    /// `[tokens][n_q_heads]` keys touched.
    pub keys_touched: Vec<u32>,
    /// `[tokens][n_q_heads]` blocks of [`crate::BOUND_BLOCK`] keys scanned,
    /// of `store.len().div_ceil(BOUND_BLOCK)`: every block for policies that
    /// read every key (dense, top-k, oracle), the blocks whose keys were read
    /// for the group (the same for each of its heads) under the threshold
    /// policy, and under LSH the blocks holding a key retrieved for the head.
    pub blocks_scanned: Vec<u32>,
    /// Worker time spent in LSH retrieval (hashing + collision counting), summed
    /// over kv heads, nanoseconds.
    pub retrieval_cpu_ns: u64,
    /// Worker time spent in whole tasks (eviction included), summed over kv
    /// heads, nanoseconds.
    pub total_cpu_ns: u64,
    /// The workers' own CPU time in those tasks, nanoseconds: `total_cpu_ns`
    /// less the time other threads (a CPU device's, say) held their cores.
    pub on_cpu_ns: u64,
    bufs: Vec<GroupBuf>,
    reply_tx: Sender<Reply>,
    reply_rx: Receiver<Reply>,
    /// Tasks sent and not yet received.
    pending: usize,
    /// (tokens, n_kv_heads, group, head_dim) of the step in flight.
    shape: (usize, usize, usize, usize),
}

impl Default for LayerOutput {
    fn default() -> Self {
        let (reply_tx, reply_rx) = unbounded();
        LayerOutput {
            out: Vec::new(),
            lse: Vec::new(),
            keys_touched: Vec::new(),
            blocks_scanned: Vec::new(),
            retrieval_cpu_ns: 0,
            total_cpu_ns: 0,
            on_cpu_ns: 0,
            bufs: Vec::new(),
            reply_tx,
            reply_rx,
            pending: 0,
            shape: (0, 0, 0, 0),
        }
    }
}

impl LayerOutput {
    /// Whether a step was submitted and not yet waited for.
    pub fn is_pending(&self) -> bool {
        self.pending > 0
    }
}

/// A pool of worker threads pinned to cores. Dropping it stops the workers.
pub struct WorkerPool {
    tx: Option<Sender<Task>>,
    handles: Vec<JoinHandle<()>>,
    /// Fault injection: the next task panics (see [`WorkerPool::inject_panic`]).
    panic_next: std::sync::atomic::AtomicBool,
}

impl WorkerPool {
    /// Starts `threads` workers (at least 1), pinned round-robin to the cores
    /// `core_affinity` reports (unpinned if it reports none).
    pub fn new(threads: usize) -> Result<Self, CpuError> {
        let (tx, task_rx) = unbounded::<Task>();
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let task_rx = task_rx.clone();
            let core = if cores.is_empty() {
                None
            } else {
                Some(cores[i % cores.len()])
            };
            let h = std::thread::Builder::new()
                .name(format!("tandem-cpu-{i}"))
                .spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    worker(task_rx)
                })
                .map_err(|e| CpuError::Worker(format!("spawn: {e}")))?;
            handles.push(h);
        }
        Ok(WorkerPool {
            tx: Some(tx),
            handles,
            panic_next: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Fault injection for tests of the layers above: the next task submitted
    /// panics in its worker (which survives), so its step fails with
    /// [`CpuError::Worker`].
    pub fn inject_panic(&self) {
        self.panic_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Number of workers.
    pub fn threads(&self) -> usize {
        self.handles.len()
    }

    /// Attends the offloaded part of one (sequence, layer) and waits: `queries`
    /// is `[tokens][n_kv_heads * group][head_dim]` (query head `h` belongs to kv
    /// head `h / group`), with `policy` (a [`Policy`] alone takes the exact
    /// softmax; an [`Attend`] names its own). Any worker failure (error or
    /// panic) becomes the returned error.
    pub fn run_layer(
        &self,
        store: &Arc<LayerStore>,
        queries: &[f32],
        policy: impl Into<Attend>,
        output: &mut LayerOutput,
    ) -> Result<(), CpuError> {
        self.submit(store, queries, None, policy, output)?;
        self.wait(output)
    }

    /// Starts a step on the workers and returns at once; [`WorkerPool::wait`]
    /// collects it. First, on the worker of each kv head, `evicted` rows
    /// (`keys`, `values`: `[n][n_kv_heads][head_dim]`) are appended to the
    /// store and hashed; then every token of `queries` (as in
    /// [`WorkerPool::run_layer`]; may be empty) attends the whole store.
    pub fn submit(
        &self,
        store: &Arc<LayerStore>,
        queries: &[f32],
        evicted: Option<(&[bf16], &[bf16])>,
        policy: impl Into<Attend>,
        output: &mut LayerOutput,
    ) -> Result<(), CpuError> {
        let inject = self
            .panic_next
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        self.submit_inner(store, queries, evicted, policy.into(), output, inject)
    }

    fn submit_inner(
        &self,
        store: &Arc<LayerStore>,
        queries: &[f32],
        evicted: Option<(&[bf16], &[bf16])>,
        attend: Attend,
        output: &mut LayerOutput,
        panic_for_test: bool,
    ) -> Result<(), CpuError> {
        if output.pending > 0 {
            return Err(CpuError::Config(
                "a step is already in flight on this output; wait for it first".into(),
            ));
        }
        let cfg = store.config();
        let (nkv, g, d) = (cfg.n_kv_heads, cfg.group, cfg.head_dim);
        let (ek, ev) = evicted.unwrap_or((&[], &[]));
        let tokens = check_step(cfg, queries, ek, ev, attend.policy)?;
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| CpuError::Worker("pool stopped".into()))?;
        output.shape = (tokens, nkv, g, d);
        output.bufs.resize_with(nkv, GroupBuf::default);
        for h in 0..nkv {
            let mut buf = std::mem::take(&mut output.bufs[h]);
            buf.load(cfg, h, queries, ek, ev);
            let task = Task {
                slot: h,
                store: Arc::clone(store),
                kv_head: h,
                attend: attend.for_kv_head(h),
                buf,
                reply: output.reply_tx.clone(),
                panic_for_test: panic_for_test && h == 0,
            };
            if let Err(e) = tx.send(task) {
                output.bufs[h] = e.into_inner().buf;
                // Collect what was already sent so the output stays usable.
                let _ = self.wait(output);
                return Err(CpuError::Worker("workers gone".into()));
            }
            output.pending += 1;
        }
        Ok(())
    }

    /// Waits for the step submitted on `output` and gathers its results into
    /// `output.out`, `output.lse`, `output.keys_touched` and
    /// `output.blocks_scanned`. Returns the first
    /// worker failure, after every task of the step has come back.
    pub fn wait(&self, output: &mut LayerOutput) -> Result<(), CpuError> {
        let (tokens, nkv, g, d) = output.shape;
        let nq = nkv * g;
        output.out.resize(tokens * nq * d, 0.0);
        output.lse.resize(tokens * nq, 0.0);
        output.keys_touched.resize(tokens * nq, 0);
        output.blocks_scanned.resize(tokens * nq, 0);
        output.retrieval_cpu_ns = 0;
        output.total_cpu_ns = 0;
        output.on_cpu_ns = 0;
        let mut first_err = None;
        while output.pending > 0 {
            // The output holds a sender itself, so this never disconnects; a
            // worker that dies mid-task still replies (it catches panics).
            let (slot, buf, res) = output
                .reply_rx
                .recv()
                .map_err(|_| CpuError::Worker("workers gone".into()))?;
            output.pending -= 1;
            if let Err(e) = res {
                first_err.get_or_insert(e);
            }
            for t in 0..tokens {
                let (o, b) = (t * nq + slot * g, t * g);
                output.out[o * d..(o + g) * d].copy_from_slice(&buf.out[b * d..(b + g) * d]);
                output.lse[o..o + g].copy_from_slice(&buf.lse[b..b + g]);
                output.keys_touched[o..o + g].copy_from_slice(&buf.touched[b..b + g]);
                output.blocks_scanned[o..o + g].copy_from_slice(&buf.blocks[b..b + g]);
            }
            output.retrieval_cpu_ns += buf.retrieval_ns;
            output.total_cpu_ns += buf.total_ns;
            output.on_cpu_ns += buf.on_cpu_ns;
            output.bufs[slot] = buf;
        }
        first_err.map_or(Ok(()), Err)
    }
}

fn run_task(task: &mut Task, scratch: &mut Scratch) -> Result<(), CpuError> {
    if task.panic_for_test {
        panic!("injected worker panic");
    }
    let (g, d) = (task.store.config().group, task.store.config().head_dim);
    let mut head = task.store.head(task.kv_head)?;
    let buf = &mut task.buf;
    buf.query_bits.clear();
    if !buf.evict_keys.is_empty() {
        // With LSH, the evicted keys and the queries are hashed in one pass.
        let queries = match task.attend.policy {
            Policy::Lsh(_) => &buf.q[..],
            _ => &[],
        };
        head.append_hashing(
            &buf.evict_keys,
            &buf.evict_values,
            queries,
            &mut buf.query_bits,
        )?;
    }
    // Empty when the queries were not hashed here: retrieval hashes them.
    let per_group = buf.query_bits.len() / (buf.q.len() / (g * d)).max(1);
    buf.retrieval_ns = 0;
    for (i, ((((q, out), lse), touched), blocks)) in buf
        .q
        .chunks_exact(g * d)
        .zip(buf.out.chunks_exact_mut(g * d))
        .zip(buf.lse.chunks_exact_mut(g))
        .zip(buf.touched.chunks_exact_mut(g))
        .zip(buf.blocks.chunks_exact_mut(g))
        .enumerate()
    {
        let query_bits = buf
            .query_bits
            .get(i * per_group..(i + 1) * per_group)
            .filter(|b| !b.is_empty());
        let parts = Partials {
            out,
            lse,
            touched,
            blocks,
        };
        buf.retrieval_ns += attend_group(&head, d, q, query_bits, &task.attend, scratch, parts)?;
    }
    Ok(())
}

fn worker(rx: Receiver<Task>) {
    let mut scratch = Scratch::default();
    while let Ok(mut task) = rx.recv() {
        let (t0, cpu0) = (std::time::Instant::now(), ThreadTime::now());
        let res = match catch_unwind(AssertUnwindSafe(|| run_task(&mut task, &mut scratch))) {
            Ok(r) => r,
            Err(p) => {
                scratch = Scratch::default();
                Err(CpuError::Worker(
                    p.downcast_ref::<&str>()
                        .map(|s| format!("worker panicked: {s}"))
                        .unwrap_or_else(|| "worker panicked".into()),
                ))
            }
        };
        task.buf.total_ns = t0.elapsed().as_nanos() as u64;
        task.buf.on_cpu_ns = cpu0.elapsed().as_nanos() as u64;
        // The caller may have dropped its output; nothing to do then.
        let _ = task.reply.send((task.slot, task.buf, res));
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.tx = None;
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn worker_panic_is_an_error_not_a_hang_and_pool_recovers() {
        let cfg = LayerConfig {
            n_kv_heads: 2,
            group: 2,
            head_dim: 4,
            lsh: None,
            seed: 1,
            layer: 0,
            kv_dtype: crate::config::KvDtype::BF16,
            sketch: 0,
        };
        let mut st = LayerStore::new(cfg).expect("cfg");
        let kv: Vec<bf16> = (0..3 * 2 * 4)
            .map(|i| bf16::from_f32(i as f32 * 0.1))
            .collect();
        st.load_prefill(&kv, &kv, 1).expect("load");
        let st = Arc::new(st);
        let pool = WorkerPool::new(2).expect("pool");
        let q = vec![0.5f32; 16];
        let mut out = LayerOutput::default();
        let r = pool
            .submit_inner(&st, &q, None, Policy::Dense.into(), &mut out, true)
            .and_then(|()| pool.wait(&mut out));
        assert!(
            matches!(r, Err(CpuError::Worker(ref m)) if m.contains("panicked")),
            "{r:?}"
        );
        pool.run_layer(&st, &q, Policy::Dense, &mut out)
            .expect("recovers");
        assert!(out.lse.iter().all(|x| x.is_finite()));
        assert!(pool
            .run_layer(&st, &q[..3], Policy::Dense, &mut out)
            .is_err());
    }
}
