//! Arguments and sizes a user controls are checked before anything large is
//! allocated or any model loads.

mod common;

use std::time::Duration;

use common::{run, scratch_file, stderr};

const QUICK: Duration = Duration::from_secs(30);

fn refused(args: &[&str]) -> String {
    let out = run(args, "", QUICK);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {text}");
    assert!(!text.contains("panicked"), "{args:?}: {text}");
    text
}

#[test]
fn bench_shapes_beyond_the_memory_are_refused_at_once() {
    let decode = [
        "bench",
        "decode",
        "--shape",
        "llama3.1-8b",
        "--memory-limit",
        "16G",
    ];
    for extra in [
        &["--context", "10000000"][..],
        &["--context", "18446744073709551615"],
        &["--batch", "1000000"],
    ] {
        let args: Vec<&str> = decode.iter().chain(extra).copied().collect();
        let text = refused(&args);
        assert!(text.contains("more than the 17.2 GB allowed"), "{text}");
        assert!(text.contains("kbits=4,vbits=4"), "{text}");
        assert!(text.contains("--memory-limit"), "{text}");
    }
    let text = refused(&[
        "bench",
        "decode",
        "--shape",
        "llama3.1-8b",
        "--context",
        "18446744073709551615",
    ]);
    assert!(text.contains("more than 2^64 bytes"), "{text}");
    let text = refused(&[
        "bench",
        "attention",
        "--layers",
        "100000",
        "--memory-limit",
        "16G",
    ]);
    assert!(text.contains("100000 layers"), "{text}");
}

#[test]
fn a_file_longer_than_the_context_is_refused_before_tokenizing() {
    let file = scratch_file("big.txt", &b"All work and no play. ".repeat(100_000));
    let text = refused(&["chat", "--file", file.to_str().expect("utf-8 path")]);
    assert!(
        text.contains("2200000 bytes") && text.contains("the context holds 8192 tokens"),
        "{text}"
    );
}

#[test]
fn a_policy_is_checked_before_the_model_loads() {
    let text = refused(&["generate", "-p", "hi", "--window", "18446744073709551615"]);
    assert!(text.contains("beyond any context"), "{text}");
    assert!(!text.contains("tandem: loaded"), "{text}");
    let text = refused(&["generate", "-p", "hi", "--policy", "lsh:k=99"]);
    assert!(!text.contains("tandem: loaded"), "{text}");
    // The model's shape is known once it loads, before any prompt goes in.
    let policy = "lsh:k=10,l=75,kbits=4,vbits=4,int2_heads=9";
    let text = refused(&["generate", "-p", "hi", "--policy", policy]);
    assert!(text.contains("int2_heads=9"), "{text}");
    assert!(!text.contains("tokens/s"), "{text}");
}

#[test]
fn policy_flags_and_a_policy_file_do_not_mix() {
    let file = scratch_file("policy.toml", b"policy = \"dense\"\n");
    let out = run(
        &[
            "generate",
            "-p",
            "hi",
            "--policy-file",
            file.to_str().expect("utf-8 path"),
            "--policy",
            "window",
        ],
        "",
        QUICK,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn threads_beyond_the_cores_are_capped_with_a_warning() {
    let out = run(
        &["generate", "-p", "hi", "-n", "1", "--threads", "1000"],
        "",
        QUICK,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--threads 1000 is more than the"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_tiny_temperature_samples_as_greedy() {
    let greedy = run(
        &["generate", "-p", "The capital of France is", "-n", "4"],
        "",
        QUICK,
    );
    let tiny = run(
        &[
            "generate",
            "-p",
            "The capital of France is",
            "-n",
            "4",
            "--temperature",
            "1e-38",
        ],
        "",
        QUICK,
    );
    assert_eq!(tiny.status.code(), Some(0), "{}", stderr(&tiny));
    assert_eq!(greedy.stdout, tiny.stdout);
}

#[test]
fn the_weights_count_in_the_memory_budget() {
    // SmolLM2's weights are 98 MB; a two-token context needs a few kilobytes.
    let text = refused(&["generate", "-p", "hi", "-n", "1", "--memory-limit", "64M"]);
    assert!(
        text.contains("with the model's weights") && text.contains("67.1 MB allowed"),
        "{text}"
    );
}
