//! Running the built `tandem` binary (or `$TANDEM_BIN`, to test another
//! build) on the set-up SmolLM2.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn bin() -> PathBuf {
    std::env::var_os("TANDEM_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_tandem")),
        PathBuf::from,
    )
}

/// The binary under test, on the default model.
pub fn tandem() -> Command {
    let mut command = Command::new(bin());
    command.env("TANDEM_MODEL", model());
    command
}

/// The default model, installed by `scripts/setup.sh`.
pub fn model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

/// A scratch file holding `text`.
pub fn scratch_file(name: &str, text: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-cli-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("scratch file");
    path
}

/// Runs `tandem args...` with `stdin` piped in, killed after `limit`.
pub fn run(args: &[&str], stdin: &str, limit: Duration) -> Output {
    let mut child = tandem()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tandem runs");
    let mut input = child.stdin.take().expect("stdin");
    let text = stdin.to_string();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(text.as_bytes());
    });
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "tandem {args:?} ran past {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = writer.join();
    child.wait_with_output().expect("output")
}

/// `tandem chat` on the default model, greedy, with replies of 3 tokens.
pub fn chat(extra: &[&str], stdin: &str) -> Output {
    chat_n(3, extra, stdin)
}

/// `tandem chat` on the default model, greedy, with replies of `n` tokens.
pub fn chat_n(n: usize, extra: &[&str], stdin: &str) -> Output {
    let n = n.to_string();
    let mut args = vec!["chat", "--threads", "2", "-n", &n];
    args.extend_from_slice(extra);
    run(&args, stdin, Duration::from_secs(120))
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The statistics lines chat prints after each reply.
pub fn reply_lines(out: &Output) -> Vec<String> {
    stderr(out)
        .lines()
        .filter(|l| l.contains(" tokens/s"))
        .filter_map(|l| Some(l[l.find('(')?..].to_string()))
        .collect()
}

/// A running chat whose stderr arrives line by line.
pub struct LiveChat {
    pub child: Child,
    lines: Receiver<String>,
    pub seen: String,
}

impl LiveChat {
    pub fn start(extra: &[&str]) -> LiveChat {
        let mut child = tandem()
            .args(["chat", "--threads", "2", "-n", "4"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tandem runs");
        let stderr = child.stderr.take().expect("stderr");
        let (send, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        LiveChat {
            child,
            lines,
            seen: String::new(),
        }
    }

    /// Waits up to `limit` for a stderr line containing `text`; returns
    /// whether it came.
    pub fn wait_for(&mut self, text: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if line.contains(text) {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    pub fn send(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write");
        stdin.flush().expect("flush");
    }

    pub fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// The exit status once it has left, waiting up to `limit`.
    pub fn exit_within(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for LiveChat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
