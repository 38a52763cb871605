"""What a route does with a queued job: wait for its result unless the client leaves first, and
end a stream with the result or an error event. Shared by the native and the OpenAI routes."""

from __future__ import annotations

import asyncio

from fastapi import Request

from hest_core import GenerationResult, HestError, InvalidInputError

from .exceptions import ServerError
from .formats import sse
from .protocol import ErrorResponse
from .serving import Job

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def wait_or_disconnect(job: Job, request: Request) -> GenerationResult | None:
    """The job's result, or None if the client disconnected first (the job is cancelled)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    waiter = asyncio.ensure_future(job.wait())
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if waiter.done():
        return waiter.result()  # raises the job's ServerError, if any
    job.cancel()
    waiter.cancel()
    return None


async def stream_end(job: Job) -> tuple[GenerationResult | None, str | None]:
    """(the result, None), or (None, an SSE error event) when the job failed."""
    try:
        return await job.wait(), None
    except HestError as err:  # a ServerError, or the runtime's error for this request alone
        if isinstance(err, ServerError):
            kind = err.type
        else:
            kind = "invalid_request_error" if isinstance(err, InvalidInputError) else "server_error"
        body = ErrorResponse.model_validate(
            {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}
        )
        return None, sse(body.model_dump(mode="json"))
