"""An error caused by one request stays with that request; the rest of its batch is served
(issue 11, item 2). Faults are injected by wrapping the real per-request step, never by mocking."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hest_core import BudgetTooLowError, Engine, GenerationRequest
from hest_core.errors import RequestFailedError
from hest_core.generation import BatchRunner

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


@pytest.mark.parametrize("bad", [0, 1, 2])
def test_budget_below_minimum_fails_only_its_request(tiny_engine: Engine, bad: int):
    """The named case: a budget tightened below the request's minimum after check() (as a
    brownout could) once raised BudgetTooLowError for the whole batch."""
    ps = _prepared(tiny_engine)
    ps[bad] = replace(ps[bad], budget_j=ps[bad].min_j / 2, budget_q=None)
    streamed: dict[int, str] = {}

    def on_token(i, delta):
        streamed[i] = streamed.get(i, "") + str(delta)

    results = tiny_engine.generate(ps, on_token=on_token)
    assert len(results) == 3
    err = results[bad]
    assert err.finish_reason == "error" and isinstance(err.error, BudgetTooLowError)
    assert err.error.minimum_j == ps[bad].min_j and err.stats.modelled_j == 0 and err.text == ""
    assert bad not in streamed
    for k in set(range(3)) - {bad}:
        res = results[k]
        assert res.error is None and res.finish_reason in ("stop", "length")
        assert res.text == _alone(tiny_engine, ps[k]).text  # served as if alone
        assert streamed.get(k, "") == res.text  # streamed under its own index


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
