"""The budget guard: modelled energy of executed work never exceeds the request's budget.

The ledger is kept in integer picojoules (`EnergyModel.*_q`: every charge rounded up, the budget
rounded down), so the invariant holds exactly, with no float slack: a budget of exactly the
all-fp16 cost pays for every unit on fp16.

Before each layer step it computes how much the request may spend on that layer's units:
* hard limit: what is left after reserving the cheapest way to finish the current token
  (remaining layers on their cheapest path) and, during prefill, the cheapest next generated
  token;
* paced limit (mode "paced"; the engine's default is "hard"): the spend above the all-cheapest
  minimum is spread over
  the rest of the request in proportion to its all-fp16 cost, so a request cannot run its budget
  dry on the first tokens and then stop early.
Where the controller's choice costs more than the limit, the guard demotes units whose margin
(logit of the chosen path minus the next cheaper one) is smallest: fp16 -> int8, then -> skip.
A decode step starts only if its cheapest form fits, else the request ends with
finish_reason="energy_budget".
* stop (mode "stop", for a fixed path: the fair baselines of the evaluation): nothing is demoted;
  every unit runs the request's one path, and a decode step starts only if it fits on that path.

Batched decode (`EnergyModel.unit_rebate_q`): every limit, reservation and check above prices
work at its batch-1 cost, and `commit` charges that; once a layer's rows are all fitted, `share`
gives back what the request's units pay less because batch mates ran the same path in that
layer (and `share_head`, the head's shared part). A rebate is never more than what was just
charged for the same work, so the attributed spend is at most the batch-1 spend, which the
checks kept within the budget: the invariant holds whoever joins or leaves the batch. The
rebate raises `remaining_ratio`, so a budget-aware controller spends it on later tokens.

Mixed-path prefill (`EnergyModel.split_premium_q`): where a request's rows in a prefill layer
take several paths, `commit` also charges the weight passes of its minority paths, and `fit`
counts them against the limit (it demotes until units and passes fit, retrying with the passes
of the demoted mix, else puts every row on the layer's cheapest path, which pays no pass and
which the reserve always covers); `share_split` gives back what batch mates on the same paths
shared, like `share`.

Prefill rounds of several requests (`EnergyModel.round_rebate_q`): a request's prefill is priced
and charged as if its round were its own; after a round it shared, `share_round` gives back what
its tokens cost less in the larger round (of what its units and its tokens' fixed work were
charged for that round), again never more than was charged.
"""

from __future__ import annotations

import torch

from .. import paths as reg
from ..energy.model import EnergyModel

MODES = ("paced", "hard", "stop", "off")
FIT_ROUNDS = 3  # `fit`: demotions retried with the new mix's minority passes at most this often


class BudgetGuard:
    def __init__(
        self,
        em: EnergyModel,
        budget_q: int,
        prompt_len: int,
        max_new: int,
        mode: str,
        path: int | None = None,
        plan_q: int | None = None,
    ):
        """budget_q: picojoules; mode: one of MODES; path: the one path of mode "stop";
        plan_q: picojoules the controller plans with (`remaining_ratio`; None: budget_q;
        reading.plan_budget_q). Only the controller's view changes: every check keeps
        budget_q."""
        if mode == "stop" and path is None:
            raise ValueError('guard mode "stop" needs the path every unit runs')
        self.em, self.budget, self.mode, self.path = em, budget_q, mode, path
        self.plan = budget_q if plan_q is None else plan_q
        self.P, self.max_new = prompt_len, max_new
        self.spent = 0  # picojoules: attributed (batch-1 charges minus rebates)
        self.rebated = 0  # picojoules given back for work shared with batch mates
        self.round_units = 0  # picojoules charged for the units of the current prefill round
        self.demotions = 0
        self._prompt_started = 0  # prompt tokens whose prefill round has begun
        self._prompt_later = 0  # prompt tokens of later rounds (reserved at their cheapest)
        self.phase = "prefill"
        # not-yet-charged work, all fp16 (the reference path)
        self.rem_fp16 = em.request_cost_q(prompt_len, max_new, em.ref)
        self.rem_min = em.request_cost_q(prompt_len, max_new, None)  # ... and all cheapest

    @property
    def spent_j(self) -> float:
        return self.spent / 1e12

    @property
    def charged(self) -> int:
        """Picojoules charged at batch-1 prices (spent plus every rebate): what the request
        would have paid decoding alone for the same paths."""
        return self.spent + self.rebated

    def remaining_ratio(self) -> float:
        """What the request has left over what its remaining work costs all on fp16: (plan -
        spent) / the all-fp16 cost of the work not yet charged (max_new_tokens assumed); the plan
        is the budget unless a `plan_q` was given. At the start it is the request's
        budget ratio (or plan ratio); it stays there while the request spends on plan, rises
        when it spent less, falls when it spent more. 0.0 when nothing is left."""
        left = max(0, self.plan - self.spent)
        return left / self.rem_fp16 if self.rem_fp16 > 0 else (1.0 if left else 0.0)

    # ---- fixed (ungated) work --------------------------------------------------------------------
    def _charge_fixed(self, cost: int) -> None:
        self.spent += cost
        self.rem_fp16 -= cost
        self.rem_min -= cost

    def start_prefill(self) -> None:
        self.phase = "prefill"
        self._charge_fixed(self.em.prefill_fixed_q(self.P))

    def begin_prefill_chunk(self, n: int) -> None:
        """The next n prompt tokens run now (a prefill round of chunked prefill): the limit of
        their layers reserves the cheapest form of the prompt tokens of later rounds, so an
        early round cannot spend what the rest of the prompt needs."""
        self.round_units = 0  # what this round's units are charged (`share_round`)
        self._prompt_started += n
        self._prompt_later = max(0, self.P - self._prompt_started)

    def try_start_decode(self, ctx: int) -> bool:
        """Charge a decode step's fixed work if its cheapest form fits; else False (stop)."""
        self.phase = "decode"
        fixed = self.em.decode_fixed_q(ctx)
        gated = self.em.gated_step_q("decode", self.path if self.mode == "stop" else None)
        if self.mode != "off" and self.spent + fixed + gated > self.budget:
            return False
        self._charge_fixed(fixed)
        return True

    # ---- gated work, one layer at a time ---------------------------------------------------------
    def limit(self, li: int, n: int) -> int | None:
        """Most this request may spend on layer li's n units (None: no limit)."""
        if self.mode in ("off", "stop"):
            return None
        ph = self.phase
        reserve = n * self.em.min_after_q[ph][li + 1]
        if ph == "prefill":  # the prompt's later rounds, then the first generated token
            reserve += self._prompt_later * self.em.min_sum_q["prefill"]
            if self.max_new >= 2:
                reserve += self.em.min_decode_step_q(self.P + 1)
        left = self.budget - self.spent
        hard = left - reserve
        if self.mode == "hard" or left >= self.rem_fp16:
            return hard
        c = self.em.unit_q[ph][li]
        step_fp, step_min = n * c[self.em.ref], n * min(c)
        span = self.rem_fp16 - self.rem_min
        phi = min(1.0, max(0.0, (left - self.rem_min) / span)) if span > 0 else 1.0
        return min(hard, step_min + int(phi * (step_fp - step_min)))

    def commit(self, li: int, counts: list[int]) -> int:
        """Charge layer li's units, counts (P,) per path; returns the picojoules charged."""
        c = self.em.unit_q[self.phase][li]
        cost = reg.cost(counts, c)
        if self.phase == "prefill":  # the weight passes of its minority paths (none on one)
            self.round_units += cost
            cost += self.em.split_premium_q(counts)
        n = sum(counts)
        self.spent += cost
        self.rem_fp16 -= n * c[self.em.ref]
        self.rem_min -= n * min(c)
        return cost

    def commit_one(self, li: int, p: int) -> int:
        """`commit` of one unit on path p (a row of a decode step): the same charge without a
        count vector. Returns the picojoules charged."""
        c = self.em.unit_q[self.phase][li]
        cost = c[p]  # one path: no minority pass
        self.spent += cost
        self.rem_fp16 -= c[self.em.ref]
        self.rem_min -= min(c)
        return cost

    def share_one(self, li: int, p: int, m: int) -> int:
        """`share` of one unit on path p of a decode step whose layer li ran m units on p
        (this one included). Returns the picojoules given back."""
        back = self.em.unit_rebate_q(li, p, m)
        self.spent -= back
        self.rebated += back
        return back

    def share(self, li: int, counts: list[int], on_path: list[int]) -> int:
        """After a decode step's layer li: give back this request's share of the work it shared.
        counts (P,): its units on each path there (already committed); on_path (P,): the step's
        units on each path there, every request's (>= counts). Returns the picojoules given
        back (<= what `commit` charged for them)."""
        back = 0
        for p, n in enumerate(counts):
            if n:
                back += n * self.em.unit_rebate_q(li, p, on_path[p])
        self.spent -= back
        self.rebated += back
        return back

    def share_split(self, counts: list[int], on_path: list[int]) -> int:
        """After a prefill round's layer: give back this request's share of the minority-path
        weight passes batch mates ran too (`EnergyModel.split_rebate_q`). counts (P,): its rows
        on each path there (committed); on_path (P,): the round's. Returns the picojoules
        given back (<= what `commit` charged for those passes)."""
        back = self.em.split_rebate_q(counts, on_path)
        self.spent -= back
        self.rebated += back
        return back

    def share_round(self, own: int, total: int) -> int:
        """After a prefill round in which this request ran `own` of the round's `total` tokens:
        give back what its units cost less in the larger round (`EnergyModel.round_rebate_q`, of
        what `commit` charged their units this round). Returns the picojoules given back."""
        back = self.em.round_rebate_q(self.round_units, own, total)
        self.round_units = 0
        self.spent -= back
        self.rebated += back
        return back

    def share_head(self, rows: int) -> int:
        """After a decode step of `rows` rows (this request's included): give back its share of
        the head's shared part (charged whole by `try_start_decode`). Returns the picojoules."""
        back = self.em.head_rebate_q(rows)
        self.spent -= back
        self.rebated += back
        return back

    def fit_one(self, li: int, p: int) -> int:
        """`fit` of one row on path p: the path it runs (p where it fits the limit, else the
        one `fit` demotes it to; at one row nothing is ranked, so no logits)."""
        lim = self.limit(li, 1)
        if lim is None or self.em.unit_q[self.phase][li][p] <= lim:  # one path: no pass
            return p
        _, c = self.fit(li, torch.tensor([p]), None, reg.one_hot(p))
        return c.index(1)

    def fit(
        self, li: int, paths: torch.Tensor, logits: torch.Tensor | None, counts: list[int]
    ) -> tuple[torch.Tensor, list[int]]:
        """Demote units of this request's rows until their cost fits the limit. paths (n,),
        logits (n, P) or None, counts (P,); returns the new (paths, counts)."""
        lim = self.limit(li, paths.shape[0])
        if lim is None:
            return paths, counts
        c = self.em.unit_q[self.phase][li]
        split = self.phase == "prefill" and self.em.splits
        premium = self.em.split_premium_q if split else (lambda _c: 0)
        if reg.cost(counts, c) + premium(counts) <= lim:
            return paths, counts
        # demote until the units fit what the passes of the mix leave; a demotion may add a
        # path (and its pass), so again with the new mix's passes, a few times at most
        new_paths, new_counts = paths, counts
        for _ in range(FIT_ROUNDS):
            new_paths, new_counts = demote(paths, logits, counts, c, lim - premium(new_counts))
            if reg.cost(new_counts, c) + premium(new_counts) <= lim:
                break
        else:  # every row on the layer's cheapest path: no pass, and the reserve covers it
            low = min(range(len(c)), key=c.__getitem__)
            new_paths = torch.full_like(paths, low)
            new_counts = reg.one_hot(low, paths.shape[0])
        self.demotions += int((new_paths != paths).sum())
        return new_paths, new_counts


def demote(
    paths: torch.Tensor,
    logits: torch.Tensor | None,
    counts: list[int],
    c: tuple[int, ...],
    lim: int,
) -> tuple[torch.Tensor, list[int]]:
    """Move the smallest-margin units one path cheaper until sum(cost) <= lim (or all cheapest).
    paths (n,), logits (n, P) or None, counts (P,), c (P,) picojoules per unit."""
    paths = paths.clone()
    counts = list(counts)
    # fp16 -> int8 -> skip as designed; in general, along the paths ordered by cost on this device
    for hi, lo in reg.demotion_steps(c):
        cost = reg.cost(counts, c)
        if cost <= lim or counts[hi] == 0 or c[lo] >= c[hi]:
            continue
        save = c[hi] - c[lo]
        need = min(counts[hi], -(-(cost - lim) // save))  # exact ceiling division on integers
        idx = (paths == hi).nonzero().squeeze(1)
        if logits is not None and need < idx.numel():
            margin = logits[idx, hi] - logits[idx, lo]
            idx = idx[margin.argsort()[:need]]
        else:
            idx = idx[:need]
        paths[idx] = lo
        counts[hi] -= need
        counts[lo] += need
    return paths, counts
