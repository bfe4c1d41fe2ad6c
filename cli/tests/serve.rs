//! `tandem serve` on a free loopback port with the default model, through
//! curl, the `openai` Python package and raw sockets.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// A running server, killed when dropped.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args([
                "serve",
                "--port",
                "0",
                "--threads",
                "1",
                "--cpu-workers",
                "1",
            ])
            .args(extra)
            .env_remove("TANDEM_API_KEY")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start tandem serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("tandem serve: listening on http://") {
                    let _ = tx.send(addr.to_string());
                }
                lines.lock().expect("log").push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server prints its address");
        Server { child, addr, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `curl` with `args`; returns (status, body).
    fn curl(&self, path: &str, args: &[&str]) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-sS", "-N", "--max-time", "60", "-w", "\n%{http_code}"])
            .args(args)
            .arg(self.url(path))
            .output()
            .expect("run curl");
        let text = String::from_utf8(out.stdout).expect("utf-8");
        let (body, status) = text.rsplit_once('\n').expect("status line");
        (status.parse().expect("status"), body.to_string())
    }

    fn post(&self, path: &str, body: &Value, headers: &[&str]) -> (u16, String) {
        let mut args = vec!["-H", "content-type: application/json"];
        for h in headers {
            args.extend(["-H", h]);
        }
        let body = body.to_string();
        args.extend(["-d", &body]);
        self.curl(path, &args)
    }

    fn metrics(&self) -> Value {
        let (status, body) = self.curl("/metrics", &[]);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("metrics JSON")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chat(question: &str, max_tokens: usize) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": question}],
           "max_tokens": max_tokens, "temperature": 0})
}

fn reply_text(body: &str) -> String {
    let v: Value = serde_json::from_str(body).expect("JSON reply");
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(body: &str) -> Vec<&str> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect()
}

#[test]
fn curl_gets_whole_and_streamed_replies() {
    let server = Server::start(&[], &[]);
    assert_eq!(
        server.curl("/health", &[]),
        (200, r#"{"status":"ok"}"#.into())
    );
    let (status, models) = server.curl("/v1/models", &[]);
    assert_eq!(status, 200);
    assert!(models.contains(MODEL), "{models}");

    let (status, body) = server.post(
        "/v1/chat/completions",
        &chat("What is the capital of France?", 24),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    assert!(reply_text(&body).contains("Paris"), "{body}");

    let ask = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6,
                     "temperature": 0, "stream": true});
    let (status, body) = server.post("/v1/completions", &ask, &[]);
    assert_eq!(status, 200, "{body}");
    let data = sse_data(&body);
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .collect();
    let finish = &chunks.last().expect("chunks")["choices"][0]["finish_reason"];
    assert_eq!(finish, "length", "{body}");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert!(!text.trim().is_empty(), "{body}");
}

#[test]
fn the_openai_package_gets_whole_and_streamed_replies() {
    let server = Server::start(&[], &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_client.py");
    let out = Command::new("python3")
        .arg(script)
        .args([&server.url(""), MODEL])
        .output()
        .expect("run python3 (scripts/setup.sh installs the openai package)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn four_concurrent_requests_are_batched_and_answer_as_alone() {
    let server = Arc::new(Server::start(&[], &[]));
    let questions = [
        "What is 2 + 2?",
        "Name a colour.",
        "What is the capital of Italy?",
        "Say hello.",
    ];
    let alone: Vec<String> = questions
        .iter()
        .map(|q| reply_text(&server.post("/v1/chat/completions", &chat(q, 12), &[]).1))
        .collect();
    let together: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = questions
            .iter()
            .map(|q| {
                let server = &server;
                scope.spawn(move || server.post("/v1/chat/completions", &chat(q, 12), &[]))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let (status, body) = h.join().expect("client");
                assert_eq!(status, 200, "{body}");
                reply_text(&body)
            })
            .collect()
    });
    assert_eq!(together, alone);
    let peak = server.metrics()["sequences_peak"].as_u64().expect("peak");
    assert!(
        peak >= 2,
        "requests in flight together share a batch (peak {peak})"
    );
}

/// Sends a streamed request, reads its first chunks and hangs up.
fn hang_up_mid_stream(addr: &str) {
    let body = json!({"prompt": "Once upon a time", "max_tokens": 500, "stream": true}).to_string();
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut seen = String::new();
    let mut buf = [0u8; 1024];
    while seen.matches("data: ").count() < 3 {
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "the stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
}

#[test]
fn a_client_gone_mid_stream_is_cancelled_and_the_server_serves_on() {
    let server = Server::start(&[], &[]);
    hang_up_mid_stream(&server.addr);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metrics()["requests_cancelled"] != 1 {
        assert!(
            Instant::now() < deadline,
            "no cancellation: {}",
            server.metrics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = server.metrics();
    assert!(
        m["completion_tokens"].as_u64().expect("tokens") < 500,
        "{m}"
    );
    let (status, body) = server.post(
        "/v1/chat/completions",
        &chat("What is the capital of France?", 24),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    assert!(reply_text(&body).contains("Paris"), "{body}");
    let log = server.log.lock().expect("log").join("\n");
    assert!(
        log.contains("cmpl-1 cancelled: the client went away"),
        "{log}"
    );
}

#[test]
fn bad_requests_get_openai_errors_with_their_status() {
    let server = Server::start(&["--max-context", "64"], &[("TANDEM_API_KEY", "sesame")]);
    let key = "Authorization: Bearer sesame";
    let ask = chat("Hi", 4);
    let error_code = |body: &str| -> String {
        let v: Value = serde_json::from_str(body).expect("error JSON");
        v["error"]["code"].as_str().expect("code").to_string()
    };

    let (status, body) = server.post("/v1/chat/completions", &ask, &[]);
    assert_eq!(
        (status, error_code(&body).as_str()),
        (401, "invalid_api_key")
    );
    let (status, _) = server.post(
        "/v1/chat/completions",
        &ask,
        &["Authorization: Bearer wrong"],
    );
    assert_eq!(status, 401);
    assert_eq!(server.curl("/health", &[]).0, 200, "health asks for no key");

    let (status, body) = server.post("/v1/chat/completions", &ask, &[key]);
    assert_eq!(status, 200, "{body}");

    let long = chat(&"tell me more ".repeat(40), 4);
    let (status, body) = server.post("/v1/chat/completions", &long, &[key]);
    assert_eq!(
        (status, error_code(&body).as_str()),
        (400, "context_length_exceeded"),
        "{body}"
    );
    assert!(body.contains("64"), "the error names the limit: {body}");

    let unknown = json!({"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]});
    assert_eq!(server.post("/v1/chat/completions", &unknown, &[key]).0, 404);
    let too_many = json!({"prompt": "Hi", "max_tokens": 100000});
    assert_eq!(server.post("/v1/completions", &too_many, &[key]).0, 400);
    let (status, body) = server.curl("/v1/completions", &["-H", key, "-d", "{not json"]);
    assert_eq!(
        (status, error_code(&body).as_str()),
        (400, "invalid_request"),
        "{body}"
    );
    assert_eq!(server.curl("/v1/nothing", &["-H", key]).0, 404);
}

#[test]
fn max_tokens_beyond_the_context_is_refused_and_the_default_fits_in_it() {
    let server = Server::start(&["--max-context", "64"], &[]);
    let counting = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";
    let default = json!({"prompt": counting, "temperature": 0});
    let (status, body) = server.post("/v1/completions", &default, &[]);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("reply JSON");
    let prompt = v["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
    assert_eq!(v["usage"]["completion_tokens"], 64 - prompt, "{body}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{body}");

    let ask = json!({"prompt": counting, "max_tokens": 60, "temperature": 0});
    let (status, body) = server.post("/v1/completions", &ask, &[]);
    let v: Value = serde_json::from_str(&body).expect("error JSON");
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("context_length_exceeded")),
        "{body}"
    );
    let message = v["error"]["message"].as_str().expect("message");
    let numbers = [64, 60, prompt, prompt + 60, 64 - prompt];
    for n in numbers.map(|n| n.to_string()) {
        assert!(message.contains(&n), "{n} missing: {message}");
    }

    let fits = json!({"prompt": counting, "max_tokens": 64 - prompt, "temperature": 0});
    assert_eq!(server.post("/v1/completions", &fits, &[]).0, 200);
}

/// Reads from `stream` until the server closes it; returns what came and
/// how long it took (the read fails the test after 20 s).
fn read_until_closed(mut stream: TcpStream) -> (String, Duration) {
    let start = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server kept the connection open: {e}"),
        }
    }
    (String::from_utf8_lossy(&seen).into_owned(), start.elapsed())
}

#[test]
fn slow_headers_and_unfinished_bodies_are_cut_off_and_connections_capped() {
    let server = Server::start(
        &[
            "--header-timeout",
            "1",
            "--body-timeout",
            "1",
            "--max-connections",
            "1",
        ],
        &[],
    );
    let mut slow = TcpStream::connect(&server.addr).expect("connect");
    write!(slow, "POST /v1/completions HTTP/1.1\r\nHost: x\r\n").expect("send");
    let start = Instant::now();
    // The one connection allowed is taken: this request waits for it.
    assert_eq!(server.curl("/health", &[]).0, 200);
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "served beside the slow connection after {:?}",
        start.elapsed()
    );
    let (_, held) = read_until_closed(slow);
    assert!(held < Duration::from_secs(5), "closed after {held:?}");

    let mut unfinished = TcpStream::connect(&server.addr).expect("connect");
    write!(
        unfinished,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"prompt\": \"Hi\""
    )
    .expect("send");
    let (reply, held) = read_until_closed(unfinished);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("request_timeout"), "{reply}");
    assert!(held < Duration::from_secs(5), "closed after {held:?}");
    assert_eq!(server.curl("/health", &[]).0, 200);
}

/// The first `bytes` bytes (at most) of a real document, cut at a line.
fn document(bytes: usize) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/gpl-2.0.txt");
    let text = std::fs::read_to_string(path).expect("tests/data/gpl-2.0.txt");
    let cut = text[..bytes.min(text.len())].rfind('\n').unwrap_or(0);
    text[..cut].to_string()
}

/// Starts a streamed completion and, on a thread, notes when each read of
/// its events arrives and whether it held the end; returns the socket (to
/// hang up) and the notes.
fn stream_with_arrivals(addr: &str, body: &Value) -> (TcpStream, mpsc::Receiver<(Instant, bool)>) {
    let body = body.to_string();
    let mut stream = TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut reader = stream.try_clone().expect("clone");
    reader
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            if text.contains("data: ") {
                let _ = tx.send((Instant::now(), text.contains("[DONE]")));
            }
        }
    });
    (stream, rx)
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_while_other_streams_go_on() {
    let server = Server::start(&[], &[]);
    let counting = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";
    let short = json!({"prompt": counting, "max_tokens": 400, "temperature": 0, "stream": true});
    let (socket, arrivals) = stream_with_arrivals(&server.addr, &short);
    for _ in 0..3 {
        arrivals
            .recv_timeout(Duration::from_secs(30))
            .expect("the short stream starts");
    }
    let long = json!({"prompt": document(5000), "max_tokens": 1, "temperature": 0});
    let start = Instant::now();
    let (status, body) = server.post("/v1/completions", &long, &[]);
    let end = Instant::now();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("reply JSON");
    let prompt = v["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
    assert!(prompt > 4 * 256, "{prompt} tokens is not a long prompt");
    socket.shutdown(std::net::Shutdown::Both).expect("hang up");

    let during: Vec<(Instant, bool)> = arrivals
        .try_iter()
        .filter(|&(t, _)| t >= start && t <= end)
        .collect();
    assert!(
        !during.iter().any(|&(_, done)| done),
        "the short stream ended during the long prefill; it cannot show the gaps"
    );
    let mut times: Vec<Instant> = during.iter().map(|&(t, _)| t).collect();
    times.insert(0, start);
    let longest = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let prefill = end - start;
    assert!(
        times.len() > 3 && longest < prefill / 2,
        "{} arrivals during the {prefill:?} prefill of {prompt} tokens, the longest gap {longest:?}",
        times.len() - 1
    );
}
