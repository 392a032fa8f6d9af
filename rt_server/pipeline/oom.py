"""Out of memory in a model step: split the batch in halves and retry, before failing anything. Pure.

A batch that does not fit in accelerator memory usually fits as two halves: activation memory grows with the
batch size times the longest item. So an out-of-memory error is never a reason to fail a session at once; only
a single item that runs out of memory on its own fails (as would any other error, for its part of the batch).

Nothing here imports torch: `is_out_of_memory` recognises the error by its type's name and message, which also
lets tests inject an out-of-memory-like error on a CPU.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")

# Messages of allocators that report running out of memory with a plain RuntimeError (older CUDA builds, MPS,
# ROCm, the CPU allocator).
_OOM_MESSAGES = ("out of memory", "not enough memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for `torch.cuda.OutOfMemoryError` (`torch.OutOfMemoryError`), `MemoryError`, and the
    RuntimeErrors that allocators raise when memory runs out.
    """
    if isinstance(exc, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)[:1000].lower()
        return any(m in text for m in _OOM_MESSAGES)
    return False


@dataclass(frozen=True)
class Part(Generic[J, R]):
    """A contiguous part of the batch as it was finally run: its results, or why it failed."""

    items: tuple[J, ...]
    results: tuple[R, ...] | None  # one per item; None when the part failed
    error: str | None = None  # the failure, for logs (never shown to clients)


@dataclass(frozen=True)
class HalvingOutcome(Generic[J, R]):
    parts: tuple[Part[J, R], ...]  # in the batch's order; together they hold every item exactly once
    splits: int  # how many times a part ran out of memory and was split in two

    @property
    def failed(self) -> bool:
        return any(p.results is None for p in self.parts)


def run_in_halves(
    items: Sequence[J],
    run: Callable[[Sequence[J]], Sequence[R]],
    *,
    is_oom: Callable[[BaseException], bool] = is_out_of_memory,
    on_error: Callable[[int, BaseException], None] | None = None,
) -> HalvingOutcome[J, R]:
    """Run `items` as one batch; on an out-of-memory error, run each half the same way, recursively.

    `run` returns one result per item or raises. Any other error fails the part that raised (and only it). A
    single item that runs out of memory fails. `on_error(size, exc)` is called for every error (for logging).
    Runs at most 2n - 1 attempts for n items. The exception is dropped before the retry, so the memory its
    traceback holds (the failed step's tensors) is free again when the halves run.
    """
    pending: deque[tuple[J, ...]] = deque([tuple(items)])  # bound: at most log2(n) + 1 parts
    parts: list[Part[J, R]] = []
    splits = 0
    while pending:
        part = pending.popleft()
        error: str | None = None
        retry = False
        try:
            results = tuple(run(part))
            if len(results) != len(part):
                raise RuntimeError(f"{len(results)} results for {len(part)} items")
        except Exception as exc:
            if on_error is not None:
                on_error(len(part), exc)
            retry = is_oom(exc) and len(part) > 1
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        else:
            parts.append(Part(part, results))
            continue
        if retry:  # outside the `except`: the exception and its frames are gone
            splits += 1
            half = (len(part) + 1) // 2
            pending.extendleft((part[half:], part[:half]))  # the first half runs first
        else:
            parts.append(Part(part, None, error))
    return HalvingOutcome(tuple(parts), splits)
