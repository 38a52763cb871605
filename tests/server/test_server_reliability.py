"""The request that killed the server (issue 11, item 1), replayed against a real `python -m
server` process with the real default model: 5 times on each endpoint, every answer within its
limit, and the process still alive and healthy after."""

from __future__ import annotations

import httpx

EMOJI = "😀🎉🔥🚀✨😀🎉🔥"


def test_emoji_request_that_killed_the_server(real_server) -> None:
    url = real_server.url
    chat = {
        "messages": [{"role": "user", "content": EMOJI}],
        "max_tokens": 4,
        "energy_budget_ratio": 1.0,
    }
    native = {"text": EMOJI, "max_new_tokens": 4, "energy_budget_ratio": 1.0}
    for _ in range(5):
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=300)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] <= 4
        assert body["choices"][0]["finish_reason"] in ("length", "stop")
        assert "\ufffd" not in body["choices"][0]["message"]["content"]
        r = httpx.post(f"{url}/v1/summarize", json=native, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 4
        assert "\ufffd" not in r.json()["summary"]
    assert real_server.proc.poll() is None, real_server.tail()
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
