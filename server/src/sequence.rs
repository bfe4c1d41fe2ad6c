//! One request in the engine thread's batch: its session, sampler and the
//! text on its way to the client.

use tandem_gpu::DenseDevice;
use tandem_runtime::sampling::Sampler;
use tandem_runtime::tokenizer::TextStream;
use tandem_runtime::{Engine, Session};

use crate::job::{Event, Finish, Job};
use crate::stop::StopScanner;

/// A request whose prompt is in its session, decoding.
pub(crate) struct Sequence<'e, D: DenseDevice> {
    pub job: Job,
    pub session: Session<'e, D>,
    pub prompt_tokens: usize,
    /// The logits its next token is sampled from.
    logits: Vec<f32>,
    sampler: Sampler,
    text: TextStream<'e>,
    stop: StopScanner,
    generated: usize,
    /// Reply tokens it may generate (they fit in the context).
    max_tokens: usize,
}

/// What a sequence does after sampling a token.
pub(crate) enum Next {
    /// Feed this token in the next batched step.
    Feed(u32),
    /// The reply is over.
    Finished,
    /// The client went away.
    Cancelled,
}

impl<'e, D: DenseDevice> Sequence<'e, D> {
    /// A sequence whose session already holds the prompt.
    pub fn new(
        engine: &'e Engine<D>,
        mut job: Job,
        session: Session<'e, D>,
        logits: Vec<f32>,
        max_tokens: usize,
    ) -> Sequence<'e, D> {
        let prompt_tokens = session.tokens().len();
        Sequence {
            sampler: Sampler::new(job.sampling.clone()),
            text: TextStream::new(engine.tokenizer()),
            stop: StopScanner::new(std::mem::take(&mut job.stop)),
            job,
            session,
            prompt_tokens,
            logits,
            generated: 0,
            max_tokens,
        }
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Samples the next token and sends its text.
    pub fn advance(&mut self, engine: &Engine<D>) -> tandem_runtime::Result<Next> {
        if self.job.events.is_closed() {
            return Ok(Next::Cancelled);
        }
        let next = self.sampler.sample(&mut self.logits, self.session.tokens());
        self.generated += 1;
        if engine.tokenizer().is_end_of_turn(next) {
            return self.finish(Finish::Stop);
        }
        let piece = self.text.push(next)?;
        let (text, stopped) = self.stop.push(&piece);
        self.send_text(text);
        if stopped {
            return self.done(Finish::Stop);
        }
        if self.generated >= self.max_tokens {
            return self.finish(Finish::Length);
        }
        Ok(Next::Feed(next))
    }

    /// Takes the logits of the token just fed.
    pub fn set_logits(&mut self, logits: Vec<f32>) {
        self.logits = logits;
    }

    /// Sends the text still held back, then the end.
    fn finish(&mut self, finish: Finish) -> tandem_runtime::Result<Next> {
        let rest = self.text.finish()?;
        let (mut text, stopped) = self.stop.push(&rest);
        if stopped {
            self.send_text(text);
            return self.done(Finish::Stop);
        }
        text.push_str(&self.stop.finish());
        self.send_text(text);
        self.done(finish)
    }

    fn done(&mut self, finish: Finish) -> tandem_runtime::Result<Next> {
        let _ = self.job.events.send(Event::Done {
            finish,
            completion_tokens: self.generated,
        });
        Ok(Next::Finished)
    }

    fn send_text(&self, text: String) {
        if !text.is_empty() {
            // A closed channel is noticed at the next step.
            let _ = self.job.events.send(Event::Text(text));
        }
    }
}
