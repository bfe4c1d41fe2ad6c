//! The engine thread: steps every sequence in flight as one batch, and
//! between two steps runs one chunk of a new request's prompt, so a long
//! prompt slows the replies in flight instead of pausing them.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use tandem_gpu::DenseDevice;
use tandem_runtime::{Engine, Session};

use crate::error::ApiError;
use crate::job::{Event, Job, Prompt};
use crate::metrics::{Metrics, Outcome};
use crate::prefill::{Prefilling, Waiting};
use crate::sequence::{Next, Sequence};

/// Limits the engine thread applies to each request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Sequences in one batch.
    pub max_sequences: usize,
    /// Prompt plus reply tokens.
    pub context: usize,
    /// Reply tokens of a request that names no `max_tokens` (less where the
    /// context has less room left).
    pub default_max_tokens: usize,
}

struct Scheduler<'e, D: DenseDevice> {
    engine: &'e Engine<D>,
    limits: Limits,
    metrics: Arc<Metrics>,
    waiting: VecDeque<Waiting>,
    /// The request whose prompt is going in, one chunk per step.
    prefilling: Option<Prefilling<'e, D>>,
    active: Vec<Sequence<'e, D>>,
}

/// Serves `jobs` until their channel closes and nothing is left in flight.
pub(crate) fn run<D: DenseDevice>(
    engine: &Engine<D>,
    limits: Limits,
    metrics: Arc<Metrics>,
    jobs: Receiver<Job>,
) {
    let mut s = Scheduler {
        engine,
        limits,
        metrics,
        waiting: VecDeque::new(),
        prefilling: None,
        active: Vec::new(),
    };
    while s.receive(&jobs) {
        s.admit_one();
        s.prefill_chunk();
        s.step();
        s.metrics.set_active(s.active.len());
    }
}

impl<'e, D: DenseDevice> Scheduler<'e, D> {
    /// Takes the jobs sent so far, waiting for one when idle; false once the
    /// channel has closed and nothing is in flight.
    fn receive(&mut self, jobs: &Receiver<Job>) -> bool {
        if self.idle() {
            match jobs.recv() {
                Ok(job) => self.prepare(job),
                Err(_) => return false,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => self.prepare(job),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return !self.idle(),
            }
        }
    }

    fn idle(&self) -> bool {
        self.active.is_empty() && self.waiting.is_empty() && self.prefilling.is_none()
    }

    /// Tokenizes a job's prompt and queues it, or refuses it.
    fn prepare(&mut self, job: Job) {
        let checked = self
            .tokenize(&job)
            .and_then(|ids| Ok((self.reply_budget(&job, ids.len())?, ids)));
        match checked {
            Ok((max_tokens, ids)) => {
                let _ = job.events.send(Event::Started {
                    prompt_tokens: ids.len(),
                });
                self.waiting.push_back(Waiting {
                    job,
                    ids,
                    max_tokens,
                });
            }
            Err(e) => self.end(&job, Outcome::Failed, 0, 0, Some(e)),
        }
    }

    /// The reply tokens a request gets: what it asked if that fits beside
    /// its prompt (else 400, as OpenAI answers), or the default within the
    /// room left.
    fn reply_budget(&self, job: &Job, prompt: usize) -> Result<usize, ApiError> {
        let context = self.limits.context;
        if prompt >= context {
            return Err(ApiError::context_exceeded(format!(
                "this server's context holds {context} tokens (prompt and reply); \
                 the prompt has {prompt}, which leaves no room for a reply"
            )));
        }
        let room = context - prompt;
        match job.max_tokens {
            None => Ok(self.limits.default_max_tokens.min(room)),
            Some(asked) if asked <= room => Ok(asked),
            Some(asked) => Err(ApiError::context_exceeded(format!(
                "this server's context holds {context} tokens (prompt and reply); \
                 {} were asked: {prompt} in the prompt and {asked} in max_tokens. \
                 Ask for at most {room} tokens or shorten the prompt",
                prompt + asked
            ))),
        }
    }

    fn tokenize(&self, job: &Job) -> Result<Vec<u32>, ApiError> {
        let tokenizer = self.engine.tokenizer();
        let ids = match &job.prompt {
            Prompt::Chat(messages) => {
                let text = self
                    .engine
                    .render_chat(messages)
                    .map_err(|e| ApiError::bad_request(format!("chat template: {e}")))?;
                tokenizer.encode(&text, false)
            }
            Prompt::Text(text) => tokenizer.encode(text, tokenizer.add_bos_by_default()),
        }
        .map_err(|e| ApiError::bad_request(format!("tokenizer: {e}")))?;
        if ids.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty"));
        }
        Ok(ids)
    }

    /// Starts the prefill of the first waiting request whose client is
    /// still there, if none is prefilling and the batch has room.
    fn admit_one(&mut self) {
        if self.prefilling.is_some() || self.active.len() >= self.limits.max_sequences {
            return;
        }
        while let Some(w) = self.waiting.pop_front() {
            if w.job.events.is_closed() {
                self.end(&w.job, Outcome::Cancelled, w.ids.len(), 0, None);
                continue;
            }
            match self.new_session(w.ids.len()) {
                Ok(session) => self.prefilling = Some(Prefilling::new(w, session)),
                Err(e) => {
                    let e = ApiError::internal(format!("prefill: {e}"));
                    self.end(&w.job, Outcome::Failed, w.ids.len(), 0, Some(e));
                }
            }
            return;
        }
    }

    /// A session for a prompt of `tokens` tokens, if its context fits in
    /// the memory budget.
    fn new_session(&self, tokens: usize) -> tandem_runtime::Result<Session<'e, D>> {
        self.engine.check_memory(tokens)?;
        self.engine.session()
    }

    /// Runs one chunk of the prompt being prefilled: a request whose client
    /// has gone is dropped, and one whose prompt is all in joins the batch.
    fn prefill_chunk(&mut self) {
        let Some(mut p) = self.prefilling.take() else {
            return;
        };
        let prompt = p.request.ids.len();
        if p.request.job.events.is_closed() {
            self.end(&p.request.job, Outcome::Cancelled, prompt, 0, None);
            return;
        }
        match p.advance() {
            Ok(None) => self.prefilling = Some(p),
            Ok(Some(logits)) => {
                let Waiting {
                    job, max_tokens, ..
                } = p.request;
                let seq = Sequence::new(self.engine, job, p.session, logits, max_tokens);
                self.active.push(seq);
            }
            Err(e) => {
                let e = ApiError::internal(format!("prefill: {e}"));
                self.end(&p.request.job, Outcome::Failed, prompt, 0, Some(e));
            }
        }
    }

    /// Samples every sequence's next token, then feeds the continuing ones
    /// in one batched step.
    fn step(&mut self) {
        let mut feed = Vec::with_capacity(self.active.len());
        let mut over = Vec::new();
        for (i, seq) in self.active.iter_mut().enumerate() {
            match seq.advance(self.engine) {
                Ok(Next::Feed(token)) => feed.push((i, token)),
                Ok(Next::Finished) => over.push((i, Outcome::Completed, None)),
                Ok(Next::Cancelled) => over.push((i, Outcome::Cancelled, None)),
                Err(e) => {
                    let e = ApiError::internal(format!("decoding: {e}"));
                    over.push((i, Outcome::Failed, Some(e)));
                }
            }
        }
        if let Err(e) = self.step_batch(&feed) {
            for &(i, _) in &feed {
                let e = ApiError::internal(format!("decode step: {e}"));
                over.push((i, Outcome::Failed, Some(e)));
            }
        }
        over.sort_by_key(|o| std::cmp::Reverse(o.0));
        for (i, outcome, error) in over {
            let seq = self.active.swap_remove(i);
            self.end(&seq.job, outcome, seq.prompt_tokens, seq.generated(), error);
        }
    }

    fn step_batch(&mut self, feed: &[(usize, u32)]) -> tandem_runtime::Result<()> {
        if feed.is_empty() {
            return Ok(());
        }
        let mut fed = feed.iter().map(|f| f.0).peekable();
        let mut sessions: Vec<&mut Session<'e, D>> = Vec::with_capacity(feed.len());
        for (i, seq) in self.active.iter_mut().enumerate() {
            if fed.next_if_eq(&i).is_some() {
                sessions.push(&mut seq.session);
            }
        }
        let tokens: Vec<u32> = feed.iter().map(|f| f.1).collect();
        let logits = self.engine.step_batch(&mut sessions, &tokens)?;
        for (&(i, _), l) in feed.iter().zip(logits) {
            self.active[i].set_logits(l);
        }
        Ok(())
    }

    /// Counts, logs and, for an error, tells the client how a request ended.
    fn end(
        &self,
        job: &Job,
        outcome: Outcome,
        prompt: usize,
        reply: usize,
        error: Option<ApiError>,
    ) {
        self.metrics.record(outcome, prompt, reply);
        let how = match (&outcome, &error) {
            (_, Some(e)) => format!("failed ({}): {}", e.status.as_u16(), e.message),
            (Outcome::Cancelled, None) => "cancelled: the client went away".to_string(),
            _ => "completed".to_string(),
        };
        eprintln!(
            "tandem serve: {} {how} after {prompt} prompt and {reply} reply tokens",
            job.id
        );
        if let Some(e) = error {
            let _ = job.events.send(Event::Failed(e));
        }
    }
}
