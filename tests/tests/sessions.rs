//! Saved sessions: a restored session continues exactly where the saved one
//! stood, and damaged or foreign files are refused; a cancelled prefill
//! leaves the session as it was.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use tandem_runtime::chat::Message;
use tandem_runtime::policy::{PolicyConfig, DEFAULT_POLICY};
use tandem_runtime::{Engine, EngineOptions, Error, SavedSession, PREFILL_CHUNK};
use tandem_tests::{gemma3_path, model_path};

fn engine_with(policy: &str) -> Engine {
    let options = EngineOptions {
        threads: 2,
        cpu_workers: 2,
        policy: PolicyConfig {
            policy: policy.into(),
            ..PolicyConfig::default()
        },
        ..EngineOptions::default()
    };
    Engine::load(&model_path(), &options).expect("load")
}

fn scratch(name: &str) -> PathBuf {
    tandem_tests::scratch("sessions", name)
}

fn conversation(engine: &Engine) -> SavedSession {
    let messages = vec![
        Message::user("Name three rivers of Europe."),
        Message::assistant("The Rhine, the Danube and the Loire."),
        Message::user("Which is the longest?"),
    ];
    let text = engine.render_chat(&messages).expect("template");
    let tokens = engine.tokenizer().encode(&text, false).expect("encode");
    SavedSession {
        tokens,
        messages,
        state: None,
    }
}

fn session_error(result: tandem_runtime::Result<SavedSession>) -> String {
    match result {
        Err(e @ Error::SessionFile { .. }) => e.to_string(),
        other => panic!("expected a session-file error, got {other:?}"),
    }
}

#[test]
fn a_restored_session_gives_the_same_next_token_logits() {
    let engine = engine_with(DEFAULT_POLICY);
    let saved = conversation(&engine);
    let mut original = engine.session().expect("session");
    let logits = original
        .prefill(&saved.tokens, &mut |_, _| {})
        .expect("prefill");

    let path = scratch("round-trip.tandem");
    engine.save_session(&path, &saved).expect("save");
    let loaded = engine.load_session(&path).expect("load");
    assert_eq!(loaded, saved);
    let (restored, restored_logits) = engine
        .restore_session(&loaded, None, &mut |_, _| {})
        .expect("restore");
    assert_eq!(restored.tokens(), original.tokens());
    let restored_logits = restored_logits.expect("logits");
    assert!(
        logits
            .iter()
            .zip(&restored_logits)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "the next-token logits are bit-identical"
    );
}

#[test]
fn damaged_and_foreign_files_are_refused() {
    let engine = engine_with(DEFAULT_POLICY);
    let path = scratch("damaged.tandem");
    engine
        .save_session(&path, &conversation(&engine))
        .expect("save");
    let bytes = std::fs::read(&path).expect("read");

    std::fs::write(&path, &bytes[..bytes.len() - 10]).expect("write");
    let err = session_error(engine.load_session(&path));
    assert!(err.contains("truncated"), "{err}");

    let mut flipped = bytes.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x20;
    std::fs::write(&path, &flipped).expect("write");
    let err = session_error(engine.load_session(&path));
    assert!(err.contains("checksum"), "{err}");

    std::fs::write(&path, b"hello, this is not a session").expect("write");
    let err = session_error(engine.load_session(&path));
    assert!(err.contains("not a tandem session file"), "{err}");

    std::fs::write(&path, &bytes).expect("write");
    let err = session_error(engine_with("exact").load_session(&path));
    assert!(err.contains("another attention policy"), "{err}");

    let gemma = Engine::load(&gemma3_path(), &EngineOptions::default()).expect("gemma");
    let err = session_error(gemma.load_session(&path));
    assert!(err.contains("another model"), "{err}");
}

#[test]
fn a_cancelled_prefill_drops_its_tokens() {
    let engine = engine_with(DEFAULT_POLICY);
    let mut session = engine.session().expect("session");
    let first = engine
        .tokenizer()
        .encode("A first sentence.", false)
        .expect("encode");
    session.prefill(&first, &mut |_, _| {}).expect("prefill");

    let long: Vec<u32> = (0..PREFILL_CHUNK as u32 * 2 + 8)
        .map(|i| 100 + i % 500)
        .collect();
    let cancel = AtomicBool::new(false);
    let mut reports = 0;
    let mut on_progress = |_, _| {
        reports += 1;
        cancel.store(true, Ordering::Relaxed);
    };
    let result = session.prefill_cancellable(&long, &mut on_progress, Some(&cancel));
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    assert_eq!(
        reports, 1,
        "it stops after the chunk during which it was cancelled"
    );
    assert_eq!(session.tokens(), first.as_slice());
}

#[test]
fn a_prompt_prefilled_in_parts_decodes_as_one_prefill() {
    let options = EngineOptions {
        threads: 2,
        cpu_workers: 2,
        policy: PolicyConfig {
            policy: "topk:k=32".into(),
            dense_below: PREFILL_CHUNK,
            ..PolicyConfig::default()
        },
        ..EngineOptions::default()
    };
    let engine = Engine::load(&model_path(), &options).expect("load");
    let prompt: Vec<u32> = (0..PREFILL_CHUNK as u32 + 8)
        .map(|i| 100 + i % 500)
        .collect();
    let mut whole = engine.session().expect("session");
    let mut logits = vec![whole.prefill(&prompt, &mut |_, _| {}).expect("prefill")];
    logits.push(whole.step(7).expect("step"));

    let mut parts = engine.session().expect("session");
    let (head, tail) = prompt.split_at(PREFILL_CHUNK);
    parts.prefill_part(head).expect("first part");
    let mut parted = vec![parts.prefill(tail, &mut |_, _| {}).expect("last part")];
    parted.push(parts.step(7).expect("step"));
    assert_eq!(parts.tokens(), whole.tokens());
    assert!(
        logits == parted,
        "the logits after the prompt and after one step differ"
    );
}
