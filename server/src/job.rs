//! What the HTTP layer hands the engine thread, and what comes back.

use std::sync::Arc;

use tandem_runtime::chat::Message;
use tandem_runtime::SamplingConfig;
use tokio::sync::mpsc::UnboundedSender;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// The text a reply continues.
#[derive(Debug, Clone)]
pub(crate) enum Prompt {
    /// Rendered with the model's chat template.
    Chat(Vec<Message>),
    /// Tokenized as it is.
    Text(String),
}

/// One request for the engine thread.
pub(crate) struct Job {
    /// For the log.
    pub id: String,
    pub prompt: Prompt,
    /// Already checked against the server's limit; `None` when the request
    /// names none.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingConfig,
    /// Strings that end the reply (not included in it).
    pub stop: Vec<String>,
    /// Dropped by the HTTP layer when the client goes away.
    pub events: UnboundedSender<Event>,
    /// Holds the request's place until the engine thread drops the job.
    pub _place: Place,
}

/// Why a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the engine thread sends about one request, in order: `Started` or
/// `Failed` first, then text, then `Done` (or `Failed`).
#[derive(Debug)]
pub(crate) enum Event {
    Started {
        prompt_tokens: usize,
    },
    Text(String),
    Done {
        finish: Finish,
        completion_tokens: usize,
    },
    Failed(ApiError),
}

/// A place among the requests in flight (in the batch or waiting); given
/// back when dropped.
pub(crate) struct Place {
    metrics: Arc<Metrics>,
}

impl Place {
    /// A place if fewer than `limit` requests are in flight.
    pub fn take(metrics: &Arc<Metrics>, limit: usize) -> Option<Place> {
        metrics.try_enter(limit).then(|| Place {
            metrics: Arc::clone(metrics),
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.metrics.leave();
    }
}
