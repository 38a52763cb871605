"""Whole documents over HTTP (issue 16): the context limit is stated in /v1/info, a text over it
is refused with the numbers (422 / 400), and `truncate: true` cuts it to fit, flagged."""

from __future__ import annotations

import pytest
from server_helpers import ARTICLE, in_process


@pytest.mark.anyio
async def test_over_the_context_is_refused_or_cut_on_request(tiny_engine) -> None:
    long = ARTICLE * 40  # ~2,700 tokens; the tiny model reads 2,048
    async with in_process(tiny_engine) as client:
        info = (await client.get("/v1/info")).json()
        native = await client.post("/v1/summarize", json={"text": long, "max_new_tokens": 8})
        chat = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": long}], "max_tokens": 8},
        )
        cut = await client.post(
            "/v1/summarize",
            json={"text": long, "max_new_tokens": 8, "truncate": True, "read": "whole"},
        )
        fits = await client.post(
            "/v1/summarize", json={"text": ARTICLE * 20, "max_new_tokens": 8, "read": "whole"}
        )
    assert info["max_context_tokens"] == 2048
    assert native.status_code == 422 and chat.status_code == 400
    for r in (native, chat):
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and "tokens" in err["message"]
    assert cut.status_code == 200 and cut.json()["truncated"] is True
    assert cut.json()["truncated_by"] == "context"
    assert cut.json()["usage"]["prompt_tokens"] <= 2048 - 8
    assert fits.status_code == 200 and fits.json()["truncated"] is False
    assert fits.json()["usage"]["prompt_tokens"] > 1000


@pytest.mark.anyio
async def test_the_read_plan_is_reported_on_both_apis(tiny_engine) -> None:
    """A budget that cannot pay for the whole article and a summary reads its head (read:
    budget, the default), and both APIs say how much; read: whole reads it all; a bad mode is a
    clear error."""
    text = ARTICLE * 20
    body = {"text": text, "max_new_tokens": 16, "energy_budget_ratio": 0.5}
    chat = {"messages": [{"role": "user", "content": text}], "max_tokens": 16}
    async with in_process(tiny_engine) as client:
        plan = (await client.post("/v1/summarize", json=body)).json()
        whole = (await client.post("/v1/summarize", json=body | {"read": "whole"})).json()
        c = await client.post("/v1/chat/completions", json=chat | {"energy_budget_ratio": 0.5})
        bad = await client.post("/v1/summarize", json=body | {"read": "all"})
        bad_chat = await client.post("/v1/chat/completions", json=chat | {"read": 1})
    u = plan["usage"]
    assert plan["truncated"] is True and plan["truncated_by"] == "budget"
    assert 128 <= u["article_tokens_read"] < u["article_tokens"] == whole["usage"]["article_tokens"]
    assert whole["truncated"] is False and whole["truncated_by"] is None
    assert whole["usage"]["article_tokens_read"] == whole["usage"]["article_tokens"]
    assert plan["energy"]["budget_j"] == whole["energy"]["budget_j"]  # the ratio's reference
    cu = c.json()["usage"]
    assert c.status_code == 200 and cu["truncated_by"] == "budget"
    assert cu["article_tokens_read"] < cu["article_tokens"]
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "read"
    assert bad_chat.status_code == 400 and bad_chat.json()["error"]["param"] == "read"
