"""The decoder's fused AdaIN + Snake kernel (rt_server/model/kernels.py): eager, compiled and the unfused path
in the reference's order compute the same function; masked items compute what they compute alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rt_server.model.kernels import adain_act_eager, adain_act_reference, compiled_adain_act
from rt_server.model.layers import AdaIN1d, sequence_mask, snake
from rt_server.model.runner import tiny_model


def _inputs(batch: int, channels: int, length: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, length, generator=gen) * 2.0 + 0.5
    scale = 1 + 0.3 * torch.randn(batch, channels, 1, generator=gen)
    shift = 0.3 * torch.randn(batch, channels, 1, generator=gen)
    alpha = 0.5 + torch.rand(1, channels, 1, generator=gen)
    return x, scale, shift, alpha


def _unfused(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """Instance norm, affine and Snake as separate float64 operations (the reference's order)."""
    x = x.double()
    y = torch.nn.functional.instance_norm(x, eps=1e-5) * scale.double() + shift.double()
    return y if alpha is None else snake(y, alpha.double())


@pytest.mark.parametrize("with_snake", [True, False])
def test_reference_kernel_equals_the_unfused_operations(with_snake: bool) -> None:
    x, scale, shift, alpha = _inputs(2, 16, 300, seed=1)
    a = alpha if with_snake else None
    got = adain_act_reference(x, None, scale, shift, a)
    torch.testing.assert_close(got.double(), _unfused(x, scale, shift, a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_eager_kernel_equals_the_reference_within_its_dtype(dtype: torch.dtype) -> None:
    x, scale, shift, alpha = _inputs(2, 16, 300, seed=2)
    x = x.to(dtype)
    want = adain_act_reference(x, None, scale, shift, alpha).float()
    got = adain_act_eager(x, None, scale, shift, alpha)
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 0.05  # a few bf16 roundings of values up to about 5
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("kernel", [adain_act_reference, adain_act_eager], ids=["reference", "eager"])
def test_masked_items_compute_what_they_compute_alone(kernel: object) -> None:
    assert callable(kernel)
    x, scale, shift, alpha = _inputs(2, 8, 50, seed=3)
    lengths = torch.tensor([50, 31])
    mask = sequence_mask(lengths, 50)
    x[1, :, 31:] = 1e3  # garbage on the padding must not reach the statistics
    batched = kernel(x, mask, scale, shift, alpha)
    for i, n in enumerate(lengths.tolist()):
        alone = kernel(x[i : i + 1, :, :n], None, scale[i : i + 1], shift[i : i + 1], alpha)
        torch.testing.assert_close(batched[i : i + 1, :, :n], alone, rtol=1e-5, atol=1e-5)
    assert torch.all(batched[1, :, 31:] == 0)


def test_fused_adain_module_equals_its_reference_path() -> None:
    torch.manual_seed(4)
    module = AdaIN1d(style_dim=8, channels=16)
    with torch.no_grad():
        module.norm.weight.uniform_(0.5, 1.5)  # not the identity, so the folding of the affine is exercised
        module.norm.bias.uniform_(-0.5, 0.5)
    x, s = torch.randn(2, 16, 40), torch.randn(2, 8)
    alpha = 0.5 + torch.rand(1, 16, 1)
    mask = sequence_mask(torch.tensor([40, 25]), 40)
    with torch.no_grad():
        want = module(x, s, mask, alpha)
        module.fused = True
        got = module(x, s, mask, alpha)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_kernel_equals_the_reference() -> None:
    """torch.compile (Inductor's C++ backend) of the same function, over dynamic lengths and batch kinds."""
    kernel = compiled_adain_act()
    for batch, length, masked in ((1, 300, False), (1, 517, False), (2, 300, True), (2, 123, False)):
        x, scale, shift, alpha = _inputs(batch, 16, length, seed=length)
        mask = sequence_mask(torch.tensor([length, length - 40])[:batch], length) if masked else None
        for dtype in (torch.bfloat16, torch.float32):
            with torch.inference_mode():
                got = kernel(x.to(dtype), mask, scale, shift, alpha)
            want = adain_act_reference(x.to(dtype), mask, scale, shift, alpha)
            assert got.dtype == dtype
            tolerance = 1e-5 if dtype == torch.float32 else 0.05
            torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.slow
def test_compiled_kernels_in_the_model_keep_durations_and_audio() -> None:
    eager = tiny_model(seed=0)
    eager.set_precision("bf16")
    compiled = tiny_model(seed=0)
    compiled.set_precision("bf16")
    assert compiled.compile_kernels() is True
    style = torch.randn(1, 256, generator=torch.Generator().manual_seed(7)) * 0.15
    for phonemes in ("həlˈO wˈɜɹld.", "ðə kwˈɪk bɹˈWn fˈɑks."):
        ids = torch.tensor([eager.tokenize(phonemes)])
        a_eager, d_eager = eager.forward_with_tokens(ids, style, noise=False)
        a_comp, d_comp = compiled.forward_with_tokens(ids, style, noise=False)
        assert torch.equal(d_eager, d_comp)  # durations are computed before the decoder, in float32
        error = float((a_comp - a_eager).abs().max()) / float(a_eager.abs().max())
        assert error < 0.05, f"{phonemes!r}: compiled kernels differ from eager by {100 * error:.1f} % of peak"
    assert compiled.compile_kernels(False) is False  # back to eager
    assert compiled.compile_kernels() is True
    compiled.set_precision("bf16")  # refolds the weights: compiled code is dropped until compiled again
    assert all(m.kernel is adain_act_eager for m in compiled.modules() if isinstance(m, AdaIN1d))


def test_fp32_does_not_use_compiled_kernels() -> None:
    model = tiny_model(seed=0)
    assert model.compile_kernels() is False


@pytest.mark.slow
def test_a_machine_that_cannot_compile_falls_back_to_eager(tmp_path: object) -> None:
    """With no working C++ compiler (Inductor's is pointed at /bin/false and its cache is empty), the model logs
    why and keeps serving with eager kernels instead of failing."""
    script = textwrap.dedent(
        """
        import logging, torch._inductor.config as config
        logging.basicConfig(level=logging.WARNING)
        config.cpp.cxx = ("/bin/false",)
        from rt_server.model.runner import tiny_model
        model = tiny_model(seed=0)
        model.set_precision("bf16")
        print("compiled:", model.compile_kernels())
        print("samples:", model("hˈɛlO", __import__("torch").zeros(1, 256), noise=False).numel())
        """
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compiled: False" in done.stdout
    assert "samples: " in done.stdout and "samples: 0" not in done.stdout
    assert "compiled kernels unavailable, using eager ones" in done.stderr


def test_a_failing_compiled_kernel_is_replaced_by_the_eager_one(caplog: pytest.LogCaptureFixture) -> None:
    """A compiled kernel that raises in the middle of serving (an input kind it cannot compile) must not fail
    the request: the module logs it, answers with the eager kernel, and keeps that one."""
    torch.manual_seed(5)
    module = AdaIN1d(style_dim=8, channels=16)
    module.fused = True
    calls = []

    def broken(*args: object) -> torch.Tensor:
        calls.append(args)
        raise RuntimeError("cannot compile this input kind")

    module.kernel = broken
    x, s, alpha = torch.randn(1, 16, 40), torch.randn(1, 8), 0.5 + torch.rand(1, 16, 1)
    with torch.no_grad():
        got = module(x, s, None, alpha)
        assert module.kernel is adain_act_eager
        want = module(x, s, None, alpha)
    torch.testing.assert_close(got, want)
    assert len(calls) == 1
    assert "compiled AdaIN kernel failed" in caplog.text
