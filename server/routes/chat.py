"""`POST /v1/chat/completions`: OpenAI-compatible chat completions, JSON or server-sent
`chat.completion.chunk` events. Invalid input answers 400, as OpenAI does (server/errors.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hest_core import GenerationResult, InvalidInputError

from .. import formats
from .. import openai_formats as chat_fmt
from ..jobs import SSE_HEADERS, stream_end, wait_or_disconnect
from ..metrics import Metrics
from ..openai_protocol import ChatCompletionRequest, ChatCompletionResponse
from ..protocol import error_responses, sse_response
from ..requests import chat_param, runtime_request
from ..serving import Job
from ..state import MetricsDep, ServingDep

router = APIRouter()


def _observe(metrics: Metrics, t0: float) -> None:
    metrics.duration.labels("chat").observe(time.perf_counter() - t0)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={
        **sse_response(
            ChatCompletionResponse,
            "chat.completion.chunk objects, the usage (with `energy`) on the last one or, "
            "with stream_options.include_usage, on an extra chunk with no choices; then "
            "`[DONE]`",
        ),
        **error_responses(400, 415, 429, 500, 503),
    },
    summary="OpenAI-compatible chat completions (the last user message is the article)",
)
async def chat(
    body: ChatCompletionRequest, request: Request, serving: ServingDep, metrics: MetricsDep
) -> Response:
    t0 = time.perf_counter()
    try:
        job = await serving.submit(runtime_request(body), stream=bool(body.stream))
    except InvalidInputError as err:
        err.param = chat_param(err.param, body)
        raise
    engine = serving.engine
    model = str(engine.info().get("model")) if engine else body.model
    if body.stream:
        usage_chunk = bool(body.stream_options and body.stream_options.include_usage)
        events = chat_events(job, model, metrics, usage_chunk, bool(body.logprobs), t0)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    result = await wait_or_disconnect(job, request)
    if result is None:
        return Response(status_code=499)  # nobody is listening any more
    _observe(metrics, t0)
    return JSONResponse(chat_fmt.chat_response(job, result, model).model_dump(mode="json"))


async def chat_events(
    job: Job, model: str, metrics: Metrics, usage_chunk: bool, logprobs: bool, t0: float
) -> AsyncIterator[str]:
    """A role chunk, a chunk per text piece (with its tokens' log probabilities when asked),
    the finish chunk and the usage (or an error event), then `[DONE]`."""
    chunk = partial(chat_fmt.chat_chunk, job, model)
    sent = 0  # log-probability entries streamed so far
    try:
        yield formats.sse(chunk(role=True, content=""))
        async for delta in job.deltas():
            entries = getattr(delta, "logprobs", ()) if logprobs else None
            sent += len(entries or ())
            yield formats.sse(chunk(content=str(delta), logprobs=chat_fmt.chat_logprobs(entries)))
        result, error = await stream_end(job)
        if result is not None:
            _observe(metrics, t0)
            yield _finish(job, chunk, result, usage_chunk, sent if logprobs else None)
        else:
            yield error or ""
        yield formats.sse("[DONE]")
    finally:
        if not job.done.is_set():
            job.cancel()  # the client went away mid-stream


def _finish(
    job: Job,
    chunk: Callable[..., dict],
    result: GenerationResult,
    usage_chunk: bool,
    sent: int | None,
) -> str:
    """The finish chunk (with the log probabilities of tokens whose text was never streamed:
    a held-back stop string or partial character) and the usage."""
    finish = chat_fmt.openai_finish(result.finish_reason)
    left = result.logprobs[sent:] if sent is not None and result.logprobs is not None else None
    usage = chat_fmt.chat_usage(job, result)
    last = chunk(finish=finish, logprobs=chat_fmt.chat_logprobs(left) if left else None)
    if usage_chunk:  # OpenAI: a last chunk with no choices carries the usage
        return formats.sse(last) + formats.sse(chunk(usage=usage, choices=False))
    return formats.sse(last | {"usage": usage.model_dump(mode="json")})
