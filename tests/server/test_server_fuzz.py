"""Schemathesis fuzzes the whole OpenAPI schema (native summarize, OpenAI chat completions and
models, operations) against the in-process app (ASGI, lifespan running, tiny model) with every
default check: no 5xx for any input; every response matches its declared status, content type,
headers and schema; schema-invalid requests are refused; an undeclared method gets a 405 with an
Allow header; and a schema-valid request is accepted unless a runtime-only check refuses it (the
budget minimum depends on the prompt's token count and the machine's energy table; token counts
of a system instruction: `RUNTIME_ONLY`, documented in docs/server.md).

A short run sits in the default tier; `-m slow` runs many more examples per operation (set
HEST_FUZZ_EXAMPLES to change its count). The failures a run against a live server once found are
tests of their own below, with their exact inputs."""

from __future__ import annotations

import os

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from server_helpers import ARTICLE, in_process, tiny_settings

from server import create_app
from server.protocol import MAX_INPUT_CHARS, MAX_NEW_TOKENS

RUNTIME_ONLY = {"budget_below_minimum", "system_too_long", "text_too_long"}


def schema_valid_is_accepted(ctx, response, case) -> None:
    """Schemathesis' positive_data_acceptance, minus the refusals no schema can state."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code >= 500:
        return
    if response.status_code in (400, 415, 422):
        code = response.json()["error"]["code"]
        assert code in RUNTIME_ONLY, f"schema-valid request refused: {response.text}"


# The app loads its own tiny engine in its lifespan, which schemathesis runs. (Not a fixture:
# schemathesis 4.32's `from_fixture` breaks on pytest 9, `Function._nodeid`.)
APP = create_app(
    tiny_settings(model="tiny:llama", adapter="none", max_new_tokens=16), background_load=False
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much]
VALIDATE = {
    "excluded_checks": [checks.positive_data_acceptance],
    "additional_checks": [schema_valid_is_accepted],
}


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=HEALTH, derandomize=True)
def test_fuzz_quick(case) -> None:
    _bounded(case)
    case.call_and_validate(**VALIDATE)


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("HEST_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=HEALTH,
)
def test_fuzz_many(case) -> None:
    _bounded(case)
    case.call_and_validate(**VALIDATE)


def _bounded(case) -> None:
    """Keep generation short: a valid max_new_tokens / max_tokens above 16 becomes 16 (the server
    still validates every other field as generated)."""
    body = case.body
    if isinstance(body, dict):
        for key in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if type(value) in (int, float) and 16 < value <= 512 and value == int(value):
                body[key] = 16


# ---- the failures found against a live server, each with its exact input -------------------------


def _request_schema(openapi: dict, name: str) -> jsonschema.Draft202012Validator:
    root = {"$ref": f"#/components/schemas/{name}", "components": openapi["components"]}
    return jsonschema.Draft202012Validator(root)


@pytest.mark.anyio
async def test_role_empty_is_outside_the_schema_and_refused(tiny_engine) -> None:
    """`{"messages": [{"role": ""}]}` was schema-valid but refused: the schema now lists the
    roles served, and the server refuses it with a 400 naming messages.0.role."""
    body = {"messages": [{"role": ""}]}
    async with in_process(tiny_engine) as client:
        chat = _request_schema(client.app.openapi(), "ChatCompletionRequest")
        assert not chat.is_valid(body)
        ok = {"messages": [{"role": "user", "content": ARTICLE}], "max_tokens": 4}
        assert chat.is_valid(ok)
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "messages.0.role"
        r = await client.post("/v1/chat/completions", json=ok | {"energy_budget_ratio": 1.0})
        assert r.status_code == 200, r.text


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/v1/summarize", "/v1/chat/completions"])
async def test_integral_float_max_tokens(tiny_engine, path) -> None:
    """`max_new_tokens: 7923.0` is an integer in JSON Schema's sense: 8.0 is accepted as 8, and
    7923.0 is refused because the schema's maximum (the runtime's limit, 512) says so."""
    key = "max_new_tokens" if path == "/v1/summarize" else "max_tokens"
    base = (
        {"text": ARTICLE}
        if path == "/v1/summarize"
        else {"messages": [{"role": "user", "content": ARTICLE}]}
    ) | {"energy_budget_ratio": 1.0}
    async with in_process(tiny_engine) as client:
        name = "SummarizeRequest" if path == "/v1/summarize" else "ChatCompletionRequest"
        validator = _request_schema(client.app.openapi(), name)
        assert validator.is_valid(base | {key: 8.0})
        assert not validator.is_valid(base | {key: 7923.0})
        r = await client.post(path, json=base | {key: 8.0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 8
        r = await client.post(path, json=base | {key: 7923.0})
        assert r.status_code == (422 if path == "/v1/summarize" else 400), r.text
        assert r.json()["error"]["param"] == key
        assert "512" in r.json()["error"]["message"]


def test_schema_limits_are_the_runtimes(tiny_engine) -> None:
    assert tiny_engine.max_new_tokens_limit == MAX_NEW_TOKENS
    assert tiny_engine.max_input_chars == MAX_INPUT_CHARS


@pytest.mark.anyio
async def test_405_carries_allow_on_every_operation(tiny_engine) -> None:
    """A 405 without an Allow header was found on all six operations (RFC 9110 requires it)."""
    async with in_process(tiny_engine) as client:
        paths = client.app.openapi()["paths"]
        assert len(paths) >= 8
        for path, ops in paths.items():
            url = path.replace("{model_id}", "tiny:llama")
            r = await client.request("TRACE", url)
            assert r.status_code == 405, (path, r.text)
            allowed = {m.strip().lower() for m in r.headers["allow"].split(",")}
            assert set(ops) <= allowed, (path, r.headers["allow"])
            assert r.json()["error"]["code"] == "http_405"
