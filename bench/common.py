"""What the benchmark scripts share: the model they measure."""

from __future__ import annotations

import torch

from rt_server.model.kmodel import KModel
from rt_server.model.runner import make_speechlike


def load_model(weights: str | None, device: str, precision: str) -> KModel:
    """The given checkpoint; else the imported default weights when they exist; else random weights made
    speech-like (durations and F0 in speech ranges: the cost of a pass depends only on the lengths)."""
    if weights is not None:
        return KModel(None, weights, device=device, precision=precision)
    try:
        from rt_server.weights import WeightPaths, default_home

        paths = WeightPaths.in_home(default_home())
        if paths.checkpoint.is_file():
            return KModel(paths.config, paths.checkpoint, device=device, precision=precision)
    except ImportError:
        pass
    torch.manual_seed(0)
    model = KModel(device=device, precision=precision)
    make_speechlike(model)
    return model
