"""The published checkpoint format: round trips, strictness, key spellings and safe deserialisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from crafted import write_code_pickle

from rt_server.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rt_server.model.config import ConfigError, load_config, tiny_config_dict
from rt_server.model.kmodel import KModel
from rt_server.model.runner import tiny_model

HELLO = "həlˈO wˈɜɹld."


@pytest.fixture(scope="module")
def source() -> KModel:
    return tiny_model(seed=3)


def _audio(model: KModel) -> torch.Tensor:
    style = torch.full((1, 256), 0.05)
    return model(HELLO, style, noise=False)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_reproduces_the_model(source: KModel, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ckpt{suffix}"
    save_checkpoint(source.export_weights(), path)
    loaded = KModel(tiny_config_dict(), path)
    assert torch.equal(_audio(loaded), _audio(source))


def test_pth_uses_the_published_layout(source: KModel, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    save_checkpoint(source.export_weights(), path)
    raw = torch.load(path, weights_only=True)
    assert sorted(raw) == sorted(["bert", "bert_encoder", "predictor", "text_encoder", "decoder"])
    assert all(k.startswith("module.") for sd in raw.values() for k in sd)
    assert "module.encode.conv1.weight_g" in raw["decoder"]
    assert "module.encode.conv1.weight_v" in raw["decoder"]
    # The published file has no InstanceNorm affine tensors.
    assert not any(".norm.weight" in k for k in raw["decoder"])


def test_keys_without_prefix_and_parametrization_names_load(source: KModel, tmp_path: Path) -> None:
    state = source.export_weights()
    renamed = {
        section: {
            k.replace("weight_g", "parametrizations.weight.original0").replace(
                "weight_v", "parametrizations.weight.original1"
            ): v
            for k, v in sd.items()
        }
        for section, sd in state.items()
    }
    path = tmp_path / "new_names.pth"
    torch.save(renamed, path)  # no module. prefix, newer weight-norm names
    loaded = KModel(tiny_config_dict(), path)
    assert torch.equal(_audio(loaded), _audio(source))


def test_missing_tensor_is_named(source: KModel) -> None:
    state = source.export_weights()
    del state["decoder"]["generator.conv_post.weight_v"]
    with pytest.raises(CheckpointError, match=r"decoder: 1 missing: generator\.conv_post\.weight_v"):
        KModel(tiny_config_dict(), state)


def test_unexpected_tensor_is_named(source: KModel) -> None:
    state = source.export_weights()
    state["predictor"]["lstm.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"predictor: 1 unexpected: lstm\.extra"):
        KModel(tiny_config_dict(), state)


def test_misshaped_tensor_is_named(source: KModel) -> None:
    state = source.export_weights()
    state["bert_encoder"]["weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"bert_encoder: 1 mis-shaped: weight \(3, 3\) !="):
        KModel(tiny_config_dict(), state)


def test_missing_section_is_an_error(source: KModel, tmp_path: Path) -> None:
    state = dict(source.export_weights())
    del state["bert"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"sections missing \['bert'\]"):
        load_checkpoint(path)


def test_instance_norm_affines_are_identity_after_load(source: KModel) -> None:
    loaded = KModel(tiny_config_dict(), source.export_weights())
    norm = loaded.decoder.encode.norm1.norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    write_code_pickle(path, marker, wrap=True)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_config_errors_are_clear(tmp_path: Path) -> None:
    raw = tiny_config_dict()
    del raw["vocab"]
    with pytest.raises(ConfigError, match="missing required field 'vocab'"):
        load_config(raw)
    bad = tiny_config_dict()
    bad["vocab"] = {"ab": 3}
    with pytest.raises(ConfigError, match="exactly one code point"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.json")
