//! The `tandem eval` driver: every policy against dense on the same model,
//! text and needle cases, through the split decode step.
//!
//! Per context N, the first N − `scored` tokens of the corpus are prefilled
//! once, densely (as MagicPIG does: approximation is for decoding); each policy
//! then forks that state, offloads, and decodes the last `scored` tokens
//! teacher-forced, with per-layer probes comparing its attention output with
//! exact attention over the same keys. Needle cases are prefilled once each
//! and answered greedily by dense and by every policy.

use std::path::PathBuf;
use std::sync::Arc;

use tandem_cpu::WorkerPool;
use tandem_gpu::CpuDevice;
use tandem_kernels::ops::argmax;

use crate::eval::corpus;
use crate::eval::metrics::AgreementAccumulator;
use crate::eval::needle::{NeedleBuilder, ANSWER_TOKENS};
use crate::eval::probe::Probes;
use crate::eval::report::{LayerRow, Row};
use tandem_runtime::model::Logits;
use tandem_runtime::policy::{LayerAttention, PolicyConfig, PolicyTable};
use tandem_runtime::split::SequenceKv;
use tandem_runtime::{Engine, EngineOptions, PREFILL_CHUNK};
use tandem_runtime::{Error, Result};

/// Options of [`run_eval`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Model file or directory.
    pub model: PathBuf,
    /// Policies compared with dense (`dense` itself may be listed).
    pub policies: Vec<String>,
    /// Context lengths.
    pub contexts: Vec<usize>,
    /// Teacher-forced positions scored at the end of each context.
    pub scored: usize,
    /// Needle cases per context (0: skip the needle task).
    pub needle_cases: usize,
    /// Window, sinks and dense layers shared by every policy. Its `dense_below`
    /// is ignored: the policies apply at every context measured.
    pub base: PolicyConfig,
    /// Dense-device threads.
    pub threads: usize,
    /// CPU attention workers.
    pub cpu_workers: usize,
}

/// Runs every measure; `note` receives progress lines.
pub fn run_eval(opts: &EvalOptions, note: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    if opts.policies.is_empty() || opts.contexts.is_empty() || opts.scored == 0 {
        return Err(Error::InvalidRequest(
            "eval needs at least one policy, one context and one scored position".into(),
        ));
    }
    let engine = Engine::load(
        &opts.model,
        &EngineOptions {
            threads: opts.threads,
            cpu_workers: opts.cpu_workers,
            policy: PolicyConfig {
                policy: "dense".into(),
                ..opts.base.clone()
            },
        },
    )?;
    let model = engine.model();
    let c = model.config();
    let pool = Arc::new(WorkerPool::new(opts.cpu_workers)?);
    // Tables first, so a bad policy fails before any long run.
    let tables: Vec<Arc<PolicyTable>> = opts
        .policies
        .iter()
        .map(|p| {
            if p == "dense" {
                return Ok(Arc::new(PolicyTable::dense(c.n_layers)));
            }
            PolicyConfig {
                policy: p.clone(),
                dense_below: opts.base.sinks + opts.base.window,
                ..opts.base.clone()
            }
            .resolve(c.n_layers)
            .map(Arc::new)
        })
        .collect::<Result<_>>()?;
    let text = corpus::load()?;
    let tokens = engine.tokenizer().encode(&text, false)?;
    let mut rows = Vec::new();
    for &n in &opts.contexts {
        if n > tokens.len() || n > c.context_length {
            return Err(Error::InvalidRequest(format!(
                "context {n} exceeds the corpus ({} tokens) or the model's context ({})",
                tokens.len(),
                c.context_length
            )));
        }
        if n <= opts.scored + opts.base.sinks + opts.base.window {
            return Err(Error::InvalidRequest(format!(
                "context {n} is too short to score {} positions beyond the device window",
                opts.scored
            )));
        }
        note(&format!("context {n}: dense prefill and reference"));
        let (prefix, scored) = tokens[..n].split_at(n - opts.scored);
        let mut base = model.new_cache()?;
        let mut last = Vec::new();
        for chunk in prefix.chunks(PREFILL_CHUNK) {
            last = model.forward(chunk, &mut base, Logits::Last)?;
        }
        // Logits predicting scored[i] come after scored[i - 1] (or the prefix).
        let teacher_forced = |kv: &mut SequenceKv<CpuDevice>| -> Result<Vec<Vec<f32>>> {
            let mut out = vec![last.clone()];
            for &t in &scored[..scored.len() - 1] {
                kv.offload_if_due(opts.threads)?;
                out.push(model.forward(&[t], kv, Logits::Last)?);
            }
            Ok(out)
        };
        let mut dense_kv = base.fork(Arc::new(PolicyTable::dense(c.n_layers)), None)?;
        let dense_logits = teacher_forced(&mut dense_kv)?;
        drop(dense_kv);
        for (p, table) in opts.policies.iter().zip(&tables) {
            let mut kv = base.fork(Arc::clone(table), Some(Arc::clone(&pool)))?;
            kv.offload_if_due(opts.threads)?;
            let probes = Probes::new(c.n_layers);
            let shared = probes.shared();
            kv.set_observer(Some(Box::new(probes)));
            let logits = teacher_forced(&mut kv)?;
            let mut acc = AgreementAccumulator::new();
            for ((d, l), &t) in dense_logits.iter().zip(&logits).zip(scored) {
                acc.push(d, l, t)?;
            }
            let label = match &opts.base.layout {
                Some(layout) if p != "dense" => format!("{layout}/{p}"),
                _ => p.clone(),
            };
            let mut row = Row::new(label, n, &acc.finish()?);
            kv.set_observer(None);
            let counters = kv.take_counters();
            let probes = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let (device_bytes, cpu_bytes) = kv.bytes();
            row.device_bytes_per_token = device_bytes as f64 / kv.positions() as f64;
            if counters.blocks_offloaded > 0 {
                row.blocks_scanned_fraction =
                    counters.blocks_scanned as f64 / counters.blocks_offloaded as f64;
            }
            row.cpu_bytes_per_token = cpu_bytes as f64 / kv.positions() as f64;
            // Keys touched over all layers: dense layers and the device window
            // count in full, offloaded keys as the workers report.
            let mut fractions = Vec::with_capacity(c.n_layers);
            for (layer, probe) in probes.iter().enumerate() {
                let source = table.source(layer);
                let (device, cpu) = kv.layer_tokens(source);
                let f = if probe.samples > 0 {
                    probe.touched_fraction / probe.samples as f64
                } else if cpu == 0 && table.layers[source].attention != LayerAttention::Dense {
                    device as f64 / kv.positions() as f64
                } else {
                    1.0
                };
                fractions.push(f);
                row.per_layer.push(LayerRow {
                    layer,
                    rel_l2_error: if probe.samples > 0 {
                        probe.rel_l2_error / probe.samples as f64
                    } else {
                        0.0
                    },
                    cosine: if probe.samples > 0 {
                        probe.cosine / probe.samples as f64
                    } else {
                        1.0
                    },
                    keys_touched_fraction: f,
                });
            }
            row.keys_touched_fraction = fractions.iter().sum::<f64>() / fractions.len() as f64;
            note(&format!(
                "context {n} {p}: top-1 {:.3}, mean KL {:.4}, ppl {:.2} (dense {:.2}), keys touched {:.2}%",
                row.top1_agreement,
                row.mean_kl,
                row.ppl,
                row.dense_ppl,
                100.0 * row.keys_touched_fraction
            ));
            rows.push(row);
        }
        if opts.needle_cases > 0 {
            let builder = NeedleBuilder::new(
                engine.tokenizer(),
                engine.chat_template(),
                &text,
                0x6e65_6564,
            )?;
            let cases = builder.cases(n, opts.needle_cases)?;
            let first = rows.len() - opts.policies.len();
            let mut dense_hits = 0;
            let mut hits = vec![0usize; opts.policies.len()];
            for (i, case) in cases.iter().enumerate() {
                let mut prefill = model.new_cache()?;
                let mut logits = Vec::new();
                for chunk in case.prompt.chunks(PREFILL_CHUNK) {
                    logits = model.forward(chunk, &mut prefill, Logits::Last)?;
                }
                let answer = |kv: &mut SequenceKv<CpuDevice>| -> Result<String> {
                    let mut l = logits.clone();
                    let mut ids = Vec::new();
                    for _ in 0..ANSWER_TOKENS {
                        let t = argmax(&l).unwrap_or(0) as u32;
                        if engine.tokenizer().is_end_of_turn(t) {
                            break;
                        }
                        ids.push(t);
                        kv.offload_if_due(opts.threads)?;
                        l = model.forward(&[t], kv, Logits::Last)?;
                    }
                    engine.tokenizer().decode(&ids)
                };
                let mut dense_kv = prefill.fork(Arc::new(PolicyTable::dense(c.n_layers)), None)?;
                dense_hits += usize::from(case.is_answered_by(&answer(&mut dense_kv)?));
                drop(dense_kv);
                for (j, table) in tables.iter().enumerate() {
                    let mut kv = prefill.fork(Arc::clone(table), Some(Arc::clone(&pool)))?;
                    kv.offload_if_due(opts.threads)?;
                    hits[j] += usize::from(case.is_answered_by(&answer(&mut kv)?));
                }
                note(&format!(
                    "context {n}: needle case {}/{}",
                    i + 1,
                    cases.len()
                ));
            }
            let total = cases.len() as f64;
            for (j, row) in rows[first..].iter_mut().enumerate() {
                row.needle_cases = cases.len();
                row.needle_accuracy = Some(hits[j] as f64 / total);
                row.dense_needle_accuracy = Some(dense_hits as f64 / total);
            }
        }
    }
    Ok(rows)
}
