"""The command line's own behaviour (the subcommands' work is tested with their modules)."""

from __future__ import annotations

import os

import pytest

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


@pytest.mark.parametrize(
    "argv, words",
    [
        (["serve", "--port", "70000"], "port number"),
        (["serve", "--port", "-1"], "port number"),
        (["serve", "--cache-memory-gb", "0"], "> 0"),
        (["serve", "--cache-memory-gb", "nan"], "> 0"),
        (["serve", "--max-waiting", "-1"], ">= 0"),
        (["serve", "--max-concurrent-per-key", "0"], ">= 1"),
        (["serve", "--device", "foo"], "not a torch device"),
        (["generate", "--prompt", "x", "--device", "meta"], "cpu or cuda"),
        (["chat", "--max-tokens", "-1"], ">= 1"),
        (["chat", "--temperature", "-1"], "[0, 2]"),
        (["bench", "model", "--prefill", "0"], ">= 1"),
        (["generate", "--prompt", "x", "--temperature", "3"], "[0, 2]"),
        (["generate", "--prompt", "x", "--top-p", "0"], "(0, 1]"),
        (["generate", "--prompt", "x", "--max-tokens", "0"], ">= 1"),
        (["bench", "spec", "--repeats", "0"], ">= 1"),  # (these gave a traceback or a message from inside)
        (["bench", "grammar", "--repeats", "0"], ">= 1"),
        (["bench", "grammar", "--tokens", "0"], ">= 1"),
        (["bench", "spec", "--tokens", "-3"], ">= 1"),
        (["bench", "server", "--streams", "0"], ">= 1"),
        (["bench", "engine", "--decode", "0"], ">= 1"),
        (["bench", "engine", "--device", "tpu"], "not a torch device"),
    ],
)  # fmt: skip
def test_bad_option_values_are_usage_errors_before_anything_loads(argv, words, capsys):
    """(Found by a fuzz: each used to load the model first and then fail with a traceback, or serve requests
    that could only fail.)"""
    from dsv32.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and words in capsys.readouterr().err


def test_serve_binds_its_port_before_loading_anything(capsys):
    """A port in use or a host that is no address here: a one-line error at once (it used to load and compile
    the model, print "serving", and then fail inside uvicorn with exit 3)."""
    import socket

    from dsv32.api.server import listen_socket
    from dsv32.cli import EXIT_USAGE, main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--enforce-eager", "--port", str(port)]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}" in err and "serving" not in err, err
    assert main(["serve", "--enforce-eager", "--host", "999.1.1.1"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--host '999.1.1.1' is not an address" in err and "serving" not in err, err
    with listen_socket("127.0.0.1", 0) as sock:  # port 0: the system's pick, which the start line prints
        assert sock.getsockname()[1] > 0


def test_generate_refuses_ids_outside_a_small_models_vocabulary(tmp_path):
    """A model whose vocabulary is smaller than the tokenizer's ids: an error naming the id, not an
    IndexError from inside the embedding."""
    import torch

    from dsv32.generate import generate
    from dsv32.model.transformer import DeepseekForCausalLM
    from tests.model.test_forms import tiny_config

    model = DeepseekForCausalLM(tiny_config()).eval()  # 300 rows
    with pytest.raises(
        ValueError, match=r"prompt token id 128803 is outside the model's vocabulary \[0, 300\)"
    ):
        next(generate(model, [0, 128803], 2))
    assert len(list(generate(model, [0, 5], 2))) == 2
    assert torch.is_grad_enabled()
