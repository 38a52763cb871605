"""The budget invariant as a property: whatever the prompt, budget, batch mix and controller
weights, the modelled energy of executed work never exceeds the budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hest_core import Engine, GenerationRequest

WORDS = [
    "the",
    "council",
    "voted",
    "bus",
    "network",
    "ridership",
    "spring",
    "fares",
    "record",
    "officials",
    "new",
    "routes",
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    e = Engine.from_pretrained("tiny:qwen3", adapter=None, progress=False)
    e.max_article_tokens = 96
    return e


request_st = st.tuples(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=120).map(" ".join),
    st.floats(min_value=0.0, max_value=1.6),  # position between the minimum and 1.6 x fp16
    st.integers(min_value=1, max_value=24),
    st.booleans(),  # budget given in joules or as a ratio
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batch=st.lists(request_st, min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["paced", "hard"]),
)
def test_modelled_energy_never_exceeds_budget(engine: Engine, batch, seed, mode):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in engine.controller.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)  # random controller weights
    engine.guard_mode = mode
    reqs = []
    for text, pos, max_new, in_joules in batch:
        probe = engine.check(
            GenerationRequest(text, energy_budget_ratio=1.0, max_new_tokens=max_new)
        )
        budget_j = (
            probe.min_j + pos * (probe.fp16_cost_j - probe.min_j)
            if pos <= 1
            else pos * probe.fp16_cost_j
        )
        budget_j = max(budget_j, probe.min_j)
        if in_joules:
            reqs.append(GenerationRequest(text, energy_budget_j=budget_j, max_new_tokens=max_new))
        else:
            ratio = (
                budget_j / probe.fp16_cost_j * (1 + 1e-9)
            )  # ratio x fp16 must not round below min
            reqs.append(GenerationRequest(text, energy_budget_ratio=ratio, max_new_tokens=max_new))
    for res in engine.generate(reqs):
        st_ = res.stats
        assert st_.modelled_j <= st_.budget_j, (st_.modelled_j, st_.budget_j)
        assert res.finish_reason in ("stop", "length", "energy_budget")
