"""What operators and orchestrators call: `GET /metrics` (Prometheus), `/healthz` (liveness),
`/readyz` (readiness) and `/v1/info` (what is served, and the server's limits)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..errors import error_response, server_error
from ..exceptions import NotReadyError, ShuttingDownError
from ..protocol import HealthResponse, InfoResponse, error_responses
from ..state import EngineSlotDep, MetricsDep, ServingDep, SettingsDep

router = APIRouter()
# the settings /v1/info reports under "server"
INFO_SETTINGS = {
    "queue_size",
    "max_batch_size",
    "max_wait_ms",
    "default_budget_ratio",
    "slo_s",
    "brownout_floor_ratio",
    "max_new_tokens",
}


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus_metrics(serving: ServingDep, metrics: MetricsDep) -> Response:
    metrics.queue_depth.set(serving.queue_depth)
    return Response(metrics.render(), media_type=metrics.content_type)


@router.get(
    "/healthz",
    response_model=HealthResponse,
    responses=error_responses(500),
    summary="Liveness: the process is up (and the model did not fail to load)",
)
async def healthz(serving: ServingDep, slot: EngineSlotDep) -> Response:
    if not serving.alive:
        return error_response(
            500, "server_error", "the batching scheduler stopped", None, "scheduler_dead"
        )
    if slot.load_error:
        message = f"model load failed: {slot.load_error}"
        return error_response(500, "server_error", message, None, "model_load_failed")
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    response_model=HealthResponse,
    responses=error_responses(503),
    summary="Readiness: the model is loaded and warmed, and the server is not draining",
)
async def readyz(serving: ServingDep, settings: SettingsDep) -> Response:
    retry = settings.retry_after_s
    if serving.draining:
        return server_error(ShuttingDownError("draining for shutdown", retry_after=retry))
    if not serving.ready:
        message = "the model is loading or warming up"
        return server_error(NotReadyError(message, retry_after=retry))
    return JSONResponse({"status": "ready"})


@router.get(
    "/v1/info",
    response_model=InfoResponse,
    responses=error_responses(503),
    summary="What is served: model, adapter, device, meter, calibration, server limits",
)
async def info(serving: ServingDep, settings: SettingsDep) -> Response:
    engine = serving.engine
    if engine is None:
        retry = settings.retry_after_s
        return server_error(NotReadyError("the model is still loading", retry_after=retry))
    server = settings.model_dump(include=INFO_SETTINGS) | {
        "max_new_tokens_limit": engine.max_new_tokens_limit,
        "max_input_chars": engine.max_input_chars,
        "ready": serving.ready,
    }
    body = InfoResponse.model_validate(engine.info() | {"server": server})
    return JSONResponse(body.model_dump(mode="json"))
