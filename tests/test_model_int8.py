"""Precision int8: the generator's residual convolutions as oneDNN int8 kernels (tiny model, random weights;
the real weights' word error rate and spectra against fp32 are in tests/test_intelligibility.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rt_server.model.kmodel as kmodel
from rt_server.model.istftnet import AdaINResBlock1
from rt_server.model.kernels import U8_ZERO_POINT, quantize_u8
from rt_server.model.kmodel import KModel, resolve_precision
from rt_server.model.layers import Int8Conv1d, WNConv1d, int8_convolution_available
from rt_server.model.runner import tiny_model

pytestmark = pytest.mark.skipif(not int8_convolution_available(), reason="no oneDNN int8 convolution in this torch")

PHONEMES = ("həlˈO wˈɜɹld.", "ðə kwˈɪk bɹˈWn fˈɑks ʤˈʌmps.")


def _style() -> torch.Tensor:
    return torch.randn(256, generator=torch.Generator().manual_seed(7)) * 0.15


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.numpy(), b.numpy())[0, 1])


def test_quantize_keeps_zero_exact_and_the_error_within_half_a_step() -> None:
    x = torch.randn(2, 8, 300, generator=torch.Generator().manual_seed(0)) * 3
    x[:, :, -40:] = 0.0  # padding
    q, scale = quantize_u8(x.to(torch.bfloat16))
    assert q.dtype == torch.uint8 and scale.ndim == 0
    assert bool((q[:, :, -40:] == U8_ZERO_POINT).all())
    back = (q.float() - U8_ZERO_POINT) * scale
    assert float((back - x.bfloat16().float()).abs().max()) <= float(scale) / 2 + 1e-6
    assert int(q.min()) >= 1 and (int(q.max()) == 255 or int(q.min()) == 1)  # the largest magnitude: a full step


@pytest.mark.parametrize(("kernel", "dilation"), [(3, 1), (7, 3), (11, 5)])
def test_int8_convolution_matches_the_float_one_within_quantisation(kernel: int, dilation: int) -> None:
    """Weights per output channel and activations per tensor: about 1 % of the output's scale, at the edges
    (where the convolution reads its zero padding) as in the middle."""
    torch.manual_seed(0)
    conv = WNConv1d(16, 16, kernel, dilation=dilation, padding=(kernel * dilation - dilation) // 2)
    with torch.no_grad():
        conv.weight_v.normal_(0.0, 0.1)
        conv.bias.normal_(0.0, 0.1)  # type: ignore[union-attr]
    x = torch.randn(1, 16, 400)
    q, scale = quantize_u8(x)
    got = Int8Conv1d(conv)(q, scale)
    assert got.dtype == torch.bfloat16 and got.shape == (1, 16, 400)
    with torch.no_grad():
        want = conv((q.float() - U8_ZERO_POINT) * scale)
    error = (got.float() - want).abs() / want.abs().mean()
    reach = (kernel // 2) * dilation
    edges = torch.cat([error[..., :reach], error[..., -reach:]], dim=-1)
    assert float(error.mean()) < 0.02, f"mean error {float(error.mean()):.4f} of the output's scale"
    assert float(edges.mean()) < 2 * float(error[..., reach:-reach].mean()) + 0.005


def test_int8_model_keeps_durations_and_stays_close_to_bf16() -> None:
    bf16, int8 = tiny_model(seed=0), tiny_model(seed=0)
    bf16.set_precision("bf16")
    int8.set_precision("int8")
    blocks = [m for m in int8.decoder.generator.modules() if isinstance(m, AdaINResBlock1)]
    assert blocks and all(b.int8 is not None for b in blocks)
    for phonemes in PHONEMES:
        ids = torch.tensor([bf16.tokenize(phonemes)])
        a, d_a = bf16.forward_with_tokens(ids, _style()[None], noise=False)
        b, d_b = int8.forward_with_tokens(ids, _style()[None], noise=False)
        assert torch.equal(d_a, d_b)
        assert _corr(a, b) > 0.99, f"{phonemes!r}: int8 against bf16 correlation {_corr(a, b):.4f}"
    int8.set_precision("bf16")  # and back: the float path
    assert all(b.int8 is None for b in blocks)
    ids = torch.tensor([bf16.tokenize(PHONEMES[0])])
    torch.testing.assert_close(
        int8.forward_with_tokens(ids, _style()[None], noise=False)[0],
        bf16.forward_with_tokens(ids, _style()[None], noise=False)[0],
    )


def test_int8_batches_are_close_to_single_runs() -> None:
    """The activations' scale is per batch, so a batched item is close to, not equal to, its single run."""
    model = tiny_model(seed=0)
    model.set_precision("int8")
    items = [model.item(p, _style(), noise=False) for p in PHONEMES]
    batched = model.forward_batch(items)
    for item, out in zip(items, batched, strict=True):
        alone = model.forward_batch([item])[0]
        assert torch.equal(out.pred_dur, alone.pred_dur) and len(out.audio) == len(alone.audio)
        assert _corr(out.audio, alone.audio) > 0.99


@pytest.mark.slow
def test_int8_compiles_its_quantiser_with_the_kernels() -> None:
    eager, compiled = tiny_model(seed=0), tiny_model(seed=0)
    eager.set_precision("int8")
    compiled.set_precision("int8")
    assert compiled.compile_kernels() is True
    blocks = [m for m in compiled.decoder.generator.modules() if isinstance(m, AdaINResBlock1)]
    assert all(b.quantize is not quantize_u8 for b in blocks)
    ids = torch.tensor([eager.tokenize(PHONEMES[1])])
    a = eager.forward_with_tokens(ids, _style()[None], noise=False)[0]
    b = compiled.forward_with_tokens(ids, _style()[None], noise=False)[0]
    assert _corr(a, b) > 0.99


def test_auto_picks_int8_where_the_cpu_has_bf16_and_vnni_without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for flags, expected in (
        ({"avx512f", "avx512_bf16", "avx512_vnni"}, "int8"),
        ({"avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"}, "bf16"),  # AMX: bf16 is as fast, cheaper to build
        ({"amx_bf16", "amx_int8"}, "bf16"),
        ({"avx512_bf16"}, "bf16"),
        ({"avx512_vnni"}, "fp32"),  # int8 needs bf16 for the rest of the decoder
        (set(), "fp32"),
    ):
        monkeypatch.setattr(kmodel, "_cpu_flags", lambda flags=flags: set(flags))
        assert resolve_precision("auto", cpu) == expected, flags
    monkeypatch.setattr(kmodel, "_cpu_flags", lambda: {"avx512_bf16", "avx512_vnni"})
    monkeypatch.setattr(kmodel, "int8_convolution_available", lambda: False)
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("int8", cpu) == "int8"  # explicit values pass through


def test_int8_without_the_kernel_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmodel, "int8_convolution_available", lambda: False)
    with pytest.raises(ValueError, match="int8 needs a CPU"):
        KModel(precision="int8")


def test_only_stride_one_ungrouped_convolutions_go_int8() -> None:
    with pytest.raises(ValueError, match="stride-1"):
        Int8Conv1d(WNConv1d(4, 4, 3, stride=2))


def test_int8_on_another_device_is_refused() -> None:
    model = tiny_model(seed=0)
    model.to("meta")
    with pytest.raises(ValueError, match="int8 needs a CPU"):
        model.set_precision("int8")


def test_a_failing_compiled_quantiser_falls_back_to_the_eager_one(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model(seed=0)
    model.set_precision("int8")
    ids = torch.tensor([model.tokenize(PHONEMES[0])])
    want = model.forward_with_tokens(ids, _style()[None], noise=False)[0]

    def broken(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("no compiler")

    blocks = [m for m in model.decoder.generator.modules() if isinstance(m, AdaINResBlock1)]
    for block in blocks:
        block.quantize = broken
    got = model.forward_with_tokens(ids, _style()[None], noise=False)[0]
    torch.testing.assert_close(got, want)
    assert all(block.quantize is quantize_u8 for block in blocks)
    assert "compiled quantiser failed" in caplog.text
