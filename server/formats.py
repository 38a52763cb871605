"""Turn a finished job into the native response and its parts (openai_formats.py builds the
OpenAI objects from these), and the server-sent event framing. Pure functions: no I/O, no
engine."""

from __future__ import annotations

import json

from hest_core import GenerationResult

from .protocol import (
    EnergyReport,
    Paths,
    SummarizeResponse,
    Timings,
    Usage,
)
from .serving import Job


def sse(data: dict | str) -> str:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


def energy_report(job: Job, result: GenerationResult) -> EnergyReport:
    s = result.stats
    return EnergyReport(
        prefill_j=s.prefill_j,
        decode_j=s.decode_j,
        j_per_token=s.modelled_j / s.completion_tokens if s.completion_tokens else None,
        co2e_g=job.co2e_g,
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


def paths(result: GenerationResult) -> Paths:
    """Gated units executed per path."""
    return Paths(dict(result.stats.paths))  # every path the engine has, zeros included


def summarize_response(job: Job, result: GenerationResult) -> SummarizeResponse:
    s = result.stats
    return SummarizeResponse(
        id=f"sum-{job.id}",
        summary=result.text,
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        finish_detail=result.finish_detail,
        energy=energy_report(job, result),
        usage=Usage(
            prompt_tokens=s.prompt_tokens,
            completion_tokens=s.completion_tokens,
            article_tokens=s.article_tokens,
            article_tokens_read=s.article_tokens_read,
        ),
        paths=paths(result),
        timings=timings(job, result),
        truncated=s.truncated,
        truncated_by=s.truncated_by,
    )
