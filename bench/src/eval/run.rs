//! The `tandem eval` driver: every policy against dense on the same model,
//! text and needle cases, through the split decode step.
//!
//! Per context N, the first N − `scored` tokens of the corpus are prefilled
//! once, densely (as MagicPIG does: approximation is for decoding); each policy
//! then forks that state, offloads, and decodes the last `scored` tokens
//! teacher-forced, with per-layer probes comparing its attention output with
//! exact attention over the same keys. Needle cases are prefilled once each
//! and answered greedily by dense and by every policy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_cpu::WorkerPool;
use tandem_gpu::{CpuDevice, DenseDevice};
use tandem_kernels::ops::argmax;

use crate::eval::corpus;
use crate::eval::docqa::{self, DocQaRow, Question, REPLY_TOKENS};
use crate::eval::metrics::AgreementAccumulator;
use crate::eval::needle::{NeedleBuilder, NeedleTask, ANSWER_TOKENS};
use crate::eval::probe::HeadProbe;
use crate::eval::probe::Probes;
use crate::eval::report::{HeadRow, LayerRow, NeedleScore, Row};
use tandem_runtime::model::{Llama, Logits};
use tandem_runtime::policy::{LayerAttention, PolicyConfig, PolicyTable};
use tandem_runtime::split::SequenceKv;
use tandem_runtime::{Engine, EngineOptions, PREFILL_CHUNK};
use tandem_runtime::{Error, Result};

/// Options of [`run_eval`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Model file or directory.
    pub model: PathBuf,
    /// Policies compared with dense (`dense` itself may be listed), each a
    /// policy string or the path of a TOML policy file (ending in `.toml`).
    pub policies: Vec<String>,
    /// Context lengths.
    pub contexts: Vec<usize>,
    /// Teacher-forced positions scored at the end of each context.
    pub scored: usize,
    /// Needle cases per context and task (0: skip the needle tasks).
    pub needle_cases: usize,
    /// The needle tasks posed at each context.
    pub needle_tasks: Vec<NeedleTask>,
    /// Window, sinks and dense layers shared by every policy. Its `dense_below`
    /// is ignored: the policies apply at every context measured.
    pub base: PolicyConfig,
    /// Dense-device threads.
    pub threads: usize,
    /// CPU attention workers.
    pub cpu_workers: usize,
    /// With `Some(top)`, each sparse layer's kv heads are diagnosed (see
    /// [`tandem_cpu::HeadMass`]) with safety sets of `top` keys.
    pub diagnose: Option<usize>,
}

/// Runs every measure on the CPU device; `note` receives progress lines.
pub fn run_eval(opts: &EvalOptions, note: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    check_eval(opts)?;
    let engine = load_engine(opts, CpuDevice::new(opts.threads.max(1)))?;
    run_eval_with(opts, &engine, note)
}

fn check_eval(opts: &EvalOptions) -> Result<()> {
    if opts.policies.is_empty() || opts.contexts.is_empty() || opts.scored == 0 {
        return Err(Error::InvalidRequest(
            "eval needs at least one policy, one context and one scored position".into(),
        ));
    }
    Ok(())
}

/// Runs every measure with `engine` (from [`load_engine`]).
pub fn run_eval_with<D: DenseDevice>(
    opts: &EvalOptions,
    engine: &Engine<D>,
    note: &mut dyn FnMut(&str),
) -> Result<Vec<Row>> {
    check_eval(opts)?;
    let tables = tables(opts, engine)?;
    let model = engine.model();
    let c = model.config();
    let pool = Arc::new(WorkerPool::new(opts.cpu_workers)?);
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
        let (base, last) = prefill_dense(model, prefix)?;
        let teacher_forced =
            |kv: &mut SequenceKv<D>| teacher_force(model, kv, &last, scored, opts.threads);
        let mut dense_kv = base.fork(Arc::new(PolicyTable::dense(&c.sliding_windows())), None)?;
        let dense_logits = teacher_forced(&mut dense_kv)?;
        drop(dense_kv);
        for (p, table) in opts.policies.iter().zip(&tables) {
            let mut kv = base.fork(Arc::clone(table), Some(Arc::clone(&pool)))?;
            kv.offload_if_due(opts.threads)?;
            let probes = Probes::new(c.n_layers, opts.diagnose);
            let shared = probes.shared();
            let shared_heads = probes.shared_heads();
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
            row.model = c.name.clone();
            kv.set_observer(None);
            let counters = kv.take_counters();
            let probes = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let heads = shared_heads.lock().unwrap_or_else(|e| e.into_inner());
            row.per_head = head_rows(&heads);
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
            let mut offloaded = Vec::new();
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
                if probe.samples > 0 {
                    offloaded.push(probe.offloaded_touched_fraction / probe.samples as f64);
                }
                let mean = |sum: f64| (probe.samples > 0).then(|| sum / probe.samples as f64);
                row.per_layer.push(LayerRow {
                    layer,
                    rel_l2_error: mean(probe.rel_l2_error),
                    cosine: mean(probe.cosine),
                    keys_touched_fraction: f,
                });
            }
            row.keys_touched_fraction = fractions.iter().sum::<f64>() / fractions.len() as f64;
            row.offloaded_touched_fraction =
                offloaded.iter().sum::<f64>() / offloaded.len().max(1) as f64;
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
            if engine.chat_template().is_completion() {
                note("the model has no chat template: needle prompts are completions");
            }
            let builder = NeedleBuilder::new(
                engine.tokenizer(),
                engine.chat_template(),
                &text,
                0x6e65_6564,
            )?;
            let first = rows.len() - opts.policies.len();
            for &task in &opts.needle_tasks {
                let cases = builder
                    .clone()
                    .with_task(task)
                    .cases(n, opts.needle_cases)?;
                let prompts: Vec<&[u32]> = cases.iter().map(|c| &c.prompt[..]).collect();
                let mut progress = |i: usize| {
                    note(&format!(
                        "context {n}: {} needle case {}/{}",
                        task.name(),
                        i + 1,
                        cases.len()
                    ))
                };
                let answers = answer_all(
                    engine,
                    &tables,
                    &pool,
                    opts.threads,
                    &prompts,
                    ANSWER_TOKENS,
                    &mut progress,
                )?;
                let hits = |replies: &[String]| {
                    replies
                        .iter()
                        .zip(&cases)
                        .filter(|(r, c)| c.is_answered_by(r))
                        .count() as f64
                        / cases.len() as f64
                };
                let dense = hits(&answers.dense);
                for (row, replies) in rows[first..].iter_mut().zip(&answers.policies) {
                    let score = NeedleScore {
                        task: task.name().into(),
                        cases: cases.len(),
                        accuracy: hits(replies),
                        dense_accuracy: dense,
                    };
                    if task == NeedleTask::Single {
                        row.needle_cases = score.cases;
                        row.needle_accuracy = Some(score.accuracy);
                        row.dense_needle_accuracy = Some(score.dense_accuracy);
                    }
                    row.needles.push(score);
                }
            }
        }
    }
    Ok(rows)
}

/// `prefix` prefilled densely, in chunks, with the logits after its last token.
pub(crate) fn prefill_dense<D: DenseDevice>(
    model: &Llama<D>,
    prefix: &[u32],
) -> Result<(SequenceKv<D>, Vec<f32>)> {
    let mut kv = model.new_cache()?;
    let mut last = Vec::new();
    for chunk in prefix.chunks(PREFILL_CHUNK) {
        last = model.forward(chunk, &mut kv, Logits::Last)?;
    }
    Ok((kv, last))
}

/// Decodes `scored` teacher-forced through `kv`, offloading when due: the
/// logits predicting each of its tokens, `last` (the prefill's) first.
pub(crate) fn teacher_force<D: DenseDevice>(
    model: &Llama<D>,
    kv: &mut SequenceKv<D>,
    last: &[f32],
    scored: &[u32],
    threads: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut out = vec![last.to_vec()];
    for &t in scored.iter().take(scored.len().saturating_sub(1)) {
        kv.offload_if_due(threads)?;
        out.push(model.forward(&[t], kv, Logits::Last)?);
    }
    Ok(out)
}

/// The diagnosed kv heads' means, a row per (layer, kv head) probed.
fn head_rows(heads: &[Vec<HeadProbe>]) -> Vec<HeadRow> {
    let mut rows = Vec::new();
    for (layer, probes) in heads.iter().enumerate() {
        for (kv_head, p) in probes.iter().enumerate() {
            if p.samples == 0 {
                continue;
            }
            let n = p.samples as f64;
            let per_missed = |x: f64| {
                if p.lsh_missed > 0.0 {
                    x / p.lsh_missed
                } else {
                    0.0
                }
            };
            rows.push(HeadRow {
                layer,
                kv_head,
                offloaded_mass: p.offloaded / n,
                tail_mass: p.tail / n,
                lsh_missed: p.lsh_missed / n,
                lsh_missed_with_top: p.lsh_missed_with_top / n,
                missed_norm_rank: per_missed(p.missed_norm_rank),
                missed_cos: per_missed(p.missed_cos),
            });
        }
    }
    rows
}

/// The engine of `opts` (its model, dense) on `device`.
pub fn load_engine<D: DenseDevice>(opts: &EvalOptions, device: D) -> Result<Engine<D>> {
    Engine::load_on(
        &opts.model,
        device,
        &EngineOptions {
            threads: opts.threads,
            cpu_workers: opts.cpu_workers,
            policy: PolicyConfig {
                policy: "dense".into(),
                ..opts.base.clone()
            },
            ..EngineOptions::default()
        },
    )
}

/// Each policy's table for `opts`; a bad policy fails here, before any long run.
fn tables<D: DenseDevice>(opts: &EvalOptions, engine: &Engine<D>) -> Result<Vec<Arc<PolicyTable>>> {
    let windows = engine.model().config().sliding_windows();
    opts.policies
        .iter()
        .map(|p| {
            if p == "dense" {
                return Ok(Arc::new(PolicyTable::dense(&windows)));
            }
            let config = match p.ends_with(".toml") {
                // A whole table (e.g. one `tandem calibrate` wrote), with its own
                // sinks, window and dense layers.
                true => PolicyConfig::from_toml_file(Path::new(p))?,
                false => PolicyConfig {
                    policy: p.clone(),
                    ..opts.base.clone()
                },
            };
            PolicyConfig {
                dense_below: config.sinks + config.window,
                ..config
            }
            .resolve(&windows)
            .map(Arc::new)
        })
        .collect::<Result<_>>()
}

/// Greedy replies to a set of prompts, by dense and by each policy.
struct Replies {
    dense: Vec<String>,
    /// Per policy, per prompt.
    policies: Vec<Vec<String>>,
}

/// Prefills each prompt once, densely, then replies greedily (at most
/// `max_tokens`, up to the end of the turn) with dense and with each table
/// from forks of that prefill. `progress` hears of each prompt done.
fn answer_all<D: DenseDevice>(
    engine: &Engine<D>,
    tables: &[Arc<PolicyTable>],
    pool: &Arc<WorkerPool>,
    threads: usize,
    prompts: &[&[u32]],
    max_tokens: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Replies> {
    let model = engine.model();
    let windows = model.config().sliding_windows();
    let mut replies = Replies {
        dense: Vec::new(),
        policies: vec![Vec::new(); tables.len()],
    };
    let mut prefill = PrefixPrefill::new(model)?;
    for (i, prompt) in prompts.iter().enumerate() {
        let logits = prefill.run(model, prompt)?;
        let prefill = &prefill.kv;
        let answer = |kv: &mut SequenceKv<D>| -> Result<String> {
            let mut l = logits.clone();
            let mut ids = Vec::new();
            for _ in 0..max_tokens {
                let t = argmax(&l).unwrap_or(0) as u32;
                if engine.tokenizer().is_end_of_turn(t) {
                    break;
                }
                ids.push(t);
                kv.offload_if_due(threads)?;
                l = model.forward(&[t], kv, Logits::Last)?;
            }
            engine.tokenizer().decode(&ids)
        };
        let mut dense_kv = prefill.fork(Arc::new(PolicyTable::dense(&windows)), None)?;
        replies.dense.push(answer(&mut dense_kv)?);
        drop(dense_kv);
        for (table, out) in tables.iter().zip(&mut replies.policies) {
            let mut kv = prefill.fork(Arc::clone(table), Some(Arc::clone(pool)))?;
            kv.offload_if_due(threads)?;
            out.push(answer(&mut kv)?);
        }
        progress(i);
    }
    Ok(replies)
}

/// A dense prefill that keeps the previous prompt's cache: prompts that open
/// alike (the wordings of one document's questions) prefill only where they
/// differ.
struct PrefixPrefill<D: DenseDevice> {
    kv: SequenceKv<D>,
    tokens: Vec<u32>,
}

impl<D: DenseDevice> PrefixPrefill<D> {
    fn new(model: &Llama<D>) -> Result<Self> {
        Ok(PrefixPrefill {
            kv: model.new_cache()?,
            tokens: Vec::new(),
        })
    }

    /// Prefills `prompt`, reusing the rows of the longest prefix it shares
    /// with the previous one; returns the last position's logits.
    fn run(&mut self, model: &Llama<D>, prompt: &[u32]) -> Result<Vec<f32>> {
        let shared = self
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // At least the last token runs again: its logits are the answer's start.
        let keep = shared.min(prompt.len().saturating_sub(1));
        if self.kv.truncate(keep).is_err() {
            self.kv.reset();
        }
        let done = self.kv.positions();
        let mut logits = Vec::new();
        for chunk in prompt[done..].chunks(PREFILL_CHUNK) {
            logits = model.forward(chunk, &mut self.kv, Logits::Last)?;
        }
        self.tokens = prompt.to_vec();
        Ok(logits)
    }
}

/// The document questions (`questions`, every wording) answered by dense and
/// by each policy of `opts` (its contexts, needle and scoring options are not
/// used), on the CPU device; `note` receives progress lines.
pub fn run_doc_qa(
    opts: &EvalOptions,
    questions: &[Question],
    note: &mut dyn FnMut(&str),
) -> Result<Vec<DocQaRow>> {
    check_doc_qa(opts, questions)?;
    let engine = load_engine(opts, CpuDevice::new(opts.threads.max(1)))?;
    run_doc_qa_with(opts, &engine, questions, note)
}

fn check_doc_qa(opts: &EvalOptions, questions: &[Question]) -> Result<()> {
    if opts.policies.is_empty() || questions.is_empty() {
        return Err(Error::InvalidRequest(
            "document questions need at least one policy and one question".into(),
        ));
    }
    Ok(())
}

/// [`run_doc_qa`] with `engine` (from [`load_engine`]).
pub fn run_doc_qa_with<D: DenseDevice>(
    opts: &EvalOptions,
    engine: &Engine<D>,
    questions: &[Question],
    note: &mut dyn FnMut(&str),
) -> Result<Vec<DocQaRow>> {
    check_doc_qa(opts, questions)?;
    let tables = tables(opts, engine)?;
    let pool = Arc::new(WorkerPool::new(opts.cpu_workers)?);
    let context = engine.model().config().context_length;
    let cases = docqa::cases(
        questions,
        engine.tokenizer(),
        engine.chat_template(),
        context,
    )?;
    let prompts: Vec<&[u32]> = cases.iter().map(|c| &c.prompt[..]).collect();
    let mut progress = |i: usize| note(&format!("document question {}/{}", i + 1, cases.len()));
    let replies = answer_all(
        engine,
        &tables,
        &pool,
        opts.threads,
        &prompts,
        REPLY_TOKENS,
        &mut progress,
    )?;
    let check = |replies: &[String]| -> Vec<bool> {
        replies
            .iter()
            .zip(&cases)
            .map(|(r, c)| c.is_answered_by(r))
            .collect()
    };
    let dense_correct = check(&replies.dense);
    Ok(opts
        .policies
        .iter()
        .zip(replies.policies)
        .map(|(policy, replies)| DocQaRow {
            policy: policy.clone(),
            cases: cases.clone(),
            correct: check(&replies),
            dense_correct: dense_correct.clone(),
            replies,
        })
        .collect())
}
