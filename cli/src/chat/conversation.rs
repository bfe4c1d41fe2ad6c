//! The conversation: an optional system prompt, an optional document, and
//! the turns since.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tandem_gpu::DenseDevice;
use tandem_runtime::chat::{Message, Role};
use tandem_runtime::Engine;

/// A document put into the conversation (`--file`).
pub struct Document {
    /// The user message that carries it and the reply that acknowledges it.
    messages: [Message; 2],
    /// Tokens of the conversation up to and including the document.
    pub tokens: usize,
}

/// What the model is shown, oldest first.
#[derive(Default)]
pub struct Conversation {
    system: Option<Message>,
    document: Option<Document>,
    turns: Vec<Message>,
}

impl Conversation {
    /// A conversation with an optional system prompt.
    pub fn new(system: Option<String>) -> Conversation {
        Conversation {
            system: system.map(Message::system),
            ..Conversation::default()
        }
    }

    /// Every message, ready to render.
    pub fn messages(&self) -> Vec<Message> {
        let document = self.document.iter().flat_map(|d| d.messages.iter());
        self.system
            .iter()
            .chain(document)
            .chain(&self.turns)
            .cloned()
            .collect()
    }

    /// The document, if any.
    pub fn document(&self) -> Option<&Document> {
        self.document.as_ref()
    }

    /// Adds a turn.
    pub fn push(&mut self, message: Message) {
        self.turns.push(message);
    }

    /// Takes back the last turn (a message that got no reply).
    pub fn pop(&mut self) {
        self.turns.pop();
    }

    /// Forgets the turns; `all` forgets the document too.
    pub fn reset(&mut self, all: bool) {
        self.turns.clear();
        if all {
            self.document = None;
        }
    }

    /// Reads `path` into the conversation as a document. Refused, with the
    /// numbers, when it would not leave `reply` tokens of room in the
    /// engine's context or would not fit in its memory budget.
    pub fn load_document<D: DenseDevice>(
        &mut self,
        engine: &Engine<D>,
        path: &Path,
        reply: usize,
    ) -> Result<()> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let limit = engine.context_limit();
        // A token covers at most the longest token's bytes: a file that
        // long cannot fit, whatever its text, and is not tokenized.
        let fewest = bytes.len() / longest_token_bytes(engine).max(1);
        if fewest > limit {
            bail!(
                "{} is {} bytes, at least {fewest} tokens; the context holds {limit} tokens",
                path.display(),
                bytes.len()
            );
        }
        let text = String::from_utf8_lossy(&bytes);
        let messages = [
            Message::user(format!("{DOCUMENT_OPENING}{text}")),
            Message::assistant(DOCUMENT_ACKNOWLEDGED),
        ];
        let tokens = self.tokens_with(engine, &messages)?;
        if tokens.saturating_add(reply) > limit {
            bail!(
                "{} is {tokens} tokens (with the conversation around it); with {reply} tokens \
                 for a reply that is more than the context's {limit} tokens \
                 (a shorter file, or fewer --max-tokens)",
                path.display()
            );
        }
        engine.check_memory(tokens.saturating_add(reply))?;
        self.document = Some(Document { messages, tokens });
        Ok(())
    }

    /// The conversation `messages` held, as saved: a leading system message
    /// and a document (as [`Conversation::load_document`] puts it) are told
    /// apart from the turns, so that `/reset` keeps them as before.
    pub fn restore<D: DenseDevice>(
        engine: &Engine<D>,
        messages: Vec<Message>,
    ) -> Result<Conversation> {
        let mut rest = messages.into_iter().peekable();
        let system = rest.next_if(|m| m.role == Role::System);
        let mut conversation = Conversation {
            system,
            ..Conversation::default()
        };
        let mut turns: Vec<Message> = rest.collect();
        let is_document = turns.len() >= 2
            && turns[0].role == Role::User
            && turns[0].content.starts_with(DOCUMENT_OPENING)
            && turns[1].role == Role::Assistant
            && turns[1].content == DOCUMENT_ACKNOWLEDGED;
        if is_document {
            let messages = [turns.remove(0), turns.remove(0)];
            let tokens = conversation.tokens_with(engine, &messages)?;
            conversation.document = Some(Document { messages, tokens });
        }
        conversation.turns = turns;
        Ok(conversation)
    }

    /// Tokens of the system prompt followed by `messages`.
    fn tokens_with<D: DenseDevice>(
        &self,
        engine: &Engine<D>,
        messages: &[Message],
    ) -> Result<usize> {
        let mut shown: Vec<Message> = self.system.iter().cloned().collect();
        shown.extend(messages.iter().cloned());
        let rendered = engine.chat_template().render(&shown, false)?;
        Ok(engine.tokenizer().encode(&rendered, false)?.len())
    }
}

/// How the user message carrying a document opens, and the reply that
/// acknowledges it.
const DOCUMENT_OPENING: &str = "Here is a document:\n\n";
const DOCUMENT_ACKNOWLEDGED: &str = "I have read the document. What would you like to know?";

/// Bytes of the vocabulary's longest token.
fn longest_token_bytes<D: DenseDevice>(engine: &Engine<D>) -> usize {
    let tokenizer = engine.tokenizer();
    (0..tokenizer.vocab_size() as u32)
        .filter_map(|id| tokenizer.token_text(id))
        .map(|t| t.len())
        .max()
        .unwrap_or(1)
}
