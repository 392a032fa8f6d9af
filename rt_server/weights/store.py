"""The weights store: a directory holding an official-format checkpoint, its config and voice packs.

Layout of `$RT_SERVER_HOME` (default: the platform's user cache dir + `/rt_server`):

    kokoro-v1_0-int8dq.pth   torch.save of {bert, bert_encoder, predictor, text_encoder, decoder} state dicts
    config.json              the Kokoro v1.0 config
    voices/<name>.pt         float32 [510, 1, 256] voice packs
    manifest.json            written last: what was imported, from which digest, with what coverage

Every file is written to a temporary file in the same directory and renamed into place, so a reader never sees
a half-written file, and two processes importing at once both end with complete, identical files. The manifest
is written last, so its presence means the import finished.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ENV_HOME = "RT_SERVER_HOME"
CHECKPOINT_NAME = "kokoro-v1_0-int8dq.pth"
CONFIG_NAME = "config.json"
VOICES_DIRNAME = "voices"
MANIFEST_NAME = "manifest.json"
# Bump when the converter's output changes, so stores written by an older version are re-imported.
STORE_FORMAT_VERSION = 1


def platform_cache_dir() -> Path:
    """The user cache directory by platform convention: XDG (Linux), Library/Caches (macOS), LOCALAPPDATA."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        return Path(base) if base else Path.home() / "AppData" / "Local"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"


def default_home() -> Path:
    """`$RT_SERVER_HOME` if set, else `<user cache dir>/rt_server`."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    return platform_cache_dir() / "rt_server"


@dataclass(frozen=True)
class WeightPaths:
    """Where a complete set of weights lives: checkpoint, config and voices directory."""

    checkpoint: Path
    config: Path
    voices_dir: Path
    home: Path | None = None  # the store these came from, if any

    @classmethod
    def in_home(cls, home: Path) -> WeightPaths:
        return cls(
            checkpoint=home / CHECKPOINT_NAME,
            config=home / CONFIG_NAME,
            voices_dir=home / VOICES_DIRNAME,
            home=home,
        )

    @property
    def manifest(self) -> Path:
        if self.home is None:
            raise ValueError("weights that are not in a store have no manifest")
        return self.home / MANIFEST_NAME

    def voice_files(self) -> list[Path]:
        return sorted(self.voices_dir.glob("*.pt"))


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Create `path` through `write(file)` on a temporary sibling, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the store is ordinary readable data
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(f: IO[bytes]) -> None:
        f.write(data)

    atomic_write(path, write)


def atomic_write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def read_manifest(paths: WeightPaths) -> dict[str, Any] | None:
    """The store's manifest, or None when there is none (or it is unreadable)."""
    try:
        raw = json.loads(paths.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def is_complete(paths: WeightPaths, source_sha256: str) -> bool:
    """True when the store holds a finished import of the current format from the given source digest."""
    manifest = read_manifest(paths)
    if manifest is None:
        return False
    if manifest.get("format_version") != STORE_FORMAT_VERSION or manifest.get("source_sha256") != source_sha256:
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    assert paths.home is not None
    for rel, size in files.items():
        file = paths.home / rel
        if not file.is_file() or file.stat().st_size != size:
            return False
    return True
