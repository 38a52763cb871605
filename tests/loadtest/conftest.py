"""A small fake HEST server (real HTTP on 127.0.0.1) so the load generator is tested fast.

It speaks the native API (JSON and SSE) and OpenAI chat-completions with the energy report in
`usage`. Special prompts steer it: text starting "BAD" gets a 422, "SLOW" answers after 5 s,
"VIOLATE" reports modelled_j above the budget, "FULL" gets a 429.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

TOKEN_DELAY_S = 0.004
FP16_J_PER_TOKEN = 0.05


def _report(text: str, body: dict, n_tokens: int) -> dict:
    fp16_cost = FP16_J_PER_TOKEN * (len(text.split()) / 10 + int(body.get("max_new_tokens", 16)))
    ratio = body.get("energy_budget_ratio")
    budget = body.get("energy_budget_j") or fp16_cost * (ratio if ratio is not None else 1.0)
    exhausted = budget < 0.5 * fp16_cost
    modelled = budget * (1.2 if text.startswith("VIOLATE") else 0.9)
    return {
        "summary": "word " * n_tokens,
        "finish_reason": "energy_budget" if exhausted else "length",
        "energy": {
            "budget_j": budget,
            "modelled_j": modelled,
            "measured_j": None,
            "estimated_j": modelled * 1.1,
            "meter": "estimate",
            "fp16_cost_j": fp16_cost,
            "budget_ratio": budget / fp16_cost,
            "brownout": False,
        },
        "usage": {"prompt_tokens": len(text.split()), "completion_tokens": n_tokens},
        "paths": {"fp16": 10, "int8": 20, "skip": 1},
        "timings": {"queue_s": 0.0, "ttft_s": 0.01, "total_s": 0.02},
    }


def _error(status: int, code: str) -> JSONResponse:
    error = {"message": f"fake {code}", "type": "invalid_request", "param": None, "code": code}
    return JSONResponse({"error": error}, status_code=status)


def make_app() -> FastAPI:
    app = FastAPI()

    async def guard(text: str) -> JSONResponse | None:
        if text.startswith("BAD"):
            return _error(422, "invalid_text")
        if text.startswith("FULL"):
            return _error(429, "queue_full")
        if text.startswith("SLOW"):
            await asyncio.sleep(5.0)
        return None

    @app.get("/readyz")
    @app.get("/healthz")
    async def ready() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info() -> dict:
        return {"model": "fake", "policy": "hest", "meter": "estimate"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"data": [{"id": "fake"}]}

    @app.post("/v1/summarize")
    async def summarize(request: Request):
        body = await request.json()
        text = body["text"]
        if (err := await guard(text)) is not None:
            return err
        n = int(body.get("max_new_tokens", 16))
        report = _report(text, body, n)
        if not body.get("stream"):
            await asyncio.sleep(TOKEN_DELAY_S * n)
            return report

        async def events():
            for _ in range(n):
                await asyncio.sleep(TOKEN_DELAY_S)
                yield f"data: {json.dumps({'delta': 'word '})}\n\n"
            yield f"data: {json.dumps(report | {'done': True})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        text = body["messages"][-1]["content"]
        n = int(body.get("max_tokens", 16))
        native = dict(body, max_new_tokens=n)
        report = _report(text, native, n)
        # like the real server: the true finish_reason, paths and timings ride in usage.energy
        extra = {"finish_reason": report["finish_reason"], "paths": report["paths"]}
        energy = report["energy"] | extra | report["timings"]
        usage = report["usage"] | {"total_tokens": n, "energy": energy}
        report["finish_reason"] = "stop" if report["finish_reason"] == "stop" else "length"
        if not body.get("stream"):
            await asyncio.sleep(TOKEN_DELAY_S * n)
            message = {"role": "assistant", "content": report["summary"]}
            choice = {"index": 0, "message": message, "finish_reason": report["finish_reason"]}
            return {"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage}

        async def chunks():
            for i in range(n):
                await asyncio.sleep(TOKEN_DELAY_S)
                finish = report["finish_reason"] if i == n - 1 else None
                choice = {"index": 0, "delta": {"content": "word "}, "finish_reason": finish}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def fake_server() -> Iterator[str]:
    """Base URL of a running fake server on a free loopback port."""
    port = free_port()
    config = uvicorn.Config(make_app(), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake server did not start within 10 s")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def unused_url() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"
