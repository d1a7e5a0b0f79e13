"""The DeepSeek-V3 / V3.2 decoder: pre-norm blocks (MLA [+ DSA] and a dense MLP or MoE), and MTP.

Parameter names equal the Hugging Face checkpoint's tensor names, so the loader maps tensors 1:1.
MTP modules are stored as extra layers after the main ones (``model.layers.{num_hidden_layers}``),
as in the checkpoint; the main forward runs only the first ``num_hidden_layers``.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv32.config import ModelConfig
from dsv32.heap import release_freed_heap
from dsv32.model.kv_cache import KVCache
from dsv32.model.layers import MLP, Linear, RMSNorm
from dsv32.model.mla import MLA, AttentionContext, AttnForm, ContiguousContext
from dsv32.model.moe import MoE
from dsv32.model.rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.layer_idx = layer_idx

    def forward(
        self, x: torch.Tensor, ctx: AttentionContext, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block as DeepSeek's reference runs it: takes the previous block's output x and the
        residual stream (None in the first block: x is the embedding) and returns (mlp output, residual);
        the hidden state after the block is their sum. Each norm reads the fp32 sum of the residual and the
        sublayer output before it is rounded (``RMSNorm.add_and_norm``); in fp32 this is the usual
        ``h = h + attn(norm(h)); h = h + mlp(norm(h))``."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm.add_and_norm(x, residual)
        x = self.self_attn(x, ctx, self.layer_idx)
        x, residual = self.post_attention_layernorm.add_and_norm(x, residual)
        return self.mlp(x), residual


def head_logits(head: Linear, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits: DeepSeek's reference keeps an fp32 copy of lm_head (stored bf16) and computes the logits
    from the hidden state in fp32, so they are not rounded to bf16. The loader keeps the head fp32 (an FP8 one
    kept in FP8 is dequantised to fp32); a head tied to the embeddings stays in the model dtype."""
    return head(hidden.to(torch.float32 if head.is_fp8 else head.weight.dtype)).float()


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, fp32=True)


class MTPLayer(Block):
    """Multi-token prediction: from the main model's hidden h_i and token t_{i+1}, predict t_{i+2}.

        u = eh_proj([enorm(Embed(t_{i+1})) ‖ hnorm(h_i)]);  v = Block(u);  logits = head(norm(v))
    (embedding half first). h_i is the main model's final hidden state (after ``model.norm``). The
    embedding at position 0 is zeroed, as vLLM's DeepSeek MTP does ("not needed by MTP"); the
    released code of DeepSeek does not run the MTP layer, so this follows the serving engines.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)

    def forward_mtp(
        self,
        hidden: torch.Tensor,  # [B, T, D] main-model hidden at positions i
        next_ids: torch.Tensor,  # [B, T] tokens at positions i+1
        ctx: AttentionContext,
    ) -> torch.Tensor:
        return self.draft_logits(self.draft_hidden(hidden, next_ids, ctx))

    def draft_hidden(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """The block's output v [B, T, D]. A speculative decoder takes logits for a few rows of it
        (``draft_logits``) and, drafting further, feeds v back as the next position's ``hidden`` (as vLLM
        chains its MTP drafts)."""
        e = self.embed_tokens(next_ids)
        e = self.enorm(torch.where((ctx.q_pos == 0)[:, None], 0.0, e))  # position 0: no token (as vLLM)
        u = self.eh_proj(torch.cat((e, self.hnorm(hidden)), dim=-1))
        x, residual = super().forward(u, ctx)
        return x + residual  # rounded, then normed by the shared head (as vLLM's MTP)

    def draft_logits(self, v: torch.Tensor) -> torch.Tensor:
        """head(norm(v)): the logits of the token after next."""
        return head_logits(self.shared_head.head, self.shared_head.norm(v))


class DeepseekModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        n = cfg.num_hidden_layers
        self.layers = nn.ModuleList(
            [Block(cfg, i) for i in range(n)]
            + [MTPLayer(cfg, n + j) for j in range(cfg.num_nextn_predict_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """``model(input_ids [B, T]) -> logits [B, T, vocab]``; with a ``KVCache``, incremental decoding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepseekModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, fp32=True)  # fp32 logits: see ``head_logits``
        self.rotary = RotaryEmbedding(cfg)
        self.attn_form: AttnForm = "auto"  # "naive" / "absorbed" force one MLA form (tests, benchmarks)
        self.tie_mtp_copies()

    def mtp_copies(self) -> dict[str, str]:
        """MTP tensors that DeepSeek checkpoints store as copies of main ones: {mtp name: main name}."""
        out = {}
        for j in range(self.config.num_nextn_predict_layers):
            p = f"model.layers.{self.n_main_layers + j}."
            out[p + "embed_tokens.weight"] = "model.embed_tokens.weight"
            out[p + "shared_head.head.weight"] = "lm_head.weight"
        return out

    def tie_mtp_copies(self) -> None:
        """Share each MTP layer's embedding and head with the main model's (one copy in memory).

        DeepSeek's checkpoints hold identical copies (layer 61 embed_tokens / shared_head.head); the loader
        checks the stored copy and unties (``untie_mtp_copy``) if a checkpoint's copy differs.
        """
        for mtp in self.mtp_layers:
            mtp.embed_tokens.weight = self.model.embed_tokens.weight
            mtp.shared_head.head.weight = self.lm_head.weight

    def untie_mtp_copy(self, name: str) -> None:
        """Give the MTP tensor ``name`` its own storage (a copy of the main tensor, to be overwritten)."""
        module_name, _, attr = name.rpartition(".")
        module = self.get_submodule(module_name)
        shared = getattr(module, attr)
        setattr(module, attr, nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad))

    # Linears read only through ``dense_weight`` (the fp32 indexer head weights): never packed.
    _DENSE_ONLY = ("weights_proj",)

    def prepack_cpu_weights(self) -> int:
        """Reorder the matmul weights into oneDNN's layout for faster CPU inference (``PackedMatmul``): each
        MLP's gate+up and each MLA's input projections as one matmul, every other Linear on its own. The
        plain weights stay. Returns the bytes of the packed copies (tied weights counted once)."""
        cache: dict = {}
        covered: set[int] = set()
        for module in self.modules():
            if isinstance(module, (MLP, MLA)):
                covered.update(id(lin) for lin in module.prepack(cache))
        for name, module in self.named_modules():
            if (
                isinstance(module, Linear)
                and id(module) not in covered
                and not name.endswith(self._DENSE_ONLY)
            ):
                module.prepack(cache)
        release_freed_heap()  # the fused weights' concatenated temporaries
        return sum(t.numel() * t.element_size() for t in cache.values())

    @property
    def n_main_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers[self.n_main_layers :])

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A zeroed latent cache for ``batch`` sequences of up to ``max_len`` tokens (all layers incl. MTP)."""
        return KVCache(self.config, batch, max_len, len(self.model.layers), self.dtype, self.device)

    def contiguous_context(
        self, T: int, start_pos: int = 0, cache: KVCache | None = None
    ) -> ContiguousContext:
        q_pos = torch.arange(start_pos, start_pos + T, device=self.device)
        cos, sin = self.rotary(q_pos)
        return ContiguousContext(q_pos, cos, sin, cache, start_pos, self.attn_form)

    def hidden_states(
        self, input_ids: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Final hidden states [B, T, D] (after ``model.norm``), i.e. what lm_head reads."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        ctx = self.contiguous_context(input_ids.shape[1], start_pos, cache)
        return self.forward_layers(self.model.embed_tokens(input_ids), ctx)

    def forward_layers(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Embeddings h [B, T, D] through the main layers and the final norm (of the unrounded last sum)."""
        x, residual = h, None
        for i in range(self.n_main_layers):
            x, residual = self.model.layers[i](x, ctx, residual)
        return self.model.norm.add_and_norm(x, residual)[0]

    def forward(
        self, input_ids: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None
    ) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, start_pos, cache))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head over final hidden states [..., D] -> fp32 logits [..., vocab] (``head_logits``)."""
        return head_logits(self.lm_head, hidden)

    def mtp_logits(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
        depth: int = 0,
    ) -> torch.Tensor:
        """Logits of MTP module ``depth`` for positions i+2 given hidden h_i [B, T, D] and tokens t_{i+1}."""
        if depth >= len(self.mtp_layers):
            raise ValueError(f"this model has {len(self.mtp_layers)} MTP layers; asked for depth {depth}")
        ctx = self.contiguous_context(hidden.shape[1], start_pos, cache)
        return self.mtp_layers[depth].forward_mtp(hidden, next_ids, ctx)
