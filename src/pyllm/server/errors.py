"""Errors answered in OpenAI's shape, shared by every API surface."""
from __future__ import annotations

from typing import Any, Optional

from fastapi.responses import JSONResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
               501: "not_supported_error", 503: "unavailable_error"}
_ERROR_TYPES = ERROR_TYPES


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Any = None,
                 type: Optional[str] = None, headers: Optional[dict] = None, extra: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code if code is not None else status
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")
        self.extra = extra or {}   # more fields of the error object (llama-server's n_prompt_tokens, n_ctx)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)
