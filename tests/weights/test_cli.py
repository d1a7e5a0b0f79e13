"""The dsv32 command line: make-checkpoint, generate, errors as one line and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv32.cli import main
from dsv32.config import ModelConfig
from dsv32.weights.loader import load_model
from tests.weights.configs import small_config

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_commands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("make-checkpoint", "generate", "bench"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["bench", "model", "--help"])
    out = capsys.readouterr().out
    assert "--prefill" in out and "--decode" in out and "--out" in out


def test_make_checkpoint_preset_fp8_sharded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tiny"
    assert main(["make-checkpoint", str(out), "--preset", "tiny", "--fp8", "--shard-size", "0.2"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert (out / "model.safetensors.index.json").is_file()
    raw = json.loads((out / "config.json").read_text())
    assert raw["quantization_config"]["weight_block_size"] == [128, 128]
    model = load_model(out, dtype=torch.float32, progress=False)
    assert model.config.vocab_size == 1024
    assert not (out / "tokenizer.json").exists()  # a 1024-token vocab is not DeepSeek's


def test_make_checkpoint_from_config_file(tmp_path: Path) -> None:
    cfg = small_config("deepseek_v3", q_lora=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    out = tmp_path / "out"
    assert (
        main(["make-checkpoint", str(out), "--config", str(tmp_path / "config.json"), "--dtype", "fp32"]) == 0
    )
    assert ModelConfig.from_file(out).model_type == "deepseek_v3"
    with safe_open(out / "model.safetensors", framework="pt") as h:
        assert h.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "F32"


def test_make_checkpoint_default_preset_follows_its_quantization(tmp_path: Path) -> None:
    assert main(["make-checkpoint", str(tmp_path / "a")]) == 0  # preset default: FP8 as its config says
    assert "quantization_config" in json.loads((tmp_path / "a" / "config.json").read_text())
    assert (tmp_path / "a" / "tokenizer.json").is_file()  # real vocab: the DeepSeek tokenizer is added
    assert main(["make-checkpoint", str(tmp_path / "b"), "--preset", "default", "--no-fp8"]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "b" / "config.json").read_text())


def test_generate_default_model(
    default_model_dir: Path,
    default_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from dsv32.chat.tokenizer import load_tokenizer
    from dsv32.generate import generate

    monkeypatch.setenv("DSV32_CACHE", str(default_cache))
    assert main(["generate", "--prompt", "The capital of France is", "--max-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert "RANDOM" in err and len(err.strip().splitlines()) == 1
    tok = load_tokenizer(default_model_dir)
    model = load_model(default_model_dir, dtype=torch.bfloat16, progress=False)
    ids = list(generate(model, tok.encode("The capital of France is", add_bos=True), 6, eos_id=tok.eos_id))
    assert out == tok.decode(ids, skip_special_tokens=True) + "\n"


def test_generate_sampling_options(default_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    args = [
        "generate",
        "--model",
        str(default_model_dir),
        "--prompt",
        "Hi",
        "--max-tokens",
        "5",
        "--dtype",
        "fp32",
    ]
    sampled = [*args, "--temperature", "1.0", "--top-p", "0.9", "--seed", "3"]
    assert main(sampled) == 0
    first = capsys.readouterr()
    assert "RANDOM" not in first.err  # an explicit --model gets no warning
    assert main(sampled) == 0
    assert capsys.readouterr().out == first.out  # same seed, same text


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "--prompt", "x", "--model", "/nonexistent/model"], "does not exist"),
        (["make-checkpoint", "OUT", "--config", "/nonexistent/config.json"], "config.json"),
        (["make-checkpoint", "OUT", "--shard-size", "0"], "--shard-size"),
        (["make-checkpoint", "OUT", "--shard-size", "inf"], "--shard-size"),  # (an OverflowError traceback before)
        (["bench", "model", "--config", "BADJSON"], "bad.json is not valid JSON"),
        (["bench", "model", "--config", "LISTJSON"], "must hold a JSON object"),
    ],
)  # fmt: skip
def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, argv, needle) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    names = {"OUT": "out", "BADJSON": "bad.json", "LISTJSON": "list.json"}
    argv = [str(tmp_path / names[a]) if a in names else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_config_error_exit_status_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    res = subprocess.run(
        [sys.executable, "-m", "dsv32.cli", "generate", "--prompt", "x", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "llama" in res.stderr and "Traceback" not in res.stderr
