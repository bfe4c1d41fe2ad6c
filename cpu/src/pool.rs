//! The pinned worker pool: one task per (layer store, kv head), fed through a
//! crossbeam channel; results come back on another. Each worker owns its
//! scratch, so steady-state steps do not allocate in the workers.

use crate::attention::{attend_group, HeadOutput, Policy, Scratch};
use crate::store::LayerStore;
use crate::CpuError;
use crossbeam::channel::{unbounded, Receiver, Sender};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

/// Buffers of one GQA group, moved to a worker and back (no copies, no allocation).
#[derive(Default)]
struct GroupBuf {
    q: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
    touched: Vec<u32>,
    retrieval_ns: u64,
    total_ns: u64,
}

struct Task {
    slot: usize,
    store: Arc<RwLock<LayerStore>>,
    kv_head: usize,
    policy: Policy,
    buf: GroupBuf,
    panic_for_test: bool,
}

type Reply = (usize, GroupBuf, Result<(), String>);

/// Results of one layer for all query heads (reused across steps).
#[derive(Default)]
pub struct LayerOutput {
    /// `[n_q_heads][head_dim]`, each head normalised within the offloaded part.
    pub out: Vec<f32>,
    /// Per query head log-sum-exp (`-inf` when no key was used).
    pub lse: Vec<f32>,
    /// Per query head number of keys touched.
    pub keys_touched: Vec<u32>,
    /// Worker time spent in LSH retrieval (hashing + collision counting), summed
    /// over kv heads, nanoseconds.
    pub retrieval_cpu_ns: u64,
    /// Worker time spent in whole tasks, summed over kv heads, nanoseconds.
    pub total_cpu_ns: u64,
    bufs: Vec<GroupBuf>,
}

impl LayerOutput {
    /// The partial of query head `h`, as an owned [`HeadOutput`].
    pub fn head(&self, h: usize) -> Option<HeadOutput> {
        let d = self.out.len() / self.lse.len().max(1);
        Some(HeadOutput {
            out: self.out.get(h * d..(h + 1) * d)?.to_vec(),
            lse: *self.lse.get(h)?,
            keys_touched: *self.keys_touched.get(h)?,
        })
    }
}

/// A pool of worker threads pinned to cores. Dropping it stops the workers.
pub struct WorkerPool {
    tx: Option<Sender<Task>>,
    rx: Receiver<Reply>,
    handles: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// Starts `threads` workers (at least 1), pinned round-robin to the cores
    /// `core_affinity` reports (unpinned if it reports none).
    pub fn new(threads: usize) -> Result<Self, CpuError> {
        let (tx, task_rx) = unbounded::<Task>();
        let (reply_tx, rx) = unbounded::<Reply>();
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let task_rx = task_rx.clone();
            let reply_tx = reply_tx.clone();
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
                    worker(task_rx, reply_tx)
                })
                .map_err(|e| CpuError::Worker(format!("spawn: {e}")))?;
            handles.push(h);
        }
        Ok(WorkerPool {
            tx: Some(tx),
            rx,
            handles,
        })
    }

    /// Number of workers.
    pub fn threads(&self) -> usize {
        self.handles.len()
    }

    /// Attends the offloaded part of one (sequence, layer): `queries` is
    /// `[n_kv_heads * group][head_dim]` (query head `h` belongs to kv head
    /// `h / group`). Blocks until every kv head is done; any worker failure
    /// (error or panic) becomes the returned error.
    pub fn run_layer(
        &mut self,
        store: &Arc<RwLock<LayerStore>>,
        queries: &[f32],
        policy: Policy,
        output: &mut LayerOutput,
    ) -> Result<(), CpuError> {
        self.run_layer_inner(store, queries, policy, output, false)
    }

    fn run_layer_inner(
        &mut self,
        store: &Arc<RwLock<LayerStore>>,
        queries: &[f32],
        policy: Policy,
        output: &mut LayerOutput,
        panic_for_test: bool,
    ) -> Result<(), CpuError> {
        let cfg = store
            .read()
            .map_err(|_| CpuError::Worker("store lock poisoned".into()))?
            .config()
            .clone();
        let (nkv, g, d) = (cfg.n_kv_heads, cfg.group, cfg.head_dim);
        if queries.len() != nkv * g * d {
            return Err(CpuError::Shape(format!(
                "queries has {} values, expected {}",
                queries.len(),
                nkv * g * d
            )));
        }
        if let Policy::Lsh(p) = policy {
            if cfg.lsh.is_none() {
                return Err(CpuError::Config(
                    "policy lsh needs a store with an LSH index".into(),
                ));
            }
            if p.t == 0 {
                return Err(CpuError::Config("lsh t must be >= 1".into()));
            }
        }
        output.out.resize(nkv * g * d, 0.0);
        output.lse.resize(nkv * g, 0.0);
        output.keys_touched.resize(nkv * g, 0);
        output.bufs.resize_with(nkv, GroupBuf::default);
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| CpuError::Worker("pool stopped".into()))?;
        for h in 0..nkv {
            let mut buf = std::mem::take(&mut output.bufs[h]);
            buf.q.clear();
            buf.q
                .extend_from_slice(&queries[h * g * d..(h + 1) * g * d]);
            buf.out.resize(g * d, 0.0);
            buf.lse.resize(g, 0.0);
            buf.touched.resize(g, 0);
            let task = Task {
                slot: h,
                store: Arc::clone(store),
                kv_head: h,
                policy,
                buf,
                panic_for_test: panic_for_test && h == 0,
            };
            tx.send(task)
                .map_err(|_| CpuError::Worker("workers gone".into()))?;
        }
        output.retrieval_cpu_ns = 0;
        output.total_cpu_ns = 0;
        let mut first_err = None;
        for _ in 0..nkv {
            let (slot, buf, res) = self
                .rx
                .recv()
                .map_err(|_| CpuError::Worker("workers gone".into()))?;
            if let Err(e) = res {
                first_err.get_or_insert(e);
            }
            let o = slot * g;
            output.out[o * d..(o + g) * d].copy_from_slice(&buf.out);
            output.lse[o..o + g].copy_from_slice(&buf.lse);
            output.keys_touched[o..o + g].copy_from_slice(&buf.touched);
            output.retrieval_cpu_ns += buf.retrieval_ns;
            output.total_cpu_ns += buf.total_ns;
            output.bufs[slot] = buf;
        }
        match first_err {
            Some(e) => Err(CpuError::Worker(e)),
            None => Ok(()),
        }
    }
}

fn worker(rx: Receiver<Task>, tx: Sender<Reply>) {
    let mut scratch = Scratch::default();
    while let Ok(mut task) = rx.recv() {
        let t0 = std::time::Instant::now();
        let res = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
            if task.panic_for_test {
                panic!("injected worker panic");
            }
            let store = task
                .store
                .read()
                .map_err(|_| "store lock poisoned".to_string())?;
            let d = store.config().head_dim;
            let head = store
                .heads
                .get(task.kv_head)
                .ok_or("kv head out of range")?;
            let GroupBuf {
                q,
                out,
                lse,
                touched,
                retrieval_ns,
                ..
            } = &mut task.buf;
            attend_group(
                head,
                d,
                q,
                &task.policy,
                &mut scratch,
                out,
                lse,
                touched,
                retrieval_ns,
            )
        }));
        let res = match res {
            Ok(r) => r,
            Err(p) => {
                scratch = Scratch::default();
                Err(p
                    .downcast_ref::<&str>()
                    .map(|s| format!("worker panicked: {s}"))
                    .unwrap_or_else(|| "worker panicked".into()))
            }
        };
        task.buf.total_ns = t0.elapsed().as_nanos() as u64;
        if tx.send((task.slot, task.buf, res)).is_err() {
            return;
        }
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
    use crate::store::LayerConfig;
    use half::bf16;

    #[test]
    fn worker_panic_is_an_error_not_a_hang_and_pool_recovers() {
        let cfg = LayerConfig {
            n_kv_heads: 2,
            group: 2,
            head_dim: 4,
            lsh: None,
            lsh_t: 2,
            seed: 1,
            layer: 0,
        };
        let mut st = LayerStore::new(cfg).expect("cfg");
        let kv: Vec<bf16> = (0..3 * 2 * 4)
            .map(|i| bf16::from_f32(i as f32 * 0.1))
            .collect();
        st.load_prefill(&kv, &kv, 1).expect("load");
        let st = Arc::new(RwLock::new(st));
        let mut pool = WorkerPool::new(2).expect("pool");
        let q = vec![0.5f32; 16];
        let mut out = LayerOutput::default();
        let r = pool.run_layer_inner(&st, &q, Policy::Dense, &mut out, true);
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
