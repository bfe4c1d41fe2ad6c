//! The fidelity check as a user sees it: `generate` names its outcome, and
//! its bound decides which layers' kv heads attend exactly.

mod common;

use std::time::Duration;

use common::{run, stderr};

const TIMEOUT: Duration = Duration::from_secs(120);

/// `generate` on a prompt long enough to offload (past `--dense-below 64`)
/// with the check's bound `bound`; returns its standard error.
fn generate_with_bound(bound: &str) -> String {
    let prompt = "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(20);
    let args = [
        "generate",
        "-p",
        &prompt,
        "-n",
        "6",
        "--dense-below",
        "64",
        "--window",
        "16",
        "--fidelity-check",
        bound,
    ];
    let out = run(&args, "", TIMEOUT);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{bound}: {text}");
    text
}

#[test]
fn the_bound_decides_which_layers_attend_exactly_and_generate_says_so() {
    // SmolLM2 has 30 layers; 0 and 15 stay dense, the other 28 sample.
    let astray = generate_with_bound("1e-9");
    assert!(
        astray.contains("fidelity check: exact attention for layer 1 (")
            && astray.contains(", layer 2 ("),
        "{astray}"
    );
    assert!(
        !astray.contains("layers sample") && !astray.contains("layer samples"),
        "{astray}"
    );
    let kept = generate_with_bound("1e9");
    assert!(kept.contains("fidelity check: 28 layers sample"), "{kept}");
    let off = generate_with_bound("0");
    assert!(!off.contains("fidelity check:"), "{off}");
    assert!(generate_with_bound("0.15").contains("fidelity check"));
}

#[test]
fn a_negative_or_nan_bound_is_refused() {
    for bound in ["--fidelity-check=-1", "--fidelity-check=nan"] {
        let out = run(&["generate", "-p", "hi", "-n", "1", bound], "", TIMEOUT);
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{bound}: {text}");
        assert!(text.contains("fidelity_check"), "{bound}: {text}");
    }
}
