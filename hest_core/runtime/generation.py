"""The per-request steps of generation: path decisions, the budget before a step, tokens out.

`scheduler.Scheduler` (a subclass) runs them per iteration: requests join and leave between
decode steps. Every layer of every step asks the controller for a path per row, lets each request's budget
guard demote what it cannot pay for, counts the units, and runs each path as one matmul over
the rows that chose it (`LeanModel.forward`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import paths as reg
from ..adapter.native_controller import NativeController, NativeRows
from ..errors import HestError, RequestFailedError
from .decoding import RowDecoding, TextDelta, TokenLogprob, choose, cut_at_stop
from .endings import EndingPlan
from .guard import BudgetGuard
from .request import PreparedRequest  # re-exported: the type lives in request.py

_ROW: dict[int, torch.Tensor] = {}  # path index -> a (1,) tensor of it: one row on it (read-only)


def _row_on(p: int) -> torch.Tensor:
    t = _ROW.get(p)
    if t is None:
        t = _ROW[p] = torch.tensor([p], dtype=torch.long)
    return t


def h_native_ok(lean) -> bool:
    """Whether decode-time normalised inputs are CPU bf16 (what the C controller reads)."""
    return lean.device.type == "cpu" and lean.dtype == torch.bfloat16


def _one_row(st, li: int, p: int, paths: torch.Tensor, logits: torch.Tensor | None):
    """A forward of one row that chose path p at layer li (paths (1,) holding p): the guard fits
    it (`fit_one`: at one row nothing is ranked, so `logits` is not read), it is charged and
    counted. Returns (paths (1,) it runs, counts (P,))."""
    q = _fit_row(st, li, p)
    if q != p:
        paths = torch.tensor([q], dtype=torch.long, device=paths.device)
    return paths, reg.one_hot(q)


def _fit_row(st, li: int, p: int) -> int:
    """One request's one row at layer li on path p: fitted by its guard, charged, counted.
    Returns the path it runs."""
    g = st.guard
    q = g.fit_one(li, p)
    g.commit_one(li, q)
    st.layer_counts[li][q] += 1
    return q


def _rows_grouped(groups, li: int, paths: torch.Tensor, logits: torch.Tensor, share, split):
    """Any forward at layer li: each request's guard fits its rows' paths (n,) against its limit
    (demoting by the logits' margins) and commits them; then each gives back its share of what
    the forward's rows on the same path shared (`share`, a decode step) or of the minority
    paths' weight passes (`split`, a prefill round). paths (N,), logits (N, P). Returns (paths
    (N,) after the guards, counts (P,) of the forward)."""
    total = reg.zeros()
    parts, mine = [], []
    for row0, n, st in groups:
        sl = paths[row0 : row0 + n]
        c = torch.bincount(sl, minlength=len(total)).tolist()
        sl, c = st.guard.fit(li, sl, logits[row0 : row0 + n], c)
        st.guard.commit(li, c)
        parts.append(sl)
        mine.append(c)
        for q, k in enumerate(c):
            st.layer_counts[li][q] += k
            total[q] += k
    if share:  # every row is fitted: each pays its share of what its path read once
        for (_, _, st), c in zip(groups, mine, strict=True):
            st.guard.share(li, c, total)
    elif split:  # a prefill round: minority paths' weight passes shared by requests
        for (_, _, st), c in zip(groups, mine, strict=True):
            st.guard.share_split(c, total)
    return torch.cat(parts), total


def _rows_each(groups, li: int, paths: torch.Tensor, share: bool):
    """A forward of one row per request (a decode step of several) at layer li: paths (N,) the
    controller's choices. Each request's guard fits and commits its row as `_one_row` does, from
    one read of the paths instead of a slice and a count per request (at one row the guard never
    ranks by logits); then each gives back its share of what the step's rows on its path shared.
    Returns what `_rows_grouped` returns for the same rows (a test checks), in less time
    (docs/runtime.md, "The controller's work", has the figures)."""
    pl = paths.tolist()
    total, mine, changed = reg.zeros(), [], False
    for row0, _n, st in groups:
        p = pl[row0]
        q = _fit_row(st, li, p)
        if q != p:  # demoted by its guard
            pl[row0], changed = q, True
        total[q] += 1
        mine.append(q)
    if share:
        for (_, _, st), q in zip(groups, mine, strict=True):
            st.guard.share_one(li, q, total[q])
    if changed:
        paths = torch.tensor(pl, dtype=torch.long, device=paths.device)
    return paths, total


# the remaining-budget ratio a budget-adaptive controller reads is kept inside this range (a
# request far over or under plan reads as the nearest end: beta = log of it)
REMAINING_RATIO_RANGE = (0.02, 4.0)


def _beta(ctl, st: RequestState) -> float:
    """The controller's budget input for this request now: log of its remaining ratio for a
    controller that reads it (`uses_remaining`), else log of its starting ratio."""
    if not getattr(ctl, "uses_remaining", False):
        return st.beta
    lo, hi = REMAINING_RATIO_RANGE
    return math.log(min(hi, max(lo, st.guard.remaining_ratio())))


@dataclass
class RequestState:
    req: PreparedRequest
    guard: BudgetGuard
    beta: float
    layer_counts: list[list[int]]
    out_ids: list[int] = field(default_factory=list)
    finish: str | None = None
    text: str = ""  # what was streamed
    full: str = ""  # the text so far, stop-cut; past `text` while a possible stop is held back
    dec: RowDecoding = field(default_factory=RowDecoding)
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    done_s: float = 0.0
    native_ctl: object = None  # NativeController for batch-1 decode (False: not applicable)
    error: HestError | None = None  # this request failed on its own; finish is "error"
    plan: EndingPlan = field(default_factory=EndingPlan)  # clean endings (endings.py)
    # guard.charged before the current decode step (picojoules, batch-1 prices)
    step_mark: int | None = None
    step_cost: int | None = None  # what the last decode step cost at batch-1 prices (picojoules)
    allowance: int | None = None  # tokens it may still generate after its last one
    prefill_q: int = 0  # what its prefill (and first token) cost, picojoules (guard.spent then)
    whole_char: bool = True  # its text does not end inside a multi-byte character
    forced_end: bool = False  # its next token was steered to end the sentence (its last)
    own_end: bool = False  # the model ended mid-sentence: its next token closes it, then it ends
    eos_end: bool = False  # it ended on the model's own end-of-text token


log = logging.getLogger("hest.generation")
# prompt tokens per request per prefill round: prompts up to this long run in one forward (as
# before chunking); an 8k-token prompt runs in 8 rounds, each scoring 1,024 queries
PREFILL_CHUNK = 1024

TokenCallback = Callable[[int, str], None]


class BatchRunner:
    """What each request does inside a batched forward and between forwards: its path decisions
    (`_decider`), its budget before a decode step, its next token, its streamed text. The loop
    over forwards (prefill rounds, decode steps, requests joining and leaving) is
    `scheduler.Scheduler`'s. `on_token(key, delta)` streams; key is the request's key."""

    def __init__(self, engine, on_token: TokenCallback | None):
        self.e = engine
        self.on_token = on_token
        self.L = engine.lean.spec.n_layers

    # ---- path decisions ---------------------------------------------------------------------------
    def _decider(self, groups: list[tuple[int, int, RequestState]], phase: str):
        """groups: (row0, n, state) covering the flat rows of this forward call."""
        e = self.e
        if phase == "prefill":  # one prefill round: each request's guard learns what remains
            for _row0, n, st in groups:
                st.guard.begin_prefill_chunk(n)
        sub_rows, sub_t = e.path_sub.get(phase, (None, None))
        fixed = reg.find(e.policy)  # a fixed-path policy is a path's name
        n_rows = sum(g[1] for g in groups)
        # batched decode: rows on one path in one layer share its weight reads (guard.share)
        share = phase == "decode" and n_rows > 1 and e.energy.shares
        if fixed is not None:
            return self._fixed_decider(groups, fixed, n_rows, share)
        betas = [_beta(e.controller, st) for _, _, st in groups]
        in_c = self._native_decider(groups, betas, phase, sub_rows)
        if in_c is None:
            in_c = self._native_rows_decider(groups, betas, phase, sub_rows, share)
        if in_c is not None:
            return in_c
        return self._controller_decider(groups, betas, phase, sub_t, share)

    def _fixed_decider(self, groups, fixed: int, n_rows: int, share: bool):
        """Every row on the policy's one path."""
        paths = torch.full((n_rows,), fixed, dtype=torch.long, device=self.e.device)
        counts = reg.one_hot(fixed, n_rows)

        def decide_fixed(li: int, h: torch.Tensor):
            for _row0, n, st in groups:
                c = reg.one_hot(fixed, n)
                st.guard.commit(li, c)
                st.layer_counts[li][fixed] += n
                if share:
                    st.guard.share(li, c, counts)
            return paths, counts

        return decide_fixed

    def _native_decider(self, groups, betas: list[float], phase: str, sub_rows):
        """Batch-1 decode with a controller that has a native form: its logits in C (None where
        that does not apply)."""
        e = self.e
        one = groups[0][2] if len(groups) == 1 and groups[0][1] == 1 else None
        nctl = None
        if one is not None and phase == "decode" and h_native_ok(e.lean):
            if one.native_ctl is None:
                one.native_ctl = NativeController.of(e.controller, betas[0]) or False
            nctl = one.native_ctl or None
            if nctl is not None and nctl.adaptive:
                nctl.update(betas[0])
        if nctl is None:
            return None
        assert one is not None
        st = one

        def decide_native(li: int, h: torch.Tensor):
            # batch-1 decode with the default controller: logits in C, the rest in Python
            lg = nctl.logits(li, h)
            p = max(range(len(lg)), key=lg.__getitem__)  # argmax, first max
            if sub_rows is not None:
                p = sub_rows[li][p]
            # at one row the guard never needs the logits (nothing to rank)
            return _one_row(st, li, p, _row_on(p), None)

        return decide_native

    def _native_rows_decider(self, groups, betas: list[float], phase: str, sub_rows, share: bool):
        """A decode step of several requests, one row each, with a controller whose logits have
        a multi-row native form (`NativeRows`): every row's path from one C call per layer, then
        each request's guard as `_rows_each` (None where that does not apply)."""
        e = self.e
        if phase != "decode" or len(groups) < 2 or not h_native_ok(e.lean):
            return None
        if not all(g[1] == 1 for g in groups):
            return None
        rows = NativeRows.of(e.controller, betas, sub_rows)
        if rows is None:
            return None

        def decide_rows(li: int, h: torch.Tensor):
            return _rows_each(groups, li, rows.paths(li, h), share)

        return decide_rows

    def _controller_decider(self, groups, betas: list[float], phase: str, sub_t, share: bool):
        """The controller's paths for every row, each request's guard fitting its own rows."""
        e = self.e
        beta = torch.cat(
            [
                torch.full((n,), b, dtype=torch.float32, device=e.device)
                for (_, n, _), b in zip(groups, betas, strict=True)
            ]
        )  # (N,)
        ph = torch.full_like(beta, 1.0 if phase == "decode" else 0.0)  # (N,)
        split = phase == "prefill" and len(groups) > 1 and e.energy.splits
        # a controller that can work out its per-request terms once per forward (`for_rows`)
        rows_of = getattr(e.controller, "for_rows", None)
        fast = None
        if rows_of is not None:
            fast = rows_of(betas, [g[1] for g in groups], 1 if phase == "decode" else 0)

        one_each = phase == "decode" and all(g[1] == 1 for g in groups)

        def decide(li: int, h: torch.Tensor):
            with torch.no_grad():
                logits = e.controller(h, li, beta, ph) if fast is None else fast(li, h)  # (N, P)
            paths = logits.argmax(-1)  # (N,)
            if sub_t is not None:
                paths = sub_t[li][paths]
            if len(groups) == 1 and groups[0][1] == 1:  # batch-1 decode: stay in Python
                return _one_row(groups[0][2], li, int(paths), paths, logits)
            if one_each:
                return _rows_each(groups, li, paths, share)
            return _rows_grouped(groups, li, paths, logits, share, split)

        return decide

    # ---- per-request steps: an error stays with its request ------------------------------------
    def _row(self, i: int, st: RequestState, fn, *args) -> None:
        """Run one request's own step; an exception ends that request (finish "error", the error
        kept for its result) and the rest of the batch goes on. What fails the batched forward
        itself is not caught here: that fails the batch."""
        if st.finish is not None:
            return
        try:
            fn(*args)
        except Exception as err:
            log.exception("request %d of the batch failed in its own step", i)
            st.error = (
                err
                if isinstance(err, HestError)
                else RequestFailedError(
                    f"this request failed in its own step ({type(err).__name__}: {err}); the rest "
                    "of its batch was served: retry it"
                )
            )
            st.finish = "error"

    def _before_step(self, st: RequestState) -> None:
        """Cancellation and the budget for the next token, before a decode step."""
        if st.req.cancelled is not None and st.req.cancelled.is_set():
            st.finish = "cancelled"
        else:
            st.step_mark = st.guard.charged
            if not st.guard.try_start_decode(len(st.req.ids) + len(st.out_ids)):
                st.finish = "energy_budget"

    def _allowance(self, st: RequestState) -> tuple[int, bool]:
        """(tokens this request can still generate after the current one, whether the budget
        rather than max_new_tokens is what binds): the budget's share at the cost per token the
        request is paying now (its last decode step at batch-1 prices, what it pays if its batch
        mates leave; before one, the all-fp16 step scaled by its budget ratio, never below the
        cheapest step)."""
        left = st.req.max_new - len(st.out_ids)
        g = st.guard
        if g.mode == "off":
            return left, False
        if st.step_mark is not None:
            # batch-1 prices: batch mates may leave, and the plan must hold alone too
            st.step_cost = g.charged - st.step_mark
        cost = st.step_cost
        if not cost:
            em, ctx = g.em, len(st.req.ids) + len(st.out_ids)
            fp16 = em.decode_fixed_q(ctx) + em.unit_sum_q["decode"][em.ref]
            cost = max(em.min_decode_step_q(ctx), int(fp16 * min(1.0, st.req.budget_ratio)))
            if g.mode == "stop":  # one path: its step is what every token costs
                cost = em.min_decode_step_q(ctx, g.path)
        # one token of margin: the attention term makes each step a little dearer than the last
        by_budget = max(0, max(0, g.budget - g.spent) // max(1, cost) - 1)
        # the budget binds when it buys fewer tokens than max_new_tokens leaves, beyond that one
        # token of margin: a budget of exactly the all-fp16 cost (ratio 1) ends fp16 by length
        return min(left, by_budget), by_budget + 1 < left

    # ---- tokens out --------------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor, states: list[RequestState]):
        """Next tokens (greedy or sampled) and log-probability entries of the rows of `logits`."""
        reqs = [st.req for st in states]
        greedy = self._steer(logits, states)
        return choose(logits, reqs, [st.dec for st in states], self.e.token_texts, greedy)

    def _steer(self, logits: torch.Tensor, states: list[RequestState]) -> list[int] | None:
        """Clean endings: raise the sentence-ending tokens of rows whose current sentence cannot
        be cut away and whose tokens are running out; at a row's last token only they remain
        (`EndingPlan.steer`). logits (rows, vocab) fp32, edited in place. Returns every row's
        argmax where it was taken and no row was edited (so `choose` need not take it again),
        else None."""
        ends = self.e.sentence_end_ids
        top: list[int] = []  # every row's most likely token, taken once when a row needs it
        edited = False
        for j, st in enumerate(states):
            if st.allowance is None or not ends:
                continue
            bonus = st.plan.steer(st.full, st.allowance - 1, st.whole_char)
            if not bonus and self._own_end_mid_sentence(logits, j, st, top):
                bonus = math.inf  # a sentence-ending token first, then the model's own end
                st.own_end = True
            if not bonus:
                continue
            edited = True
            st.forced_end = bonus == math.inf and not st.own_end
            with torch.inference_mode():  # the logits are inference tensors
                if bonus == math.inf:
                    kept = logits[j, ends].clone()
                    logits[j] = -math.inf
                    logits[j, ends] = kept
                else:
                    logits[j, ends] += bonus
        return top if top and not edited else None

    def _own_end_mid_sentence(
        self, logits: torch.Tensor, j: int, st: RequestState, top: list[int]
    ) -> bool:
        """Whether row j's most likely next token (logits (rows, vocab)) is an end of text while
        its text stops mid-sentence and a token is left to close it
        (`EndingPlan.closes_own_end`). `top`: every row's argmax, filled on first use (one
        argmax over the step's rows instead of one per row: a row is steered only after its own
        check, so the entries read, row j's and later ones', are the rows as they came)."""
        if st.allowance < 1 or not st.plan.closes_own_end(st.full, st.whole_char):
            return False
        if not top:
            top.extend(logits.argmax(-1).tolist())
        return top[j] in self.e.eos_ids

    def _emit(self, i: int, st: RequestState, tok: int, lp: TokenLogprob | None = None) -> None:
        e = self.e
        if tok in e.eos_ids:
            st.finish = "stop"
            st.eos_end = True
            return
        st.out_ids.append(tok)
        if lp is not None:
            st.dec.logprobs.append(lp)
        # the limit holds whatever the text looks like: a token that ends inside a multi-byte
        # character still counts (it ran past the cache sized for the request otherwise)
        if len(st.out_ids) >= st.req.max_new:
            st.finish = "length"
        with e.tokenizer_lock:
            text = e.tokenizer.decode(st.out_ids, skip_special_tokens=True)
        # an unfinished multi-byte character decodes as U+FFFD: hold it back until the next
        # token completes it, and drop it if the request ends first (never stream a fragment)
        st.whole_char = not text.endswith("\ufffd")
        text = text.rstrip("\ufffd")
        # a stop string ends the request before it; a suffix that may grow into one waits
        st.full, safe, hit = cut_at_stop(text, st.req.stop)
        if hit:
            st.finish = "stop"
        # clean endings: end at a sentence boundary when the next sentence would not fit, before
        # a repeated sentence, and show only what a limit cannot cut (endings.py)
        allowance, by_budget = self._allowance(st)
        st.allowance = allowance
        if not hit:
            seen = st.plan.observe(st.full, len(st.out_ids))
            if seen == "repeat":
                st.finish = "stop"
            elif seen == "boundary" and st.finish is None and st.plan.should_end(allowance):
                # the budget decided the end only where max_new_tokens alone would not have
                left = st.req.max_new - len(st.out_ids)
                decided = by_budget and left >= st.plan.expected_sentence()
                st.finish = "energy_budget" if decided else "length"
            elif st.own_end and st.finish is None:  # the model's own end, after the sentence
                st.finish = "stop"
            elif st.forced_end:  # the steered last token ended it (max_new_tokens may have too)
                st.plan.reason = "steered"
                if st.finish is None:
                    decided = by_budget and st.req.max_new - len(st.out_ids) > 1
                    st.finish = "energy_budget" if decided else "length"
        self._send(i, st, st.plan.visible(st.full[:safe], allowance))

    def _finish_text(self, i: int, st: RequestState) -> None:
        """The request ended: stream and keep its final text (a held-back stop-string start that
        never completed is shown; a fragment a limit cut mid-sentence is not)."""
        by_limit = st.finish in ("length", "energy_budget") or st.plan.reason == "repetition"
        # the model's own end mid-sentence with no token left to close it (`_own_end_mid_sentence`
        # closes it where one is left): cut to the last boundary where that part was not streamed
        by_limit = by_limit or (st.eos_end and st.plan.shown <= st.plan.boundary)
        final = st.plan.final(st.full, by_limit, by_budget=st.finish == "energy_budget")
        if not final.startswith(st.text):  # never take back what was streamed
            final = st.full
        self._send(i, st, final)

    def _send(self, i: int, st: RequestState, shown: str) -> None:
        """Stream what `shown` adds to the text streamed so far."""
        if not shown.startswith(st.text):
            return  # the held-back bytes changed an earlier character: keep what was streamed
        delta = shown[len(st.text) :]
        st.text = shown
        if delta and self.on_token is not None:
            d = st.dec
            self.on_token(i, TextDelta.of(delta, d.logprobs[d.streamed :]))
            d.streamed = len(d.logprobs)
