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


def _serve_args(*flags: str):
    from dsv32.cli import build_parser

    return build_parser().parse_args(["serve", *flags])


def test_serve_compiles_by_default_as_vllm_does_and_enforce_eager_turns_it_off():
    import pytest

    from dsv32.cli import compile_at_start

    assert compile_at_start(_serve_args()) is True
    assert compile_at_start(_serve_args("--compile")) is True
    assert compile_at_start(_serve_args("--no-compile")) is False
    eager = _serve_args("--enforce-eager")
    assert compile_at_start(eager) is False and eager.enforce_eager  # (and no CUDA graphs: _serve)
    # speculative decoding's drafted steps are never compiled: its default is off, without a warning
    assert compile_at_start(_serve_args("--speculative-config", '{"method": "mtp"}')) is False
    with pytest.raises(ValueError, match="contradict"):
        compile_at_start(_serve_args("--compile", "--enforce-eager"))


def test_contradicting_serve_flags_exit_with_a_usage_error(capsys):
    from dsv32.cli import EXIT_USAGE, main

    assert main(["serve", "--compile", "--enforce-eager"]) == EXIT_USAGE
    assert "contradict" in capsys.readouterr().err
