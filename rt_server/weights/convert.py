"""Turn the modules read from the int8 ONNX graph into an official-format Kokoro v1.0 checkpoint.

Input: `read_graph_modules` output (float32, ONNX layout). Output: the five state dicts of `kokoro-v1_0.pth`
(`module.` prefix, `weight_g`/`weight_v`), every key and shape checked against `official_keys.model_layout`.

The transforms, each the inverse of something the export did:
- Linear: ONNX keeps [in, out]; PyTorch wants [out, in].
- Weight norm was folded into the weight (W = g * v / ||v||). Rebuild v = W, g = ||W|| (over every dim but 0),
  which reproduces W. Channels that per-tensor int8 rounding made entirely zero get g = 0, v = 1 (v = 0 would
  make weight norm divide 0 by 0).
- LSTM: W [2, in, 4H] / R [2, H, 4H] / B [2, 8H] (input then hidden biases) with gates in ONNX order (i, o, f,
  c) become weight_ih_l0[_reverse] [4H, in] etc. in PyTorch order (i, f, g, o).
- Absent from the graph and set to defaults: the ALBERT pooler (the model computes it but never uses it;
  zeros) and the AdaIN InstanceNorm affine tensors (not in the official file either; the model's identity init
  is exact).

Pure numpy; no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rt_server.weights.official_keys import (
    KEY_PREFIX,
    TOP_LEVEL_KEYS,
    ModelLayout,
    Shape,
    count_tensors,
    count_values,
)
from rt_server.weights.onnx_graph import FloatArray, GraphModule

StateDicts = dict[str, dict[str, FloatArray]]

# Graph scopes that hold no model parameter: the export's conv-based inverse STFT basis (derived from
# n_fft/hop).
_NON_PARAMETER_SCOPES = ("decoder.decoder.generator.istft",)
# The predictor's top-level submodules that the export scoped directly under `encoder` (F0Ntrain's blocks).
_PREDICTOR_ROOTS = frozenset({"F0", "N", "shared", "F0_proj", "N_proj"})
# Keys the graph does not carry, and the value they get.
_POOLER_PREFIX = KEY_PREFIX + "pooler."


class ConversionError(RuntimeError):
    """A tensor the checkpoint needs is missing from the graph, or the graph holds one that fits nowhere."""


@dataclass(frozen=True)
class Coverage:
    """Where each tensor of the written checkpoint (and of the model) came from."""

    checkpoint_tensors: int
    checkpoint_values: int
    graph_tensors: int
    graph_values: int
    default_keys: tuple[str, ...]  # checkpoint keys set to defaults (the ALBERT pooler)
    default_values: int
    instance_norm_affine_tensors: int  # model tensors the checkpoint format omits (identity)
    instance_norm_affine_values: int
    zero_channels: int  # weight-norm channels rebuilt as g = 0, v = 1
    zero_channel_convs: int
    ignored: tuple[str, ...] = field(default=())  # graph items that are not model parameters, with the reason

    @property
    def model_tensors(self) -> int:
        return self.checkpoint_tensors + self.instance_norm_affine_tensors

    @property
    def model_values(self) -> int:
        return self.checkpoint_values + self.instance_norm_affine_values

    def lines(self) -> list[str]:
        pct_ckpt = 100.0 * self.graph_values / self.checkpoint_values
        pct_model = 100.0 * self.graph_values / self.model_values
        model_defaults = self.model_tensors - self.graph_tensors
        return [
            f"checkpoint: {self.checkpoint_tensors} tensors, {self.checkpoint_values:,} values",
            f"  from the graph: {self.graph_tensors} tensors, {self.graph_values:,} values ({pct_ckpt:.2f} %)",
            f"  set to defaults: {len(self.default_keys)} tensors, {self.default_values:,} values "
            f"({', '.join(self.default_keys)} = 0; unused by the model)",
            f"model (checkpoint + {self.instance_norm_affine_tensors} InstanceNorm affine tensors the format "
            f"omits): {self.model_tensors} tensors, {self.model_values:,} values",
            f"  from the graph: {self.graph_tensors} of {self.model_tensors} tensors, "
            f"{pct_model:.2f} % of values; defaults: {model_defaults} tensors "
            f"({len(self.default_keys)} pooler + "
            f"{self.instance_norm_affine_tensors} InstanceNorm affine = identity)",
            f"weight norm: {self.zero_channels} all-zero output channels in {self.zero_channel_convs} convs "
            "rebuilt as g = 0, v = 1",
            *(f"ignored graph item: {item}" for item in self.ignored),
        ]


@dataclass(frozen=True)
class ConvertedCheckpoint:
    state: StateDicts  # top-level key -> state-dict key -> float32 array
    coverage: Coverage


def route_scope(scope: str) -> tuple[str, str] | None:
    """Graph scope -> (top-level checkpoint key, state-dict key prefix with `module.`), or None."""
    if scope.startswith("decoder.decoder."):
        return "decoder", KEY_PREFIX + scope[len("decoder.decoder.") :] + "."
    if not scope.startswith("encoder."):
        return None
    rest = scope[len("encoder.") :]
    head, _, tail = rest.partition(".")
    if head in ("bert", "bert_encoder", "predictor", "text_encoder"):
        return head, KEY_PREFIX + (tail + "." if tail else "")
    if head in _PREDICTOR_ROOTS:
        return "predictor", KEY_PREFIX + rest + "."
    return None


def weight_norm_from_folded(weight: FloatArray) -> tuple[FloatArray, FloatArray, int]:
    """(g, v, number of all-zero channels) such that g * v / ||v|| == weight, norm over all dims but 0."""
    flat = weight.reshape(weight.shape[0], -1).astype(np.float64)
    norm = np.sqrt((flat * flat).sum(axis=1))
    zero = norm == 0.0
    g = norm.astype(np.float32).reshape((weight.shape[0],) + (1,) * (weight.ndim - 1))
    v = weight.astype(np.float32, copy=True)
    v[zero] = 1.0
    return g, v, int(zero.sum())


def onnx_gates_to_torch(x: FloatArray, hidden: int) -> FloatArray:
    """Reorder the 4H gate blocks of axis 0 from ONNX (i, o, f, c) to PyTorch (i, f, g, o)."""
    if x.shape[0] != 4 * hidden:
        raise ConversionError(f"gate axis has {x.shape[0]} rows, expected 4 x {hidden}")
    i, o, f, c = (x[k * hidden : (k + 1) * hidden] for k in range(4))
    return np.ascontiguousarray(np.concatenate([i, f, c, o], axis=0), dtype=np.float32)


def lstm_to_torch(w: FloatArray, r: FloatArray, b: FloatArray) -> dict[str, FloatArray]:
    """ONNX (DynamicQuantize)LSTM W [D, in, 4H], R [D, H, 4H], B [D, 8H] -> PyTorch LSTM parameters."""
    hidden = r.shape[1]
    out: dict[str, FloatArray] = {}
    for direction, suffix in enumerate(("", "_reverse")[: w.shape[0]]):
        out[f"weight_ih_l0{suffix}"] = onnx_gates_to_torch(w[direction].T, hidden)
        out[f"weight_hh_l0{suffix}"] = onnx_gates_to_torch(r[direction].T, hidden)
        out[f"bias_ih_l0{suffix}"] = onnx_gates_to_torch(b[direction, : 4 * hidden], hidden)
        out[f"bias_hh_l0{suffix}"] = onnx_gates_to_torch(b[direction, 4 * hidden :], hidden)
    return out


class _Writer:
    def __init__(self, layout: ModelLayout) -> None:
        self.expected = layout.checkpoint
        self.state: StateDicts = {top: {} for top in TOP_LEVEL_KEYS}
        self.sources: dict[tuple[str, str], str] = {}
        self.zero_channels = 0
        self.zero_channel_convs = 0

    def expects(self, top: str, key: str) -> bool:
        return key in self.expected[top]

    def put(self, top: str, key: str, value: FloatArray, source: str) -> None:
        shape: Shape | None = self.expected[top].get(key)
        if shape is None:
            raise ConversionError(f"graph tensor from {source} maps to {top}/{key}, which the checkpoint lacks")
        if tuple(value.shape) != shape:
            raise ConversionError(f"{top}/{key} from {source}: shape {tuple(value.shape)}, expected {shape}")
        if key in self.state[top]:
            raise ConversionError(f"{top}/{key} supplied twice ({self.sources[(top, key)]} and {source})")
        self.state[top][key] = np.ascontiguousarray(value, dtype=np.float32)
        self.sources[(top, key)] = source

    def put_weight_maybe_normed(self, top: str, prefix: str, weight: FloatArray, source: str) -> None:
        if self.expects(top, prefix + "weight_g"):
            g, v, n_zero = weight_norm_from_folded(weight)
            self.put(top, prefix + "weight_g", g, source)
            self.put(top, prefix + "weight_v", v, source)
            if n_zero:
                self.zero_channels += n_zero
                self.zero_channel_convs += 1
        else:
            self.put(top, prefix + "weight", weight, source)


def _is_identity_norm(module: GraphModule) -> bool:
    weight, bias = module.tensors.get("weight"), module.tensors.get("bias")
    return (
        weight is not None
        and bias is not None
        and len(module.tensors) == 2
        and bool(np.all(weight == 1.0))
        and bool(np.all(bias == 0.0))
    )


def _write_module(w: _Writer, module: GraphModule, ignored: list[str]) -> None:
    source = module.sources[0] if module.sources else module.scope
    if module.scope.startswith(_NON_PARAMETER_SCOPES):
        ignored.append(f"{module.scope} ({module.kind}; the export's inverse-STFT basis, not a parameter)")
        return
    route = route_scope(module.scope)
    if route is None:
        raise ConversionError(f"graph module {module.scope!r} (from {source}) has no place in the checkpoint")
    top, prefix = route
    t = module.tensors
    if module.kind == "linear":
        w.put(top, prefix + "weight", np.ascontiguousarray(t["weight"].T), source)
        if "bias" in t:
            w.put(top, prefix + "bias", t["bias"], source)
    elif module.kind in ("conv", "conv_transpose"):
        w.put_weight_maybe_normed(top, prefix, t["weight"], source)
        if "bias" in t:
            w.put(top, prefix + "bias", t["bias"], source)
    elif module.kind == "lstm":
        for name, value in lstm_to_torch(t["W"], t["R"], t["B"]).items():
            w.put(top, prefix + name, value, source)
    elif module.kind == "embedding":
        w.put(top, prefix + "weight", t["weight"], source)
    elif module.kind in ("layer_norm", "parameter"):
        if module.kind == "layer_norm" and not w.expects(top, prefix + "weight"):
            if w.expects(top, prefix + "gamma"):  # TextEncoder's own LayerNorm names its params gamma/beta
                w.put(top, prefix + "gamma", t["weight"], source)
                w.put(top, prefix + "beta", t["bias"], source)
                return
            if _is_identity_norm(module):  # AdaLayerNorm's affine-free layer_norm, exported with 1/0 constants
                ignored.append(f"{module.scope} (parameter-free layer norm: constant weight 1, bias 0)")
                return
        for role, value in t.items():
            w.put(top, prefix + role, value, source)
    else:  # pragma: no cover - Kind is a closed Literal
        raise ConversionError(f"unknown module kind {module.kind!r}")


def convert_graph_modules(modules: Mapping[str, GraphModule], layout: ModelLayout) -> ConvertedCheckpoint:
    """Map graph modules onto the checkpoint layout; fail on anything missing, surplus or misshapen."""
    w = _Writer(layout)
    ignored: list[str] = []
    for scope in sorted(modules):
        _write_module(w, modules[scope], ignored)
    graph_tensors = sum(len(keys) for keys in w.state.values())
    graph_values = sum(int(v.size) for keys in w.state.values() for v in keys.values())
    defaults: list[str] = []
    for top, key, shape in layout.checkpoint_items():
        if key in w.state[top]:
            continue
        if top == "bert" and key.startswith(_POOLER_PREFIX):
            w.state[top][key] = np.zeros(shape, dtype=np.float32)
            defaults.append(f"{top}/{key}")
    missing = [f"{top}/{key}" for top, key, _ in layout.checkpoint_items() if key not in w.state[top]]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ConversionError(f"{len(missing)} checkpoint tensors not found in the graph: {shown}")
    default_values = sum(int(np.prod(layout.checkpoint[k.split("/")[0]][k.split("/", 1)[1]])) for k in defaults)
    coverage = Coverage(
        checkpoint_tensors=count_tensors(layout.checkpoint),
        checkpoint_values=count_values(layout.checkpoint),
        graph_tensors=graph_tensors,
        graph_values=graph_values,
        default_keys=tuple(defaults),
        default_values=default_values,
        instance_norm_affine_tensors=count_tensors(layout.instance_norm_affine),
        instance_norm_affine_values=count_values(layout.instance_norm_affine),
        zero_channels=w.zero_channels,
        zero_channel_convs=w.zero_channel_convs,
        ignored=tuple(ignored),
    )
    # Keep each state dict in the layout's key order, like a saved module.
    ordered: StateDicts = {top: {k: w.state[top][k] for k in layout.checkpoint[top]} for top in TOP_LEVEL_KEYS}
    return ConvertedCheckpoint(state=ordered, coverage=coverage)


def convert_onnx_model(model: Any, config: Mapping[str, Any]) -> ConvertedCheckpoint:
    """Read an `onnx.ModelProto` of the Kokoro int8 export and convert it for the given config dict."""
    from rt_server.weights.official_keys import model_layout
    from rt_server.weights.onnx_graph import read_graph_modules

    return convert_graph_modules(read_graph_modules(model), model_layout(config))
