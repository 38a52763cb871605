"""Faults and overload on the tiny model: queue full, an engine exception in one batch, clients
that disconnect mid-generation, brownout, draining, SIGTERM during a request. Faults are injected
by wrapping the real engine's generate, never by mocking the server."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import pytest
from server_helpers import (
    ARTICLE,
    TEST_THREADS,
    ServerProcess,
    in_process,
    metric,
    slow_generate,
    tiny_settings,
    uvicorn_thread,
)

from hest_core import GenerationRequest
from server import create_app

LONG = {"text": ARTICLE, "max_new_tokens": 48, "energy_budget_ratio": 5.0}
SHORT = {"text": ARTICLE, "max_new_tokens": 4}


async def _until(cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.anyio
async def test_batches_mix_budgets(tiny_engine, monkeypatch) -> None:
    seen: list = []
    monkeypatch.setattr(tiny_engine, "generate", slow_generate(tiny_engine, 0.0, seen))
    # budgets between this prompt's minimum and its fp16 cost: the tiny model's minimum ratio
    # depends on the machine's calibration (it has been anywhere from ~0.3 to ~0.8)
    p = tiny_engine.check(
        GenerationRequest(SHORT["text"], energy_budget_ratio=1.0, max_new_tokens=4)
    )
    lo = p.min_j / p.fp16_cost_j
    ratios = [lo + (1 - lo) * f for f in (0.2, 0.6, 1.0)]
    async with in_process(tiny_engine, max_wait_ms=300) as client:
        bodies = [SHORT | {"energy_budget_ratio": r} for r in ratios]
        bodies.append(SHORT | {"energy_budget_j": p.min_j + (p.fp16_cost_j - p.min_j) * 0.4})
        rs = await asyncio.gather(*(client.post("/v1/summarize", json=b) for b in bodies))
        m = (await client.get("/metrics")).text
    assert [r.status_code for r in rs] == [200] * 4
    assert [len(b) for b in seen] == [4], "the four requests should share one batch"
    assert len({round(p.budget_ratio, 3) for p in seen[0]}) == 4
    assert metric(m, "hest_batch_size_sum") == 4 and metric(m, "hest_batch_size_count") == 1


@pytest.mark.anyio
async def test_queue_full_gets_429_then_recovers(tiny_engine, monkeypatch) -> None:
    seen: list = []
    monkeypatch.setattr(tiny_engine, "generate", slow_generate(tiny_engine, 0.02, seen))
    async with in_process(tiny_engine, queue_size=2, max_batch_size=1) as client:
        serving = client.app.state.serving
        post = client.post
        first = asyncio.create_task(post("/v1/summarize", json=LONG))
        await _until(lambda: serving._running)
        queued = [asyncio.create_task(post("/v1/summarize", json=LONG)) for _ in range(2)]
        await _until(lambda: serving._queue.qsize() == 2)
        refused = await post("/v1/summarize", json=LONG)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["Retry-After"]) >= 1
        assert [r.status_code for r in await asyncio.gather(first, *queued)] == [200] * 3
        again = await post("/v1/summarize", json=SHORT)
        assert again.status_code == 200
        m = (await client.get("/metrics")).text
    assert metric(m, "hest_rejections_total", reason="queue_full") == 1
    assert metric(m, "hest_requests_total", outcome="rejected") == 1


@pytest.mark.anyio
async def test_engine_exception_fails_one_batch_only(tiny_engine, monkeypatch) -> None:
    real = tiny_engine.generate
    calls = []

    def flaky(requests, on_token=None):
        calls.append(len(requests))
        if len(calls) == 1:
            raise RuntimeError("injected CUDA-style failure")
        return real(requests, on_token=on_token)

    monkeypatch.setattr(tiny_engine, "generate", flaky)
    async with in_process(tiny_engine, max_wait_ms=300) as client:
        failed = await asyncio.gather(
            client.post("/v1/summarize", json=SHORT),
            client.post("/v1/summarize", json=SHORT | {"stream": True}),
        )
        ok = await client.post("/v1/summarize", json=SHORT)
        m = (await client.get("/metrics")).text
    assert calls[0] == 2
    assert failed[0].status_code == 500
    assert failed[0].json()["error"]["code"] == "engine_error"
    assert "injected" in failed[0].json()["error"]["message"]
    assert '"code":"engine_error"' in failed[1].text and failed[1].text.endswith("[DONE]\n\n")
    assert ok.status_code == 200
    assert metric(m, "hest_requests_total", outcome="error") == 2


@pytest.mark.anyio
async def test_brownout_tightens_budgets_under_load(tiny_engine, monkeypatch) -> None:
    seen: list = []
    monkeypatch.setattr(tiny_engine, "generate", slow_generate(tiny_engine, 0.01, seen))
    # an SLO far below the batch time: once one batch has been timed, new budgets go to the floor
    # ratios placed above this prompt's minimum (which depends on the machine's calibration)
    p = tiny_engine.check(
        GenerationRequest(SHORT["text"], energy_budget_ratio=1.0, max_new_tokens=16)
    )
    lo = p.min_j / p.fp16_cost_j
    ask, floor, below = (lo + (1 - lo) * f for f in (0.6, 0.3, 0.15))
    overrides = {"slo_s": 0.02, "brownout_floor_ratio": floor, "default_budget_ratio": ask}
    async with in_process(tiny_engine, **overrides) as client:
        body = SHORT | {"max_new_tokens": 16}
        first = await client.post("/v1/summarize", json=body | {"energy_budget_ratio": ask})
        second = await client.post("/v1/summarize", json=body | {"energy_budget_ratio": ask})
        low = await client.post("/v1/summarize", json=body | {"energy_budget_ratio": below})
        m = (await client.get("/metrics")).text
    assert first.json()["energy"]["brownout"] is False
    energy = second.json()["energy"]
    assert energy["brownout"] is True
    assert energy["budget_ratio"] == pytest.approx(floor, rel=1e-6)
    assert energy["modelled_j"] <= energy["budget_j"]
    assert low.json()["energy"]["brownout"] is False  # already below the floor: untouched
    assert metric(m, "hest_brownout_requests_total") == 1
    assert metric(m, "hest_brownout_level") == 1


@pytest.mark.anyio
async def test_draining_refuses_with_503(tiny_engine) -> None:
    async with in_process(tiny_engine) as client:
        client.app.state.serving.begin_drain()
        r = await client.post("/v1/summarize", json=SHORT)
        ready = await client.get("/readyz")
        m = (await client.get("/metrics")).text
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert "Retry-After" in r.headers
    assert ready.status_code == 503
    assert metric(m, "hest_rejections_total", reason="shutting_down") == 1


@pytest.mark.anyio
async def test_lifespan_shutdown_drains_queued_and_running(tiny_engine, monkeypatch) -> None:
    seen: list = []
    monkeypatch.setattr(tiny_engine, "generate", slow_generate(tiny_engine, 0.01, seen))
    app = create_app(tiny_settings(max_batch_size=1), engine=tiny_engine)
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        tasks = [asyncio.create_task(client.post("/v1/summarize", json=LONG)) for _ in range(3)]
        serving = app.state.serving
        await _until(lambda: serving._running and serving._queue.qsize() == 2)
    # the lifespan has ended: everything accepted before it was answered
    answers = await asyncio.gather(*tasks)
    await client.aclose()
    assert [r.status_code for r in answers] == [200] * 3
    assert len(seen) == 3


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_disconnect_mid_generation_stops_the_work(tiny_engine, monkeypatch, stream) -> None:
    seen: list = []
    monkeypatch.setattr(tiny_engine, "generate", slow_generate(tiny_engine, 0.05, seen))
    app = create_app(tiny_settings(), engine=tiny_engine)
    body = LONG | {"max_new_tokens": 200, "stream": stream}
    with uvicorn_thread(app) as url:
        if stream:
            with httpx.stream("POST", f"{url}/v1/summarize", json=body, timeout=30) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        break  # one delta, then hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/summarize", json=body, timeout=0.5)
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline:
            text = httpx.get(f"{url}/metrics").text
            if metric(text, "hest_requests_total", outcome="cancelled") == 1:
                break
            time.sleep(0.1)
    (batch,) = seen
    assert batch[0].cancelled is not None and batch[0].cancelled.is_set()
    assert metric(text, "hest_requests_total", outcome="cancelled") == 1
    assert metric(text, "hest_completion_tokens_total") < 100, "the work did not stop"
    assert metric(text, "hest_inflight_requests") == 0


def test_sigterm_during_a_request_completes_it(tmp_path) -> None:
    server = ServerProcess(
        {
            "HEST_MODEL": "tiny:llama",
            "HEST_ADAPTER": "none",
            "HEST_WARMUP": "false",
            "HEST_THREADS": TEST_THREADS,
        },
        tmp_path / "server.log",
    )
    try:
        server.wait_ready(timeout_s=300)
        out: dict = {}
        body = LONG | {"max_new_tokens": 100, "stream": True}

        def call() -> None:
            with httpx.stream("POST", f"{server.url}/v1/summarize", json=body, timeout=120) as r:
                out["status"] = r.status_code
                out["lines"] = [line for line in r.iter_lines() if line.startswith("data:")]

        client = threading.Thread(target=call)
        client.start()
        deadline = time.monotonic() + 30
        while metric(httpx.get(f"{server.url}/metrics").text, "hest_inflight_requests") < 1:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
        code = server.stop(timeout_s=120)
        client.join(timeout=60)
    finally:
        server.stop()
    # uvicorn re-raises the signal once its graceful shutdown is done: "terminated by SIGTERM"
    assert code in (0, -signal.SIGTERM), server.tail()
    assert out["status"] == 200
    assert out["lines"][-1] == "data: [DONE]"
    assert '"done":true' in out["lines"][-2], server.tail()
    assert "draining" in server.tail()
