//! The `tandem` command line.

#![forbid(unsafe_code)]

mod calibrate;
mod chat;
mod device;
mod serve;

use std::io::{IsTerminal, Write};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tandem_bench::decode::{run_decode_bench_on, DecodeBenchOptions, ModelSource};
use tandem_bench::eval::corpus;
use tandem_gpu::DenseDevice;
use tandem_runtime::chat::Message;
use tandem_runtime::policy::PolicyConfig;
use tandem_runtime::{
    resolve_model_path, Engine, EngineOptions, Flow, GenerationStats, SamplingConfig,
};

use calibrate::CalibrateArgs;
use device::{run_on, DeviceChoice, DeviceTask};

/// The version, and whether the CUDA device is built in.
const VERSION: &str = if cfg!(feature = "cuda") {
    concat!(env!("CARGO_PKG_VERSION"), " (with the CUDA device)")
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (CPU device only)")
};

/// tandem: a long-context LLM decoder.
///
/// The default model (SmolLM2-135M-Instruct, Q4_1) is installed by `scripts/setup.sh`.
#[derive(Parser)]
#[command(name = "tandem", version = VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt; the text goes to stdout, statistics to stderr.
    Generate(GenerateArgs),
    /// Chat with the model.
    ///
    /// Line editing and history at a terminal, one message per line from a pipe (a trailing \ continues the line);
    /// /reset clears the conversation but the --file document, /reset all
    /// clears both; Ctrl-C stops a reply, twice at the prompt leaves, as do
    /// Ctrl-D and /exit.
    Chat(chat::ChatArgs),
    /// Print the token ids of a text.
    Tokenize(TokenizeArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Quality of attention policies against dense on real text: teacher-forced
    /// top-1 agreement, KL and perplexity, needle retrieval, per-layer attention
    /// error and keys touched. Prints a markdown table.
    Eval(EvalArgs),
    /// Choose each offloaded layer's key and value bits (KVTuner): measure every
    /// layer's attention-output error per (key bits, value bits) pair on real
    /// text, keep each layer's Pareto-optimal pairs, and search the table of
    /// least total error within a mean-bits budget. Writes a policy file for
    /// --policy-file and prints the table.
    Calibrate(CalibrateArgs),
    /// The dense devices this machine offers: the CPU's SIMD and cores, and a
    /// CUDA GPU or why there is none.
    Devices,
    /// Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions,
    /// /v1/completions, /v1/models, /health), every request in flight decoded in
    /// one batch.
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Ask every /v1/ request for `Authorization: Bearer KEY` (default: $TANDEM_API_KEY;
    /// none: no key asked).
    #[arg(long)]
    api_key: Option<String>,
    /// Requests decoded together in one batch.
    #[arg(long, default_value_t = 8)]
    max_sequences: usize,
    /// Requests waiting for a place in the batch; more are refused with 503.
    #[arg(long, default_value_t = 32)]
    max_queue: usize,
    /// Tokens generated for a request that gives no max_tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// The most tokens a request may ask for.
    #[arg(long, default_value_t = 4096)]
    max_tokens_limit: usize,
    /// Prompt plus reply tokens of one request (default: the model's context).
    #[arg(long)]
    max_context: Option<usize>,
    /// Connections served at once; further ones wait until one closes.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_connections: u32,
    /// Seconds a client has to send a request's headers (from connecting, or
    /// from the previous reply on a kept-alive connection); then it is closed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_timeout: u64,
    /// Seconds a client has to send a request's body after its headers; then
    /// it gets 408 and the connection is closed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    body_timeout: u64,
}

#[derive(Args)]
struct EvalArgs {
    /// Model: a GGUF file (llama, gemma3, qwen2), a Hugging Face Llama directory, or a
    /// name set-up fetches: smollm2, gemma3 (default: the set-up SmolLM2).
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Policies to compare with dense, comma- or space-separated, e.g.
    /// dense window topk:k=64 oracle:budget=64 lsh:k=8,l=75 (';' also separates),
    /// or a policy file (a path ending in .toml, e.g. one tandem calibrate wrote:
    /// its whole table, with its own sinks, window and dense layers).
    #[arg(long, num_args = 1.., required = true)]
    policy: Vec<String>,
    /// Context lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2048")]
    context: Vec<usize>,
    /// Teacher-forced positions scored at the end of each context.
    #[arg(long, default_value_t = 128)]
    scored: usize,
    /// Needle cases per context and task (0 skips the needle tasks).
    #[arg(long, default_value_t = 20)]
    needle_cases: usize,
    /// Needle tasks, comma-separated: single (one fact), multikey (the asked
    /// fact among three about other keys), multivalue (four values of one
    /// key, all asked).
    #[arg(long, value_delimiter = ',', default_value = "single")]
    needle_tasks: Vec<String>,
    /// Also ask the document questions (tests/data/doc-qa.toml: facts stated
    /// once in long real documents, several wordings each) of dense and of
    /// every policy.
    #[arg(long)]
    doc_qa: bool,
    /// With --doc-qa, write each policy's document-question results as JSON
    /// to this file.
    #[arg(long, requires = "doc_qa")]
    doc_qa_json: Option<PathBuf>,
    /// Layers kept dense, comma-separated (default: 0 and n_layers/2).
    #[arg(long, value_delimiter = ',')]
    dense_layers: Option<Vec<usize>>,
    /// Most recent tokens kept on the device by sparse layers.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// First tokens kept on the device by sparse layers.
    #[arg(long, default_value_t = 4)]
    sinks: usize,
    /// A MixAttention layout for every policy compared (ma-pairs, ma-offset,
    /// one-in-six): its global layers take the policy.
    #[arg(long)]
    layout: Option<String>,
    /// The sliding window of the layout's sliding layers.
    #[arg(long, default_value_t = 1024)]
    layout_window: usize,
    /// The fidelity check's bound for every policy compared (see `tandem
    /// chat --help`); 0 measures the policies' sampling alone.
    #[arg(long, default_value_t = tandem_runtime::policy::DEFAULT_FIDELITY_CHECK)]
    fidelity_check: f32,
    /// Dense-device threads and CPU workers (default: all cores).
    #[arg(long, short = 't')]
    threads: Option<NonZeroUsize>,
    /// The dense device: auto (CUDA when a driver and a GPU are present, else
    /// the CPU), cpu or cuda (an error without a GPU).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Write the rows as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG plot of quality against keys touched to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Also print, per sparse layer and kv head, where attention mass goes:
    /// on the offloaded keys, beyond each head's TOP keys, expected to be
    /// missed by LSH retrieval (alone and with the TOP keys attended exactly),
    /// and the norm rank and cosine of what is missed. Slow: it scores every
    /// key of every head at every position.
    #[arg(long, value_name = "TOP", num_args = 0..=1, default_missing_value = "64")]
    diagnose: Option<usize>,
}

#[derive(Args)]
struct ModelArgs {
    /// Model: a GGUF file (llama, gemma3, qwen2), a Hugging Face Llama directory, or a
    /// name set-up fetches: smollm2, gemma3. Default: $TANDEM_MODEL, else
    /// models/SmolLM2-135M-Instruct.Q4_1.gguf.
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Threads for the dense device (default and at most: all cores).
    #[arg(long, short = 't')]
    threads: Option<NonZeroUsize>,
    /// The memory a context may take, e.g. 8G or 512M (default: MemAvailable
    /// from /proc/meminfo once the model has loaded). Longer contexts are
    /// refused before anything is allocated.
    #[arg(long, value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// The dense device: auto (CUDA when a driver and a GPU are present, else
    /// the CPU), cpu or cuda (an error without a GPU).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// How each layer attends (see `PolicyConfig` in the library docs).
#[derive(Args, Clone)]
struct PolicyArgs {
    /// Attention policy of the sparse layers: lsh:k=K,l=L[,t=T][,max_keys=M][,vskip=S][,top=N[,per=P]],
    /// topk:k=N, oracle:budget=N, threshold:eps=E (keys within ln(n/E) of the
    /// largest logit) or threshold:b=B (keys of logit >= B), window (sinks +
    /// recent window only), exact
    /// (offloaded, every key attended: the split step's reference) or dense.
    /// lsh's top=N attends each head's N keys of largest logit exactly besides
    /// the sample (found through a low-rank sketch of the keys); per=P caps
    /// that set at one key in P of the offloaded context (the default: top=128,
    /// per=32, so 64 keys at 2k, 128 from 4k on). lsh's vskip leaves out the V rows of each head's smallest weights up to
    /// 2^-S of its softmax mass (default 9; 0 reads every retrieved row). Any
    /// offloading policy takes kbits=2|4|8|16|32 and vbits=2|4|8|16: the bits
    /// of the offloaded keys and values (int8 with one scale per channel,
    /// int4 and int2 with a range per row, bf16 by default; kbits=32 makes
    /// both f32), and int2_heads=N: the N kv heads of each layer whose prefill
    /// keys have the least range × std hold keys and values at int2 instead
    /// (TurboAttention's head-wise choice).
    /// Dense and offloading policies take softmax=sas[,sas_n=N]: TurboAttention's
    /// SAS weights (a table and a cubic for exp; scores N or more below the max,
    /// 1 to 16, default 8, dropped) on the CPU device and workers.
    #[arg(long, default_value = tandem_runtime::policy::DEFAULT_POLICY)]
    policy: String,
    /// Layers kept dense, comma-separated (default: 0 and n_layers/2).
    #[arg(long, value_delimiter = ',')]
    dense_layers: Option<Vec<usize>>,
    /// Most recent tokens kept on the dense device by sparse layers.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// First tokens (attention sinks) kept on the dense device by sparse layers.
    #[arg(long, default_value_t = 4)]
    sinks: usize,
    /// Contexts shorter than this many tokens stay dense on the device.
    #[arg(long, default_value_t = 2048)]
    dense_below: usize,
    /// A MixAttention layout: ma-pairs, ma-offset or one-in-six (global layers
    /// take --policy, the others a sliding window or another layer's cache).
    #[arg(long)]
    layout: Option<String>,
    /// The sliding window of a layout's sliding layers.
    #[arg(long, default_value_t = 1024)]
    layout_window: usize,
    /// The fidelity check: after each prompt, every sampled layer's first 4
    /// tokens are attended both sampled and exactly (the exact output is
    /// used), and each kv head of the layer whose mean relative error
    /// exceeds this bound attends its offloaded keys exactly until the next
    /// prompt. 0 turns it off.
    #[arg(long, default_value_t = tandem_runtime::policy::DEFAULT_FIDELITY_CHECK)]
    fidelity_check: f32,
    /// A TOML policy file (policy, dense_layers, sinks, window, dense_below,
    /// seed, layout, layout_window, fidelity_check, [layers] overrides); it
    /// cannot be combined with the flags above.
    #[arg(long, conflicts_with_all = [
        "policy", "dense_layers", "window", "sinks", "dense_below", "layout", "layout_window",
        "fidelity_check",
    ])]
    policy_file: Option<PathBuf>,
    /// CPU attention worker threads (default and at most: all cores).
    #[arg(long)]
    cpu_workers: Option<NonZeroUsize>,
}

impl PolicyArgs {
    fn config(&self) -> Result<PolicyConfig> {
        let config = self.read_config()?;
        config.validate()?;
        Ok(config)
    }

    fn read_config(&self) -> Result<PolicyConfig> {
        if let Some(path) = &self.policy_file {
            return Ok(PolicyConfig::from_toml_file(path)?);
        }
        Ok(PolicyConfig {
            policy: self.policy.clone(),
            dense_layers: self.dense_layers.clone(),
            sinks: self.sinks,
            window: self.window,
            dense_below: self.dense_below,
            layout: self.layout.clone(),
            layout_window: self.layout_window,
            fidelity_check: self.fidelity_check,
            ..PolicyConfig::default()
        })
    }

    fn cpu_workers(&self) -> usize {
        threads_or_cores(self.cpu_workers, "--cpu-workers")
    }
}

/// `requested` threads, at most the machine's cores (more only contend for
/// them; a warning says so); none, all cores.
fn threads_or_cores(requested: Option<NonZeroUsize>, flag: &str) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    match requested.map(NonZeroUsize::get) {
        Some(n) if n > cores => {
            eprintln!("tandem: {flag} {n} is more than the {cores} cores; using {cores}");
            cores
        }
        Some(n) => n,
        None => cores,
    }
}

/// A `--memory-limit` value.
fn parse_size(text: &str) -> Result<u64, String> {
    tandem_runtime::memory::parse_size(text).map_err(|e| e.to_string())
}

impl ModelArgs {
    /// The engine options, the policy checked (before any model loads).
    fn options(&self) -> Result<EngineOptions> {
        Ok(EngineOptions {
            threads: threads_or_cores(self.threads, "--threads"),
            cpu_workers: self.policy.cpu_workers(),
            policy: self.policy.config()?,
            memory_limit: self.memory_limit,
            ..EngineOptions::default()
        })
    }

    /// Runs `task` on the device `--device` selects.
    fn run(&self, task: impl DeviceTask) -> Result<()> {
        run_on(self.device, self.options()?.threads, task)
    }

    fn load<D: DenseDevice>(&self, device: D) -> Result<Engine<D>> {
        self.load_with(device, &self.options()?)
    }

    fn load_with<D: DenseDevice>(&self, device: D, options: &EngineOptions) -> Result<Engine<D>> {
        let path = resolve_model_path(self.model.as_deref());
        let start = Instant::now();
        let engine = Engine::load_on(&path, device, options)?;
        eprintln!(
            "tandem: loaded {} ({} layers, {:.0} MB of weights) on {} in {:.2} s",
            path.display(),
            engine.model().config().n_layers,
            engine.model().weight_bytes() as f64 / 1e6,
            tandem_gpu::DenseDevice::name(&**engine.model().device()),
            start.elapsed().as_secs_f64()
        );
        eprintln!("tandem: attention policy\n{}", engine.policy_table());
        Ok(engine)
    }
}

#[derive(Args)]
struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: keep tokens up to this cumulative probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalise tokens seen in the last 64 (1: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn config(&self) -> Result<SamplingConfig> {
        let c = SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
            ..Default::default()
        };
        c.validate().map_err(anyhow::Error::msg)?;
        Ok(c)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt.
    #[arg(long, short = 'p')]
    prompt: String,
    /// Maximum tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    max_tokens: usize,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text.
    text: String,
    /// Print a JSON array of ids and nothing else.
    #[arg(long)]
    json: bool,
    /// Prepend the beginning-of-sequence token.
    #[arg(long)]
    bos: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Decode speed after a context of N tokens, for a policy and for dense in
    /// the same run, split into device time, CPU-worker time and waiting.
    Decode(BenchDecodeArgs),
    /// The CPU attention engine on generated keys of a model's shape.
    Attention(BenchAttentionArgs),
}

#[derive(Args)]
struct BenchDecodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Instead of a model file: a model shape with generated weights and a
    /// generated KV cache (llama3.1-8b).
    #[arg(long, conflicts_with = "model")]
    shape: Option<String>,
    /// Context lengths before decoding, comma-separated (a real prefill of real
    /// text with a model; generated keys and values with --shape).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    context: Vec<usize>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed decode steps at each context.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Seed of generated weights and keys.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// With a model, contexts above this many tokens get generated keys and
    /// values (labelled synthetic_kv) instead of a prefill, whose time grows
    /// quadratically (SmolLM2 at 32k would take over 10 minutes here).
    #[arg(long, default_value_t = 16384)]
    prefill_max: usize,
    /// Print one JSON object per (policy, context) on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchAttentionArgs {
    /// Offloaded tokens per layer.
    #[arg(long, default_value_t = 98304)]
    context: usize,
    /// Model shape: llama3.1-8b or smollm2-135m.
    #[arg(long, default_value = "llama3.1-8b")]
    shape: String,
    /// Policies, e.g. lsh:k=10,l=150 dense topk:k=2048 oracle:budget=2048 (repeatable);
    /// lsh also takes t=, max_keys=, vskip=, top= and per=, and any policy kbits=2|4|8|16|32
    /// and vbits=2|4|8|16 (the bits of the stored keys and values; bf16 by default) and
    /// int2_heads=N (that many kv heads, those of least key range × std, at int2), and
    /// softmax=sas[,sas_n=N] (TurboAttention's SAS weights, cut-off N in 1..=16, default 8).
    #[arg(long, num_args = 1.., default_values_t = [tandem_runtime::policy::DEFAULT_POLICY.to_string()])]
    policy: Vec<String>,
    /// Worker threads (at most the machine's cores).
    #[arg(long, default_value = "2")]
    threads: NonZeroUsize,
    /// Timed iterations (median reported; a median of 10 still moved by ~15%
    /// between runs on a shared 2-core VM).
    #[arg(long, default_value_t = 30)]
    iterations: usize,
    /// Distinct generated layers attended in turn in every iteration. 1 keeps the
    /// layer's stores in cache between iterations (a warm figure); 8 at 96k with
    /// llama3.1-8b (~600 MB of stores per layer and policy) reads every layer
    /// cold, as a decode step does.
    #[arg(long, default_value_t = 1)]
    layers: usize,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The memory the generated layers may take, e.g. 8G (default:
    /// MemAvailable from /proc/meminfo).
    #[arg(long, value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => args.model.run(Generate(&args)),
        Command::Chat(args) => args.model.run(Chat(&args)),
        Command::Tokenize(args) => tokenize(args),
        Command::Bench(BenchCommand::Decode(args)) => args.model.run(BenchDecode(&args)),
        Command::Bench(BenchCommand::Attention(args)) => bench_attention(args),
        Command::Eval(args) => run_on(args.device, eval_threads(&args), Eval(&args)),
        Command::Calibrate(args) => calibrate::run(&args),
        Command::Devices => {
            print!("{}", device::describe());
            Ok(())
        }
        Command::Serve(args) => args.model.run(serve::Serve(&args)),
    };
    if let Err(e) = result {
        eprintln!("tandem: error: {e:#}");
        if is_out_of_memory(&e) {
            eprintln!("tandem: --memory-limit sets the limit");
        }
        std::process::exit(1);
    }
}

fn is_out_of_memory(e: &anyhow::Error) -> bool {
    use tandem_bench::BenchError;
    use tandem_runtime::Error;
    matches!(e.downcast_ref::<Error>(), Some(Error::OutOfMemory { .. }))
        || matches!(
            e.downcast_ref::<BenchError>(),
            Some(BenchError::Runtime(Error::OutOfMemory { .. }))
        )
}

fn progress_reporter(total_hint: usize) -> (ProgressBar, impl FnMut(usize, usize)) {
    let bar = if total_hint >= 2048 && std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(total_hint as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "prefill {bar:40} {pos}/{len} tokens, {per_sec}, eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let b = bar.clone();
    (bar, move |done: usize, _total: usize| {
        b.set_position(done as u64)
    })
}

fn print_stats(stats: &GenerationStats) {
    eprintln!(
        "\ntandem: prompt {} tokens in {:.2} s ({:.1} tokens/s); generated {} tokens ({:.1} tokens/s)",
        stats.prompt_tokens,
        stats.prompt_time.as_secs_f64(),
        stats.prompt_tokens_per_s(),
        stats.generated_tokens,
        stats.decode_tokens_per_s()
    );
}

struct Generate<'a>(&'a GenerateArgs);

impl DeviceTask for Generate<'_> {
    fn run<D: DenseDevice + 'static>(self, device: D) -> Result<()> {
        generate(self.0, device)
    }
}

fn generate<D: DenseDevice>(args: &GenerateArgs, device: D) -> Result<()> {
    let sampling = args.sampling.config()?;
    let engine = args.model.load(device)?;
    let text = if args.chat {
        engine.render_chat(&[Message::user(args.prompt.clone())])?
    } else {
        args.prompt.clone()
    };
    let tok = engine.tokenizer();
    let ids = tok.encode(&text, !args.chat && tok.add_bos_by_default())?;
    let (bar, mut progress) = progress_reporter(ids.len());
    let mut session = engine.session()?;
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let stats = session.generate(
        &ids,
        args.max_tokens,
        &sampling,
        None,
        &mut progress,
        &mut |piece| {
            bar.finish_and_clear();
            match stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
            {
                Ok(()) => Flow::Continue,
                Err(e) => {
                    write_error = Some(e);
                    Flow::Stop
                }
            }
        },
    )?;
    if let Some(e) = write_error {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing to stdout");
        }
    }
    let _ = writeln!(stdout);
    print_stats(&stats);
    if let Some(line) = session.kv().fidelity_summary() {
        eprintln!("tandem: {line}");
    }
    Ok(())
}

struct Chat<'a>(&'a chat::ChatArgs);

impl DeviceTask for Chat<'_> {
    fn run<D: DenseDevice + 'static>(self, device: D) -> Result<()> {
        chat::run(self.0, device)
    }
}

fn tokenize(args: TokenizeArgs) -> Result<()> {
    let path = resolve_model_path(args.model.model.as_deref());
    let file = tandem_runtime::model::gguf::GgufFile::open(&path)?;
    let tokenizer = tandem_runtime::tokenizer::Tokenizer::from_gguf(&file)?;
    let ids = tokenizer.encode(&args.text, args.bos)?;
    if args.json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        for id in ids {
            println!("{id}\t{}", tokenizer.token_text(id).unwrap_or_default());
        }
    }
    Ok(())
}

struct BenchDecode<'a>(&'a BenchDecodeArgs);

impl DeviceTask for BenchDecode<'_> {
    fn run<D: DenseDevice + 'static>(self, device: D) -> Result<()> {
        bench_decode(self.0, device)
    }
}

fn bench_decode<D: DenseDevice>(args: &BenchDecodeArgs, device: D) -> Result<()> {
    let options = args.model.options()?;
    let source = match &args.shape {
        Some(shape) => ModelSource::Shape(shape.clone()),
        None => ModelSource::Model(resolve_model_path(args.model.model.as_deref())),
    };
    let opts = DecodeBenchOptions {
        source,
        contexts: args.context.clone(),
        policy: options.policy.clone(),
        batch: args.batch,
        tokens: args.tokens,
        threads: options.threads,
        cpu_workers: options.cpu_workers,
        fill_text: match &args.shape {
            Some(_) => String::new(),
            None => corpus::read(&corpus::data_dir().join("fill.txt"))?,
        },
        seed: args.seed,
        prefill_max: args.prefill_max,
        memory_limit: options.memory_limit,
    };
    let results = run_decode_bench_on(&opts, device, &mut |line| eprintln!("tandem: {line}"))?;
    for r in &results {
        if args.json {
            println!("{}", serde_json::to_string(r)?);
        } else {
            println!(
                "{:<24} context {:>6} batch {}: {:8.2} ms/token {:8.1} tokens/s | device {:7.2} ms, CPU workers {:7.2} ms ({:.2} on the CPU; retrieval {:6.2}), wait {:7.2} ms | touched {:.2}%{}",
                r.policy,
                r.context,
                r.batch,
                r.ms_per_token,
                r.tokens_per_s,
                r.device_ms_per_token,
                r.cpu_attention_ms_per_token,
                r.cpu_attention_on_cpu_ms_per_token,
                r.cpu_retrieval_ms_per_token,
                r.wait_ms_per_token,
                100.0 * r.keys_touched_fraction,
                match (r.synthetic_weights, r.synthetic_kv) {
                    (true, _) => " [synthetic weights and KV]",
                    (false, true) => " [synthetic KV]",
                    _ => "",
                }
            );
        }
    }
    Ok(())
}

fn eval_threads(args: &EvalArgs) -> usize {
    threads_or_cores(args.threads, "--threads")
}

struct Eval<'a>(&'a EvalArgs);

impl DeviceTask for Eval<'_> {
    fn run<D: DenseDevice + 'static>(self, device: D) -> Result<()> {
        eval(self.0, device)
    }
}

fn eval<D: DenseDevice>(args: &EvalArgs, device: D) -> Result<()> {
    use tandem_bench::eval::needle::NeedleTask;
    use tandem_bench::eval::{
        docqa, load_engine, report, run_doc_qa_with, run_eval_with, EvalOptions,
    };
    let threads = eval_threads(args);
    // Policies contain commas themselves (lsh:k=8,l=75): separate by spaces or ';'.
    let policies: Vec<String> = args
        .policy
        .iter()
        .flat_map(|p| p.split(';'))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    let needle_tasks = args
        .needle_tasks
        .iter()
        .map(|t| {
            NeedleTask::parse(t).with_context(|| {
                format!("unknown needle task {t:?} (single, multikey, multivalue)")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let opts = EvalOptions {
        model: resolve_model_path(args.model.as_deref()),
        policies,
        contexts: args.context.clone(),
        scored: args.scored,
        needle_cases: args.needle_cases,
        needle_tasks,
        base: PolicyConfig {
            dense_layers: args.dense_layers.clone(),
            window: args.window,
            sinks: args.sinks,
            layout: args.layout.clone(),
            layout_window: args.layout_window,
            fidelity_check: args.fidelity_check,
            ..PolicyConfig::default()
        },
        threads,
        cpu_workers: threads,
        diagnose: args.diagnose,
    };
    let engine = load_engine(&opts, device)?;
    let rows = run_eval_with(&opts, &engine, &mut |line| eprintln!("tandem: {line}"))?;
    // Written first: the document questions run long after.
    if let Some(path) = &args.json {
        std::fs::write(path, report::to_json(&rows))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, report::svg_plot(&rows))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    print!("{}", report::markdown_table(&rows));
    print!("{}", report::needle_table(&rows));
    print!("{}", report::per_layer_tables(&rows));
    if let Some(top) = args.diagnose {
        print!("{}", report::head_tables(&rows, top));
    }
    if args.doc_qa {
        let questions = docqa::load_questions()?;
        let qa = run_doc_qa_with(&opts, &engine, &questions, &mut |line| {
            eprintln!("tandem: {line}")
        })?;
        print!("{}", report::doc_qa_table(&qa));
        if let Some(path) = &args.doc_qa_json {
            std::fs::write(path, serde_json::to_string_pretty(&qa)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

fn bench_attention(args: BenchAttentionArgs) -> Result<()> {
    let opts = tandem_bench::AttentionBenchOptions {
        context: args.context,
        shape: args.shape,
        policies: args.policy,
        threads: threads_or_cores(Some(args.threads), "--threads"),
        seed: args.seed,
        iterations: args.iterations,
        layers: args.layers,
        memory_limit: args.memory_limit,
    };
    let results = tandem_bench::run_attention_bench(&opts)?;
    if args.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print!("{}", tandem_bench::format_table(&results));
    }
    Ok(())
}
