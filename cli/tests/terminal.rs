//! `tandem chat` at a real terminal (a pseudo-terminal made by util-linux's
//! `script`): the line editor's keys, bracketed paste, and Ctrl-C as a key
//! or, between a reply and the prompt, as a signal.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

#[test]
fn at_a_terminal_keys_edit_a_paste_is_one_message_and_two_ctrl_c_leave() {
    // `exec`: a shell that stayed between `script` and the chat (dash does)
    // would share its process group and die of the Ctrl-C signal itself.
    let line = format!("exec '{}' chat -n 4 --threads 2", common::bin().display());
    let mut child = Command::new("script")
        .args(["-qfec", &line, "/dev/null"])
        .env("TANDEM_MODEL", common::model())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("script (util-linux) runs");
    let mut stdout = child.stdout.take().expect("stdout");
    let (send, screen) = channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || send.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let mut wait_for = |text: &str, count: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.matches(text).count() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match screen.recv_timeout(left) {
                Ok(bytes) => seen.push_str(&String::from_utf8_lossy(&bytes)),
                Err(_) => panic!("no {text:?} on the terminal:\n{seen}"),
            }
        }
        seen.clone()
    };
    let mut keys = child.stdin.take().expect("stdin");
    let mut press = |bytes: &[u8]| {
        keys.write_all(bytes).expect("keys");
        keys.flush().expect("flush");
    };
    wait_for("> ", 1);
    // A paste of two lines with an arrow key before it: one message.
    press(b"\x1b[A\x1b[200~Name a colour.\nOne word.\x1b[201~\r");
    wait_for("tokens/s", 1);
    // Pressed as the reply's statistics print, before the line editor holds
    // the terminal: a signal, not a key, and still the first press.
    press(b"\x03");
    let screen_now = wait_for("Ctrl-C again", 1);
    assert_eq!(screen_now.matches("tokens/s").count(), 1, "{screen_now}");
    assert!(!screen_now.contains("^[[A"), "{screen_now}");
    press(b"\x03");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            seen.extend(
                screen
                    .try_iter()
                    .map(|b| String::from_utf8_lossy(&b).into_owned()),
            );
            panic!("still running after two Ctrl-C:\n{seen}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}
