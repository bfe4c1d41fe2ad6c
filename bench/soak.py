#!/usr/bin/env python3
"""Soak test of `tandem serve`: CLIENTS concurrent clients for DURATION
seconds on loopback, streaming (and some whole) requests of random length,
some hung up mid-stream on purpose.

Starts the server itself, then reports requests completed, expected
disconnects, unexpected errors (any failed or incomplete reply that was not
hung up on purpose), the server's counters and its resident memory at
start, middle and end. Exits 1 on any unexpected error.

    bench/soak.py [--duration 600] [--clients 8] [--hang-up 0.2] [--binary target/release/tandem]
"""
import argparse
import http.client
import json
import random
import re
import subprocess
import sys
import threading
import time

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a CPU cache is.",
    "List five fruits.",
    "Tell me a story about a robot.",
    "How do plants make food?",
]


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {"completed": 0, "hung_up": 0, "unexpected": 0}
        self.errors = []

    def add(self, key, n=1, error=None):
        with self.lock:
            self.counts[key] += n
            if error and len(self.errors) < 20:
                self.errors.append(error)


def request_body(rng):
    max_tokens = rng.randint(8, 160)
    if rng.random() < 0.5:
        path = "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]}
    else:
        path = "/v1/completions"
        body = {"prompt": rng.choice(QUESTIONS)}
    body.update(max_tokens=max_tokens, temperature=rng.choice([0, 0.7]), seed=rng.randint(0, 1 << 30))
    return path, body


def check_stream(resp, hang_up_after):
    """Reads a stream to its end ('completed') or hangs up ('hung_up'); raises if incomplete."""
    chunks, finish, done = 0, None, False
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.decode().rstrip("\n")
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            break
        obj = json.loads(data)
        if "error" in obj:
            raise RuntimeError(f"error chunk: {data}")
        chunks += 1
        for c in obj.get("choices", []):
            finish = c.get("finish_reason") or finish
        if hang_up_after is not None and chunks >= hang_up_after and finish is None:
            return "hung_up"
    if not done or finish not in ("stop", "length"):
        raise RuntimeError(f"incomplete stream: done={done} finish={finish} chunks={chunks}")
    return "completed"


def one_request(addr, rng, hang_up_rate, tally):
    path, body = request_body(rng)
    stream = rng.random() < 0.85
    body["stream"] = stream
    hang_up_after = rng.randint(1, 6) if stream and rng.random() < hang_up_rate else None
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            tally.add("unexpected", error=f"{resp.status}: {resp.read()[:300]!r}")
            return
        if stream:
            tally.add(check_stream(resp, hang_up_after))
            return
        reply = json.loads(resp.read())
        choice = reply["choices"][0]
        if choice["finish_reason"] not in ("stop", "length") or "usage" not in reply:
            raise RuntimeError(f"incomplete reply: {reply}")
        tally.add("completed")
    except Exception as e:  # noqa: BLE001 - every failure is counted and shown
        tally.add("unexpected", error=f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def client(addr, seed, deadline, hang_up_rate, tally):
    rng = random.Random(seed)
    while time.time() < deadline:
        one_request(addr, rng, hang_up_rate, tally)


def get_json(addr, path):
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def start_server(binary, log_path):
    log = open(log_path, "w")
    server = subprocess.Popen([binary, "serve", "--port", "0"], stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        log.write(line)
        m = re.search(r"listening on http://(\S+)", line)
        if m:
            threading.Thread(target=lambda: log.writelines(server.stderr), daemon=True).start()
            return server, m.group(1)
    raise SystemExit("the server did not start; see " + log_path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--hang-up", type=float, default=0.2, help="share of streams hung up on purpose")
    ap.add_argument("--binary", default="target/release/tandem")
    ap.add_argument("--log", default="/tmp/tandem-soak-server.log")
    args = ap.parse_args()

    server, addr = start_server(args.binary, args.log)
    try:
        tally = Tally()
        one_request(addr, random.Random(0), 0, tally)  # warm-up, not timed
        rss = {"start": rss_kb(server.pid)}
        deadline = time.time() + args.duration
        threads = [
            threading.Thread(target=client, args=(addr, i + 1, deadline, args.hang_up, tally))
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        minutes = []
        while any(t.is_alive() for t in threads):
            time.sleep(min(60, args.duration / 2))
            minutes.append(rss_kb(server.pid))
            if "middle" not in rss and time.time() >= deadline - args.duration / 2:
                rss["middle"] = minutes[-1]
        for t in threads:
            t.join()
        time.sleep(1)
        rss["end"] = rss_kb(server.pid)
        metrics = get_json(addr, "/metrics")
    finally:
        server.terminate()
        server.wait(timeout=60)
    report = {"duration_s": args.duration, "clients": args.clients, **tally.counts,
              "rss_kb": rss, "rss_kb_each_minute": minutes, "server_metrics": metrics, "errors": tally.errors}
    print(json.dumps(report, indent=2))
    idle = metrics["sequences_active"] == 0 and metrics["requests_waiting"] == 0
    ok = tally.counts["unexpected"] == 0 and metrics["requests_failed"] == 0 and idle
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
