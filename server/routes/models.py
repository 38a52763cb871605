"""`GET /v1/models`, `GET /v1/models/{id}`: OpenAI-compatible, the one model this process
serves (`openai.OpenAI(...).models.list()`)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..errors import error_response, server_error
from ..exceptions import NotReadyError
from ..openai_protocol import ModelCard, ModelList
from ..protocol import error_responses
from ..serving import Serving
from ..state import ServingDep, StartedDep

router = APIRouter()
OWNER = "hest"


def _served(serving: Serving, started: int) -> ModelCard | None:
    engine = serving.engine
    if engine is None:
        return None
    return ModelCard(id=str(engine.info().get("model")), created=started, owned_by=OWNER)


def _not_loaded(serving: Serving) -> Response:
    retry = serving.settings.retry_after_s
    return server_error(NotReadyError("the model is still loading", retry_after=retry))


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses=error_responses(503),
    summary="OpenAI-compatible: the one model this process serves",
)
async def list_models(serving: ServingDep, started: StartedDep) -> Response:
    card = _served(serving, started)
    if card is None:
        return _not_loaded(serving)
    return JSONResponse(ModelList(data=[card]).model_dump(mode="json"))


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    responses=error_responses(404, 503),
    summary="OpenAI-compatible: one model by id (404 unless it is the served one)",
)
async def get_model(model_id: str, serving: ServingDep, started: StartedDep) -> Response:
    card = _served(serving, started)
    if card is None:
        return _not_loaded(serving)
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
