#!/usr/bin/env python3
"""Write a tiny random llama-architecture GGUF for loader tests.

2 layers, hidden 64, 4 heads, 2 kv heads (head_dim 16), ffn 128, vocab 256,
with a trivial GPT-2 byte-level tokenizer (256 byte tokens, no merges).
Matrices (attn_q/k/v/output, ffn_gate/up/down, token_embd, output) are in
--type; norms are always F32. Values are random (seeded), scaled 0.02.

Usage:
  python3 tests/reference/make_gguf.py OUT.gguf [--type F32|F16|BF16|Q8_0|Q4_0|Q4_1|Q5_0|Q5_1]
        [--seed N] [--tied] [--truncate] [--arch NAME] [--wrong-shape]
  --tied      omit output.weight (LM head = token_embd.weight)
  --truncate  cut the finished file to 60% of its size (a "truncated file" case)
  --arch      write general.architecture NAME instead of llama: qwen2 adds q/k/v
              biases; gemma3 has 6 layers (5 local with a sliding window of 4
              tokens, then a global one), heads of 32 (attention.key_length),
              per-head q/k norms and post-norms; any other name is the
              unsupported-architecture case
  --rope-freqs  add rope_freqs.weight: Llama 3.1's scaling (factor 8, low 1,
              high 4; an original context of 64 so that it
              matters within a few tokens) as llama.cpp's converter writes it
Reference logits for the result: tests/reference/llama_ref.py --model OUT.gguf --tokens ...
"""
import argparse
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

N_LAYER, D, N_HEAD, N_KV, FFN, VOCAB = 2, 64, 4, 2, 128, 256
HEAD_DIM = D // N_HEAD


def byte_tokens():
    """GPT-2 bytes_to_unicode: the token text of each of the 256 bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    m = dict(zip(bs, cs))
    return [chr(m[b]) for b in range(256)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--type", default="F32", choices=["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--truncate", action="store_true")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--rope-freqs", action="store_true")
    ap.add_argument("--wrong-shape", action="store_true",
                    help="declare feed_forward_length 96 while the ffn tensors have 128 (a wrong-shape case)")
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    qt = Q[a.type]

    gemma = a.arch == "gemma3"
    n_layer = 6 if gemma else N_LAYER
    head_dim = 32 if gemma else HEAD_DIM
    w = gguf.GGUFWriter(a.out, a.arch)
    p = a.arch + "."
    w.add_uint32(p + "block_count", n_layer)
    w.add_uint32(p + "context_length", 512)
    w.add_uint32(p + "embedding_length", D)
    w.add_uint32(p + "feed_forward_length", 96 if a.wrong_shape else FFN)
    w.add_uint32(p + "attention.head_count", N_HEAD)
    w.add_uint32(p + "attention.head_count_kv", N_KV)
    w.add_float32(p + "rope.freq_base", 10000.0)
    w.add_float32(p + "attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(p + "rope.dimension_count", head_dim)
    if gemma:
        w.add_uint32(p + "attention.key_length", head_dim)
        w.add_uint32(p + "attention.value_length", head_dim)
        w.add_uint32(p + "attention.sliding_window", 4)
    w.add_uint32(p + "vocab_size", VOCAB)
    w.add_uint32("general.file_type", {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}[a.type])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(byte_tokens())
    w.add_token_types([1] * VOCAB)
    w.add_array("tokenizer.ggml.merges", [])

    def mat(name, out_f, in_f):  # NumPy shape (out, in) == ggml dims [in, out]
        x = (rng.standard_normal((out_f, in_f)) * 0.02).astype(np.float32)
        if qt == Q.F32:
            w.add_tensor(name, x)
        elif qt == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, quantize(x, qt), raw_dtype=qt)  # byte shape -> element shape

    def norm(name, n=D):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    def bias(name, n):
        w.add_tensor(name, (0.1 * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", VOCAB, D)
    if a.rope_freqs:
        factor, low, high, orig = 8.0, 1.0, 4.0, 64.0
        freqs = 10000.0 ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        wavelen = 2 * np.pi / freqs
        smooth = (orig / wavelen - low) / (high - low)
        f = np.where(wavelen < orig / high, 1.0,
                     np.where(wavelen > orig / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        w.add_tensor("rope_freqs.weight", f.astype(np.float32))
    for l in range(n_layer):
        b = f"blk.{l}."
        norm(b + "attn_norm.weight")
        mat(b + "attn_q.weight", N_HEAD * head_dim, D)
        mat(b + "attn_k.weight", N_KV * head_dim, D)
        mat(b + "attn_v.weight", N_KV * head_dim, D)
        if a.arch == "qwen2":
            bias(b + "attn_q.bias", N_HEAD * head_dim)
            bias(b + "attn_k.bias", N_KV * head_dim)
            bias(b + "attn_v.bias", N_KV * head_dim)
        if gemma:
            norm(b + "attn_q_norm.weight", head_dim)
            norm(b + "attn_k_norm.weight", head_dim)
            norm(b + "post_attention_norm.weight")
            norm(b + "post_ffw_norm.weight")
        mat(b + "attn_output.weight", D, N_HEAD * head_dim)
        norm(b + "ffn_norm.weight")
        mat(b + "ffn_gate.weight", FFN, D)
        mat(b + "ffn_up.weight", FFN, D)
        mat(b + "ffn_down.weight", D, FFN)
    norm("output_norm.weight")
    if not a.tied:
        mat("output.weight", VOCAB, D)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if a.truncate:
        size = os.path.getsize(a.out)
        os.truncate(a.out, size * 6 // 10)


if __name__ == "__main__":
    main()
