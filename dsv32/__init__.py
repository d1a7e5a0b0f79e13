"""dsv32 — a self-hostable DeepSeek-V3.2 system on PyTorch."""

from dsv32.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig", "load_model"]


def load_model(*args, **kwargs):
    """Load an HF model directory (see ``dsv32.weights.loader.load_model``)."""
    from dsv32.weights.loader import load_model as _load

    return _load(*args, **kwargs)
