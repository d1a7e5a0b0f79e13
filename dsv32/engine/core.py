"""EngineCore: the synchronous heart of the engine — add requests, step, abort.

One ``step()``: the scheduler picks this step's chunks, the runner computes them against the paged
cache, the sampler draws one token for every request whose known tokens are now all in the cache, and
finished requests (EOS, stop token, stop string, max_tokens, context full, abort) release their blocks.
With speculative decoding (``num_speculative_tokens``) a decode also computes the draft tokens that the
model's MTP layer proposed last step; while the token sampled before a draft equals it, the draft's row is
sampled too, so a step yields one to 1 + num_speculative_tokens tokens per request, the same tokens as
without drafts (up to the float rounding that a batch's shape brings).
Constrained requests (``SamplingParams.guided``) get their grammar's token mask applied to their logits rows
before the sampler and their matcher advanced after it; a step without one skips all of that.
Knows nothing of threads or HTTP: ``AsyncEngine`` and ``LLM`` drive it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch

from dsv32.engine.block_pool import BlockPool
from dsv32.engine.compiled_decode import CompiledDecode
from dsv32.engine.cuda_graphs import DecodeGraphs, GraphCaptureError
from dsv32.engine.grammar import GrammarCompiler, GrammarMasker, GuidedState
from dsv32.engine.paged_cache import PagedKVCache
from dsv32.engine.prefill_graphs import PrefillGraphs
from dsv32.engine.request import Request
from dsv32.engine.runner import ModelRunner
from dsv32.engine.sampler import Sampler, SamplingState, bad_words_token_ids
from dsv32.engine.sampling_params import SamplingParams, token_id_list
from dsv32.engine.scheduler import Scheduler
from dsv32.engine.speculative import MAX_SPECULATIVE_TOKENS, Drafter
from dsv32.model.moe import MoE, grouped_matmul_available
from dsv32.model.transformer import DeepseekForCausalLM

log = logging.getLogger(__name__)


class EngineError(ValueError):
    """A request the engine cannot take (too long, bad ids, duplicate id); the message says why."""


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: from cache_memory_gb
    cache_memory_gb: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # CPU: keep a oneDNN-layout copy of every matmul weight (2-4x faster matmuls; costs their size again)
    prepack_weights: bool = True
    # GPU: replay decode-only steps from CUDA graphs (``cuda_graphs.DecodeGraphs``); False: always eager
    cuda_graphs: bool = True
    # GPU, with cuda_graphs: also steps of one prefill chunk (``prefill_graphs.PrefillGraphs``; not with
    # speculative decoding), captured per bucket of tokens and slots when first met
    prefill_graphs: bool = True
    # compile the decode step with torch.compile when the engine starts. CPU: single-request steps as one
    # compiled step (``compiled_decode``; ~70 s on bench-small's 32K context, ~10 s when inductor's disk
    # cache has it from an earlier start; needs a C++ compiler). GPU:
    # each CUDA-graph step compiled by inductor before its capture (``DecodeGraphs(compile=True)``; ~30 s a
    # form on an H100, 1.7x batch-1 decode on bench-small). Where compiling fails: a warning, steps as before
    compile_decode: bool = False
    # compile, at start, what the decode step does not cover: steps with prefill chunks (and decode steps of
    # two rows or more that take no graph), compiled around their attention (``compiled_layers``; one compile
    # for every token count). For a GPU, whose eager prefill is bound by launching kernels; on the CPU a
    # prefill is bound by its matmuls and the compiled one measured slower (1.41 against 0.74 s for 1024
    # tokens on bench-small, its matmuls the same packed ones; ``bench engine --compile``): ``serve
    # --compile`` sets it only on a GPU. Where compiling fails: a warning, eager steps
    compile_prefill: bool = False
    # speculative decoding: draft tokens per step from the model's MTP layer (0: off; 1: the MTP layer's
    # draft; up to 4: chained on its own output, as vLLM does). On a GPU the drafted decode steps and the
    # first MTP pass replay from CUDA graphs; compiled steps (``compile_decode``) are not used with drafts.
    num_speculative_tokens: int = 0
    # "fcfs" (arrival order) or "priority" (``SamplingParams.priority``, lower first, then arrival: the order
    # of admission, and the reverse order of preemption), as vLLM's --scheduling-policy
    scheduling_policy: str = "fcfs"


@dataclass
class TokenOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    logprobs: list[dict] | None  # per new token: {"logprob": float, "top": [(id, logprob), ...]}
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # with the request's first output when it asked for them: per prompt position {"logprob", "top"} (None at 0)
    prompt_logprobs: list[dict | None] | None = None


@dataclass
class _Live:
    request: Request
    params: SamplingParams
    state: SamplingState
    stop_ids: set[int] = field(default_factory=set)
    guided: GuidedState | None = None


class EngineCore:
    def __init__(
        self, model: DeepseekForCausalLM, config: EngineConfig | None = None, eos_id: int | None = None
    ):
        self.model = model
        self.config = cfg = config or EngineConfig()
        mcfg = model.config
        if cfg.max_model_len is not None and not 1 <= cfg.max_model_len <= mcfg.max_position_embeddings:
            raise EngineError(
                f"max_model_len must be in [1, {mcfg.max_position_embeddings}] (the model's "
                f"max_position_embeddings), got {cfg.max_model_len}"
            )
        self.max_model_len = cfg.max_model_len or mcfg.max_position_embeddings
        self.eos_id = eos_id if eos_id is not None else mcfg.eos_token_id
        self.num_speculative_tokens = k = cfg.num_speculative_tokens
        if not 0 <= k <= MAX_SPECULATIVE_TOKENS:
            raise EngineError(f"num_speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], got {k}")
        if k and not model.mtp_layers:
            raise EngineError("speculative decoding needs the checkpoint's MTP layer; this model has none")
        n_layers = mcfg.num_hidden_layers + (1 if k else 0)  # the MTP layer keeps a cache of its own
        num_blocks = cfg.num_blocks
        if num_blocks is None:
            per_token = PagedKVCache.bytes_per_token(mcfg, n_layers, model.dtype)
            num_blocks = max(1, int(cfg.cache_memory_gb * 2**30 // (per_token * cfg.block_size)))
        self.pool = BlockPool(num_blocks, cfg.block_size)
        self.cache = PagedKVCache(mcfg, num_blocks, cfg.block_size, n_layers, model.dtype, model.device)
        self.scheduler = Scheduler(
            self.pool,
            cfg.max_num_seqs,
            cfg.max_num_batched_tokens,
            hash_lookahead=1 if k else 0,
            policy=cfg.scheduling_policy,
        )
        self.runner = ModelRunner(model, self.cache)
        self.runner.keep_hidden = bool(k)
        self.drafter = Drafter(self.runner, self.scheduler, k) if k else None
        # since start: a request's drafted steps verified, their draft tokens, and [j]: times the (j+1)-th
        # draft of a step was accepted
        self.num_drafts = self.num_draft_tokens = 0
        self.accepted_per_pos = [0] * k
        if cfg.prepack_weights:
            model.prepack_cpu_weights()
        if k and cfg.compile_decode:
            log.warning("speculative decoding: decode steps are not compiled (compile_decode ignored)")
        if cfg.compile_decode and model.device.type == "cuda" and not cfg.cuda_graphs:
            log.warning("on a GPU compile_decode compiles the CUDA-graph step: ignored without cuda_graphs")
        if cfg.cuda_graphs and model.device.type == "cuda":
            self.runner.graphs = self._decode_graphs(compiled=cfg.compile_decode and not k)
            if self.runner.graphs is not None and cfg.prefill_graphs and not k:  # (the experts are stacked)
                self.runner.prefill_graphs = PrefillGraphs(
                    model, self.cache, cfg.max_num_batched_tokens, self.max_model_len
                )
        if cfg.compile_decode and not k and model.device.type == "cpu":
            compiled = self._compiled_decode()
            if compiled is not None:
                self.runner.graphs = compiled
        if cfg.compile_prefill:
            self.runner.compile_steps()
        self.sampler = Sampler()
        self.grammar: GrammarCompiler | None = None  # set by attach_tokenizer
        self.tokenizer = None  # set by attach_tokenizer (``bad_words`` are tokenized with it)
        # the tokenizer's id count where the model has more rows (a checkpoint's padding rows: 129,280 against
        # 128,815 for DeepSeek's): ids from there on are never sampled nor accepted (set by attach_tokenizer)
        self.token_limit: int | None = None
        self._masker: GrammarMasker | None = None
        self.live: dict[str, _Live] = {}
        self._arrivals = itertools.count()

    def _decode_graphs(self, compiled: bool = False) -> DecodeGraphs | None:
        """Graph-captured decode steps, when the model allows them: the MoE's experts stacked for grouped
        matmuls (not FP8 experts, and only where ``torch._grouped_mm`` runs for this GPU and dtype). With
        ``compiled``, compiled by inductor and captured now (``DecodeGraphs.warm_up``); where that fails,
        plain graphs (logged: why)."""
        model = self.model
        moes = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]
        if moes and not grouped_matmul_available(model.device, model.dtype):
            log.info("no CUDA graphs: grouped matmuls do not run on this GPU in %s", model.dtype)
            return None
        try:
            for moe in moes:
                moe.stack_experts()
        except ValueError as e:
            log.info("no CUDA graphs: %s", e)
            return None
        k = self.num_speculative_tokens  # each request's drafts are rows too, and the MTP pass a second graph
        rows = self.config.max_num_seqs * (1 + k)
        if compiled:
            graphs = DecodeGraphs(model, self.cache, rows, self.max_model_len, compile=True)
            try:
                graphs.warm_up()
                return graphs
            except GraphCaptureError as e:
                log.warning("no compiled decode step (plain CUDA graphs instead): %s", e)
        return DecodeGraphs(model, self.cache, rows, self.max_model_len, draft=bool(k))

    def _compiled_decode(self) -> CompiledDecode | None:
        """The compiled CPU decode step, compiled now; None where it cannot be (logged: why)."""
        try:
            compiled = CompiledDecode(
                self.model, self.cache, self.max_model_len
            )  # ValueError: not this model
            compiled.warm_up()
        except (ValueError, GraphCaptureError) as e:
            log.warning("no compiled CPU decode step: %s", e)
            return None
        return compiled

    @property
    def decode_step_compiled(self) -> bool:
        """Whether decode steps run compiled (``compile_decode`` took effect)."""
        return self.runner.graphs is not None and self.runner.graphs.compiled

    @property
    def prefill_compiled(self) -> bool:
        """Whether steps with prefill chunks run compiled (``compile_prefill`` took effect)."""
        return self.runner.compiled is not None

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.pool.block_size

    def attach_tokenizer(self, tokenizer) -> None:
        """Enable constrained decoding: the grammar compiler of this tokenizer over the model's vocabulary rows
        (built once per tokenizer and shared). A model with fewer rows than the tokenizer has ids gets none.
        Where the model has more rows than the tokenizer has ids, those rows' ids are never sampled and are
        refused in prompts, ``logit_bias`` and ``stop_token_ids`` (``token_limit``): every id the engine emits
        can be detokenized and sent back."""
        rows = self.model.config.vocab_size
        self.tokenizer = tokenizer
        if tokenizer.vocab_size < rows:
            self.token_limit = self.runner.token_limit = tokenizer.vocab_size
        if rows < tokenizer.vocab_size or self.grammar is not None:
            return
        self.grammar = GrammarCompiler.for_tokenizer(tokenizer, rows)
        self._masker = GrammarMasker(self.grammar)

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        vocab = self.token_limit or self.model.config.vocab_size
        if request_id in self.live:
            raise EngineError(f"request id {request_id!r} is already in use")
        prompt_ids = token_id_list(prompt_ids, EngineError)
        if not prompt_ids:
            raise EngineError("the prompt must hold at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise EngineError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        params.validate(vocab)
        if params.n != 1:
            raise EngineError(f"one engine request samples once (n={params.n}): submit params.samples() each")
        if params.priority and self.scheduler.policy != "priority":
            raise EngineError(
                f"priority {params.priority} needs the priority scheduling policy (the engine schedules "
                f"{self.scheduler.policy}; dsv32 serve --scheduling-policy priority)"
            )
        n = len(prompt_ids)
        room = min(self.max_model_len, self.capacity_tokens) - n
        if room < 1:
            limit = min(self.max_model_len, self.capacity_tokens)
            raise EngineError(f"prompt of {n} tokens leaves no room to generate within {limit} tokens")
        if params.max_tokens is not None and params.max_tokens > room:
            raise EngineError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the limit of "
                f"{n + room} tokens (model context {self.max_model_len}, cache {self.capacity_tokens})"
            )
        max_tokens = room if params.max_tokens is None else params.max_tokens
        guided = None
        if params.guided is not None:
            if self.grammar is None:
                raise EngineError(
                    "constrained decoding needs the engine's tokenizer (EngineCore.attach_tokenizer)"
                )
            guided = self.grammar.new_state(params.guided)
        bad_words = []
        if params.bad_words:
            if self.tokenizer is None:
                raise EngineError("bad_words needs the engine's tokenizer (EngineCore.attach_tokenizer)")
            bad_words = bad_words_token_ids(self.tokenizer, params.bad_words, vocab)
        req = Request(request_id, list(prompt_ids), max_tokens, next(self._arrivals), params.priority)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * n
            req.prompt_top, req.prompt_logprobs_left = params.prompt_logprobs, n - 1
        stop_ids = set(params.stop_token_ids or [])
        if not params.ignore_eos and self.eos_id is not None:
            stop_ids.add(self.eos_id)
        state = SamplingState.create(params, req.prompt_ids)
        state.bad_words_ids = bad_words
        self.live[request_id] = _Live(req, params, state, stop_ids, guided)
        self.scheduler.add(req)

    def abort(self, request_id: str) -> bool:
        """Drop a request at once (its blocks are freed); False if it is unknown or already finished."""
        live = self.live.pop(request_id, None)
        if live is None:
            return False
        self.scheduler.finish(live.request, "abort")
        return True

    def finish(self, request_id: str, reason: str) -> None:
        """End a request from outside (e.g. a stop string matched in its text)."""
        live = self.live.pop(request_id, None)
        if live is not None:
            self.scheduler.finish(live.request, reason)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step -----------------------------------------------------------------------------
    def step(self) -> list[TokenOutput]:
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        logits = self.runner.execute(chunks)
        sampling = [c for c in chunks if c.samples]
        first_row = list(itertools.accumulate((1 + len(c.draft) for c in sampling), initial=0))
        tokens: list[list[int]] = [[] for _ in sampling]
        logprobs: list[list[dict]] = [[] for _ in sampling]
        reasons: list[str | None] = [None] * len(sampling)
        # Depth 0 samples every chunk's next token from the row of its last known token. A chunk whose
        # sampled token equals its draft token at that depth goes on to the next row, whose logits saw
        # the draft: the sampled tokens, and each request's draws from its generator, are those of
        # decoding one token at a time.
        active, depth = list(range(len(sampling))), 0
        while active:
            lives = [self.live[sampling[k].request.request_id] for k in active]
            rows = [first_row[k] + depth for k in active]
            sampled = self._sample(logits if len(rows) == len(logits) else logits[rows], lives)
            going = []
            for k, lv, (tok, lp) in zip(active, lives, sampled, strict=True):
                c, req = sampling[k], lv.request
                if tok < 0:  # its bans left no token to sample: the request ends here
                    reasons[k] = "stop"
                    log.warning("request %s: no token is left to sample; it ends here", req.request_id)
                    continue
                req.output_ids.append(tok)
                lv.state.output_ids.append(tok)
                tokens[k].append(tok)
                if lp is not None:
                    logprobs[k].append(lp)
                if tok in lv.stop_ids or (lv.guided is not None and lv.guided.advance(tok)):
                    reasons[k] = "stop"  # EOS / a stop token, or the constrained output is complete
                elif len(req.output_ids) >= req.max_tokens:
                    reasons[k] = "length"
                elif depth < len(c.draft) and tok == c.draft[depth]:
                    c.num_accepted += 1
                    going.append(k)
            active, depth = going, depth + 1
        for c in sampling:
            if c.draft:
                self.num_drafts += 1
                self.num_draft_tokens += len(c.draft)
                for j in range(c.num_accepted):
                    self.accepted_per_pos[j] += 1
        self.scheduler.after_step(chunks)
        if self.drafter is not None:
            going_on = [
                (c, self.live[c.request.request_id]) for c, r in zip(sampling, reasons, strict=True) if not r
            ]
            self.drafter.propose(chunks, going_on, self._masker)
        results = []
        for c, toks, lps, reason in zip(sampling, tokens, logprobs, reasons, strict=True):
            req, lv = c.request, self.live[c.request.request_id]
            # with the request's first output (its prompt is complete once it samples; a preempted request's
            # recomputed prompt is not sent again)
            first_output = len(req.output_ids) == len(toks)
            prompt_lps = (
                list(req.prompt_logprobs) if req.prompt_logprobs is not None and first_output else None
            )
            results.append(
                TokenOutput(
                    req.request_id, toks, lps if lv.params.logprobs else None,
                    reason is not None, reason, len(req.prompt_ids), len(req.output_ids),
                    req.num_cached_prompt or 0, prompt_lps,
                )
            )  # fmt: skip
        for r in results:
            if r.finished:
                self.finish(r.request_id, r.finish_reason)
        return results

    def _sample(self, logits: torch.Tensor, lives: list[_Live]) -> list[tuple[int, dict | None]]:
        """One token per row of ``logits`` [len(lives), V] (grammar masks applied first), with its logprobs
        entry where the request asked for logprobs."""
        early = [  # rows that may not stop yet (min_tokens): their stop tokens cannot be sampled
            (i, lv.stop_ids)
            for i, lv in enumerate(lives)
            if len(lv.request.output_ids) < lv.params.min_tokens and lv.stop_ids
        ]
        with torch.inference_mode():  # (the runner's logits are inference tensors)
            if self.token_limit is not None:  # the model's rows past the tokenizer's ids
                logits[:, self.token_limit :] = float("-inf")
            if early:
                rows = [i for i, ids in early for _ in ids]
                logits[rows, [t for _, ids in early for t in ids]] = float("-inf")
        guided = [
            (i, lv.guided) for i, lv in enumerate(lives) if lv.guided is not None and lv.guided.needs_mask
        ]
        if guided:
            self._masker.apply(logits, [i for i, _ in guided], [g for _, g in guided])
        out = self.sampler(logits, [lv.state for lv in lives])
        token_ids = out.token_ids.tolist()  # one copy from the device, not one per row
        result = []
        for i, lv in enumerate(lives):
            lp = None
            if lv.params.logprobs and out.logprobs is not None:
                k = lv.params.top_logprobs
                top = []
                if k and out.top_ids is not None:
                    top = list(
                        zip(out.top_ids[i, :k].tolist(), out.top_logprobs[i, :k].tolist(), strict=True)
                    )
                lp = {"logprob": float(out.logprobs[i]), "top": top}
            result.append((token_ids[i], lp))
        return result

    @property
    def num_accepted_tokens(self) -> int:
        """Draft tokens accepted since start."""
        return sum(self.accepted_per_pos)

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "free_blocks": self.pool.num_free,
            "total_blocks": self.pool.num_blocks,
            "cached_blocks": self.pool.num_cached,
            "prefix_cache_hit_rate": self.pool.hit_rate(),
            "preemptions": self.scheduler.num_preemptions,
            "spec_drafts": self.num_drafts,
            "spec_draft_tokens": self.num_draft_tokens,
            "spec_accepted_tokens": self.num_accepted_tokens,
            "spec_accepted_per_pos": list(self.accepted_per_pos),
        }
