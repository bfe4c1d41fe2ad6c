//! Each model family's conventions (Qwen2's biases and NEOX RoPE, Gemma 3's
//! norms, GeGLU, two RoPE bases and sliding windows, Llama 3.1's RoPE
//! scaling) against the NumPy reference, on tiny generated GGUFs: no
//! trustworthy real weights of Qwen2 or Llama 3.1 are at hand here.

use std::path::PathBuf;

use tandem_gpu::CpuDevice;
use tandem_runtime::model::load_gguf;
use tandem_tests::{prefill_and_decode, python, root};

fn scratch(name: &str) -> PathBuf {
    tandem_tests::scratch("families", name)
}

/// tandem's logits (all positions in one pass, then one position at a time,
/// as decoding runs) and the reference's, for a tiny model made with `options`.
fn both(name: &str, options: &[&str], tokens: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let (prefill, decode, want) = all_three(name, options, tokens);
    assert_close(&format!("{name}, one at a time"), &decode, &want);
    (prefill, want)
}

fn all_three(name: &str, options: &[&str], tokens: &[u32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let path = scratch(&format!("{name}.gguf"));
    let path_s = path.to_str().expect("utf-8");
    let make = root().join("tests/reference/make_gguf.py");
    let mut args = vec![make.to_str().expect("utf-8"), path_s];
    args.extend_from_slice(options);
    python(&args);
    let want = tandem_tests::reference(&path, tokens, &[]).logits.concat();
    let (_, model) = load_gguf(&path, CpuDevice::new(2)).expect("tiny model loads");
    let (got, one_by_one, _) = prefill_and_decode(&model, tokens);
    (got, one_by_one, want)
}

fn assert_close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let max_diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // bf16 keys and values: differences far below 1% of the logit range.
    assert!(
        max_diff <= 1e-2 * scale + 1e-5,
        "{name}: max |Δ| {max_diff} with logits up to {scale}"
    );
}

const TOKENS: [u32; 20] = [
    72, 101, 108, 108, 111, 32, 33, 10, 87, 111, 114, 108, 100, 32, 97, 103, 97, 105, 110, 46,
];

#[test]
fn qwen2_biases_and_neox_rope_match_the_reference() {
    let (got, want) = both("qwen2", &["--arch", "qwen2"], &TOKENS);
    assert_close("qwen2", &got, &want);
}

/// Twenty tokens through a window of four: the local layers' mask matters, and
/// one at a time their oldest rows are dropped.
#[test]
fn gemma3_conventions_and_sliding_windows_match_the_reference() {
    let (got, want) = both("gemma3", &["--arch", "gemma3"], &TOKENS);
    assert_close("gemma3", &got, &want);
}

#[test]
fn llama31_rope_scaling_matches_the_reference() {
    let (got, want) = both("llama31", &["--rope-freqs"], &TOKENS);
    assert_close("llama3.1 scaling", &got, &want);
    // The scaling changes the logits: the test would fail without it.
    let (plain, _) = both("llama31-plain", &[], &TOKENS);
    assert!(got.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-4));
}
