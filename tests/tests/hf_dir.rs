//! Hugging Face model directories (config.json + *.safetensors + tokenizer.json):
//! a tiny random GGUF converted to an HF checkpoint by `tests/reference/make_hf.py`
//! (which undoes llama.cpp's q/k row permutation) must give the same logits as the
//! GGUF it came from, and damaged directories must fail with errors naming the file.

use std::path::{Path, PathBuf};
use std::process::Command;

use tandem_gpu::CpuDevice;
use tandem_runtime::chat::Message;
use tandem_runtime::model::{load_gguf, Llama, Logits};
use tandem_runtime::{Engine, EngineOptions, Error};
use tandem_tests::root;

const TOKENS: [u32; 8] = [1, 72, 101, 108, 108, 111, 200, 5];

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tandem-hf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn python(script: &str, args: &[&std::ffi::OsStr]) {
    let status = Command::new("python3")
        .arg(root().join("tests/reference").join(script))
        .args(args)
        .status()
        .expect("python3 runs (installed by scripts/setup.sh)");
    assert!(status.success(), "{script} failed");
}

/// Writes a tiny GGUF (`make_gguf.py` options) and its HF conversion (`make_hf.py`
/// options) under `dir`; returns (gguf path, hf dir).
fn make(dir: &Path, gguf_args: &[&str], hf_args: &[&str]) -> (PathBuf, PathBuf) {
    let gguf = dir.join("model.gguf");
    let hf = dir.join("hf");
    let mut a: Vec<&std::ffi::OsStr> = vec![gguf.as_os_str()];
    a.extend(gguf_args.iter().map(std::ffi::OsStr::new));
    python("make_gguf.py", &a);
    let mut a: Vec<&std::ffi::OsStr> = vec![gguf.as_os_str(), hf.as_os_str()];
    a.extend(hf_args.iter().map(std::ffi::OsStr::new));
    python("make_hf.py", &a);
    (gguf, hf)
}

fn logits_gguf(path: &Path) -> Vec<f32> {
    let (_, model) = load_gguf(path, CpuDevice::new(1)).expect("gguf loads");
    let mut cache = model.new_cache().expect("cache");
    model
        .forward(&TOKENS, &mut cache, Logits::All)
        .expect("forward")
}

fn logits_hf(dir: &Path) -> Vec<f32> {
    let model = Llama::from_hf_dir(dir, CpuDevice::new(1)).expect("hf dir loads");
    let mut cache = model.new_cache().expect("cache");
    model
        .forward(&TOKENS, &mut cache, Logits::All)
        .expect("forward")
}

fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    assert_eq!(a.len(), TOKENS.len() * 256);
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    eprintln!("max |Δ| = {max}");
    assert!(max <= tol, "max |Δ| = {max} > {tol}");
    // The logits are not trivially zero.
    assert!(a.iter().any(|x| x.abs() > 1e-3));
}

#[test]
fn f32_checkpoint_matches_gguf() {
    let dir = scratch("f32");
    let (gguf, hf) = make(&dir, &["--type", "F32"], &["--dtype", "f32"]);
    assert_close(&logits_gguf(&gguf), &logits_hf(&hf), 1e-3);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Llama 3.1's `rope_scaling` in config.json gives the frequencies that
/// `rope_freqs.weight` gives in GGUF.
#[test]
fn llama3_rope_scaling_matches_gguf_rope_freqs() {
    let dir = scratch("llama31");
    let (gguf, hf) = make(
        &dir,
        &["--type", "F32", "--rope-freqs"],
        &["--dtype", "f32"],
    );
    let config = std::fs::read_to_string(hf.join("config.json")).expect("config");
    assert!(config.contains("\"llama3\""), "{config}");
    assert_close(&logits_gguf(&gguf), &logits_hf(&hf), 1e-3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bf16_checkpoint_matches_bf16_gguf() {
    let dir = scratch("bf16");
    // Norms stay F32 as in the GGUF (a mixed-dtype file); matrices are bit-identical bf16.
    let (gguf, hf) = make(
        &dir,
        &["--type", "BF16", "--seed", "3"],
        &["--dtype", "bf16", "--f32-norms"],
    );
    assert_close(&logits_gguf(&gguf), &logits_hf(&hf), 1e-3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sharded_f16_tied_checkpoint_matches_gguf() {
    let dir = scratch("f16");
    let (gguf, hf) = make(
        &dir,
        &["--type", "F16", "--tied", "--seed", "5"],
        &["--dtype", "f16", "--shards", "3", "--f32-norms"],
    );
    assert!(hf.join("model-00003-of-00003.safetensors").exists());
    assert_close(&logits_gguf(&gguf), &logits_hf(&hf), 1e-3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn engine_loads_a_directory() {
    let dir = scratch("engine");
    let (_, hf) = make(&dir, &[], &[]);
    let engine = Engine::load(
        &hf,
        &EngineOptions {
            threads: 1,
            ..EngineOptions::default()
        },
    )
    .expect("engine loads");
    let ids = engine.tokenizer().encode("Hello", false).expect("encode");
    assert_eq!(ids, [72, 101, 108, 108, 111]);
    assert_eq!(engine.tokenizer().decode(&ids).expect("decode"), "Hello");
    let prompt = engine
        .render_chat(&[Message::user("hi")])
        .expect("template");
    assert_eq!(prompt, "<user>hi\n<assistant>");
    let mut session = engine.session().expect("session");
    let logits = session.prefill(&ids, &mut |_, _| {}).expect("prefill");
    assert_eq!(logits.len(), 256);
    let _ = std::fs::remove_dir_all(&dir);
}

fn load_err(dir: &Path) -> Error {
    match Llama::from_hf_dir(dir, CpuDevice::new(1)) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn damaged_directories_fail_naming_the_file() {
    let dir = scratch("bad");
    let (_, hf) = make(&dir, &[], &[]);
    let config = std::fs::read_to_string(hf.join("config.json")).expect("config");
    let weights = std::fs::read(hf.join("model.safetensors")).expect("weights");

    // Wrong architecture.
    std::fs::write(
        hf.join("config.json"),
        config.replace("LlamaForCausalLM", "MistralForCausalLM"),
    )
    .unwrap();
    let e = load_err(&hf);
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("MistralForCausalLM"),
        "{msg}"
    );

    // Only Llama 3.1's rope_scaling is supported, and it needs all its parameters.
    let with_scaling = |scaling: &str| {
        std::fs::write(
            hf.join("config.json"),
            config.replace(
                "\"rope_scaling\": null",
                &format!("\"rope_scaling\": {scaling}"),
            ),
        )
        .unwrap();
        load_err(&hf)
    };
    let e = with_scaling("{\"rope_type\": \"yarn\", \"factor\": 4.0}");
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("rope_scaling"), "{e}");
    let e = with_scaling("{\"rope_type\": \"llama3\", \"factor\": 8.0}");
    assert!(matches!(e, Error::BadModel { .. }), "{e}");
    assert!(
        e.to_string().contains("rope_scaling.low_freq_factor"),
        "{e}"
    );

    // Missing config.json (also through the engine).
    std::fs::remove_file(hf.join("config.json")).unwrap();
    let e = load_err(&hf);
    assert!(e.to_string().contains("config.json"), "{e}");
    let e = Engine::load(
        &hf,
        &EngineOptions {
            threads: 1,
            ..EngineOptions::default()
        },
    )
    .err()
    .expect("engine fails");
    assert!(e.to_string().contains("config.json"), "{e}");
    std::fs::write(hf.join("config.json"), &config).unwrap();

    // Truncated weights: the header survives, the data does not.
    std::fs::write(
        hf.join("model.safetensors"),
        &weights[..weights.len() * 6 / 10],
    )
    .unwrap();
    let e = load_err(&hf);
    assert!(matches!(e, Error::BadModel { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    // Truncated inside the header.
    std::fs::write(hf.join("model.safetensors"), &weights[..100]).unwrap();
    let e = load_err(&hf);
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    // Too short for the header length.
    std::fs::write(hf.join("model.safetensors"), &weights[..3]).unwrap();
    let e = load_err(&hf);
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    // A header whose sizes disagree with the shape.
    let n = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&weights[8..8 + n]).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(header).unwrap();
    json["model.norm.weight"]["shape"] = serde_json::json!([65]);
    let mut new_header = serde_json::to_vec(&json).unwrap();
    while new_header.len() < n {
        new_header.push(b' ');
    }
    assert_eq!(new_header.len(), n, "the edited header fits in place");
    let mut edited = weights.clone();
    edited[8..8 + n].copy_from_slice(&new_header);
    std::fs::write(hf.join("model.safetensors"), &edited).unwrap();
    let e = load_err(&hf);
    let msg = e.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("model.norm.weight"),
        "{msg}"
    );

    // No weights at all.
    std::fs::remove_file(hf.join("model.safetensors")).unwrap();
    let e = load_err(&hf);
    assert!(e.to_string().contains("safetensors"), "{e}");

    let _ = std::fs::remove_dir_all(&dir);
}
