"""The runtime owns a request's budget in one unit, integer picojoules (issue 12, item 1):
`PreparedRequest.budget_q` with joules and ratio as views, `tighten` lowering it and clamping at
the request's minimum, and one validation of the budget fields (hest_core/runtime/budget.py)."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError, replace

import pytest

from hest_core import BudgetTooLowError, GenerationRequest, InvalidInputError, PreparedRequest
from hest_core.energy.model import PJ
from hest_core.runtime.budget import (
    MAX_BUDGET_J,
    MAX_BUDGET_RATIO,
    budget_q_of,
    q_to_min_j,
    requested_budget,
)

FP16_Q = 3_000_000_000_017  # ~3 J, not a round number of pJ
MIN_Q = 1_000_000_000_003


def _req(budget_q: int = FP16_Q, **kw) -> PreparedRequest:
    return PreparedRequest(
        ids=[1, 2, 3],
        max_new=8,
        budget_q=budget_q,
        fp16_q=FP16_Q,
        min_q=MIN_Q,
        truncated=False,
        **kw,
    )


def _views_agree(p: PreparedRequest) -> None:
    assert type(p.budget_q) is int
    assert p.budget_j == p.budget_q / PJ
    assert p.budget_ratio == p.budget_q / p.fp16_q
    assert p.fp16_cost_j == p.fp16_q / PJ
    assert math.floor(p.min_j * PJ) >= p.min_q  # quoting the minimum back is accepted


@pytest.mark.parametrize("ratio", [0.9, 0.5, 0.4, 1 / 3, 0.3334, 0.0])
def test_tighten_lowers_in_pj_and_clamps_at_the_minimum(ratio: float) -> None:
    p = _req()
    t = p.tighten(ratio)
    assert t.budget_q == max(math.floor(ratio * FP16_Q), MIN_Q)
    assert t.budget_q >= t.min_q and t.budget_q < p.budget_q
    _views_agree(t)
    assert p.budget_q == FP16_Q  # the original is unchanged (frozen)


def test_tighten_never_raises_the_budget() -> None:
    p = _req(budget_q=MIN_Q + 5)
    assert p.tighten(0.9) is p and p.tighten(2.0) is p
    assert p.tighten(0.0).budget_q == MIN_Q
    assert p.tighten(0.0).tighten(0.0).budget_q == MIN_Q


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, True, "0.5"])
def test_tighten_refuses_a_bad_ratio(bad) -> None:
    with pytest.raises(ValueError, match="ratio"):
        _req().tighten(bad)


def test_budget_is_only_changed_through_the_runtime() -> None:
    p = _req()
    with pytest.raises(FrozenInstanceError):
        p.budget_q = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        p.budget_j = 1.0  # type: ignore[misc]  # a view, not a field
    with pytest.raises(BudgetTooLowError) as info:
        replace(p, budget_q=MIN_Q - 1)
    assert info.value.minimum_j == q_to_min_j(MIN_Q) and "minimum of" in info.value.message
    assert replace(p, budget_q=1, guarded=False).budget_q == 1  # a fixed policy has no minimum
    with pytest.raises(TypeError, match="budget_q"):
        replace(p, budget_q=float(FP16_Q))


@pytest.mark.parametrize(
    "j,ratio,code,param",
    [
        (1.0, 0.5, "conflicting_budget", "energy_budget_j"),
        (-1.0, None, "invalid_budget", "energy_budget_j"),
        (0.0, None, "invalid_budget", "energy_budget_j"),
        (math.inf, None, "invalid_budget", "energy_budget_j"),
        (MAX_BUDGET_J * 2, None, "invalid_budget", "energy_budget_j"),
        (None, math.nan, "invalid_budget", "energy_budget_ratio"),
        (None, MAX_BUDGET_RATIO * 2, "invalid_budget", "energy_budget_ratio"),
        (None, True, "invalid_budget", "energy_budget_ratio"),
        (None, "0.5", "invalid_budget", "energy_budget_ratio"),
    ],
)
def test_one_validation_of_the_budget_fields(j, ratio, code, param) -> None:
    with pytest.raises(InvalidInputError) as info:
        requested_budget(j, ratio, 0.6)
    assert (info.value.code, info.value.param) == (code, param)


def test_budget_fields_to_pj() -> None:
    assert requested_budget(None, None, 0.6) == ("energy_budget_ratio", 0.6)
    assert requested_budget(2.5, None, 0.6) == ("energy_budget_j", 2.5)
    assert budget_q_of("energy_budget_j", 2.5, FP16_Q) == 2_500_000_000_000
    assert budget_q_of("energy_budget_ratio", 0.5, FP16_Q) == math.floor(0.5 * FP16_Q)


def test_check_builds_the_budget_in_pj(tiny_engine) -> None:
    p = tiny_engine.check(GenerationRequest("A short article.", energy_budget_ratio=0.8))
    assert p.min_q == tiny_engine.energy.min_feasible_q(len(p.ids), p.max_new)
    assert p.fp16_q == tiny_engine.energy.request_cost_q(len(p.ids), p.max_new, 0)
    assert p.budget_q == math.floor(0.8 * p.fp16_q) and p.budget_param == "energy_budget_ratio"
    _views_agree(p)
    low = p.tighten(0.0)
    assert low.budget_q == p.min_q
    res = tiny_engine.generate([low])[0]
    assert res.error is None and res.stats.modelled_j <= low.budget_j
    assert res.stats.budget_j == low.budget_j and res.stats.budget_ratio == low.budget_ratio
