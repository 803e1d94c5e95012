#!/usr/bin/env python3
"""Pools the rounds of several bench/run.sh logs (same code, saved output):

    bench/run.sh | tee run1.log ...; bench/pool.py run1.log run2.log

For each variant, over every round that ran it and (a): the median of its
TPS divided by (a)'s in the same round, and of (a)'s server CPU per
transaction divided by its own, each with the distribution-free 95%
confidence interval of the median that bench/run.sh prints for one log.
"""
import math
import re
import sys

ROUND = re.compile(r"\s+round (\d+)\s+\((\w)\)\s+([\d.]+) tps\s+server CPU\s+([\d.]+) us/txn")


def rounds(path):
    found = {}
    with open(path) as log:
        for line in log:
            m = ROUND.match(line)
            if m:
                found.setdefault(int(m[1]), {})[m[2]] = (float(m[3]), float(m[4]))
    return found.values()


def median_ci(values):
    v = sorted(values)
    n = len(v)
    median = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    if n < 6:
        return median, None
    half = 1.96 * math.sqrt(n) / 2
    j = max(int(n / 2 - half), 1)
    k = min(int(n / 2 + half) + 2, n)
    return median, (v[j - 1], v[k - 1])


def main(paths):
    by_variant = {}
    for path in paths:
        for r in rounds(path):
            if "a" not in r:
                continue
            for variant, (tps, us) in r.items():
                by_variant.setdefault(variant, []).append((tps / r["a"][0], r["a"][1] / us))
    for variant in sorted(by_variant):
        pairs = by_variant[variant]
        show = []
        for values in ([p[0] for p in pairs], [p[1] for p in pairs]):
            median, ci = median_ci(values)
            show.append(f"{median:.3f}" + (f" (CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""))
        below = sum(1 for p in pairs if p[0] < 0.9)
        print(f"({variant}) {len(pairs):4d} rounds   TPS ratio {show[0]}   CPU ratio {show[1]}"
              f"   rounds below 0.90: {below}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
