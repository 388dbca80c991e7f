"""Times the offline metrics on random data (default: GAUC over 10M rows, 1M users).

    python benchmarks/bench_metrics.py [--rows 10000000] [--users 1000000] [--dtype float32]

float32 scores (what the models output) take the no-argsort path of `mkt.metrics`; float64
scores that float32 cannot hold exactly are ranked with one argsort first.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mkt.metrics import activity_groups, auc, gauc, log_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    users = rng.integers(0, args.users, args.rows)
    labels = (rng.random(args.rows) < 0.05).astype(np.int8)
    probs = np.clip(rng.random(args.rows) * 0.5 + labels * 0.2, 0, 1).astype(args.dtype)
    if args.dtype == "float64":
        probs = probs * (1 - 1e-12)  # make them not float32-exact: the general path
    print(f"{args.rows:,} rows, {args.users:,} users, {args.dtype} scores")
    for name, fn in [
        ("auc", lambda: auc(labels, probs)),
        ("gauc", lambda: gauc(labels, probs, users)),
        ("log_loss", lambda: log_loss(labels, probs)),
        ("activity_groups", lambda: activity_groups(users % 60).shape),
    ]:
        start = time.perf_counter()
        value = fn()
        print(f"{name:>16}: {time.perf_counter() - start:6.2f} s  -> {value}")


if __name__ == "__main__":
    main()
