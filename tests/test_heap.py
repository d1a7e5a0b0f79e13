"""release_freed_heap binds glibc's malloc_trim where there is one (the CI machines run glibc)."""

from __future__ import annotations

import platform

import pytest

from dsv32.heap import release_freed_heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_malloc_trim_is_found_and_runs_on_glibc():
    buffers = [bytearray(8 << 20) for _ in range(8)]  # heap churn to hand back
    del buffers
    assert release_freed_heap() is True
