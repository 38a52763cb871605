"""What the scheduler keeps of one request (`Ticket`), and the steps of its life there that
need no scheduler state: its budget checked against the engine when admitted (`budget_error`),
its run state (`run_state`), its share of a meter window (`share_reading`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import BudgetTooLowError, HestError
from .budget import q_to_min_j
from .decoding import TextDelta
from .endings import EndingPlan
from .generation import RequestState
from .guard import BudgetGuard
from .reading import plan_budget_q
from .request import GenerationResult, PreparedRequest


@dataclass(eq=False)
class Ticket:
    """One request inside the scheduler; `result` is set once it ended."""

    key: int
    req: PreparedRequest
    on_token: Callable[[TextDelta], None] | None
    on_done: Callable[[GenerationResult], None] | None
    st: RequestState | None = None
    t0: float = 0.0  # perf_counter at submit: its ttft_s, prefill_s, total_s count from here
    pos: int = 0  # prompt tokens prefilled so far
    cur: int = 0  # its last token: the input of its next decode step
    mark: int = 0  # guard.spent (picojoules) when the current meter window opened
    measured_j: float = 0.0  # its share of the meter's windows (by modelled spend)
    estimated_j: float = 0.0
    result: GenerationResult | None = None


class ForwardFailed(Exception):
    """A batched forward raised; its requests were ended with finish "error"."""


def budget_error(e, p: PreparedRequest) -> HestError | None:
    """A request prepared by another engine (another table or guard) may sit below this
    engine's minimum: it fails alone. One prepared here cannot (PreparedRequest refuses to
    be built below its minimum, and `tighten` clamps at it)."""
    need = e.energy.min_feasible_q(len(p.ids), p.max_new, e.stop_path)
    if e.guard_mode != "off" and p.budget_q < need:
        return BudgetTooLowError(
            f"budget {p.budget_j:.6g} J is below this request's minimum "
            f"{q_to_min_j(need):.6g} J on this engine",
            minimum_j=q_to_min_j(need),
            param="energy_budget_j",
        )
    return None


def run_state(e, p: PreparedRequest, n_layers: int) -> RequestState:
    """A new request's run state on engine `e`: its guard over its budget (and HEST's budget
    plan, reading.plan_budget_q of the engine's `plan_ratio`, `plan_from` and `plan_slope`), its
    beta."""
    plan_q = plan_budget_q(p.budget_q, p.fp16_q, e.plan_ratio, e.plan_from, e.plan_slope)
    return RequestState(
        req=p,
        guard=BudgetGuard(
            e.energy, p.budget_q, len(p.ids), p.max_new, e.guard_mode, e.stop_path, plan_q=plan_q
        ),
        beta=math.log(p.budget_ratio),
        layer_counts=[[0] * len(e.energy.paths) for _ in range(n_layers)],
        plan=EndingPlan(enabled=p.clean_end),
    )


def share_reading(tickets: list[Ticket], reading, watts: float) -> None:
    """Share a closed meter window's joules among the requests that spent in it, by each one's
    modelled spend there (equally where none spent), and mark where the next window starts."""
    spent = [t.st.guard.spent - t.mark for t in tickets]
    total = sum(spent)
    for t, q in zip(tickets, spent, strict=True):
        share = q / total if total else 1 / len(tickets)
        t.measured_j += reading.energy_j * share
        t.estimated_j += reading.elapsed_s * watts * share
        t.mark = t.st.guard.spent
