"""Length bucketing: choose a batch from queued work that keeps padding waste low. Pure.

A padded batch costs about `len(batch) * longest` (every item is padded to the longest), while the useful work
is the sum of the items' own costs; the difference is waste. Costs are estimates in any consistent unit, usually
phonemes divided by speed (frames are proportional to that, and frames dominate the decoder's cost).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketLimits:
    max_items: int = 16
    max_padded_cost: float = 4096.0  # len(batch) * longest item
    max_waste: float = 0.3  # at most this fraction of the padded batch may be padding

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_padded_cost <= 0 or not 0.0 <= self.max_waste < 1.0:
            raise ValueError("need max_items >= 1, max_padded_cost > 0 and 0 <= max_waste < 1")


def padded_cost(costs: Sequence[float]) -> float:
    return len(costs) * max(costs) if costs else 0.0


def waste(costs: Sequence[float]) -> float:
    """The fraction of a padded batch that is padding (0 for a single item)."""
    padded = padded_cost(costs)
    return 0.0 if padded == 0 else 1.0 - sum(costs) / padded


def choose_batch(costs: Sequence[float], limits: BucketLimits) -> list[int]:
    """Indices of a batch from `costs`, which are in priority order (most urgent first).

    The first item is always taken (it is the most urgent; it alone may exceed the cost budget). Each later item
    joins, in priority order, if the batch then stays within `max_items`, `max_padded_cost` and `max_waste`.
    So priority decides who goes first, and the limits decide who can share the pass with them.
    """
    if not costs:
        return []
    if any(c <= 0 for c in costs):
        raise ValueError("costs must be positive")
    chosen = [0]
    total, longest = costs[0], costs[0]
    for index in range(1, len(costs)):
        if len(chosen) == limits.max_items:
            break
        cost = costs[index]
        new_longest = max(longest, cost)
        new_padded = (len(chosen) + 1) * new_longest
        if new_padded > limits.max_padded_cost:
            continue
        if 1.0 - (total + cost) / new_padded > limits.max_waste:
            continue
        chosen.append(index)
        total, longest = total + cost, new_longest
    return chosen
