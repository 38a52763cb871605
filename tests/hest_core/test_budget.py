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
    q_to_min_ratio,
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


@pytest.mark.parametrize(
    "min_q,fp16_q",
    [(MIN_Q, FP16_Q), (1_532_810_000_000, 69_673_209_789_096), (7, 1000), (999, 1000), (5, 3)],
)
def test_the_quoted_minimum_ratio_is_accepted_and_the_least_such(min_q, fp16_q) -> None:
    """The ratio a below-minimum error quotes (3 decimals) is accepted when sent back, and one
    step lower is not (a session-20 user sent back "ratio 0.022" and was refused: it had been
    rounded to nearest, 0.0223 down)."""
    r = q_to_min_ratio(min_q, fp16_q)
    assert budget_q_of("energy_budget_ratio", r, fp16_q) >= min_q
    assert budget_q_of("energy_budget_ratio", round(r - 0.001, 3), fp16_q) < min_q


def test_the_below_minimum_error_quotes_what_is_accepted() -> None:
    import re

    fp16_q, min_q = 69_673_209_789_096, 1_553_980_000_000  # the user's 0.0223
    p = PreparedRequest(
        ids=[1, 2, 3], max_new=8, budget_q=fp16_q, fp16_q=fp16_q, min_q=min_q, truncated=False
    )
    with pytest.raises(BudgetTooLowError) as info:
        replace(p, budget_q=min_q - 1)
    msg = info.value.message
    ratio = float(re.search(r"energy_budget_ratio ([0-9.]+)", msg).group(1))
    joules = float(re.search(r"minimum of ([0-9.eE+-]+) J", msg).group(1))
    assert ratio == 0.023 and budget_q_of("energy_budget_ratio", ratio, fp16_q) >= min_q
    assert budget_q_of("energy_budget_j", joules, fp16_q) >= min_q
    assert "3-token prompt" in msg and "cheapest path" in msg and "max_new_tokens" in msg
