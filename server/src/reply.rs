//! Replies in OpenAI's shapes: a whole completion, or its server-sent
//! event chunks ending with `data: [DONE]`.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::Endpoint;
use crate::error::ApiError;
use crate::job::{Event, Finish};

/// What every object of one reply carries.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

impl Header {
    fn object(&self, streamed: bool) -> &'static str {
        match (self.endpoint, streamed) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn wrap(&self, streamed: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(streamed),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// A streamed chunk carrying `text` (and the finish reason, at the end).
    fn chunk(&self, text: Option<&str>, finish: Option<Finish>) -> Value {
        let reason = finish.map(Finish::as_str);
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = text.map_or(json!({}), |t| json!({"content": t}));
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason})
            }
            Endpoint::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": reason})
            }
        };
        self.wrap(true, json!([choice]))
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Collects a whole reply from `events` (after `Started`).
pub(crate) async fn whole(
    header: Header,
    prompt_tokens: usize,
    mut events: UnboundedReceiver<Event>,
) -> Result<Value, ApiError> {
    let mut text = String::new();
    loop {
        match events.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done {
                finish,
                completion_tokens,
            }) => {
                let reason = finish.as_str();
                let choice = match header.endpoint {
                    Endpoint::Chat => json!({"index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null, "finish_reason": reason}),
                    Endpoint::Completion => json!({"index": 0, "text": text,
                        "logprobs": null, "finish_reason": reason}),
                };
                let mut body = header.wrap(false, json!([choice]));
                body["usage"] = usage(prompt_tokens, completion_tokens);
                return Ok(body);
            }
            Some(Event::Failed(e)) => return Err(e),
            Some(Event::Started { .. }) | None => {
                return Err(ApiError::internal("the engine stopped"))
            }
        }
    }
}

/// The reply's events as server-sent events (after `Started`).
pub(crate) fn streamed(
    header: Header,
    prompt_tokens: usize,
    include_usage: bool,
    events: UnboundedReceiver<Event>,
) -> Response {
    let mut chunks = Chunks {
        header,
        prompt_tokens,
        include_usage,
        events,
        ready: VecDeque::new(),
        over: false,
    };
    if chunks.header.endpoint == Endpoint::Chat {
        let mut first = chunks.header.chunk(None, None);
        first["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
        chunks.ready.push_back(first.to_string());
    }
    Sse::new(chunks.into_stream()).into_response()
}

/// The state of one streamed reply.
struct Chunks {
    header: Header,
    prompt_tokens: usize,
    include_usage: bool,
    events: UnboundedReceiver<Event>,
    /// `data:` payloads ready to send.
    ready: VecDeque<String>,
    /// No more events will be read.
    over: bool,
}

impl Chunks {
    fn into_stream(self) -> impl Stream<Item = Result<SseEvent, Infallible>> {
        futures_util::stream::unfold(self, |mut c| async move {
            loop {
                if let Some(data) = c.ready.pop_front() {
                    return Some((Ok(SseEvent::default().data(data)), c));
                }
                if c.over {
                    return None;
                }
                let event = c.events.recv().await;
                c.take(event);
            }
        })
    }

    fn take(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Text(t)) => self.push(self.header.chunk(Some(&t), None)),
            Some(Event::Done {
                finish,
                completion_tokens,
            }) => {
                self.push(self.header.chunk(None, Some(finish)));
                if self.include_usage {
                    let mut last = self.header.wrap(true, json!([]));
                    last["usage"] = usage(self.prompt_tokens, completion_tokens);
                    self.push(last);
                }
                self.end();
            }
            Some(Event::Failed(e)) => {
                self.push(e.body());
                self.end();
            }
            Some(Event::Started { .. }) | None => {
                self.push(ApiError::internal("the engine stopped").body());
                self.end();
            }
        }
    }

    fn push(&mut self, value: Value) {
        self.ready.push_back(value.to_string());
    }

    fn end(&mut self) {
        self.ready.push_back("[DONE]".to_string());
        self.over = true;
    }
}
