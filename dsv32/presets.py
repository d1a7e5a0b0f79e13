"""Named model configs: the shared benchmark model and a tiny one for quick experiments.

``bench-small`` is the project's benchmark model (a copy of shared/bench/bench-small.config.json, kept in
the package so benchmarks run from an installed wheel): ~486M parameters, V3.2 architecture, the real vocab.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from dsv32.config import read_config_json

BENCH_SMALL: dict[str, Any] = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "index_head_dim": 64,
    "index_n_heads": 8,
    "index_topk": 512,
    "intermediate_size": 2816,
    "kv_lora_rank": 256,
    "max_position_embeddings": 32768,
    "model_type": "deepseek_v32",
    "moe_intermediate_size": 512,
    "n_group": 4,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 16,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 8,
    "num_key_value_heads": 16,
    "q_lora_rank": 384,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 8.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_type": "yarn",
    },
    "routed_scaling_factor": 2.5,
    "tie_word_embeddings": False,
    "topk_group": 2,
    "v_head_dim": 64,
    "vocab_size": 129280,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "num_nextn_predict_layers": 0,
}

TINY: dict[str, Any] = {
    **BENCH_SMALL,
    "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "index_n_heads": 4, "index_head_dim": 16,
    "index_topk": 32, "vocab_size": 1024,
}  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {"bench-small": BENCH_SMALL, "tiny": TINY}


def resolve_preset(name_or_path: str) -> dict[str, Any]:
    """A preset name or the path of a config.json (or of a directory holding one) -> the raw config dict."""
    if name_or_path in PRESETS:
        return copy.deepcopy(PRESETS[name_or_path])
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json")
    return read_config_json(path)
