#!/usr/bin/env python3
"""Known-answer vectors for `maeum_models::accountant::skellam`.

An independent Python transcription of the two published bounds the Rust accountant
uses for the `distributed` privacy mode:

- the Skellam mechanism's RDP (Agarwal, Kairouz, Liu, NeurIPS 2021, Corollary 4.1; the
  `_skellam_rdp` of google-research/federated `distributed_dp/accounting_utils.py`),
  in integer units (scale 1);
- Zhu & Wang's general upper bound for Poisson subsampling (ICML 2019; the
  `upper_bound=True` branch of `_compute_rdp_subsampled` in the same file), with
  log-binomials from scipy's gammaln (the Rust code builds them up term by term),
  never above the unsubsampled value;

composed over `steps` and converted to (epsilon, delta) with dp-accounting 0.6.0's own
`compute_epsilon` over its default orders (+inf at the fractional ones, where no Skellam
bound is claimed).

Usage (CI does not run this; the Rust tests read its committed output):
    pip install --user dp-accounting==0.6.0
    python3 scripts/skellam-vectors.py > models/src/accountant/skellam_vectors.json
"""

import json
import math
import sys

import numpy as np
from scipy import special
import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def skellam_rdp(l2, l1, mu, a):
    return a * l2 * l2 / (2 * mu) + min(((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu))


def subsampled(q, alpha, eps):
    if q == 0:
        return 0.0
    if q == 1:
        return eps(alpha)
    a = [math.log((1 - q) ** (alpha - 1) * (alpha * q - q + 1)),
         math.log(special.comb(alpha, 2, exact=True)) + 2 * math.log(q) + (alpha - 2) * math.log1p(-q) + eps(2)]
    for l in range(3, alpha + 1):
        log_comb = special.gammaln(alpha + 1) - special.gammaln(l + 1) - special.gammaln(alpha - l + 1)
        a.append(math.log(3) + log_comb + l * math.log(q) + (alpha - l) * math.log1p(-q) + (l - 1) * eps(l))
    return min(float(special.logsumexp(a)) / (alpha - 1), eps(alpha))


def mechanism(z, d, ratio=100.0):
    """The distributed mode's shape: gamma*C = ratio*sqrt(d), rounding adds sqrt(d)."""
    l2 = (ratio + 1) * math.sqrt(d)
    return l2, l2 * min(math.sqrt(d), l2), (z * l2) ** 2


# (label, l2, l1, variance, q, steps, delta)
CASES = []
for (z, d, q, steps, delta) in [
    (1.0, 52763, 1.0, 50, 1e-5),
    (2.5, 52763, 1.0, 100, 1e-5),
    (0.8, 52763, 0.1, 500, 1e-5),
    (1.2, 52763, 0.05, 1000, 1e-6),
    (0.6, 10395, 0.01, 2000, 1e-5),
    (4.0, 4194304, 1.0, 10, 1e-5),
    (1.0, 4194304, 0.2, 30, 1e-5),
]:
    CASES.append(("distributed z=%g d=%d" % (z, d),) + mechanism(z, d) + (q, steps, delta))
# Small sensitivities, where the second term matters.
for (l2, l1, mu, q, steps, delta) in [
    (2.0, 4.0, 30.0, 1.0, 10, 1e-5),
    (3.0, 9.0, 200.0, 0.3, 20, 1e-5),
    (10.0, 100.0, 1000.0, 0.5, 5, 1e-4),
    (1.0, 1.0, 5.0, 0.02, 300, 1e-5),
]:
    CASES.append(("small l2=%g" % l2, l2, l1, mu, q, steps, delta))

out = {
    "generator": "scripts/skellam-vectors.py",
    "dp_accounting": dp_accounting.__version__ if hasattr(dp_accounting, "__version__") else "0.6.0",
    "numpy": np.__version__,
    "python": sys.version.split()[0],
    "cases": [],
}
for (label, l2, l1, mu, q, steps, delta) in CASES:
    eps = lambda a: skellam_rdp(l2, l1, mu, a)
    rdp = [steps * subsampled(q, int(a), eps) if float(a).is_integer() else math.inf for a in ORDERS]
    epsilon, order = rdp_lib.compute_epsilon(ORDERS, rdp, delta)
    probe = [2, 3, 8, 32, 63, 256]
    out["cases"].append({
        "label": label, "l2": l2, "l1": l1, "variance": mu, "q": q, "steps": steps, "delta": delta,
        "rdp": [[a, subsampled(q, a, eps)] for a in probe],
        "epsilon": epsilon, "order": float(order),
    })
json.dump(out, sys.stdout, indent=1)
print()
