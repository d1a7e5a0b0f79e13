"""dsv32 — a self-hostable DeepSeek-V3.2 system on PyTorch.

Public API: ``load_model`` (an HF checkpoint directory -> the model), ``LLM`` and ``SamplingParams``
(the offline batched engine, vLLM-style), ``ModelConfig``.
"""

from __future__ import annotations

from typing import Any

from dsv32.config import ConfigError, ModelConfig

__all__ = ["LLM", "ConfigError", "ModelConfig", "SamplingParams", "load_model"]


def load_model(*args: Any, **kwargs: Any):
    """Load an HF model directory (see ``dsv32.weights.loader.load_model``)."""
    from dsv32.weights.loader import load_model as _load

    return _load(*args, **kwargs)


def __getattr__(name: str) -> Any:  # heavy modules load on first use
    if name == "LLM":
        from dsv32.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from dsv32.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'dsv32' has no attribute {name!r}")
