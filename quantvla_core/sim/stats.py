"""Success-rate statistics: Wilson score intervals and the exact (binomial) McNemar test.

Wilson rather than the normal approximation because success rates sit near 0 or 1 with a few
dozen episodes; exact McNemar because variants run the same starts (paired outcomes) and the
number of discordant pairs is small.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% standard-normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact(a: list[bool], b: list[bool]) -> dict:
    """Two-sided exact McNemar test on paired outcomes a[i], b[i] (same start i).

    Under H0 the discordant pairs split 50/50, so p = P(Binomial(n_disc, 1/2) as extreme).
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    both = sum(1 for x, y in zip(a, b) if x and y)
    n = a_only + b_only
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n if n else 1.0
    return {
        "both": both,
        "a_only": a_only,
        "b_only": b_only,
        "neither": len(a) - both - a_only - b_only,
        "p_value": min(1.0, 2 * tail),
    }
