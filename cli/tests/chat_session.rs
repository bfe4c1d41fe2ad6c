//! `tandem chat --session FILE`: a second run resumes the first one's
//! conversation, and a damaged file is refused with a clear error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh first",
        p.display()
    );
    p
}

/// Runs `tandem chat --session FILE` with `input` on stdin.
fn chat(session: &Path, input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("chat")
        .arg("--model")
        .arg(model())
        .args([
            "--threads",
            "2",
            "--cpu-workers",
            "2",
            "-n",
            "12",
            "--session",
        ])
        .arg(session)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tandem");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("run tandem")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_chat_resumes_from_its_session_file() {
    let dir = std::env::temp_dir().join(format!("tandem-chat-session-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let file = dir.join("chat.tandem");

    let first = chat(&file, "What is the capital of France?\n");
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(!stderr(&first).contains("restored"), "{}", stderr(&first));

    let second = chat(&file, "And of Italy?\n");
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("restored 1 turn (")
            && stderr(&second).contains(" tokens, 0 of them prefilled)"),
        "the saved keys and values are resumed: {}",
        stderr(&second)
    );
    let reply = String::from_utf8_lossy(&second.stdout);
    assert!(
        reply.contains("Rome"),
        "the follow-up is answered in the restored context: {reply}"
    );

    let third = chat(&file, "");
    assert!(
        stderr(&third).contains("restored 2 turns"),
        "{}",
        stderr(&third)
    );

    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&file, &bytes[..bytes.len() - 7]).expect("write");
    let damaged = chat(&file, "Hello\n");
    assert!(!damaged.status.success());
    assert!(
        stderr(&damaged).contains("truncated or damaged"),
        "{}",
        stderr(&damaged)
    );
}
