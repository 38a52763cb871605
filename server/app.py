"""`create_app(settings, engine=None)`: one FastAPI app with its own metrics registry, assembled
from the lifespan, the Content-Type middleware, the error handlers and the routers of
`server/routes/`.

Without an engine the lifespan loads one from the settings in the background, so /healthz
answers at once and /readyz turns 200 only once the model is loaded and warmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI

from hest_core import Engine

from .errors import install_error_handlers
from .media import JsonBodies
from .metrics import Metrics
from .routes import chat, models, operations, summarize
from .serving import Serving
from .settings import Settings
from .state import EngineSlot, init_state

log = logging.getLogger("hest.server")
JSON_ROUTES = ("/v1/summarize", "/summarize", "/v1/chat/completions")
ROUTERS = (summarize.router, chat.router, models.router, operations.router)


def load_engine(settings: Settings) -> Engine:
    return Engine.from_pretrained(
        settings.model,
        adapter=settings.adapter_arg,
        device=settings.device,
        policy=settings.policy,
        config=settings.runtime_config(),
    )


async def _load(serving: Serving, slot: EngineSlot) -> None:
    """Load (or reuse) and warm the engine; a failure is kept for /healthz, not raised."""
    try:
        await serving.load(slot.engine or partial(load_engine, serving.settings), not slot.warm)
        slot.engine, slot.warm = serving.engine, True
    except Exception as err:
        slot.load_error = f"{type(err).__name__}: {err}"
        log.exception("model load failed; /healthz reports it")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """A fresh Serving per lifespan; on shutdown, drain what is queued and running."""
    settings, slot = app.state.settings, app.state.engine_slot
    serving = app.state.serving = Serving(settings, app.state.metrics)
    loader = None
    if slot.engine is not None or not slot.background:
        await _load(serving, slot)  # ready before the first request
    else:
        loader = asyncio.create_task(_load(serving, slot), name="hest-load")
    yield
    serving.begin_drain()
    if loader is not None and not loader.done():
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader
    await serving.drain(settings.drain_timeout_s)


def create_app(
    settings: Settings | None = None, engine: Engine | None = None, *, background_load: bool = True
) -> FastAPI:
    """One app. `engine`: a loaded engine (else one is built from `settings`).
    `background_load=False` loads before the lifespan startup completes (tests, fuzzing)."""
    settings = settings or Settings()
    metrics = Metrics()
    app = FastAPI(
        title="HEST serving",
        version="0.1.0",
        summary="Summaries under a per-request energy budget (HEST: a path per token and layer)",
        lifespan=lifespan,
    )
    init_state(app, settings, metrics, engine, background_load)
    install_error_handlers(app, metrics)
    app.add_middleware(JsonBodies, metrics=metrics, paths=JSON_ROUTES)
    for router in ROUTERS:
        app.include_router(router)
    return app
