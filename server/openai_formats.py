"""OpenAI chat objects: a chat request -> the runtime's GenerationRequest, and a finished job ->
chat.completion / chat.completion.chunk. Pure functions: no I/O, no engine."""

from __future__ import annotations

import re
import time

from hest_core import GenerationRequest, GenerationResult, InvalidInputError, TokenLogprob

from .formats import energy_report, timings
from .openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatEnergyUsage,
    ChatUsage,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    SystemMessage,
    UserMessage,
)
from .protocol import MAX_NEW_TOKENS, Paths
from .serving import Job

# a leading instruction paragraph such as "Summarize the following news article in 3 sentences."
_INSTRUCTION = re.compile(r"^\s*summari[sz]e\b[^\n]*\n\s*\n", re.IGNORECASE)
MESSAGES_RULE = (
    "messages must be one user message (the text to summarise), optionally after one system or "
    "developer message (instructions for the model); earlier turns and several instructions are "
    "not supported: send the text to summarise as one user message"
)


def _text(msg: SystemMessage | UserMessage) -> str:
    if isinstance(msg.content, list):  # text parts only (the schema refuses other parts)
        return "\n".join(p.text for p in msg.content)
    return msg.content


def chat_request(body: ChatCompletionRequest) -> GenerationRequest:
    """The runtime request of a chat request; InvalidInputError for what pydantic does not check
    (the order of messages, top_logprobs without logprobs, the max_tokens limits)."""
    msgs = body.messages
    if len(msgs) > 2 or msgs[-1].role != "user" or (len(msgs) == 2 and msgs[0].role == "user"):
        raise InvalidInputError(MESSAGES_RULE, param="messages", code="invalid_messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidInputError(
            f"top_logprobs={body.top_logprobs} needs logprobs: true",
            param="top_logprobs",
            code="invalid_logprobs",
        )
    for name in ("max_completion_tokens", "max_tokens"):  # each is a bound; both: the smaller
        n = getattr(body, name)
        if n is not None and n > MAX_NEW_TOKENS:
            raise InvalidInputError(
                f"{name}={n} must be an integer in 1..{MAX_NEW_TOKENS}",
                param=name,
                code="invalid_max_new_tokens",
            )
    limits = [n for n in (body.max_completion_tokens, body.max_tokens) if n is not None]
    return GenerationRequest(
        text=_INSTRUCTION.sub("", _text(msgs[-1]), count=1),
        system=_text(msgs[0]) if len(msgs) == 2 else None,
        energy_budget_j=body.energy_budget_j,
        energy_budget_ratio=body.energy_budget_ratio,
        max_new_tokens=min(limits) if limits else None,
        stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        clean_end=body.clean_end,
    )


def chat_param(param: str | None, body: ChatCompletionRequest) -> str | None:
    """The chat field behind a runtime error's param."""
    if param == "max_new_tokens":
        return "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    return {"text": "messages", "system": "messages", "logprobs": "top_logprobs"}.get(
        param or "", param
    )


def openai_finish(finish_reason: str) -> str:
    """OpenAI allows stop|length; an energy stop reads as length (the true reason is in usage)."""
    return "stop" if finish_reason in ("stop", "cancelled") else "length"


def chat_logprobs(entries: list[TokenLogprob] | tuple[TokenLogprob, ...] | None) -> dict | None:
    """choices[].logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}; None: not asked."""
    if entries is None:
        return None
    return {"content": [e.to_dict() for e in entries], "refusal": None}


def chat_usage(job: Job, result: GenerationResult) -> ChatUsage:
    s = result.stats
    t = timings(job, result)
    energy = ChatEnergyUsage(
        **energy_report(job, result).model_dump(),
        finish_reason=result.finish_reason,
        finish_detail=result.finish_detail,
        queue_s=t.queue_s,
        ttft_s=t.ttft_s,
        total_s=t.total_s,
        paths=Paths(**{p: s.paths.get(p, 0) for p in ("fp16", "int8", "skip")}),
    )
    return ChatUsage(
        prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens,
        total_tokens=s.prompt_tokens + s.completion_tokens,
        energy=energy,
    )


def chat_response(job: Job, result: GenerationResult, model: str) -> ChatCompletionResponse:
    """The chat.completion object of a finished job."""
    logprobs = chat_logprobs(result.logprobs)
    return ChatCompletionResponse(
        id=f"chatcmpl-{job.id}",
        created=int(time.time()),
        model=model,
        choices=[
            ChatChoice(
                index=0,
                message=AssistantMessage(content=result.text),
                finish_reason=openai_finish(result.finish_reason),  # type: ignore[arg-type]
                logprobs=ChoiceLogprobs.model_validate(logprobs) if logprobs else None,
            )
        ],
        usage=chat_usage(job, result),
    )


def chat_chunk(
    job: Job,
    model: str,
    *,
    content: str | None = None,
    role: bool = False,
    finish: str | None = None,
    usage: ChatUsage | None = None,
    choices: bool = True,
    logprobs: dict | None = None,
) -> dict:
    """One chat.completion.chunk as JSON-ready data (only the delta fields that are set)."""
    chunk = ChatCompletionChunk(
        id=f"chatcmpl-{job.id}",
        created=int(time.time()),
        model=model,
        choices=[
            ChunkChoice(
                index=0,
                delta=ChunkDelta(role="assistant" if role else None, content=content),
                finish_reason=finish,  # type: ignore[arg-type]
                logprobs=ChoiceLogprobs.model_validate(logprobs) if logprobs else None,
            )
        ]
        if choices
        else [],
        usage=usage,
    )
    body = chunk.model_dump(mode="json")
    for choice in body["choices"]:  # OpenAI sends only the delta fields that are set
        choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    if body["usage"] is None:
        del body["usage"]
    return body
