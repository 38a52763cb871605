"""End to end on a real `python -m server` (uvicorn, loopback) with the REAL default model:
concurrent mixed budgets, the joules counter against the responses, a real Prometheus scraping the
server, and the real `openai` package as a client. One server per session (see conftest)."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from functools import partial

import httpx
import openai
import pytest
import yaml
from server_helpers import ServerProcess, articles, free_port, metric

MAX_NEW = 8
PROMETHEUS_INSTALL = "apt-get update && apt-get install -y --no-install-recommends prometheus"


@pytest.fixture(scope="module")
def prometheus(real_server: ServerProcess, tmp_path_factory) -> Iterator[str]:
    """A real Prometheus on loopback scraping the server every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(f"`prometheus` is not installed; install it with: {PROMETHEUS_INSTALL}")
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "hest-server",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [real_server.url.removeprefix("http://")]}],
            }
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    with (work / "prometheus.log").open("w") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={work / 'prometheus.yml'}",
                f"--web.listen-address={url.removeprefix('http://')}",
                f"--storage.tsdb.path={work / 'data'}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not _ready(url):
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Prometheus did not turn ready"
            time.sleep(0.3)
        while not any(r["value"][1] == "1" for r in _query(url, 'up{job="hest-server"}')):
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Prometheus never scraped the server"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _query(url: str, expr: str) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body.get("status") == "success", f"{expr}: {body}"
    return body["data"]["result"]


async def _summarize(client: httpx.AsyncClient, body: dict) -> dict:
    if not body.get("stream"):
        r = await client.post("/v1/summarize", json=body)
        assert r.status_code == 200, r.text
        return r.json()
    events = []
    async with client.stream("POST", "/v1/summarize", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["done"] is True
    assert "".join(json.loads(e)["delta"] for e in events[:-2]) == final["summary"]
    return final


def test_concurrent_mixed_budgets_and_joules_counter(real_server, prometheus) -> None:
    texts = articles(16)
    before = httpx.get(f"{real_server.url}/metrics").text

    async def run() -> tuple[dict, list[tuple[dict, dict]]]:
        timeout = httpx.Timeout(600.0)
        async with httpx.AsyncClient(base_url=real_server.url, timeout=timeout) as client:
            probe = await _summarize(
                client, {"text": texts[0], "max_new_tokens": MAX_NEW, "energy_budget_ratio": 1.0}
            )
            fp16 = probe["energy"]["fp16_cost_j"]
            bodies = []
            for i, text in enumerate(texts):
                body = {"text": text, "max_new_tokens": MAX_NEW, "stream": i % 4 == 3}
                if i % 3 == 2:  # joules budgets, relative to the fp16 cost of the first text
                    body["text"] = texts[0]
                    body["energy_budget_j"] = fp16 * (0.5 + 0.1 * (i % 5))
                else:
                    body["energy_budget_ratio"] = (0.3, 0.45, 0.6, 0.8, 1.0)[i % 5]
                bodies.append(body)
            answers = await asyncio.gather(*(_summarize(client, b) for b in bodies))
            return probe, list(zip(bodies, answers, strict=True))

    probe, pairs = asyncio.run(run())
    after = httpx.get(f"{real_server.url}/metrics").text
    assert len(pairs) == 16
    for body, answer in pairs:
        energy = answer["energy"]
        assert energy["modelled_j"] <= energy["budget_j"] * (1 + 1e-9), answer
        assert answer["finish_reason"] in ("stop", "length", "energy_budget")
        if "energy_budget_j" in body and not energy["brownout"]:
            assert energy["budget_j"] == pytest.approx(body["energy_budget_j"])
        elif not energy["brownout"]:
            assert energy["budget_ratio"] == pytest.approx(body["energy_budget_ratio"])
        assert answer["usage"]["completion_tokens"] <= MAX_NEW
    reported = probe["energy"]["modelled_j"] + sum(a["energy"]["modelled_j"] for _, a in pairs)
    counter = "hest_energy_joules_total"
    increase = metric(after, counter, source="modelled") - metric(
        before, counter, source="modelled"
    )
    assert increase == pytest.approx(reported, rel=1e-9)
    assert metric(after, "hest_budget_violations_total") == 0
    steps = metric(after, "hest_batch_size_count") - metric(before, "hest_batch_size_count")
    single = metric(after, "hest_batch_size_bucket", le="1.0") - metric(
        before, "hest_batch_size_bucket", le="1.0"
    )
    assert single < steps, "requests were not batched: every decode step had one row"


def test_prometheus_queries_return_values(real_server, prometheus) -> None:
    exprs = [
        "histogram_quantile(0.99, sum by (le) (rate(hest_request_duration_seconds_bucket[1m])))",
        "rate(hest_energy_joules_total[1m])",
    ]
    time.sleep(3)  # a few 1 s scrapes after the load of the previous test
    for expr in exprs:
        deadline = time.monotonic() + 30
        while True:
            values = [float(r["value"][1]) for r in _query(prometheus, expr)]
            if any(math.isfinite(v) and v > 0 for v in values):
                break
            assert time.monotonic() < deadline, f"{expr} returned {values}"
            time.sleep(1)
    watts = _query(prometheus, 'rate(hest_energy_joules_total{source="modelled"}[1m])')
    assert watts and float(watts[0]["value"][1]) > 0


def test_openai_package_as_client(real_server) -> None:
    client = openai.OpenAI(base_url=f"{real_server.url}/v1", api_key="unused", timeout=600)
    messages = [{"role": "user", "content": articles(1)[0]}]
    done = client.chat.completions.create(
        model="default",
        messages=messages,
        max_tokens=MAX_NEW,
        extra_body={"energy_budget_ratio": 0.5},
    )
    assert isinstance(done.choices[0].message.content, str)
    assert done.choices[0].finish_reason in ("stop", "length")
    usage = done.usage
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    energy = usage.model_extra["energy"]
    assert energy["budget_ratio"] == pytest.approx(0.5) or energy["brownout"]
    assert energy["modelled_j"] <= energy["budget_j"]

    stream = client.chat.completions.create(
        model="default",
        messages=messages,
        max_tokens=MAX_NEW,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"energy_budget_j": energy["fp16_cost_j"] * 0.7},
    )
    pieces, finish, last_usage = [], None, None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        last_usage = chunk.usage or last_usage
    assert finish in ("stop", "length")
    assert last_usage is not None and last_usage.completion_tokens <= MAX_NEW
    streamed_energy = last_usage.model_extra["energy"]
    assert streamed_energy["modelled_j"] <= streamed_energy["budget_j"]
    assert "".join(pieces) or last_usage.completion_tokens == 0


def test_openai_client_models_stop_logprobs_seed(real_server) -> None:
    """The real client on the real model: models.list(), stop strings, logprobs, seeded sampling,
    and BadRequestError for a field this server does not serve (issue 11, item 6)."""
    client = openai.OpenAI(base_url=f"{real_server.url}/v1", api_key="unused", timeout=600)
    served = [m.id for m in client.models.list().data]
    assert len(served) == 1 and client.models.retrieve(served[0]).id == served[0]
    create = partial(
        client.chat.completions.create,
        model=served[0],
        messages=[{"role": "user", "content": articles(1)[0]}],
        max_tokens=MAX_NEW,
        extra_body={"energy_budget_ratio": 1.0},
    )
    greedy = create(logprobs=True, top_logprobs=2)
    text, content = greedy.choices[0].message.content, greedy.choices[0].logprobs.content
    assert len(content) == greedy.usage.completion_tokens
    assert b"".join(bytes(c.bytes) for c in content).decode(errors="replace").startswith(text)
    assert all(c.token == c.top_logprobs[0].token for c in content)  # greedy: the top token
    words = text.split()
    assert len(words) >= 3, text  # the stop word is followed by more text
    stopped = create(stop=[words[1]])
    assert stopped.choices[0].message.content == text[: text.find(words[1])]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < greedy.usage.completion_tokens
    a, b = (create(temperature=1.0, seed=5).choices[0].message.content for _ in range(2))
    assert a == b
    with pytest.raises(openai.BadRequestError) as info:
        create(n=2)
    assert info.value.body["param"] == "n"
