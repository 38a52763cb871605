"""HTTP routes: native summarize (+ SSE), OpenAI chat completions, metrics, health, info.

`create_app(settings, engine=None)` builds one app with its own metrics registry. Without an
engine the lifespan loads one from the settings in the background, so /healthz answers at once and
/readyz turns 200 only once the model is loaded and warmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hest_core import Engine, GenerationRequest, GenerationResult

from . import formats
from .errors import error_response, install_error_handlers, server_error
from .metrics import Metrics
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    SummarizeRequest,
    SummarizeResponse,
    error_responses,
    sse_response,
)
from .serving import Job, NotReadyError, ServerError, Serving, ShuttingDownError
from .settings import Settings

log = logging.getLogger("hest.server")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def load_engine(settings: Settings) -> Engine:
    return Engine.from_pretrained(
        settings.model, adapter=settings.adapter_arg, device=settings.device, policy=settings.policy
    )


def create_app(
    settings: Settings | None = None, engine: Engine | None = None, *, background_load: bool = True
) -> FastAPI:
    """One app. `engine`: a loaded engine (else one is built from `settings`).
    `background_load=False` loads before the lifespan startup completes (tests, fuzzing)."""
    settings = settings or Settings()
    metrics = Metrics()
    # the engine outlives a lifespan: a restarted lifespan (schemathesis does that) reuses it
    state: dict[str, Any] = {"load_error": None, "engine": engine, "warm": not settings.warmup}

    async def _load(serving: Serving) -> None:
        try:
            await serving.load(state["engine"] or partial(load_engine, settings), not state["warm"])
            state["engine"], state["warm"] = serving.engine, True
        except Exception as err:
            state["load_error"] = f"{type(err).__name__}: {err}"
            log.exception("model load failed; /healthz reports it")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        serving = app.state.serving = Serving(settings, metrics)
        loader = None
        if state["engine"] is not None or not background_load:
            await _load(serving)  # ready before the first request
        else:
            loader = asyncio.create_task(_load(serving), name="hest-load")
        yield
        serving.begin_drain()
        if loader is not None and not loader.done():
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
        await serving.drain(settings.drain_timeout_s)

    app = FastAPI(
        title="HEST serving",
        version="0.1.0",
        summary="Summaries under a per-request energy budget (HEST: per-token fp16/int8/skip)",
        lifespan=lifespan,
    )
    app.state.serving = Serving(settings, metrics)  # replaced by each lifespan; not ready before
    app.state.metrics, app.state.settings = metrics, settings

    def current() -> Serving:
        return app.state.serving

    install_error_handlers(app, metrics)

    # ---- helpers --------------------------------------------------------------------------------
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

    def observe_answer(endpoint: str, t0: float) -> None:
        metrics.duration.labels(endpoint).observe(time.perf_counter() - t0)

    async def stream_end(job: Job) -> tuple[GenerationResult | None, str | None]:
        try:
            return await job.wait(), None
        except ServerError as err:
            body = ErrorResponse.model_validate(
                {"error": {"message": err.message, "type": err.type, "code": err.code}}
            )
            return None, formats.sse(body.model_dump(mode="json"))

    # ---- native API -----------------------------------------------------------------------------
    async def summarize(body: SummarizeRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        job = await current().submit(
            GenerationRequest(
                text=body.text,
                energy_budget_j=body.energy_budget_j,
                energy_budget_ratio=body.energy_budget_ratio,
                max_new_tokens=body.max_new_tokens,
            ),
            stream=body.stream,
        )
        if body.stream:
            return StreamingResponse(
                summarize_events(job, t0), media_type="text/event-stream", headers=SSE_HEADERS
            )
        result = await wait_or_disconnect(job, request)
        if result is None:
            return Response(status_code=499)  # nobody is listening any more
        observe_answer("summarize", t0)
        return JSONResponse(formats.summarize_response(job, result).model_dump(mode="json"))

    async def summarize_events(job: Job, t0: float) -> AsyncIterator[str]:
        try:
            async for delta in job.deltas():
                yield formats.sse({"delta": delta})
            result, error = await stream_end(job)
            if result is not None:
                observe_answer("summarize", t0)
                body = formats.summarize_response(job, result).model_dump(mode="json")
                yield formats.sse(body | {"done": True})
            else:
                yield error or ""
            yield formats.sse("[DONE]")
        finally:
            if not job.done.is_set():
                job.cancel()  # the client went away mid-stream

    routes = {
        **sse_response(
            SummarizeResponse,
            '`{"delta": "..."}` per text piece, then the full response with `"done": true`, '
            "then `[DONE]`",
        ),
        **error_responses(422, 429, 500, 503),
    }
    app.post(
        "/v1/summarize",
        response_model=SummarizeResponse,
        responses=routes,
        summary="Summarise a text under an energy budget",
    )(summarize)
    app.post(
        "/summarize", response_model=SummarizeResponse, responses=routes, include_in_schema=False
    )(summarize)

    # ---- OpenAI chat completions ----------------------------------------------------------------
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
            **error_responses(422, 429, 500, 503),
        },
        summary="OpenAI-compatible chat completions (the last user message is the article)",
    )
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        job = await current().submit(
            GenerationRequest(
                text=formats.chat_text(body.messages),
                energy_budget_j=body.energy_budget_j,
                energy_budget_ratio=body.energy_budget_ratio,
                max_new_tokens=body.max_completion_tokens or body.max_tokens,
            ),
            stream=body.stream,
        )
        engine = current().engine
        model = str(engine.info().get("model")) if engine else body.model
        if body.stream:
            usage_chunk = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                chat_events(job, model, usage_chunk, t0),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        result = await wait_or_disconnect(job, request)
        if result is None:
            return Response(status_code=499)
        observe_answer("chat", t0)
        return JSONResponse(formats.chat_response(job, result, model).model_dump(mode="json"))

    async def chat_events(job: Job, model: str, usage_chunk: bool, t0: float) -> AsyncIterator[str]:
        chunk = partial(formats.chat_chunk, job, model)
        try:
            yield formats.sse(chunk(role=True, content=""))
            async for delta in job.deltas():
                yield formats.sse(chunk(content=delta))
            result, error = await stream_end(job)
            if result is not None:
                observe_answer("chat", t0)
                finish = formats.openai_finish(result.finish_reason)
                usage = formats.chat_usage(job, result)
                if usage_chunk:  # OpenAI: a last chunk with no choices carries the usage
                    yield formats.sse(chunk(finish=finish))
                    yield formats.sse(chunk(usage=usage, choices=False))
                else:
                    yield formats.sse(chunk(finish=finish, usage=usage))
            else:
                yield error or ""
            yield formats.sse("[DONE]")
        finally:
            if not job.done.is_set():
                job.cancel()

    # ---- operations -----------------------------------------------------------------------------
    @app.get(
        "/metrics",
        response_class=Response,
        summary="Prometheus metrics",
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics() -> Response:
        metrics.queue_depth.set(current().queue_depth)
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get(
        "/healthz",
        response_model=HealthResponse,
        responses=error_responses(500),
        summary="Liveness: the process is up (and the model did not fail to load)",
    )
    async def healthz() -> Response:
        if not current().alive:
            return error_response(
                500, "server_error", "the batching scheduler stopped", None, "scheduler_dead"
            )
        if state["load_error"]:
            return error_response(
                500,
                "server_error",
                f"model load failed: {state['load_error']}",
                None,
                "model_load_failed",
            )
        return JSONResponse({"status": "ok"})

    @app.get(
        "/readyz",
        response_model=HealthResponse,
        responses=error_responses(503),
        summary="Readiness: the model is loaded and warmed, and the server is not draining",
    )
    async def readyz() -> Response:
        serving = current()
        if serving.draining:
            return server_error(
                ShuttingDownError("draining for shutdown", retry_after=settings.retry_after_s)
            )
        if not serving.ready:
            return server_error(
                NotReadyError(
                    "the model is loading or warming up", retry_after=settings.retry_after_s
                )
            )
        return JSONResponse({"status": "ready"})

    @app.get(
        "/v1/info",
        response_model=InfoResponse,
        responses=error_responses(503),
        summary="What is served: model, adapter, device, meter, calibration, server limits",
    )
    async def info() -> Response:
        serving = current()
        if serving.engine is None:
            return server_error(
                NotReadyError("the model is still loading", retry_after=settings.retry_after_s)
            )
        eng = serving.engine
        server = settings.model_dump(
            include={
                "queue_size",
                "max_batch_size",
                "max_wait_ms",
                "default_budget_ratio",
                "slo_s",
                "brownout_floor_ratio",
                "max_new_tokens",
            }
        )
        server |= {
            "max_new_tokens_limit": eng.max_new_tokens_limit,
            "max_input_chars": eng.max_input_chars,
            "ready": serving.ready,
        }
        body = InfoResponse.model_validate(eng.info() | {"server": server})
        return JSONResponse(body.model_dump(mode="json"))

    return app
