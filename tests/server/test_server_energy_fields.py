"""Per-request energy by phase, joules per token and carbon (issue 15, items 2 and 3): the
fields add up, and co2e_g is the estimate meter's joules at the configured grid intensity (an
estimate), null without one."""

from __future__ import annotations

import pytest
from server_helpers import ARTICLE, in_process, metric

BODY = {"text": ARTICLE, "max_new_tokens": 8, "energy_budget_ratio": 1.0, "clean_end": False}


@pytest.mark.anyio
async def test_phase_energy_and_carbon(tiny_engine) -> None:
    async with in_process(tiny_engine) as client:
        plain = (await client.post("/v1/summarize", json=BODY)).json()
    async with in_process(tiny_engine, grid_intensity_g_per_kwh=400.0) as client:
        green = (await client.post("/v1/summarize", json=BODY)).json()
        chat = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": ARTICLE}], "max_tokens": 8},
        )
        m = (await client.get("/metrics")).text
    e = plain["energy"]
    assert e["co2e_g"] is None
    assert e["prefill_j"] > 0 and e["decode_j"] >= 0
    assert e["prefill_j"] + e["decode_j"] == pytest.approx(e["modelled_j"], rel=1e-9)
    n = plain["usage"]["completion_tokens"]
    assert e["j_per_token"] == pytest.approx(e["modelled_j"] / n, rel=1e-9)
    g = green["energy"]
    assert g["meter"] == "estimate" and g["co2e_g"] == pytest.approx(
        g["estimated_j"] / 3.6e6 * 400.0, rel=1e-9
    )
    assert chat.json()["usage"]["energy"]["co2e_g"] > 0
    assert metric(m, "hest_co2e_grams_total") == pytest.approx(
        g["co2e_g"] + chat.json()["usage"]["energy"]["co2e_g"], rel=1e-9
    )
    assert metric(m, "hest_request_phase_energy_joules_count", phase="prefill") == 2
    assert metric(m, "hest_request_energy_per_token_joules_count") == 2
