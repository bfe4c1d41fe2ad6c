//! The attention benchmark behind `tandem bench attention`: the CPU attention
//! engine against dense on realistic shapes, measured in one run.
//!
//! Keys and values are **generated** (no model weights are used): per kv head,
//! keys are Gaussian noise plus a rotary-like component (pairs of channels
//! `(j, j + d/2)` rotating with position at RoPE frequencies `10000^(-2j/d)`),
//! four outlier channels with a large constant offset, and 32 heavy-hitter
//! positions whose keys point along the group's mean query direction (so
//! attention is peaked, as in real long-context heads). Values are Gaussian.
//! Queries are the group's mean direction plus per-head noise.

use half::bf16;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;
use tandem_cpu::{
    store_bytes_per_key, Attend, KvDtype, LayerConfig, LayerOutput, LayerStore, Policy, PolicySpec,
    PrefillTimes, WorkerPool, BOUND_BLOCK,
};
use tandem_kernels::rng::SplitMix64;
use tandem_runtime::memory::MemoryBudget;

/// Benchmark errors.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Unknown model shape.
    #[error("unknown shape {0:?} (known: llama3.1-8b, smollm2-135m)")]
    Shape(String),
    /// Bad option value.
    #[error("bad option: {0}")]
    Option(String),
    /// The engine failed.
    #[error(transparent)]
    Cpu(#[from] tandem_cpu::CpuError),
    /// Refused by the memory budget.
    #[error(transparent)]
    Runtime(#[from] tandem_runtime::Error),
}

/// Options of [`run_attention_bench`].
#[derive(Debug, Clone)]
pub struct AttentionBenchOptions {
    /// Offloaded tokens per layer.
    pub context: usize,
    /// `llama3.1-8b` or `smollm2-135m`.
    pub shape: String,
    /// Policy strings, see [`PolicySpec`].
    pub policies: Vec<String>,
    /// Worker threads.
    pub threads: usize,
    /// Data and hyperplane seed.
    pub seed: u64,
    /// Timed iterations (the median is reported), after one warm-up.
    pub iterations: usize,
    /// Distinct generated layers, each with its own stores, attended in turn
    /// in every iteration. With 1 the layer's rows and index stay in cache
    /// between iterations (a warm figure); with enough layers that their stores
    /// exceed the last-level cache (8 at 96k with llama3.1-8b, ~600 MB each)
    /// every layer is read cold, as in a decode step.
    pub layers: usize,
    /// The memory the generated layers may take (default: the memory
    /// available, see [`MemoryBudget::system`]).
    pub memory_limit: Option<u64>,
}

/// One policy's per-layer figures.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionBenchResult {
    /// Policy string.
    pub policy: String,
    /// Offloaded tokens.
    pub context: usize,
    /// Worker threads.
    pub threads: usize,
    /// Model shape name.
    pub shape: String,
    /// How keys/values were generated.
    pub kv_source: String,
    /// Retrieval wall ms per layer (wall time split by the workers' retrieval share).
    pub retrieval_ms: f64,
    /// Attention wall ms per layer (the rest of the step).
    pub attention_ms: f64,
    /// Dense attention wall ms per layer, same run.
    pub dense_ms: f64,
    /// Distinct layers attended in turn (see [`AttentionBenchOptions::layers`]).
    pub layers: usize,
    /// Mean over query heads of keys touched / context.
    pub keys_touched_fraction: f64,
    /// Mean over query heads of the blocks of [`BOUND_BLOCK`] keys scanned /
    /// all blocks: 1 for dense, top-k and oracle (they read every key), the
    /// blocks whose bound reached the threshold for `threshold`, and for
    /// `lsh` the blocks holding a key retrieved for the head.
    pub blocks_scanned_fraction: f64,
    /// Index bytes per token per layer.
    pub index_bytes_per_token: f64,
    /// K+V bytes per token per layer, as the store holds them.
    pub kv_bytes_per_token: f64,
    /// Bulk index build seconds for one layer: centring, hashing and
    /// bucketing the keys already in the store (what MagicPIG's "hashing +
    /// sorting" does).
    pub index_build_s: f64,
    /// Seconds copying the layer's K/V rows into the store before that,
    /// faulting in its pages (the same for every policy, `dense` included).
    pub store_fill_s: f64,
    /// Seconds building the per-block key bounds of one layer (every store
    /// keeps them; the threshold policy reads them).
    pub bounds_build_s: f64,
}

const KV_SOURCE: &str = "generated: gaussian keys + rotary-like channel pairs + 4 outlier channels + 32 heavy hitters aligned with the group query; gaussian values";

/// Approximately N(0,1): the sum of 4 uniform 16-bit pieces of one draw, rescaled.
fn gauss(rng: &mut SplitMix64) -> f32 {
    let r = rng.next_u64();
    let s: u32 = (0..4).map(|i| ((r >> (16 * i)) & 0xFFFF) as u32).sum();
    (s as f32 / 65535.0 - 2.0) * 1.732
}

fn shape(name: &str) -> Result<(usize, usize, usize), BenchError> {
    match name {
        "llama3.1-8b" => Ok((8, 4, 128)),
        "smollm2-135m" => Ok((3, 3, 64)),
        _ => Err(BenchError::Shape(name.into())),
    }
}

/// Generates `(keys, values, queries)` for one layer: keys/values
/// `[n][nkv][d]` bf16, queries `[nkv*g][d]` f32.
fn generate(
    n: usize,
    nkv: usize,
    g: usize,
    d: usize,
    seed: u64,
) -> (Vec<bf16>, Vec<bf16>, Vec<f32>) {
    let mut rng = SplitMix64(seed);
    let mut dirs = vec![0.0f32; nkv * d];
    for h in 0..nkv {
        let v: Vec<f32> = (0..d).map(|_| gauss(&mut rng)).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        for j in 0..d {
            dirs[h * d + j] = v[j] / norm;
        }
    }
    let half = d / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|j| 10000f32.powf(-2.0 * j as f32 / d as f32))
        .collect();
    let mut keys = vec![bf16::ZERO; n * nkv * d];
    let mut values = vec![bf16::ZERO; n * nkv * d];
    let heavy: Vec<usize> = (0..32)
        .map(|_| (rng.next_u64() % n.max(1) as u64) as usize)
        .collect();
    for t in 0..n {
        for h in 0..nkv {
            let o = (t * nkv + h) * d;
            for j in 0..half {
                let (s, c) = (t as f32 * freqs[j]).sin_cos();
                let a = 1.5 * ((h + j) % 3) as f32 / 2.0;
                keys[o + j] = bf16::from_f32(gauss(&mut rng) + a * c);
                keys[o + j + half] = bf16::from_f32(gauss(&mut rng) + a * s);
            }
            for j in 0..4.min(d) {
                let c = (j * 7 + h) % d;
                keys[o + c] = bf16::from_f32(keys[o + c].to_f32() + 6.0);
            }
            for j in 0..d {
                values[o + j] = bf16::from_f32(gauss(&mut rng));
            }
        }
    }
    for &t in &heavy {
        for h in 0..nkv {
            let o = (t * nkv + h) * d;
            for j in 0..d {
                keys[o + j] = bf16::from_f32(dirs[h * d + j] * 3.0 * (d as f32).sqrt());
            }
        }
    }
    let mut queries = vec![0.0f32; nkv * g * d];
    for h in 0..nkv {
        for i in 0..g {
            for j in 0..d {
                queries[(h * g + i) * d + j] =
                    dirs[h * d + j] * 2.0 * (d as f32).sqrt() + 0.7 * gauss(&mut rng);
            }
        }
    }
    (keys, values, queries)
}

/// Per attended layer: wall ms, retrieval ms, fraction of keys touched,
/// fraction of blocks scanned.
type Timings = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

/// The mean of `counts` over `of` each.
fn mean_fraction(counts: &[u32], of: f64) -> f64 {
    counts.iter().map(|&x| f64::from(x)).sum::<f64>() / (counts.len() as f64 * of)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Refuses generated layers (f32 keys and values, and the stores of the
/// largest policy) beyond the memory budget.
fn check_memory(
    opts: &AttentionBenchOptions,
    specs: &[(&String, PolicySpec)],
    nkv: usize,
    d: usize,
) -> Result<(), BenchError> {
    let store = specs
        .iter()
        .map(|(_, s)| store_bytes_per_key(s.kv_dtype, s.lsh, d))
        .max()
        .unwrap_or(0);
    let per_key = (8 * d + store) as u64 * nkv as u64;
    let need = per_key
        .checked_mul(opts.context as u64)
        .and_then(|n| n.checked_mul(opts.layers as u64));
    let budget = opts
        .memory_limit
        .map_or_else(MemoryBudget::system, MemoryBudget::given);
    let what = format!("{} layers of {} keys", opts.layers, opts.context);
    Ok(budget.check(&what, need)?)
}

/// Runs the attention benchmark for every policy on one generated layer.
pub fn run_attention_bench(
    opts: &AttentionBenchOptions,
) -> Result<Vec<AttentionBenchResult>, BenchError> {
    let (nkv, g, d) = shape(&opts.shape)?;
    if opts.context == 0 {
        return Err(BenchError::Option("context must be > 0".into()));
    }
    if opts.threads == 0 || opts.iterations == 0 || opts.layers == 0 {
        return Err(BenchError::Option(
            "threads, iterations and layers must be > 0".into(),
        ));
    }
    let specs: Vec<(&String, PolicySpec)> = opts
        .policies
        .iter()
        .map(|p| Ok((p, p.parse()?)))
        .collect::<Result<_, BenchError>>()?;
    check_memory(opts, &specs, nkv, d)?;
    let data: Vec<_> = (0..opts.layers as u64)
        .map(|layer| generate(opts.context, nkv, g, d, opts.seed.wrapping_add(layer)))
        .collect();
    let pool = WorkerPool::new(opts.threads)?;
    let mut out = LayerOutput::default();
    let n = opts.context as f64;
    let blocks = opts.context.div_ceil(BOUND_BLOCK) as f64;
    let base_cfg = LayerConfig {
        n_kv_heads: nkv,
        group: g,
        head_dim: d,
        lsh: None,
        seed: opts.seed,
        layer: 0,
        kv_dtype: KvDtype::BF16,
        sketch: 0,
    };
    // Every layer's stores of one policy, and the time to build the first.
    let build = |cfg: &LayerConfig| -> Result<(Vec<Arc<LayerStore>>, PrefillTimes), BenchError> {
        let mut stores = Vec::new();
        let mut first = None;
        for (layer, (keys, values, _)) in data.iter().enumerate() {
            let mut store = LayerStore::new(LayerConfig {
                layer: layer as u32,
                ..cfg.clone()
            })?;
            let times = store.load_prefill(keys, values, opts.threads)?;
            first.get_or_insert(times);
            stores.push(Arc::new(store));
        }
        let first = first.ok_or_else(|| BenchError::Option("layers must be > 0".into()))?;
        Ok((stores, first))
    };
    // One warm-up round, then `iterations` rounds over every layer; each
    // call's wall time, the retrieval share of it and the keys touched.
    let time = |stores: &[Arc<LayerStore>],
                policy: Attend,
                out: &mut LayerOutput|
     -> Result<Timings, BenchError> {
        let (mut wall, mut ret, mut touched) = (Vec::new(), Vec::new(), Vec::new());
        let mut scanned = Vec::new();
        for round in 0..=opts.iterations {
            for (store, (_, _, queries)) in stores.iter().zip(&data) {
                let s = Instant::now();
                pool.run_layer(store, queries, policy, out)?;
                if round == 0 {
                    continue;
                }
                let w = s.elapsed().as_secs_f64() * 1e3;
                let share = if out.total_cpu_ns > 0 {
                    out.retrieval_cpu_ns as f64 / out.total_cpu_ns as f64
                } else {
                    0.0
                };
                wall.push(w);
                ret.push(w * share);
                touched.push(mean_fraction(&out.keys_touched, n));
                scanned.push(mean_fraction(&out.blocks_scanned, blocks));
            }
        }
        Ok((wall, ret, touched, scanned))
    };
    let (dense_stores, _) = build(&base_cfg)?;
    let mut results = Vec::new();
    for (name, spec) in specs {
        let dense_ms = median(time(&dense_stores, Policy::Dense.into(), &mut out)?.0);
        let cfg = LayerConfig {
            lsh: spec.lsh,
            kv_dtype: spec.kv_dtype,
            sketch: spec.policy.sketch_rank(d),
            ..base_cfg.clone()
        };
        let (stores, times) = build(&cfg)?;
        let index_bytes = stores[0].index_bytes() as f64 / n;
        let kv_bytes = stores[0].kv_bytes() as f64 / n;
        let attend = Attend {
            policy: spec.policy,
            softmax: spec.softmax,
            exact_heads: 0,
        };
        let (wall, ret, touched, scanned) = time(&stores, attend, &mut out)?;
        drop(stores);
        let wall_m = median(wall);
        let ret_m = median(ret).min(wall_m);
        results.push(AttentionBenchResult {
            policy: name.clone(),
            context: opts.context,
            threads: pool.threads(),
            shape: opts.shape.clone(),
            kv_source: KV_SOURCE.into(),
            layers: opts.layers,
            retrieval_ms: ret_m,
            attention_ms: wall_m - ret_m,
            dense_ms,
            keys_touched_fraction: median(touched),
            blocks_scanned_fraction: median(scanned),
            index_bytes_per_token: index_bytes,
            kv_bytes_per_token: kv_bytes,
            index_build_s: times.index_s,
            store_fill_s: times.rows_s,
            bounds_build_s: times.bounds_s,
        });
    }
    Ok(results)
}

/// A human-readable table of results.
pub fn format_table(results: &[AttentionBenchResult]) -> String {
    let mut s = String::new();
    if let Some(r) = results.first() {
        s += &format!(
            "attention bench: shape {}, context {}, threads {}, {}\nkv: {}\n",
            r.shape,
            r.context,
            r.threads,
            match r.layers {
                1 => "1 layer (warm cache)".to_string(),
                n => format!("{n} layers in turn (each read cold if they exceed the cache)"),
            },
            r.kv_source
        );
    }
    s += &format!(
        "{:<32} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10} {:>10} {:>9} {:>8} {:>8}\n",
        "policy",
        "retr ms",
        "attn ms",
        "dense ms",
        "touched",
        "blocks",
        "idx B/tok",
        "kv B/tok",
        "build s",
        "fill s",
        "bound s"
    );
    for r in results {
        s += &format!(
            "{:<32} {:>10.3} {:>10.3} {:>10.3} {:>8.3}% {:>8.2}% {:>10.1} {:>10.1} {:>9.3} {:>8.3} {:>8.4}\n",
            r.policy,
            r.retrieval_ms,
            r.attention_ms,
            r.dense_ms,
            r.keys_touched_fraction * 100.0,
            r.blocks_scanned_fraction * 100.0,
            r.index_bytes_per_token,
            r.kv_bytes_per_token,
            r.index_build_s,
            r.store_fill_s,
            r.bounds_build_s
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_beyond_the_memory_budget_are_refused_before_generating() {
        let opts = AttentionBenchOptions {
            context: 98304,
            shape: "llama3.1-8b".into(),
            policies: vec!["lsh:k=10,l=75".into()],
            threads: 1,
            seed: 1,
            iterations: 1,
            layers: 100_000,
            memory_limit: Some(64 << 30),
        };
        let err = run_attention_bench(&opts).expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("100000 layers") && text.contains("68.7 GB"),
            "{text}"
        );
    }

    #[test]
    fn small_bench_runs_and_serializes() {
        let opts = AttentionBenchOptions {
            context: 3000,
            shape: "smollm2-135m".into(),
            policies: vec![
                "dense".into(),
                "lsh:k=6,l=40".into(),
                "topk:k=64".into(),
                "threshold:eps=0.01".into(),
            ],
            threads: 2,
            seed: 1,
            iterations: 2,
            layers: 2,
            memory_limit: None,
        };
        let r = run_attention_bench(&opts).expect("bench");
        assert_eq!(r.len(), 4);
        assert!((r[0].keys_touched_fraction - 1.0).abs() < 1e-9);
        assert!((r[0].blocks_scanned_fraction - 1.0).abs() < 1e-9);
        assert!(r[3].blocks_scanned_fraction > 0.0 && r[3].blocks_scanned_fraction <= 1.0);
        assert!(r[1].keys_touched_fraction > 0.0 && r[1].keys_touched_fraction < 1.0);
        assert!(r[1].index_bytes_per_token > 0.0);
        let j = serde_json::to_value(&r[1]).expect("json");
        for f in [
            "policy",
            "context",
            "retrieval_ms",
            "attention_ms",
            "dense_ms",
            "keys_touched_fraction",
            "index_bytes_per_token",
            "kv_bytes_per_token",
            "index_build_s",
            "store_fill_s",
            "blocks_scanned_fraction",
            "bounds_build_s",
            "threads",
            "shape",
            "kv_source",
            "layers",
        ] {
            assert!(j.get(f).is_some(), "{f}");
        }
        assert!(format_table(&r).contains("lsh:k=6,l=40"));
        assert!(run_attention_bench(&AttentionBenchOptions {
            shape: "x".into(),
            ..opts.clone()
        })
        .is_err());
        assert!(run_attention_bench(&AttentionBenchOptions { layers: 0, ..opts }).is_err());
    }
}
