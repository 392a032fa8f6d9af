"""Reading the server's /metrics (Prometheus text format 0.0.4) and the difference between two scrapes. Pure."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Key = tuple[str, tuple[tuple[str, str], ...]]  # metric name, sorted labels


def parse(text: str) -> dict[Key, float]:
    """Every sample line as {(name, labels): value}; comments and malformed lines are skipped."""
    samples: dict[Key, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        labels = tuple(sorted(_LABEL.findall(match["labels"] or "")))
        samples[(match["name"], labels)] = value
    return samples


def total(samples: Mapping[Key, float], name: str) -> float:
    """The sum of a metric over all its label sets (e.g. over models)."""
    return sum(v for (n, _), v in samples.items() if n == name)


@dataclass(frozen=True)
class BatchSizes:
    """Model steps between two scrapes: how many, their mean size, and how many fell in each histogram bucket
    (`counts[bound]`: steps with size <= bound and above the previous bound; "+Inf" for the rest)."""

    steps: int
    mean: float | None
    counts: dict[str, int]


def batch_sizes(before: Mapping[Key, float], after: Mapping[Key, float]) -> BatchSizes:
    """From the `rt_batch_size` histogram, summed over models."""

    def cumulative(samples: Mapping[Key, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for (name, labels), value in samples.items():
            if name == "rt_batch_size_bucket":
                bound = dict(labels).get("le", "+Inf")
                out[bound] = out.get(bound, 0.0) + value
        return out

    cum_before, cum_after = cumulative(before), cumulative(after)
    bounds = sorted(cum_after, key=lambda b: math.inf if b == "+Inf" else float(b))
    counts: dict[str, int] = {}
    previous = 0.0
    for bound in bounds:
        running = cum_after[bound] - cum_before.get(bound, 0.0)
        counts[bound] = round(running - previous)
        previous = running
    steps = round(total(after, "rt_batch_size_count") - total(before, "rt_batch_size_count"))
    size_sum = total(after, "rt_batch_size_sum") - total(before, "rt_batch_size_sum")
    return BatchSizes(steps=steps, mean=size_sum / steps if steps else None, counts=counts)


def delta(before: Mapping[Key, float], after: Mapping[Key, float], name: str) -> float:
    return total(after, name) - total(before, name)
