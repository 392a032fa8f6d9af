"""Read the weights out of the int8 Kokoro ONNX export, keyed by the module path of the node that consumes
them.

The export went through onnxruntime's dynamic quantization after its graph optimizer, so most initializers are
anonymous (`onnx::MatMul_6548_3_quantized`, `/encoder/F0.1/Mul_3_output_0_quantized`) and zero-point
initializers are shared between layers. What survives reliably is the *consuming node's name*, which keeps the
PyTorch module path (`/encoder/F0.1/conv1x1/Conv_quant`). This module therefore walks the nodes, not the
initializers:

- MatMulInteger (Linear, int8 [in, out], zero point per column as the node's 4th input; the weight scale is
  the initializer multiplied into the node's output further down), ConvInteger (Conv1d, uint8, per-tensor),
  DynamicQuantizeLSTM (int8 W [2, in, 4H], R [2, H, 4H], scale/zero point per direction as node inputs),
  Gather + DequantizeLinear (embeddings) are dequantized as (q - zero_point) * scale.
- Float ConvTranspose / Conv / MatMul / LayerNormalization nodes give their inputs as they are.
- Parameters with no module of their own (Snake `alpha`s) and layer norms fused into scope-less nodes
  (SkipLayerNormalization, FastGelu) keep their PyTorch names as initializer names; those are used, checked
  against the consuming node's scope where it has one.

Everything returned is float32 numpy in ONNX layout (Linear [in, out], LSTM gates in ONNX order); turning it
into the PyTorch checkpoint layout is `convert.py`'s job. Needs the `onnx` package only (imported lazily).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

Kind = Literal["linear", "conv", "conv_transpose", "lstm", "embedding", "layer_norm", "parameter"]


class GraphFormatError(RuntimeError):
    """The ONNX graph does not have the structure this reader expects (a different export?)."""


@dataclass
class GraphModule:
    """The tensors one module contributes, in ONNX layout.

    `tensors` roles: linear/conv/conv_transpose/embedding: `weight` (+ `bias`); layer_norm: `weight`, `bias`;
    lstm: `W` [2, in, 4H], `R` [2, H, 4H], `B` [2, 8H] (gates i, o, f, c); parameter: the parameter's own
    name.
    """

    scope: str  # dotted module path as in the graph, e.g. "encoder.predictor.F0.1.conv1"
    kind: Kind
    tensors: dict[str, FloatArray] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)  # node names that supplied the tensors (for messages)


_REPEAT_SUFFIX = re.compile(r"_\d+$")


def scope_of(node_name: str) -> str:
    """Module path of a node: `/encoder/text_encoder/cnn.0/cnn.0.0/Conv_quant` ->
    `encoder.text_encoder.cnn.0.0`.

    The last component is the op. A `_N` suffix marks the N-th call of a shared module (ALBERT's one layer
    runs 12 times: `query_7`); no Kokoro module name ends in `_<digits>`, so the suffix is dropped. Children
    of Sequentials are named with the parent's path (`cnn.0/cnn.0.0`); such a component replaces its parent.
    """
    parts = node_name.strip("/").split("/")[:-1]
    out: list[str] = []
    for raw in parts:
        part = _REPEAT_SUFFIX.sub("", raw)
        if out and part.startswith(out[-1] + "."):
            out[-1] = part
        else:
            out.append(part)
    return ".".join(out)


class _Graph:
    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self._to_array = numpy_helper.to_array
        graph = model.graph
        self.nodes: list[Any] = list(graph.node)
        self.initializers: dict[str, Any] = {init.name: init for init in graph.initializer}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        self.producer: dict[str, Any] = {}
        for node in self.nodes:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            for name in node.output:
                self.producer[name] = node
        self._cache: dict[str, npt.NDArray[Any]] = {}

    def is_init(self, name: str) -> bool:
        return name in self.initializers

    def array(self, name: str) -> npt.NDArray[Any]:
        if name not in self._cache:
            if name not in self.initializers:
                raise GraphFormatError(f"expected an initializer named {name!r}")
            self._cache[name] = self._to_array(self.initializers[name])
        return self._cache[name]

    def float_array(self, name: str) -> FloatArray:
        arr = self.array(name)
        if arr.dtype != np.float32:
            raise GraphFormatError(f"initializer {name!r} is {arr.dtype}, expected float32")
        return arr.astype(np.float32, copy=True)

    def only_consumer(self, output: str, node: Any) -> Any:
        consumers = self.consumers.get(output, [])
        if len(consumers) != 1:
            raise GraphFormatError(f"{node.name}: expected one consumer of {output!r}, found {len(consumers)}")
        return consumers[0]


def _dequantize(q: npt.NDArray[Any], zero_point: npt.NDArray[Any], scale: npt.NDArray[Any]) -> FloatArray:
    """(q - zero_point) * scale, with the integer subtraction done exactly."""
    centred = q.astype(np.int32) - zero_point.astype(np.int32)
    return (centred.astype(np.float32) * scale.astype(np.float32)).astype(np.float32)


def _weight_scale(g: _Graph, node: Any) -> tuple[npt.NDArray[Any], Any]:
    """The weight scale of a MatMulInteger/ConvInteger node, and the Mul node that applies it.

    onnxruntime's dynamic quantization casts the int32 result to float and multiplies it by
    `activation_scale * weight_scale` (a Mul node of a DynamicQuantizeLinear output and an initializer); a
    quantized conv bias is added (as int32) before the cast.
    """
    current = node
    for _ in range(4):
        nxt = g.only_consumer(current.output[0], current)
        if nxt.op_type == "Mul":
            other = [x for x in nxt.input if x != current.output[0]]
            if len(other) != 1:
                break
            if g.is_init(other[0]):
                return g.array(other[0]), nxt
            scales_mul = g.producer.get(other[0])
            if scales_mul is None or scales_mul.op_type != "Mul":
                break
            inits = [x for x in scales_mul.input if g.is_init(x)]
            if len(inits) != 1:
                break
            return g.array(inits[0]), nxt
        if nxt.op_type not in ("Add", "Cast"):
            break
        current = nxt
    raise GraphFormatError(f"{node.name}: cannot find the weight scale applied to its output")


def _bias_after(g: _Graph, node: Any, n_out: int) -> FloatArray | None:
    """A float bias added right after `node` (Add or FastGelu with a float [n_out] initializer input)."""
    for consumer in g.consumers.get(node.output[0], []):
        if consumer.op_type not in ("Add", "FastGelu"):
            continue
        for name in consumer.input:
            if name != node.output[0] and g.is_init(name):
                arr = g.array(name)
                if arr.dtype == np.float32 and arr.shape == (n_out,):
                    return arr.astype(np.float32, copy=True)
    return None


def _quantized_conv_bias(g: _Graph, node: Any, n_out: int) -> FloatArray | None:
    """The float bias of a ConvInteger node.

    The quantizer folds the bias in as int32 (`Floor(bias / (activation_scale * weight_scale))`, reshaped and
    added to the integer output). The float original is the first input of that Div; walk up to it.
    """
    consumers = g.consumers.get(node.output[0], [])
    if len(consumers) != 1 or consumers[0].op_type != "Add":
        return None
    add = consumers[0]
    other = [x for x in add.input if x != node.output[0]]
    if len(other) != 1:
        return None
    name = other[0]
    for _ in range(6):
        producer = g.producer.get(name)
        if producer is None:
            return None
        if producer.op_type == "Div":
            bias_name = producer.input[0]
            bias = g.float_array(bias_name)
            if bias.shape != (n_out,):
                raise GraphFormatError(f"{node.name}: bias {bias_name!r} has shape {bias.shape}")
            return bias
        if producer.op_type not in ("Reshape", "Cast", "Floor", "Round"):
            return None
        name = producer.input[0]
    return None


class _Collector:
    def __init__(self) -> None:
        self.modules: dict[str, GraphModule] = {}

    def put(self, scope: str, kind: Kind, role: str, value: FloatArray, source: str) -> None:
        module = self.modules.get(scope)
        if module is None:
            module = self.modules[scope] = GraphModule(scope=scope, kind=kind)
        elif module.kind == "parameter" and kind != "parameter":
            module.kind = kind  # a fused node saw the module's bias before its weight op did
        elif kind != "parameter" and module.kind != kind:
            raise GraphFormatError(f"{source}: module {scope!r} seen as both {module.kind} and {kind}")
        previous = module.tensors.get(role)
        if previous is not None:
            # A shared module called several times (ALBERT) must read the same values each time.
            if previous.shape != value.shape or not np.array_equal(previous, value):
                raise GraphFormatError(f"{source}: {scope}.{role} differs between the nodes that use it")
        else:
            module.tensors[role] = value
        if source not in module.sources:
            module.sources.append(source)


def _matmul_integer(g: _Graph, node: Any, out: _Collector) -> None:
    _, w_name, _, zp_name = node.input
    q = g.array(w_name)
    zero_point = g.array(zp_name)
    scale, scale_mul = _weight_scale(g, node)
    weight = _dequantize(q, zero_point.reshape(1, -1), scale.reshape(1, -1))  # [in, out], per output column
    scope = scope_of(node.name)
    out.put(scope, "linear", "weight", weight, node.name)
    bias = _bias_after(g, scale_mul, weight.shape[1])
    if bias is not None:
        out.put(scope, "linear", "bias", bias, node.name)


def _conv_integer(g: _Graph, node: Any, out: _Collector) -> None:
    w_name, zp_name = node.input[1], node.input[3]
    q = g.array(w_name)
    zero_point = g.array(zp_name)
    scale, _ = _weight_scale(g, node)
    shape = (-1,) + (1,) * (q.ndim - 1)  # per-tensor (scalar) or per output channel
    weight = _dequantize(q, zero_point.reshape(shape), scale.reshape(shape))
    scope = scope_of(node.name)
    out.put(scope, "conv", "weight", weight, node.name)
    bias = _quantized_conv_bias(g, node, weight.shape[0])
    if bias is not None:
        out.put(scope, "conv", "bias", bias, node.name)


def _float_conv(g: _Graph, node: Any, out: _Collector, kind: Kind) -> None:
    scope = scope_of(node.name)
    out.put(scope, kind, "weight", g.float_array(node.input[1]), node.name)
    if len(node.input) > 2 and node.input[2]:
        out.put(scope, kind, "bias", g.float_array(node.input[2]), node.name)


def _float_matmul(g: _Graph, node: Any, out: _Collector) -> None:
    weight = g.float_array(node.input[1])  # [in, out]
    scope = scope_of(node.name)
    out.put(scope, "linear", "weight", weight, node.name)
    bias = _bias_after(g, node, weight.shape[1])
    if bias is not None:
        out.put(scope, "linear", "bias", bias, node.name)


def _lstm(g: _Graph, node: Any, out: _Collector) -> None:
    # DynamicQuantizeLSTM inputs: X, W, R, B, sequence_lens, initial_h, initial_c, P,
    #                             W_scale, W_zero_point, R_scale, R_zero_point.
    attrs = {a.name: a for a in node.attribute}
    if "input_forget" in attrs and attrs["input_forget"].i != 0:
        raise GraphFormatError(f"{node.name}: coupled input/forget gates are not a PyTorch LSTM")
    if len(node.input) > 7 and node.input[7]:
        raise GraphFormatError(f"{node.name}: peephole weights are not a PyTorch LSTM")
    w_q, r_q, b_name = node.input[1], node.input[2], node.input[3]
    w_scale, w_zp, r_scale, r_zp = node.input[8], node.input[9], node.input[10], node.input[11]
    per_dir = (-1, 1, 1)
    w = _dequantize(g.array(w_q), g.array(w_zp).reshape(per_dir), g.array(w_scale).reshape(per_dir))
    r = _dequantize(g.array(r_q), g.array(r_zp).reshape(per_dir), g.array(r_scale).reshape(per_dir))
    scope = scope_of(node.name)
    out.put(scope, "lstm", "W", w, node.name)
    out.put(scope, "lstm", "R", r, node.name)
    out.put(scope, "lstm", "B", g.float_array(b_name), node.name)


def _quantized_gather(g: _Graph, node: Any, out: _Collector) -> None:
    deq = g.only_consumer(node.output[0], node)
    if deq.op_type != "DequantizeLinear":
        raise GraphFormatError(f"{node.name}: quantized Gather not followed by DequantizeLinear")
    weight = _dequantize(g.array(node.input[0]), g.array(deq.input[2]), g.array(deq.input[1]))
    out.put(scope_of(node.name), "embedding", "weight", weight, node.name)


def _layer_norm(g: _Graph, node: Any, out: _Collector) -> None:
    gamma, beta = node.input[1], node.input[2]
    if not (g.is_init(gamma) and g.is_init(beta)):
        raise GraphFormatError(f"{node.name}: LayerNormalization without constant gamma/beta")
    out.put(scope_of(node.name), "layer_norm", "weight", g.float_array(gamma), node.name)
    out.put(scope_of(node.name), "layer_norm", "bias", g.float_array(beta), node.name)


def _named_parameters(g: _Graph, node: Any, names: Iterable[str], out: _Collector) -> None:
    """Float initializers that keep their PyTorch names (Snake alphas, LN params inside fused nodes)."""
    scope = scope_of(node.name)
    for name in names:
        if not g.is_init(name) or name.startswith(("/", "onnx::")):
            continue
        arr = g.array(name)
        if arr.dtype != np.float32:
            continue
        if scope and not name.startswith(scope + "."):
            raise GraphFormatError(f"{node.name}: parameter {name!r} is outside the node's scope {scope!r}")
        owner, _, param = name.rpartition(".")
        if scope:  # keep the multi-part parameter name (alpha1.0) under the consuming node's module
            owner, param = scope, name[len(scope) + 1 :]
        out.put(owner, "parameter", param, arr.astype(np.float32, copy=True), node.name)


def _snake_alphas(g: _Graph, node: Any, out: _Collector) -> None:
    names = [x for x in node.input if g.is_init(x) and re.search(r"\.alpha[12]\.\d+$", x)]
    _named_parameters(g, node, names, out)


def read_graph_modules(model: Any) -> dict[str, GraphModule]:
    """All weight-carrying modules of the loaded ONNX `model` (an `onnx.ModelProto`), keyed by scope."""
    g = _Graph(model)
    out = _Collector()
    for node in g.nodes:
        op = node.op_type
        if op == "MatMulInteger" and g.is_init(node.input[1]):
            _matmul_integer(g, node, out)
        elif op == "ConvInteger" and g.is_init(node.input[1]):
            _conv_integer(g, node, out)
        elif op == "DynamicQuantizeLSTM":
            _lstm(g, node, out)
        elif op == "Gather" and g.is_init(node.input[0]) and g.array(node.input[0]).dtype in (np.int8, np.uint8):
            _quantized_gather(g, node, out)
        elif op == "ConvTranspose" and g.is_init(node.input[1]):
            _float_conv(g, node, out, "conv_transpose")
        elif op == "Conv" and g.is_init(node.input[1]):
            _float_conv(g, node, out, "conv")
        elif op == "MatMul" and g.is_init(node.input[1]):
            _float_matmul(g, node, out)
        elif op == "LayerNormalization":
            _layer_norm(g, node, out)
        elif op in ("SkipLayerNormalization", "FastGelu"):
            _named_parameters(g, node, node.input, out)
        elif op == "Mul":
            _snake_alphas(g, node, out)
    return out.modules
