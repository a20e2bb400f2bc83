"""Small statistics for the report: percentiles, the median of rounds and its spread."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Spread", "percentile", "ratio_spread", "spread"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Spread:
    """The median of per-round values, with the lowest and highest round."""

    median: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        """JSON-friendly form."""
        return {"median": self.median, "min": self.low, "max": self.high, "rounds": self.n}


def spread(values: Sequence[float]) -> Spread:
    """Median, min and max of ``values`` (NaN values are dropped)."""
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return Spread(math.nan, math.nan, math.nan, 0)
    return Spread(statistics.median(clean), min(clean), max(clean), len(clean))


def ratio_spread(numerators: Sequence[float], denominators: Sequence[float]) -> Spread:
    """Round-by-round ratios (round i over round i), summarised as a :class:`Spread`.

    Pairing by round cancels noise that hit both variants of the same round.
    """
    ratios = [
        n / d if d and not math.isnan(d) and not math.isnan(n) else math.nan
        for n, d in zip(numerators, denominators, strict=False)
    ]
    return spread(ratios)
