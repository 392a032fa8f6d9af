"""Voice packs: style vectors [510, 256] indexed by utterance length, loaded safely, blended by weight.

Formats: `.pt` (a float tensor [510, 1, 256], loaded with weights_only=True), `.bin` (raw little-endian float32,
510 x 256, as kokoro.js ships them) and `.npz` (several packs, one array per voice name).
Voice names that come from users are looked up in the library; they never become file paths.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from rt_server.model.checkpoint import safe_torch_load
from rt_server.model.config import MAX_PHONEMES

STYLE_DIM = 256  # 128 acoustic (decoder) + 128 prosody (predictor)
PACK_ROWS = MAX_PHONEMES  # one style row per utterance length 1..510
VOICE_SUFFIXES = (".pt", ".bin", ".npz")
_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
MAX_BLEND_PARTS = 8


class VoiceError(ValueError):
    """A voice pack is malformed, or a voice name or blend spec is unknown or invalid."""


def _validated(array: np.ndarray, source: str) -> np.ndarray:
    if array.shape == (PACK_ROWS, 1, STYLE_DIM):
        array = array.reshape(PACK_ROWS, STYLE_DIM)
    if array.shape != (PACK_ROWS, STYLE_DIM):
        raise VoiceError(f"{source}: voice pack must be [{PACK_ROWS}, 1, {STYLE_DIM}], got {list(array.shape)}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise VoiceError(f"{source}: voice pack holds non-finite values")
    return array


def load_voice_file(path: str | Path) -> dict[str, np.ndarray]:
    """Load the packs of one file: {name: [510, 256] float32}. A `.npz` may hold several."""
    path = Path(path)
    suffix = path.suffix
    try:
        if suffix == ".pt":
            tensor = safe_torch_load(path)
            if not isinstance(tensor, torch.Tensor):
                raise VoiceError(f"{path}: expected a tensor, got {type(tensor).__name__}")
            return {path.stem: _validated(tensor.float().numpy(), str(path))}
        if suffix == ".bin":
            raw = np.fromfile(path, dtype="<f4")
            if raw.size != PACK_ROWS * STYLE_DIM:
                raise VoiceError(f"{path}: expected {PACK_ROWS * STYLE_DIM} float32 values, got {raw.size}")
            return {path.stem: _validated(raw.reshape(PACK_ROWS, STYLE_DIM), str(path))}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as packs:
                return {name: _validated(packs[name], f"{path}[{name}]") for name in packs.files}
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError) as exc:
        if isinstance(exc, VoiceError):
            raise
        raise VoiceError(f"cannot load voice file {path}: {str(exc).splitlines()[0]}") from exc
    raise VoiceError(f"{path}: unsupported voice file type (use {', '.join(VOICE_SUFFIXES)})")


def style_row(pack: np.ndarray, phonemes: str) -> np.ndarray:
    """The style vector for an utterance: row `len(phonemes) - 1` (code points), as the reference pipeline."""
    if not phonemes:
        raise VoiceError("cannot pick a style row for an empty utterance")
    return pack[min(len(phonemes), PACK_ROWS) - 1]


def parse_blend(spec: str) -> list[tuple[str, float]]:
    """`"af_bella:0.7,af_sky:0.3"` -> [(name, weight)], weights normalised to sum 1. A bare name has weight 1."""
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or any(not p for p in parts):
        raise VoiceError(f"invalid voice spec {spec!r}: expected 'name' or 'name:weight,name:weight'")
    if len(parts) > MAX_BLEND_PARTS:
        raise VoiceError(f"a blend may combine at most {MAX_BLEND_PARTS} voices")
    out: list[tuple[str, float]] = []
    for part in parts:
        name, sep, weight_text = part.partition(":")
        name = name.strip()
        if not _NAME.match(name):
            raise VoiceError(f"invalid voice name {name!r}: letters, digits, '_' and '-' only")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise VoiceError(f"invalid weight {weight_text!r} for voice {name!r}") from None
        if not np.isfinite(weight) or weight <= 0:
            raise VoiceError(f"weight for voice {name!r} must be a positive number, got {weight_text!r}")
        out.append((name, weight))
    if len({n for n, _ in out}) != len(out):
        raise VoiceError(f"voice spec {spec!r} names a voice twice")
    total = sum(w for _, w in out)
    if not np.isfinite(total):
        raise VoiceError(f"voice spec {spec!r}: the weights' sum is not a finite number")
    return [(n, w / total) for n, w in out]


class VoiceLibrary:
    """Named voice packs held in memory. Lookups never touch the file system."""

    def __init__(self, packs: Mapping[str, np.ndarray]) -> None:
        self._packs: dict[str, np.ndarray] = {}
        for name, pack in packs.items():
            if not _NAME.match(name):
                raise VoiceError(f"invalid voice name {name!r}: letters, digits, '_' and '-' only")
            self._packs[name] = _validated(np.asarray(pack), name)

    @classmethod
    def from_directory(cls, directory: str | Path) -> VoiceLibrary:
        """Load every `.pt`, `.bin` and `.npz` pack in `directory` (not recursive)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise VoiceError(f"voice directory not found: {directory}")
        packs: dict[str, np.ndarray] = {}
        for path in sorted(directory.iterdir()):
            if path.suffix in VOICE_SUFFIXES and path.is_file():
                for name, pack in load_voice_file(path).items():
                    if name in packs:
                        raise VoiceError(f"voice {name!r} is defined twice in {directory}")
                    packs[name] = pack
        return cls(packs)

    @classmethod
    def from_files(cls, paths: Iterable[str | Path]) -> VoiceLibrary:
        packs: dict[str, np.ndarray] = {}
        for path in paths:
            packs.update(load_voice_file(path))
        return cls(packs)

    def names(self) -> list[str]:
        return sorted(self._packs)

    def __contains__(self, name: object) -> bool:
        return name in self._packs

    def __len__(self) -> int:
        return len(self._packs)

    def pack(self, spec: str) -> np.ndarray:
        """The pack for a name or a weighted blend (weights normalised). Raises `VoiceError` if unknown."""
        blend = parse_blend(spec)
        unknown = [name for name, _ in blend if name not in self._packs]
        if unknown:
            available = ", ".join(self.names()) or "none"
            raise VoiceError(f"unknown voice {', '.join(map(repr, unknown))}; available: {available}")
        if len(blend) == 1:
            return self._packs[blend[0][0]]
        mixed = sum(self._packs[name].astype(np.float64) * weight for name, weight in blend)
        return np.asarray(mixed, dtype=np.float32)

    def style(self, spec: str, phonemes: str) -> np.ndarray:
        """The [256] style vector for `phonemes` with voice `spec`."""
        return style_row(self.pack(spec), phonemes)
