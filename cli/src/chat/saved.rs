//! `tandem chat --session FILE`: the conversation is saved to FILE after
//! every completed turn (crash-safely) and resumed from it on the next start.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tandem_gpu::DenseDevice;
use tandem_runtime::chat::{Message, Role};
use tandem_runtime::{Engine, SavedSession, Session};

use crate::progress_reporter;

/// The chat's session file.
pub struct SavedChat {
    path: PathBuf,
}

/// A conversation resumed from its file.
pub struct Resumed<'e, D: DenseDevice> {
    pub messages: Vec<Message>,
    pub session: Session<'e, D>,
}

impl SavedChat {
    pub fn new(path: &Path) -> SavedChat {
        SavedChat {
            path: path.to_path_buf(),
        }
    }

    /// The saved conversation, its keys and values loaded from the file (or,
    /// from a file without them, its tokens run through a prefill again);
    /// `None` when the file does not exist yet.
    pub fn resume<'e, D: DenseDevice>(
        &self,
        engine: &'e Engine<D>,
    ) -> Result<Option<Resumed<'e, D>>> {
        if !self.path.exists() {
            return Ok(None);
        }
        let saved = engine
            .load_session(&self.path)
            .context("resuming the conversation (move the file away to start anew)")?;
        let (bar, mut progress) = progress_reporter(saved.tokens.len());
        let restored = engine.restore_session(&saved, None, &mut progress);
        bar.finish_and_clear();
        let (session, _) = restored?;
        let turns = saved
            .messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count();
        let prefilled = saved.tokens.len() - saved.state.as_ref().map_or(0, |s| s.tokens());
        eprintln!(
            "tandem: restored {turns} turn{} ({} tokens, {prefilled} of them prefilled) from {}",
            if turns == 1 { "" } else { "s" },
            saved.tokens.len(),
            self.path.display()
        );
        Ok(Some(Resumed {
            messages: saved.messages,
            session,
        }))
    }

    /// Writes the conversation so far, replacing the file atomically.
    pub fn save<D: DenseDevice>(
        &self,
        engine: &Engine<D>,
        session: &Session<'_, D>,
        messages: &[Message],
    ) -> Result<()> {
        let saved = SavedSession {
            tokens: session.tokens().to_vec(),
            messages: messages.to_vec(),
            state: None,
        };
        engine
            .save_session_state(&self.path, &saved, session)
            .context("saving the conversation")
    }
}
