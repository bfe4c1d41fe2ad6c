//! The library API: an [`Engine`] holds a model on a dense device, its
//! tokenizer, chat template, policy table and CPU attention workers; a
//! [`Session`] is one conversation with its keys and values.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_cpu::WorkerPool;
use tandem_gpu::{CpuDevice, DenseDevice};

use crate::chat::{ChatTemplate, Message, CHATML_TEMPLATE, COMPLETION_TEMPLATE};
use crate::error::{Error, Result};
use crate::memory::{activation_bytes, context_bytes, MemoryBudget, RunFootprint};
use crate::model::{load_gguf, Llama};
use crate::policy::{PolicyConfig, PolicyTable};
use crate::tokenizer::Tokenizer;

/// Where the set-up script puts the default model, relative to the repository.
pub const DEFAULT_MODEL_RELATIVE: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The models `scripts/setup.sh` fetches, by the short names `--model` takes.
pub const NAMED_MODELS: [(&str, &str); 2] = [
    ("smollm2", DEFAULT_MODEL_RELATIVE),
    ("gemma3", "models/gemma-3-270m-q4_k_m.gguf"),
];

/// The default model: `$TANDEM_MODEL` if set, else the set-up script's copy next to
/// the executable's repository or the current directory.
pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_MODEL") {
        return PathBuf::from(p);
    }
    set_up_copy(DEFAULT_MODEL_RELATIVE)
}

/// The model a `--model` argument names: a path, or a name of [`NAMED_MODELS`]
/// (where no file of that name exists); none, the default model.
pub fn resolve_model_path(arg: Option<&Path>) -> PathBuf {
    let Some(arg) = arg else {
        return default_model_path();
    };
    if arg.exists() {
        return arg.to_path_buf();
    }
    let name = arg.to_str().unwrap_or_default().to_ascii_lowercase();
    match NAMED_MODELS.iter().find(|(n, _)| *n == name) {
        Some((_, relative)) => set_up_copy(relative),
        None => arg.to_path_buf(),
    }
}

/// `relative` (a path under the repository) in the current directory or
/// beside the executable's repository, whichever exists (else the first).
fn set_up_copy(relative: &str) -> PathBuf {
    let mut candidates = vec![PathBuf::from(relative)];
    if let Ok(exe) = std::env::current_exe() {
        // target/release/tandem -> repository root.
        if let Some(root) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            candidates.push(root.join(relative));
        }
    }
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| candidates.swap_remove(0))
}

/// Tokens per forward pass during prefill.
pub const PREFILL_CHUNK: usize = 256;

/// Options of an engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Threads of the dense device.
    pub threads: usize,
    /// CPU attention workers (pinned threads serving the offloaded keys).
    pub cpu_workers: usize,
    /// Per-layer attention policies.
    pub policy: PolicyConfig,
    /// The most tokens a session holds (default and at most: the model's
    /// trained context).
    pub context: Option<usize>,
    /// The memory a session's context may take (default: the memory
    /// available when the model has loaded, see [`MemoryBudget::system`]).
    pub memory_limit: Option<u64>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        EngineOptions {
            threads: cores,
            cpu_workers: cores,
            policy: PolicyConfig::default(),
            context: None,
            memory_limit: None,
        }
    }
}

/// A loaded model with its tokenizer, chat template, policy table and CPU
/// attention workers.
pub struct Engine<D: DenseDevice = CpuDevice> {
    model: Llama<D>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    path: PathBuf,
    table: Arc<PolicyTable>,
    workers: Option<Arc<WorkerPool>>,
    build_threads: usize,
    context_limit: usize,
    budget: MemoryBudget,
}

impl Engine<CpuDevice> {
    /// Loads a GGUF model file or a Hugging Face Llama model directory onto
    /// the CPU device.
    pub fn load(path: &Path, options: &EngineOptions) -> Result<Engine> {
        Engine::load_on(path, CpuDevice::new(options.threads.max(1)), options)
    }
}

impl<D: DenseDevice> Engine<D> {
    /// Loads a GGUF model file or a Hugging Face Llama model directory onto `device`.
    pub fn load_on(path: &Path, device: D, options: &EngineOptions) -> Result<Engine<D>> {
        if !path.exists() {
            return Err(Error::Io {
                path: path.to_path_buf(),
                cause: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file (the default model is installed by scripts/setup.sh)",
                ),
            });
        }
        if path.is_dir() {
            return Engine::load_hf_dir(path, device, options);
        }
        let (file, model) = load_gguf(path, device)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        check_vocab(path, &tokenizer, &model)?;
        let token = |key: &str| {
            file.get(key)
                .and_then(|v| v.as_u64())
                .and_then(|id| tokenizer.token_text(id as u32))
                .unwrap_or_default()
        };
        // Without a template of its own, a vocabulary that knows ChatML's markers
        // gets ChatML; any other model is a base model, prompted by completion.
        let fallback = if tokenizer.token_id("<|im_start|>").is_some() {
            CHATML_TEMPLATE
        } else {
            COMPLETION_TEMPLATE
        };
        let template = ChatTemplate::with_fallback(
            file.get_str("tokenizer.chat_template"),
            fallback,
            &token("tokenizer.ggml.bos_token_id"),
            &token("tokenizer.ggml.eos_token_id"),
        )?;
        Engine::assemble(model, tokenizer, template, path, options)
    }

    fn assemble(
        model: Llama<D>,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        path: &Path,
        options: &EngineOptions,
    ) -> Result<Engine<D>> {
        let table = options.policy.resolve(&model.config().sliding_windows())?;
        table.check_kv_heads(model.config().n_kv_heads)?;
        let workers = if table.needs_workers() {
            let pool = WorkerPool::new(options.cpu_workers.max(1))?;
            Some(Arc::new(pool))
        } else {
            None
        };
        let trained = model.config().context_length;
        let context_limit = match options.context {
            Some(n) if n > trained => {
                return Err(Error::InvalidRequest(format!(
                    "a context of {n} tokens is more than the model's {trained}"
                )))
            }
            Some(n) => n,
            None => trained,
        };
        let budget = options
            .memory_limit
            .map_or_else(MemoryBudget::system, MemoryBudget::given);
        Ok(Engine {
            model,
            tokenizer,
            template,
            path: path.to_path_buf(),
            table: Arc::new(table),
            workers,
            build_threads: options.threads.max(1),
            context_limit,
            budget,
        })
    }

    /// Loads a Hugging Face Llama directory: `config.json`, `*.safetensors`,
    /// `tokenizer.json` and (optionally) `tokenizer_config.json` with the chat template.
    fn load_hf_dir(dir: &Path, device: D, options: &EngineOptions) -> Result<Engine<D>> {
        let model = Llama::from_hf_dir(dir, device)?;
        let tokenizer = Tokenizer::from_json_file(&dir.join("tokenizer.json"))?;
        check_vocab(dir, &tokenizer, &model)?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::bad_model(&config_path, format!("not valid JSON: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(source) => {
                return Err(Error::Io {
                    path: config_path,
                    cause: source,
                })
            }
        };
        // Special tokens are plain strings or `{"content": ...}` objects.
        let token = |key: &str| -> String {
            match config.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Object(o)) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_string(),
                _ => String::new(),
            }
        };
        let template = ChatTemplate::new(
            config.get("chat_template").and_then(|t| t.as_str()),
            &token("bos_token"),
            &token("eos_token"),
        )?;
        Engine::assemble(model, tokenizer, template, dir, options)
    }

    /// The model.
    pub fn model(&self) -> &Llama<D> {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The CPU attention workers (`None` when every layer is dense).
    pub fn workers(&self) -> Option<&Arc<WorkerPool>> {
        self.workers.as_ref()
    }

    /// The per-layer policy table.
    pub fn policy_table(&self) -> &PolicyTable {
        &self.table
    }

    /// The policy table, shared with every session.
    pub(crate) fn shared_table(&self) -> &Arc<PolicyTable> {
        &self.table
    }

    /// The most tokens a session holds.
    pub fn context_limit(&self) -> usize {
        self.context_limit
    }

    /// The memory a session's context may take.
    pub fn memory_budget(&self) -> MemoryBudget {
        self.budget
    }

    /// Refuses a context of `tokens` tokens that would not fit in the budget
    /// with the model's weights and a prefill chunk's activations.
    pub fn check_memory(&self, tokens: usize) -> Result<()> {
        let config = self.model.config();
        let run = RunFootprint {
            weights: self.model.weight_bytes() as u64,
            activations: activation_bytes(config, PREFILL_CHUNK).unwrap_or(u64::MAX),
        };
        let context = context_bytes(&self.table, config.attention_shape(), tokens, 1);
        self.budget.check(
            &format!("a context of {tokens} tokens with the model's weights and a prefill chunk"),
            run.with_context(context),
        )
    }

    /// Dense-device threads that build offloaded stores.
    pub(crate) fn build_threads(&self) -> usize {
        self.build_threads
    }

    /// Renders a conversation with the model's chat template, ready for the reply.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        self.template.render(messages, true)
    }
}

/// The tokenizer's ids must all have an embedding row.
fn check_vocab<D: DenseDevice>(path: &Path, tokenizer: &Tokenizer, model: &Llama<D>) -> Result<()> {
    if tokenizer.vocab_size() > model.config().vocab_size {
        return Err(Error::bad_model(
            path,
            format!(
                "the tokenizer has {} tokens but the embedding only {}",
                tokenizer.vocab_size(),
                model.config().vocab_size
            ),
        ));
    }
    Ok(())
}
