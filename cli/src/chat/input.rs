//! Where chat messages come from: a line editor on a terminal (history,
//! arrow keys, bracketed paste), plain lines from a pipe.

use std::io::{BufRead, IsTerminal};

use anyhow::Result;
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;

/// What one read gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// A message (lines ending in a backslash joined to the next).
    Message(String),
    /// Ctrl-C at the prompt (a terminal's editor reports it as a key).
    Interrupted,
    /// Ctrl-D, or the end of the piped input.
    End,
}

/// The line source: the editor when stdin is a terminal, else stdin's lines.
pub enum Lines {
    Editor(Box<DefaultEditor>),
    Piped(std::io::StdinLock<'static>),
}

const PROMPT: &str = "> ";
const MORE: &str = ". ";

impl Lines {
    /// The editor on a terminal, plain lines otherwise.
    pub fn open() -> Result<Lines> {
        if std::io::stdin().is_terminal() {
            if let Ok(editor) = DefaultEditor::new() {
                return Ok(Lines::Editor(Box::new(editor)));
            }
        }
        Ok(Lines::Piped(std::io::stdin().lock()))
    }

    /// Reads one message; a line ending in `\` continues on the next.
    pub fn read(&mut self) -> Result<Input> {
        let mut message = String::new();
        let mut prompt = PROMPT;
        loop {
            let line = match self.line(prompt)? {
                Input::Message(line) => line,
                Input::End if !message.is_empty() => return Ok(Input::Message(message)),
                other => return Ok(other),
            };
            match line.strip_suffix('\\') {
                Some(part) => {
                    message.push_str(part);
                    message.push('\n');
                    prompt = MORE;
                }
                None => {
                    message.push_str(&line);
                    if let Lines::Editor(editor) = self {
                        let _ = editor.add_history_entry(message.as_str());
                    }
                    return Ok(Input::Message(message));
                }
            }
        }
    }

    fn line(&mut self, prompt: &str) -> Result<Input> {
        match self {
            Lines::Editor(editor) => match editor.readline(prompt) {
                Ok(line) => Ok(Input::Message(line)),
                Err(ReadlineError::Interrupted) => Ok(Input::Interrupted),
                Err(ReadlineError::Eof) => Ok(Input::End),
                Err(e) => Err(e.into()),
            },
            Lines::Piped(stdin) => {
                eprint!("{prompt}");
                let mut line = String::new();
                if stdin.read_line(&mut line)? == 0 {
                    return Ok(Input::End);
                }
                let line = line.trim_end_matches(['\n', '\r']);
                Ok(Input::Message(without_escapes(line)))
            }
        }
    }
}

/// `line` without terminal escape sequences (`ESC [ ... final`, `ESC O x`):
/// keys such as the arrows that a terminal without the editor passes on.
pub fn without_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('[') => {
                // Parameters and intermediates, then one final byte.
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
            Some('O') => {
                chars.next();
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::without_escapes;

    #[test]
    fn arrow_keys_and_other_escapes_are_dropped() {
        assert_eq!(without_escapes("\u{1b}[Ahello\u{1b}[D!"), "hello!");
        assert_eq!(without_escapes("a\u{1b}[1;5Cb\u{1b}OPc"), "abc");
        assert_eq!(without_escapes("plain ünïcode"), "plain ünïcode");
        assert_eq!(without_escapes("trailing \u{1b}["), "trailing ");
    }
}
