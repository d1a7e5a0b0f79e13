"""Chat-side text handling (no torch): tokenizer, prompt encoders, output parsers, detokenizer.

- :func:`render_prompt` / :func:`encode_prompt` — OpenAI messages → prompt text / ids for the DeepSeek-V3.2
  (DSML), V3.1 or V3 chat format; :func:`family_for_config` picks the format for a checkpoint.
- :func:`parse_completion` / :class:`StreamParser` — generated text → reasoning, content, tool calls.
- :class:`IncrementalDetokenizer` — ids → text without broken characters.
- :func:`render_fim` / :func:`encode_fim` — fill-in-the-middle prompts.
"""

from dsv32.chat.detokenizer import IncrementalDetokenizer
from dsv32.chat.errors import ChatFormatError
from dsv32.chat.family import FAMILIES, family_for_config, family_for_model_dir
from dsv32.chat.fim import encode_fim, render_fim
from dsv32.chat.parser import Delta, StreamParser, parse_completion
from dsv32.chat.render import encode_prompt, render_prompt
from dsv32.chat.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "FAMILIES",
    "ChatFormatError",
    "Delta",
    "IncrementalDetokenizer",
    "StreamParser",
    "Tokenizer",
    "encode_fim",
    "encode_prompt",
    "family_for_config",
    "family_for_model_dir",
    "load_tokenizer",
    "parse_completion",
    "render_fim",
    "render_prompt",
]
