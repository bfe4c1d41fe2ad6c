//! Integration tests live in `tests/`; this crate holds only what they share.

#![forbid(unsafe_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use tandem_gpu::DenseDevice;
use tandem_runtime::model::{Llama, Logits};
use tandem_runtime::split::SequenceKv;

/// The repository's root directory.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The default model, fetched by `scripts/setup.sh` (tests that need it fail
/// with that advice rather than skip).
pub fn model_path() -> PathBuf {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh first",
        p.display()
    );
    p
}

/// Gemma 3 270M (a 32k-context base model with sliding-window layers), fetched
/// by `scripts/setup.sh`.
pub fn gemma3_path() -> PathBuf {
    let p = root().join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh first",
        p.display()
    );
    p
}

/// A path for file `name` in a temporary directory of this process, one per
/// `suite` (created if missing).
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-{suite}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir.join(name)
}

/// Runs `python3 args...`, panicking with its stderr if it fails; returns its stdout.
pub fn python<S: AsRef<OsStr>>(args: &[S]) -> Vec<u8> {
    let out = Command::new("python3")
        .args(args)
        .output()
        .expect("python3 runs (installed by scripts/setup.sh)");
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// What the NumPy reference (`tests/reference/llama_ref.py`) computes for a
/// prompt: logits per position (all, or the last `--last N`) and, with
/// `--greedy N`, its greedy continuation.
pub struct Reference {
    pub logits: Vec<Vec<f32>>,
    pub greedy: Vec<u32>,
}

/// Runs the NumPy reference on `model` over `tokens` with `extra` options.
pub fn reference(model: &Path, tokens: &[u32], extra: &[&str]) -> Reference {
    let out = std::env::temp_dir().join(format!(
        "tandem-ref-{}-{}.json",
        std::process::id(),
        tokens.len() ^ (extra.len() << 20) ^ (model.as_os_str().len() << 32)
    ));
    let ids: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let script = root().join("tests/reference/llama_ref.py");
    let mut args: Vec<&OsStr> = vec![script.as_os_str(), OsStr::new("--model"), model.as_os_str()];
    let ids = ids.join(",");
    args.extend([OsStr::new("--tokens"), OsStr::new(&ids)]);
    args.extend(extra.iter().map(OsStr::new));
    args.extend([OsStr::new("--out"), out.as_os_str()]);
    python(&args);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out).expect("reference output")).expect("json");
    let _ = std::fs::remove_file(&out);
    let floats = |row: &serde_json::Value| -> Vec<f32> {
        row.as_array()
            .expect("row")
            .iter()
            .map(|v| v.as_f64().expect("float") as f32)
            .collect()
    };
    Reference {
        logits: json["logits"]
            .as_array()
            .expect("logits")
            .iter()
            .map(floats)
            .collect(),
        greedy: json
            .get("greedy")
            .and_then(|g| g.as_array())
            .map(|g| g.iter().map(|t| t.as_u64().expect("id") as u32).collect())
            .unwrap_or_default(),
    }
}

/// `model`'s logits for every position of `tokens`, once through the prefill
/// path (all positions in one pass) and once through the decode path (one
/// position at a time); also the decode path's cache, to continue from.
pub fn prefill_and_decode<D: DenseDevice>(
    model: &Llama<D>,
    tokens: &[u32],
) -> (Vec<f32>, Vec<f32>, SequenceKv<D>) {
    let mut cache = model.new_cache().expect("cache");
    let all = model
        .forward(tokens, &mut cache, Logits::All)
        .expect("forward");
    let mut cache = model.new_cache().expect("cache");
    let mut one_by_one = Vec::new();
    for &t in tokens {
        let logits = model.forward(&[t], &mut cache, Logits::Last);
        one_by_one.extend(logits.expect("forward"));
    }
    (all, one_by_one, cache)
}
