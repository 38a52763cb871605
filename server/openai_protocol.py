"""Pydantic models of the OpenAI-compatible API: chat completions (request, response, chunks,
log probabilities) and models.

The request declares every field of OpenAI's chat-completions request as the pinned `openai`
client models it (`openai/types/chat/completion_create_params.py`) and says in its schema which
values are served: a field that asks for something this server does not do accepts only its
"off" value (null, 0, "none", false...) and any other value is refused with a 400 naming it.
Unknown fields are refused too (`extra="forbid"`). The table is in docs/server.md.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from .protocol import (
    MAX_INPUT_CHARS,
    NON_BLANK,
    ONE_BUDGET,
    READ_DOC,
    BudgetJ,
    BudgetRatio,
    EnergyReport,
    MaxNewTokens,
    Paths,
    Read,
    strict_int,
)

Str = Annotated[str, Field(strict=True)]
Text = Annotated[str, Field(strict=True, pattern=NON_BLANK)]  # not blank (so not empty)
MAX_SYSTEM_CHARS = 4096  # the runtime also limits a system instruction to 1024 tokens
NULL = {"type": "null"}


def only(schema: dict, allowed, why: str) -> Any:
    """A field that accepts only the values `allowed(v)` admits (the JSON schema `schema` says the
    same) and refuses any other with `why` (400, param = the field)."""

    def check(v: Any) -> Any:
        if not allowed(v):
            raise PydanticCustomError("unsupported_value", why)
        return v

    return Annotated[Any, BeforeValidator(check), WithJsonSchema(schema)]


def _zero(v: Any) -> bool:
    return v is None or (type(v) in (int, float) and v == 0)


def _one_of(*values: Any):
    return lambda v: any(v is x if x is None or isinstance(x, bool) else v == x for x in values)


def _null_or(schema: dict) -> dict:
    return {"anyOf": [schema, NULL]}


NO_TOOLS = "tools and function calling are not supported: this server only summarises text"


def unsupported(why: str) -> Any:
    """A field whose only accepted value is null (or absence)."""
    return only(NULL, lambda v: v is None, why)


Penalty = only(
    _null_or({"const": 0}), _zero, "penalties are not supported; send 0 or leave the field out"
)
ToolChoice = only(_null_or({"const": "none"}), _one_of(None, "none"), NO_TOOLS + "; send 'none'")
NoTools = unsupported(NO_TOOLS)
NoAudio = unsupported("audio output is not supported: this server returns text")
NoModeration = unsupported("moderation is not supported here")
NoPrediction = unsupported("predicted outputs are not supported")
NoVerbosity = unsupported("verbosity is not supported: max_tokens and the budget set the length")
NoWebSearch = unsupported("web search is not supported")
LogitBias = only(
    _null_or({"type": "object", "maxProperties": 0}),
    lambda v: v is None or v == {},
    "logit_bias is not supported; send {} or leave it out",
)
Modalities = only(
    _null_or({"type": "array", "items": {"const": "text"}, "minItems": 1, "maxItems": 1}),
    lambda v: v is None or v == ["text"],
    "only text output is supported; send ['text'] or leave it out",
)
ReasoningEffort = only(
    _null_or({"const": "none"}),
    _one_of(None, "none"),
    "this model does not reason; send 'none' or leave reasoning_effort out",
)
TEXT_FORMAT = {
    "type": "object",
    "properties": {"type": {"const": "text"}},
    "required": ["type"],
    "additionalProperties": False,
}
ResponseFormat = only(
    _null_or(TEXT_FORMAT),
    lambda v: v is None or v == {"type": "text"},
    "only {'type': 'text'} is supported: no JSON mode or structured outputs",
)
ServiceTier = only(
    {"enum": ["auto", "default", None]},
    _one_of(None, "auto", "default"),
    "there is one service tier here; send 'auto' or 'default'",
)
Store = only({"enum": [False, None]}, _one_of(None, False), "nothing is stored here; send false")
Obfuscation = only(
    {"enum": [False, None]},
    _one_of(None, False),
    "stream obfuscation is not supported; send false or leave it out",
)
Bool = Annotated[bool, Field(strict=True)]
Unit = Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]
Temperature = Annotated[float, Field(strict=True, ge=0, le=2, allow_inf_nan=False)]
Stop = Annotated[str, Field(strict=True, min_length=1)]
Metadata = Annotated[
    dict[Annotated[str, Field(strict=True, max_length=64)],
         Annotated[str, Field(strict=True, max_length=512)]],
    Field(max_length=16),
]  # fmt: skip


# ---- request -------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"] = Field(description="only text parts: no images, audio or files")
    text: Text


Parts = Annotated[list[TextPart], Field(min_length=1)]
UserText = Annotated[str, Field(strict=True, max_length=MAX_INPUT_CHARS, pattern=NON_BLANK)]
SystemText = Annotated[str, Field(strict=True, max_length=MAX_SYSTEM_CHARS, pattern=NON_BLANK)]


class UserMessage(_Strict):
    role: Literal["user"]
    content: UserText | Parts = Field(
        description="the text to summarise (text parts are joined with newlines; a leading "
        "'Summarize ...' paragraph is dropped: the server adds its own instruction)"
    )
    name: Str | None = Field(None, description="accepted; one participant, so it changes nothing")


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: SystemText | Parts = Field(
        description="instructions for the model: the system turn of the chat template (at most "
        "1024 tokens); the server's summarisation instruction stays in the user turn"
    )
    name: Str | None = Field(None, description="accepted; it changes nothing")


Message = Annotated[SystemMessage | UserMessage, Discriminator("role")]
MESSAGES_SCHEMA = {  # what the route checks: [user] or [system|developer, user]
    "maxItems": 2,
    "anyOf": [
        {"maxItems": 1, "items": {"properties": {"role": {"const": "user"}}}},
        {
            "minItems": 2,
            "prefixItems": [
                {"properties": {"role": {"enum": ["system", "developer"]}}},
                {"properties": {"role": {"const": "user"}}},
            ],
        },
    ],
}


class StreamOptions(_Strict):
    include_usage: Bool | None = Field(
        None, description="an extra last chunk with no choices carries the usage"
    )
    include_obfuscation: Obfuscation = None


class PromptCacheOptions(_Strict):
    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m"] | None = None


class ChatCompletionRequest(_Strict):
    """OpenAI chat-completions request; see docs/server.md for what each field does here."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            **ONE_BUDGET,
            "if": {
                "required": ["top_logprobs"],
                "properties": {"top_logprobs": {"type": "integer"}},
            },
            "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
        },
    )

    messages: list[Message] = Field(
        min_length=1,
        json_schema_extra=MESSAGES_SCHEMA,
        description="one user message (the text to summarise), optionally after one system or "
        "developer message (instructions); earlier turns are refused",
    )
    model: Str = Field("default", description="not checked: one model per process serves any name")
    audio: NoAudio = None
    frequency_penalty: Penalty = None
    function_call: ToolChoice = None
    functions: NoTools = None
    logit_bias: LogitBias = None
    logprobs: Bool | None = Field(
        None, description="return each completion token's log probability"
    )
    max_completion_tokens: MaxNewTokens | None = Field(None, description="generated tokens at most")
    max_tokens: MaxNewTokens | None = Field(None, description="the same; with both, the smaller")
    metadata: Metadata | None = Field(
        None, description="accepted; nothing is stored, it changes nothing"
    )
    modalities: Modalities = None
    moderation: NoModeration = None
    n: strict_int(ge=1, le=1) | None = Field(None, description="1 only")
    parallel_tool_calls: NoTools = None
    prediction: NoPrediction = None
    presence_penalty: Penalty = None
    prompt_cache_key: Str | None = Field(None, description="accepted; there is no prompt cache")
    prompt_cache_options: PromptCacheOptions | None = Field(
        None, description="accepted; there is no prompt cache"
    )
    prompt_cache_retention: Literal["in_memory", "24h"] | None = Field(
        None, description="accepted; there is no prompt cache"
    )
    reasoning_effort: ReasoningEffort = None
    response_format: ResponseFormat = None
    safety_identifier: Annotated[str, Field(strict=True, max_length=128)] | None = Field(
        None, description="accepted; it changes nothing"
    )
    seed: strict_int() | None = Field(
        None, description="seeds the sampling (any integer): same seed and request, same text"
    )
    service_tier: ServiceTier = None
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = Field(
        None, description="end the text before the first of these strings (at most 4)"
    )
    store: Store = None
    stream: Bool | None = Field(None, description="server-sent events")
    stream_options: StreamOptions | None = Field(None, description="only shapes a stream")
    temperature: Temperature | None = Field(None, description="0 or absent: greedy; > 0 samples")
    tool_choice: ToolChoice = None
    tools: NoTools = None
    top_logprobs: strict_int(ge=0, le=20) | None = Field(
        None, description="alternatives per token (needs logprobs: true)"
    )
    top_p: Unit | None = Field(None, description="nucleus of the sampling (with temperature > 0)")
    user: Str | None = Field(None, description="accepted; it changes nothing")
    verbosity: NoVerbosity = None
    web_search_options: NoWebSearch = None
    energy_budget_j: BudgetJ | None = Field(None, description="HEST extension: joules")
    energy_budget_ratio: BudgetRatio | None = Field(None, description="HEST extension: ratio")
    truncate: Annotated[bool, Field(strict=True)] = Field(
        False,
        description="HEST extension: cut an article over the model's context to fit instead of "
        "refusing it (400 context_length_exceeded, with the numbers)",
    )
    clean_end: Annotated[bool, Field(strict=True)] = Field(
        True,
        description="HEST extension: end on a sentence boundary, never mid-sentence because "
        "max_tokens or the budget ran out, and before a repeated sentence (docs/server.md)",
    )
    read: Read = Field("budget", description="HEST extension: " + READ_DOC)


# ---- responses -----------------------------------------------------------------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatEnergyUsage(EnergyReport):
    finish_reason: str = Field(description="HEST finish reason (energy_budget, cancelled, ...)")
    finish_detail: str | None = Field(
        None,
        description="how the clean-ending plan shaped the end: planned (stopped at a sentence "
        "boundary because the next sentence would not fit), trimmed (a limit struck mid-sentence: "
        "cut to the last boundary), repetition (ended before a repeated sentence), steered (the "
        "last tokens were steered to end the sentence), no_sentence (the budget ran out before the "
        "first sentence ended: the content is empty), or null",
    )
    queue_s: float
    ttft_s: float
    total_s: float
    paths: Paths


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    article_tokens: int = Field(description="HEST extension: the text's tokens")
    article_tokens_read: int = Field(
        description="HEST extension: the text's tokens the prompt held (fewer when the read plan "
        "or truncate cut it; truncated_by says which)"
    )
    truncated_by: Literal["context", "budget", "policy"] | None = Field(
        None,
        description="HEST extension: context (truncate: true), budget (the read plan), policy "
        "(the adapter's own read plan, its read_ratio)",
    )
    energy: ChatEnergyUsage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    service_tier: Literal["default"] = "default"


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: ChatUsage | None = None
    service_tier: Literal["default"] = "default"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="when this server process started (Unix seconds)")
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
