"""Turn a finished job into the native response or OpenAI chat objects, and chat messages into
the article text. Pure functions: no I/O, no engine."""

from __future__ import annotations

import json
import re
import time

from hest_core import GenerationResult

from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatEnergyUsage,
    ChatMessage,
    ChatUsage,
    ChunkChoice,
    ChunkDelta,
    EnergyReport,
    Paths,
    SummarizeResponse,
    Timings,
    Usage,
)
from .serving import Job

# a leading instruction paragraph such as "Summarize the following news article in 3 sentences."
_INSTRUCTION = re.compile(r"^\s*summari[sz]e\b[^\n]*\n\s*\n", re.IGNORECASE)


def sse(data: dict | str) -> str:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


def energy_report(job: Job, result: GenerationResult) -> EnergyReport:
    s = result.stats
    return EnergyReport(
        budget_j=s.budget_j,
        modelled_j=s.modelled_j,
        measured_j=s.measured_j,
        estimated_j=s.estimated_j,
        meter=s.meter,
        fp16_cost_j=s.fp16_cost_j,
        budget_ratio=s.budget_ratio,
        brownout=job.brownout,
    )


def timings(job: Job, result: GenerationResult) -> Timings:
    """From the request's arrival (before validation); queue_s is the time queued alone."""
    s = result.stats
    before = job.check_s + job.queue_s
    return Timings(queue_s=job.queue_s, ttft_s=before + s.ttft_s, total_s=before + s.total_s)


def summarize_response(job: Job, result: GenerationResult) -> SummarizeResponse:
    s = result.stats
    return SummarizeResponse(
        id=f"sum-{job.id}",
        summary=result.text,
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        energy=energy_report(job, result),
        usage=Usage(prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens),
        paths=Paths(**{p: s.paths.get(p, 0) for p in ("fp16", "int8", "skip")}),
        timings=timings(job, result),
        truncated=s.truncated,
    )


# ---- OpenAI chat ----------------------------------------------------------------------------------
def chat_text(messages: list[ChatMessage]) -> str:
    """The article: the last user message, without a leading 'Summarize ...' instruction."""
    for msg in reversed(messages):
        if msg.role != "user":
            continue
        if isinstance(msg.content, list):
            text = "\n".join(p.text for p in msg.content if p.type == "text" and p.text)
        else:
            text = msg.content or ""
        return _INSTRUCTION.sub("", text, count=1)
    return ""


def openai_finish(finish_reason: str) -> str:
    """OpenAI allows stop|length; an energy stop reads as length (the true reason is in usage)."""
    return "stop" if finish_reason in ("stop", "cancelled") else "length"


def chat_usage(job: Job, result: GenerationResult) -> ChatUsage:
    s = result.stats
    t = timings(job, result)
    energy = ChatEnergyUsage(
        **energy_report(job, result).model_dump(),
        finish_reason=result.finish_reason,
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
    return ChatCompletionResponse(
        id=f"chatcmpl-{job.id}",
        created=int(time.time()),
        model=model,
        choices=[
            ChatChoice(
                index=0,
                message=AssistantMessage(content=result.text),
                finish_reason=openai_finish(result.finish_reason),  # type: ignore[arg-type]
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
) -> dict:
    chunk = ChatCompletionChunk(
        id=f"chatcmpl-{job.id}",
        created=int(time.time()),
        model=model,
        choices=[
            ChunkChoice(
                index=0,
                delta=ChunkDelta(role="assistant" if role else None, content=content),
                finish_reason=finish,  # type: ignore[arg-type]
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
