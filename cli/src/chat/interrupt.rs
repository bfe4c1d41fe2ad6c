//! Ctrl-C: during a reply (or its prefill) it stops the reply; at the
//! prompt the first press warns and the second leaves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

/// The state Ctrl-C acts on, shared with the signal handler.
#[derive(Clone, Default)]
pub struct Interrupts {
    /// Raised to stop the reply in progress.
    pub cancel: Arc<AtomicBool>,
    in_reply: Arc<AtomicBool>,
    armed: Arc<AtomicBool>,
}

/// What a press at the prompt means.
#[derive(Debug, PartialEq, Eq)]
pub enum AtPrompt {
    /// The first press: told how to leave.
    Warned,
    /// The second press in a row: leave.
    Leave,
}

impl Interrupts {
    /// Installs the handler for SIGINT (a terminal's editor reads Ctrl-C as
    /// a key instead, and reports it through [`Interrupts::at_prompt`]).
    pub fn install() -> Result<Interrupts> {
        let state = Interrupts::default();
        let handler = state.clone();
        ctrlc::set_handler(move || {
            if handler.in_reply.load(Ordering::SeqCst) {
                handler.cancel.store(true, Ordering::SeqCst);
            } else if handler.at_prompt() == AtPrompt::Leave {
                std::process::exit(0);
            }
        })
        .context("installing the Ctrl-C handler")?;
        Ok(state)
    }

    /// A press while waiting for a message.
    pub fn at_prompt(&self) -> AtPrompt {
        if self.armed.swap(true, Ordering::SeqCst) {
            eprintln!();
            return AtPrompt::Leave;
        }
        eprintln!("\n(Ctrl-C again, Ctrl-D or /exit leaves)");
        AtPrompt::Warned
    }

    /// A message came in: the next press warns again.
    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    /// Marks a reply as running (Ctrl-C stops it) or done.
    pub fn set_in_reply(&self, running: bool) {
        if running {
            self.cancel.store(false, Ordering::SeqCst);
        }
        self.in_reply.store(running, Ordering::SeqCst);
    }
}
