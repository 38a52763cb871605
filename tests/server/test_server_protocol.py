"""In-process (ASGI) checks on the tiny model: every error path gives the ErrorResponse shape with
the right status and code, never a 500; the happy paths give the documented response shapes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from server_helpers import ARTICLE, in_process, metric

from hest_core import BudgetTooLowError, GenerationRequest
from server import Settings
from server.openai_protocol import ChatCompletionResponse
from server.protocol import ErrorResponse, SummarizeResponse

pytestmark = pytest.mark.anyio
CONTRACTS = Path(__file__).resolve().parents[2] / "docs" / "contracts.md"
OK = {"text": ARTICLE, "max_new_tokens": 8}
CHAT = {"model": "hest", "messages": [{"role": "user", "content": ARTICLE}], "max_tokens": 8}

# (case id, path, raw body or dict, status, error code, error param)
ERROR_CASES = [
    ("invalid-json", "/v1/summarize", b'{"text": "a', 422, "invalid_json", None),
    ("not-utf8", "/v1/summarize", b'{"text": "\xff\xfe"}', 422, "invalid_json", None),
    ("not-an-object", "/v1/summarize", b"[1, 2]", 422, "model_attributes_type", None),
    ("null-body", "/v1/summarize", b"null", 422, "model_attributes_type", None),
    ("empty-body", "/v1/summarize", b"", 422, "missing", None),
    ("missing-text", "/v1/summarize", {"max_new_tokens": 8}, 422, "missing", "text"),
    ("empty-text", "/v1/summarize", {"text": ""}, 422, "string_too_short", "text"),
    ("blank-text", "/v1/summarize", {"text": " \n\t "}, 422, "empty_text", "text"),
    ("text-number", "/v1/summarize", {"text": 42}, 422, "string_type", "text"),
    ("text-list", "/v1/summarize", {"text": ["a"]}, 422, "string_type", "text"),
    ("text-too-long", "/v1/summarize", {"text": "a " * 100_001}, 422, "text_too_long", "text"),
    (
        "budget-string",
        "/v1/summarize",
        {"text": "a", "energy_budget_j": "5"},
        422,
        "float_type",
        "energy_budget_j",
    ),
    (
        "budget-bool",
        "/v1/summarize",
        {"text": "a", "energy_budget_ratio": True},
        422,
        "float_type",
        "energy_budget_ratio",
    ),
    (
        "budget-negative",
        "/v1/summarize",
        {"text": "a", "energy_budget_j": -1.0},
        422,
        "invalid_budget",
        "energy_budget_j",
    ),
    (
        "budget-zero",
        "/v1/summarize",
        {"text": "a", "energy_budget_ratio": 0},
        422,
        "invalid_budget",
        "energy_budget_ratio",
    ),
    (
        "budget-nan-token",
        "/v1/summarize",
        b'{"text": "a", "energy_budget_ratio": NaN}',
        422,
        "finite_number",
        "energy_budget_ratio",
    ),
    (
        "budget-infinity-token",
        "/v1/summarize",
        b'{"text": "a", "energy_budget_j": Infinity}',
        422,
        "finite_number",
        "energy_budget_j",
    ),
    (
        "budget-minus-infinity",
        "/v1/summarize",
        b'{"text": "a", "energy_budget_j": -Infinity}',
        422,
        "finite_number",
        "energy_budget_j",
    ),
    (
        "budget-overflow",
        "/v1/summarize",
        b'{"text": "a", "energy_budget_j": 1e999}',
        422,
        "finite_number",
        "energy_budget_j",
    ),
    (
        "ratio-overflows",
        "/v1/summarize",
        {"text": "a", "energy_budget_ratio": 3.35e307},
        422,
        "invalid_budget",
        "energy_budget_ratio",
    ),
    (
        "budget-j-huge",
        "/v1/summarize",
        {"text": "a", "energy_budget_j": 1e300},
        422,
        "invalid_budget",
        "energy_budget_j",
    ),
    (
        "budget-nan-string",
        "/v1/summarize",
        {"text": "a", "energy_budget_ratio": "NaN"},
        422,
        "float_type",
        "energy_budget_ratio",
    ),
    (
        "both-budgets",
        "/v1/summarize",
        {"text": "a", "energy_budget_j": 5.0, "energy_budget_ratio": 0.5},
        422,
        "conflicting_budget",
        "energy_budget_j",
    ),
    (
        "budget-below-minimum",
        "/v1/summarize",
        {"text": ARTICLE, "energy_budget_j": 1e-6},
        422,
        "budget_below_minimum",
        "energy_budget_j",
    ),
    (
        "ratio-below-minimum",
        "/v1/summarize",
        {"text": ARTICLE, "energy_budget_ratio": 1e-9},
        422,
        "budget_below_minimum",
        "energy_budget_ratio",
    ),
    (
        "max-new-zero",
        "/v1/summarize",
        {"text": "a", "max_new_tokens": 0},
        422,
        "greater_than_equal",
        "max_new_tokens",
    ),
    (
        "max-new-float",
        "/v1/summarize",
        {"text": "a", "max_new_tokens": 8.5},
        422,
        "int_type",
        "max_new_tokens",
    ),
    (
        "max-new-over-limit",
        "/v1/summarize",
        {"text": "a", "max_new_tokens": 10**6},
        422,
        "invalid_max_new_tokens",
        "max_new_tokens",
    ),
    ("stream-string", "/v1/summarize", {"text": "a", "stream": "yes"}, 422, "bool_type", "stream"),
    ("alias-invalid", "/summarize", {"text": ""}, 422, "string_too_short", "text"),
    # the OpenAI endpoint answers 400, as OpenAI does
    (
        "chat-no-messages",
        "/v1/chat/completions",
        {"model": "m", "messages": []},
        400,
        "too_short",
        "messages",
    ),
    (
        "chat-no-user",
        "/v1/chat/completions",
        {"messages": [{"role": "system", "content": "x"}]},
        400,
        "invalid_messages",
        "messages",
    ),
    (
        "chat-bad-content",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": 3}]},
        400,
        "string_type",
        "messages.0.content",
    ),
    (
        "chat-blank-content",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": " \n "}]},
        400,
        "empty_text",
        "messages.0.content",
    ),
    (
        "chat-empty-content",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": ""}]},
        400,
        "empty_text",
        "messages.0.content",
    ),
    (
        "summarize-misspelt-budget-field",
        "/v1/summarize",
        {"text": "The council voted.", "energy_budget_ration": 0.3},
        422,
        "extra_forbidden",
        "energy_budget_ration",
    ),
    ("chat-n-2", "/v1/chat/completions", CHAT | {"n": 2}, 400, "less_than_equal", "n"),
    (
        "chat-budget-nan",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "a"}], "energy_budget_ratio": NaN}',
        400,
        "finite_number",
        "energy_budget_ratio",
    ),
    (
        "chat-both-budgets",
        "/v1/chat/completions",
        CHAT | {"energy_budget_j": 3.0, "energy_budget_ratio": 0.5},
        400,
        "conflicting_budget",
        "energy_budget_j",
    ),
    (
        "chat-max-tokens-over",
        "/v1/chat/completions",
        CHAT | {"max_tokens": 10**6},
        400,
        "invalid_max_new_tokens",
        "max_tokens",
    ),
    (
        "chat-max-completion-tokens-over",
        "/v1/chat/completions",
        CHAT | {"max_completion_tokens": 600},
        400,
        "invalid_max_new_tokens",
        "max_completion_tokens",
    ),
    ("chat-invalid-json", "/v1/chat/completions", b'{"messages": [', 400, "invalid_json", None),
    ("unknown-path", "/v1/nothing", {}, 404, "http_404", None),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "param"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
async def test_error_paths(tiny_engine, path, body, status, code, param) -> None:
    async with in_process(tiny_engine) as client:
        if isinstance(body, bytes):
            r = await client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = await client.post(path, json=body)
        assert r.status_code == status, r.text
        error = ErrorResponse.model_validate(r.json()).error
        assert error.code == code, r.text
        assert error.param == param, r.text
        assert error.message and error.type
        if status in (400, 422):
            m = (await client.get("/metrics")).text
            assert metric(m, "hest_requests_total", outcome="invalid") == 1


async def test_budget_below_minimum_quotes_the_minimum(tiny_engine) -> None:
    with pytest.raises(BudgetTooLowError) as info:
        tiny_engine.check(GenerationRequest(ARTICLE, energy_budget_j=1e-6, max_new_tokens=128))
    async with in_process(tiny_engine) as client:
        r = await client.post("/v1/summarize", json={"text": ARTICLE, "energy_budget_j": 1e-6})
    assert r.status_code == 422
    quoted = re.search(r"minimum of ([0-9.eE+-]+) J", r.json()["error"]["message"])
    assert quoted, r.json()
    assert float(quoted.group(1)) == pytest.approx(info.value.minimum_j, rel=1e-3)


async def test_wrong_method_and_get_on_post_route(tiny_engine) -> None:
    async with in_process(tiny_engine) as client:
        r = await client.get("/v1/summarize")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"  # RFC 9110
    ErrorResponse.model_validate(r.json())


async def test_summarize_json_and_alias(tiny_engine) -> None:
    # a ratio above this prompt's minimum (the tiny model's depends on the calibration)
    p = tiny_engine.check(GenerationRequest(OK["text"], energy_budget_ratio=1.0, max_new_tokens=8))
    ratio = p.min_j / p.fp16_cost_j + (1 - p.min_j / p.fp16_cost_j) * 0.5
    async with in_process(tiny_engine) as client:
        for path in ("/v1/summarize", "/summarize"):
            r = await client.post(path, json=OK | {"energy_budget_ratio": ratio})
            assert r.status_code == 200, r.text
            body = SummarizeResponse.model_validate(r.json())
            assert body.energy.budget_ratio == pytest.approx(ratio, rel=1e-6)
            assert body.energy.modelled_j <= body.energy.budget_j
            assert body.energy.meter == "estimate" and body.energy.measured_j is None
            assert body.usage.completion_tokens <= 8
            assert body.timings.queue_s <= body.timings.ttft_s <= body.timings.total_s
        m = (await client.get("/metrics")).text
    assert metric(m, "hest_request_duration_seconds_count", endpoint="summarize") == 2


async def test_default_budget_ratio_from_settings(tiny_engine) -> None:
    async with in_process(tiny_engine, default_budget_ratio=0.8) as client:
        r = await client.post("/v1/summarize", json=OK)
    assert r.json()["energy"]["budget_ratio"] == pytest.approx(0.8)


def sse_events(text: str) -> list:
    return [
        json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
        for line in text.split("\n")
        if line.startswith("data: ")
    ]


async def test_summarize_stream(tiny_engine) -> None:
    async with in_process(tiny_engine) as client:
        r = await client.post("/v1/summarize", json=OK | {"stream": True, "energy_budget_j": 30.0})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["done"] is True
    SummarizeResponse.model_validate(final)
    deltas = [e["delta"] for e in events[:-2]]
    assert all(set(e) == {"delta"} for e in events[:-2])
    assert "".join(deltas) == final["summary"]
    assert final["energy"]["budget_j"] == pytest.approx(30.0)


async def test_chat_completion_and_stream(tiny_engine) -> None:
    async with in_process(tiny_engine) as client:
        r = await client.post("/v1/chat/completions", json=CHAT | {"energy_budget_ratio": 0.9})
        assert r.status_code == 200, r.text
        body = ChatCompletionResponse.model_validate(r.json())
        assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
        assert body.usage.energy.budget_ratio == pytest.approx(0.9)
        assert body.usage.energy.modelled_j <= body.usage.energy.budget_j
        stream = CHAT | {"stream": True, "stream_options": {"include_usage": True}}
        r = await client.post("/v1/chat/completions", json=stream)
        m = (await client.get("/metrics")).text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["choices"] == [] and events[-2]["usage"]["energy"]["meter"] == "estimate"
    assert events[-3]["choices"][0]["finish_reason"] in ("stop", "length")
    assert metric(m, "hest_request_duration_seconds_count", endpoint="chat") == 2


async def test_chat_drops_the_instruction_paragraph(tiny_engine) -> None:
    plain = CHAT
    instructed = CHAT | {
        "messages": [
            {
                "role": "user",
                "content": "Summarize the following news article in 3 sentences.\n\n" + ARTICLE,
            },
        ]
    }
    async with in_process(tiny_engine) as client:
        a = (await client.post("/v1/chat/completions", json=plain)).json()
        b = (await client.post("/v1/chat/completions", json=instructed)).json()
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]


async def test_health_ready_info(tiny_engine) -> None:
    async with in_process(tiny_engine) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        info = (await client.get("/v1/info")).json()
    for key in ("model", "adapter", "device", "meter", "policy", "calibration", "server"):
        assert key in info
    assert {"source", "date"} <= set(info["calibration"])
    assert info["server"]["max_batch_size"] == 16


def contract_metric_names() -> set[str]:
    text = CONTRACTS.read_text()
    section = text[text.index("## 3.") :]
    return {
        name
        for line in section.splitlines()
        if line.startswith("|")
        for name in re.findall(r"`(hest_[a-z0-9_]+)`", line)
    }


async def test_every_contract_metric_is_exposed_with_help(tiny_engine) -> None:
    async with in_process(tiny_engine) as client:
        await client.post("/v1/summarize", json=OK)
        text = (await client.get("/metrics")).text
    names = contract_metric_names()
    assert len(names) >= 21
    for name in names:
        family = name.removesuffix("_total")
        assert f"# HELP {name} " in text or f"# HELP {family} " in text, name
        assert f"# TYPE {family} " in text or f"# TYPE {name} " in text, name
    assert metric(text, "hest_info", model="tiny:llama", policy="hest") == 1
    assert metric(text, "hest_energy_joules_total", source="modelled", meter="estimate") > 0
    assert metric(text, "hest_budget_violations_total") == 0
    # every (layer, path) series exists from the first request on, whatever the guard chose
    assert 'hest_layer_units_total{layer="0",path="skip"}' in text


def test_settings_defaults_and_env(monkeypatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("HEST_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert (s.host, s.port, s.model, s.adapter, s.device, s.policy) == (
        "127.0.0.1",
        8000,
        "default",
        "default",
        "cpu",
        "hest",
    )
    assert (s.max_batch_size, s.default_budget_ratio) == (16, 0.6)
    monkeypatch.setenv("HEST_PORT", "9123")
    monkeypatch.setenv("HEST_ADAPTER", "none")
    monkeypatch.setenv("HEST_LOG_LEVEL", "WARNING")
    s = Settings()
    assert (s.port, s.adapter_arg, s.log_level) == (9123, None, "warning")
    monkeypatch.setenv("HEST_BROWNOUT_FLOOR_RATIO", "0.9")
    with pytest.raises(ValueError, match="BROWNOUT_FLOOR_RATIO"):
        Settings()


async def test_blank_chat_content_is_one_clear_error(tiny_engine) -> None:
    """Content "" matches the union's string branch and fails its rule; the list branch's "should
    be a valid list" would only add noise (a new user's report, session 20). Content 3 matches
    neither branch: both type errors stay, naming what it may be."""
    async with in_process(tiny_engine) as client:
        r = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": ""}]}
        )
        msg = r.json()["error"]["message"]
        assert r.status_code == 400 and "is blank" in msg and "valid list" not in msg, msg
        r = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": 3}]}
        )
        msg = r.json()["error"]["message"]
        assert "valid string" in msg and "valid list" in msg, msg
