"""Crafted hostile files for the safe-deserialisation tests."""

from __future__ import annotations

import os
import pickle
from pathlib import Path


class _Exploit:
    """Pickles to a call of os.system: what a malicious checkpoint or voice file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def write_code_pickle(path: Path, marker: Path, *, wrap: bool = False) -> None:
    """A pickle whose loading would run `touch marker` (as a checkpoint section when `wrap`)."""
    payload: object = {"bert": _Exploit(marker)} if wrap else _Exploit(marker)
    with path.open("wb") as f:
        pickle.dump(payload, f)
