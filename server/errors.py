"""One error shape for every non-2xx response, and the handlers that produce it. Bad input is a
422 on the native API and a 400 on the OpenAI routes (as OpenAI answers)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hest_core import HestError, InvalidInputError

from .exceptions import ServerError
from .metrics import Metrics
from .protocol import NON_BLANK, ErrorResponse

log = logging.getLogger("hest.server")
OPENAI_PREFIXES = ("/v1/chat/", "/v1/models")
_TAGS = {"system", "developer", "user"}  # the message union's tags in an error location
ROLE_RULE = (
    "role must be 'user' (the text to summarise) or 'system'/'developer' (instructions); "
    "earlier turns (assistant, tool, function) are not supported"
)


def invalid_status(path: str) -> int:
    """400 on the OpenAI routes, 422 on the native API."""
    return 400 if path.startswith(OPENAI_PREFIXES) else 422


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


def _where(loc: tuple) -> list[str]:
    """A pydantic error location as field names: without "body", a message's union tag or a
    union branch label (`str`, `constrained-str`, `list[TextPart]`)."""
    out: list[str] = []
    for i, x in enumerate(loc):
        if x == "body" and i == 0:
            continue
        if isinstance(x, str) and (
            "[" in x or "-" in x or x in ("str", "int", "float", "bool")
            or (x in _TAGS and i >= 2 and isinstance(loc[i - 1], int) and loc[i - 2] == "messages")
        ):  # fmt: skip
            continue
        out.append(str(x))
    return out


def _explain(e: dict, loc: list[str]) -> tuple[str, list[str], str | None]:
    """(message, location, code) of one pydantic error, with clearer words for some."""
    kind, msg = e.get("type"), str(e.get("msg"))
    if kind in ("union_tag_invalid", "union_tag_not_found") and loc[:1] == ["messages"]:
        return ROLE_RULE, [*loc, "role"], "invalid_role"
    if kind == "extra_forbidden":
        msg = "unknown field: not part of this API (docs/server.md lists the fields)"
    if kind == "string_pattern_mismatch" and (e.get("ctx") or {}).get("pattern") == NON_BLANK:
        msg, kind = "is blank; send text", "empty_text"  # the native route's code for it
    return msg, loc, kind


def _branch_noise(explained: list[tuple[dict, tuple[str, list[str], str | None]]]) -> set[int]:
    """Indexes of errors that only say a union's other branch did not match the input's type
    (`content` "" is a string: "Input should be a valid list" adds nothing to "is blank"):
    a `*_type` error at a location where another error is not a type mismatch."""
    kinds_at: dict[str, list[str]] = {}
    for _e, (_m, loc, kind) in explained:
        kinds_at.setdefault(".".join(loc), []).append(str(kind or ""))
    return {
        i
        for i, (_e, (_m, loc, kind)) in enumerate(explained)
        if str(kind or "").endswith("_type")
        and not all(k.endswith("_type") for k in kinds_at[".".join(loc)])
    }


def validation_message(errors: list[dict]) -> tuple[str, str | None, str | None]:
    """(message, param, code) of a request's validation errors (the first three). The param is
    the deepest location: of a union's branches, the one that got furthest (a list of content
    parts with a bad part names the part, not `content`)."""
    parts, param, code, depth = [], None, None, -1
    explained = [(e, _explain(e, _where(tuple(e.get("loc", ()))))) for e in errors]
    noise = _branch_noise(explained)
    for e, (msg, loc, kind) in [x for i, x in enumerate(explained) if i not in noise][:3]:
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
        parts.append(f"{where}: {msg} (got {shown})")
        if len(loc) > depth:
            param, code, depth = (".".join(loc) or None), kind, len(loc)
    return "; ".join(parts), param, code


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """422 (400 on the OpenAI routes) for every kind of bad input (counted as outcome=invalid),
    the server's own errors with their status and Retry-After, a 405 with its Allow header, and a
    500 in the same shape for anything unexpected."""

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, err: RequestValidationError) -> JSONResponse:
        metrics.requests.labels("invalid").inc()
        message, param, code = validation_message(list(err.errors()))
        status = invalid_status(request.url.path)
        return error_response(status, "invalid_request_error", message, param, code)

    @app.exception_handler(HestError)
    async def _on_hest(request: Request, err: HestError) -> JSONResponse:
        if isinstance(err, ServerError):
            return server_error(err)
        if isinstance(err, InvalidInputError):  # the route named the param in its own terms
            if not getattr(err, "counted", False):  # a batch's per-request error is counted
                metrics.requests.labels("invalid").inc()
            status = invalid_status(request.url.path)
            return error_response(status, "invalid_request_error", err.message, err.param, err.code)
        log.error("runtime error: %s", err)
        return error_response(500, "server_error", err.message, err.param, err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 400:  # FastAPI could not decode the body (e.g. not UTF-8)
            metrics.requests.labels("invalid").inc()
            message = f"request body could not be parsed ({err.detail}); send UTF-8 JSON"
            status = invalid_status(request.url.path)
            return error_response(status, "invalid_request_error", message, None, "invalid_json")
        response = error_response(
            err.status_code,
            "invalid_request_error",
            str(err.detail),
            None,
            f"http_{err.status_code}",
        )
        response.headers.update(err.headers or {})  # a 405's Allow (RFC 9110)
        return response

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(
            500, "server_error", f"internal error: {type(err).__name__}", None, "internal_error"
        )
