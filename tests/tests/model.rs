//! End-to-end checks of the default model against an independent NumPy reference.

use tandem_gpu::CpuDevice;
use tandem_runtime::chat::Message;
use tandem_runtime::model::load_gguf;
use tandem_runtime::{Engine, EngineOptions, Flow, SamplingConfig};
use tandem_tests::model_path;

fn reference_logits(tokens: &[u32]) -> Vec<Vec<f32>> {
    tandem_tests::reference(&model_path(), tokens, &[]).logits
}

/// The first 8 positions' logits agree with the NumPy float64 reference over the
/// same dequantized weights. Tolerance: tandem quantizes activations to 8 bits per
/// block of 32 (as llama.cpp does) and keeps K/V in bf16, so logits differ by a few
/// hundredths; we require max |Δ| <= 0.35 (logits span ~30) and the same top-1.
#[test]
fn forward_matches_the_numpy_reference() {
    let tokens = [1u32, 9690, 198, 2683, 359, 253, 5356, 5646];
    let want = reference_logits(&tokens);
    let (_, model) = load_gguf(&model_path(), CpuDevice::new(2)).expect("model loads");
    let vocab = model.config().vocab_size;
    // All positions at once (prefill path) and one at a time (decode path).
    let (all, one_by_one, _) = tandem_tests::prefill_and_decode(&model, &tokens);
    for (name, got) in [("prefill", &all), ("decode", &one_by_one)] {
        for (pos, want_row) in want.iter().enumerate() {
            let row = &got[pos * vocab..(pos + 1) * vocab];
            let max_diff = row
                .iter()
                .zip(want_row)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let argmax = |r: &[f32]| tandem_kernels::ops::argmax(r).expect("non-empty");
            assert!(
                max_diff <= 0.35,
                "{name} position {pos}: max |Δlogit| = {max_diff}"
            );
            assert_eq!(
                argmax(row),
                argmax(want_row),
                "{name} position {pos}: top-1 differs"
            );
        }
    }
}

#[test]
fn greedy_chat_answers_paris() {
    let engine = Engine::load(
        &model_path(),
        &EngineOptions {
            threads: 2,
            ..EngineOptions::default()
        },
    )
    .expect("model loads");
    let prompt = engine
        .render_chat(&[Message::user("What is the capital of France?")])
        .expect("template");
    let ids = engine.tokenizer().encode(&prompt, false).expect("encode");
    let mut session = engine.session().expect("session");
    let mut text = String::new();
    session
        .generate(
            &ids,
            24,
            &SamplingConfig::default(),
            None,
            &mut |_, _| {},
            &mut |piece| {
                text.push_str(piece);
                Flow::Continue
            },
        )
        .expect("generate");
    assert!(text.contains("Paris"), "reply: {text:?}");
}
