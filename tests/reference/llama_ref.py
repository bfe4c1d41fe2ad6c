#!/usr/bin/env python3
"""Independent NumPy reference of the forward pass over a GGUF file: Llama,
Gemma 3 and Qwen2.

Every tensor is dequantized with `gguf.quants.dequantize` (GGUFReader) and the
whole forward pass is computed in float64 (weights are float32 after
dequantization, then promoted). Full causal attention, no KV cache tricks.

GGUF conventions used here:
  * ggml dims are reversed relative to NumPy: a tensor with ggml dims
    [in, out] is a NumPy array of shape (out, in); y = x @ W.T.
  * llama.cpp's converter permutes the rows of attn_q / attn_k so that RoPE
    rotates ADJACENT pairs (x[2i], x[2i+1]) ("norm", LLAMA_ROPE_TYPE_NORM).
    That is the default here; `--rope neox` (halves: x[i], x[i+d/2]) exists
    only to show that it is the wrong one for llama GGUFs.
  * tied embeddings: output.weight absent -> LM head = token_embd.weight.
  * Llama 3.1 RoPE scaling: rope_freqs.weight divides each frequency.
  * gemma3 (as llama.cpp's src/models/gemma3.cpp and Hugging Face's
    Gemma3ForCausalLM): embeddings x sqrt(n_embd); head size from
    attention.key_length; per-head RMS norm of q and k before RoPE; NEOX RoPE,
    base rope.freq_base on every 6th layer (5, 11, ...) and 10000 on the
    others, which attend a sliding window of attention.sliding_window tokens
    (itself included); post-attention and post-FFN norms before each residual
    add; GELU (tanh) gated FFN. The GGUF's norm weights already hold HF's 1 + w.
  * qwen2: q/k/v biases, NEOX RoPE.

Usage:
  python3 tests/reference/llama_ref.py --model M.gguf --tokens 1,2,3 [--out out.json]
      -> JSON {"logits": [[vocab floats] per position], "top1": [...]}
  python3 tests/reference/llama_ref.py --model M.gguf --tokens 1,2,3 --greedy 5
      -> also appends "greedy": [5 greedily generated ids] (recomputes fully)
  python3 tests/reference/llama_ref.py --model M.gguf --tokens ... --last 100
      -> logits of the last 100 positions only (long prompts, large vocabularies)
  python3 tests/reference/llama_ref.py --model M.gguf --dequant blk.0.attn_q.weight [--out x.npy|x.json]
      -> the dequantized tensor (NumPy shape) as .npy, or JSON {"shape", "data"}
Timing goes to stderr.
"""
import argparse
import json
import os
import sys
import time

# BLAS threads fight with other jobs on a busy 2-core box (10x slower); one is plenty.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(r, key, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load_tensor(t):
    a = dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(list(t.shape)))  # ggml dims reversed
    return np.asarray(a, dtype=np.float32).reshape(shape)


class Model:
    def __init__(self, path):
        r = GGUFReader(path)
        arch = field(r, "general.architecture")
        if arch not in ("llama", "gemma3", "qwen2"):
            raise SystemExit(f"{path}: unsupported architecture {arch!r}")
        self.arch = arch
        p = arch + "."
        self.n_layer = int(field(r, p + "block_count"))
        self.n_embd = int(field(r, p + "embedding_length"))
        self.n_head = int(field(r, p + "attention.head_count"))
        self.n_kv = int(field(r, p + "attention.head_count_kv", self.n_head))
        self.eps = float(field(r, p + "attention.layer_norm_rms_epsilon", 1e-5))
        self.rope_base = float(field(r, p + "rope.freq_base", 10000.0))
        self.head_dim = int(field(r, p + "attention.key_length", self.n_embd // self.n_head))
        self.rope_dim = int(field(r, p + "rope.dimension_count", self.head_dim))
        self.window = field(r, p + "attention.sliding_window") if arch == "gemma3" else None
        self.default_rope = "norm" if arch == "llama" else "neox"
        self.t = {t.name: t for t in r.tensors}
        self._cache = {}

    def w(self, name):
        if name not in self._cache:
            self._cache[name] = load_tensor(self.t[name]).astype(np.float64)
        return self._cache[name]

    def rms(self, x, name):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.w(name)

    def is_local(self, layer):
        return self.window is not None and (layer + 1) % 6 != 0

    def rope(self, x, rope_type, base):
        # x: (T, H, D)
        T, _, _ = x.shape
        d = self.rope_dim
        inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
        if "rope_freqs.weight" in self.t:
            inv = inv / self.w("rope_freqs.weight")
        ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]  # (T, d/2)
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        out = x.copy()
        if rope_type == "norm":
            a, b = x[..., 0:d:2], x[..., 1:d:2]
            out[..., 0:d:2] = a * c - b * s
            out[..., 1:d:2] = a * s + b * c
        else:  # neox
            a, b = x[..., : d // 2], x[..., d // 2 : d]
            out[..., : d // 2] = a * c - b * s
            out[..., d // 2 : d] = a * s + b * c
        return out

    def proj(self, h, b, name):
        y = h @ self.w(b + name + ".weight").T
        if b + name + ".bias" in self.t:
            y = y + self.w(b + name + ".bias")
        return y

    def forward(self, tokens, rope_type=None, last=None):
        rope_type = rope_type or self.default_rope
        T, H, KV, hd = len(tokens), self.n_head, self.n_kv, self.head_dim
        gemma = self.arch == "gemma3"
        emb = load_tensor(self.t["token_embd.weight"])  # (vocab, D), float32
        x = emb[np.asarray(tokens)].astype(np.float64)
        if gemma:
            x = x * np.sqrt(self.n_embd)
        causal = np.triu(np.full((T, T), -np.inf), 1)
        pos = np.arange(T)
        for l in range(self.n_layer):
            b = f"blk.{l}."
            h = self.rms(x, b + "attn_norm.weight")
            q = self.proj(h, b, "attn_q").reshape(T, H, hd)
            k = self.proj(h, b, "attn_k").reshape(T, KV, hd)
            v = self.proj(h, b, "attn_v").reshape(T, KV, hd)
            base = self.rope_base
            mask = causal
            if gemma:
                q = self.rms(q, b + "attn_q_norm.weight")
                k = self.rms(k, b + "attn_k_norm.weight")
                if self.is_local(l):
                    base = 10000.0
                    too_old = (pos[:, None] - pos[None, :]) >= self.window
                    mask = np.where(too_old, -np.inf, causal)
            q, k = self.rope(q, rope_type, base), self.rope(k, rope_type, base)
            rep = H // KV  # q head i uses kv head i // rep
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", s, v).reshape(T, H * hd)
            o = o @ self.w(b + "attn_output.weight").T
            x = x + (self.rms(o, b + "post_attention_norm.weight") if gemma else o)
            h = self.rms(x, b + "ffn_norm.weight")
            g = h @ self.w(b + "ffn_gate.weight").T
            u = h @ self.w(b + "ffn_up.weight").T
            if gemma:
                a = 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g**3)))
            else:
                a = g / (1.0 + np.exp(-g))
            f = (a * u) @ self.w(b + "ffn_down.weight").T
            x = x + (self.rms(f, b + "post_ffw_norm.weight") if gemma else f)
        if last:
            x = x[-last:]
        x = self.rms(x, "output_norm.weight")
        head = load_tensor(self.t["output.weight"]) if "output.weight" in self.t else emb
        return x @ head.T.astype(np.float64)  # (T, vocab)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", help="comma-separated token ids")
    ap.add_argument("--rope", choices=["norm", "neox"], default=None,
                    help="default: norm for llama, neox for gemma3 and qwen2")
    ap.add_argument("--last", type=int, default=0, help="logits of the last N positions only")
    ap.add_argument("--greedy", type=int, default=0, help="also generate N tokens greedily")
    ap.add_argument("--dequant", metavar="NAME", help="dump one dequantized tensor")
    ap.add_argument("--out", help="output file (.json, or .npy for --dequant); default stdout JSON")
    a = ap.parse_args()

    t0 = time.time()
    m = Model(a.model)
    if a.dequant:
        if a.dequant not in m.t:
            raise SystemExit(f"{a.model}: no tensor {a.dequant!r}")
        arr = load_tensor(m.t[a.dequant])
        if a.out and a.out.endswith(".npy"):
            np.save(a.out, arr)
        else:
            s = json.dumps({"shape": list(arr.shape), "data": arr.ravel().tolist()})
            open(a.out, "w").write(s) if a.out else print(s)
        print(f"dequant {a.dequant} {arr.shape}: {time.time() - t0:.2f}s", file=sys.stderr)
        return
    if not a.tokens:
        ap.error("--tokens or --dequant is required")
    toks = [int(x) for x in a.tokens.split(",") if x.strip()]
    logits = m.forward(toks, a.rope, a.last or None)
    res = {"logits": logits.astype(np.float32).tolist(), "top1": logits.argmax(-1).tolist(),
           "math": "float64", "rope": a.rope or m.default_rope}
    t1 = time.time()
    print(f"forward {len(toks)} positions: {t1 - t0:.2f}s (incl. load/dequant)", file=sys.stderr)
    if a.greedy:
        seq = list(toks)
        for _ in range(a.greedy):
            seq.append(int(m.forward(seq, a.rope)[-1].argmax()))
        res["greedy"] = seq[len(toks):]
        print(f"greedy {a.greedy}: {time.time() - t1:.2f}s", file=sys.stderr)
    s = json.dumps(res)
    if a.out:
        with open(a.out, "w") as f:
            f.write(s)
    else:
        print(s)


if __name__ == "__main__":
    main()
