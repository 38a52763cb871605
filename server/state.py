"""What the routes read from `app.state`, and the FastAPI dependencies that hand it to them.

`create_app` calls `init_state` once per app. Each lifespan replaces `serving` with a fresh one;
the loaded engine lives in `engine_slot`, so a restarted lifespan (schemathesis does that) reuses it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from hest_core import Engine

from .metrics import Metrics
from .serving import Serving
from .settings import Settings


@dataclass
class EngineSlot:
    """The engine across lifespans, and why it is missing if it failed to load."""

    engine: Engine | None  # None until loaded (or given to create_app)
    warm: bool  # warmed up already, or warmup is off
    background: bool  # load in a task so /healthz answers at once (else before startup ends)
    load_error: str | None = None  # "Type: message" of a failed load; /healthz reports it


def init_state(
    app: FastAPI, settings: Settings, metrics: Metrics, engine: Engine | None, background: bool
) -> None:
    app.state.settings, app.state.metrics = settings, metrics
    app.state.serving = Serving(settings, metrics)  # replaced by each lifespan; not ready before
    app.state.engine_slot = EngineSlot(engine, warm=not settings.warmup, background=background)
    app.state.started = int(time.time())  # `created` of the served model (GET /v1/models)


# async: FastAPI runs a plain `def` dependency in its thread pool, a hop per request
async def get_serving(request: Request) -> Serving:
    return request.app.state.serving


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_engine_slot(request: Request) -> EngineSlot:
    return request.app.state.engine_slot


async def get_started(request: Request) -> int:
    return request.app.state.started


ServingDep = Annotated[Serving, Depends(get_serving)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineSlotDep = Annotated[EngineSlot, Depends(get_engine_slot)]
StartedDep = Annotated[int, Depends(get_started)]
