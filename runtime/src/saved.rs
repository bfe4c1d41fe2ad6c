//! Saved conversations: a versioned, checksummed file holding a session's
//! token ids and chat messages, tied to the model and policy that made them.
//!
//! Layout (little-endian): the magic `TANDEMSS`, the format version (u32), the
//! body's length (u64), the body's CRC-32 (u32), then the body, JSON:
//! `{"model": {...}, "policy": "...", "tokens": [...], "messages": [...]}`.
//! Only the tokens are saved, not their keys and values: restoring runs the
//! tokens through a prefill again.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};
use tandem_gpu::DenseDevice;

use crate::chat::Message;
use crate::durable::write_atomically;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::session::Session;

const MAGIC: &[u8; 8] = b"TANDEMSS";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 8 + 4 + 8 + 4;
/// Larger files are refused before they are read.
const MAX_FILE_BYTES: u64 = 1 << 30;

/// A conversation as saved: the session's tokens and the messages behind them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SavedSession {
    /// The tokens in the session's context.
    pub tokens: Vec<u32>,
    /// The chat messages (empty for sessions driven by tokens alone).
    pub messages: Vec<Message>,
}

/// What identifies a model: a session saved with one is refused by another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ModelIdentity {
    name: String,
    file_bytes: u64,
    /// CRC-32 of the model's configuration and vocabulary.
    fingerprint: u32,
}

#[derive(Serialize, Deserialize)]
struct Body {
    model: ModelIdentity,
    policy: String,
    tokens: Vec<u32>,
    messages: Vec<Message>,
}

impl<D: DenseDevice> Engine<D> {
    /// Writes `saved` to `path` crash-safely (a temporary file, flushed, then
    /// renamed over `path`), with this engine's model and policy.
    pub fn save_session(&self, path: &Path, saved: &SavedSession) -> Result<()> {
        let body = Body {
            model: self.identity(),
            policy: self.policy_table().to_string(),
            tokens: saved.tokens.clone(),
            messages: saved.messages.clone(),
        };
        let body = serde_json::to_vec(&body)
            .map_err(|e| Error::InvalidRequest(format!("encoding the session: {e}")))?;
        let mut bytes = Vec::with_capacity(HEADER_BYTES + body.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        write_atomically(path, &bytes).map_err(|cause| Error::Io {
            path: path.to_path_buf(),
            cause,
        })
    }

    /// Reads a session file written by [`Engine::save_session`], refusing a
    /// damaged file or one saved with another model or policy.
    pub fn load_session(&self, path: &Path) -> Result<SavedSession> {
        let bad = |problem: String| Error::SessionFile {
            path: path.to_path_buf(),
            problem,
        };
        let body = read_body(path)?;
        let body: Body = serde_json::from_slice(&body).map_err(|e| {
            bad(format!(
                "the checksum matches but the contents do not parse: {e}"
            ))
        })?;
        let model = self.identity();
        if body.model != model {
            return Err(bad(format!(
                "saved with another model ({}, {} bytes), not {} ({} bytes)",
                body.model.name, body.model.file_bytes, model.name, model.file_bytes
            )));
        }
        let policy = self.policy_table().to_string();
        if body.policy != policy {
            return Err(bad(format!(
                "saved with another attention policy; pass the same one:\n{}",
                body.policy
            )));
        }
        let vocab = self.model().config().vocab_size;
        if let Some(t) = body.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(bad(format!("token id {t} is outside the vocabulary")));
        }
        Ok(SavedSession {
            tokens: body.tokens,
            messages: body.messages,
        })
    }

    /// A session holding `saved`'s tokens (run through a prefill, reporting
    /// progress and checking `cancel` like [`Session::prefill_cancellable`]),
    /// with the logits after its last token (`None` when it has none).
    pub fn restore_session(
        &self,
        saved: &SavedSession,
        cancel: Option<&AtomicBool>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Session<'_, D>, Option<Vec<f32>>)> {
        let mut session = self.session()?;
        if saved.tokens.is_empty() {
            return Ok((session, None));
        }
        let logits = session.prefill_cancellable(&saved.tokens, progress, cancel)?;
        Ok((session, Some(logits)))
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

/// The body of a session file, its header and checksum checked.
fn read_body(path: &Path) -> Result<Vec<u8>> {
    let io = |cause| Error::Io {
        path: path.to_path_buf(),
        cause,
    };
    let bad = |problem: &str| Error::SessionFile {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > MAX_FILE_BYTES {
        return Err(bad("larger than any session file (over 1 GiB)"));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
        return Err(bad("not a tandem session file"));
    }
    let field = |at: usize, n: usize| -> u64 {
        let mut word = [0u8; 8];
        word[..n].copy_from_slice(&bytes[at..at + n]);
        u64::from_le_bytes(word)
    };
    let version = field(8, 4);
    if version != u64::from(VERSION) {
        return Err(bad(&format!(
            "format version {version}; this tandem reads version {VERSION}"
        )));
    }
    let body = &bytes[HEADER_BYTES..];
    if field(12, 8) != body.len() as u64 {
        return Err(bad("truncated or damaged (its length does not match)"));
    }
    if field(20, 4) != u64::from(crc32(body)) {
        return Err(bad("damaged (checksum mismatch)"));
    }
    Ok(body.to_vec())
}

/// CRC-32 (IEEE 802.3, as zlib and PNG use).
fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !bytes.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }
}
