"""Shared fixtures. Heavy objects are session-scoped: the machine has two cores."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_VOICES = SHARED_DIR / "voices"


@pytest.fixture(scope="session")
def shared_voices_dir() -> Path:
    """The real English voice packs in ../shared/voices (never copied into the repo); skip when absent."""
    if not SHARED_VOICES.is_dir() or not any(SHARED_VOICES.glob("*.bin")):
        pytest.skip("../shared/voices is not available")
    return SHARED_VOICES
