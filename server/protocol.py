"""Pydantic models of the HTTP API: native summarize, errors, health (the OpenAI API's are in
openai_protocol.py).

Every field is strict (no "8" -> 8 coercion) so a wrong type is a 422; budgets must be finite
JSON numbers. The runtime's `engine.check` owns the checks of values (budget range and minimum,
text length, max_new_tokens limit) before a request is queued; the schema states its limits.
Integers accept integral floats (`8.0`), as JSON Schema's "integer" does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel

from hest_core import path_names
from hest_core.runtime.budget import MAX_BUDGET_J, MAX_BUDGET_RATIO

# The budget fields are JSON numbers here (strict, finite: the type); their range (> 0, at most
# MAX_BUDGET_J / MAX_BUDGET_RATIO) is checked once, by the runtime (hest_core/runtime/budget.py), and
# stated in the schema as MaxNewTokens' maximum is.
BudgetJ = Annotated[
    float,
    Field(
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={"exclusiveMinimum": 0, "maximum": MAX_BUDGET_J},
    ),
]
BudgetRatio = Annotated[
    float,
    Field(
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={"exclusiveMinimum": 0, "maximum": MAX_BUDGET_RATIO},
    ),
]
# the runtime's limits (Engine.max_new_tokens_limit, .max_input_chars), for the schema; a test
# checks they agree
MAX_NEW_TOKENS = 512
MAX_INPUT_CHARS = 200_000


# "not blank" as the runtime's str.strip() means it, stated the same for every regex engine: a
# character outside Python's whitespace (JSON Schema's \S differs: it lets U+0085 and U+001C-1F
# through and refuses U+FEFF)
_SPACE = "\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NON_BLANK = f"[^{_SPACE}]"


def _integral(v: Any) -> Any:
    """8.0 -> 8: JSON Schema's "integer" includes integral floats; 8.5 stays and is refused."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def strict_int(**constraints: Any) -> Any:
    """A strict integer with Field constraints (ge, le, ...) that also takes integral floats."""
    return Annotated[int, Field(strict=True, **constraints), BeforeValidator(_integral)]


# the maximum is the runtime's (its error names the limit), stated in the schema
MaxNewTokens = strict_int(ge=1, json_schema_extra={"maximum": MAX_NEW_TOKENS})


Read = Literal["budget", "whole"]
READ_DOC = (
    "budget (default): where the budget cannot pay for reading the whole article and a summary, "
    "read the article's head that leaves the summary paid for (usage.article_tokens_read says "
    "how much; docs/contracts.md); whole: read every token, whatever is left for the summary"
)


# both budget fields as numbers: refused (conflicting_budget); the schema says so
ONE_BUDGET = {
    "not": {
        "required": ["energy_budget_j", "energy_budget_ratio"],
        "properties": {
            "energy_budget_j": {"type": "number"},
            "energy_budget_ratio": {"type": "number"},
        },
    }
}


class _Request(BaseModel):
    # unknown fields are refused (422 extra_forbidden naming the field), as on the OpenAI
    # route: a misspelt budget field ("energy_budget_ration") must not run at the default budget
    model_config = ConfigDict(extra="forbid", json_schema_extra=ONE_BUDGET)


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
        description="the article to summarise (the server's /v1/info gives max_input_chars)",
        json_schema_extra={"maxLength": MAX_INPUT_CHARS, "pattern": NON_BLANK},
    )
    energy_budget_j: BudgetJ | None = Field(
        None, description="budget in (modelled) joules; give this or energy_budget_ratio"
    )
    energy_budget_ratio: BudgetRatio | None = Field(
        None,
        description="budget as a fraction of the modelled all-fp16 cost of this request; "
        "the server's default ratio applies when neither budget field is given",
    )
    max_new_tokens: MaxNewTokens | None = Field(None, description="generated tokens at most")
    instruction: Annotated[str, Field(strict=True, min_length=1, max_length=4096)] | None = Field(
        None,
        description='the instruction before the text, replacing the default "Summarize the '
        'following news article in 3 sentences." (e.g. "Summarize each of the following news '
        'articles in one or two sentences." for a digest); at most 1024 tokens',
        json_schema_extra={"pattern": NON_BLANK},
    )
    truncate: Annotated[bool, Field(strict=True)] = Field(
        False,
        description="a text over the model's context (minus max_new_tokens; /v1/info gives "
        "max_context_tokens) is refused with the numbers; true cuts the article to fit instead "
        "(the response then says truncated: true)",
    )
    clean_end: Annotated[bool, Field(strict=True)] = Field(
        True,
        description="end on a sentence boundary, never mid-sentence because max_new_tokens or "
        "the budget ran out, and before a repeated sentence",
    )
    read: Read = Field("budget", description=READ_DOC)
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
    prefill_j: float = Field(description="modelled joules of the prompt (and the first token)")
    decode_j: float = Field(description="modelled joules of the later decode steps")
    j_per_token: float | None = Field(
        description="modelled_j / completion_tokens (null without generated tokens)"
    )
    co2e_g: float | None = Field(
        description="an estimate: grams CO2e of measured_j (else estimated_j) at the configured "
        "grid intensity (HEST_GRID_INTENSITY_G_PER_KWH); null when none is configured"
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    article_tokens: int = Field(description="the article's tokens (after any cut to the context)")
    article_tokens_read: int = Field(
        description="the article tokens the prompt held: fewer than article_tokens when the read "
        "plan (read: budget) or truncate cut it"
    )


class Paths(RootModel[dict[str, int]]):
    """Units (layer x token) that ran on each path, keyed by the runtime's path names (its
    registry, `hest_core.path_names()`: fp16, int8, skip, and any path registered)."""

    model_config = ConfigDict(json_schema_extra={"examples": [dict.fromkeys(path_names(), 0)]})


class Timings(BaseModel):
    queue_s: float = Field(description="time queued before the batch started")
    ttft_s: float = Field(description="arrival to the first token")
    total_s: float = Field(description="arrival to the last token")


class SummarizeResponse(BaseModel):
    id: str
    summary: str
    finish_reason: Literal["stop", "length", "energy_budget", "cancelled"]
    finish_detail: str | None = Field(
        None,
        description="how the clean-ending plan shaped the end: planned (stopped at a sentence "
        "boundary because the next sentence would not fit), trimmed (a limit struck mid-sentence: "
        "cut to the last boundary), repetition (ended before a repeated sentence), steered (the "
        "last tokens were steered to end the sentence), no_sentence (the budget ran out before the "
        "first sentence ended: the summary is empty), or null",
    )
    energy: EnergyReport
    usage: Usage
    paths: Paths
    timings: Timings
    truncated: bool = Field(description="the article was cut: see truncated_by")
    truncated_by: Literal["context", "budget", "policy"] | None = Field(
        None,
        description="context: cut to the model's context (truncate: true); budget: the read plan "
        "read the article's head because the budget could not pay for all of it and a summary; "
        "policy: the adapter's own read plan read the head although the budget could pay for more "
        "(its read_ratio; read: whole turns it off)",
    )


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
        400: "invalid input (the message says what and how to fix it; OpenAI's status)",
        404: "no such model",
        415: "the body's Content-Type is neither JSON nor one read as JSON (docs/server.md)",
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
