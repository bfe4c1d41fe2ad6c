//! One generation loop: a session alone and the same session in a batch end
//! the same way and leave the same context.

use tandem_runtime::chat::Message;
use tandem_runtime::{Engine, EngineOptions, Flow, SamplingConfig};
use tandem_tests::model_path;

fn engine() -> Engine {
    let options = EngineOptions {
        threads: 2,
        cpu_workers: 2,
        ..EngineOptions::default()
    };
    Engine::load(&model_path(), &options).expect("load")
}

#[test]
fn end_of_turn_stays_in_the_context_alone_and_in_a_batch() {
    let engine = engine();
    let chat = engine
        .render_chat(&[Message::user("What is the capital of France?")])
        .expect("template");
    let prompt = engine.tokenizer().encode(&chat, false).expect("encode");
    let greedy = SamplingConfig::default();

    let mut alone = engine.session().expect("session");
    alone
        .generate(&prompt, 64, &greedy, None, &mut |_, _| {}, &mut |_| {
            Flow::Continue
        })
        .expect("generate");
    let last = *alone.tokens().last().expect("tokens");
    assert!(
        engine.tokenizer().is_end_of_turn(last),
        "the reply ends its turn within 64 tokens, and the end of turn is kept"
    );

    let mut first = engine.session().expect("session");
    let mut second = engine.session().expect("session");
    engine
        .generate_batch(
            &mut [&mut first, &mut second],
            &[&prompt, &prompt],
            64,
            &greedy,
            None,
            &mut |_, _| Flow::Continue,
        )
        .expect("batch");
    assert_eq!(first.tokens(), alone.tokens());
    assert_eq!(second.tokens(), alone.tokens());
}

#[test]
fn a_reply_stopped_by_its_reader_leaves_the_same_context_alone_and_in_a_batch() {
    let engine = engine();
    let chat = engine
        .render_chat(&[Message::user("Name three colours.")])
        .expect("template");
    let prompt = engine.tokenizer().encode(&chat, false).expect("encode");
    let greedy = SamplingConfig::default();
    let stop_after = |pieces: &mut usize| {
        *pieces += 1;
        if *pieces == 3 {
            Flow::Stop
        } else {
            Flow::Continue
        }
    };
    let mut alone = engine.session().expect("session");
    let mut pieces = 0;
    alone
        .generate(&prompt, 64, &greedy, None, &mut |_, _| {}, &mut |_| {
            stop_after(&mut pieces)
        })
        .expect("generate");
    let mut batched = engine.session().expect("session");
    let mut pieces = 0;
    engine
        .generate_batch(
            &mut [&mut batched],
            &[&prompt],
            64,
            &greedy,
            None,
            &mut |_, _| stop_after(&mut pieces),
        )
        .expect("batch");
    assert_eq!(batched.tokens(), alone.tokens());
    assert!(alone.tokens().len() > prompt.len());
}

#[test]
fn a_prefill_cancelled_after_its_first_chunk_leaves_the_session_as_it_was() {
    let engine = engine();
    let greedy = SamplingConfig::default();
    let text = |session: &mut tandem_runtime::Session, prompt: &[u32]| {
        let mut out = String::new();
        let stats = session
            .generate(prompt, 8, &greedy, None, &mut |_, _| {}, &mut |t| {
                out.push_str(t);
                Flow::Continue
            })
            .expect("generate");
        (out, stats.stop)
    };
    let hello = engine
        .tokenizer()
        .encode("Hello there.", false)
        .expect("encode");
    let long = engine
        .tokenizer()
        .encode(
            &"The quick brown fox jumps over the lazy dog. ".repeat(30),
            false,
        )
        .expect("encode");
    assert!(long.len() > tandem_runtime::PREFILL_CHUNK);

    let mut session = engine.session().expect("session");
    text(&mut session, &hello);
    let before = session.tokens().to_vec();
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let stopped = session.generate(
        &long,
        8,
        &greedy,
        Some(&cancel),
        &mut |_, _| cancel.store(true, std::sync::atomic::Ordering::Relaxed),
        &mut |_| Flow::Continue,
    );
    assert!(
        matches!(stopped, Err(tandem_runtime::Error::Cancelled)),
        "{stopped:?}"
    );
    assert_eq!(session.tokens(), before.as_slice());

    let mut fresh = engine.session().expect("session");
    text(&mut fresh, &hello);
    let resumed = text(&mut session, &hello);
    assert_eq!(resumed, text(&mut fresh, &hello));
    assert_eq!(resumed.1, tandem_runtime::StopReason::MaxTokens);
}

/// Greedy tokens after `prompt`, one `Session::step` at a time.
fn greedy_alone(engine: &Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut session = engine.session().expect("session");
    let mut logits = session.prefill(prompt, &mut |_, _| {}).expect("prefill");
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(&logits);
        out.push(next);
        logits = session.step(next).expect("step");
    }
    out
}

fn argmax(logits: &[f32]) -> u32 {
    let best = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .expect("logits");
    best.0 as u32
}

#[test]
fn sessions_joining_a_batch_between_steps_decode_as_they_do_alone() {
    let engine = engine();
    let encode = |text: &str| {
        let chat = engine
            .render_chat(&[Message::user(text)])
            .expect("template");
        engine.tokenizer().encode(&chat, false).expect("encode")
    };
    let (p1, p2) = (encode("Name three colours."), encode("What is 2 + 2?"));
    let steps = 6;
    let (want1, want2) = (
        greedy_alone(&engine, &p1, steps),
        greedy_alone(&engine, &p2, steps),
    );

    let mut first = engine.session().expect("session");
    let mut second = engine.session().expect("session");
    let mut l1 = first.prefill(&p1, &mut |_, _| {}).expect("prefill");
    let (mut got1, mut got2) = (vec![argmax(&l1)], Vec::new());
    l1 = first.step(got1[0]).expect("step");
    // The second session joins after the first has taken a step alone.
    let mut l2 = second.prefill(&p2, &mut |_, _| {}).expect("prefill");
    while got2.len() < steps - 1 {
        let (t1, t2) = (argmax(&l1), argmax(&l2));
        got1.push(t1);
        got2.push(t2);
        let out = engine
            .step_batch(&mut [&mut first, &mut second], &[t1, t2])
            .expect("batch step");
        (l1, l2) = (out[0].clone(), out[1].clone());
    }
    got2.push(argmax(&l2));
    assert_eq!(got1, want1);
    assert_eq!(got2, want2);
    assert!(engine.step_batch(&mut [&mut first], &[1, 2]).is_err());
}
