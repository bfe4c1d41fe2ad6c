//! `--device` and `tandem devices` on a machine without a usable GPU (the GPU
//! is hidden from the driver, so these hold on any machine).

use std::path::PathBuf;
use std::process::{Command, Output};

fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .expect("running tandem")
}

fn model() -> String {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    path.to_string_lossy().into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn devices_names_the_cpu_and_why_there_is_no_gpu() {
    let out = tandem(&["devices"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("cpu: ") && lines[0].ends_with("cores"),
        "{text}"
    );
    assert!(lines[1].starts_with("cuda: not available: "), "{text}");
}

#[test]
fn the_version_says_whether_the_cuda_device_is_built_in() {
    let out = tandem(&["--version"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let built = if cfg!(feature = "cuda") {
        "(with the CUDA device)"
    } else {
        "(CPU device only)"
    };
    assert!(text.trim_end().ends_with(built), "{text}");
}

#[test]
fn cuda_without_a_gpu_is_an_error_not_a_panic() {
    for args in [
        &["generate", "--device", "cuda", "-p", "hi", "-n", "1"][..],
        &["eval", "--device", "cuda", "--policy", "window"][..],
        &[
            "bench",
            "decode",
            "--device",
            "cuda",
            "--shape",
            "llama3.1-8b",
        ][..],
    ] {
        let out = tandem(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("tandem: error: --device cuda: "), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn auto_falls_back_to_the_cpu_with_a_one_line_reason() {
    let model = model();
    let out = tandem(&[
        "generate",
        "-m",
        &model,
        "--device",
        "auto",
        "-p",
        "Hi",
        "-n",
        "1",
        "-t",
        "1",
        "--cpu-workers",
        "1",
    ]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let reasons: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("tandem: using the CPU: "))
        .collect();
    assert_eq!(reasons.len(), 1, "{err}");
    assert!(err.contains(" on cpu ("), "{err}");
}
