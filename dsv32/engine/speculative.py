"""vLLM's ``speculative_config`` spelling for speculative decoding with the checkpoint's MTP layer.

``{"method": "mtp", "num_speculative_tokens": 1}`` (``"deepseek_mtp"`` is accepted too, as vLLM names it).
The engine side is ``EngineConfig.num_speculative_tokens``: the MTP layer drafts the token after next from
each step's last hidden state (and, for more than one draft, again from its own output), the next step
computes the drafts beside the sampled token, and sampling verifies them (``EngineCore.step``).
"""

from __future__ import annotations

import json
from typing import Any

from dsv32.engine.core import MAX_SPECULATIVE_TOKENS

METHODS = ("mtp", "deepseek_mtp")


def num_speculative_tokens(config: dict[str, Any] | str | None) -> int:
    """Draft tokens per step asked for by a ``speculative_config`` (a dict or its JSON text; None: 0).

    Raises ValueError, saying why, for anything but the MTP method with 1 to 4 draft tokens."""
    if config is None:
        return 0
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError("speculative_config must be a JSON object")
    unknown = set(config) - {"method", "num_speculative_tokens"}
    if unknown:
        raise ValueError(f"speculative_config: unsupported keys {sorted(unknown)}")
    method = config.get("method", "mtp")
    if method not in METHODS:
        raise ValueError(f"speculative_config: method {method!r} is not supported; use one of {METHODS}")
    k = config.get("num_speculative_tokens", 1)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(
            f"speculative_config: num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}] "
            f"(past the first, drafts chain the one MTP layer on its own output), got {k!r}"
        )
    return k
