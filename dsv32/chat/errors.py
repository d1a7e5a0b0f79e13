"""The one error type of the chat layer: bad input, reported with the field that is wrong."""

from __future__ import annotations


class ChatFormatError(ValueError):
    """A conversation, tool list or option the chat encoders cannot render.

    The message starts with the path of the offending field, e.g. ``messages[2].tool_calls[0].function.arguments``.
    """

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")
