//! `tandem chat`: a conversation at the terminal or over a pipe.

mod conversation;
mod input;
mod interrupt;
mod saved;

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use tandem_gpu::DenseDevice;
use tandem_runtime::chat::Message;
use tandem_runtime::{Engine, Error, Flow, SamplingConfig, Session, StopReason};

use crate::{progress_reporter, ModelArgs, SamplingArgs};
use conversation::Conversation;
use input::{Input, Lines};
use interrupt::{AtPrompt, Interrupts};
use saved::SavedChat;

/// Options of `tandem chat`.
#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// A system prompt.
    #[arg(long)]
    system: Option<String>,
    /// A text file to put into the conversation as a document (refused if it
    /// does not fit in the context with room for a reply).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Maximum tokens per reply.
    #[arg(long, short = 'n', default_value_t = 512)]
    max_tokens: usize,
    /// The most tokens the conversation holds (default: the model's context).
    #[arg(long)]
    context: Option<usize>,
    /// Save the conversation to FILE after every reply, and resume it from
    /// FILE when it exists (with the same model and policy).
    #[arg(long, value_name = "FILE")]
    session: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

const HELP: &str = "tandem chat: type a message (end a line with \\ to continue it); \
/reset clears the conversation but the document, /reset all clears both, /exit or Ctrl-D leaves; \
Ctrl-C stops a reply.";

/// What a chat runs with and does not change.
pub struct Settings<'a, D: DenseDevice> {
    pub engine: &'a Engine<D>,
    pub sampling: SamplingConfig,
    pub max_tokens: usize,
    pub interrupts: Interrupts,
    /// Where the conversation is saved after every change, if anywhere.
    pub saved: Option<SavedChat>,
}

/// What a chat changes: the conversation and the session holding its keys.
pub struct ChatState<'e, D: DenseDevice> {
    pub conversation: Conversation,
    pub session: Session<'e, D>,
}

/// Runs `tandem chat` on `device`.
pub fn run<D: DenseDevice>(args: &ChatArgs, device: D) -> Result<()> {
    let sampling = args.sampling.config()?;
    let mut options = args.model.options()?;
    options.context = args.context;
    let engine = args.model.load_with(device, &options)?;
    let mut conversation = Conversation::new(args.system.clone());
    if let Some(path) = &args.file {
        conversation.load_document(&engine, path, args.max_tokens)?;
        if let Some(doc) = conversation.document() {
            eprintln!(
                "tandem: loaded {} ({} tokens) into the conversation",
                path.display(),
                doc.tokens
            );
        }
    }
    let saved = args.session.as_deref().map(SavedChat::new);
    let mut state = ChatState {
        conversation,
        session: engine.session()?,
    };
    if let Some(resumed) = saved
        .as_ref()
        .map(|s| s.resume(&engine))
        .transpose()?
        .flatten()
    {
        state = ChatState {
            conversation: Conversation::restore(&engine, resumed.messages)?,
            session: resumed.session,
        };
    }
    // The line editor takes SIGINT for itself when it opens (and gives it
    // back only when closed): open it first, so the handler installed next
    // gets every Ctrl-C that is not a key in the editor.
    let mut lines = Lines::open()?;
    let settings = Settings {
        engine: &engine,
        sampling,
        max_tokens: args.max_tokens,
        interrupts: Interrupts::install()?,
        saved,
    };
    eprintln!("{HELP}");
    chat_loop(&settings, &mut state, &mut lines)
}

/// Reads messages and replies until the user leaves.
pub fn chat_loop<D: DenseDevice>(
    settings: &Settings<D>,
    state: &mut ChatState<D>,
    lines: &mut Lines,
) -> Result<()> {
    loop {
        let message = match lines.read()? {
            Input::Message(m) => m,
            Input::Interrupted => match settings.interrupts.at_prompt() {
                AtPrompt::Warned => continue,
                AtPrompt::Leave => return Ok(()),
            },
            Input::End => return Ok(()),
        };
        settings.interrupts.disarm();
        match message.trim() {
            "" => {}
            "/exit" | "/quit" => return Ok(()),
            "/reset" | "/reset all" => {
                let all = message.trim() == "/reset all";
                state.conversation.reset(all);
                state.session.reset();
                match (all, state.conversation.document()) {
                    (false, Some(_)) => eprintln!("(conversation cleared; the document stays)"),
                    _ => eprintln!("(conversation cleared)"),
                }
                save(settings, state);
            }
            _ => reply(settings, state, message.trim()),
        }
    }
}

/// Sends one message and streams the reply; a message that cannot be sent
/// is reported and left out of the conversation.
fn reply<D: DenseDevice>(settings: &Settings<D>, state: &mut ChatState<D>, message: &str) {
    state.conversation.push(Message::user(message));
    match generate(settings, state) {
        Ok(Some(text)) => {
            state.conversation.push(Message::assistant(text));
            save(settings, state);
        }
        Ok(None) => state.conversation.pop(),
        Err(e) => {
            eprintln!("tandem: {e:#}; the message was not sent");
            state.conversation.pop();
        }
    }
}

/// Saves the conversation where `--session` asks; a failure is reported and
/// the chat goes on.
fn save<D: DenseDevice>(settings: &Settings<D>, state: &ChatState<D>) {
    let Some(saved) = &settings.saved else {
        return;
    };
    let messages = state.conversation.messages();
    if let Err(e) = saved.save(settings.engine, &state.session, &messages) {
        eprintln!("tandem: {e:#}");
    }
}

/// The reply to the conversation, `None` if stopped before it began.
fn generate<D: DenseDevice>(
    settings: &Settings<D>,
    state: &mut ChatState<D>,
) -> Result<Option<String>> {
    let engine = settings.engine;
    let rendered = engine.render_chat(&state.conversation.messages())?;
    let ids = engine.tokenizer().encode(&rendered, false)?;
    let common = continue_from(&mut state.session, &ids);
    let (bar, mut progress) = progress_reporter(ids.len() - common);
    let mut text = String::new();
    settings.interrupts.begin_reply();
    let result = state.session.generate(
        &ids[common..],
        settings.max_tokens,
        &settings.sampling,
        Some(&settings.interrupts.cancel),
        &mut progress,
        &mut |piece| {
            bar.finish_and_clear();
            print!("{piece}");
            let _ = std::io::stdout().flush();
            text.push_str(piece);
            Flow::Continue
        },
    );
    bar.finish_and_clear();
    let _ = writeln!(std::io::stdout());
    let stopped = match &result {
        Ok(stats) => stats.stop == StopReason::Cancelled,
        Err(e) => matches!(e, Error::Cancelled),
    };
    settings.interrupts.end_reply(stopped);
    let stats = match result {
        Ok(stats) => stats,
        Err(Error::Cancelled) => {
            eprintln!("(stopped before the reply began)");
            return Ok(None);
        }
        Err(e) => {
            // A failed step may leave the keys unusable: the next turn runs
            // the conversation anew.
            state.session.reset();
            return Err(e.into());
        }
    };
    match stats.stop {
        StopReason::Cancelled => eprintln!("(reply stopped)"),
        StopReason::ContextFull => eprintln!(
            "(the context is full at {} tokens: the reply was cut; /reset makes room)",
            engine.context_limit()
        ),
        _ => {}
    }
    eprintln!(
        "({} tokens, {:.1} tokens/s; context {} of {} tokens)",
        stats.generated_tokens,
        stats.decode_tokens_per_s(),
        state.session.tokens().len(),
        engine.context_limit()
    );
    if let Some(line) = state.session.kv().fidelity_summary() {
        eprintln!("({line})");
    }
    Ok(Some(text))
}

/// Keeps what the session shares with `ids` and returns its length; where
/// that cannot be kept (offloaded tokens cannot be dropped), starts anew.
fn continue_from<D: DenseDevice>(session: &mut Session<D>, ids: &[u32]) -> usize {
    let common = session
        .tokens()
        .iter()
        .zip(ids)
        .take_while(|(a, b)| a == b)
        .count();
    if session.truncate(common).is_ok() {
        return common;
    }
    session.reset();
    0
}
