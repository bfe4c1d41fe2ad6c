//! The library API: an [`Engine`] holds a model and its tokenizer; a [`Session`] is
//! one conversation with its KV cache; [`Session::generate`] streams tokens.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::sync::Arc;

use tandem_cpu::WorkerPool;
use tandem_gpu::CpuDevice;

use crate::chat::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::model::{load_gguf, Llama, Logits, Step};
use crate::policy::{PolicyConfig, PolicyTable};
use crate::sampling::{Sampler, SamplingConfig};
use crate::split::{SequenceKv, StepCounters};
use crate::tokenizer::{TextStream, Tokenizer};

/// Where the set-up script puts the default model, relative to the repository.
pub const DEFAULT_MODEL_RELATIVE: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The default model: `$TANDEM_MODEL` if set, else the set-up script's copy next to
/// the executable's repository or the current directory.
pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_MODEL") {
        return PathBuf::from(p);
    }
    let mut candidates = vec![PathBuf::from(DEFAULT_MODEL_RELATIVE)];
    if let Ok(exe) = std::env::current_exe() {
        // target/release/tandem -> repository root.
        if let Some(root) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            candidates.push(root.join(DEFAULT_MODEL_RELATIVE));
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
}

impl Default for EngineOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        EngineOptions {
            threads: cores,
            cpu_workers: cores,
            policy: PolicyConfig::default(),
        }
    }
}

/// A loaded model with its tokenizer, chat template, policy table and CPU
/// attention workers.
pub struct Engine {
    model: Llama<CpuDevice>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    path: PathBuf,
    table: Arc<PolicyTable>,
    workers: Option<Arc<WorkerPool>>,
    build_threads: usize,
}

/// Timings of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    pub decode_time: Duration,
    /// Where the decode steps' time went (device vs CPU workers).
    pub split: StepCounters,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prompt_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second (the first is produced by the prompt pass and not counted).
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

impl Engine {
    /// Loads a GGUF model file or a Hugging Face Llama model directory.
    pub fn load(path: &Path, options: &EngineOptions) -> Result<Engine> {
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
            return Engine::load_hf_dir(path, options);
        }
        let (file, model) = load_gguf(path, CpuDevice::new(options.threads.max(1)))?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        check_vocab(path, &tokenizer, &model)?;
        let token = |key: &str| {
            file.get(key)
                .and_then(|v| v.as_u64())
                .and_then(|id| tokenizer.token_text(id as u32))
                .unwrap_or_default()
        };
        let template = ChatTemplate::new(
            file.get_str("tokenizer.chat_template"),
            &token("tokenizer.ggml.bos_token_id"),
            &token("tokenizer.ggml.eos_token_id"),
        )?;
        Engine::assemble(model, tokenizer, template, path, options)
    }

    fn assemble(
        model: Llama<CpuDevice>,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        path: &Path,
        options: &EngineOptions,
    ) -> Result<Engine> {
        let table = options.policy.resolve(model.config().n_layers)?;
        let workers = if table.is_sparse() {
            let pool = WorkerPool::new(options.cpu_workers.max(1))
                .map_err(|e| Error::Engine(format!("starting the CPU attention workers: {e}")))?;
            Some(Arc::new(pool))
        } else {
            None
        };
        Ok(Engine {
            model,
            tokenizer,
            template,
            path: path.to_path_buf(),
            table: Arc::new(table),
            workers,
            build_threads: options.threads.max(1),
        })
    }

    /// Loads a Hugging Face Llama directory: `config.json`, `*.safetensors`,
    /// `tokenizer.json` and (optionally) `tokenizer_config.json` with the chat template.
    fn load_hf_dir(dir: &Path, options: &EngineOptions) -> Result<Engine> {
        let model = Llama::from_hf_dir(dir, CpuDevice::new(options.threads.max(1)))?;
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
    pub fn model(&self) -> &Llama<CpuDevice> {
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

    /// A new conversation.
    pub fn session(&self) -> Session<'_> {
        let c = self.model.config();
        let kv = SequenceKv::new(
            c.n_layers,
            c.attention_shape(),
            Arc::clone(&self.table),
            self.workers.clone(),
        )
        // The table was resolved for this model and the pool exists when it is sparse.
        .unwrap_or_else(|_| SequenceKv::dense(c.n_layers, c.attention_shape()));
        Session {
            engine: self,
            kv,
            tokens: Vec::new(),
        }
    }

    /// Generates for several sessions together, each from its own prompt: their
    /// decode steps run as one batch (the weights are read once per step for
    /// all, and the CPU workers attend one session while the device attends
    /// another). `on_text(i, text)` receives session `i`'s text; returning
    /// [`Flow::Stop`] ends that session only. Returns per-session statistics.
    pub fn generate_batch(
        &self,
        sessions: &mut [&mut Session<'_>],
        prompts: &[&[u32]],
        max_tokens: usize,
        sampling: &SamplingConfig,
        cancel: Option<&AtomicBool>,
        on_text: &mut dyn FnMut(usize, &str) -> Flow,
    ) -> Result<Vec<GenerationStats>> {
        sampling.validate().map_err(Error::InvalidRequest)?;
        if sessions.len() != prompts.len() {
            return Err(Error::InvalidRequest(format!(
                "{} sessions but {} prompts",
                sessions.len(),
                prompts.len()
            )));
        }
        if sessions.iter().any(|s| !std::ptr::eq(s.engine, self)) {
            return Err(Error::InvalidRequest(
                "every session must belong to this engine".into(),
            ));
        }
        let mut stats = Vec::with_capacity(sessions.len());
        let mut logits = Vec::with_capacity(sessions.len());
        for (s, p) in sessions.iter_mut().zip(prompts) {
            let start = Instant::now();
            logits.push(s.prefill(p, &mut |_, _| {})?);
            stats.push(GenerationStats {
                prompt_tokens: p.len(),
                prompt_time: start.elapsed(),
                ..Default::default()
            });
        }
        let decode_start = Instant::now();
        let mut samplers: Vec<Sampler> = (0..sessions.len())
            .map(|_| Sampler::new(sampling.clone()))
            .collect();
        let mut streams: Vec<TextStream> = (0..sessions.len())
            .map(|_| TextStream::new(&self.tokenizer))
            .collect();
        let mut live: Vec<bool> = vec![max_tokens > 0; sessions.len()];
        let limit = self.model.config().context_length;
        let mut next = vec![0u32; sessions.len()];
        for _ in 0..max_tokens {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                break;
            }
            for i in 0..sessions.len() {
                if !live[i] {
                    continue;
                }
                next[i] = samplers[i].sample(&mut logits[i], &sessions[i].tokens);
                stats[i].generated_tokens += 1;
                let end = self.tokenizer.is_end_of_turn(next[i]);
                let text = if end {
                    String::new()
                } else {
                    streams[i].push(next[i])?
                };
                if end
                    || (!text.is_empty() && on_text(i, &text) == Flow::Stop)
                    || sessions[i].tokens.len() + 1 >= limit
                {
                    live[i] = false;
                }
            }
            let running: Vec<usize> = (0..sessions.len()).filter(|&i| live[i]).collect();
            if running.is_empty() {
                break;
            }
            let mut steps = Vec::with_capacity(running.len());
            for (i, s) in sessions.iter_mut().enumerate() {
                if live[i] {
                    s.kv.offload_if_due(self.build_threads)?;
                    steps.push(Step {
                        tokens: std::slice::from_ref(&next[i]),
                        kv: &mut s.kv,
                        want: Logits::Last,
                    });
                }
            }
            let out = self.model.forward_batch(&mut steps)?;
            drop(steps);
            for (&i, l) in running.iter().zip(out) {
                sessions[i].tokens.push(next[i]);
                logits[i] = l;
            }
        }
        for (i, s) in sessions.iter_mut().enumerate() {
            let rest = streams[i].finish()?;
            if !rest.is_empty() {
                on_text(i, &rest);
            }
            stats[i].decode_time = decode_start.elapsed();
            stats[i].split = s.kv.take_counters();
        }
        Ok(stats)
    }

    /// Renders a conversation with the model's chat template, ready for the reply.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        self.template.render(messages, true)
    }
}

/// What a streaming callback tells the generation loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// One conversation: its tokens so far and their keys and values (on the
/// device and, for long contexts, offloaded to the CPU workers).
pub struct Session<'e> {
    engine: &'e Engine,
    kv: SequenceKv,
    tokens: Vec<u32>,
}

impl<'e> Session<'e> {
    /// Tokens in the context.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The keys and values (for sizes, counters and probes).
    pub fn kv(&self) -> &SequenceKv {
        &self.kv
    }

    /// The keys and values, mutably (to turn probes on).
    pub fn kv_mut(&mut self) -> &mut SequenceKv {
        &mut self.kv
    }

    /// Forgets the conversation.
    pub fn reset(&mut self) {
        self.kv.reset();
        self.tokens.clear();
    }

    /// Drops tokens from `len` on (e.g. to undo an interrupted reply). Fails,
    /// changing nothing, if some of them were already offloaded.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.kv.truncate(len)?;
        self.tokens.truncate(len);
        Ok(())
    }

    /// Runs one token and returns the logits after it (a decode step; the
    /// sparse layers move their older tokens to the CPU workers first if the
    /// context has grown long enough).
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        self.check_room(1)?;
        self.kv.offload_if_due(self.engine.build_threads)?;
        let logits = self
            .engine
            .model
            .forward(&[token], &mut self.kv, Logits::Last)?;
        self.tokens.push(token);
        Ok(logits)
    }

    fn check_room(&self, more: usize) -> Result<()> {
        let limit = self.engine.model.config().context_length;
        if self.tokens.len() + more > limit {
            return Err(Error::InvalidRequest(format!(
                "the context would hold {} tokens, more than the model's {limit}",
                self.tokens.len() + more
            )));
        }
        Ok(())
    }

    /// Runs `tokens` into the context in chunks, reporting `(done, total)` after each;
    /// returns the logits after the last token.
    pub fn prefill(
        &mut self,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        self.check_room(tokens.len())?;
        let mut logits = Vec::new();
        for (i, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            logits = self
                .engine
                .model
                .forward(chunk, &mut self.kv, Logits::Last)?;
            self.tokens.extend_from_slice(chunk);
            progress(
                (i * PREFILL_CHUNK + chunk.len()).min(tokens.len()),
                tokens.len(),
            );
        }
        // A prompt runs dense on the device; then the long context moves out.
        self.kv.offload_if_due(self.engine.build_threads)?;
        Ok(logits)
    }

    /// Adds `prompt` to the context and generates up to `max_tokens` tokens, calling
    /// `on_text` with each piece of decoded text. Stops at an end-of-turn token, at
    /// the context limit, when `on_text` says so, or when `cancel` becomes true.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampling: &SamplingConfig,
        cancel: Option<&AtomicBool>,
        progress: &mut dyn FnMut(usize, usize),
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<GenerationStats> {
        sampling.validate().map_err(Error::InvalidRequest)?;
        let mut stats = GenerationStats {
            prompt_tokens: prompt.len(),
            ..Default::default()
        };
        let start = Instant::now();
        let mut logits = self.prefill(prompt, progress)?;
        stats.prompt_time = start.elapsed();
        let decode_start = Instant::now();
        let mut sampler = Sampler::new(sampling.clone());
        let mut stream = TextStream::new(&self.engine.tokenizer);
        let limit = self.engine.model.config().context_length;
        for _ in 0..max_tokens {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                break;
            }
            let next = sampler.sample(&mut logits, &self.tokens);
            stats.generated_tokens += 1;
            if self.engine.tokenizer.is_end_of_turn(next) {
                // Keep the end of turn in the context so a chat continues correctly.
                if self.tokens.len() < limit {
                    self.step(next)?;
                }
                break;
            }
            let text = stream.push(next)?;
            if !text.is_empty() && on_text(&text) == Flow::Stop {
                break;
            }
            if self.tokens.len() + 1 >= limit {
                break;
            }
            logits = self.step(next)?;
        }
        let rest = stream.finish()?;
        if !rest.is_empty() {
            on_text(&rest);
        }
        stats.decode_time = decode_start.elapsed();
        stats.split = self.kv.take_counters();
        Ok(stats)
    }
}

/// The tokenizer's ids must all have an embedding row.
fn check_vocab(path: &Path, tokenizer: &Tokenizer, model: &Llama<CpuDevice>) -> Result<()> {
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
