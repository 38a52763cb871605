"""A request's energy budget, owned by the runtime in one unit: integer picojoules.

The one validation of the budget fields (`requested_budget`: one field, a finite number > 0, at
most MAX_BUDGET_J / MAX_BUDGET_RATIO) and their one conversion to picojoules (`budget_q_of`,
rounded down) live here; the HTTP schema only checks that each field is a JSON number. Joules
and ratios elsewhere are views of these integers (`PreparedRequest.budget_j`, `.budget_ratio`).
"""

from __future__ import annotations

import math

from ..energy.model import PJ
from ..errors import BudgetTooLowError, InvalidInputError

# Caps far above any real request keep budget arithmetic finite (ratio x fp16 cost overflows to
# inf for ratios near 1e308); a ratio above 1 already means "no constraint". The HTTP schema
# states them (server/protocol.py); this module enforces them.
MAX_BUDGET_J = 1e9
MAX_BUDGET_RATIO = 1e3
BUDGET_FIELDS = ("energy_budget_j", "energy_budget_ratio")


def requested_budget(
    budget_j: float | None, budget_ratio: float | None, default_ratio: float
) -> tuple[str, float]:
    """The budget field a request uses and its value: `energy_budget_j` (joules) or
    `energy_budget_ratio` (of the all-fp16 cost), `default_ratio` when neither is given.
    Raises InvalidInputError: both given (code conflicting_budget), or the value is not a finite
    number > 0 and at most MAX_BUDGET_J / MAX_BUDGET_RATIO (code invalid_budget)."""
    if budget_j is not None and budget_ratio is not None:
        raise InvalidInputError(
            "give energy_budget_j or energy_budget_ratio, not both",
            param="energy_budget_j",
            code="conflicting_budget",
        )
    if budget_j is not None:
        name, val, cap = "energy_budget_j", budget_j, MAX_BUDGET_J
    else:
        name, cap = "energy_budget_ratio", MAX_BUDGET_RATIO
        val = default_ratio if budget_ratio is None else budget_ratio
    if isinstance(val, bool) or not isinstance(val, int | float) or not math.isfinite(val):
        raise InvalidInputError(
            f"{name}={val!r} must be a finite number > 0", param=name, code="invalid_budget"
        )
    if not 0 < val <= cap:
        raise InvalidInputError(
            f"{name}={val!r} must be > 0 and at most {cap:g}"
            + ("; energy_budget_ratio=1.0 is the request's all-fp16 cost" if val > cap else ""),
            param=name,
            code="invalid_budget",
        )
    return name, val


def budget_q_of(name: str, val: float, fp16_q: int) -> int:
    """A validated budget field (from `requested_budget`) in picojoules, rounded down: joules x
    10^12, or ratio x the request's all-fp16 cost `fp16_q` (pJ)."""
    return math.floor(val * PJ if name == "energy_budget_j" else val * fp16_q)


def budget_to_q(budget_j: float) -> int:
    """A budget in joules -> integer picojoules, rounded down."""
    return math.floor(budget_j * PJ)


def q_to_min_j(min_q: int) -> float:
    """The smallest float of joules whose budget_to_q() is >= min_q (so quoting it back works)."""
    m = min_q / PJ
    while budget_to_q(m) < min_q:
        m = math.nextafter(m, math.inf)
    return m


def q_to_min_ratio(min_q: int, fp16_q: int, digits: int = 3) -> float:
    """The smallest ratio with `digits` decimals whose budget (`budget_q_of`: ratio x fp16_q,
    rounded down) is >= min_q: the ratio to quote, so that sending it back is accepted (a ratio
    rounded to nearest could fall just under the minimum). min_q, fp16_q: picojoules (> 0)."""
    step = 10.0**-digits
    r = round(math.ceil(min_q / fp16_q / step) * step, digits)
    while budget_q_of("energy_budget_ratio", r, fp16_q) < min_q:
        r = round(r + step, digits)
    return r


def below_minimum(
    param: str,
    budget_q: int,
    min_q: int,
    fp16_q: int,
    prompt_tokens: int,
    path: str | None = None,
):
    """The BudgetTooLowError of a budget (pJ) below its request's minimum (pJ), quoting it in
    joules and as a ratio, each the smallest value that is accepted when sent back (`q_to_min_j`,
    `q_to_min_ratio`). `path`: the one path of a fixed-path request (guard "stop"); None: every
    layer on its cheapest path."""
    min_j = q_to_min_j(min_q)
    how = f"every layer on {path}" if path else "every layer on its cheapest path"
    return BudgetTooLowError(
        f"{param} gives {budget_q / PJ:.6g} J, below this request's minimum of {min_j:.6g} J, "
        f"energy_budget_ratio {q_to_min_ratio(min_q, fp16_q):.3f} (a ratio is of the request's "
        "all-fp16 cost, which counts max_new_tokens): what its "
        f"{prompt_tokens}-token prompt (the part of the text it reads) and one generated token "
        f"cost with {how}. Raise the budget",
        minimum_j=min_j,
        param=param,
    )
