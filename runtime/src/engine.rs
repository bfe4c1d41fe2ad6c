//! The library API: an [`Engine`] holds a model and its tokenizer; a [`Session`] is
//! one conversation with its KV cache; [`Session::generate`] streams tokens.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tandem_gpu::{CpuDevice, KvCache};

use crate::chat::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::model::{load_gguf, Llama, Logits};
use crate::sampling::{Sampler, SamplingConfig};
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
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// A loaded model with its tokenizer and chat template.
pub struct Engine {
    model: Llama<CpuDevice>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    path: PathBuf,
}

/// Timings of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    pub decode_time: Duration,
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
        Ok(Engine {
            model,
            tokenizer,
            template,
            path: path.to_path_buf(),
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
        Ok(Engine {
            model,
            tokenizer,
            template,
            path: dir.to_path_buf(),
        })
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

    /// A new conversation.
    pub fn session(&self) -> Session<'_> {
        Session {
            engine: self,
            cache: self.model.new_cache(),
            tokens: Vec::new(),
        }
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

/// One sequence: its tokens so far and their KV cache.
pub struct Session<'e> {
    engine: &'e Engine,
    cache: KvCache,
    tokens: Vec<u32>,
}

impl<'e> Session<'e> {
    /// Tokens in the context.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forgets the conversation.
    pub fn reset(&mut self) {
        self.cache.truncate(0);
        self.tokens.clear();
    }

    /// Drops tokens from `len` on (e.g. to undo an interrupted reply).
    pub fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
        self.tokens.truncate(len);
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
        let limit = self.engine.model.config().context_length;
        if self.tokens.len() + tokens.len() > limit {
            return Err(Error::InvalidRequest(format!(
                "the context would hold {} tokens, more than the model's {limit}",
                self.tokens.len() + tokens.len()
            )));
        }
        let mut logits = Vec::new();
        for (i, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            logits = self
                .engine
                .model
                .forward(chunk, &mut self.cache, Logits::Last)?;
            self.tokens.extend_from_slice(chunk);
            progress(
                (i * PREFILL_CHUNK + chunk.len()).min(tokens.len()),
                tokens.len(),
            );
        }
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
                self.engine
                    .model
                    .forward(&[next], &mut self.cache, Logits::Last)?;
                self.tokens.push(next);
                break;
            }
            let text = stream.push(next)?;
            if !text.is_empty() && on_text(&text) == Flow::Stop {
                break;
            }
            if self.tokens.len() + 1 >= limit {
                break;
            }
            logits = self
                .engine
                .model
                .forward(&[next], &mut self.cache, Logits::Last)?;
            self.tokens.push(next);
        }
        let rest = stream.finish()?;
        if !rest.is_empty() {
            on_text(&rest);
        }
        stats.decode_time = decode_start.elapsed();
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
