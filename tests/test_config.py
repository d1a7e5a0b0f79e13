"""ModelConfig from config.json: both rope spellings, the 671B defaults, and named errors."""

from __future__ import annotations

import json

import pytest

from dsv32.config import ConfigError, ModelConfig

DEEPSEEK_STYLE = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
    },
    "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [128, 128], "scale_fmt": "ue8m0",
    },
    "num_nextn_predict_layers": 1,
}  # fmt: skip


def test_671b_defaults_and_softmax_scale():
    cfg = ModelConfig.from_dict(DEEPSEEK_STYLE)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.index_topk) == (
        7168,
        61,
        256,
        2048,
    )
    assert cfg.fp8_block_size == (128, 128) and cfg.fp8_scale_fmt == "ue8m0"
    assert cfg.softmax_scale == pytest.approx(0.13523378, rel=1e-6)  # 192^-0.5 · (0.1 ln 40 + 1)^2
    assert cfg.has_indexer and cfg.num_nextn_predict_layers == 1


def test_both_rope_spellings_give_the_same_config():
    legacy = ModelConfig.from_dict(DEEPSEEK_STYLE)
    rs = DEEPSEEK_STYLE["rope_scaling"]
    v5 = {k: v for k, v in DEEPSEEK_STYLE.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {
        **{k: v for k, v in rs.items() if k != "type"},
        "rope_type": "yarn",
        "rope_theta": 10000,
    }
    assert ModelConfig.from_dict(v5) == legacy


def test_round_trip_through_hf_dict():
    cfg = ModelConfig.from_dict(DEEPSEEK_STYLE)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg
    v3 = ModelConfig(
        model_type="deepseek_v3", q_lora_rank=None, index_n_heads=None, index_head_dim=None, index_topk=None
    )
    assert ModelConfig.from_dict(v3.to_hf_dict()) == v3


def test_v3_has_no_indexer():
    cfg = ModelConfig.from_dict({"model_type": "deepseek_v3", "index_topk": 2048})
    assert not cfg.has_indexer and cfg.index_topk is None


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"model_type": "llama"}, "model_type 'llama'"),
        ({}, "model_type"),
        ({"model_type": "deepseek_v32", "hidden_size": "big"}, "'hidden_size'"),
        ({"model_type": "deepseek_v32", "n_routed_experts": 10, "n_group": 4}, "'n_routed_experts'"),
        ({"model_type": "deepseek_v32", "num_key_value_heads": 8}, "'num_key_value_heads'"),
        ({"model_type": "deepseek_v32", "q_lora_rank": None}, "'q_lora_rank'"),
        ({"model_type": "deepseek_v32", "index_head_dim": 32}, "'index_head_dim'"),
        ({"model_type": "deepseek_v32", "scoring_func": "softmax"}, "'scoring_func'"),
        ({"model_type": "deepseek_v32", "rope_scaling": {"type": "yarn"}}, "'factor'"),
        ({"model_type": "deepseek_v32", "rope_scaling": {"type": "linear", "factor": 2}}, "'linear'"),
        (
            {"model_type": "deepseek_v32", "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4},
             "rope_parameters": {"rope_type": "default"}},
            "contradict",
        ),
        ({"model_type": "deepseek_v32", "first_k_dense_replace": 1, "num_hidden_layers": 2,
          "mlp_layer_types": ["dense", "dense"]}, "'mlp_layer_types'"),
        ({"model_type": "deepseek_v32", "quantization_config": {"quant_method": "gptq"}}, "gptq"),
        # found by a fuzz: each used to be a raw TypeError / AttributeError / OverflowError, a message naming
        # no field, or a silent acceptance that made every logit NaN
        ({"model_type": "deepseek_v32", "quantization_config": "fp8"}, "'quantization_config' must be an object"),
        ({"model_type": "deepseek_v32", "quantization_config": {"quant_method": "fp8", "weight_block_size": 128}},
         "weight_block_size"),
        ({"model_type": "deepseek_v32", "quantization_config": {"quant_method": "fp8", "weight_block_size": [True, 128]}},
         "weight_block_size"),
        ({"model_type": "deepseek_v32", "rope_parameters": "yarn"}, "'rope_parameters' must be an object"),
        ({"model_type": "deepseek_v32", "rope_scaling": 5}, "'rope_scaling' must be an object"),
        ({"model_type": "deepseek_v32", "rope_scaling": {**DEEPSEEK_STYLE["rope_scaling"], "factor": None}}, "'factor'"),
        ({"model_type": "deepseek_v32", "rope_scaling": {**DEEPSEEK_STYLE["rope_scaling"], "factor": "8"}}, "'factor' must be a finite number"),
        ({"model_type": "deepseek_v32", "rope_scaling": {**DEEPSEEK_STYLE["rope_scaling"], "factor": float("inf")}}, "'factor'"),
        ({"model_type": "deepseek_v32", "rope_scaling": {**DEEPSEEK_STYLE["rope_scaling"], "mscale_all_dim": -1}}, "'mscale_all_dim'"),
        ({"model_type": "deepseek_v32", "rope_theta": 0}, "'rope_theta' must be > 0"),
        ({"model_type": "deepseek_v32", "rope_scaling": DEEPSEEK_STYLE["rope_scaling"],
          "rope_parameters": {**DEEPSEEK_STYLE["rope_scaling"], "factor": 8}}, "contradict each other on 'factor'"),
        ({"model_type": "deepseek_v32", "hidden_size": float("inf")}, "'hidden_size' must be an integer"),
        ({"model_type": "deepseek_v32", "hidden_size": float("nan")}, "'hidden_size' must be an integer"),
        ({"model_type": "deepseek_v32", "q_lora_rank": -64}, "'q_lora_rank' must be > 0"),
        ({"model_type": "deepseek_v32", "rms_norm_eps": -1}, "'rms_norm_eps' must be > 0"),
        ({"model_type": "deepseek_v32", "routed_scaling_factor": -2.5}, "'routed_scaling_factor' must be > 0"),
    ],
)  # fmt: skip
def test_bad_configs_name_the_field(raw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        ModelConfig.from_dict(raw)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_bytes(b'{"model_type": "\xff"}')  # invalid UTF-8
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        ModelConfig.from_file(tmp_path)
    with pytest.raises(ConfigError, match="must be a JSON object"):
        ModelConfig.from_dict([1, 2])
