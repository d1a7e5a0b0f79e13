"""The command line's own behaviour (the subcommands' work is tested with their modules)."""

from __future__ import annotations

import os

from dsv32.cli import use_persistent_compile_cache


def test_serve_compile_keeps_inductors_cache_in_dsv32s_cache_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV32_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    use_persistent_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    use_persistent_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"  # an explicit setting wins
