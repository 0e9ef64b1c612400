#!/usr/bin/env python3
"""Reference embeddings for the all-MiniLM-L6-v2 encoder, in plain numpy.

An implementation of the frozen sentence encoder that is independent of the Rust one
(and of torch, transformers and the HF `tokenizers` package), written from the model's
configuration:

    BERT uncased tokenisation as configured in tokenizer.json
        BertNormalizer   drop \\0, U+FFFD and control characters, whitespace -> ' ',
                         spaces around CJK ideographs, NFD and drop Mn (strip accents),
                         lowercase (per character)
        BertPreTokenizer split on whitespace; each punctuation character is a word
        WordPiece        greedy longest match first, '##' continuation, [UNK] for a word
                         with no split or of more than 100 characters
        [CLS] ids [SEP], at most 128 tokens in all (the first 126 word pieces), no padding
    BERT forward pass (float64)
        word + position + token type 0 embeddings, LayerNorm (eps 1e-12)
        6 x (12-head self-attention, head dim 32, softmax(QK^T / sqrt(32)) V,
             dense + residual + LayerNorm, dense 1536 + exact erf GELU,
             dense + residual + LayerNorm)
    mean pooling over all tokens (the attention mask is all ones), L2 normalisation

and writes the committed table models/tests/data/minilm_reference.json: for each of a
fixed list of sentences (below; written for this table, no real patient text), its token
ids (with [CLS] and [SEP]) and its 384-float embedding rounded to 8 decimals. The Rust
encoder's tests compare against that table; CI does not run this script.

Usage (after scripts/fetch_encoder.py has put the model in data/encoders/):
    python3 scripts/encoder_reference.py [--model-dir data/encoders/all-minilm-l6-v2]
        [--out models/tests/data/minilm_reference.json] [--check-hf-tokenizer]
--check-hf-tokenizer also encodes each sentence with the shipped tokenizer.json through
the HF `tokenizers` package (if importable; truncation 128, no padding) and fails if its
ids differ from this script's.
Needs: python3 -m pip install --user safetensors numpy   (tokenizers only for the check)
Takes under a second per sentence on one core.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time
import unicodedata

import numpy as np
from safetensors.numpy import load_file

MAX_TOKENS = 128
MAX_WORD_CHARS = 100
DIM = 384
LAYERS = 6
HEADS = 12
EPS = 1e-12

LONG_EN = (
    "For the past few months I have been waking up every morning with a heavy feeling in "
    "my chest, as if the whole day were already too much before it has even started. I "
    "still go to work, answer my messages and cook dinner, so from the outside everything "
    "probably looks normal, but inside I feel tired and numb most of the time. My sister "
    "says I should talk to someone, and I keep postponing it because I do not know how to "
    "explain what is wrong when nothing dramatic has happened. I used to enjoy running on "
    "weekends and meeting friends for coffee, and now I cancel plans at the last minute "
    "and then feel guilty about it for days. Sometimes I lie awake until three or four in "
    "the morning going over small mistakes I made at work, and then I am exhausted the "
    "next day, which makes the mistakes more likely. I would like to understand whether "
    "this is just stress that will pass on its own or something I should take more "
    "seriously, and what small steps I could try this week."
)

LONG_KO = (
    "요즘 들어 아침에 눈을 뜨면 가슴이 답답하고 하루를 시작하기도 전에 벌써 지친 느낌이 들어요. "
    "회사에는 꼬박꼬박 나가고 친구들 연락에도 답장을 하지만, 속으로는 아무 감정도 느껴지지 않을 "
    "때가 많아요. 예전에는 주말마다 공원에서 달리기를 하고 친구들과 커피를 마시는 게 즐거웠는데, "
    "지금은 약속을 자꾸 취소하고 그 뒤로 며칠씩 미안한 마음이 들어요. 밤에는 회사에서 했던 작은 "
    "실수들이 계속 떠올라서 새벽까지 잠들지 못하고, 그러면 다음 날 더 피곤해서 또 실수를 하게 "
    "돼요. 이게 그냥 지나가는 스트레스인지, 아니면 상담을 받아 봐야 하는 건지 잘 모르겠어요."
)

# Twelve sentences: short, counselling style, a paraphrase pair (1, 2) and an unrelated
# sentence (3), Korean, odd characters, two longer than the 128-token window, and one
# with no words at all.
SENTENCES = [
    "I feel fine.",
    "I have been feeling anxious and I cannot sleep at night.",
    "Lately I worry so much that I can't fall asleep.",
    "The recipe needs two cups of flour and a pinch of salt.",
    "My therapist suggested that I write in a journal every evening.",
    "오늘은 기분이 괜찮아요.",
    "요즘 너무 불안해서 밤에 잠을 잘 수가 없어요.",
    "상담 선생님이 매일 저녁 일기를 써 보라고 하셨어요.",
    "  Café\u00a0NAÏVE\t\tréSUMÉ —\n“quotes”… 😊 心理相談, $5+tax <3 it's\x07 ok\u200b!!  "
    + "ha" * 51,
    LONG_EN,
    LONG_KO,
    "   ",
]

# Rust's char::is_whitespace (the Unicode White_Space property), which the HF BERT
# normaliser and pre-tokeniser use.
WHITESPACE = set(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)

CJK_RANGES = [
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
]


def is_whitespace(c):
    return c in WHITESPACE


def is_control(c):
    # Tab, newline and carriage return count as whitespace, not control.
    return c not in "\t\n\r" and unicodedata.category(c)[0] == "C"


def is_cjk(c):
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def is_punctuation(c):
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(c)[0] == "P"


def normalize(text):
    out = []
    for c in text:
        if c in "\0\ufffd" or is_control(c):
            continue
        out.append(" " if is_whitespace(c) else c)
    text = "".join(f" {c} " if is_cjk(c) else c for c in out)
    text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    # Per character, as the Rust normaliser does (no final-sigma rule).
    return "".join(c.lower() for c in text)


def pre_tokenize(text):
    words, cur = [], []
    for c in text:
        if is_whitespace(c) or is_punctuation(c):
            if cur:
                words.append("".join(cur))
                cur = []
            if not is_whitespace(c):
                words.append(c)
        else:
            cur.append(c)
    if cur:
        words.append("".join(cur))
    return words


def wordpiece(word, vocab, unk):
    if len(word) > MAX_WORD_CHARS:
        return [unk]
    pieces, start = [], 0
    while start < len(word):
        end, found = len(word), None
        while end > start:
            sub = word[start:end]
            if start > 0:
                sub = "##" + sub
            if sub in vocab:
                found = vocab[sub]
                break
            end -= 1
        if found is None:
            return [unk]
        pieces.append(found)
        start = end
    return pieces


def tokenize(text, vocab):
    ids = []
    for word in pre_tokenize(normalize(text)):
        ids.extend(wordpiece(word, vocab, vocab["[UNK]"]))
    return [vocab["[CLS]"], *ids[: MAX_TOKENS - 2], vocab["[SEP]"]]


def layer_norm(x, w, b):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * w + b


ERF = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x):
    return 0.5 * x * (1.0 + ERF(x / math.sqrt(2.0)))


def linear(t, name, x):
    return x @ t[name + ".weight"].T + t[name + ".bias"]


def encode(t, ids):
    n = len(ids)
    x = (
        t["embeddings.word_embeddings.weight"][ids]
        + t["embeddings.position_embeddings.weight"][:n]
        + t["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"])
    hd = DIM // HEADS
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        q = linear(t, p + "attention.self.query", x).reshape(n, HEADS, hd).transpose(1, 0, 2)
        k = linear(t, p + "attention.self.key", x).reshape(n, HEADS, hd).transpose(1, 0, 2)
        v = linear(t, p + "attention.self.value", x).reshape(n, HEADS, hd).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        ctx = (s @ v).transpose(1, 0, 2).reshape(n, DIM)
        a = linear(t, p + "attention.output.dense", ctx)
        x = layer_norm(x + a, t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"])
        h = gelu(linear(t, p + "intermediate.dense", x))
        o = linear(t, p + "output.dense", h)
        x = layer_norm(x + o, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"])
    pooled = x.mean(axis=0)
    return pooled / np.linalg.norm(pooled)


def load_vocab(model_dir):
    with open(os.path.join(model_dir, "vocab.txt"), encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def check_config(model_dir):
    """Fail unless tokenizer.json and config.json configure what this script implements."""
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    want_norm = {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                 "strip_accents": None, "lowercase": True}
    problems = []
    if tok.get("normalizer") != want_norm:
        problems.append(f"normalizer is {tok.get('normalizer')}")
    if tok.get("pre_tokenizer") != {"type": "BertPreTokenizer"}:
        problems.append(f"pre_tokenizer is {tok.get('pre_tokenizer')}")
    m = tok.get("model", {})
    if (m.get("type"), m.get("continuing_subword_prefix"), m.get("max_input_chars_per_word")) != (
        "WordPiece", "##", MAX_WORD_CHARS):
        problems.append("model is not WordPiece with '##' and 100 characters")
    if (tok.get("truncation") or {}).get("max_length") != MAX_TOKENS:
        problems.append(f"truncation is {tok.get('truncation')}")
    want_cfg = {"hidden_size": DIM, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                "intermediate_size": 1536, "hidden_act": "gelu", "layer_norm_eps": EPS}
    for key, value in want_cfg.items():
        if cfg.get(key) != value:
            problems.append(f"config.json {key} is {cfg.get(key)!r}, expected {value!r}")
    if problems:
        sys.exit(f"{model_dir}: not the configuration this script implements: " + "; ".join(problems))


def check_hf(model_dir, rows):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print("--check-hf-tokenizer: the tokenizers package is not installed; skipped")
        return
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    bad = 0
    for i, row in enumerate(rows):
        hf = tok.encode(row["text"]).ids
        if hf != row["ids"]:
            bad += 1
            print(f"sentence {i}: ids differ\n  ours {row['ids']}\n  hf   {hf}")
    print(f"--check-hf-tokenizer: {len(rows) - bad}/{len(rows)} sentences have the same ids as tokenizers")
    if bad:
        sys.exit(1)


def write_table(path, model_sha256, rows):
    head = {"encoder": "all-MiniLM-L6-v2", "model_sha256": model_sha256, "max_tokens": MAX_TOKENS,
            "dim": DIM, "generated_by": "scripts/encoder_reference.py"}
    lines = ["{"]
    for key, value in head.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    lines.append('  "sentences": [')
    for i, row in enumerate(rows):
        emb = ", ".join(json.dumps(round(float(v), 8)) for v in row["embedding"])
        lines.append("    {")
        lines.append(f'      "text": {json.dumps(row["text"])},')
        lines.append(f'      "ids": {json.dumps(row["ids"])},')
        lines.append(f'      "embedding": [{emb}]')
        lines.append("    }" + ("," if i + 1 < len(rows) else ""))
    lines.append("  ]")
    lines.append("}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="data/encoders/all-minilm-l6-v2",
                    help="folder with model.safetensors, tokenizer.json, config.json, vocab.txt")
    ap.add_argument("--out", default="models/tests/data/minilm_reference.json",
                    help="where to write the table")
    ap.add_argument("--check-hf-tokenizer", action="store_true",
                    help="also compare the ids with the HF tokenizers package's, if installed")
    args = ap.parse_args()

    check_config(args.model_dir)
    weights = os.path.join(args.model_dir, "model.safetensors")
    with open(weights, "rb") as f:
        model_sha256 = hashlib.sha256(f.read()).hexdigest()
    t = {k: v.astype(np.float64) for k, v in load_file(weights).items() if k != "embeddings.position_ids"}
    vocab = load_vocab(args.model_dir)

    rows = []
    for text in SENTENCES:
        start = time.perf_counter()
        ids = tokenize(text, vocab)
        emb = encode(t, ids)
        secs = time.perf_counter() - start
        rows.append({"text": text, "ids": ids, "embedding": emb})
        print(f"{len(ids):4d} tokens  {secs:6.3f} s  norm {np.linalg.norm(emb):.12f}  {text[:40]!r}")

    if args.check_hf_tokenizer:
        check_hf(args.model_dir, rows)
    write_table(args.out, model_sha256, rows)
    print(f"wrote {args.out} ({len(rows)} sentences, model {model_sha256})")


if __name__ == "__main__":
    main()
