"""Fault injection around the real tiny model, for server tests: a runner that can hold a batch inside the
model, run out of memory above a batch size, raise, or kill the engine thread, and that records every batch.

Faults are triggered by marker words in the phonemes (valid vocabulary, so they pass the session's checks) or
by settings on the shared `Faults` object, which the test and the server's engine thread both hold.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from server_harness import load_model

from rt_server.engine import LoadedModel
from rt_server.settings import ModelSpec

HOLD = "ʤʤʤ"  # a batch holding this waits inside the model until `Faults.release()`
FAIL = "ʒʒʒ"  # a batch holding this raises RuntimeError (a model failure)
KILL = "ʧʧʧ"  # a batch holding this raises a BaseException that ends the engine thread


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which the engine recognises by name."""


class EngineKilled(BaseException):
    """Not an Exception: nothing in the engine's batch handling catches it, so the thread dies."""


@dataclass(frozen=True)
class BatchRecord:
    phonemes: tuple[str, ...]
    outcome: str  # "ok", "oom", "failed"


@dataclass
class Faults:
    oom_above: int | None = None  # batches larger than this run out of memory
    hold_after_opening: bool = False  # a batch that sends an opening ahead waits after it until `release()`
    batches: list[BatchRecord] = field(default_factory=list)
    held: threading.Event = field(default_factory=threading.Event)  # set while a HOLD batch waits
    _gate: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self._gate.set()

    def loader(self, spec: ModelSpec) -> LoadedModel:
        loaded = load_model(spec)
        return LoadedModel(_FaultyRunner(loaded.runner, self), loaded.make_request)

    def run(self, runner: Any, requests: Any, on_partial: Any = None, opening_share: float | None = None) -> Any:
        phonemes = tuple(r.phonemes for r in requests)
        if any(HOLD in p for p in phonemes):
            self.held.set()
            self._gate.wait(30)
        if any(KILL in p for p in phonemes):
            self.batches.append(BatchRecord(phonemes, "killed"))
            raise EngineKilled
        if self.oom_above is not None and len(requests) > self.oom_above:
            self.batches.append(BatchRecord(phonemes, "oom"))
            raise OutOfMemoryError(f"CUDA out of memory (injected above {self.oom_above} items)")
        if any(FAIL in p for p in phonemes):
            self.batches.append(BatchRecord(phonemes, "failed"))
            raise RuntimeError("injected model failure")
        if self.hold_after_opening and on_partial is not None:
            send_opening = on_partial

            def on_partial(index: int, result: Any) -> None:
                send_opening(index, result)
                self.held.set()
                self._gate.wait(30)

        results = runner.synthesize(requests, on_partial, opening_share)
        self.batches.append(BatchRecord(phonemes, "ok"))
        return results


class _FaultyRunner:
    def __init__(self, runner: Any, faults: Faults) -> None:
        self._runner = runner
        self._faults = faults

    def __getattr__(self, name: str) -> Any:  # everything but `synthesize` is the real runner's
        return getattr(self._runner, name)

    def synthesize(self, requests: Any, on_partial: Any = None, opening_share: float | None = None) -> Any:
        return self._faults.run(self._runner, requests, on_partial, opening_share)
