"""Chat-side text handling (no torch): the tokenizer, later prompt encoders and output parsers."""

from dsv32.chat.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
