//! Gemma 3 270M (sliding-window layers, per-head q/k norms, sandwich norms,
//! GeGLU, NEOX RoPE with two bases) against the independent NumPy reference.

use tandem_gpu::CpuDevice;
use tandem_runtime::model::{load_gguf, Llama, Logits};
use tandem_runtime::{Engine, EngineOptions};
use tandem_tests::{gemma3_path, root};

/// The reference's logits of the last `last` positions of `tokens`, and its
/// greedy continuation of `greedy` tokens.
fn reference(tokens: &[u32], last: usize, greedy: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let (last, greedy) = (last.to_string(), greedy.to_string());
    let r = tandem_tests::reference(
        &gemma3_path(),
        tokens,
        &["--last", &last, "--greedy", &greedy],
    );
    (r.logits, r.greedy)
}

fn argmax(r: &[f32]) -> usize {
    tandem_kernels::ops::argmax(r).expect("non-empty")
}

fn model() -> Llama<CpuDevice> {
    load_gguf(&gemma3_path(), CpuDevice::new(2))
        .expect("Gemma 3 loads")
        .1
}

fn tokens_of(text: &str) -> Vec<u32> {
    let engine = Engine::load(&gemma3_path(), &EngineOptions::default()).expect("engine");
    engine.tokenizer().encode(text, true).expect("encode")
}

/// The model file's own description of itself reaches the configuration.
#[test]
fn config_reads_gemma3_conventions() {
    let m = model();
    let c = m.config();
    assert_eq!(
        (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim),
        (18, 640, 4, 1, 256)
    );
    assert_eq!(c.context_length, 32768);
    let global: Vec<usize> = (0..c.n_layers)
        .filter(|&l| c.sliding_window(l).is_none())
        .collect();
    assert_eq!(global, [5, 11, 17]);
    assert_eq!(c.sliding_window(0), Some(512));
    assert_eq!((c.layer_rope_base(0), c.layer_rope_base(5)), (10000.0, 1e6));
}

/// Logits of a short prompt agree with the float64 reference, through the
/// prefill path (all positions at once) and the decode path (one at a time),
/// and the greedy continuations are equal. Tolerance: tandem quantizes
/// activations to 8 bits per block of 32 for the quantized matrix products
/// and keeps K/V in bf16; Gemma's logits span ~60.
#[test]
fn short_prompt_matches_the_numpy_reference() {
    let tokens = tokens_of("The capital of France is Paris. The capital of Italy is");
    let (want, want_greedy) = reference(&tokens, tokens.len(), 8);
    let m = model();
    let vocab = m.config().vocab_size;
    let (all, one_by_one, mut cache) = tandem_tests::prefill_and_decode(&m, &tokens);
    for (name, got) in [("prefill", &all), ("decode", &one_by_one)] {
        for (pos, want_row) in want.iter().enumerate() {
            let row = &got[pos * vocab..(pos + 1) * vocab];
            let max_diff = row
                .iter()
                .zip(want_row)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                max_diff <= 0.6,
                "{name} position {pos}: max |Δlogit| = {max_diff}"
            );
            assert_eq!(argmax(row), argmax(want_row), "{name} position {pos}");
        }
    }
    let mut greedy = Vec::new();
    let mut logits = one_by_one[(tokens.len() - 1) * vocab..].to_vec();
    for _ in 0..want_greedy.len() {
        let t = argmax(&logits) as u32;
        greedy.push(t);
        logits = m.forward(&[t], &mut cache, Logits::Last).expect("forward");
    }
    assert_eq!(greedy, want_greedy, "greedy continuations");
}

/// Past the 512-token window of the local layers, the top-1 token agrees with
/// the reference at the positions it scores (a prompt of ~1,400 tokens; the
/// last 64 positions, all beyond the window).
#[test]
fn long_prompt_past_the_window_matches_the_reference() {
    let text = std::fs::read_to_string(root().join("tests/data/gpl-2.0.txt")).expect("text");
    let mut tokens = tokens_of(&text);
    tokens.truncate(1400);
    let last = 64;
    let (want, _) = reference(&tokens, last, 0);
    let m = model();
    let vocab = m.config().vocab_size;
    let mut cache = m.new_cache().expect("cache");
    let mut logits = Vec::new();
    for chunk in tokens.chunks(256) {
        logits = m.forward(chunk, &mut cache, Logits::All).expect("forward");
    }
    // The last chunk holds the last `last` positions at its end.
    let rows = logits.len() / vocab;
    let mut agree = 0;
    for (i, want_row) in want.iter().enumerate() {
        let row = &logits[(rows - last + i) * vocab..(rows - last + i + 1) * vocab];
        agree += usize::from(argmax(row) == argmax(want_row));
    }
    assert!(
        agree >= last - 1,
        "top-1 agrees at {agree} of {last} positions beyond the window"
    );
}
