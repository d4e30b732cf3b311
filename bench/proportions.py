"""Proportions over benchmark videos: Wilson intervals and paired differences."""

import math


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def paired_difference(a: list[bool], b: list[bool]) -> tuple[float, float]:
    """Mean of a - b over the same videos and its 95% half-width (normal approximation)."""
    diffs = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(1, n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def pct(values: list[bool]) -> str:
    """The share of true values with its 95% Wilson interval, as "92% [87%, 95%]"."""
    low, high = wilson(sum(values), len(values))
    return f"{sum(values) / len(values):.0%} [{low:.0%}, {high:.0%}]"


def signed(diff: float, half: float) -> str:
    """A paired difference with its interval, as "-3% [-7%, +1%]"."""
    return f"{diff:+.0%} [{diff - half:+.0%}, {diff + half:+.0%}]"
