"""Clean endings over HTTP (issue 14, item 1): `clean_end` on both endpoints (default on), the
plan's `finish_detail` in the responses, a strict type for the flag. The real default model and
adapter, in process, on validation rows of train.jsonl (never the test file)."""

from __future__ import annotations

import json

import pytest
from server_helpers import CNNDM, in_process

from hest_core import Engine
from hest_core.runtime.endings import ends_sentence

TRAIN = CNNDM.with_name("train.jsonl")


@pytest.fixture(scope="module")
def hest_engine() -> Engine:
    return Engine.from_pretrained("default", adapter="default", progress=False)


def _article() -> str:
    if not TRAIN.is_file():
        pytest.skip("../shared/data/cnndm/train.jsonl is not here")
    with TRAIN.open() as fh:
        for i, line in enumerate(fh):
            if i == 1611:
                return json.loads(line)["article"]
    raise AssertionError("train.jsonl has fewer rows than expected")


@pytest.mark.anyio
async def test_clean_end_over_http(hest_engine) -> None:
    art = _article()
    body = {"text": art, "max_new_tokens": 40, "energy_budget_ratio": 1.0}
    chat = {"messages": [{"role": "user", "content": art}], "max_tokens": 40}
    async with in_process(hest_engine) as client:
        on = (await client.post("/v1/summarize", json=body)).json()
        off = (await client.post("/v1/summarize", json=body | {"clean_end": False})).json()
        c = (await client.post("/v1/chat/completions", json=chat)).json()
        bad = await client.post("/v1/summarize", json=body | {"clean_end": "yes"})
        bad_chat = await client.post("/v1/chat/completions", json=chat | {"clean_end": 1})
    assert ends_sentence(on["summary"]) and on["finish_detail"] in ("planned", "trimmed", None)
    assert off["finish_detail"] is None and off["usage"]["completion_tokens"] <= 40
    assert on["usage"]["completion_tokens"] <= off["usage"]["completion_tokens"]
    text = c["choices"][0]["message"]["content"]
    assert ends_sentence(text)
    assert c["choices"][0]["finish_reason"] in ("stop", "length")
    assert "finish_detail" in c["usage"]["energy"]
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "clean_end"
    assert bad_chat.status_code == 400 and bad_chat.json()["error"]["param"] == "clean_end"
