#!/usr/bin/env python3
"""Convert a float (F32/F16/BF16) llama GGUF into a Hugging Face Llama directory.

Writes config.json, model.safetensors (written by hand: 8-byte little-endian
header length, JSON header, data), tokenizer.json (byte-level BPE from the GGUF's
tokens and merges, written by hand) and tokenizer_config.json.

llama.cpp's converter permutes the rows of q/k projections so RoPE pairs are
interleaved; this script undoes that permutation, so the directory is a faithful
Hugging Face checkpoint (half-split RoPE pairs).

Usage:
  python3 tests/reference/make_hf.py IN.gguf OUT_DIR [--dtype f32|bf16|f16]
        [--shards N] [--f32-norms]
  --shards  split the weights over N files model-0000i-of-0000N.safetensors
"""
import argparse
import json
import os

import numpy as np
import gguf

NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(name):
    if name in NAMES:
        return NAMES[name]
    _, layer, part, _ = name.split(".")
    return f"model.layers.{layer}.{LAYER[part]}.weight"


def unpermute(w, n_head):
    """Inverse of llama.cpp's permute: w.reshape(n_head, 2, hd/2, dim).swapaxes(1, 2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_bf16_bytes(x):
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    return r.tobytes()


def write_safetensors(path, tensors, dtype, f32_norms=False):
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name, x in tensors:
        if dtype == "f32" or (f32_norms and x.ndim == 1):
            b, st = np.ascontiguousarray(x, dtype="<f4").tobytes(), "F32"
        elif dtype == "f16":
            b, st = np.ascontiguousarray(x, dtype="<f2").tobytes(), "F16"
        else:
            b, st = to_bf16_bytes(x), "BF16"
        header[name] = {"dtype": st, "shape": list(x.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--f32-norms", action="store_true",
                    help="keep 1-D tensors (norms) in F32, as GGUF does, whatever --dtype")
    a = ap.parse_args()

    r = gguf.GGUFReader(a.gguf)
    f = r.fields

    def get(k, default=None):
        return f[k].contents() if k in f else default

    arch = get("general.architecture")
    assert arch == "llama", arch
    n_head = int(get("llama.attention.head_count"))
    n_kv = int(get("llama.attention.head_count_kv", n_head))
    tokens = get("tokenizer.ggml.tokens")
    merges = get("tokenizer.ggml.merges", [])

    tensors = []
    names = set()
    embd_shape = None
    rope_scaling = None
    for t in r.tensors:
        if t.name == "rope_freqs.weight":
            # make_gguf.py --rope-freqs: Llama 3.1's scaling, as config.json states it.
            rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
            continue
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                                 gguf.GGMLQuantizationType.BF16):
            raise SystemExit(f"{t.name}: only float GGUFs can be converted, found {t.tensor_type.name}")
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            x = (np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            x = np.asarray(t.data, dtype=np.float32)
        if t.name.endswith(".attn_q.weight"):
            x = unpermute(x, n_head)
        elif t.name.endswith(".attn_k.weight"):
            x = unpermute(x, n_kv)
        if t.name == "token_embd.weight":
            embd_shape = x.shape
        names.add(t.name)
        tensors.append((hf_name(t.name), x))
    tied = "output.weight" not in names

    os.makedirs(a.out, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(get("llama.embedding_length")),
        "intermediate_size": int(get("llama.feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "num_hidden_layers": int(get("llama.block_count")),
        "rms_norm_eps": float(get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "vocab_size": int(embd_shape[0]),
        "max_position_embeddings": int(get("llama.context_length", 2048)),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[a.dtype],
    }
    with open(os.path.join(a.out, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)

    n = max(1, a.shards)
    if n == 1:
        write_safetensors(os.path.join(a.out, "model.safetensors"), tensors, a.dtype, a.f32_norms)
    else:
        for i in range(n):
            part = tensors[i::n]
            write_safetensors(os.path.join(a.out, f"model-{i + 1:05d}-of-{n:05d}.safetensors"), part, a.dtype,
                              a.f32_norms)

    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": list(merges),
        },
    }
    with open(os.path.join(a.out, "tokenizer.json"), "w", encoding="utf-8") as fh:
        json.dump(tokenizer, fh, ensure_ascii=False)

    tok_config = {
        "add_bos_token": False,
        "bos_token": None,
        "eos_token": None,
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}",
    }
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as fh:
        json.dump(tok_config, fh, indent=2)


if __name__ == "__main__":
    main()
