"""HTTP routes: native summarize (+ SSE), metrics, health, info; the OpenAI routes (chat
completions, models) come from openai_api.py.

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

from hest_core import Engine, GenerationRequest

from . import formats
from .errors import error_response, install_error_handlers, server_error
from .jobs import SSE_HEADERS, stream_end, wait_or_disconnect
from .media import JsonBodies
from .metrics import Metrics
from .openai_api import add_openai_routes
from .protocol import (
    HealthResponse,
    InfoResponse,
    SummarizeRequest,
    SummarizeResponse,
    error_responses,
    sse_response,
)
from .serving import Job, NotReadyError, Serving, ShuttingDownError
from .settings import Settings

log = logging.getLogger("hest.server")
JSON_ROUTES = ("/v1/summarize", "/summarize", "/v1/chat/completions")


def load_engine(settings: Settings) -> Engine:
    return Engine.from_pretrained(
        settings.model,
        adapter=settings.adapter_arg,
        device=settings.device,
        policy=settings.policy,
        meter=settings.meter,
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
    app.add_middleware(JsonBodies, metrics=metrics, paths=JSON_ROUTES)

    def observe_answer(endpoint: str, t0: float) -> None:
        metrics.duration.labels(endpoint).observe(time.perf_counter() - t0)

    # ---- native API -----------------------------------------------------------------------------
    async def summarize(body: SummarizeRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        job = await current().submit(
            GenerationRequest(
                text=body.text,
                energy_budget_j=body.energy_budget_j,
                energy_budget_ratio=body.energy_budget_ratio,
                max_new_tokens=body.max_new_tokens,
                clean_end=body.clean_end,
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
        **error_responses(415, 422, 429, 500, 503),
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

    add_openai_routes(app, current, metrics)

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
