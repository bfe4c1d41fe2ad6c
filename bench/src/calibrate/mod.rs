//! `tandem calibrate`: KVTuner's per-layer choice of key and value bits.
//!
//! - [`pairs`]: the (key bits, value bits) candidates and which the store holds;
//! - [`measure`]: each offloaded layer's attention-output error per pair;
//! - [`sensitivity`]: each offloaded layer's end-to-end cost per pair, the
//!   KL divergence of the model's output with that layer alone in the pair;
//! - [`pareto`]: each layer's Pareto-optimal pairs, and layers grouped by them;
//! - [`search`]: the exact per-layer assignment under a mean-bits budget;
//! - [`plan`]: the three above, from measured errors to the chosen table;
//! - [`policy_file`]: the chosen table as a policy TOML and a printed table.
//!
//! KVTuner searches its grouped space with NSGA-II; here the search is a
//! knapsack solved exactly over the layers, so the groups are reported, not
//! needed to shrink the search.

pub mod measure;
pub mod pairs;
pub mod pareto;
pub mod plan;
pub mod policy_file;
pub mod search;
pub mod sensitivity;

use std::path::PathBuf;
use std::sync::Arc;

use tandem_cpu::KvDtype;
use tandem_gpu::DenseDevice;
use tandem_runtime::memory::context_bytes;
use tandem_runtime::policy::{LayerAttention, LayerPolicy, PolicyConfig, PolicyTable};
use tandem_runtime::Engine;

use crate::eval::corpus;
use measure::{measure, offloaded_layers, MeasureInput};
use pairs::{supported_pairs, BitPair, SkippedPair};
use plan::{check_budget, choose, Plan};
use sensitivity::measure_kl;

/// What can go wrong in a calibration.
#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    /// A count of int2 heads that is not at least one.
    #[error(
        "int2 heads {0:?}: expected counts of kv heads of at least 1, comma-separated, e.g. 1,2"
    )]
    Int2Heads(String),
    /// A pair that is not `K/V` with both in [`pairs::BIT_WIDTHS`].
    #[error("unknown pair {0:?}: expected K/V (key bits / value bits), each 2, 4, 8, 16 or 32, e.g. 8/4")]
    Pair(String),
    /// A budget outside [`plan::BUDGET_RANGE`].
    #[error("budget {0} mean bits is outside [2, 16]")]
    Budget(f64),
    /// A base policy calibration cannot give pairs to.
    #[error("base policy {policy:?}: {problem}")]
    Base {
        /// The policy as given.
        policy: String,
        /// What is wrong with it.
        problem: String,
    },
    /// No candidate pair is held by the store.
    #[error("none of the pairs is supported by the offloaded store: {0}")]
    NoPair(String),
    /// The budget is below what the pairs allow.
    #[error("no assignment keeps the mean within {budget} bits: the pairs allow {fewest} at the fewest{skipped}")]
    NoAssignment {
        /// The budget asked for.
        budget: f64,
        /// The fewest mean bits of any assignment.
        fewest: f64,
        /// The pairs skipped, as a clause of the message (or empty).
        skipped: String,
    },
    /// A context the model or the text cannot give.
    #[error("{0}")]
    Context(String),
    /// A measurement that cannot be used.
    #[error("measuring: {0}")]
    Measure(String),
    /// Reading the text or writing the policy file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The model, the policy table or the split step failed.
    #[error(transparent)]
    Runtime(#[from] tandem_runtime::Error),
    /// The CPU attention engine failed.
    #[error(transparent)]
    Cpu(#[from] tandem_cpu::CpuError),
}

/// What a layer's cost with a pair is measured as: the quantity the search
/// sums over the layers and minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Objective {
    /// The model's output: the mean KL divergence of the next-token
    /// distributions with the layer alone in the pair ([`sensitivity`]).
    #[default]
    Kl,
    /// The layer's own output: the mean relative error of its attention
    /// output (KVTuner's measure, [`measure`]).
    AttentionError,
}

impl Objective {
    /// The names `--objective` takes.
    pub const NAMES: [&'static str; 2] = ["kl", "attention"];

    /// The objective of a name in [`Objective::NAMES`].
    pub fn parse(name: &str) -> Option<Objective> {
        match name {
            "kl" => Some(Objective::Kl),
            "attention" => Some(Objective::AttentionError),
            _ => None,
        }
    }

    /// What a layer's error is, for the printed table and the file.
    pub fn unit(self) -> &'static str {
        match self {
            Objective::Kl => "mean KL divergence (nats) of the next-token distribution per layer",
            Objective::AttentionError => "mean relative attention-output error per layer",
        }
    }
}

/// Options of [`calibrate`].
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// The text; `None` is the evaluation corpus ([`corpus::load`]).
    pub text: Option<PathBuf>,
    /// Tokens of context.
    pub context: usize,
    /// Tokens decoded at the end of the context, whose queries are compared.
    pub queries: usize,
    /// The last of the decoded tokens that repeat a passage from early in the
    /// context, so that some of the queries recall far-back keys (as a
    /// question about a document does); at most `queries`.
    pub recall: usize,
    /// The budget in mean bits per offloaded key and value element, in [2, 16].
    pub budget_bits: f64,
    /// Candidate pairs; those the store does not hold are skipped.
    pub pairs: Vec<BitPair>,
    /// Counts of kv heads at int2: each is also tried with every pair wider
    /// than K2V2, where the model has more kv heads than it.
    pub int2_heads: Vec<u8>,
    /// The base policy (its `policy` without kbits/vbits, dense layers,
    /// sinks, window, LSH seed), written back with the chosen pairs. Its
    /// `dense_below` is kept for the file; the calibration offloads at `context`.
    pub base: PolicyConfig,
    /// Picks where in the text the context starts.
    pub seed: u64,
    /// Threads of the store builds and CPU workers.
    pub threads: usize,
    /// What the search minimises.
    pub objective: Objective,
}

/// The candidate pairs, split by whether the store holds them.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedPairs {
    /// The pairs the store holds, with the format each gives.
    pub supported: Vec<(BitPair, KvDtype)>,
    /// The pairs it does not, with the reason.
    pub skipped: Vec<SkippedPair>,
}

/// Checks what needs no model: the budget, the base policy and the pairs.
pub fn check_options(opts: &CalibrateOptions) -> Result<CheckedPairs, CalibrateError> {
    check_budget(opts.budget_bits)?;
    if opts.recall > opts.queries {
        return Err(CalibrateError::Context(format!(
            "{} recalled tokens are more than the {} decoded",
            opts.recall, opts.queries
        )));
    }
    if opts.int2_heads.contains(&0) {
        let counts: Vec<String> = opts.int2_heads.iter().map(u8::to_string).collect();
        return Err(CalibrateError::Int2Heads(counts.join(",")));
    }
    let policy = opts.base.policy.as_str();
    let base_error = |problem: &str| CalibrateError::Base {
        policy: policy.to_string(),
        problem: problem.to_string(),
    };
    if policy.contains("kbits") || policy.contains("vbits") {
        return Err(base_error(
            "leave out kbits and vbits: calibration chooses them",
        ));
    }
    match LayerPolicy::parse(policy)?.attention {
        LayerAttention::Offloaded { .. } => {}
        _ => {
            return Err(base_error(
                "it does not offload, so it has no store to calibrate",
            ))
        }
    }
    opts.base.validate()?;
    let (supported, skipped) = supported_pairs(policy, &opts.pairs);
    if supported.is_empty() {
        let why: Vec<String> = skipped
            .iter()
            .map(|s| format!("{} ({})", s.pair, s.reason))
            .collect();
        return Err(CalibrateError::NoPair(why.join("; ")));
    }
    let fewest = supported
        .iter()
        .map(|p| p.mean_bits(1))
        .fold(f64::INFINITY, f64::min);
    if fewest > opts.budget_bits {
        let names: Vec<String> = skipped.iter().map(|s| s.pair.to_string()).collect();
        return Err(CalibrateError::NoAssignment {
            budget: opts.budget_bits,
            fewest,
            skipped: match names.is_empty() {
                true => String::new(),
                false => format!(
                    " (skipped, the store does not hold them: {})",
                    names.join(", ")
                ),
            },
        });
    }
    let supported = supported
        .into_iter()
        .map(|p| p.kv_dtype(policy).map(|d| (p, d)))
        .collect::<Result<_, _>>()
        .map_err(CalibrateError::NoPair)?;
    Ok(CheckedPairs { supported, skipped })
}

/// A calibration's result: the plan, and what it was measured on.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// The chosen table of the offloaded layers.
    pub plan: Plan,
    /// The candidate pairs the store does not hold.
    pub skipped: Vec<SkippedPair>,
    /// Layers kept dense on the device (bf16, not calibrated).
    pub dense_layers: Vec<usize>,
    /// The base policy the pairs were added to.
    pub base: PolicyConfig,
    /// The model's name.
    pub model: String,
    /// The text, as named to the user.
    pub text: String,
    /// The context's token range within the text (less the repeated passage).
    pub span: (usize, usize),
    /// The repeated passage's range within the text (empty without one).
    pub recalled: (usize, usize),
    /// Tokens decoded at the end and compared.
    pub queries: usize,
    /// The seed that placed the context.
    pub seed: u64,
    /// What the errors are.
    pub objective: Objective,
}

/// Measures every offloaded layer of `engine`'s model with every supported
/// pair of `opts`, and chooses the table; `note` receives progress lines.
pub fn calibrate<D: DenseDevice>(
    opts: &CalibrateOptions,
    engine: &Engine<D>,
    note: &mut dyn FnMut(&str),
) -> Result<Calibration, CalibrateError> {
    let CheckedPairs {
        supported: pairs,
        skipped,
    } = check_options(opts)?;
    for s in &skipped {
        note(&format!(
            "{}: skipped, the store does not hold it ({})",
            s.pair, s.reason
        ));
    }
    let model = engine.model();
    let c = model.config();
    let heads = c.attention_shape().n_kv_heads;
    let pairs = with_int2_heads(pairs, &opts.int2_heads, heads, &opts.base.policy, note);
    let windows = c.sliding_windows();
    let kept = opts.base.sinks + opts.base.window;
    // The fork decodes as the base policy would, without the fidelity
    // check's probe steps; the stores themselves are compared exactly.
    let table = Arc::new(
        PolicyConfig {
            dense_below: kept,
            fidelity_check: 0.0,
            ..opts.base.clone()
        }
        .resolve(&windows)?,
    );
    if offloaded_layers(&table).is_empty() {
        return Err(CalibrateError::Context(
            "no layer offloads under the base policy".into(),
        ));
    }
    if opts.context > c.context_length {
        return Err(CalibrateError::Context(format!(
            "context {} is above the model's {}",
            opts.context, c.context_length
        )));
    }
    if opts.queries == 0 || opts.context <= kept + opts.queries {
        return Err(CalibrateError::Context(format!(
            "context {} leaves no offloaded keys for {} decoded queries beyond {kept} tokens on the device",
            opts.context, opts.queries
        )));
    }
    check_memory(engine, &table, &pairs, opts)?;
    let (text, label) = read_text(opts)?;
    let tokens = engine.tokenizer().encode(&text, false)?;
    let Sequence {
        tokens: sequence,
        span,
        recalled,
    } = calibration_sequence(&tokens, opts)?;
    note(&format!(
        "context: tokens {}..{} of {label}, then {}..{} again",
        span.0, span.1, recalled.0, recalled.1
    ));
    let input = MeasureInput {
        model,
        table: &table,
        tokens: &sequence,
        queries: opts.queries,
        pairs: &pairs,
        threads: opts.threads,
    };
    let measured = match opts.objective {
        Objective::Kl => measure_kl(&input, note)?,
        Objective::AttentionError => measure(&input, note)?,
    };
    Ok(Calibration {
        plan: choose(&measured, opts.budget_bits, heads)?,
        skipped,
        dense_layers: dense_layers(&table),
        base: opts.base.clone(),
        model: c.name.clone(),
        text: label,
        span,
        recalled,
        queries: opts.queries,
        seed: opts.seed,
        objective: opts.objective,
    })
}

/// `pairs`, and each pair wider than K2V2 with each count of `int2_heads`
/// below `heads` (the model's kv heads per layer) at int2; counts the model
/// cannot hold are noted and left out.
pub fn with_int2_heads(
    pairs: Vec<(BitPair, KvDtype)>,
    int2_heads: &[u8],
    heads: usize,
    base: &str,
    note: &mut dyn FnMut(&str),
) -> Vec<(BitPair, KvDtype)> {
    let mut counts = Vec::new();
    for &n in int2_heads {
        match usize::from(n) < heads {
            true => counts.push(n),
            false => note(&format!(
                "int2 heads {n}: skipped, the model has {heads} kv heads per layer"
            )),
        }
    }
    let mut all = pairs.clone();
    for (pair, _) in pairs.into_iter().filter(|(p, _)| p.key > 2 || p.value > 2) {
        for &n in &counts {
            let variant = pair.with_int2_heads(n);
            if let Ok(dtype) = variant.kv_dtype(base) {
                all.push((variant, dtype));
            }
        }
    }
    all
}

/// Refuses a context whose measurement would not fit the engine's memory
/// budget: the dense prefill, and either a fork under `table` with copies in
/// the widest pair's format ([`Objective::AttentionError`]) or one dense fork
/// per store format with one layer's store in it ([`Objective::Kl`]).
fn check_memory<D: DenseDevice>(
    engine: &Engine<D>,
    table: &PolicyTable,
    pairs: &[(BitPair, KvDtype)],
    opts: &CalibrateOptions,
) -> Result<(), CalibrateError> {
    let c = engine.model().config();
    let shape = c.attention_shape();
    let (heads, d) = (shape.n_kv_heads, shape.head_dim);
    let widest = |lsh| {
        pairs
            .iter()
            .map(|&(_, dtype)| tandem_cpu::store_bytes_per_key(dtype, lsh, d) * heads)
            .max()
            .unwrap_or(0) as u64
    };
    let context = opts.context;
    let dense = PolicyTable::dense(&c.sliding_windows());
    let need = (|| {
        let prefill = context_bytes(&dense, shape, context, 1)?;
        let measuring = match opts.objective {
            Objective::AttentionError => {
                let copies: u64 = offloaded_lsh(table).into_iter().map(widest).sum();
                copies
                    .checked_mul(context as u64)?
                    .checked_add(context_bytes(table, shape, context, 1)?)?
            }
            Objective::Kl => {
                let forks = sensitivity::distinct_formats(pairs).0.len() as u64;
                let fork = prefill.checked_add(widest(None).checked_mul(context as u64)?)?;
                fork.checked_mul(forks)?
            }
        };
        prefill.checked_add(measuring)
    })();
    engine
        .memory_budget()
        .check(&format!("a calibration at {context} tokens"), need)?;
    Ok(())
}

/// The LSH index of each offloaded layer of `table`.
fn offloaded_lsh(table: &PolicyTable) -> Vec<Option<tandem_cpu::LshIndexParams>> {
    table
        .layers
        .iter()
        .filter_map(|l| match l.attention {
            LayerAttention::Offloaded { lsh, .. } => Some(lsh),
            _ => None,
        })
        .collect()
}

/// The text and its name.
fn read_text(opts: &CalibrateOptions) -> Result<(String, String), CalibrateError> {
    match &opts.text {
        None => Ok((corpus::load()?, "the evaluation corpus (tests/data)".into())),
        Some(path) => std::fs::read_to_string(path)
            .map(|t| (t, format!("{}", path.display())))
            .map_err(|source| CalibrateError::Io {
                path: path.clone(),
                source,
            }),
    }
}

/// The tokens a calibration measures, and where they come from in the text.
struct Sequence {
    tokens: Vec<u32>,
    /// The context's prose, within the text.
    span: (usize, usize),
    /// The passage repeated at its end, within the text.
    recalled: (usize, usize),
}

/// `opts.context` of `tokens` placed by the seed, their last `opts.recall`
/// replaced by a passage repeated from the first half.
fn calibration_sequence(
    tokens: &[u32],
    opts: &CalibrateOptions,
) -> Result<Sequence, CalibrateError> {
    let whole = context_span(tokens.len(), opts.context, opts.seed).ok_or_else(|| {
        CalibrateError::Context(format!(
            "the text has {} tokens, fewer than the context {}",
            tokens.len(),
            opts.context
        ))
    })?;
    let span = (whole.0, whole.1 - opts.recall);
    let recalled = recalled_span(span, opts.recall, opts.seed);
    let mut sequence = tokens[span.0..span.1].to_vec();
    sequence.extend_from_slice(&tokens[recalled.0..recalled.1]);
    Ok(Sequence {
        tokens: sequence,
        span,
        recalled,
    })
}

/// The `recall` tokens of `span` repeated at its end: a passage starting
/// in the first half of it, placed by `seed`.
pub fn recalled_span(span: (usize, usize), recall: usize, seed: u64) -> (usize, usize) {
    let half = (span.1 - span.0) / 2;
    let room = half.saturating_sub(recall) as u64 + 1;
    let start = span.0 + (splitmix64(seed ^ 0x7265_6361_6c6c) % room) as usize;
    (start, (start + recall).min(span.1))
}

/// Where `context` tokens start in a text of `len` tokens, placed by `seed`.
pub fn context_span(len: usize, context: usize, seed: u64) -> Option<(usize, usize)> {
    let starts = len.checked_sub(context)? as u64 + 1;
    let start = (splitmix64(seed) % starts) as usize;
    Some((start, start + context))
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The layers `table` keeps dense on the device.
fn dense_layers(table: &PolicyTable) -> Vec<usize> {
    (0..table.layers.len())
        .filter(|&l| table.layers[l].attention == LayerAttention::Dense)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(policy: &str, budget: f64, pairs: &str) -> CalibrateOptions {
        CalibrateOptions {
            text: None,
            context: 1024,
            queries: 8,
            recall: 4,
            budget_bits: budget,
            pairs: pairs::parse_pairs(pairs).expect("pairs"),
            int2_heads: Vec::new(),
            base: PolicyConfig {
                policy: policy.into(),
                ..PolicyConfig::default()
            },
            seed: 0,
            threads: 1,
            objective: Objective::default(),
        }
    }

    #[test]
    fn options_are_checked_before_any_model_loads() {
        let ok = check_options(&opts("topk:k=8", 8.0, pairs::DEFAULT_PAIRS)).expect("ok");
        assert!(ok.supported.iter().any(|(p, _)| p.key == 8 && p.value == 8));
        assert_eq!(ok.supported.len() + ok.skipped.len(), 9);
        for (policy, budget) in [
            ("topk:k=8", 1.5),
            ("topk:k=8", 17.0),
            ("topk:k=8,kbits=8", 8.0),
            ("dense", 8.0),
            ("window", 8.0),
            ("topk", 8.0),
        ] {
            assert!(
                check_options(&opts(policy, budget, "8/8")).is_err(),
                "{policy} {budget}"
            );
        }
        let zero = CalibrateOptions {
            int2_heads: vec![1, 0],
            ..opts("topk:k=8", 8.0, "8/8")
        };
        assert!(matches!(
            check_options(&zero),
            Err(CalibrateError::Int2Heads(_))
        ));
        let recall = CalibrateOptions {
            recall: 9,
            ..opts("topk:k=8", 8.0, "8/8")
        };
        assert!(matches!(
            check_options(&recall),
            Err(CalibrateError::Context(ref m)) if m.contains("recalled")
        ));
        let none = check_options(&opts("exact", 16.0, "32/8")).unwrap_err();
        assert!(
            matches!(none, CalibrateError::NoPair(ref m) if m.contains("K32V8")),
            "{none}"
        );
    }

    #[test]
    fn int2_heads_extend_the_wider_pairs_where_the_model_has_the_heads() {
        let base = "topk:k=8";
        let checked = check_options(&opts(base, 8.0, "8/8,4/2,2/2")).expect("ok");
        let mut notes = Vec::new();
        let all = with_int2_heads(checked.supported, &[1, 3], 3, base, &mut |n| {
            notes.push(n.to_string())
        });
        let names: Vec<String> = all.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(
            names,
            ["K8V8", "K4V2", "K2V2", "K8V8+1×K2V2", "K4V2+1×K2V2"]
        );
        assert_eq!(all[3].1.int2_heads, 1);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("int2 heads 3"), "{notes:?}");
    }

    #[test]
    fn the_recalled_passage_replaces_the_last_tokens() {
        let tokens: Vec<u32> = (0..5000).collect();
        let o = CalibrateOptions {
            context: 1024,
            ..opts("topk:k=8", 8.0, "8/8")
        };
        let Sequence {
            tokens: seq,
            span,
            recalled,
        } = calibration_sequence(&tokens, &o).expect("fits");
        assert_eq!(seq.len(), 1024);
        assert_eq!(span.1 - span.0, 1020);
        assert_eq!(seq[..1020], tokens[span.0..span.1]);
        assert_eq!(seq[1020..], tokens[recalled.0..recalled.1]);
        assert!(recalled.1 <= span.0 + 510, "{recalled:?} in the first half");
        assert!(calibration_sequence(&tokens[..1000], &o).is_err());
    }

    #[test]
    fn the_seed_places_the_context_inside_the_text() {
        assert_eq!(context_span(100, 100, 7), Some((0, 100)));
        assert_eq!(context_span(99, 100, 7), None);
        for seed in 0..50 {
            let (a, b) = context_span(5000, 4096, seed).expect("fits");
            assert_eq!(b - a, 4096);
            assert!(b <= 5000);
            assert_eq!(context_span(5000, 4096, seed), Some((a, b)));
        }
        assert_ne!(context_span(10_000, 100, 1), context_span(10_000, 100, 2));
        for seed in 0..50 {
            let (a, b) = recalled_span((1000, 5000), 16, seed);
            assert_eq!(b - a, 16);
            assert!(a >= 1000 && b <= 3000, "{a}..{b}");
        }
        let (a, b) = recalled_span((10, 20), 0, 3);
        assert_eq!(a, b);
    }
}
