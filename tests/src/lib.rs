//! Integration tests live in `tests/`; this crate holds only what they share.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

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
