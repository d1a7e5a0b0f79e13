"""ModelConfig: every field the network needs, read from a Hugging Face ``config.json``.

Two model types are accepted:

* ``deepseek_v32`` — DeepSeek-V3.2, V3.2-Exp, V3.2-Speciale (MLA + DSA lightning indexer).
* ``deepseek_v3``  — DeepSeek-V3, V3.1, V3.1-Terminus (the same network without the indexer).

Defaults are the values of the 671B checkpoints. Rotary settings are accepted in both spellings:
``rope_theta`` + ``rope_scaling`` (DeepSeek's own config.json) and ``rope_parameters``
(transformers 5 ``save_pretrained``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v32", "deepseek_v3")


class ConfigError(ValueError):
    """A config.json that cannot describe a model we can run; the message names the field."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings; ``type`` is "default" (plain RoPE) or "yarn"."""

    theta: float = 10000.0
    type: str = "yarn"
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    model_type: str = "deepseek_v32"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True  # MLA rope pairs (x[2i], x[2i+1]); the DeepSeek checkpoints' layout
    # DSA lightning indexer (deepseek_v32 only; None for deepseek_v3)
    index_n_heads: int | None = 64
    index_head_dim: int | None = 128
    index_topk: int | None = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    torch_dtype: str = "bfloat16"
    # FP8 block quantization of the checkpoint (None: weights stored unquantized)
    fp8_block_size: tuple[int, int] | None = None
    fp8_scale_fmt: str | None = None

    # ---- derived -------------------------------------------------------------------------
    @property
    def has_indexer(self) -> bool:
        return self.model_type == "deepseek_v32"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """MLA softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        if self.rope.type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- reading --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(raw).__name__}")
        return _parse(raw)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json found at {path}")
        return _parse(read_config_json(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as a DeepSeek-style HF config.json (``rope_theta`` + ``rope_scaling``)."""
        arch = "DeepseekV32ForCausalLM" if self.has_indexer else "DeepseekV3ForCausalLM"
        out: dict[str, Any] = {"architectures": [arch]}
        for name in (
            "model_type vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers "
            "num_nextn_predict_layers first_k_dense_replace moe_layer_freq num_attention_heads q_lora_rank "
            "kv_lora_rank qk_nope_head_dim qk_rope_head_dim v_head_dim n_routed_experts n_shared_experts "
            "num_experts_per_tok n_group topk_group routed_scaling_factor scoring_func topk_method "
            "norm_topk_prob hidden_act max_position_embeddings rms_norm_eps tie_word_embeddings "
            "bos_token_id eos_token_id torch_dtype"
        ).split():
            out[name] = getattr(self, name)
        out["num_key_value_heads"] = self.num_attention_heads
        out["attention_bias"] = False
        out["rope_theta"] = self.rope.theta
        if self.rope.type == "yarn":
            r = self.rope
            out["rope_scaling"] = {
                "type": "yarn", "factor": r.factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
                "beta_fast": r.beta_fast, "beta_slow": r.beta_slow,
                "mscale": r.mscale, "mscale_all_dim": r.mscale_all_dim,
            }  # fmt: skip
        else:
            out["rope_scaling"] = None
        if not self.rope_interleave:
            out["rope_interleave"] = False
        if self.has_indexer:
            out["index_n_heads"] = self.index_n_heads
            out["index_head_dim"] = self.index_head_dim
            out["index_topk"] = self.index_topk
        if self.fp8_block_size is not None:
            out["quantization_config"] = {
                "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(self.fp8_block_size),
            }  # fmt: skip
            if self.fp8_scale_fmt:
                out["quantization_config"]["scale_fmt"] = self.fp8_scale_fmt
        return out


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention magnitude correction m = 0.1·mscale·ln(factor) + 1 (1 when factor <= 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


# ---- parsing ----------------------------------------------------------------------------------


def read_config_json(path: Path) -> dict[str, Any]:
    """The JSON object in the file ``path``; ConfigError (naming the file) if it is not one."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return raw


_INT_FIELDS = (
    "vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers "
    "num_nextn_predict_layers first_k_dense_replace moe_layer_freq num_attention_heads kv_lora_rank "
    "qk_nope_head_dim qk_rope_head_dim v_head_dim n_routed_experts n_shared_experts num_experts_per_tok "
    "n_group topk_group max_position_embeddings"
).split()


def _parse(raw: dict[str, Any]) -> ModelConfig:
    try:
        return _parse_fields(raw)
    except (TypeError, AttributeError, OverflowError) as e:  # a safety net: the checks below name the field
        raise ConfigError(f"config.json holds a value of the wrong type: {e}") from None


def _parse_fields(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError("config.json has no 'model_type' (expected one of deepseek_v32, deepseek_v3)")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"unsupported model_type {model_type!r}: dsv32 runs {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    defaults = ModelConfig(model_type=model_type)
    kw: dict[str, Any] = {"model_type": model_type}

    for name in _INT_FIELDS:
        if name in raw and raw[name] is not None:
            kw[name] = _int(raw, name)
    # transformers' deepseek_v32 config does not carry num_nextn_predict_layers and its
    # save_pretrained drops the MTP layer, so a missing field means "no MTP layer in this directory".
    if "num_nextn_predict_layers" not in raw:
        kw["num_nextn_predict_layers"] = 0
    if "q_lora_rank" in raw:
        kw["q_lora_rank"] = None if raw["q_lora_rank"] in (None, 0) else _int(raw, "q_lora_rank")
        if kw["q_lora_rank"] is not None and kw["q_lora_rank"] < 0:
            raise ConfigError(
                f"config field 'q_lora_rank' must be > 0 (or 0 / null: none), got {kw['q_lora_rank']}"
            )
    for name in ("routed_scaling_factor", "rms_norm_eps"):
        if raw.get(name) is not None:
            kw[name] = _float(raw, name)
            if kw[name] <= 0:
                raise ConfigError(f"config field '{name}' must be > 0, got {kw[name]}")
    for name in ("norm_topk_prob", "tie_word_embeddings", "rope_interleave"):
        if raw.get(name) is not None:
            if not isinstance(raw[name], bool):
                raise ConfigError(f"config field '{name}' must be true or false, got {raw[name]!r}")
            kw[name] = raw[name]
    for name in ("scoring_func", "topk_method", "hidden_act"):
        if raw.get(name) is not None:
            kw[name] = str(raw[name])
    for name in ("bos_token_id", "eos_token_id"):
        if name in raw:
            v = raw[name]
            kw[name] = v[0] if isinstance(v, list) and v else v
    dtype = raw.get("torch_dtype") or raw.get("dtype")
    if dtype:
        kw["torch_dtype"] = str(dtype).replace("torch.", "")

    kw["rope"] = _parse_rope(raw)

    if model_type == "deepseek_v32":
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            if raw.get(name) is not None:
                kw[name] = _int(raw, name)
    else:
        kw.update(index_n_heads=None, index_head_dim=None, index_topk=None)

    q = raw.get("quantization_config")
    if q:
        if not isinstance(q, dict):
            raise ConfigError(f"'quantization_config' must be an object, got {q!r}")
        if q.get("quant_method") != "fp8":
            raise ConfigError(
                f"quantization_config.quant_method {q.get('quant_method')!r} is not supported (only 'fp8')"
            )
        block = q.get("weight_block_size") or [128, 128]
        if not (
            isinstance(block, list)
            and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):
            raise ConfigError(f"quantization_config.weight_block_size must be two positive ints, got {block}")
        kw["fp8_block_size"] = (block[0], block[1])
        kw["fp8_scale_fmt"] = q.get("scale_fmt")

    cfg = ModelConfig(**{**asdict(defaults), **kw, "rope": kw["rope"]})
    _validate(cfg, raw)
    return cfg


def _int(raw: dict[str, Any], name: str) -> int:
    v = raw[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or int(v) != v:
        raise ConfigError(f"config field '{name}' must be an integer, got {v!r}")
    return int(v)


def _float(raw: dict[str, Any], name: str, where: str = "config field") -> float:
    v = raw[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{where} '{name}' must be a finite number, got {v!r}")
    return float(v)


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be an object, got {value!r}")
    if params and scaling:
        # Both spellings present: they must agree on the type and on every setting both give.
        t1 = params.get("rope_type", params.get("type"))
        t2 = scaling.get("rope_type", scaling.get("type"))
        if t1 != t2:
            raise ConfigError(f"'rope_parameters' ({t1}) and 'rope_scaling' ({t2}) contradict each other")
        for k in sorted(set(params) & set(scaling) - {"rope_type", "type"}):
            if params[k] != scaling[k]:
                raise ConfigError(
                    f"'rope_parameters' and 'rope_scaling' contradict each other on '{k}' "
                    f"({params[k]!r} against {scaling[k]!r})"
                )
    src: dict[str, Any] = dict(params or scaling or {})
    if "rope_theta" not in src and "rope_theta" in raw:
        src["rope_theta"] = raw["rope_theta"]
    theta = _float(src, "rope_theta", "rope setting") if "rope_theta" in src else 10000.0
    if theta <= 0:
        raise ConfigError(f"rope setting 'rope_theta' must be > 0, got {theta}")
    rtype = src.get("rope_type", src.get("type", "default"))
    if rtype not in ("default", "yarn"):
        raise ConfigError(f"rope type {rtype!r} is not supported (expected 'yarn' or 'default')")
    if rtype == "default":
        return RopeConfig(theta=theta, type="default", factor=1.0)
    if src.get("factor") is None:
        raise ConfigError("yarn rope settings need 'factor'")
    if src.get("original_max_position_embeddings") is None:
        raise ConfigError("yarn rope settings need 'original_max_position_embeddings'")
    orig = _int(src, "original_max_position_embeddings")
    if orig <= 0:
        raise ConfigError(f"rope setting 'original_max_position_embeddings' must be > 0, got {orig}")
    number = {k: _float(src, k, "rope setting") for k in ("factor", "beta_fast", "beta_slow", "mscale",
                                                            "mscale_all_dim") if src.get(k) is not None}  # fmt: skip
    for k in ("mscale", "mscale_all_dim"):
        if number.get(k, 0.0) < 0:
            raise ConfigError(f"rope setting '{k}' must be >= 0, got {number[k]}")
    return RopeConfig(
        theta=theta,
        type="yarn",
        factor=number["factor"],
        original_max_position_embeddings=orig,
        beta_fast=number.get("beta_fast", 32.0),
        beta_slow=number.get("beta_slow", 1.0),
        mscale=number.get("mscale", 0.0),
        mscale_all_dim=number.get("mscale_all_dim", 0.0),
    )


def _validate(cfg: ModelConfig, raw: dict[str, Any]) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    for name in _INT_FIELDS:
        if name in (
            "num_nextn_predict_layers",
            "first_k_dense_replace",
            "n_shared_experts",
            "n_routed_experts",
        ):
            need(getattr(cfg, name) >= 0, f"config field '{name}' must be >= 0, got {getattr(cfg, name)}")
        else:
            need(getattr(cfg, name) > 0, f"config field '{name}' must be > 0, got {getattr(cfg, name)}")
    need(cfg.qk_rope_head_dim % 2 == 0, f"'qk_rope_head_dim' must be even, got {cfg.qk_rope_head_dim}")
    need(cfg.hidden_act == "silu", f"'hidden_act' {cfg.hidden_act!r} is not supported (DeepSeek uses 'silu')")
    need(
        cfg.scoring_func == "sigmoid",
        f"'scoring_func' {cfg.scoring_func!r} is not supported (V3/V3.2 use 'sigmoid')",
    )
    need(
        cfg.topk_method == "noaux_tc",
        f"'topk_method' {cfg.topk_method!r} is not supported (V3/V3.2 use 'noaux_tc')",
    )
    if cfg.n_routed_experts > 0:
        need(
            cfg.n_routed_experts % cfg.n_group == 0,
            f"'n_routed_experts' ({cfg.n_routed_experts}) must be divisible by 'n_group' ({cfg.n_group})",
        )
        need(
            cfg.topk_group <= cfg.n_group,
            f"'topk_group' ({cfg.topk_group}) must be <= 'n_group' ({cfg.n_group})",
        )
        per_group = cfg.n_routed_experts // cfg.n_group
        need(
            cfg.n_group == 1 or per_group >= 2,
            f"group-limited routing needs >= 2 experts per group; got {per_group} "
            f"('n_routed_experts' {cfg.n_routed_experts} / 'n_group' {cfg.n_group})",
        )
        need(
            cfg.topk_group * per_group >= cfg.num_experts_per_tok,
            f"'num_experts_per_tok' ({cfg.num_experts_per_tok}) exceeds the experts in 'topk_group' "
            f"({cfg.topk_group}) groups of {per_group}",
        )
    need(
        "num_key_value_heads" not in raw or raw["num_key_value_heads"] in (None, cfg.num_attention_heads),
        f"'num_key_value_heads' ({raw.get('num_key_value_heads')}) contradicts 'num_attention_heads' "
        f"({cfg.num_attention_heads}); MLA has one latent shared by all heads",
    )
    if "mlp_layer_types" in raw and isinstance(raw["mlp_layer_types"], list):
        derived = ["sparse" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.num_hidden_layers)]
        need(
            raw["mlp_layer_types"] == derived,
            f"'mlp_layer_types' {raw['mlp_layer_types']} contradicts 'first_k_dense_replace' "
            f"({cfg.first_k_dense_replace}) / 'moe_layer_freq' ({cfg.moe_layer_freq})",
        )
    if cfg.has_indexer:
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            need(getattr(cfg, name) is not None and getattr(cfg, name) > 0, f"'{name}' must be > 0")
        need(
            cfg.index_head_dim > cfg.qk_rope_head_dim,
            f"'index_head_dim' ({cfg.index_head_dim}) must exceed 'qk_rope_head_dim' ({cfg.qk_rope_head_dim})",
        )
        need(
            cfg.q_lora_rank is not None,
            "deepseek_v32 needs 'q_lora_rank': the indexer's query reads the q latent",
        )
    if cfg.rope.type == "yarn":
        need(cfg.rope.factor >= 1.0, f"rope 'factor' must be >= 1, got {cfg.rope.factor}")
