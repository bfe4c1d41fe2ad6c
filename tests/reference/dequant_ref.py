#!/usr/bin/env python3
"""Dequantize a file of raw ggml blocks with the `gguf` package (the reference).

Usage: python3 tests/reference/dequant_ref.py TYPE FILE
  TYPE: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K (any
        GGMLQuantizationType name)
  FILE: concatenated raw blocks exactly as stored in a GGUF tensor
Prints a JSON array of the dequantized values as float32 (row-major, block order).
"""
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    qtype = GGMLQuantizationType[sys.argv[1].upper()]
    raw = np.fromfile(sys.argv[2], dtype=np.uint8)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if raw.size % type_size:
        raise SystemExit(f"{sys.argv[2]}: {raw.size} bytes is not a whole number of {qtype.name} blocks ({type_size} B)")
    vals = dequantize(raw.reshape(1, -1), qtype).astype(np.float32).ravel()
    assert vals.size == raw.size // type_size * block_size
    print(json.dumps(vals.tolist()))


if __name__ == "__main__":
    main()
