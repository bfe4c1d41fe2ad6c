//! One conversation: its tokens so far and their keys and values.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tandem_gpu::{CpuDevice, DenseDevice};

use crate::engine::{Engine, PREFILL_CHUNK};
use crate::error::{Error, Result};
use crate::model::Logits;
use crate::split::SequenceKv;

/// One conversation: its tokens so far and their keys and values (on the
/// device and, for long contexts, offloaded to the CPU workers).
pub struct Session<'e, D: DenseDevice = CpuDevice> {
    pub(crate) engine: &'e Engine<D>,
    pub(crate) kv: SequenceKv<D>,
    pub(crate) tokens: Vec<u32>,
    /// The logits after the last token, when the last call computed them
    /// (a saved session keeps them, so its resumption needs no forward pass).
    pub(crate) last_logits: Option<Vec<f32>>,
}

impl<D: DenseDevice> Engine<D> {
    /// A new conversation.
    pub fn session(&self) -> Result<Session<'_, D>> {
        let c = self.model().config();
        let kv = SequenceKv::new(
            Arc::clone(self.model().device()),
            c.n_layers,
            c.attention_shape(),
            Arc::clone(self.shared_table()),
            self.workers().cloned(),
        )?;
        Ok(Session::new(self, kv))
    }
}

impl<'e, D: DenseDevice> Session<'e, D> {
    fn new(engine: &'e Engine<D>, kv: SequenceKv<D>) -> Session<'e, D> {
        Session {
            engine,
            kv,
            tokens: Vec::new(),
            last_logits: None,
        }
    }

    /// Tokens in the context.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The keys and values (for sizes and counters).
    pub fn kv(&self) -> &SequenceKv<D> {
        &self.kv
    }

    /// Forgets the conversation.
    pub fn reset(&mut self) {
        self.kv.reset();
        self.tokens.clear();
        self.last_logits = None;
    }

    /// Drops tokens from `len` on (e.g. to undo an interrupted reply). Fails,
    /// changing nothing, if some of them were already offloaded.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.kv.truncate(len)?;
        if len < self.tokens.len() {
            self.last_logits = None;
        }
        self.tokens.truncate(len);
        Ok(())
    }

    /// Runs one token and returns the logits after it (a decode step; the
    /// sparse layers move their older tokens to the CPU workers first if the
    /// context has grown long enough).
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        self.check_room(1)?;
        self.last_logits = None;
        self.kv.offload_if_due(self.engine.build_threads())?;
        let logits = self
            .engine
            .model()
            .forward(&[token], &mut self.kv, Logits::Last)?;
        self.tokens.push(token);
        self.last_logits = Some(logits.clone());
        Ok(logits)
    }

    /// Runs `tokens` into the context in chunks, reporting `(done, total)` after each;
    /// returns the logits after the last token.
    pub fn prefill(
        &mut self,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>> {
        self.prefill_cancellable(tokens, progress, None)
    }

    /// [`Session::prefill`], stopping soon after `cancel` becomes true (it is
    /// read before every layer of every chunk). Then the call fails with
    /// [`Error::Cancelled`] and the session holds what it held before; where
    /// the interrupted chunk could not be taken back (it had moved rows off
    /// the device), the session is reset.
    pub fn prefill_cancellable(
        &mut self,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize),
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<f32>> {
        let start = self.tokens.len();
        let result = self.prefill_chunks(tokens, progress, cancel);
        if matches!(result, Err(Error::Cancelled)) {
            self.undo_to(start);
        }
        result
    }

    /// Runs one part of a prompt into the context and leaves all of it on
    /// the device: a prompt fed in parts (to interleave it with other work)
    /// ends with a [`Session::prefill`] of its last part, which moves the
    /// long context out as a prefill of the whole prompt would. Parts of a
    /// multiple of [`PREFILL_CHUNK`] tokens give the logits that prefill
    /// gives.
    pub fn prefill_part(&mut self, tokens: &[u32]) -> Result<()> {
        self.run_chunks(tokens, &mut |_, _| {}, None).map(drop)
    }

    fn prefill_chunks(
        &mut self,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize),
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<f32>> {
        let logits = self.run_chunks(tokens, progress, cancel)?;
        // A prompt runs dense on the device; then the long context moves out.
        self.kv.offload_if_due(self.engine.build_threads())?;
        self.last_logits = Some(logits.clone());
        Ok(logits)
    }

    /// Runs `tokens` through the model a chunk at a time; returns the
    /// logits after the last.
    fn run_chunks(
        &mut self,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize),
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        self.check_room(tokens.len())?;
        self.engine.check_memory(self.tokens.len() + tokens.len())?;
        let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
        self.last_logits = None;
        let mut logits = Vec::new();
        for (i, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            logits =
                self.engine
                    .model()
                    .forward_until(chunk, &mut self.kv, Logits::Last, &cancelled)?;
            self.tokens.extend_from_slice(chunk);
            progress(
                (i * PREFILL_CHUNK + chunk.len()).min(tokens.len()),
                tokens.len(),
            );
        }
        if cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(logits)
    }

    /// Goes back to the first `len` tokens, or, where that cannot be done,
    /// to an empty context.
    pub(crate) fn undo_to(&mut self, len: usize) {
        if self.kv.check_usable().is_err() || self.truncate(len).is_err() {
            self.reset();
        }
    }

    /// Whether `more` tokens still fit in the context.
    pub(crate) fn has_room(&self, more: usize) -> bool {
        self.tokens
            .len()
            .checked_add(more)
            .is_some_and(|n| n <= self.engine.context_limit())
    }

    fn check_room(&self, more: usize) -> Result<()> {
        if !self.has_room(more) {
            return Err(Error::InvalidRequest(format!(
                "the context would hold {} tokens, more than its {}",
                self.tokens.len().saturating_add(more),
                self.engine.context_limit()
            )));
        }
        Ok(())
    }
}
