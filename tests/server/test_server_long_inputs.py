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
            "/v1/summarize", json={"text": long, "max_new_tokens": 8, "truncate": True}
        )
        fits = await client.post("/v1/summarize", json={"text": ARTICLE * 20, "max_new_tokens": 8})
    assert info["max_context_tokens"] == 2048
    assert native.status_code == 422 and chat.status_code == 400
    for r in (native, chat):
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and "tokens" in err["message"]
    assert cut.status_code == 200 and cut.json()["truncated"] is True
    assert cut.json()["usage"]["prompt_tokens"] <= 2048 - 8
    assert fits.status_code == 200 and fits.json()["truncated"] is False
    assert fits.json()["usage"]["prompt_tokens"] > 1000
