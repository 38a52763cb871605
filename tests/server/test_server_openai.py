"""The OpenAI-compatible API on the tiny model, in-process (ASGI) and through the real `openai`
client (issue 11, item 6): every field of OpenAI's chat-completions request, as the pinned client
models it, is served or refused with a 400 naming it; stop strings, log probabilities and seeded
sampling work in JSON and in streams; system messages and earlier turns follow the documented
rule; /v1/models has OpenAI's shapes; a JSON body without a JSON Content-Type is read as JSON."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.chat import completion_create_params as params
from server_helpers import ARTICLE, in_process

from hest_core import GenerationRequest
from server.openai_protocol import ChatCompletionRequest, ChatCompletionResponse

pytestmark = pytest.mark.anyio
BASE = {"messages": [{"role": "user", "content": ARTICLE}], "max_tokens": 2}
RATIO = {"energy_budget_ratio": 1.0}  # no energy stop: the token limit and stops decide
FN = {"type": "function", "function": {"name": "f"}}

# field -> (values served, values refused); a refusal is a 400 whose param names the field
FIELDS: dict[str, tuple[list, list]] = {
    "messages": ([BASE["messages"]], [[{"role": "assistant", "content": "x"}], []]),
    "model": (["any-name", "tiny:llama"], [3]),
    "audio": ([None], [{"voice": "alloy", "format": "wav"}]),
    "frequency_penalty": ([0, 0.0, None], [0.5, False]),
    "function_call": (["none", None], ["auto", {"name": "f"}]),
    "functions": ([None], [[{"name": "f"}], []]),
    "logit_bias": ([{}, None], [{"50256": -100}]),
    "logprobs": ([True, False, None], ["yes"]),
    "max_completion_tokens": ([2, 2.0, None], [0, 600, 2.5]),
    "max_tokens": ([2, None], [0, 513, "2"]),
    "metadata": ([{"k": "v"}, None], [{"k": 1}, {f"k{i}": "v" for i in range(17)}]),
    "modalities": ([["text"], None], [["text", "audio"], ["audio"]]),
    "moderation": ([None], [{"model": "omni-moderation-latest"}]),
    "n": ([1, None], [2, 0]),
    "parallel_tool_calls": ([None], [True, False]),
    "prediction": ([None], [{"type": "content", "content": "x"}]),
    "presence_penalty": ([0, None], [-1.0]),
    "prompt_cache_key": (["k", None], [3]),
    "prompt_cache_options": ([{"mode": "implicit", "ttl": "30m"}, None], [{"ttl": "1h"}]),
    "prompt_cache_retention": (["24h", "in_memory", None], ["1d"]),
    "reasoning_effort": (["none", None], ["low", "high"]),
    "response_format": (
        [{"type": "text"}, None],
        [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x"}}],
    ),
    "safety_identifier": (["u1", None], ["x" * 129]),
    "seed": ([7, None, 2**70], [1.5, "7"]),
    "service_tier": (["auto", "default", None], ["flex", "priority"]),
    "stop": (["x", ["a", "b"], [], None], [["a"] * 5, "", [""]]),
    "store": ([False, None], [True]),
    "stream": ([False, None, True], ["yes"]),
    "stream_options": (
        [{"include_usage": True}, {"include_obfuscation": False}, None],
        [{"include_obfuscation": True}, {"x": 1}],
    ),
    "temperature": ([0, 0.7, 2, None], [2.5, -0.1]),
    "tool_choice": (["none", None], ["auto", "required", FN]),
    "tools": ([None], [[FN]]),
    "top_logprobs": ([0, 20, None], [21, -1]),
    "top_p": ([0, 0.5, 1, None], [1.5]),
    "user": (["u", None], [5]),
    "verbosity": ([None], ["low"]),
    "web_search_options": ([None], [{}]),
}
CASES = [(f, v, True) for f, (ok, _) in FIELDS.items() for v in ok] + [
    (f, v, False) for f, (_, bad) in FIELDS.items() for v in bad
]


def test_the_table_covers_every_field_of_the_pinned_client() -> None:
    fields = set(params.CompletionCreateParamsStreaming.__required_keys__) | set(
        params.CompletionCreateParamsStreaming.__optional_keys__
    )
    assert fields == set(FIELDS)
    assert fields <= set(ChatCompletionRequest.model_fields)


@pytest.mark.parametrize(("field", "value", "served"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
async def test_every_openai_field_is_served_or_refused(tiny_engine, field, value, served) -> None:
    body = BASE | RATIO | {field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    async with in_process(tiny_engine) as client:
        r = await client.post("/v1/chat/completions", json=body)
    if served:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field or error["param"].startswith(field + "."), r.text
    assert error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (BASE | {"temperature_": 1}, "temperature_", "extra_forbidden"),
        (BASE | {"top_logprobs": 2}, "top_logprobs", "invalid_logprobs"),  # needs logprobs
        (BASE | {"logprobs": False, "top_logprobs": 2}, "top_logprobs", "invalid_logprobs"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content.0.type",
            "literal_error",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]},
            "messages.0.tool_call_id",
            "extra_forbidden",
        ),
    ],
)
async def test_unknown_and_dependent_fields_are_refused(tiny_engine, body, param, code) -> None:
    async with in_process(tiny_engine) as client:
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)


# ---- messages ------------------------------------------------------------------------------------
SYSTEM = {"role": "system", "content": "Answer in French."}
USER = {"role": "user", "content": ARTICLE}


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "assistant", "content": "Sure."}, USER], "messages.0.role"),
        ([USER, {"role": "assistant", "content": "Sure."}], "messages.1.role"),
        ([{"role": "tool", "content": "x", "tool_call_id": "1"}, USER], "messages.0.role"),
        ([USER, USER], "messages"),
        ([SYSTEM], "messages"),
        ([USER, SYSTEM], "messages"),
        ([SYSTEM, SYSTEM, USER], "messages"),
        ([SYSTEM | {"content": "   "}, USER], "messages.0.content"),
    ],
)
async def test_earlier_turns_and_misplaced_messages_are_refused(
    tiny_engine, messages, param
) -> None:
    async with in_process(tiny_engine) as client:
        r = await client.post("/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


async def test_a_system_or_developer_message_is_the_system_turn(tiny_engine) -> None:
    async with in_process(tiny_engine) as client:
        plain = (await client.post("/v1/chat/completions", json=BASE)).json()
        tokens = {}
        for role in ("system", "developer"):
            body = BASE | {"messages": [{"role": role, "content": "Answer in French."}, USER]}
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            tokens[role] = r.json()["usage"]["prompt_tokens"]
        parts = [{"type": "text", "text": "Answer"}, {"type": "text", "text": "in French."}]
        body = BASE | {"messages": [{"role": "system", "content": parts}, USER]}
        joined = (await client.post("/v1/chat/completions", json=body)).json()
    assert tokens["system"] == tokens["developer"] != plain["usage"]["prompt_tokens"]
    # text parts are joined with newlines: the same prompt as the runtime builds for that text
    expected = tiny_engine.check(GenerationRequest(ARTICLE, system="Answer\nin French."))
    assert joined["usage"]["prompt_tokens"] == len(expected.ids)


# ---- stop, logprobs, sampling --------------------------------------------------------------------
async def chat(client, **body) -> dict:
    r = await client.post("/v1/chat/completions", json=BASE | RATIO | body)
    assert r.status_code == 200, r.text
    return r.json()


async def stream(client, **body) -> list[dict]:
    """The JSON events of a streamed chat (the last line, `[DONE]`, checked and dropped)."""
    r = await client.post("/v1/chat/completions", json=BASE | RATIO | body | {"stream": True})
    assert r.status_code == 200, r.text
    data = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


async def test_stop_ends_the_text_before_it_in_json_and_stream(tiny_engine) -> None:
    async with in_process(tiny_engine) as client:
        greedy = (await chat(client, max_tokens=16))["choices"][0]["message"]["content"]
        assert len(greedy) >= 3
        stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
        done = await chat(client, max_tokens=16, stop=[stop, "\x00never"])
        events = await stream(client, max_tokens=16, stop=stop)
    text = done["choices"][0]["message"]["content"]
    assert text == greedy[: greedy.find(stop)]
    assert done["choices"][0]["finish_reason"] == "stop"
    assert done["usage"]["energy"]["finish_reason"] == "stop"
    pieces = [c["delta"].get("content", "") for e in events for c in e["choices"]]
    assert "".join(pieces) == text  # no piece of the stop string was streamed
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


async def test_logprobs_in_json_and_stream(tiny_engine) -> None:
    async with in_process(tiny_engine) as client:
        done = await chat(client, max_tokens=6, logprobs=True, top_logprobs=3)
        events = await stream(client, max_tokens=6, logprobs=True, top_logprobs=3)
        plain = await chat(client, max_tokens=6)
    body = ChatCompletionResponse.model_validate(done)
    content = body.choices[0].logprobs.content
    assert len(content) == body.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely
        assert entry.bytes == list(entry.token.encode()) or "\\x" in entry.token
    streamed = [
        e for ev in events for c in ev["choices"] if c["logprobs"] for e in c["logprobs"]["content"]
    ]
    assert streamed == done["choices"][0]["logprobs"]["content"]
    assert plain["choices"][0]["logprobs"] is None


async def test_seed_reproduces_and_no_temperature_is_greedy(tiny_engine) -> None:
    async with in_process(tiny_engine) as client:

        async def text(**kw) -> str:
            return (await chat(client, max_tokens=8, **kw))["choices"][0]["message"]["content"]

        greedy = await text()
        assert await text(temperature=0) == greedy
        a, b = await text(temperature=1.0, seed=11), await text(temperature=1.0, seed=11)
        assert a == b != await text(temperature=1.0, seed=12)
        assert await text(temperature=1.0, top_p=0, seed=11) == greedy


# ---- models, the real client, content types ------------------------------------------------------
async def test_models_with_the_openai_client(tiny_engine) -> None:
    async with in_process(tiny_engine) as client:
        r = await client.get("/v1/models")
        assert r.json() == {
            "object": "list",
            "data": [
                {
                    "id": "tiny:llama",
                    "object": "model",
                    "created": r.json()["data"][0]["created"],
                    "owned_by": "hest",
                }
            ],
        }
        r = await client.get("/v1/models/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport) as http:
            oai = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http)
            models = await oai.models.list()
            assert [m.id for m in models.data] == ["tiny:llama"]
            assert (await oai.models.retrieve("tiny:llama")).owned_by == "hest"
            with pytest.raises(openai.NotFoundError):
                await oai.models.retrieve("gpt-4o")
            with pytest.raises(openai.BadRequestError) as info:
                await oai.chat.completions.create(
                    model="m", messages=[USER], tools=[FN], max_tokens=2
                )
            assert info.value.body["param"] == "tools"
            done = await oai.chat.completions.create(
                model="m", messages=[USER], max_tokens=4, logprobs=True, top_logprobs=2,
                stop=["\x00"], seed=1, extra_body=RATIO,
            )  # fmt: skip
            assert len(done.choices[0].logprobs.content) == done.usage.completion_tokens


@pytest.mark.parametrize("path", ["/v1/summarize", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("ctype", "status"),
    [
        ("application/x-www-form-urlencoded", 200),  # what `curl -d` sends
        ("text/plain;charset=UTF-8", 200),
        (None, 200),
        ("application/json; charset=utf-8", 200),
        ("application/xml", 415),
        ("multipart/form-data; boundary=x", 415),
    ],
)
async def test_a_json_body_without_a_json_content_type(tiny_engine, path, ctype, status) -> None:
    body = {"text": ARTICLE, "max_new_tokens": 2} if path == "/v1/summarize" else BASE
    headers = {} if ctype is None else {"content-type": ctype}
    async with in_process(tiny_engine) as client:
        req = client.build_request("POST", path, content=json.dumps(body | RATIO), headers=headers)
        if ctype is None:
            req.headers.pop("content-type", None)
        r = await client.send(req)
    assert r.status_code == status, r.text
    if status == 415:
        error = r.json()["error"]
        assert error["code"] == "unsupported_media_type" and ctype in error["message"]
