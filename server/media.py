"""The Content-Type of a POST body on the JSON routes.

`curl -d '{...}'` sends `application/x-www-form-urlencoded`, `fetch` with a string body sends
`text/plain`, and some clients send no Content-Type at all; FastAPI would hand such a body to the
model as bytes and answer a confusing 422. These three are read as JSON (an invalid body then gets
the usual `invalid_json` error); any other non-JSON type (multipart/form-data, application/xml,
...) is answered 415 `unsupported_media_type`, naming it. A pure ASGI middleware: streaming and
disconnect detection pass through untouched.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response
from .metrics import Metrics

READ_AS_JSON = ("", "application/x-www-form-urlencoded", "text/plain")


def media_type(value: str) -> str:
    """`Application/JSON; charset=utf-8` -> `application/json`."""
    return value.split(";", 1)[0].strip().lower()


def is_json(mt: str) -> bool:
    """application/json or any application/*+json."""
    return mt == "application/json" or (mt.startswith("application/") and mt.endswith("+json"))


class JsonBodies:
    """ASGI middleware: on POSTs to `paths`, read the READ_AS_JSON types as JSON and answer 415
    for any other non-JSON Content-Type."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: tuple[str, ...]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
        given = [v for k, v in scope["headers"] if k.lower() == b"content-type"]
        raw = given[-1].decode("latin-1") if given else ""
        mt = media_type(raw)
        if is_json(mt):
            await self.app(scope, receive, send)
        elif mt in READ_AS_JSON:
            headers.append((b"content-type", b"application/json"))
            await self.app(dict(scope, headers=headers), receive, send)
        else:
            self.metrics.requests.labels("invalid").inc()
            response = error_response(
                415,
                "invalid_request_error",
                f"Content-Type {raw!r} is not supported; send the body as JSON with "
                "Content-Type: application/json (a body without one, or sent as "
                "application/x-www-form-urlencoded or text/plain, is read as JSON too)",
                "Content-Type",
                "unsupported_media_type",
            )
            await response(scope, receive, send)
