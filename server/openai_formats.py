"""OpenAI chat objects of a finished job: chat.completion, chat.completion.chunk, usage (the
chat request -> runtime request mapping is in requests.py). Pure functions: no I/O, no engine."""

from __future__ import annotations

import time

from hest_core import GenerationResult, TokenLogprob

from .formats import energy_report, paths, timings
from .openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatEnergyUsage,
    ChatUsage,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
)
from .serving import Job


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
        paths=paths(result),
    )
    return ChatUsage(
        prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens,
        total_tokens=s.prompt_tokens + s.completion_tokens,
        article_tokens=s.article_tokens,
        article_tokens_read=s.article_tokens_read,
        truncated_by=s.truncated_by,
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
