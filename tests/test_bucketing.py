"""Length bucketing: budget, waste bound and priority, as properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rt_server.pipeline.bucketing import BucketLimits, choose_batch, padded_cost, waste

costs_st = st.lists(st.floats(1.0, 600.0, allow_nan=False), min_size=1, max_size=64)
limits_st = st.builds(
    BucketLimits,
    max_items=st.integers(1, 32),
    max_padded_cost=st.floats(100.0, 10_000.0),
    max_waste=st.floats(0.0, 0.9),
)


@given(costs_st, limits_st)
def test_batch_respects_every_limit(costs: list[float], limits: BucketLimits) -> None:
    chosen = choose_batch(costs, limits)
    assert chosen[0] == 0, "the most urgent item always runs"
    assert chosen == sorted(set(chosen)), "indices unique, in priority order"
    assert len(chosen) <= limits.max_items
    picked = [costs[i] for i in chosen]
    if len(picked) > 1:
        assert padded_cost(picked) <= limits.max_padded_cost + 1e-9
        assert waste(picked) <= limits.max_waste + 1e-9


@given(costs_st, limits_st)
def test_batch_is_maximal_in_priority_order(costs: list[float], limits: BucketLimits) -> None:
    """No skipped item could have joined at the end: greedy never leaves an admissible item behind."""
    chosen = choose_batch(costs, limits)
    if len(chosen) == limits.max_items:
        return
    picked = [costs[i] for i in chosen]
    for i in range(len(costs)):
        if i in chosen:
            continue
        trial = [*picked, costs[i]]
        fits = padded_cost(trial) <= limits.max_padded_cost and waste(trial) <= limits.max_waste
        later_only = all(j < i for j in chosen)
        assert not (fits and later_only), f"item {i} fits but was left out"


def test_similar_lengths_share_a_pass_and_outliers_wait() -> None:
    limits = BucketLimits(max_items=8, max_padded_cost=10_000, max_waste=0.25)
    assert choose_batch([100, 95, 400, 105, 10, 98], limits) == [0, 1, 3, 5]


def test_empty_and_invalid() -> None:
    assert choose_batch([], BucketLimits()) == []
    with pytest.raises(ValueError, match="positive"):
        choose_batch([1.0, 0.0], BucketLimits())
    with pytest.raises(ValueError, match="max_waste"):
        BucketLimits(max_waste=1.0)
