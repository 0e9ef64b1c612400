#!/usr/bin/env python3
"""PyTorch reference for Maeum's text classifier: same architecture, same inputs.

Manual benchmark, never run in CI (torch from PyPI is the CUDA build here: ~5 GB).

    python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch
    cargo bench -p maeum-models --bench train_throughput -- --export /tmp/rmhd-features.jsonl
    /tmp/torch-venv/bin/python benches/torch_text_classifier.py /tmp/rmhd-features.jsonl --threads 1
    /tmp/torch-venv/bin/python benches/torch_text_classifier.py /tmp/rmhd-features.jsonl --threads 2

Architecture (as `models/src/text.rs`): EmbeddingBag(2^16, 64, mode="sum") over the
exported per-document bucket ids and weights → Linear(64, 128) → ReLU → Linear(128, 27);
Adam (lr 2e-3, eps 1e-8), batch 32, input-feature dropout 0.5, seeded shuffling.
Two variants: `dense` (EmbeddingBag default: dense gradient, Adam over all rows) and
`sparse` (sparse=True with SparseAdam on the embedding, like Maeum's lazy Adam).
Prints one JSON object per variant.
"""

import argparse
import json
import random
import time

import torch
from torch import nn


def load(path):
    train, test = [], []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            (train if r["split"] == "train" else test).append((r["ids"], r["weights"], r["label"]))
    return train, test


class Net(nn.Module):
    def __init__(self, buckets, dim, hidden, labels, sparse):
        super().__init__()
        self.emb = nn.EmbeddingBag(buckets, dim, mode="sum", sparse=sparse)
        nn.init.uniform_(self.emb.weight, -0.05, 0.05)
        self.hidden = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, labels)

    def forward(self, ids, offsets, weights):
        return self.out(torch.relu(self.hidden(self.emb(ids, offsets, per_sample_weights=weights))))


def batch(docs, dropout, gen):
    ids, offsets, weights, labels = [], [], [], []
    for d_ids, d_w, label in docs:
        offsets.append(len(ids))
        t_ids = torch.tensor(d_ids, dtype=torch.long)
        t_w = torch.tensor(d_w, dtype=torch.float32)
        if dropout > 0:
            keep = torch.rand(len(d_ids), generator=gen) >= dropout
            t_ids, t_w = t_ids[keep], t_w[keep] / (1 - dropout)
        ids.append(t_ids)
        weights.append(t_w)
        labels.append(label)
    offs = torch.tensor([0] + [len(x) for x in ids[:-1]]).cumsum(0)
    return torch.cat(ids), offs, torch.cat(weights), torch.tensor(labels)


def run(train, test, sparse, epochs, args):
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(7)
    labels = 1 + max(l for _, _, l in train)
    net = Net(args.buckets, 64, 128, labels, sparse)
    if sparse:
        opts = [torch.optim.SparseAdam(list(net.emb.parameters()), lr=2e-3, eps=1e-8),
                torch.optim.Adam(list(net.hidden.parameters()) + list(net.out.parameters()), lr=2e-3, eps=1e-8)]
    else:
        opts = [torch.optim.Adam(net.parameters(), lr=2e-3, eps=1e-8)]
    rng = random.Random(7)
    order = list(range(len(train)))
    seen, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        rng.shuffle(order)
        for i in range(0, len(order), 32):
            ids, offs, w, y = batch([train[j] for j in order[i:i + 32]], 0.5, gen)
            loss = nn.functional.cross_entropy(net(ids, offs, w), y)
            for o in opts:
                o.zero_grad()
            loss.backward()
            for o in opts:
                o.step()
            seen += len(y)
    secs = time.perf_counter() - t0
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 256):
            ids, offs, w, y = batch(test[i:i + 256], 0.0, gen)
            correct += (net(ids, offs, w).argmax(1) == y).sum().item()
    return {"bench": f"pytorch {torch.__version__} embedding-bag {'sparse' if sparse else 'dense'}",
            "threads": torch.get_num_threads(), "epochs": epochs, "train_seconds": secs,
            "train_examples_per_s": seen / secs, "accuracy": correct / len(test)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("features")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--buckets", type=int, default=1 << 16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load(args.features)
    for sparse in (False, True):
        print(json.dumps(run(train, test, sparse, args.epochs, args)), flush=True)


if __name__ == "__main__":
    main()
