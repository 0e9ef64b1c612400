#!/usr/bin/env python3
"""Known-answer vectors for `maeum_models::accountant`, from Google's dp-accounting.

Prints JSON to stdout: for a fixed table of Poisson-subsampled Gaussian cases, the
epsilon and optimal order that `dp_accounting.rdp.RdpAccountant()` (default orders)
reports after composing `PoissonSampledDpEvent(q, GaussianDpEvent(sigma))` `steps`
times, the one-step RDP at a few orders from
`dp_accounting.rdp.rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian`,
and a few noise multipliers calibrated with `dp_accounting.calibrate_dp_mechanism`.
An infinite RDP value is written as null (JSON has no infinity).

Reference: dp-accounting==0.6.0 exactly (PyPI), under CPython 3.11 with the numpy and
scipy that pip resolves for it (the versions used are recorded in the output).

Usage (regenerate the committed vectors; CI does not run this script, the Rust tests
only read its committed output):
    pip install --user dp-accounting==0.6.0
    python3 scripts/dp-accounting-vectors.py > models/src/accountant_vectors.json
"""

import json
import math
import sys

import numpy as np
import scipy
import dp_accounting
from dp_accounting import dp_event
from dp_accounting import mechanism_calibration
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

EXPECTED_VERSION = "0.6.0"

# (q, sigma, steps, delta): a spread over sampling rates, noise levels, lengths and
# deltas, so that the optimal order lands on fractional orders (1.1 .. 10.9), on
# integer orders and at both ends of the default grid.
EPSILON_CASES = [
    (0.001, 0.5, 10000, 1e-5),
    (0.001, 0.8, 100, 1e-6),
    (0.001, 0.8, 10000, 1e-6),
    (0.001, 1.1, 1, 1e-6),
    (0.001, 1.1, 10000, 1e-5),
    (0.001, 2.0, 100, 1e-5),
    (0.001, 5.0, 1, 1e-5),
    (0.01, 0.5, 1, 1e-6),
    (0.01, 0.8, 100, 1e-5),
    (0.01, 1.1, 1, 1e-5),
    (0.01, 1.1, 10000, 1e-5),
    (0.01, 2.0, 10000, 1e-6),
    (0.01, 5.0, 10000, 1e-5),
    (0.05, 0.5, 100, 1e-5),
    (0.05, 0.8, 10000, 1e-5),
    (0.05, 1.1, 100, 1e-5),
    (0.05, 1.1, 10000, 1e-6),
    (0.05, 2.0, 1, 1e-6),
    (0.05, 5.0, 100, 1e-6),
    (0.25, 0.5, 1, 1e-5),
    (0.25, 0.8, 10000, 1e-6),
    (0.25, 1.1, 1, 1e-5),
    (0.25, 1.1, 10000, 1e-5),
    (0.25, 2.0, 100, 1e-5),
    (0.25, 5.0, 10000, 1e-6),
    (1.0, 0.5, 1, 1e-6),
    (1.0, 0.8, 100, 1e-5),
    (1.0, 1.1, 1, 1e-5),
    (1.0, 2.0, 100, 1e-6),
    (1.0, 5.0, 10000, 1e-5),
]

# One-step RDP is recorded at these orders (fractional and integer, small and large).
RDP_ORDERS = [1.5, 2.0, 3.5, 8.0, 32.0, 256.0]

# (target_epsilon, delta, q, steps): sigma calibrated in the bracket [0.1, 1000].
CALIBRATION_CASES = [
    (1.0, 1e-5, 0.01, 10000),
    (8.0, 1e-5, 0.01, 1000),
    (3.0, 1e-6, 0.001, 10000),
    (0.5, 1e-5, 0.05, 100),
    (2.0, 1e-5, 0.25, 100),
    (10.0, 1e-6, 1.0, 1),
]


def finite_or_none(x):
    x = float(x)
    return x if math.isfinite(x) else None


def epsilon_case(q, sigma, steps, delta):
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    accountant.compose(event, steps)
    eps, order = accountant.get_epsilon_and_optimal_order(delta)
    rdp = rdp_lib._compute_rdp_poisson_subsampled_gaussian(q, sigma, RDP_ORDERS)
    return {
        "q": q,
        "sigma": sigma,
        "steps": steps,
        "delta": delta,
        "epsilon": float(eps),
        "order": float(order),
        "rdp": [{"order": a, "rdp": finite_or_none(r)} for a, r in zip(RDP_ORDERS, rdp)],
    }


def calibration_case(target_epsilon, delta, q, steps):
    def make_event(sigma):
        inner = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
        return dp_event.SelfComposedDpEvent(inner, steps)

    sigma = mechanism_calibration.calibrate_dp_mechanism(
        dp_accounting.rdp.RdpAccountant,
        make_event,
        target_epsilon,
        delta,
        bracket_interval=mechanism_calibration.ExplicitBracketInterval(0.1, 1000.0),
    )
    return {"target_epsilon": target_epsilon, "delta": delta, "q": q, "steps": steps, "sigma": float(sigma)}


def main():
    from importlib.metadata import version

    found = version("dp-accounting")
    if found != EXPECTED_VERSION:
        sys.exit(f"dp-accounting {EXPECTED_VERSION} required, found {found}")
    out = {
        "generator": "scripts/dp-accounting-vectors.py",
        "dp_accounting": found,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "default_orders": [float(a) for a in rdp_lib.DEFAULT_RDP_ORDERS],
        "epsilon_cases": [epsilon_case(*c) for c in EPSILON_CASES],
        "calibration_cases": [calibration_case(*c) for c in CALIBRATION_CASES],
    }
    json.dump(out, sys.stdout, indent=1, allow_nan=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
