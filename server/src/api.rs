//! OpenAI request bodies, parsed and checked into what the engine thread
//! needs.

use serde::Deserialize;
use tandem_runtime::chat::{Message, Role};
use tandem_runtime::SamplingConfig;

use crate::error::ApiError;
use crate::job::Prompt;

/// The most stop strings a request may give (OpenAI's limit).
const MAX_STOPS: usize = 4;

/// The fields of `/v1/chat/completions` and `/v1/completions` this server
/// reads; others are ignored.
#[derive(Debug, Deserialize)]
pub(crate) struct RequestBody {
    model: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    prompt: Option<OneOrMany>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<OneOrMany>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<u64>,
    logprobs: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Chat,
    Completion,
}

/// A checked request.
#[derive(Debug)]
pub(crate) struct Request {
    pub prompt: Prompt,
    /// `None`: the server's default, or the room left in the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingConfig,
    pub stop: Vec<String>,
    pub stream: bool,
    /// Send a last chunk with the token counts when streaming.
    pub include_usage: bool,
}

/// The server's limits on what a request may ask.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestLimits {
    pub max_tokens_limit: usize,
}

impl RequestBody {
    /// Parses a body, with serde's message (which names the field) on error.
    pub fn parse(bytes: &[u8]) -> Result<RequestBody, ApiError> {
        serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }

    /// The model the request names, if any.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Checks every field and builds the request for `endpoint`.
    pub fn check(self, endpoint: Endpoint, limits: RequestLimits) -> Result<Request, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("only n = 1 is supported"));
        }
        if self.logprobs.as_ref().is_some_and(is_requested) {
            return Err(ApiError::bad_request("logprobs are not supported"));
        }
        let prompt = match endpoint {
            Endpoint::Chat => Prompt::Chat(chat_messages(self.messages)?),
            Endpoint::Completion => Prompt::Text(completion_prompt(self.prompt)?),
        };
        Ok(Request {
            prompt,
            max_tokens: max_tokens(self.max_completion_tokens.or(self.max_tokens), limits)?,
            sampling: sampling(self.temperature, self.top_p, self.seed)?,
            stop: stops(self.stop)?,
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        })
    }
}

/// `logprobs` is `true` or a count above zero.
fn is_requested(v: &serde_json::Value) -> bool {
    v.as_bool().unwrap_or(false) || v.as_u64().is_some_and(|n| n > 0)
}

fn chat_messages(messages: Option<Vec<ChatMessage>>) -> Result<Vec<Message>, ApiError> {
    let messages = messages.ok_or_else(|| ApiError::bad_request("'messages' is required"))?;
    if messages.is_empty() {
        return Err(ApiError::bad_request("'messages' is empty"));
    }
    messages.into_iter().map(chat_message).collect()
}

fn chat_message(m: ChatMessage) -> Result<Message, ApiError> {
    let role = match m.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => {
            return Err(ApiError::bad_request(format!(
                "message role '{other}' is not supported (system, developer, user, assistant)"
            )))
        }
    };
    let content = match m.content {
        None => String::new(),
        Some(Content::Text(text)) => text,
        Some(Content::Parts(parts)) => text_parts(parts)?,
    };
    Ok(Message { role, content })
}

fn text_parts(parts: Vec<ContentPart>) -> Result<String, ApiError> {
    let mut text = String::new();
    for part in parts {
        match (part.kind.as_str(), part.text) {
            ("text", Some(t)) => text.push_str(&t),
            (kind, _) => {
                return Err(ApiError::bad_request(format!(
                    "content part of type '{kind}' is not supported (text only)"
                )))
            }
        }
    }
    Ok(text)
}

fn completion_prompt(prompt: Option<OneOrMany>) -> Result<String, ApiError> {
    match prompt {
        Some(OneOrMany::One(text)) => Ok(text),
        Some(OneOrMany::Many(mut texts)) if texts.len() == 1 => Ok(texts.remove(0)),
        Some(OneOrMany::Many(_)) => Err(ApiError::bad_request(
            "'prompt' must be one string (batches of prompts are not supported)",
        )),
        None => Err(ApiError::bad_request("'prompt' is required")),
    }
}

fn max_tokens(asked: Option<u64>, limits: RequestLimits) -> Result<Option<usize>, ApiError> {
    let Some(asked) = asked else {
        return Ok(None);
    };
    if asked == 0 || asked > limits.max_tokens_limit as u64 {
        return Err(ApiError::bad_request(format!(
            "max_tokens must be between 1 and {}, got {asked}",
            limits.max_tokens_limit
        )));
    }
    Ok(Some(asked as usize))
}

fn sampling(
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
) -> Result<SamplingConfig, ApiError> {
    let temperature = temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(format!(
            "temperature must be between 0 and 2, got {temperature}"
        )));
    }
    let config = SamplingConfig {
        temperature,
        top_p: top_p.unwrap_or(1.0),
        // Negative seeds are valid in OpenAI's API; their bits are the seed.
        seed: seed.unwrap_or(0) as u64,
        ..SamplingConfig::default()
    };
    config.validate().map_err(ApiError::bad_request)?;
    Ok(config)
}

fn stops(stop: Option<OneOrMany>) -> Result<Vec<String>, ApiError> {
    let stops = match stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stops.len() > MAX_STOPS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_STOPS} stop strings, got {}",
            stops.len()
        )));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("stop strings must not be empty"));
    }
    Ok(stops)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits {
        max_tokens_limit: 64,
    };

    fn check(endpoint: Endpoint, body: &str) -> Result<Request, ApiError> {
        RequestBody::parse(body.as_bytes())?.check(endpoint, LIMITS)
    }

    #[test]
    fn a_chat_request_with_text_parts_and_options_is_read() {
        let r = check(
            Endpoint::Chat,
            r#"{"model":"m","messages":[{"role":"developer","content":"Be brief."},
               {"role":"user","content":[{"type":"text","text":"Hi"}]}],
               "max_completion_tokens":8,"temperature":0,"seed":-1,"stop":"x",
               "stream":true,"stream_options":{"include_usage":true},"user":"ignored"}"#,
        )
        .expect("valid");
        let Prompt::Chat(m) = r.prompt else {
            panic!("a chat prompt")
        };
        assert_eq!(m, vec![Message::system("Be brief."), Message::user("Hi")]);
        assert_eq!(
            (r.max_tokens, r.stop, r.stream, r.include_usage),
            (Some(8), vec!["x".into()], true, true)
        );
        assert_eq!((r.sampling.temperature, r.sampling.seed), (0.0, u64::MAX));
    }

    #[test]
    fn out_of_range_and_missing_fields_are_refused_with_400() {
        let bad = [
            (Endpoint::Chat, r#"{"messages":[]}"#),
            (Endpoint::Chat, r#"{"prompt":"x"}"#),
            (
                Endpoint::Chat,
                r#"{"messages":[{"role":"tool","content":"x"}]}"#,
            ),
            (
                Endpoint::Chat,
                r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
            ),
            (Endpoint::Completion, r#"{"prompt":"x","max_tokens":65}"#),
            (Endpoint::Completion, r#"{"prompt":"x","max_tokens":0}"#),
            (Endpoint::Completion, r#"{"prompt":"x","max_tokens":-3}"#),
            (Endpoint::Completion, r#"{"prompt":"x","temperature":2.5}"#),
            (Endpoint::Completion, r#"{"prompt":"x","top_p":0}"#),
            (
                Endpoint::Completion,
                r#"{"prompt":"x","stop":["a","b","c","d","e"]}"#,
            ),
            (Endpoint::Completion, r#"{"prompt":"x","stop":[""]}"#),
            (Endpoint::Completion, r#"{"prompt":"x","n":2}"#),
            (Endpoint::Completion, r#"{"prompt":"x","logprobs":3}"#),
            (Endpoint::Completion, r#"{"prompt":["a","b"]}"#),
            (Endpoint::Completion, r#"{"prompt":[1,2]}"#),
            (Endpoint::Completion, r#"[1]"#),
            (Endpoint::Completion, r#"{"prompt":"x""#),
        ];
        for (endpoint, body) in bad {
            let e = check(endpoint, body).expect_err(body);
            assert_eq!(e.status.as_u16(), 400, "{body}: {}", e.message);
        }
    }

    #[test]
    fn a_completion_without_max_tokens_leaves_it_to_the_engine_thread() {
        let r = check(Endpoint::Completion, r#"{"prompt":["Once"]}"#).expect("valid");
        assert_eq!(r.max_tokens, None);
        assert!(matches!(r.prompt, Prompt::Text(t) if t == "Once"));
    }
}
