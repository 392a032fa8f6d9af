"""Reading and writing checkpoints in the published Kokoro v1.0 format, with safe deserialisation only.

The published `kokoro-v1_0.pth` is `torch.save` of a dict with five sections (`bert`, `bert_encoder`,
`predictor`, `text_encoder`, `decoder`), each a state dict whose keys start with `module.` (DataParallel).
Weight norm is stored as `weight_g`/`weight_v`; `parametrizations.weight.original0/1` (newer torch) is accepted.
A `.safetensors` file holds the same tensors flattened as `<section>.<key>`.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

SECTIONS = ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")
_PREFIX = "module."
_PARAMETRIZATION_NAMES = {
    "parametrizations.weight.original0": "weight_g",
    "parametrizations.weight.original1": "weight_v",
}

Checkpoint = dict[str, dict[str, Tensor]]


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not match the model's parameters exactly."""


def normalise_key(key: str) -> str:
    """Strip the DataParallel prefix and map parametrization names onto weight_g/weight_v."""
    if key.startswith(_PREFIX):
        key = key[len(_PREFIX) :]
    for new, old in _PARAMETRIZATION_NAMES.items():
        if key.endswith(new):
            return key[: -len(new)] + old
    return key


def _check_sections(raw: object, source: str) -> Checkpoint:
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source}: expected a dict of sections {SECTIONS}, got {type(raw).__name__}")
    missing = [s for s in SECTIONS if s not in raw]
    unexpected = [str(s) for s in raw if s not in SECTIONS]
    if missing or unexpected:
        raise CheckpointError(f"{source}: sections missing {missing}, unexpected {unexpected}")
    out: Checkpoint = {}
    for section in SECTIONS:
        state = raw[section]
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{source}: section {section!r} is not a state dict")
        tensors: dict[str, Tensor] = {}
        for key, value in state.items():
            if not isinstance(value, Tensor):
                raise CheckpointError(f"{source}: {section}.{key} is not a tensor")
            name = normalise_key(str(key))
            if name in tensors:
                raise CheckpointError(f"{source}: {section}.{name} appears twice")
            tensors[name] = value
        out[section] = tensors
    return out


def safe_torch_load(path: Path) -> object:
    """`torch.load` with `weights_only=True`: tensors and plain containers only; a pickle that would run code
    raises `pickle.UnpicklingError` instead of running it."""
    with warnings.catch_warnings():
        # Legacy (non-zip) files warn about their pickle protocol; the weights-only unpickler decides.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a `.pth` (torch.load with weights_only=True: no code from the file ever runs) or `.safetensors`.

    Keys come back normalised: no `module.` prefix, weight norm as `weight_g`/`weight_v`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        grouped: dict[str, dict[str, Tensor]] = {}
        for key, value in flat.items():
            section, _, rest = key.partition(".")
            grouped.setdefault(section, {})[rest] = value
        return _check_sections(grouped, str(path))
    try:
        raw = safe_torch_load(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint (weights-only load failed: "
            f"{str(exc).splitlines()[0]})"
        ) from exc
    return _check_sections(raw, str(path))


def save_checkpoint(state: Mapping[str, Mapping[str, Tensor]], path: str | Path) -> None:
    """Write the published format: `.pth` with `module.`-prefixed keys, or flat `.safetensors`."""
    path = Path(path)
    checked = _check_sections(state, "state")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"{s}.{k}": v.contiguous() for s, sd in checked.items() for k, v in sd.items()}
        save_file(flat, str(path))
        return
    published = {s: {_PREFIX + k: v for k, v in sd.items()} for s, sd in checked.items()}
    torch.save(published, path)
