"""Grammar-constrained decoding: JSON mode, JSON Schema, DSML tool calls — guaranteed, by token masks.

Built on ``llguidance`` (chosen over ``xgrammar`` by measurement, see the commit that added it): its lexer +
Earley parser computes each step's allowed-token set on the fly, so compiling a schema takes well under a
millisecond (a 200-property schema ~6 ms), a mask takes ~15-30 us once its lexer states are built, and a JSON
Schema keyword it cannot enforce is refused by name instead of being ignored.

A constraint is plain data in ``SamplingParams.guided`` (builtins only, so it crosses thread/process
boundaries)::

    {"json_object": True}                      # one JSON object
    {"json_schema": {...}}                     # a value valid under the schema
    {"lark": "start: ..."}                     # an llguidance Lark grammar (the API builds DSML tool calls)
    {"regex": "..."}                           # text matching the regex
    # optional, with or without one of the above:
    "start_token": 128799                      # the constraint begins after this token (``</think>``)
    "start_within": 512                        # ... which is forced after this many free tokens

The pieces:

- :func:`check_guided` validates a spec (structure, and the grammar compiles); errors are
  :class:`GuidedDecodingError` (a ``SamplingParamsError``: a 422 naming the unsupported feature).
- :class:`GrammarCompiler` — one per tokenizer, built at engine start: the llguidance tokenizer over the model's
  vocabulary rows (rows past the tokenizer's ids, and every control token, are never allowed as text) and a
  cache of compiled grammars by spec.
- :class:`GuidedState` — one per constrained request: the matcher, advanced with each sampled token; knows
  whether the constraint has started (thinking), whether it is complete (the request must end), and can roll
  back.
- :class:`GrammarMasker` — per step, fills the bitmasks of the constrained rows of a batch and applies them to
  those logits rows in one vectorised pass (free rows are untouched).
- :func:`dsml_tool_grammar` — the V3.2 DSML tool-call block as a Lark grammar (chat-format.md §2.2): forced,
  optional after content, or forbidden; arguments of each tool constrained by its parameters schema.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from functools import lru_cache
from typing import Any

import llguidance
import numpy as np
import torch
from torch import Tensor

from dsv32.engine.sampling_params import SamplingParamsError

log = logging.getLogger("dsv32.engine.grammar")

GRAMMAR_KINDS = ("json_object", "json_schema", "lark", "regex")
_OPTION_KEYS = ("start_token", "start_within")
# Compact JSON as the V3.2 encoder writes it (json.dumps defaults): ", " and ": ", no other whitespace. Flexible
# whitespace would let a model pad forever; a schema's own "x-guidance" settings still win.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 256
# llguidance's "slices" are groups of tokens a mask can allow whole, instead of walking each token through the
# lexer. Its general slices group JSON string-content tokens by length up to 10 and 30 characters, so inside a
# bounded string (``maxLength``) with fewer than 10 characters left most of the vocabulary is walked (~1 ms a
# row). Finer length groups let more of it be allowed whole: ~22% less mask time on ``dsv32 bench grammar``'s
# schema (91 -> 70 us a row) for ~0.1 s more tokenizer set-up; the masks are identical (tested).
_STRING_CHAR = r'[^"\\\x00-\x1F\x7F]'
MASK_SLICES = [
    r"[\x20\x0A\x0D\x09]+",
    *(f"{_STRING_CHAR}{{1,{n}}}" for n in (1, 2, 3, 4, 6, 8, 10, 30)),
    f"{_STRING_CHAR}+",
]


class GuidedDecodingError(SamplingParamsError):
    """A constraint that cannot be enforced; the message names the field and the unsupported feature."""

    def __init__(self, field: str, message: str):
        ValueError.__init__(self, message)
        self.field, self.value, self.allowed = field, None, ""


# ---- specs -> llguidance grammars ---------------------------------------------------------------------


def spec_key(guided: dict[str, Any]) -> str:
    """The cache key of a spec's grammar (its kind and canonical JSON, start options excluded)."""
    kind = next((k for k in GRAMMAR_KINDS if k in guided), None)
    return "" if kind is None else kind + ":" + json.dumps(guided[kind], sort_keys=True, ensure_ascii=False)


def check_guided(guided: Any) -> None:
    """Raise :class:`GuidedDecodingError` unless ``guided`` is a well-formed spec whose grammar compiles."""
    if not isinstance(guided, dict):
        raise GuidedDecodingError("guided", f"guided must be an object, got {type(guided).__name__}")
    unknown = sorted(set(guided) - set(GRAMMAR_KINDS) - set(_OPTION_KEYS))
    if unknown:
        raise GuidedDecodingError("guided", f"unknown guided decoding keys: {', '.join(unknown)}")
    kinds = [k for k in GRAMMAR_KINDS if k in guided]
    if len(kinds) > 1:
        raise GuidedDecodingError(
            "guided", f"give one of {', '.join(GRAMMAR_KINDS)}, not {' and '.join(kinds)}"
        )
    for name in _OPTION_KEYS:
        v = guided.get(name)
        if v is not None and not (
            isinstance(v, int) and not isinstance(v, bool) and v >= (name == "start_within")
        ):
            raise GuidedDecodingError(
                f"guided.{name}", f"guided.{name} must be a non-negative integer, got {v!r}"
            )
    if guided.get("start_within") is not None and guided.get("start_token") is None:
        raise GuidedDecodingError("guided.start_within", "guided.start_within needs guided.start_token")
    if not kinds:
        if guided.get("start_token") is None:
            raise GuidedDecodingError("guided", f"guided needs one of {', '.join(GRAMMAR_KINDS)}")
        return
    kind = kinds[0]
    value = guided[kind]
    if kind == "json_object" and value is not True:
        raise GuidedDecodingError("guided.json_object", "guided.json_object must be true")
    if kind == "json_schema" and not isinstance(value, (dict, bool)):
        raise GuidedDecodingError("guided.json_schema", "guided.json_schema must be a JSON Schema object")
    if kind in ("lark", "regex") and not (isinstance(value, str) and value):
        raise GuidedDecodingError(f"guided.{kind}", f"guided.{kind} must be a non-empty string")
    _grammar(spec_key(guided))


@lru_cache(maxsize=_CACHE_SIZE)
def _grammar(key: str) -> str:
    """The llguidance grammar of a spec key, validated (errors: GuidedDecodingError naming the problem)."""
    kind, _, text = key.partition(":")
    value = json.loads(text)
    try:
        if kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        elif kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_OPTIONS)
        elif kind == "lark":
            grammar = llguidance.LLMatcher.grammar_from_lark(value)
        else:
            grammar = llguidance.LLMatcher.grammar_from_regex(value)
    except (ValueError, TypeError) as e:
        raise GuidedDecodingError(f"guided.{kind}", f"invalid {kind}: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        what = "unsupported JSON Schema" if kind == "json_schema" else f"invalid {kind}"
        raise GuidedDecodingError(f"guided.{kind}", f"{what}: {_short(error)}")
    return grammar


def _short(error: str) -> str:
    return " ".join(error.split())[:400]


# ---- per tokenizer ----------------------------------------------------------------------------------------


class GrammarCompiler:
    """The llguidance tokenizer of one vocabulary and its compiled grammars, by spec.

    ``tokenizer_json`` is the HF ``tokenizer.json`` text; ``vocab_rows`` the model's logits width (DeepSeek
    pads 128,815 ids to 129,280 rows: the extra rows are never allowed). Every added/control token
    (``<think>``, ``<｜User｜>``, …) is a special token to llguidance, so no grammar matches it as text; EOS is
    allowed exactly where the grammar may end.
    """

    def __init__(
        self, tokenizer_json: str, vocab_rows: int, eos_id: int, slices: list[str] | None = MASK_SLICES
    ):
        self.vocab_rows = vocab_rows
        self.eos_id = eos_id
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer_json, n_vocab=vocab_rows, eos_token=eos_id, slices=slices
        )
        self._templates: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_rows: int) -> GrammarCompiler:
        """One compiler per (tokenizer object, vocab rows), built once and shared by every engine using it."""
        key = (id(tokenizer), vocab_rows)
        with _SHARED_LOCK:
            entry = _SHARED.get(key)
            if entry is not None and entry[0]() is tokenizer:
                return entry[1]
            compiler = cls(tokenizer_json_text(tokenizer), vocab_rows, tokenizer.eos_id)
            _SHARED[key] = (weakref.ref(tokenizer), compiler)
            return compiler

    def matcher(self, guided: dict[str, Any]) -> llguidance.LLMatcher:
        """A fresh matcher for the spec's grammar; the compiled grammar is cached (a copy per request)."""
        key = spec_key(guided)
        with self._lock:
            template = self._templates.get(key)
            if template is not None:
                self._templates.move_to_end(key)
                return template.deep_copy()
        template = llguidance.LLMatcher(self.tokenizer, _grammar(key), log_level=0)
        if template.is_error():
            kind = key.partition(":")[0]
            raise GuidedDecodingError(
                f"guided.{kind}", f"cannot compile the {kind}: {_short(template.get_error())}"
            )
        with self._lock:
            self._templates[key] = template
            while len(self._templates) > _CACHE_SIZE:
                self._templates.popitem(last=False)
        return template.deep_copy()

    def new_state(self, guided: dict[str, Any]) -> GuidedState:
        check_guided(guided)
        return GuidedState(self, guided)


_SHARED: dict[tuple[int, int], tuple[weakref.ref, GrammarCompiler]] = {}
_SHARED_LOCK = threading.Lock()


def tokenizer_json_text(tokenizer) -> str:
    """The ``tokenizer.json`` text behind a :class:`dsv32.chat.tokenizer.Tokenizer` (as loaded, adjustments
    included), or of any object with a ``path`` to one."""
    text = getattr(tokenizer, "_json", None)
    if isinstance(text, str):
        return text
    return tokenizer.path.read_text(encoding="utf-8")


# ---- per request ---------------------------------------------------------------------------------------


class GuidedState:
    """One request's constraint. Phases: ``free`` (before ``start_token``), ``active`` (the matcher decides),
    ``done`` (complete: the request must end). Without a grammar the state only forces ``start_token``."""

    def __init__(self, compiler: GrammarCompiler, guided: dict[str, Any]):
        self.compiler = compiler
        self.guided = guided
        self.start_token: int | None = guided.get("start_token")
        self.start_within: int | None = guided.get("start_within")
        self.has_grammar = any(k in guided for k in GRAMMAR_KINDS)
        self.matcher = compiler.matcher(guided) if self.has_grammar else None
        self.phase = "free" if self.start_token is not None else ("active" if self.has_grammar else "done")
        self.free_tokens = 0  # tokens sampled before the constraint started
        self.consumed = 0  # tokens the matcher has taken
        self.error: str | None = None

    @property
    def needs_mask(self) -> bool:
        return self.phase == "active" or self.forced_token() is not None

    def forced_token(self) -> int | None:
        """The one token allowed next while free (``start_token`` once ``start_within`` is used up), else None."""
        if self.phase == "free" and self.start_within is not None and self.free_tokens >= self.start_within:
            return self.start_token
        return None

    def advance(self, token: int) -> bool:
        """Take the sampled token; True when the constrained output is complete (the request must end)."""
        if self.phase == "free":
            self.free_tokens += 1
            if token == self.start_token:
                self.phase = "active" if self.has_grammar else "done_free"
            return False
        if self.phase != "active":
            return False
        if not self.matcher.consume_token(token):
            self.error = self.matcher.get_error() or f"token {token} was not allowed"
            log.warning("constrained request ended: %s", _short(self.error))
            self.phase = "done"
            return True
        self.consumed += 1
        if self.matcher.is_stopped():  # nothing can follow (EOS was taken, or only EOS could come)
            self.phase = "done"
            return True
        return False

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` tokens (speculative decoding); back to free if it reaches before the start."""
        if n <= 0:
            return
        if self.phase in ("active", "done") and self.matcher is not None and self.error is None:
            k = min(n, self.consumed)
            if k:
                self.matcher.rollback(k)
                self.consumed -= k
            self.phase = "active"
            n -= k
            if n > 0 and self.start_token is not None:  # the start token itself and free tokens before it
                self.phase = "free"
                self.free_tokens = max(0, self.free_tokens - n)
        elif self.phase in ("free", "done_free"):
            if self.phase == "done_free":
                self.phase = "free"
            self.free_tokens = max(0, self.free_tokens - n)


# ---- per step: masks ---------------------------------------------------------------------------------------


def _byte_table() -> Tensor:
    """[256, 8] fp32: for each byte value, 0 where a bit is set and -inf where not (bit 0 first)."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    return torch.where(torch.from_numpy(bits) == 1, 0.0, float("-inf")).float()


class GrammarMasker:
    """Applies the constrained rows' token masks to a batch of logits; one per engine (keeps its buffers)."""

    def __init__(self, compiler: GrammarCompiler):
        self.compiler = compiler
        self.words = (compiler.vocab_rows + 31) // 32
        self._mask = torch.empty(0, self.words, dtype=torch.int32)
        self._table = _byte_table()
        self._bytes = torch.empty(0, dtype=torch.int32)  # the mask's bytes as table indices
        self._add = torch.empty(0, 8)  # kept between steps: faulting in fresh MBs each step costs more

    @torch.inference_mode()  # the runner's logits are inference tensors
    def apply(self, logits: Tensor, rows: list[int], states: list[GuidedState]) -> None:
        """``logits[rows[i]]`` keeps only the tokens ``states[i]`` allows; other rows are untouched."""
        if rows:
            self.apply_filled(logits, rows, self.fill(states))

    def fill(self, states: list[GuidedState]) -> Tensor:
        """The allowed-token bitmasks of ``states`` -> int32 [len(states), words] (a view of a kept buffer)."""
        if self._mask.shape[0] < len(states):
            self._mask = torch.empty(len(states), self.words, dtype=torch.int32)
        mask = self._mask[: len(states)]
        for i, st in enumerate(states):
            if st.phase == "active":
                # One row after the other: ~20 us a row in most states, up to ~1 ms inside a bounded string
                # (70 us on average on the bench schema). Filling on llguidance's thread pool or a second
                # Python thread was slower: torch's OpenMP threads keep both cores of the 2-core machine.
                st.matcher.unsafe_compute_mask_ptr(mask[i].data_ptr(), self.words * 4)
            else:
                tok = st.forced_token()
                mask[i].zero_()
                if tok is not None:
                    bit = 1 << (tok % 32)
                    mask[i, tok // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit
        return mask

    @torch.inference_mode()
    def apply_filled(self, logits: Tensor, rows: list[int], mask: Tensor) -> None:
        """``logits[rows[i]]`` keeps only the tokens allowed by bitmask row ``mask[i]`` (from ``fill``)."""
        n, vocab = logits.shape
        width = min(vocab, self.words * 32)
        nbytes = len(rows) * self.words * 4
        if self._bytes.numel() < nbytes:
            self._bytes = torch.empty(nbytes, dtype=torch.int32)
            self._add = torch.empty(nbytes, 8)
        byte_index = self._bytes[:nbytes].copy_(mask.view(torch.uint8).view(-1))
        add = torch.index_select(self._table, 0, byte_index, out=self._add[:nbytes]).view(len(rows), -1)
        add = add[:, :width].to(logits.device)
        if len(rows) == n and width == vocab:
            logits.add_(add)
        else:  # row by row, in place (no gathered copies of the rows)
            for i, r in enumerate(rows):
                logits[r, :width].add_(add[i])
                if width < vocab:
                    logits[r, width:] = float("-inf")


# ---- DSML tool calls (V3.2, chat-format.md §2.2) ------------------------------------------------------------

DSML = "｜DSML｜"
_BLOCK_OPEN = f"<{DSML}function_calls>"
_BLOCK_CLOSE = f"</{DSML}function_calls>"
_PARAM_CLOSE = f"</{DSML}parameter>"
_INVOKE_CLOSE = f"</{DSML}invoke>"


def _lit(s: str) -> str:
    """A Lark string literal."""
    return json.dumps(s, ensure_ascii=False)


def _json_rule(schema: Any, defs: dict[str, Any]) -> str:
    """An inline ``%json`` of a sub-schema, with the root's definitions (so its $refs resolve)."""
    if isinstance(schema, dict):
        schema = {**defs, **schema}
        schema.setdefault("x-guidance", JSON_OPTIONS)
    return "%json " + json.dumps(schema, ensure_ascii=False)


def _raw_string_rule(schema: dict[str, Any]) -> tuple[str, bool] | None:
    """How a ``string="true"`` value (raw text) of a string-only schema is written: (Lark body, whether it is a
    plain alternative of literals), or None if raw text cannot express the schema (the value is then written
    as JSON with ``string="false"``, which the parser decodes to the same string)."""
    keys = set(schema) - {"type", "description", "title", "default", "examples", "$comment"}
    if (
        "enum" in schema
        and keys <= {"enum"}
        and schema["enum"]
        and all(isinstance(v, str) for v in schema["enum"])
    ):
        return "(" + " | ".join(_lit(v) for v in schema["enum"]) + ")", True
    if "const" in schema and isinstance(schema["const"], str) and keys <= {"const"}:
        return _lit(schema["const"]), True
    if schema.get("type") != "string" or not keys <= {"minLength", "maxLength", "pattern"}:
        return None
    lo, hi = schema.get("minLength", 0), schema.get("maxLength")
    if not (isinstance(lo, int) and (hi is None or isinstance(hi, int))):
        return None
    parts = [f"/(?s:.{{{lo},{'' if hi is None else hi}}})/"]
    pattern = schema.get("pattern")
    if pattern is not None:
        if not isinstance(pattern, str) or "/" in pattern:
            return None
        parts.append(f"/{pattern}/")
    return " & ".join(parts), False


class _DsmlGrammar:
    """Accumulates the Lark rules of one DSML grammar."""

    def __init__(self) -> None:
        self.rules: list[str] = []
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def invoke(self, fn: dict[str, Any], constrained: bool, field: str) -> str:
        """A rule for one invoke of ``fn``; its arguments follow the parameters schema when ``constrained``."""
        rule = self.name("invoke")
        head = _lit(f'<{DSML}invoke name="{fn["name"]}">\n')
        if not constrained:
            self.rules.append(f"{rule}: {head} (any_param {_lit(chr(10))})* {_lit(_INVOKE_CLOSE)}")
            return rule
        schema = fn.get("parameters")
        schema = {} if schema is None else schema
        if not isinstance(schema, dict):
            raise GuidedDecodingError(field, f"{field} must be a JSON Schema object")
        top = set(schema) - {"type", "properties", "required", "additionalProperties", "$defs", "definitions",
                             "description", "title", "$schema", "$id", "$comment", "strict"}  # fmt: skip
        if top:
            raise GuidedDecodingError(
                field,
                f"{field}: unsupported at the top level of DSML tool arguments: {', '.join(sorted(top))}",
            )
        if schema.get("type", "object") != "object":
            raise GuidedDecodingError(field, f"{field}: tool arguments must be an object")
        props = schema.get("properties") or {}
        required = schema.get("required") or []
        if not isinstance(props, dict) or not isinstance(required, list):
            raise GuidedDecodingError(field, f"{field}: properties must be an object and required a list")
        missing = [r for r in required if r not in props]
        if missing:
            raise GuidedDecodingError(field, f"{field}: required properties not in properties: {missing}")
        defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
        if not props:  # the encoder writes an empty line for a call without arguments
            self.rules.append(f"{rule}: {head} {_lit(chr(10) + _INVOKE_CLOSE)}")
            return rule
        items = []
        for key, sub in props.items():
            if not isinstance(key, str) or any(c in key for c in '"<>\n'):
                raise GuidedDecodingError(field, f"{field}: property name {key!r} cannot be written in DSML")
            param = self.param(key, sub, defs, f"{field}.properties.{key}")
            items.append(param if key in required else f"({param})?")
        self.rules.append(f"{rule}: {head} {' '.join(items)} {_lit(_INVOKE_CLOSE)}")
        return rule

    def param(self, key: str, schema: Any, defs: dict[str, Any], field: str) -> str:
        raw = _raw_string_rule(schema) if isinstance(schema, dict) else None
        head = _lit(f'<{DSML}parameter name="{key}" string="{"true" if raw is not None else "false"}">')
        rule = self.name("param")
        if raw is None:
            self.rules.append(f"{rule}: {head} {_json_rule(schema, defs)} {_lit(_PARAM_CLOSE + chr(10))}")
        elif raw[1]:
            self.rules.append(f"{rule}: {head} {raw[0]} {_lit(_PARAM_CLOSE + chr(10))}")
        else:  # free text up to the first closing tag (a lazy lexeme), within the schema's limits
            term, value = self.name("RAW"), self.name("raw")
            self.rules.append(f"{term}: {raw[0]}")
            self.rules.append(f"{value}[suffix={_lit(_PARAM_CLOSE)}]: {term}")
            self.rules.append(f"{rule}: {head} {value} {_lit(chr(10))}")
        return rule


def dsml_tool_grammar(
    tools: list[dict[str, Any]],
    *,
    choice: str = "auto",
    name: str | None = None,
    constrained: set[str] | None = None,
    parallel: bool = True,
    content_schema: dict[str, Any] | bool | None = None,
) -> str:
    """A Lark grammar for a V3.2 reply with DSML tool calls, in the exact layout of the encoder.

    ``choice``: ``"auto"`` (content, then optionally one block), ``"required"`` (the block at once, any tool)
    or ``"function"`` (the block at once, one call of ``name``); ``"none"`` (content only, never a block).
    ``tools``: OpenAI ``function`` objects; the arguments of those named in ``constrained`` (default: all)
    follow their parameters schema, the others are any parameters. ``content_schema``: a JSON Schema the
    content must follow (JSON mode), else the content is free text without DSML markup. Raises
    :class:`GuidedDecodingError` (field ``tools[i].function.parameters``) for a schema it cannot enforce.
    """
    g = _DsmlGrammar()
    names = [fn["name"] for fn in tools]
    if choice == "function":
        if name not in names:
            raise GuidedDecodingError("tool_choice", f"tool_choice names {name!r}, which is not in tools")
        picked = [(i, fn) for i, fn in enumerate(tools) if fn["name"] == name][:1]
        parallel = False
    else:
        picked = [] if choice == "none" else list(enumerate(tools))
    constrained = set(names) if constrained is None else constrained
    invokes = [g.invoke(fn, fn["name"] in constrained, f"tools[{i}].function.parameters") for i, fn in picked]
    calls = "(" + " | ".join(invokes) + ")" if invokes else None
    more = f" ({_lit(chr(10))} {calls})*" if parallel else ""
    if content_schema is not None:
        content = "content"
        g.rules.append(f"content: {_json_rule(content_schema, {})}")
    else:
        content = "TEXT"
        g.rules.append(f"TEXT: /(?s:.*)/ & ~/(?s:.*)<{DSML}(?s:.*)/")
    if choice == "none" or calls is None:
        start = f"start: {content}"
    elif choice == "auto":
        if content_schema is not None:
            opener = f"{content} {_lit(chr(10) * 2 + _BLOCK_OPEN + chr(10))}"
        else:
            g.rules.append(f"text_then[suffix={_lit(_BLOCK_OPEN)}]: TEXT")
            opener = f"text_then {_lit(chr(10))}"
        start = f"start: {content} | {opener} {calls}{more} {_lit(chr(10) + _BLOCK_CLOSE)}"
    else:
        start = (
            f"start: {_lit(chr(10) * 2 + _BLOCK_OPEN + chr(10))} {calls}{more} {_lit(chr(10) + _BLOCK_CLOSE)}"
        )
    g.rules.append(
        f"any_param: {_lit(f'<{DSML}parameter name=' + chr(34))} PNAME {_lit(chr(34) + ' string=' + chr(34))} "
        f"PBOOL {_lit(chr(34) + '>')} any_value"
    )
    g.rules.append(f"any_value[suffix={_lit(_PARAM_CLOSE)}]: /(?s:.*)/")
    g.rules.append('PNAME: /[^"<>\\n]+/')
    g.rules.append('PBOOL: "true" | "false"')
    return "\n".join([start, *g.rules]) + "\n"
