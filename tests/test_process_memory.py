"""Resident memory and handing free heap back, as the soak and /debug/state?gc=1 read them."""

from __future__ import annotations

import sys

import pytest

from rt_server.process_memory import release_free_heap, resident_memory_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_resident_memory_is_read_and_free_heap_is_handed_back() -> None:
    assert release_free_heap()  # glibc; from here on, new allocations must fault pages in again
    before = resident_memory_bytes()
    assert before is not None and before > 10 * 2**20  # any Python process under pytest holds more
    blocks = [bytearray(1 << 16) for _ in range(2000)]  # 125 MiB in heap-sized pieces, zero-filled (touched)
    grown = resident_memory_bytes()
    del blocks
    assert release_free_heap()
    after = resident_memory_bytes()
    assert grown is not None and after is not None
    assert grown - before > 100 * 2**20
    assert after < grown - 100 * 2**20
