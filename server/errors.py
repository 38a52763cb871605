"""One error shape for every non-2xx response, and the handlers that produce it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hest_core import HestError, InvalidInputError

from .metrics import Metrics
from .protocol import ErrorResponse
from .serving import ServerError

log = logging.getLogger("hest.server")
_CHAT_PARAMS = {"text": "messages", "max_new_tokens": "max_tokens"}


def error_response(
    status: int,
    type_: str,
    message: str,
    param: str | None,
    code: str | None,
    retry_after: int | None = None,
) -> JSONResponse:
    body = ErrorResponse.model_validate(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def server_error(err: ServerError) -> JSONResponse:
    return error_response(err.status, err.type, err.message, None, err.code, err.retry_after)


def validation_message(errors: list[dict]) -> tuple[str, str | None, str | None]:
    parts, param, code = [], None, None
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            err = (e.get("ctx") or {}).get("error", "")
            return (
                f"request body is not valid JSON ({err}); send a JSON object",
                None,
                "invalid_json",
            )
        where = ".".join(loc) or "body"
        shown = repr(e.get("input"))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        parts.append(f"{where}: {e.get('msg')} (got {shown})")
        if param is None:
            param, code = (".".join(loc) or None), e.get("type")
    return "; ".join(parts), param, code


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """422 for every kind of bad input (counted as outcome=invalid), the server's own errors with
    their status and Retry-After, and a 500 in the same shape for anything unexpected."""

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, err: RequestValidationError) -> JSONResponse:
        metrics.requests.labels("invalid").inc()
        message, param, code = validation_message(list(err.errors()))
        return error_response(422, "invalid_request_error", message, param, code)

    @app.exception_handler(HestError)
    async def _on_hest(request: Request, err: HestError) -> JSONResponse:
        if isinstance(err, ServerError):
            return server_error(err)
        if isinstance(err, InvalidInputError):
            metrics.requests.labels("invalid").inc()
            param = err.param
            if request.url.path.endswith("/chat/completions"):
                param = _CHAT_PARAMS.get(param or "", param)
            return error_response(422, "invalid_request_error", err.message, param, err.code)
        log.error("runtime error: %s", err)
        return error_response(500, "server_error", err.message, err.param, err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 400:  # FastAPI could not decode the body (e.g. not UTF-8)
            metrics.requests.labels("invalid").inc()
            message = f"request body could not be parsed ({err.detail}); send UTF-8 JSON"
            return error_response(422, "invalid_request_error", message, None, "invalid_json")
        return error_response(
            err.status_code,
            "invalid_request_error",
            str(err.detail),
            None,
            f"http_{err.status_code}",
        )

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(
            500, "server_error", f"internal error: {type(err).__name__}", None, "internal_error"
        )
