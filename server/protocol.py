"""Pydantic models of the HTTP API: native summarize, OpenAI chat completions, errors, health.

Every field is strict (no "8" -> 8 coercion) so a wrong type is a 422, and budgets are finite and
> 0 in the schema itself; the runtime's `engine.check` repeats the checks that depend on the model
(text length, budget minimum, max_new_tokens limit) before a request is queued.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Caps far above any real request keep budget arithmetic finite (ratio x fp16 cost overflows
# to inf for ratios near 1e308); a ratio above 1 already means "no constraint".
MAX_BUDGET_J = 1e9
MAX_BUDGET_RATIO = 1e3
BudgetJ = Annotated[float, Field(strict=True, gt=0, le=MAX_BUDGET_J, allow_inf_nan=False)]
BudgetRatio = Annotated[float, Field(strict=True, gt=0, le=MAX_BUDGET_RATIO, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- errors -------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str = Field(description="what was wrong, with the bad value and the fix")
    type: str = Field(
        description="invalid_request_error | overloaded_error | unavailable_error | server_error"
    )
    param: str | None = Field(None, description="the offending field, if any")
    code: str | None = Field(None, description="a short snake_case code, e.g. budget_below_minimum")


class ErrorResponse(BaseModel):
    """The one error shape of every non-2xx response."""

    error: ErrorDetail


# ---- native API -----------------------------------------------------------------------------------
class SummarizeRequest(_Request):
    text: Annotated[str, Field(strict=True, min_length=1)] = Field(
        description="the article to summarise (the server's /v1/info gives max_input_chars)"
    )
    energy_budget_j: BudgetJ | None = Field(
        None, description="budget in (modelled) joules; give this or energy_budget_ratio"
    )
    energy_budget_ratio: BudgetRatio | None = Field(
        None,
        description="budget as a fraction of the modelled all-fp16 cost of this request; "
        "the server's default ratio applies when neither budget field is given",
    )
    max_new_tokens: PositiveInt | None = Field(None, description="generated tokens at most")
    stream: Annotated[bool, Field(strict=True)] = Field(
        False, description="server-sent events: text deltas, then the full response"
    )


class EnergyReport(BaseModel):
    budget_j: float = Field(description="the budget the request ran under (after any brownout)")
    modelled_j: float = Field(description="modelled energy of the work executed; <= budget_j")
    measured_j: float | None = Field(description="hardware meter reading, null without a meter")
    estimated_j: float = Field(description="wall time x nominal watts (an estimate)")
    meter: str = Field(description="nvml | rapl | estimate")
    fp16_cost_j: float = Field(description="modelled all-fp16 cost of prompt + max_new_tokens")
    budget_ratio: float = Field(description="budget_j / fp16_cost_j")
    brownout: bool = Field(description="the server tightened this budget because of overload")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Paths(BaseModel):
    fp16: int
    int8: int
    skip: int


class Timings(BaseModel):
    queue_s: float = Field(description="time queued before the batch started")
    ttft_s: float = Field(description="arrival to the first token")
    total_s: float = Field(description="arrival to the last token")


class SummarizeResponse(BaseModel):
    id: str
    summary: str
    finish_reason: Literal["stop", "length", "energy_budget", "cancelled"]
    energy: EnergyReport
    usage: Usage
    paths: Paths
    timings: Timings
    truncated: bool = Field(description="the article was cut to the model's article limit")


class SummarizeStreamDone(SummarizeResponse):
    """The last JSON event of a stream (before `data: [DONE]`)."""

    done: Literal[True] = True


# ---- OpenAI chat completions ----------------------------------------------------------------------
class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Annotated[str, Field(strict=True)]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Request):
    include_usage: Annotated[bool, Field(strict=True)] = False


class ChatCompletionRequest(_Request):
    """OpenAI chat-completions request. The article is the last user message (a leading
    'Summarize ...' instruction paragraph is dropped: the server adds its own). Sampling
    fields (temperature, top_p, ...) are accepted and ignored: decoding is greedy."""

    model: Annotated[str, Field(strict=True)] = Field("default", description="ignored: one model")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=1)] = 1
    stream: Annotated[bool, Field(strict=True)] = False
    stream_options: StreamOptions | None = None
    energy_budget_j: BudgetJ | None = Field(None, description="HEST extension: joules")
    energy_budget_ratio: BudgetRatio | None = Field(None, description="HEST extension: ratio")


class ChatEnergyUsage(EnergyReport):
    finish_reason: str = Field(description="HEST finish reason (energy_budget, cancelled, ...)")
    queue_s: float
    ttft_s: float
    total_s: float
    paths: Paths


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    energy: ChatEnergyUsage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: ChatUsage | None = None


# ---- health / info --------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    status: str


class InfoResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    adapter: str | None
    device: str
    dtype: str
    policy: str
    meter: str
    calibration: dict[str, Any]
    server: dict[str, Any]


# ---- OpenAPI helpers ------------------------------------------------------------------------------
def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries that declare ErrorResponse for each status code."""
    text = {
        422: "invalid input (the message says what and how to fix it)",
        429: "queue full; retry after the Retry-After header's seconds",
        500: "the engine failed on this batch (never caused by user input)",
        503: "not ready yet or shutting down; retry after Retry-After seconds",
    }
    return {c: {"model": ErrorResponse, "description": text.get(c, "error")} for c in codes}


SSE_EVENT_SCHEMA = {  # one event (OpenAPI < 3.2: `schema` of text/event-stream describes an event)
    "type": "object",
    "properties": {
        "data": {
            "type": "string",
            "description": "a JSON object (a text delta, the final response with done=true, or "
            "{error: ...}), or the end marker [DONE]",
        },
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}


def sse_response(model: type[BaseModel], events: str) -> dict[int | str, dict[str, Any]]:
    """A 200 entry with JSON and, for `stream: true`, text/event-stream."""
    return {
        200: {
            "model": model,
            "description": f"JSON, or server-sent events when `stream` is true: {events}",
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        }
    }
