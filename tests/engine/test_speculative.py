"""vLLM's ``speculative_config`` spelling: what is accepted, and the reason for what is not."""

from __future__ import annotations

import pytest

from dsv32.cli import build_parser
from dsv32.engine.speculative import num_speculative_tokens


def test_accepted_spellings():
    assert num_speculative_tokens(None) == 0
    assert num_speculative_tokens({"method": "mtp", "num_speculative_tokens": 1}) == 1
    assert num_speculative_tokens('{"method": "deepseek_mtp"}') == 1  # one draft token unless told
    assert num_speculative_tokens({"method": "mtp", "num_speculative_tokens": 3}) == 3


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1]", "JSON object"),
        ({"method": "eagle"}, "method 'eagle' is not supported"),
        ({"method": "mtp", "num_speculative_tokens": 5}, r"integer in \[1, 4\]"),
        ({"method": "mtp", "num_speculative_tokens": True}, r"integer in \[1, 4\]"),
        ({"method": "mtp", "num_speculative_tokens": 0}, r"integer in \[1, 4\]"),
        ({"method": "mtp", "model": "x"}, "unsupported keys"),
    ],
)
def test_refused_configs_say_why(config, reason):
    with pytest.raises(ValueError, match=reason):
        num_speculative_tokens(config)


def test_serve_flag(capsys):
    args = build_parser().parse_args(["serve", "--speculative-config", '{"method": "mtp"}'])
    assert args.speculative_config == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--speculative-config", '{"method": "ngram"}'])
    assert "method 'ngram' is not supported" in capsys.readouterr().err
