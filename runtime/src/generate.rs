//! Generation: one decode loop that serves a single session and a batch alike.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tandem_gpu::DenseDevice;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::{Logits, Step};
use crate::sampling::{Sampler, SamplingConfig};
use crate::session::Session;
use crate::split::StepCounters;
use crate::tokenizer::TextStream;

/// Timings of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    pub decode_time: Duration,
    /// Where the decode steps' time went (device vs CPU workers).
    pub split: StepCounters,
    /// Why the generation stopped.
    pub stop: StopReason,
}

/// Why a generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StopReason {
    /// It generated the tokens asked for.
    #[default]
    MaxTokens,
    /// The model ended its turn.
    EndOfTurn,
    /// The context is full.
    ContextFull,
    /// The cancel flag was raised.
    Cancelled,
    /// The text callback said [`Flow::Stop`].
    Stopped,
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

/// What a streaming callback tells the generation loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

impl<'e, D: DenseDevice> Session<'e, D> {
    /// Adds `prompt` to the context and generates up to `max_tokens` tokens, calling
    /// `on_text` with each piece of decoded text. Stops at an end-of-turn token
    /// (which stays in the context, so a conversation continues correctly), at
    /// the context limit, when `on_text` says so, or when `cancel` becomes true
    /// ([`GenerationStats::stop`] says which). A `cancel` raised during the
    /// prompt's prefill fails the call with [`Error::Cancelled`] and leaves
    /// the session without the prompt (see [`Session::prefill_cancellable`]).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampling: &SamplingConfig,
        cancel: Option<&AtomicBool>,
        progress: &mut dyn FnMut(usize, usize),
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<GenerationStats> {
        let engine = self.engine;
        let mut stats = engine.generate_sessions(
            &mut [self],
            &[prompt],
            Request {
                max_tokens,
                sampling,
                cancel,
            },
            &mut |_, done, total| progress(done, total),
            &mut |_, text| on_text(text),
        )?;
        Ok(stats.remove(0))
    }
}

/// What every session of one generation is asked for.
struct Request<'a> {
    max_tokens: usize,
    sampling: &'a SamplingConfig,
    cancel: Option<&'a AtomicBool>,
}

impl<D: DenseDevice> Engine<D> {
    /// Generates for several sessions together, each from its own prompt: their
    /// decode steps run as one batch (the weights are read once per step for
    /// all, and the CPU workers attend one session while the device attends
    /// another). `on_text(i, text)` receives session `i`'s text; returning
    /// [`Flow::Stop`] ends that session only. Returns per-session statistics.
    pub fn generate_batch(
        &self,
        sessions: &mut [&mut Session<'_, D>],
        prompts: &[&[u32]],
        max_tokens: usize,
        sampling: &SamplingConfig,
        cancel: Option<&AtomicBool>,
        on_text: &mut dyn FnMut(usize, &str) -> Flow,
    ) -> Result<Vec<GenerationStats>> {
        self.generate_sessions(
            sessions,
            prompts,
            Request {
                max_tokens,
                sampling,
                cancel,
            },
            &mut |_, _, _| {},
            on_text,
        )
    }

    /// The decode loop behind [`Session::generate`] and
    /// [`Engine::generate_batch`]: prefill every session, then sample and
    /// step all live sessions together until each stops.
    fn generate_sessions(
        &self,
        sessions: &mut [&mut Session<'_, D>],
        prompts: &[&[u32]],
        request: Request<'_>,
        progress: &mut dyn FnMut(usize, usize, usize),
        on_text: &mut dyn FnMut(usize, &str) -> Flow,
    ) -> Result<Vec<GenerationStats>> {
        self.check_sessions(sessions, prompts, &request)?;
        let mut stats = Vec::with_capacity(sessions.len());
        let mut logits = Vec::with_capacity(sessions.len());
        let starts: Vec<usize> = sessions.iter().map(|s| s.tokens.len()).collect();
        for (i, (s, p)) in sessions.iter_mut().zip(prompts).enumerate() {
            let start = Instant::now();
            match s.prefill_cancellable(
                p,
                &mut |done, total| progress(i, done, total),
                request.cancel,
            ) {
                Ok(l) => logits.push(l),
                Err(e) => {
                    // No session keeps its prompt when one could not take it.
                    for (s, &len) in sessions.iter_mut().zip(&starts).take(i) {
                        s.undo_to(len);
                    }
                    return Err(e);
                }
            }
            stats.push(GenerationStats {
                prompt_tokens: p.len(),
                prompt_time: start.elapsed(),
                ..Default::default()
            });
        }
        let decode_start = Instant::now();
        let mut samplers: Vec<Sampler> = (0..sessions.len())
            .map(|_| Sampler::new(request.sampling.clone()))
            .collect();
        let mut streams: Vec<TextStream> = (0..sessions.len())
            .map(|_| TextStream::new(self.tokenizer()))
            .collect();
        let mut live = vec![request.max_tokens > 0; sessions.len()];
        for _ in 0..request.max_tokens {
            if request.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                for (i, _) in live.iter().enumerate().filter(|(_, &l)| l) {
                    stats[i].stop = StopReason::Cancelled;
                }
                break;
            }
            let mut feed = Vec::with_capacity(sessions.len());
            for i in 0..sessions.len() {
                if !live[i] {
                    continue;
                }
                let next = samplers[i].sample(&mut logits[i], &sessions[i].tokens);
                stats[i].generated_tokens += 1;
                if self.tokenizer().is_end_of_turn(next) {
                    // The end of turn stays in the context, if it fits.
                    live[i] = false;
                    stats[i].stop = StopReason::EndOfTurn;
                    if sessions[i].has_room(1) {
                        feed.push((i, next));
                    }
                    continue;
                }
                let text = streams[i].push(next)?;
                let stop = !text.is_empty() && on_text(i, &text) == Flow::Stop;
                if stop || !sessions[i].has_room(2) {
                    live[i] = false;
                    stats[i].stop = if stop {
                        StopReason::Stopped
                    } else {
                        StopReason::ContextFull
                    };
                    continue;
                }
                feed.push((i, next));
            }
            if feed.is_empty() {
                break;
            }
            for (i, l) in self.step_sessions(sessions, &feed)? {
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

    /// One decode step of several sessions together, for callers that let
    /// sessions join and leave between steps: session `i` takes `tokens[i]`,
    /// and its logits for the next token come back at `i`. The weights are
    /// read once for all. Fails before stepping any session if the counts
    /// differ, a session belongs to another engine or its context is full.
    pub fn step_batch(
        &self,
        sessions: &mut [&mut Session<'_, D>],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        if sessions.len() != tokens.len() {
            return Err(Error::InvalidRequest(format!(
                "{} sessions but {} tokens",
                sessions.len(),
                tokens.len()
            )));
        }
        self.check_owned(sessions)?;
        if let Some(full) = sessions.iter().find(|s| !s.has_room(1)) {
            return Err(Error::InvalidRequest(format!(
                "a session's context is full ({} tokens)",
                full.tokens.len()
            )));
        }
        let feed: Vec<(usize, u32)> = tokens.iter().copied().enumerate().collect();
        let out = self.step_sessions(sessions, &feed)?;
        Ok(out.into_iter().map(|(_, logits)| logits).collect())
    }

    /// One decode step of sessions `feed[..].0`, each with its token; returns
    /// each one's logits.
    fn step_sessions(
        &self,
        sessions: &mut [&mut Session<'_, D>],
        feed: &[(usize, u32)],
    ) -> Result<Vec<(usize, Vec<f32>)>> {
        let mut steps = Vec::with_capacity(feed.len());
        let mut fed = feed.iter().peekable();
        for (i, s) in sessions.iter_mut().enumerate() {
            let Some((_, token)) = fed.next_if(|(j, _)| *j == i) else {
                continue;
            };
            s.last_logits = None;
            s.kv.offload_if_due(self.build_threads())?;
            steps.push(Step {
                tokens: std::slice::from_ref(token),
                kv: &mut s.kv,
                want: Logits::Last,
            });
        }
        let out = self.model().forward_batch(&mut steps)?;
        drop(steps);
        for (&(i, token), logits) in feed.iter().zip(&out) {
            sessions[i].tokens.push(token);
            sessions[i].last_logits = Some(logits.clone());
        }
        Ok(feed.iter().map(|&(i, _)| i).zip(out).collect())
    }

    fn check_sessions(
        &self,
        sessions: &[&mut Session<'_, D>],
        prompts: &[&[u32]],
        request: &Request<'_>,
    ) -> Result<()> {
        request.sampling.validate().map_err(Error::InvalidRequest)?;
        if sessions.len() != prompts.len() {
            return Err(Error::InvalidRequest(format!(
                "{} sessions but {} prompts",
                sessions.len(),
                prompts.len()
            )));
        }
        self.check_owned(sessions)?;
        // Every session at its longest: its context, prompt and reply.
        let tokens = sessions
            .iter()
            .zip(prompts)
            .map(|(s, p)| {
                let most = s.tokens.len().saturating_add(p.len());
                most.saturating_add(request.max_tokens)
                    .min(self.context_limit().max(most))
            })
            .fold(0usize, usize::saturating_add);
        self.check_memory(tokens)
    }

    fn check_owned(&self, sessions: &[&mut Session<'_, D>]) -> Result<()> {
        if sessions.iter().any(|s| !std::ptr::eq(s.engine, self)) {
            return Err(Error::InvalidRequest(
                "every session must belong to this engine".into(),
            ));
        }
        Ok(())
    }
}
