//! `tandem chat` as people use it: over a pipe, with Ctrl-C, a document,
//! multi-line messages and a full context.

mod common;

use std::time::{Duration, Instant};

use common::{chat, chat_n, reply_lines, scratch_file, stderr, LiveChat};

#[test]
fn a_message_the_vocabulary_cannot_encode_is_reported_and_the_chat_goes_on() {
    let out = chat(&[], "a\u{6}b\nHello\n/exit\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("was not sent"), "{}", stderr(&out));
    assert_eq!(reply_lines(&out).len(), 1, "{}", stderr(&out));
}

#[test]
fn a_trailing_backslash_continues_the_message() {
    let out = chat(&[], "Name a colour.\\\nJust one word.\n/exit\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(reply_lines(&out).len(), 1, "{}", stderr(&out));
}

#[test]
fn arrow_keys_do_not_reach_the_model() {
    let plain = chat(&[], "Hello\n");
    let arrows = chat(&[], "\u{1b}[AHel\u{1b}[Dlo\u{1b}[B\n");
    assert_eq!(arrows.status.code(), Some(0), "{}", stderr(&arrows));
    assert!(!plain.stdout.is_empty());
    assert_eq!(plain.stdout, arrows.stdout);
}

/// The context length after each reply.
fn contexts(out: &std::process::Output) -> Vec<usize> {
    reply_lines(out)
        .iter()
        .filter_map(|l| l.split("context ").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn reset_keeps_the_document_and_reset_all_drops_it() {
    let text = "The lighthouse keeper of Arvel Point is named Odile Marchetti. ".repeat(8);
    let file = scratch_file("doc.txt", text.as_bytes());
    let file = file.to_str().expect("utf-8 path");
    let out = chat(
        &["--file", file],
        "Who keeps it?\n/reset\nWho keeps it?\n/reset all\nWho keeps it?\n",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let c = contexts(&out);
    assert_eq!(c.len(), 3, "{}", stderr(&out));
    assert_eq!(c[0], c[1], "the document survives /reset");
    assert!(c[2] + 100 < c[1], "/reset all drops the document: {c:?}");
}

#[test]
fn reaching_the_context_limit_is_said() {
    let out = chat_n(100, &["--context", "48"], "Tell a story.\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the context is full at 48 tokens"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn ctrl_c_at_the_prompt_warns_and_a_second_press_leaves() {
    let mut chat = LiveChat::start(&[]);
    assert!(
        chat.wait_for("tandem chat:", Duration::from_secs(60)),
        "{}",
        chat.seen
    );
    chat.interrupt();
    assert!(
        chat.wait_for("Ctrl-C again", Duration::from_secs(5)),
        "{}",
        chat.seen
    );
    assert_eq!(
        chat.exit_within(Duration::from_millis(500)),
        None,
        "left at the first press"
    );
    chat.interrupt();
    assert_eq!(chat.exit_within(Duration::from_secs(5)), Some(0));
}

#[test]
fn ctrl_c_stops_the_prefill_of_a_long_document_and_the_chat_goes_on() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data");
    let doc = std::fs::read(data.join("gpl-2.0.txt")).expect("tests/data/gpl-2.0.txt");
    let file = scratch_file("long.txt", &doc[..12_000]);
    let mut chat = LiveChat::start(&["--file", file.to_str().expect("utf-8 path")]);
    assert!(
        chat.wait_for("tandem chat:", Duration::from_secs(60)),
        "{}",
        chat.seen
    );
    chat.send("What is this about?\n");
    std::thread::sleep(Duration::from_millis(1500));
    chat.interrupt();
    let pressed = Instant::now();
    assert!(
        chat.wait_for("stopped before the reply began", Duration::from_secs(8)),
        "{}",
        chat.seen
    );
    let took = pressed.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "stopped {took:?} after Ctrl-C"
    );
    chat.send("/exit\n");
    assert_eq!(
        chat.exit_within(Duration::from_secs(10)),
        Some(0),
        "{}",
        chat.seen
    );
}
