"""The read plan: how much of a long article a request reads when its budget cannot pay for the
whole article and a summary (issue 14: "where the budget binds, choose what to give up").

Reading a prompt token costs the same on every full-quality path of a CPU (prefill is
compute-bound), so on a long article the prompt is most of what a tight budget has: a 1,900-token
article on fp16 costs about as much to read as 60 generated tokens. Cheaper decode paths cannot
win that back, and a request that reads everything is left with a budget for a dozen tokens. The
plan trades the article's tail instead, where news puts its least important text (the lead-3
baseline beats every model on CNN/DM): before prefill, the runtime reserves the cost of a
summary of `summary_tokens` on the cheapest full-quality decode path (`plan_paths`) and reads the
longest head of the article whose prefill the rest of the budget pays for, never fewer than
`min_read` article tokens (or the whole article, if it is shorter). A request whose budget pays
for the whole article and that summary reads everything: the plan acts only where the budget
binds. The response says so (`usage.article_tokens_read`, `truncated_by: "budget"`); the budget
ratio still refers to the whole prompt (DESIGN.md: r x the all-fp16 cost of what was sent).

HEST's own read plan (`policy_read_budget_q`): an adapter with a `read_ratio` plans its read as if
its budget were at most `read_ratio` x the request's all-fp16 cost, even where the budget could
pay for more, because on news articles reading the whole text buys the default model nothing
(the lead carries the content: on the validation split a summary of an article's head scores at
least as well, for a fraction of the joules; docs/training.md, "The read ratio"). The request
keeps its whole budget for generating; only the read is planned with less. It is reported as
`truncated_by: "policy"` where the budget alone would have read more; `read: "whole"` turns every
plan off.

Costs are the guard's integer picojoules (`EnergyModel`), so the plan and the guard agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import paths as reg
from ..energy.model import EnergyModel

READ_MODES = ("budget", "whole")
# the summary the plan reserves for, in generated tokens (capped by the request's max_new_tokens):
# about the longest summary the default model writes for the server's 3-sentence instruction
# (unconstrained: 70 tokens on average on 20 validation articles, several at the 96 cap). On
# those articles a 64-token reserve left 50-56% of r = 0.6 outputs ended by the budget; 96 left
# 0-18% and scored as well (docs/results.md, session 8)
SUMMARY_TOKENS = 96
MIN_READ_TOKENS = 128  # the plan never reads fewer article tokens than this (or the whole article)


def policy_read_budget_q(budget_q: int, fp16_q: int, read_ratio: float | None) -> int:
    """The picojoules HEST's read plan plans with: min(budget_q, ceil(read_ratio x fp16_q)), or
    budget_q when read_ratio is None. fp16_q: the request's all-fp16 cost (the budget ratio's
    reference, `EnergyModel.request_cost_q`). Raises ValueError for a ratio outside (0, 1]."""
    if read_ratio is None:
        return budget_q
    if not 0 < read_ratio <= 1:
        raise ValueError(f"read_ratio must be in (0, 1], got {read_ratio!r}")
    return min(budget_q, math.ceil(read_ratio * fp16_q))


def plan_budget_q(
    budget_q: int,
    fp16_q: int,
    plan_ratio: float | None,
    plan_from: float | None = None,
    plan_slope: float | None = None,
) -> int:
    """The picojoules HEST's controller plans with (`BudgetGuard.remaining_ratio`): for a
    request whose budget is at least `plan_from` x fp16_q (None: `plan_ratio`),
    ceil(plan_ratio x fp16_q). With plan_from equal to plan_ratio it caps the plan at plan_ratio
    (above it more budget buys the same work); with plan_from below plan_ratio, a budget of at
    least plan_from runs as if it were plan_ratio (the guard still stops the work at the real
    budget). Below that start s (the budget binds there), the plan is
    s x fp16_q x (r / s) ** plan_slope, rounded, with r = budget_q / fp16_q: slope None or 1 plans
    with the real budget; a slope above 1 lowers the plan faster than the budget, so the
    controller's price rises and it buys cheaper paths for more tokens where energy is what
    ends the summary (docs/training.md, "The budget plan"). When plan_ratio is None the plan is
    budget_q. fp16_q: the request's all-fp16 cost (> 0). Raises ValueError for a ratio outside
    (0, 1] or a slope that is not a finite number > 0."""
    if plan_ratio is None:
        return budget_q
    start = plan_ratio if plan_from is None else plan_from
    for name, r in (("plan_ratio", plan_ratio), ("plan_from", start)):
        if not 0 < r <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {r!r}")
    if plan_slope is not None and not (math.isfinite(plan_slope) and plan_slope > 0):
        raise ValueError(f"plan_slope must be a finite number > 0, got {plan_slope!r}")
    if budget_q >= start * fp16_q:
        return math.ceil(plan_ratio * fp16_q)
    if plan_slope is None or plan_slope == 1 or fp16_q <= 0:
        return budget_q
    return round(start * fp16_q * (budget_q / (start * fp16_q)) ** plan_slope)


@dataclass(frozen=True)
class ReadPlan:
    """What a request reads: `read` of its `article` tokens (read == article: everything)."""

    article: int
    read: int

    @property
    def cut(self) -> bool:
        return self.read < self.article


def plan_paths(em: EnergyModel, path: int | None) -> tuple[int, int]:
    """(prefill path, decode path) the plan prices a summary on: `path` for a fixed-path request
    (guard "stop"), else per phase the path whose whole-token cost is least among the paths that
    run the MLP (skip is not a full-quality summary)."""
    if path is not None:
        return path, path
    full = [i for i in range(reg.n_paths()) if reg.get(i).mlp is not None]
    pre = min(full, key=lambda i: em.unit_sum_q["prefill"][i])
    dec = min(full, key=lambda i: em.unit_sum_q["decode"][i])
    return pre, dec


def summary_cost_q(em: EnergyModel, prompt: int, new: int, pre: int, dec: int) -> int:
    """Picojoules of reading a `prompt`-token prompt with its units on path `pre` and generating
    `new` tokens on path `dec` (the guard's charges: `EnergyModel.request_cost_q` split by
    phase)."""
    total = em.prefill_fixed_q(prompt) + prompt * em.unit_sum_q["prefill"][pre]
    step = em.unit_sum_q["decode"][dec]
    for i in range(1, new):  # decode step i attends prompt + i positions
        total += em.decode_fixed_q(prompt + i) + step
    return total


def plan_read(
    em: EnergyModel,
    budget_q: int,
    template: int,
    article: int,
    max_new: int,
    *,
    path: int | None = None,
    summary_tokens: int = SUMMARY_TOKENS,
    min_read: int = MIN_READ_TOKENS,
) -> ReadPlan:
    """The article tokens a request with `budget_q` picojoules reads.

    template: prompt tokens around the article (chat template, instruction, system turn);
    article: the article's tokens; max_new: the request's max_new_tokens; path: the one path of
    a fixed-path request (None: the cheapest full-quality paths, `plan_paths`). Returns the
    whole article when the budget pays for it plus min(summary_tokens, max_new) generated tokens,
    else the longest head that leaves that summary paid for, but at least min(min_read,
    article) tokens. Raises ValueError for negative counts."""
    if min(template, article, max_new, summary_tokens, min_read) < 0:
        raise ValueError("plan_read: token counts must be >= 0")
    pre, dec = plan_paths(em, path)
    new = min(summary_tokens, max_new)

    def fits(n: int) -> bool:
        return summary_cost_q(em, template + n, new, pre, dec) <= budget_q

    if fits(article):
        return ReadPlan(article, article)
    lo, hi = min(min_read, article), article  # fits(hi) is False; find the largest n that fits
    if not fits(lo):
        return ReadPlan(article, lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return ReadPlan(article, lo)
