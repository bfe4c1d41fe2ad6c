//! Saved conversations: a versioned, checksummed file holding a session's
//! token ids and chat messages, tied to the model and policy that made them,
//! and (when saved from a live session) the session's keys and values, so
//! that resuming it runs no prefill.
//!
//! The file (`session_file.rs`) holds a JSON body,
//! `{"model": {...}, "policy": "...", "tokens": [...], "messages": [...],
//! "state": {...}}`, then the state's arrays: the logits after the last
//! token, the device window's rows per layer and each offloaded store's
//! rows, index, bounds and sketch. A file without a state (or of format
//! version 1, or whose int4 or int2 rows were stored before they were
//! rotated) is resumed by running its tokens through a prefill.

use std::fmt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tandem_cpu::{ArrayReader, ArrayWriter};
use tandem_gpu::DenseDevice;

use crate::chat::Message;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::session::Session;
use crate::session_file::{self, crc32, SessionFile};
use crate::split::SequenceCounts;

/// A conversation as saved: the session's tokens and the messages behind them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SavedSession {
    /// The tokens in the session's context.
    pub tokens: Vec<u32>,
    /// The chat messages (empty for sessions driven by tokens alone).
    pub messages: Vec<Message>,
    /// The keys and values of the first tokens, as a loaded file holds them
    /// (`None`: resuming runs every token through a prefill).
    pub state: Option<SavedState>,
}

/// The keys and values of a saved session's first [`SavedState::tokens`]
/// tokens, read from its file (mapped; the file is replaced by renaming, never
/// rewritten in place, so the map stays valid).
#[derive(Clone)]
pub struct SavedState {
    file: Arc<SessionFile>,
    header: StateHeader,
}

impl SavedState {
    /// Tokens whose keys and values are saved.
    pub fn tokens(&self) -> usize {
        self.header.sequence.positions
    }

    /// Whether the logits after the last saved token are saved too.
    pub fn has_logits(&self) -> bool {
        self.header.logits
    }
}

impl fmt::Debug for SavedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SavedState")
            .field("tokens", &self.tokens())
            .field("logits", &self.header.logits)
            .finish_non_exhaustive()
    }
}

impl PartialEq for SavedState {
    fn eq(&self, other: &SavedState) -> bool {
        self.header == other.header && self.file.arrays() == other.file.arrays()
    }
}

/// What identifies a model: a session saved with one is refused by another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ModelIdentity {
    name: String,
    file_bytes: u64,
    /// CRC-32 of the model's configuration and vocabulary.
    fingerprint: u32,
}

/// What the arrays of a saved state hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StateHeader {
    /// Whether the first array is the logits after the last saved token.
    logits: bool,
    sequence: SequenceCounts,
    /// Whether int4 and int2 rows are stored rotated (see
    /// `tandem_cpu::KvDtype`): files written before they were hold them
    /// unrotated, and such a state is not loaded.
    #[serde(default)]
    packed_rows_rotated: bool,
}

#[derive(Serialize, Deserialize)]
struct Body {
    model: ModelIdentity,
    policy: String,
    tokens: Vec<u32>,
    messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<StateHeader>,
}

impl<D: DenseDevice> Engine<D> {
    /// Writes `saved`'s tokens and messages to `path` crash-safely (a
    /// temporary file, flushed, then renamed over `path`), with this engine's
    /// model and policy; resuming it runs the tokens through a prefill.
    pub fn save_session(&self, path: &Path, saved: &SavedSession) -> Result<()> {
        self.write_session(path, saved, None, Vec::new())
    }

    /// As [`Engine::save_session`], with `session`'s keys and values (and the
    /// logits after its last token, if its last call computed them), so that
    /// resuming runs no prefill. `session`'s tokens must open `saved.tokens`;
    /// the tokens after them are run by a prefill on resuming.
    pub fn save_session_state(
        &self,
        path: &Path,
        saved: &SavedSession,
        session: &Session<'_, D>,
    ) -> Result<()> {
        if !saved.tokens.starts_with(session.tokens()) {
            return Err(Error::InvalidRequest(
                "the saved tokens must begin with the session's".into(),
            ));
        }
        let mut out = ArrayWriter::new();
        if let Some(logits) = &session.last_logits {
            out.put(logits);
        }
        let sequence = session.kv.save_state(&mut out)?;
        let header = StateHeader {
            logits: session.last_logits.is_some(),
            sequence,
            packed_rows_rotated: true,
        };
        self.write_session(path, saved, Some(header), out.into_arrays())
    }

    fn write_session(
        &self,
        path: &Path,
        saved: &SavedSession,
        state: Option<StateHeader>,
        arrays: Vec<Vec<u8>>,
    ) -> Result<()> {
        let body = Body {
            model: self.identity(),
            policy: self.policy_table().to_string(),
            tokens: saved.tokens.clone(),
            messages: saved.messages.clone(),
            state,
        };
        let json = serde_json::to_vec(&body)
            .map_err(|e| Error::InvalidRequest(format!("encoding the session: {e}")))?;
        session_file::write(path, &json, &arrays)
    }

    /// Reads a session file written by [`Engine::save_session`] or
    /// [`Engine::save_session_state`], refusing a damaged file or one saved
    /// with another model or policy.
    pub fn load_session(&self, path: &Path) -> Result<SavedSession> {
        let file = session_file::read(path)?;
        let body: Body = serde_json::from_slice(file.json()).map_err(|e| {
            file.error(format!(
                "the checksum matches but the contents do not parse: {e}"
            ))
        })?;
        let model = self.identity();
        if body.model != model {
            return Err(file.error(format!(
                "saved with another model ({}, {} bytes), not {} ({} bytes)",
                body.model.name, body.model.file_bytes, model.name, model.file_bytes
            )));
        }
        let policy = self.policy_table().to_string();
        if body.policy != policy {
            return Err(file.error(format!(
                "saved with another attention policy; pass the same one:\n{}",
                body.policy
            )));
        }
        let vocab = self.model().config().vocab_size;
        if let Some(t) = body.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(file.error(format!("token id {t} is outside the vocabulary")));
        }
        if let Some(header) = &body.state {
            if header.sequence.positions > body.tokens.len() {
                return Err(file.error("the saved state covers more tokens than saved".into()));
            }
        }
        // Rows stored unrotated would be read as rotated: the tokens are
        // run through a prefill instead.
        let packed = self.policy_table().holds_packed_rows();
        let state = body.state.filter(|h| h.packed_rows_rotated || !packed);
        let file = Arc::new(file);
        Ok(SavedSession {
            tokens: body.tokens,
            messages: body.messages,
            state: state.map(|header| SavedState { file, header }),
        })
    }

    /// A session holding `saved`'s tokens, with the logits after its last
    /// token (`None` when it has none, or when its state was saved without
    /// them and no token follows it). A saved state is loaded without running
    /// the model; the tokens after it (all of them, without one) are run
    /// through a prefill, reporting progress and checking `cancel` like
    /// [`Session::prefill_cancellable`].
    pub fn restore_session(
        &self,
        saved: &SavedSession,
        cancel: Option<&AtomicBool>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Session<'_, D>, Option<Vec<f32>>)> {
        let mut session = self.session()?;
        if let Some(state) = &saved.state {
            self.load_state(&mut session, state, &saved.tokens)?;
            progress(session.tokens.len(), saved.tokens.len());
        }
        let rest = &saved.tokens[session.tokens.len()..];
        if !rest.is_empty() {
            let done = session.tokens.len();
            let total = saved.tokens.len();
            session.prefill_cancellable(rest, &mut |n, _| progress(done + n, total), cancel)?;
        }
        let logits = session.last_logits.clone();
        Ok((session, logits))
    }

    /// Loads `state` into the empty `session` (`tokens` the saved tokens).
    fn load_state(
        &self,
        session: &mut Session<'_, D>,
        state: &SavedState,
        tokens: &[u32],
    ) -> Result<()> {
        let file = &state.file;
        let arrays = file.arrays();
        let mut input = ArrayReader::new(&arrays);
        let config = self.model().config();
        let logits = match state.header.logits {
            true => Some(
                input
                    .get::<f32>("logits", config.vocab_size)
                    .map_err(|e| file.error(e.to_string()))?,
            ),
            false => None,
        };
        let positions = tokens.len().min(config.context_length);
        session
            .kv
            .load_state(&state.header.sequence, positions, &mut input)
            .map_err(|e| file.error(format!("its keys and values do not fit: {e}")))?;
        session.tokens = tokens[..state.tokens()].to_vec();
        session.last_logits = logits;
        Ok(())
    }

    fn identity(&self) -> ModelIdentity {
        let config = self.model().config();
        let mut text = format!("{config:?}");
        let tokenizer = self.tokenizer();
        for id in 0..tokenizer.vocab_size() as u32 {
            text.push('\n');
            text.push_str(&tokenizer.token_text(id).unwrap_or_default());
        }
        ModelIdentity {
            name: config.name.clone(),
            file_bytes: std::fs::metadata(self.path())
                .map(|m| if m.is_file() { m.len() } else { 0 })
                .unwrap_or(0),
            fingerprint: crc32(text.as_bytes()),
        }
    }
}
