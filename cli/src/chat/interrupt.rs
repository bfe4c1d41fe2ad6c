//! Ctrl-C: during a reply (or its prefill) it stops the reply; at the
//! prompt the first press warns and the second leaves. A press that comes
//! as a reply ends, too late to stop it, counts as the first at the prompt.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

/// No reply is running: a press is a press at the prompt.
const IDLE: u8 = 0;
/// A reply is running: a press stops it.
const REPLYING: u8 = 1;
/// A press came during the reply.
const PRESSED: u8 = 2;

/// The state Ctrl-C acts on, shared with the signal handler.
#[derive(Clone, Default)]
pub struct Interrupts {
    /// Raised to stop the reply in progress.
    pub cancel: Arc<AtomicBool>,
    /// `IDLE`, `REPLYING` or `PRESSED`, changed in one step each so a press
    /// is never lost between the reply's end and the prompt.
    reply: Arc<AtomicU8>,
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
            if handler.on_signal() == Some(AtPrompt::Leave) {
                std::process::exit(0);
            }
        })
        .context("installing the Ctrl-C handler")?;
        Ok(state)
    }

    /// A SIGINT: stops the reply in progress, or is a press at the prompt.
    fn on_signal(&self) -> Option<AtPrompt> {
        match self
            .reply
            .compare_exchange(REPLYING, PRESSED, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => {
                self.cancel.store(true, Ordering::SeqCst);
                None
            }
            Err(PRESSED) => None,
            Err(_) => Some(self.at_prompt()),
        }
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

    /// Marks a reply as running: Ctrl-C stops it.
    pub fn begin_reply(&self) {
        self.cancel.store(false, Ordering::SeqCst);
        self.reply.store(REPLYING, Ordering::SeqCst);
    }

    /// Marks the reply as over; `stopped` tells whether Ctrl-C stopped it.
    /// A press that did not stop it (it came as the reply ended) is said so
    /// and counts as the first press at the prompt.
    pub fn end_reply(&self, stopped: bool) {
        let pressed = self.reply.swap(IDLE, Ordering::SeqCst) == PRESSED;
        if pressed && !stopped {
            eprint!("\n(Ctrl-C came as the reply ended and stopped nothing)");
            self.at_prompt();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_press_too_late_to_stop_a_reply_is_the_first_press_at_the_prompt() {
        let interrupts = Interrupts::default();
        interrupts.begin_reply();
        assert_eq!(interrupts.on_signal(), None);
        assert!(interrupts.cancel.load(Ordering::SeqCst));
        interrupts.end_reply(false);
        assert_eq!(interrupts.at_prompt(), AtPrompt::Leave);
    }

    #[test]
    fn a_press_that_stopped_a_reply_is_not_counted_at_the_prompt() {
        let interrupts = Interrupts::default();
        interrupts.begin_reply();
        assert_eq!(interrupts.on_signal(), None);
        assert_eq!(interrupts.on_signal(), None, "a second press in the reply");
        interrupts.end_reply(true);
        assert_eq!(interrupts.at_prompt(), AtPrompt::Warned);
    }

    #[test]
    fn presses_between_replies_are_presses_at_the_prompt() {
        let interrupts = Interrupts::default();
        assert_eq!(interrupts.on_signal(), Some(AtPrompt::Warned));
        interrupts.begin_reply();
        interrupts.end_reply(false);
        assert_eq!(interrupts.on_signal(), Some(AtPrompt::Leave));
    }
}
