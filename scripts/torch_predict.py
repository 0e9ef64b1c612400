#!/usr/bin/env python3
"""Predict with a torch-layout Maeum text classifier, in numpy: a reference outside Rust.

Reads the file that `maeum-coordinator models export VERSION --out DIR --layout torch`
writes (DIR/model-vN.torch.safetensors) with the `safetensors` package and runs the
forward pass documented in docs/models.md:

    featurise (hashed word and character n-grams, FNV-1a 64, sublinear TF, unit L2)
    -> embedding bag   bag = sum_i w_i * embedding.weight[id_i]      (buckets, dim)
    -> hidden layer    h = relu(hidden.weight @ bag + hidden.bias)    (hidden, dim)
    -> output layer    logits = output.weight @ h + output.bias       (labels, hidden)
    -> softmax

The featuriser is reimplemented here from models/src/features.rs, independently of the
Rust code, so the end-to-end test (tests/tests/releases.rs) checks both the export and
the documentation. One known difference: Rust's `char::is_alphanumeric` counts some
combining vowel signs of Indic scripts (Unicode Other_Alphabetic) as letters, which
Python's `str.isalpha` does not; Latin, Hangul, Han, Kana and Cyrillic text hash the
same in both.

Usage:
    python3 scripts/torch_predict.py MODEL.torch.safetensors --text "..." [--text "..."]
Prints one JSON object per text: {"label": ..., "probabilities": {label: p, ...}}.
Needs: python3 -m pip install --user safetensors numpy
Exit codes: 0 ok, 2 not a torch-layout Maeum text classifier.
"""

import argparse
import json
import math
import sys
import unicodedata

import numpy as np
from safetensors import safe_open

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1


def fnv1a(state, data):
    for b in data:
        state = ((state ^ b) * FNV_PRIME) & MASK64
    return state


def is_alphanumeric(c):
    # Rust: Alphabetic or General_Category in {Nd, Nl, No}.
    cat = unicodedata.category(c)
    return cat[0] == "L" or cat in ("Nd", "Nl", "No")


def featurize(text, cfg):
    """Sorted bucket ids and their weights (1 + ln tf, unit L2 norm)."""
    mask = cfg["buckets"] - 1
    text = "".join(c.lower() for c in text[: cfg["max_chars"]])
    words, cur = [], []
    for c in text:
        if is_alphanumeric(c):
            cur.append(c)
        elif cur:
            words.append("".join(cur))
            cur = []
    if cur:
        words.append("".join(cur))

    hashes = []
    wlo, whi = cfg["word_ngrams"]
    if whi > 0:
        for n in range(wlo, whi + 1):
            for start in range(len(words) - n + 1):
                h = fnv1a(FNV_OFFSET, b"w")
                for i, w in enumerate(words[start : start + n]):
                    if i > 0:
                        h = fnv1a(h, b" ")
                    h = fnv1a(h, w.encode("utf-8"))
                hashes.append(h & mask)
    clo, chi = cfg["char_ngrams"]
    if chi > 0:
        tag = fnv1a(FNV_OFFSET, b"c")
        for w in words:
            chars = ["<", *w, ">"]
            for n in range(clo, chi + 1):
                if n > len(chars):
                    break
                for start in range(len(chars) - n + 1):
                    h = tag
                    for c in chars[start : start + n]:
                        h = fnv1a(h, c.encode("utf-8"))
                    hashes.append(h & mask)

    counts = {}
    for h in hashes:
        counts[h] = counts.get(h, 0) + 1
    ids = sorted(counts)
    weights = np.array([1.0 + math.log(counts[i]) for i in ids], dtype=np.float64)
    norm = math.sqrt(float((weights**2).sum()))
    if norm > 0:
        weights /= norm
    return np.array(ids, dtype=np.int64), weights


def load(path):
    with safe_open(path, framework="np") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}
    if meta.get("maeum.layout") != "torch":
        sys.exit(f"{path}: not a torch-layout export (maeum.layout is {meta.get('maeum.layout')!r}); "
                 "write one with `maeum-coordinator models export VERSION --out DIR --layout torch`")
    spec = json.loads(meta["maeum.model"])
    if spec.get("kind") != "text-classifier":
        sys.exit(f"{path}: a {spec.get('kind')} model; this script runs text classifiers")
    return spec, tensors


def predict(spec, t, text):
    ids, weights = featurize(text, spec["config"]["features"])
    bag = weights @ t["embedding.weight"][ids] if len(ids) else np.zeros(t["embedding.weight"].shape[1])
    h = np.maximum(t["hidden.weight"] @ bag + t["hidden.bias"], 0.0)
    logits = t["output.weight"] @ h + t["output.bias"]
    e = np.exp(logits - logits.max())
    return e / e.sum()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model-vN.torch.safetensors")
    ap.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    args = ap.parse_args()
    try:
        spec, tensors = load(args.model)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    labels = spec["labels"]["labels"]
    for text in args.text:
        p = predict(spec, tensors, text)
        best = int(np.argmax(p))
        print(json.dumps({"label": labels[best], "probabilities": dict(zip(labels, map(float, p)))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
