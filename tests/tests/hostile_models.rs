//! Hostile model files: shapes and constants that would ask for terabytes,
//! divide by zero or feed NaN to the forward pass are load errors naming the
//! problem, never a panic or an abort.

use std::path::PathBuf;

use tandem_gpu::CpuDevice;
use tandem_runtime::model::{load_gguf, safetensors::read_hf_config};

fn scratch(name: &str) -> PathBuf {
    tandem_tests::scratch("hostile", name)
}

#[derive(Clone)]
enum Meta {
    U64(u64),
    F32(f32),
    Str(&'static str),
}

fn push_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// A llama GGUF of width 8, two heads and one F32 `token_embd.weight` of 4
/// rows, with `changes` replacing or adding metadata.
fn gguf(changes: &[(&str, Meta)]) -> Vec<u8> {
    let mut meta = vec![
        ("general.architecture", Meta::Str("llama")),
        ("llama.embedding_length", Meta::U64(8)),
        ("llama.attention.head_count", Meta::U64(2)),
        ("llama.block_count", Meta::U64(1)),
        ("llama.feed_forward_length", Meta::U64(16)),
    ];
    for (key, value) in changes {
        meta.retain(|(k, _)| k != key);
        meta.push((*key, value.clone()));
    }
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (key, value) in &meta {
        push_str(&mut b, key);
        match value {
            Meta::U64(v) => {
                b.extend_from_slice(&10u32.to_le_bytes());
                b.extend_from_slice(&v.to_le_bytes());
            }
            Meta::F32(v) => {
                b.extend_from_slice(&6u32.to_le_bytes());
                b.extend_from_slice(&v.to_le_bytes());
            }
            Meta::Str(v) => {
                b.extend_from_slice(&8u32.to_le_bytes());
                push_str(&mut b, v);
            }
        }
    }
    push_str(&mut b, "token_embd.weight");
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&8u64.to_le_bytes());
    b.extend_from_slice(&4u64.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.resize(b.len().next_multiple_of(32) + 8 * 4 * 4, 0);
    b
}

fn load_error(name: &str, changes: &[(&str, Meta)]) -> String {
    let path = scratch(&format!("{name}.gguf"));
    std::fs::write(&path, gguf(changes)).expect("write");
    match load_gguf(&path, CpuDevice::new(1)) {
        Ok(_) => panic!("{name}: a hostile file loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_base_file_fails_only_for_its_missing_layer_weights() {
    let err = load_error("base", &[]);
    assert!(
        err.contains("tensor `blk.0.attn_norm.weight` is missing"),
        "{err}"
    );
}

#[test]
fn huge_layer_counts_are_errors() {
    for (name, n) in [("2^62", 1u64 << 62), ("2^40", 1 << 40)] {
        let err = load_error(name, &[("llama.block_count", Meta::U64(n))]);
        assert!(
            err.contains(&format!("`llama.block_count` = {n} is out of range")),
            "{err}"
        );
    }
}

#[test]
fn nan_or_negative_eps_and_rope_base_are_errors() {
    for (key, v) in [
        ("llama.attention.layer_norm_rms_epsilon", f32::NAN),
        ("llama.attention.layer_norm_rms_epsilon", -1e-5),
        ("llama.rope.freq_base", -10000.0),
        ("llama.rope.freq_base", f32::INFINITY),
    ] {
        let err = load_error("constants", &[(key, Meta::F32(v))]);
        assert!(
            err.contains("must be a positive number"),
            "{key} = {v}: {err}"
        );
    }
}

#[test]
fn an_odd_head_size_is_an_error() {
    let err = load_error("odd-head", &[("llama.embedding_length", Meta::U64(6))]);
    assert!(err.contains("inconsistent heads"), "{err}");
}

fn hf_config_error(name: &str, changes: &[(&str, serde_json::Value)]) -> String {
    let dir = scratch(name);
    std::fs::create_dir_all(&dir).expect("dir");
    let mut config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "intermediate_size": 16,
        "vocab_size": 4,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 64,
    });
    for (key, value) in changes {
        config[key] = value.clone();
    }
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write");
    match read_hf_config(&dir) {
        Ok(_) => panic!("{name}: a hostile config.json was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hugging_face_configs_are_checked_like_gguf_metadata() {
    use serde_json::json;
    let err = hf_config_error("hf-odd-head", &[("hidden_size", json!(6))]);
    assert!(err.contains("head size 3 is odd"), "{err}");
    let err = hf_config_error("hf-huge-head", &[("hidden_size", json!(1u64 << 40))]);
    assert!(err.contains("out of range"), "{err}");
    let err = hf_config_error("hf-layers", &[("num_hidden_layers", json!(1u64 << 62))]);
    assert!(
        err.contains("layer count 4611686018427387904 is out of range"),
        "{err}"
    );
    let err = hf_config_error("hf-eps", &[("rms_norm_eps", json!(-1.0))]);
    assert!(
        err.contains("RMS epsilon -1 must be a positive number"),
        "{err}"
    );
    let err = hf_config_error("hf-theta", &[("rope_theta", json!(0.0))]);
    assert!(
        err.contains("RoPE base 0 must be a positive number"),
        "{err}"
    );
}
