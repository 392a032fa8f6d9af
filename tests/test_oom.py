"""Out of memory in a model step: the batch is halved and retried before anything fails (pure, no torch)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rt_server.pipeline.oom import is_out_of_memory, run_in_halves


class OutOfMemoryError(RuntimeError):
    """Named like torch's: recognised by name, so tests inject it on a CPU."""


class FitsAtMost:
    """A model step that runs out of memory for batches larger than `limit`, and fails on poisoned items."""

    def __init__(self, limit: int, poison: frozenset[int] = frozenset()) -> None:
        self.limit = limit
        self.poison = poison
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, part: Sequence[int]) -> list[int]:
        self.calls.append(tuple(part))
        if len(part) > self.limit:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.poison & set(part):
            raise ValueError("a model bug")
        return [10 * i for i in part]


def test_a_batch_that_fits_runs_once() -> None:
    step = FitsAtMost(8)
    outcome = run_in_halves(list(range(8)), step)
    assert step.calls == [tuple(range(8))]
    assert outcome.splits == 0
    assert not outcome.failed
    assert [r for p in outcome.parts for r in p.results or ()] == [10 * i for i in range(8)]


def test_out_of_memory_halves_until_it_fits_and_fails_nothing() -> None:
    step = FitsAtMost(2)
    outcome = run_in_halves(list(range(8)), step)
    assert step.calls == [tuple(range(8)), (0, 1, 2, 3), (0, 1), (2, 3), (4, 5, 6, 7), (4, 5), (6, 7)]
    assert outcome.splits == 3
    assert not outcome.failed
    assert [p.items for p in outcome.parts] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [r for p in outcome.parts for r in p.results or ()] == [10 * i for i in range(8)]


def test_a_single_item_that_runs_out_of_memory_fails_alone() -> None:
    step = FitsAtMost(0)
    outcome = run_in_halves([1, 2, 3], step)
    assert [p.items for p in outcome.parts] == [(1,), (2,), (3,)]
    assert all(p.results is None and p.error is not None and "OutOfMemoryError" in p.error for p in outcome.parts)


def test_another_error_fails_only_the_part_that_raised() -> None:
    step = FitsAtMost(2, poison=frozenset({5}))
    errors: list[tuple[int, str]] = []
    outcome = run_in_halves(list(range(8)), step, on_error=lambda n, exc: errors.append((n, type(exc).__name__)))
    failed = [p.items for p in outcome.parts if p.results is None]
    assert failed == [(4, 5)]  # the half holding the poisoned item, not the whole batch
    assert [p.items for p in outcome.parts if p.results is not None] == [(0, 1), (2, 3), (6, 7)]
    assert ("ValueError" in {name for _, name in errors}) and (8, "OutOfMemoryError") in errors


def test_an_error_that_is_not_out_of_memory_is_not_retried() -> None:
    step = FitsAtMost(8, poison=frozenset({3}))
    outcome = run_in_halves(list(range(6)), step)
    assert step.calls == [tuple(range(6))]
    assert [p.items for p in outcome.parts] == [tuple(range(6))]
    assert outcome.failed


def test_a_wrong_number_of_results_fails_the_part() -> None:
    outcome = run_in_halves([1, 2], lambda part: [0])
    assert outcome.failed and outcome.parts[0].error is not None and "1 results for 2 items" in outcome.parts[0].error


@given(st.integers(1, 64), st.integers(0, 70), st.frozensets(st.integers(0, 63), max_size=4))
def test_every_item_is_accounted_for_once_in_order(n: int, limit: int, poison: frozenset[int]) -> None:
    step = FitsAtMost(limit, poison)
    outcome = run_in_halves(list(range(n)), step)
    assert [i for p in outcome.parts for i in p.items] == list(range(n))
    assert len(step.calls) <= 2 * n - 1
    for part in outcome.parts:
        if part.results is not None:
            assert list(part.results) == [10 * i for i in part.items]
        else:  # fails only when it could not fit alone, or it holds a poisoned item
            assert (len(part.items) == 1 and limit == 0) or poison & set(part.items)
    if limit >= 1 and not poison:
        assert not outcome.failed


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OutOfMemoryError("x"), True),
        (MemoryError(), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
        (RuntimeError("MPS backend out of memory"), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
        (RuntimeError("shape mismatch"), False),
        (ValueError("out of memory"), False),  # only allocators' RuntimeErrors are read by their message
        (KeyError("x"), False),
    ],
)
def test_is_out_of_memory(exc: BaseException, expected: bool) -> None:
    assert is_out_of_memory(exc) is expected


def test_torchs_own_out_of_memory_error_is_recognised() -> None:
    torch = pytest.importorskip("torch")
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(torch.OutOfMemoryError("out of memory"))
