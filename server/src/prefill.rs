//! A request on its way into the batch: its prompt, then its prompt going
//! into a session a chunk at a time between the batch's decode steps.

use tandem_gpu::DenseDevice;
use tandem_runtime::{Session, PREFILL_CHUNK};

use crate::job::Job;

/// A request whose prompt is tokenized, waiting for a place in the batch.
pub(crate) struct Waiting {
    pub job: Job,
    pub ids: Vec<u32>,
    /// Reply tokens, within the context's room.
    pub max_tokens: usize,
}

/// A request whose prompt is partly in its session.
pub(crate) struct Prefilling<'e, D: DenseDevice> {
    pub request: Waiting,
    pub session: Session<'e, D>,
    /// Prompt tokens already in the session.
    done: usize,
}

impl<'e, D: DenseDevice> Prefilling<'e, D> {
    /// `request`, to be prefilled into `session` (new, and checked for the
    /// memory the whole prompt takes).
    pub fn new(request: Waiting, session: Session<'e, D>) -> Self {
        Prefilling {
            request,
            session,
            done: 0,
        }
    }

    /// Runs the next chunk of the prompt; returns the logits after the
    /// prompt once its last chunk has run.
    pub fn advance(&mut self) -> tandem_runtime::Result<Option<Vec<f32>>> {
        let ids = &self.request.ids;
        let end = ids.len().min(self.done + PREFILL_CHUNK);
        let part = &ids[self.done..end];
        if end < ids.len() {
            self.session.prefill_part(part)?;
            self.done = end;
            return Ok(None);
        }
        let logits = self.session.prefill(part, &mut |_, _| {})?;
        self.done = end;
        Ok(Some(logits))
    }
}
