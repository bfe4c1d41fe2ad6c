//! `tandem calibrate`: the options checked and the output path tried before
//! the model loads, then the calibration, its table and its policy file.

use std::num::NonZeroUsize;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use tandem_bench::calibrate::pairs::parse_pairs;
use tandem_bench::calibrate::policy_file::{check_writable, write_atomically};
use tandem_bench::calibrate::{calibrate, check_options, CalibrateOptions, Objective};
use tandem_gpu::DenseDevice;
use tandem_runtime::policy::PolicyConfig;
use tandem_runtime::{resolve_model_path, Engine, EngineOptions};

use crate::device::{run_on, DeviceChoice, DeviceTask};
use crate::{parse_size, threads_or_cores};

#[derive(Args)]
pub(crate) struct CalibrateArgs {
    /// Model: a GGUF file (llama, gemma3, qwen2), a Hugging Face Llama directory, or a
    /// name set-up fetches: smollm2, gemma3 (default: the set-up SmolLM2).
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// A text file to calibrate on (default: the evaluation corpus in tests/data).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Tokens of context.
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Tokens decoded at the end of the context whose queries are compared.
    #[arg(long, default_value_t = 32)]
    queries: usize,
    /// The last of the decoded tokens repeat a passage of this many tokens
    /// from the first half of the context, so that their queries recall
    /// far-back keys as a question about a document does (0: prose only; at
    /// most --queries; default: half of --queries).
    #[arg(long)]
    recall: Option<usize>,
    /// The budget: mean bits per offloaded key and value element, (K + V) / 2
    /// averaged over the offloaded layers, in [2, 16].
    #[arg(long)]
    budget_bits: f64,
    /// The policy file to write (through a temporary file, then renamed).
    #[arg(long)]
    out: PathBuf,
    /// Places the context in the text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Candidate pairs, key bits/value bits, comma-separated (KVTuner's {2,4,8}²
    /// by default). Pairs the offloaded store does not hold are skipped, each
    /// with a line saying so.
    #[arg(long, default_value = tandem_bench::calibrate::pairs::DEFAULT_PAIRS)]
    pairs: String,
    /// Counts of kv heads held at int2 (TurboAttention's head-wise precision,
    /// the heads of least key range × std), comma-separated: each is also
    /// measured with every pair wider than K2V2, so a layer's bits can step by
    /// heads (more formats to measure: about twice the time with 1,2). Counts
    /// not below the model's kv heads are skipped; 0 alone measures whole
    /// pairs only.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    int2_heads: Vec<u8>,
    /// The base policy of the offloaded layers, without kbits or vbits.
    #[arg(long, default_value = tandem_runtime::policy::DEFAULT_POLICY)]
    policy: String,
    /// Layers kept dense on the device, in bf16, comma-separated (default: 0
    /// and n_layers/2).
    #[arg(long, value_delimiter = ',')]
    dense_layers: Option<Vec<usize>>,
    /// Most recent tokens kept on the device by offloaded layers.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// First tokens kept on the device by offloaded layers.
    #[arg(long, default_value_t = 4)]
    sinks: usize,
    /// Written to the policy file: contexts shorter than this stay dense.
    #[arg(long, default_value_t = 2048)]
    dense_below: usize,
    /// What a layer's cost with a pair is measured as, the sum the search
    /// minimises: kl, the KL divergence of the model's next-token
    /// distributions with that layer alone in the pair (one batched decode
    /// per layer; the layers weigh as they do in the output), or attention,
    /// the relative error of the layer's attention output (KVTuner's measure;
    /// one decode per pair, cheaper on long contexts).
    #[arg(long, default_value = "kl", value_parser = tandem_bench::calibrate::Objective::NAMES)]
    objective: String,
    /// The memory the calibration's context may take (its prefill and, per
    /// store format, a fork of it (kl) or one policy's stores and their
    /// copies (attention)), e.g. 8G (default: MemAvailable once the model
    /// has loaded).
    #[arg(long, value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// Dense-device threads and CPU workers (default: all cores).
    #[arg(long, short = 't')]
    threads: Option<NonZeroUsize>,
    /// The dense device: auto (CUDA when a driver and a GPU are present, else
    /// the CPU), cpu or cuda (an error without a GPU).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

/// Runs `tandem calibrate` on the device `args` selects.
pub fn run(args: &CalibrateArgs) -> Result<()> {
    let threads = threads_or_cores(args.threads, "--threads");
    let opts = CalibrateOptions {
        text: args.text.clone(),
        context: args.context,
        queries: args.queries,
        recall: args.recall.unwrap_or(args.queries / 2),
        budget_bits: args.budget_bits,
        pairs: parse_pairs(&args.pairs)?,
        int2_heads: match args.int2_heads.as_slice() {
            [0] => Vec::new(),
            counts => counts.to_vec(),
        },
        base: PolicyConfig {
            policy: args.policy.clone(),
            dense_layers: args.dense_layers.clone(),
            sinks: args.sinks,
            window: args.window,
            dense_below: args.dense_below,
            ..PolicyConfig::default()
        },
        seed: args.seed,
        threads,
        objective: Objective::parse(&args.objective)
            .ok_or_else(|| anyhow::anyhow!("unknown objective {:?}", args.objective))?,
    };
    check_options(&opts)?;
    check_writable(&args.out)?;
    run_on(args.device, threads, Calibrate { args, opts })
}

struct Calibrate<'a> {
    args: &'a CalibrateArgs,
    opts: CalibrateOptions,
}

impl DeviceTask for Calibrate<'_> {
    fn run<D: DenseDevice + 'static>(self, device: D) -> Result<()> {
        let path = resolve_model_path(self.args.model.as_deref());
        let options = EngineOptions {
            threads: self.opts.threads,
            cpu_workers: self.opts.threads,
            memory_limit: self.args.memory_limit,
            policy: PolicyConfig {
                policy: "dense".into(),
                ..PolicyConfig::default()
            },
            ..EngineOptions::default()
        };
        let engine = Engine::load_on(&path, device, &options)?;
        let start = std::time::Instant::now();
        let calibration = calibrate(&self.opts, &engine, &mut |line| eprintln!("tandem: {line}"))?;
        print!("{}", calibration.table());
        write_atomically(&self.args.out, &calibration.to_toml())?;
        eprintln!(
            "tandem: wrote {} in {:.0} s (load it with --policy-file)",
            self.args.out.display(),
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
