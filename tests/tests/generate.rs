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
