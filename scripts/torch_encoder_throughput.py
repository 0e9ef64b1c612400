#!/usr/bin/env python3
"""PyTorch CPU forward throughput of all-MiniLM-L6-v2 on the posts the Rust encoder embeds.

A benchmark only, to put the Rust (burn) encoder beside PyTorch in docs/benchmarks.md
(issue 18). CI does not run it, and torch is installed only for this benchmark, in a
virtual environment outside the repository:

    python3 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch numpy safetensors tokenizers

Usage (after scripts/fetch_encoder.py and scripts/fetch_rmhd.py):
    /work/torchvenv/bin/python scripts/torch_encoder_throughput.py [--posts 512] [--batch 32]
        [--threads 2] [--attention sdpa|explicit] [--model-dir data/encoders/all-minilm-l6-v2]
        [--data data/rmhd.jsonl]
    /work/torchvenv/bin/python scripts/torch_encoder_throughput.py \\
        --check-reference models/tests/data/minilm_reference.json

What it does, as the Rust example `target/debug/examples/encoder_throughput --posts 512`
(models/examples/encoder_throughput.rs) does, so the two JSON lines compare:
    - reads the first --posts non-blank lines of data/rmhd.jsonl (field "text");
    - tokenises each text with the `tokenizers` package from tokenizer.json, one text at a
      time as the Rust encoder does, truncation max_length 128, no padding;
    - sorts the texts by token count and cuts them into batches of --batch, each padded to
      its longest member with an attention mask;
    - runs the BERT forward pass written below in torch, float32, under
      torch.inference_mode() with torch.set_num_threads(--threads):
          word + position + token type 0 embeddings, LayerNorm (eps from config.json, 1e-12)
          6 x (12-head self-attention: query/key/value in one matrix product, padding
               masked out; dense + residual + LayerNorm; dense 1536 + exact erf GELU
               (torch.nn.functional.gelu default); dense + residual + LayerNorm)
          mean pooling over the unmasked tokens, L2 normalisation;
    - warms up on one batch (the longest), then times tokenisation and the forward passes
      (padding included) separately.
Prints one JSON line with the Rust example's keys, posts_per_s = posts / (tokenize_s +
forward_s), plus "batch", "attention" and the torch version. --attention sdpa (default)
uses torch.nn.functional.scaled_dot_product_attention; explicit computes
softmax(QK^T / sqrt(32) + mask) V with matmul, as the Rust encoder does.

--check-reference TABLE embeds the table's sentences (scripts/encoder_reference.py, float64
numpy) through the same batching and forward code, checks that the token ids match, prints
the largest cosine error (1 - cosine) against the table and exits 1 unless it is < 1e-4.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

MAX_TOKENS = 128
MAX_COSINE_ERROR = 1e-4


def load_model(model_dir):
    """The weights as float32 tensors, the query/key/value projections fused, and the config."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    want = {"hidden_act": "gelu", "position_embedding_type": "absolute"}
    for key, value in want.items():
        if cfg.get(key, value) != value:
            sys.exit(f"{model_dir}/config.json: {key} is {cfg.get(key)!r}, this script implements {value!r}")
    raw = load_file(os.path.join(model_dir, "model.safetensors"))
    t = {k: v.to(torch.float32).contiguous() for k, v in raw.items() if k != "embeddings.position_ids"}
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def g(name, p=p):
            return t[p + name]

        layers.append({
            "qkv_w": torch.cat([g(f"attention.self.{n}.weight") for n in ("query", "key", "value")]),
            "qkv_b": torch.cat([g(f"attention.self.{n}.bias") for n in ("query", "key", "value")]),
            "ao_w": g("attention.output.dense.weight"), "ao_b": g("attention.output.dense.bias"),
            "an_w": g("attention.output.LayerNorm.weight"), "an_b": g("attention.output.LayerNorm.bias"),
            "i_w": g("intermediate.dense.weight"), "i_b": g("intermediate.dense.bias"),
            "o_w": g("output.dense.weight"), "o_b": g("output.dense.bias"),
            "on_w": g("output.LayerNorm.weight"), "on_b": g("output.LayerNorm.bias"),
        })
    model = {
        "word": t["embeddings.word_embeddings.weight"],
        "position": t["embeddings.position_embeddings.weight"],
        "type0": t["embeddings.token_type_embeddings.weight"][0],
        "en_w": t["embeddings.LayerNorm.weight"], "en_b": t["embeddings.LayerNorm.bias"],
        "layers": layers,
    }
    return model, cfg


def forward(model, cfg, ids, mask, attention):
    """Sentence vectors (b x hidden) of a padded batch: ids and mask are (b x len)."""
    b, n = ids.shape
    h, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    hd = h // heads
    x = model["word"][ids] + model["position"][:n] + model["type0"]
    x = F.layer_norm(x, (h,), model["en_w"], model["en_b"], eps)
    keep = mask.bool().view(b, 1, 1, n)
    bias = (mask.view(b, 1, 1, n) - 1.0) * 1e9
    for L in model["layers"]:
        q, k, v = F.linear(x, L["qkv_w"], L["qkv_b"]).view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        if attention == "sdpa":
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + bias
            ctx = torch.softmax(scores, dim=-1) @ v
        ctx = ctx.transpose(1, 2).reshape(b, n, h)
        x = F.layer_norm(F.linear(ctx, L["ao_w"], L["ao_b"]) + x, (h,), L["an_w"], L["an_b"], eps)
        ff = F.linear(F.gelu(F.linear(x, L["i_w"], L["i_b"])), L["o_w"], L["o_b"])
        x = F.layer_norm(ff + x, (h,), L["on_w"], L["on_b"], eps)
    m = mask.unsqueeze(-1)
    mean = (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    return F.normalize(mean, p=2.0, dim=1, eps=1e-12)


def batches(ids, batch):
    """Indices sorted by length, cut into batches, each padded: [(indices, ids, mask)]."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = []
    for s in range(0, len(order), batch):
        chunk = order[s:s + batch]
        n = max(1, max(len(ids[i]) for i in chunk))
        padded = torch.zeros(len(chunk), n, dtype=torch.long)
        mask = torch.zeros(len(chunk), n, dtype=torch.float32)
        for row, i in enumerate(chunk):
            padded[row, :len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
            mask[row, :len(ids[i])] = 1.0
        out.append((chunk, padded, mask))
    return out


def embed(model, cfg, ids, batch, attention):
    """Sentence vectors of token id lists, in input order (len(ids) x hidden)."""
    out = torch.empty(len(ids), cfg["hidden_size"])
    for chunk, padded, mask in batches(ids, batch):
        out[chunk] = forward(model, cfg, padded, mask, attention)
    return out


def load_tokenizer(model_dir):
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=MAX_TOKENS)
    return tok


def tokenize(tok, texts):
    # One text at a time, as the Rust encoder does (encode_batch would use several threads).
    return [tok.encode(t).ids for t in texts]


def read_posts(path, n):
    texts = []
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if not line.strip():
                continue
            texts.append(json.loads(line)["text"])
            if len(texts) == n:
                break
    return texts


def check_reference(args, model, cfg, tok):
    with open(args.check_reference, encoding="utf-8") as f:
        table = json.load(f)
    rows = table["sentences"]
    ids = tokenize(tok, [r["text"] for r in rows])
    bad_ids = [i for i, r in enumerate(rows) if ids[i] != r["ids"]]
    with torch.inference_mode():
        got = embed(model, cfg, ids, args.batch, args.attention).double()
    want = torch.tensor([r["embedding"] for r in rows], dtype=torch.float64)
    cos = (got * want).sum(1) / (got.norm(dim=1) * want.norm(dim=1))
    err = (1.0 - cos).abs()
    print(json.dumps({
        "sentences": len(rows),
        "ids_differ": bad_ids,
        "max_cosine_error": float(err.max()),
        "max_abs_error": float((got - want).abs().max()),
        "attention": args.attention,
        "torch": torch.__version__,
    }))
    if bad_ids or float(err.max()) >= MAX_COSINE_ERROR:
        sys.exit(f"torch does not reproduce {args.check_reference} (cosine error must be < {MAX_COSINE_ERROR})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posts", type=int, default=512, help="how many posts of --data to embed")
    ap.add_argument("--batch", type=int, default=32, help="texts per forward pass")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--attention", choices=["sdpa", "explicit"], default="sdpa",
                    help="scaled_dot_product_attention, or matmul + softmax as in Rust")
    ap.add_argument("--model-dir", default="data/encoders/all-minilm-l6-v2",
                    help="folder with model.safetensors, tokenizer.json, config.json")
    ap.add_argument("--data", default="data/rmhd.jsonl", help="JSONL posts, field \"text\"")
    ap.add_argument("--check-reference", metavar="TABLE",
                    help="compare with a table of scripts/encoder_reference.py instead of timing")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, cfg = load_model(args.model_dir)
    tok = load_tokenizer(args.model_dir)
    load_s = time.perf_counter() - start
    if args.check_reference:
        check_reference(args, model, cfg, tok)
        return

    texts = read_posts(args.data, args.posts)
    start = time.perf_counter()
    ids = tokenize(tok, texts)
    tokenize_s = time.perf_counter() - start
    with torch.inference_mode():
        longest = sorted(ids, key=len)[-args.batch:]
        embed(model, cfg, longest, args.batch, args.attention)
        start = time.perf_counter()
        vectors = embed(model, cfg, ids, args.batch, args.attention)
        forward_s = time.perf_counter() - start
    assert vectors.shape == (len(texts), cfg["hidden_size"])
    print(json.dumps({
        "posts": len(texts),
        "mean_tokens": sum(map(len, ids)) / len(texts),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "attention": args.attention,
        "load_s": load_s,
        "tokenize_s": tokenize_s,
        "forward_s": forward_s,
        "posts_per_s": len(texts) / (tokenize_s + forward_s),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
