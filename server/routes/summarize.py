"""`POST /v1/summarize` (alias `POST /summarize`, not in the schema): the native API, JSON or
server-sent events. Invalid input answers 422 (server/errors.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .. import formats
from ..jobs import SSE_HEADERS, stream_end, wait_or_disconnect
from ..metrics import Metrics
from ..protocol import SummarizeRequest, SummarizeResponse, error_responses, sse_response
from ..requests import runtime_request
from ..serving import Job
from ..state import MetricsDep, ServingDep

router = APIRouter()
RESPONSES = {
    **sse_response(
        SummarizeResponse,
        '`{"delta": "..."}` per text piece, then the full response with `"done": true`, '
        "then `[DONE]`",
    ),
    **error_responses(415, 422, 429, 500, 503),
}


def _observe(metrics: Metrics, t0: float) -> None:
    metrics.duration.labels("summarize").observe(time.perf_counter() - t0)


@router.post(
    "/v1/summarize",
    response_model=SummarizeResponse,
    responses=RESPONSES,
    summary="Summarise a text under an energy budget",
)
async def summarize(
    body: SummarizeRequest, request: Request, serving: ServingDep, metrics: MetricsDep
) -> Response:
    t0 = time.perf_counter()
    job = await serving.submit(runtime_request(body), stream=body.stream)
    if body.stream:
        events = summarize_events(job, metrics, t0)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    result = await wait_or_disconnect(job, request)
    if result is None:
        return Response(status_code=499)  # nobody is listening any more
    _observe(metrics, t0)
    return JSONResponse(formats.summarize_response(job, result).model_dump(mode="json"))


async def summarize_events(job: Job, metrics: Metrics, t0: float) -> AsyncIterator[str]:
    """The deltas, then the full response with `"done": true` (or an error event), then
    `[DONE]`; a client that leaves mid-stream cancels the job."""
    try:
        async for delta in job.deltas():
            yield formats.sse({"delta": delta})
        result, error = await stream_end(job)
        if result is not None:
            _observe(metrics, t0)
            body = formats.summarize_response(job, result).model_dump(mode="json")
            yield formats.sse(body | {"done": True})
        else:
            yield error or ""
        yield formats.sse("[DONE]")
    finally:
        if not job.done.is_set():
            job.cancel()  # the client went away mid-stream


# the alias without /v1 (docs/server.md), left out of the schema
router.post(
    "/summarize", response_model=SummarizeResponse, responses=RESPONSES, include_in_schema=False
)(summarize)
