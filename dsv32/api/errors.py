"""DeepSeek-style API errors: a status code and ``{"error": {"message", "type", "param", "code"}}``.

400 malformed body or structure, 401 authentication, 422 invalid parameter value, 429 rate limit,
503 overloaded. Every error raised while serving a request is one of these; nothing reaches the
client as a bare 500 for bad input.
"""

from __future__ import annotations

from typing import Any

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "service_unavailable_error",
}
_CODES = {
    400: "invalid_request_error",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    422: "invalid_parameter",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "server_overloaded",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "api_error"),
                "param": self.param,
                "code": _CODES.get(self.status, "error"),
            }
        }


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def invalid_param(message: str, param: str | None = None) -> APIError:
    return APIError(422, message, param)
