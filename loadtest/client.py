"""One HTTP request to a server and what came back: the native API or OpenAI chat-completions.

Streaming (`stream: true`) is how TTFT is measured: the time from sending the request to the first
non-empty text delta in the server-sent events; the time between tokens (TBT) is the gap between
successive text deltas (a delta may carry more than one token where a server holds text back). Native API events are `data: <json>` lines; an
event with `finish_reason` (and `energy`) is the final report, any other event with a non-empty
`text`/`delta`/`token`/`content` string is a text delta, one with `error` is a failure, and
`data: [DONE]` ends the stream. Where no delta arrived (no streaming), the server's
`timings.ttft_s` is used and the record says so (`ttft_source`).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from loadtest.spec import BudgetSpec

SUMMARY_INSTRUCTION = "Summarize the following news article in 3 sentences.\n\n"
APIS = ("native", "openai")
DEFAULT_PATHS = {"native": "/v1/summarize", "openai": "/v1/chat/completions"}
_DELTA_KEYS = ("text", "delta", "token", "content")
_ENERGY_KEYS = ("budget_j", "modelled_j", "measured_j", "estimated_j", "meter", "fp16_cost_j")


@dataclass
class RequestRecord:
    """Everything measured about one request (seconds, joules); None where not known."""

    index: int
    scheduled_s: float = 0.0  # when the schedule wanted it sent, from the run's start
    sent_s: float = 0.0  # when it was actually sent, from the run's start
    latency_s: float | None = None  # send -> last byte (answered requests)
    ttft_s: float | None = None
    ttft_source: str | None = None  # "stream" (first SSE delta) | "server" (timings.ttft_s)
    status: int | None = None  # HTTP status; None when no response came
    error: str | None = None  # error kind/code; None when ok
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    stream_deltas: int = 0
    last_delta_s: float | None = None  # send -> the last streamed text delta
    tbt_s: list[float] = field(default_factory=list)  # gaps between successive text deltas
    budget_field: str | None = None
    budget_sent: float | None = None  # the value sent in budget_field
    budget_group: str = ""
    budget_j: float | None = None  # from the response
    budget_ratio: float | None = None
    fp16_cost_j: float | None = None
    modelled_j: float | None = None
    measured_j: float | None = None
    estimated_j: float | None = None
    meter: str | None = None
    brownout: bool | None = None
    paths: dict[str, int] = field(default_factory=dict)
    server_timings: dict[str, float] = field(default_factory=dict)
    kind: str = "main"  # "long": one of the long prompts mixed in (`--long-prompts`)

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and self.status < 400

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


@dataclass(frozen=True)
class Target:
    """A server to load: base URL, protocol and the request shape."""

    url: str
    api: str = "native"
    stream: bool = True
    max_new_tokens: int = 64
    model: str = "default"  # OpenAI `model` field
    path: str | None = None  # override the endpoint path
    label: str = ""  # name in tables and plots (default: the URL)
    budget: BudgetSpec | None = None  # overrides the run's budgets for this target

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + (self.path or DEFAULT_PATHS[self.api])

    def body(self, text: str, budget_field: str | None, budget: float | None) -> dict[str, Any]:
        if self.api == "openai":
            body: dict[str, Any] = {
                "model": self.model,
                "messages": [{"role": "user", "content": SUMMARY_INSTRUCTION + text}],
                "max_tokens": self.max_new_tokens,
                "temperature": 0.0,
                "stream": self.stream,
            }
            if self.stream:
                body["stream_options"] = {"include_usage": True}
        else:
            body = {"text": text, "max_new_tokens": self.max_new_tokens, "stream": self.stream}
        if budget_field is not None and budget is not None:
            body[budget_field] = budget
        return body


async def send(
    client: httpx.AsyncClient,
    target: Target,
    record: RequestRecord,
    text: str,
    t0: float,
    extra: dict[str, Any] | None = None,
) -> RequestRecord:
    """Send one request, fill `record` in place and return it (`extra`: more body fields).
    Never raises for HTTP trouble."""
    body = target.body(text, record.budget_field, record.budget_sent) | (extra or {})
    start = time.perf_counter()
    record.sent_s = start - t0
    try:
        async with client.stream("POST", target.endpoint, json=body) as response:
            record.status = response.status_code
            if response.status_code >= 400:
                await response.aread()
                record.error = _error_code(response)
            elif target.stream and "text/event-stream" in response.headers.get("content-type", ""):
                async for event in _sse_events(response):
                    _on_event(record, target.api, event, time.perf_counter() - start)
            else:
                await response.aread()
                _fill_from_report(record, target.api, response.json())
    except httpx.TimeoutException:
        record.error = "timeout"
    except httpx.TransportError as err:
        record.error = f"transport:{type(err).__name__}"
    except (json.JSONDecodeError, ValueError) as err:
        record.error = f"bad_response:{type(err).__name__}"
    record.latency_s = time.perf_counter() - start
    if record.ok and record.ttft_s is None and "ttft_s" in record.server_timings:
        record.ttft_s, record.ttft_source = record.server_timings["ttft_s"], "server"
    return record


def _error_code(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        code = error.get("code") or error.get("type")
    except (ValueError, AttributeError):
        code = None
    return str(code) if code else f"http_{response.status_code}"


async def _sse_events(response: httpx.Response) -> AsyncIterator[Any]:
    """Yield each event's data, parsed as JSON (or the raw string when it is not JSON)."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line.strip() and data:
            yield _parse("\n".join(data))
            data = []
    if data:
        yield _parse("\n".join(data))


def _parse(payload: str) -> Any:
    try:
        return json.loads(payload)
    except json.JSONDecodeError:
        return payload


def _on_event(record: RequestRecord, api: str, event: Any, elapsed_s: float) -> None:
    if not isinstance(event, dict):
        return  # "[DONE]" and comments
    if "error" in event:
        error = event["error"] if isinstance(event["error"], dict) else {}
        record.error = f"stream:{error.get('code') or error.get('type') or 'error'}"
        return
    if api == "openai":
        delta = ""
        for choice in event.get("choices") or []:
            delta += (choice.get("delta") or {}).get("content") or ""
            record.finish_reason = choice.get("finish_reason") or record.finish_reason
        if isinstance(event.get("usage"), dict):
            _fill_usage(record, event["usage"])
    elif "finish_reason" in event and ("energy" in event or "summary" in event):
        _fill_from_report(record, api, event)
        return
    else:
        delta = next((v for k in _DELTA_KEYS if isinstance(v := event.get(k), str) and v), "")
    if delta:
        record.stream_deltas += 1
        if record.ttft_s is None:
            record.ttft_s, record.ttft_source = elapsed_s, "stream"
        if record.last_delta_s is not None:
            record.tbt_s.append(elapsed_s - record.last_delta_s)
        record.last_delta_s = elapsed_s


def _fill_from_report(record: RequestRecord, api: str, report: dict[str, Any]) -> None:
    """Copy the server's report (native response or OpenAI completion) into the record."""
    if api == "openai":
        choices = report.get("choices") or [{}]
        record.finish_reason = choices[0].get("finish_reason") or record.finish_reason
        _fill_usage(record, report.get("usage") or {})
        energy = report.get("energy")
        if isinstance(energy, dict):
            _fill_energy(record, energy)
        return
    record.finish_reason = report.get("finish_reason")
    _fill_usage(record, report.get("usage") or {})
    _fill_energy(record, report.get("energy") or {})
    record.paths = {k: int(v) for k, v in (report.get("paths") or {}).items()}
    record.server_timings = {
        k: float(v) for k, v in (report.get("timings") or {}).items() if isinstance(v, int | float)
    }


def _fill_usage(record: RequestRecord, usage: dict[str, Any]) -> None:
    record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
    record.completion_tokens = usage.get("completion_tokens", record.completion_tokens)
    # OpenAI API: the energy report rides in `usage`, nested (`usage.energy`) or flat; it may
    # carry the true finish_reason (OpenAI's own field only knows stop|length), paths, timings
    energy = usage.get("energy") if isinstance(usage.get("energy"), dict) else usage
    if energy is usage and not any(k in usage for k in _ENERGY_KEYS):
        return
    _fill_energy(record, energy)
    if isinstance(energy.get("finish_reason"), str):
        record.finish_reason = energy["finish_reason"]
    if isinstance(energy.get("paths"), dict):
        record.paths = {k: int(v) for k, v in energy["paths"].items()}
    for key in ("ttft_s", "queue_s", "total_s"):
        if isinstance(energy.get(key), int | float):
            record.server_timings[key] = float(energy[key])


def _fill_energy(record: RequestRecord, energy: dict[str, Any]) -> None:
    for key in ("budget_j", "budget_ratio", "fp16_cost_j", "modelled_j", "measured_j"):
        if isinstance(energy.get(key), int | float):
            setattr(record, key, float(energy[key]))
    if isinstance(energy.get("estimated_j"), int | float):
        record.estimated_j = float(energy["estimated_j"])
    record.meter = energy.get("meter", record.meter)
    if isinstance(energy.get("brownout"), bool):
        record.brownout = energy["brownout"]
