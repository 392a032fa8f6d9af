"""Pure modules never import torch, starlette or uvicorn: import them in a fresh interpreter with those
blocked."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import rt_server.pipeline

PURE = [
    "rt_server.protocol",
    "rt_server.settings",
    "rt_server.metrics",
    "rt_server.access",
    *(f"rt_server.pipeline.{m.name}" for m in pkgutil.iter_modules(rt_server.pipeline.__path__)),
]
# Not pure, but they must not pull in the model: the engine thread and the client stay torch-free.
TORCH_FREE = ["rt_server.engine", "rt_server.client"]

_SCRIPT = """
import importlib, sys
class Block:
    def __init__(self, names): self.names = names
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ImportError(f"blocked import of {name}")
        return None
sys.meta_path.insert(0, Block(set(sys.argv[1].split(","))))
for module in sys.argv[2:]:
    importlib.import_module(module)
leaked = [m for m in ("torch", "starlette", "uvicorn") if m in sys.modules]
assert not leaked, leaked
print("ok", len(sys.argv) - 2)
"""


def _import_blocked(blocked: str, modules: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT, blocked, *modules], capture_output=True, text=True, timeout=120
    )


def test_pure_modules_import_without_torch_starlette_or_uvicorn() -> None:
    assert "rt_server.pipeline.scheduler" in PURE
    result = _import_blocked("torch,starlette,uvicorn", PURE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ok {len(PURE)}"


def test_engine_and_client_import_without_torch() -> None:
    result = _import_blocked("torch,starlette,uvicorn", TORCH_FREE)
    assert result.returncode == 0, result.stderr


def test_the_blocker_works() -> None:
    result = _import_blocked("numpy", ["rt_server.pipeline.resampler"])
    assert result.returncode != 0
    assert "blocked import of numpy" in result.stderr
