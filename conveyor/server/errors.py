"""The one error type routes and serving objects raise, and its OpenAI error object."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from conveyor.server.protocol import error_body


class APIError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.param, self.headers = status, message, error_type, param, headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.error_type, self.status, self.param),
                            status_code=self.status, headers=self.headers)
