"""The OpenAI-compatible routes: `POST /v1/chat/completions` (JSON or SSE) and `GET /v1/models`,
`GET /v1/models/{id}`. Invalid requests here answer 400, as OpenAI does (server/errors.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from functools import partial

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hest_core import GenerationResult, InvalidInputError

from . import formats
from . import openai_formats as chat_fmt
from .errors import error_response, server_error
from .jobs import SSE_HEADERS, stream_end, wait_or_disconnect
from .metrics import Metrics
from .openai_protocol import ChatCompletionRequest, ChatCompletionResponse, ModelCard, ModelList
from .protocol import error_responses, sse_response
from .serving import Job, NotReadyError, Serving

OWNER = "hest"


def add_openai_routes(app: FastAPI, current: Callable[[], Serving], metrics: Metrics) -> None:
    """Register the chat-completions and models routes on `app`."""
    started = int(time.time())

    def observe_answer(t0: float) -> None:
        metrics.duration.labels("chat").observe(time.perf_counter() - t0)

    @app.post(
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
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            job = await current().submit(chat_fmt.chat_request(body), stream=bool(body.stream))
        except InvalidInputError as err:
            err.param = chat_fmt.chat_param(err.param, body)
            raise
        engine = current().engine
        model = str(engine.info().get("model")) if engine else body.model
        if body.stream:
            usage_chunk = bool(body.stream_options and body.stream_options.include_usage)
            events = chat_events(job, model, usage_chunk, bool(body.logprobs), t0)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        result = await wait_or_disconnect(job, request)
        if result is None:
            return Response(status_code=499)
        observe_answer(t0)
        return JSONResponse(chat_fmt.chat_response(job, result, model).model_dump(mode="json"))

    async def chat_events(
        job: Job, model: str, usage_chunk: bool, logprobs: bool, t0: float
    ) -> AsyncIterator[str]:
        chunk = partial(chat_fmt.chat_chunk, job, model)
        sent = 0  # log-probability entries streamed so far
        try:
            yield formats.sse(chunk(role=True, content=""))
            async for delta in job.deltas():
                entries = getattr(delta, "logprobs", ()) if logprobs else None
                sent += len(entries or ())
                yield formats.sse(
                    chunk(content=str(delta), logprobs=chat_fmt.chat_logprobs(entries))
                )
            result, error = await stream_end(job)
            if result is not None:
                observe_answer(t0)
                yield from_result(job, chunk, result, usage_chunk, sent if logprobs else None)
            else:
                yield error or ""
            yield formats.sse("[DONE]")
        finally:
            if not job.done.is_set():
                job.cancel()

    def from_result(
        job: Job, chunk, result: GenerationResult, usage_chunk: bool, sent: int | None
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

    # ---- models ---------------------------------------------------------------------------------
    def served() -> ModelCard | None:
        engine = current().engine
        if engine is None:
            return None
        return ModelCard(id=str(engine.info().get("model")), created=started, owned_by=OWNER)

    @app.get(
        "/v1/models",
        response_model=ModelList,
        responses=error_responses(503),
        summary="OpenAI-compatible: the one model this process serves",
    )
    async def list_models() -> Response:
        card = served()
        if card is None:
            return not_loaded()
        return JSONResponse(ModelList(data=[card]).model_dump(mode="json"))

    @app.get(
        "/v1/models/{model_id:path}",
        response_model=ModelCard,
        responses=error_responses(404, 503),
        summary="OpenAI-compatible: one model by id (404 unless it is the served one)",
    )
    async def get_model(model_id: str) -> Response:
        card = served()
        if card is None:
            return not_loaded()
        if model_id != card.id:
            return error_response(
                404,
                "invalid_request_error",
                f"the model {model_id!r} does not exist here; this server serves {card.id!r} "
                "(GET /v1/models)",
                "model",
                "model_not_found",
            )
        return JSONResponse(card.model_dump(mode="json"))

    def not_loaded() -> Response:
        retry = current().settings.retry_after_s
        return server_error(NotReadyError("the model is still loading", retry_after=retry))
