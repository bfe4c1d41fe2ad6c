//! The decode benchmark behind `tandem bench decode`: per-token latency after a
//! context of N tokens, for a policy and for `dense` in the same run, split
//! into the dense device's time, the CPU workers' time and the time the
//! device waited for them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tandem_cpu::WorkerPool;
use tandem_gpu::{CpuDevice, DenseDevice};
use tandem_kernels::ops::argmax;
use tandem_kernels::rng::SplitMix64;

use tandem_runtime::memory::{context_bytes, MemoryBudget};
use tandem_runtime::model::{Config, Llama, Logits, Step};
use tandem_runtime::policy::{PolicyConfig, PolicyTable};
use tandem_runtime::split::{LayerFidelity, SequenceKv, StepCounters, PROBE_STEPS};
use tandem_runtime::{Engine, EngineOptions, PREFILL_CHUNK};
use tandem_runtime::{Error, Result};

/// Where the model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A model file or directory; contexts come from a real prefill of real text.
    Model(PathBuf),
    /// A named shape (`llama3.1-8b`) with generated weights and a generated KV
    /// cache (no model runs over the context).
    Shape(String),
}

/// Options of [`run_decode_bench`].
#[derive(Debug, Clone)]
pub struct DecodeBenchOptions {
    /// The model.
    pub source: ModelSource,
    /// Context lengths (tokens before the timed decode).
    pub contexts: Vec<usize>,
    /// The policy configuration measured (beside `dense`).
    pub policy: PolicyConfig,
    /// Sequences decoded together.
    pub batch: usize,
    /// Timed decode steps (after one untimed step).
    pub tokens: usize,
    /// Dense-device threads.
    pub threads: usize,
    /// CPU attention workers.
    pub cpu_workers: usize,
    /// Text that fills real contexts (tokenized, repeated as needed).
    pub fill_text: String,
    /// Seed of generated weights and keys.
    pub seed: u64,
    /// With a model, contexts longer than this are filled with generated keys
    /// and values instead of a prefill (which grows quadratically).
    pub prefill_max: usize,
    /// The memory the contexts may take (default: the memory available, see
    /// [`MemoryBudget::system`]).
    pub memory_limit: Option<u64>,
}

/// One (policy, context) measurement. Times are per decode step; every
/// sequence of the batch gets one token per step.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeBenchResult {
    /// The model (`general.name`) or generated shape.
    pub model: String,
    pub policy: String,
    pub context: usize,
    pub batch: usize,
    /// Wall time of one step, averaged over the timed steps.
    pub ms_per_token: f64,
    /// Median wall time of one step.
    pub median_ms_per_token: f64,
    /// Wall time of every timed step, in order (the first steps after the
    /// context is built run colder than the rest).
    pub step_ms: Vec<f64>,
    /// CPU workers' busy time of every timed step, divided by the number of workers.
    pub step_cpu_attention_ms: Vec<f64>,
    /// The median of `step_cpu_attention_ms`: a single slow step (this
    /// machine's neighbours) moves the mean, not the median.
    pub median_cpu_attention_ms_per_token: f64,
    /// Tokens per second over the batch.
    pub tokens_per_s: f64,
    /// Step time not spent waiting for the CPU workers.
    pub device_ms_per_token: f64,
    /// CPU workers' busy time per step, divided by the number of workers.
    pub cpu_attention_ms_per_token: f64,
    /// The workers' own CPU time in `cpu_attention_ms_per_token`: less where
    /// other threads (a CPU device's) held their cores.
    pub cpu_attention_on_cpu_ms_per_token: f64,
    /// The part of `cpu_attention_ms_per_token` spent in LSH retrieval.
    pub cpu_retrieval_ms_per_token: f64,
    /// Time the device waited for the workers per step.
    pub wait_ms_per_token: f64,
    /// Offloaded keys touched / offloaded keys, over sparse layers and query heads.
    pub keys_touched_fraction: f64,
    /// Offloaded blocks of 64 keys scanned / held, over the same.
    pub blocks_scanned_fraction: f64,
    /// Bytes held on the device / by the CPU workers per sequence, per token of context.
    pub device_bytes_per_token: f64,
    pub cpu_bytes_per_token: f64,
    /// Seconds to build the context (prefill or generation, plus offload and indexing).
    pub context_build_s: f64,
    pub synthetic_kv: bool,
    pub synthetic_weights: bool,
    pub threads: usize,
    pub cpu_workers: usize,
    /// The dense device, as it names itself.
    pub device: String,
    /// The layers with kv heads the fidelity check sent to exact attention
    /// during the untimed probe steps (they attend exactly in every timed
    /// step).
    pub exact_layers: Vec<usize>,
    /// How many kv heads of those layers attend exactly.
    pub exact_kv_heads: u32,
}

/// The known generated shapes.
pub fn shape_config(name: &str) -> Result<Config> {
    match name {
        "llama3.1-8b" => Ok(Config::llama(
            32, 4096, 14336, 32, 8, 128_256, 500_000.0, 131_072,
        )),
        _ => Err(Error::InvalidRequest(format!(
            "unknown shape {name:?} (known: llama3.1-8b)"
        ))),
    }
}

/// Runs the benchmark on the CPU device; `note` receives progress lines.
pub fn run_decode_bench(
    opts: &DecodeBenchOptions,
    note: &mut dyn FnMut(&str),
) -> Result<Vec<DecodeBenchResult>> {
    run_decode_bench_on(opts, CpuDevice::new(opts.threads.max(1)), note)
}

/// Runs the benchmark with `device` as the dense device.
pub fn run_decode_bench_on<D: DenseDevice>(
    opts: &DecodeBenchOptions,
    device: D,
    note: &mut dyn FnMut(&str),
) -> Result<Vec<DecodeBenchResult>> {
    if opts.batch == 0 || opts.tokens == 0 || opts.threads == 0 || opts.cpu_workers == 0 {
        return Err(Error::InvalidRequest(
            "batch, tokens, threads and cpu workers must be at least 1".into(),
        ));
    }
    if opts.contexts.is_empty() {
        return Err(Error::InvalidRequest("no context length given".into()));
    }
    // The configuration measured, named by its policy (and layout), then dense.
    let measured = match &opts.policy.layout {
        Some(layout) => format!("{layout}/{}", opts.policy.policy),
        None => opts.policy.policy.clone(),
    };
    let mut policies = vec![measured];
    if policies[0] != "dense" {
        policies.push("dense".into());
    }
    let mut results = Vec::new();
    match &opts.source {
        ModelSource::Model(path) => {
            let engine = Engine::load_on(
                path,
                device,
                &EngineOptions {
                    threads: opts.threads,
                    cpu_workers: opts.cpu_workers,
                    policy: PolicyConfig {
                        policy: "dense".into(),
                        ..opts.policy.clone()
                    },
                    memory_limit: opts.memory_limit,
                    ..EngineOptions::default()
                },
            )?;
            let model = engine.model();
            check_memory(opts, model.config(), true)?;
            let pool = Arc::new(worker_pool(opts.cpu_workers)?);
            let fill = engine.tokenizer().encode(&opts.fill_text, false)?;
            if fill.is_empty() {
                return Err(Error::InvalidRequest("the fill text is empty".into()));
            }
            for &n in &opts.contexts {
                if n.saturating_add(opts.tokens) >= model.config().context_length {
                    note(&format!(
                        "context {n} + {} tokens is beyond the model's trained {}: speed only, the text it writes is meaningless",
                        opts.tokens,
                        model.config().context_length
                    ));
                }
                let synthetic = n > opts.prefill_max;
                let start = Instant::now();
                let mut base = model.new_cache()?;
                let mut first = 1;
                if synthetic {
                    let c = model.config().clone();
                    note(&format!(
                        "context {n} is above --prefill-max {}: generated keys and values (synthetic KV), real weights",
                        opts.prefill_max
                    ));
                    base.fill(n, opts.threads, |layer, k, v| {
                        synthetic_kv(&c, n, opts.seed ^ layer as u64, k, v)
                    })?;
                } else {
                    let prompt: Vec<u32> = fill.iter().cycle().take(n.max(1)).copied().collect();
                    let mut logits = Vec::new();
                    for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
                        logits = model.forward(chunk, &mut base, Logits::Last)?;
                        if i % 16 == 15 {
                            note(&format!(
                                "prefill {}/{} tokens",
                                (i + 1) * PREFILL_CHUNK,
                                prompt.len()
                            ));
                        }
                    }
                    first = argmax(&logits).unwrap_or(0) as u32;
                }
                let prefill_s = start.elapsed().as_secs_f64();
                note(&format!("context of {n} tokens built in {prefill_s:.1} s"));
                for p in &policies {
                    let table = Arc::new(table_for(
                        &opts.policy,
                        p,
                        &model.config().sliding_windows(),
                    )?);
                    let start = Instant::now();
                    let mut seqs = Vec::with_capacity(opts.batch);
                    for _ in 0..opts.batch {
                        let mut kv = base.fork(Arc::clone(&table), Some(Arc::clone(&pool)))?;
                        kv.offload_if_due(opts.threads)?;
                        seqs.push(kv);
                    }
                    let build_s = prefill_s + start.elapsed().as_secs_f64();
                    let mut r =
                        time_decode(model, &mut seqs, first, p, n, opts, build_s, synthetic)?;
                    r.synthetic_weights = false;
                    note(&summary(&r));
                    results.push(r);
                }
            }
        }
        ModelSource::Shape(name) => {
            let config = shape_config(name)?;
            check_memory(opts, &config, false)?;
            note(&format!(
                "{name}: generating weights (synthetic: one 4-bit layer shared by all {} layers)",
                config.n_layers
            ));
            let model = Llama::synthetic(config, device, opts.seed)?;
            let pool = Arc::new(worker_pool(opts.cpu_workers)?);
            let c = model.config().clone();
            // Generated keys carry no text: their attention is flat noise,
            // which no sampled layer passes, so the check would measure dense.
            let unchecked = PolicyConfig {
                fidelity_check: 0.0,
                ..opts.policy.clone()
            };
            if opts.policy.fidelity_check > 0.0 {
                note("generated keys: the fidelity check is off (on them every sampled layer would attend exactly)");
            }
            for &n in &opts.contexts {
                for p in &policies {
                    let table = Arc::new(table_for(&unchecked, p, &c.sliding_windows())?);
                    let start = Instant::now();
                    let mut seqs = Vec::with_capacity(opts.batch);
                    for b in 0..opts.batch {
                        let mut kv = SequenceKv::new(
                            Arc::clone(model.device()),
                            c.n_layers,
                            c.attention_shape(),
                            Arc::clone(&table),
                            Some(Arc::clone(&pool)),
                        )?;
                        let seed = opts.seed ^ (b as u64) << 40;
                        kv.fill(n, opts.threads, |layer, k, v| {
                            synthetic_kv(&c, n, seed ^ layer as u64, k, v)
                        })?;
                        seqs.push(kv);
                    }
                    let build_s = start.elapsed().as_secs_f64();
                    note(&format!(
                        "{p}: generated and offloaded a {n}-token KV cache for {} sequence(s) in {build_s:.1} s",
                        opts.batch
                    ));
                    let r = time_decode(&model, &mut seqs, 1, p, n, opts, build_s, true)?;
                    note(&summary(&r));
                    results.push(r);
                }
            }
        }
    }
    Ok(results)
}

/// Refuses contexts beyond the memory budget: the batch's sequences at
/// their longest under the measured table or dense, whichever holds more,
/// and, `with_base`, the dense context they are forked from.
fn check_memory(opts: &DecodeBenchOptions, config: &Config, with_base: bool) -> Result<()> {
    let budget = opts
        .memory_limit
        .map_or_else(MemoryBudget::system, MemoryBudget::given);
    let windows = config.sliding_windows();
    let measured = opts.policy.resolve(&windows)?;
    let dense = PolicyTable::dense(&windows);
    let shape = config.attention_shape();
    for &n in &opts.contexts {
        let longest = n.saturating_add(opts.tokens).saturating_add(1);
        let need = (|| {
            let sequences = context_bytes(&measured, shape, longest, opts.batch)?
                .max(context_bytes(&dense, shape, longest, opts.batch)?);
            let base = if with_base {
                context_bytes(&dense, shape, n, 1)?
            } else {
                0
            };
            sequences.checked_add(base)
        })();
        let what = format!("a context of {n} tokens for {} sequence(s)", opts.batch);
        budget.check(&what, need)?;
    }
    Ok(())
}

fn worker_pool(threads: usize) -> Result<WorkerPool> {
    Ok(WorkerPool::new(threads)?)
}

/// `part / whole`, 0 when nothing is held.
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The table of a configuration named as in `run_decode_bench`: `dense` is
/// the baseline, anything else the measured configuration.
fn table_for(base: &PolicyConfig, name: &str, windows: &[Option<usize>]) -> Result<PolicyTable> {
    if name == "dense" {
        return Ok(PolicyTable::dense(windows));
    }
    base.resolve(windows)
}

/// The layers with kv heads the fidelity check sent to exact attention, and
/// how many such heads there are.
fn exact_layers(fidelity: &[LayerFidelity]) -> (Vec<usize>, u32) {
    let exact = fidelity
        .iter()
        .enumerate()
        .filter(|(_, f)| f.exact_heads() != 0);
    let heads = fidelity.iter().map(|f| f.exact_heads().count_ones()).sum();
    (exact.map(|(layer, _)| layer).collect(), heads)
}

fn summary(r: &DecodeBenchResult) -> String {
    format!(
        "{} at {}: {:.2} ms/step (median {:.2}, first {:.2}; {:.1} tokens/s); device {:.2} ms, CPU workers {:.2} ms (median {:.2}; {:.2} on the CPU; retrieval {:.2}), waiting {:.2} ms",
        r.policy,
        r.context,
        r.ms_per_token,
        r.median_ms_per_token,
        r.step_ms.first().copied().unwrap_or(0.0),
        r.tokens_per_s,
        r.device_ms_per_token,
        r.cpu_attention_ms_per_token,
        r.median_cpu_attention_ms_per_token,
        r.cpu_attention_on_cpu_ms_per_token,
        r.cpu_retrieval_ms_per_token,
        r.wait_ms_per_token
    ) + &match r.exact_layers.is_empty() {
        true => String::new(),
        false => format!(
            "; {} kv heads of layers {:?} exact (fidelity check)",
            r.exact_kv_heads, r.exact_layers
        ),
    }
}

/// The middle value of `values` (the upper one of an even count); 0 for none.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

#[allow(clippy::too_many_arguments)]
fn time_decode<D: DenseDevice>(
    model: &Llama<D>,
    seqs: &mut [SequenceKv<D>],
    first: u32,
    policy: &str,
    context: usize,
    opts: &DecodeBenchOptions,
    context_build_s: f64,
    synthetic: bool,
) -> Result<DecodeBenchResult> {
    let mut next = vec![first; seqs.len()];
    let run_step = |seqs: &mut [SequenceKv<D>], next: &mut [u32]| -> Result<()> {
        let mut steps: Vec<Step<D>> = seqs
            .iter_mut()
            .zip(next.iter())
            .map(|(kv, t)| Step {
                tokens: std::slice::from_ref(t),
                kv,
                want: Logits::Last,
            })
            .collect();
        let logits = model.forward_batch(&mut steps)?;
        for (n, l) in next.iter_mut().zip(&logits) {
            *n = argmax(l).unwrap_or(0) as u32;
        }
        Ok(())
    };
    // One untimed step warms caches and both pools; the fidelity check's
    // probe steps, a one-off after each prompt, run untimed too.
    run_step(seqs, &mut next)?;
    for _ in 0..PROBE_STEPS {
        if !seqs
            .iter()
            .any(|kv| kv.fidelity().iter().any(LayerFidelity::is_probing))
        {
            break;
        }
        run_step(seqs, &mut next)?;
    }
    let (exact_layers, exact_kv_heads) = exact_layers(&seqs[0].fidelity());
    for kv in seqs.iter_mut() {
        kv.take_counters();
    }
    let start = Instant::now();
    let mut step_ms = Vec::with_capacity(opts.tokens);
    let mut step_cpu_ms = Vec::with_capacity(opts.tokens);
    let mut c = StepCounters::default();
    for _ in 0..opts.tokens {
        let step_start = Instant::now();
        run_step(seqs, &mut next)?;
        step_ms.push(step_start.elapsed().as_secs_f64() * 1e3);
        let mut worker_ns = 0;
        for kv in seqs.iter_mut() {
            let s = kv.take_counters();
            worker_ns += s.worker_ns;
            c.wait_ns += s.wait_ns;
            c.worker_ns += s.worker_ns;
            c.worker_on_cpu_ns += s.worker_on_cpu_ns;
            c.retrieval_ns += s.retrieval_ns;
            c.keys_touched += s.keys_touched;
            c.keys_offloaded += s.keys_offloaded;
            c.blocks_scanned += s.blocks_scanned;
            c.blocks_offloaded += s.blocks_offloaded;
        }
        step_cpu_ms.push(worker_ns as f64 / 1e6 / opts.cpu_workers as f64);
    }
    let wall = start.elapsed().as_secs_f64();
    let median_ms_per_token = median(&step_ms);
    let median_cpu_attention_ms_per_token = median(&step_cpu_ms);
    let steps = opts.tokens as f64;
    let ms = wall * 1e3 / steps;
    let wait_ms = c.wait_ns as f64 / 1e6 / steps;
    let (device_bytes, cpu_bytes) = seqs[0].bytes();
    let tokens_held = seqs[0].positions() as f64;
    Ok(DecodeBenchResult {
        model: model.config().name.clone(),
        policy: policy.to_string(),
        context,
        batch: seqs.len(),
        ms_per_token: ms,
        median_ms_per_token,
        step_ms,
        step_cpu_attention_ms: step_cpu_ms,
        median_cpu_attention_ms_per_token,
        tokens_per_s: seqs.len() as f64 * steps / wall,
        device_ms_per_token: ms - wait_ms,
        cpu_attention_ms_per_token: c.worker_ns as f64 / 1e6 / steps / opts.cpu_workers as f64,
        cpu_attention_on_cpu_ms_per_token: c.worker_on_cpu_ns as f64
            / 1e6
            / steps
            / opts.cpu_workers as f64,
        cpu_retrieval_ms_per_token: c.retrieval_ns as f64 / 1e6 / steps / opts.cpu_workers as f64,
        wait_ms_per_token: wait_ms,
        keys_touched_fraction: ratio(c.keys_touched, c.keys_offloaded),
        blocks_scanned_fraction: ratio(c.blocks_scanned, c.blocks_offloaded),
        device_bytes_per_token: device_bytes as f64 / tokens_held,
        cpu_bytes_per_token: cpu_bytes as f64 / tokens_held,
        context_build_s,
        synthetic_kv: synthetic,
        synthetic_weights: synthetic,
        threads: opts.threads,
        device: model.device().name(),
        exact_layers,
        exact_kv_heads,
        cpu_workers: opts.cpu_workers,
    })
}

/// Generated keys and values of one layer, `n × n_kv_heads × head_dim` each:
/// keys are noise plus a rotary-like component (channel pairs rotating with
/// position at RoPE frequencies), a few outlier channels and 32 heavy-hitter
/// positions per head sharing one direction; values are noise.
fn synthetic_kv(c: &Config, n: usize, seed: u64, k: &mut Vec<f32>, v: &mut Vec<f32>) {
    let (nkv, d) = (c.n_kv_heads, c.head_dim);
    let half = d / 2;
    let mut rng = SplitMix64(seed);
    let freqs: Vec<f32> = (0..half)
        .map(|j| c.rope_base.powf(-2.0 * j as f32 / d as f32))
        .collect();
    k.resize(n * nkv * d, 0.0);
    v.resize(n * nkv * d, 0.0);
    for t in 0..n {
        for h in 0..nkv {
            let o = (t * nkv + h) * d;
            for j in 0..half {
                let (s, co) = (t as f32 * freqs[j]).sin_cos();
                let a = 1.5 * ((h + j) % 3) as f32 / 2.0;
                k[o + j] = 1.7 * rng.signed_f32() + a * co;
                k[o + j + half] = 1.7 * rng.signed_f32() + a * s;
            }
            for j in 0..4.min(d) {
                k[o + (j * 7 + h) % d] += 6.0;
            }
            for x in &mut v[o..o + d] {
                *x = 1.7 * rng.signed_f32();
            }
        }
    }
    for h in 0..nkv {
        let dir: Vec<f32> = (0..d).map(|_| rng.signed_f32()).collect();
        let norm = dir.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
        for _ in 0..32 {
            let t = (rng.next_u64() % n.max(1) as u64) as usize;
            let o = (t * nkv + h) * d;
            for j in 0..d {
                k[o + j] = dir[j] / norm * 3.0 * (d as f32).sqrt();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_is_the_middle_step_and_ignores_one_slow_step() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[90.0, 95.0, 240.0, 92.0]), 95.0);
        assert_eq!(median(&[]), 0.0);
    }
}
