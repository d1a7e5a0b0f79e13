"""Checkpoints: the HF tensor layout, the safetensors loader, synthetic checkpoints, the default model."""

from dsv32.weights.layout import TensorSpec, checkpoint_layout
from dsv32.weights.loader import CheckpointError, load_model
from dsv32.weights.synthetic import quantize_fp8_blocks, write_synthetic_checkpoint

__all__ = [
    "CheckpointError",
    "TensorSpec",
    "checkpoint_layout",
    "load_model",
    "quantize_fp8_blocks",
    "write_synthetic_checkpoint",
]
