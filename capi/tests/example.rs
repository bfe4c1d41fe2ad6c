//! The C example compiles against the built library and runs: it reports
//! the device `auto` chose, prefills,
//! generates, saves, restores, continues identically, and cancels from a
//! second thread.

use std::path::{Path, PathBuf};
use std::process::Command;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding `libtandem.so` as this test's build made it: the
/// test's own `deps/` (the copy in the profile directory is refreshed only by
/// `cargo build`, so it may be older than the sources under test).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let deps = exe.parent().expect("target/PROFILE/deps/TEST");
    let lib = deps.join("libtandem.so");
    assert!(lib.exists(), "{} is missing", lib.display());
    deps.to_path_buf()
}

#[test]
fn the_c_example_runs() {
    let model = crate_dir().join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        model.exists(),
        "{} is missing: run scripts/setup.sh first",
        model.display()
    );
    let scratch = std::env::temp_dir().join(format!("tandem-capi-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let exe = scratch.join("chat");
    let lib = library_dir();
    let compiled = Command::new("cc")
        .arg(crate_dir().join("examples/chat.c"))
        .arg("-std=c11")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-ltandem", "-lpthread", "-o"])
        .arg(&exe)
        .status()
        .expect("run cc");
    assert!(compiled.success(), "the example compiles");

    // cargo's LD_LIBRARY_PATH names the profile directory too, ahead of the rpath.
    let output = Command::new(&exe)
        .env("LD_LIBRARY_PATH", &lib)
        .arg(&model)
        .arg(scratch.join("chat.tandem"))
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for expected in [
        "missing model: status 4: /no/such/model.gguf",
        "reply: The capital of France is Paris",
        "same follow-up: yes",
        "cancelled: status 7",
        "engine free with live sessions: status 8",
        "done",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in:\n{stdout}");
    }
    assert!(
        stdout.contains("device: cpu") || stdout.contains("device: cuda"),
        "the chosen device is reported:\n{stdout}"
    );
    assert!(
        stdout.contains("prefill "),
        "progress is reported:\n{stdout}"
    );
}
