"""An error caused by one request stays with that request; the rest of its batch is served
(issue 11, item 2). Faults are injected by wrapping the real per-request step, never by mocking."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hest_core import BudgetTooLowError, Engine, GenerationRequest
from hest_core.errors import RequestFailedError
from hest_core.runtime.generation import BatchRunner

TEXTS = [
    "The council voted to expand the bus network after a year of delays and public meetings.",
    "Scientists found a new species of frog in the rainforest, living high in the canopy.",
    "The museum reopened on Sunday after a two-year renovation of its oldest galleries.",
]


def _prepared(engine: Engine):
    return [
        engine.check(GenerationRequest(t, energy_budget_ratio=1.0, max_new_tokens=12))
        for t in TEXTS
    ]


def _alone(engine: Engine, p):
    return engine.generate([p])[0]


def test_budget_cannot_go_below_its_minimum_after_check(tiny_engine: Engine):
    """The named case once: a budget tightened below the request's minimum after check() (as a
    brownout could) failed the whole batch. Now the runtime owns the budget: `tighten` clamps at
    the minimum (the request runs), and a PreparedRequest cannot be built below it."""
    ps = _prepared(tiny_engine)
    low = ps[1].tighten(0.0)
    assert low.budget_q == low.min_q < ps[1].budget_q
    with pytest.raises(BudgetTooLowError) as info:
        replace(ps[1], budget_q=ps[1].min_q - 1)
    assert info.value.minimum_j == ps[1].min_j
    results = tiny_engine.generate([ps[0], low, ps[2]])
    assert all(r.error is None for r in results)
    assert results[1].stats.modelled_j <= low.budget_j


def test_exception_in_one_rows_step_leaves_the_others(tiny_engine: Engine, monkeypatch):
    ps = _prepared(tiny_engine)
    alone = [_alone(tiny_engine, p) for p in ps]
    real = BatchRunner._emit
    victim = ps[1].ids

    def emit(self, i, st, tok, *rest):
        if st.req.ids == victim and len(st.out_ids) == 3:
            raise RuntimeError("injected failure in one request's step")
        return real(self, i, st, tok, *rest)

    monkeypatch.setattr(BatchRunner, "_emit", emit)
    results = tiny_engine.generate(ps)
    assert results[1].finish_reason == "error"
    assert isinstance(results[1].error, RequestFailedError)
    assert "injected failure" in results[1].error.message
    assert results[1].stats.completion_tokens == 3  # what it ran before it failed is counted
    for k in (0, 2):
        assert results[k].error is None and results[k].text == alone[k].text
