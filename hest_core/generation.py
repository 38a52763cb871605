"""One batch of requests: prefill all prompts together, then decode step by step.

Every layer of every step asks the controller for a path per row, lets each request's budget
guard demote what it cannot pay for, counts the units, and runs each path as one matmul over
the rows that chose it (`LeanModel.forward`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .fused import NativeController
from .guard import BudgetGuard
from .model import SeqSlot

_PATH = [torch.tensor([p], dtype=torch.long) for p in range(3)]  # one row on path p (read-only)


def h_native_ok(lean) -> bool:
    """Whether decode-time normalised inputs are CPU bf16 (what the C controller reads)."""
    return lean.device.type == "cpu" and lean.dtype == torch.bfloat16


def _one_row(st, li: int, p: int, paths: torch.Tensor, logits: torch.Tensor | None):
    """A forward of one row that chose path p at layer li: the guard fits it, it is counted."""
    c = [0, 0, 0]
    c[p] = 1
    paths, c = st.guard.fit(li, paths, logits, c)
    st.guard.commit(li, c)
    lc = st.layer_counts[li]
    for q in range(3):
        lc[q] += c[q]
    return paths, c


@dataclass
class PreparedRequest:
    ids: list[int]
    max_new: int
    budget_j: float
    budget_ratio: float
    fp16_cost_j: float
    min_j: float
    truncated: bool
    cancelled: threading.Event | None = None
    budget_q: int | None = None  # the exact budget in picojoules, when it came from check()

    def ledger_budget(self) -> int:
        """The guard's budget: the exact one from check() unless budget_j was changed since."""
        if self.budget_q is not None and self.budget_q / 10**12 == self.budget_j:
            return self.budget_q
        return math.floor(self.budget_j * 10**12)


@dataclass
class RequestState:
    req: PreparedRequest
    guard: BudgetGuard
    beta: float
    layer_counts: list[list[int]]
    out_ids: list[int] = field(default_factory=list)
    finish: str | None = None
    text: str = ""
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    done_s: float = 0.0
    native_ctl: object = None  # NativeController for batch-1 decode (False: not applicable)


TokenCallback = Callable[[int, str], None]


class BatchRunner:
    """Runs one batch to completion. `policy` is 'hest', 'fp16' or 'int8'."""

    def __init__(self, engine, states: list[RequestState], on_token: TokenCallback | None):
        self.e = engine
        self.states = states
        self.on_token = on_token
        self.L = engine.lean.spec.n_layers

    # ---- path decisions ---------------------------------------------------------------------------
    def _decider(self, groups: list[tuple[int, int, RequestState]], phase: str):
        """groups: (row0, n, state) covering the flat rows of this forward call."""
        e = self.e
        sub_rows, sub_t = e.path_sub.get(phase, (None, None))
        fixed = {"fp16": 0, "int8": 1, "skip": 2}.get(e.policy)
        n_rows = sum(g[1] for g in groups)
        if fixed is not None:
            paths = torch.full((n_rows,), fixed, dtype=torch.long, device=e.device)
            counts = [n_rows if p == fixed else 0 for p in range(3)]

            def decide_fixed(li: int, h: torch.Tensor):
                for _row0, n, st in groups:
                    c = [n if p == fixed else 0 for p in range(3)]
                    st.guard.commit(li, c)
                    st.layer_counts[li][fixed] += n
                return paths, counts

            return decide_fixed

        one = groups[0][2] if len(groups) == 1 and groups[0][1] == 1 else None
        nctl = None
        if one is not None and h_native_ok(e.lean):
            if one.native_ctl is None:
                one.native_ctl = NativeController.of(e.controller, one.beta) or False
            nctl = one.native_ctl or None

        if nctl is not None:
            assert one is not None
            st = one

            def decide_native(li: int, h: torch.Tensor):
                # batch-1 decode with the default controller: logits in C, the rest in Python
                l0, l1, l2 = nctl.logits(li, h)
                p = 0 if l0 >= l1 and l0 >= l2 else (1 if l1 >= l2 else 2)  # argmax, first max
                if sub_rows is not None:
                    p = sub_rows[li][p]
                # at one row the guard never needs the logits (nothing to rank)
                return _one_row(st, li, p, _PATH[p], None)

            return decide_native

        beta = torch.cat(
            [torch.full((n,), st.beta, dtype=torch.float32, device=e.device) for _, n, st in groups]
        )  # (N,)

        def decide(li: int, h: torch.Tensor):
            with torch.no_grad():
                logits = e.controller(h, li, beta)  # (N, 3)
            paths = logits.argmax(-1)  # (N,)
            if sub_t is not None:
                paths = sub_t[li][paths]
            if len(groups) == 1 and groups[0][1] == 1:  # batch-1 decode: stay in Python
                return _one_row(groups[0][2], li, int(paths), paths, logits)
            total = [0, 0, 0]
            parts = []
            for row0, n, st in groups:
                sl = paths[row0 : row0 + n]
                c = torch.bincount(sl, minlength=3).tolist()
                sl, c = st.guard.fit(li, sl, logits[row0 : row0 + n], c)
                st.guard.commit(li, c)
                parts.append(sl)
                for q in range(3):
                    st.layer_counts[li][q] += c[q]
                    total[q] += c[q]
            return torch.cat(parts), total

        return decide

    # ---- tokens out --------------------------------------------------------------------------------
    def _emit(self, i: int, st: RequestState, tok: int) -> None:
        e = self.e
        if tok in e.eos_ids:
            st.finish = "stop"
            return
        st.out_ids.append(tok)
        with e.tokenizer_lock:
            text = e.tokenizer.decode(st.out_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an unfinished multi-byte character: wait for the next token
        delta = text[len(st.text) :] if text.startswith(st.text) else text
        st.text = text
        if delta and self.on_token is not None:
            self.on_token(i, delta)
        if len(st.out_ids) >= st.req.max_new:
            st.finish = "length"

    # ---- the batch ---------------------------------------------------------------------------------
    def run(self, t_start: float) -> None:
        e, states = self.e, self.states
        lean = e.lean
        max_len = max(len(s.req.ids) + s.req.max_new for s in states)
        cache = lean.new_cache(len(states), max_len)
        # prefill: every prompt in one flat batch
        ids, pos, slots, groups, last = [], [], [], [], []
        row = 0
        for i, st in enumerate(states):
            n = len(st.req.ids)
            ids.extend(st.req.ids)
            pos.extend(range(n))
            slots.append(SeqSlot(row0=row, n=n, cache_row=i, pos0=0))
            groups.append((row, n, st))
            st.guard.start_prefill()
            row += n
            last.append(row - 1)
        dev = e.device
        with torch.inference_mode():
            logits = lean.forward(
                torch.tensor(ids, device=dev),
                torch.tensor(pos, device=dev),
                slots,
                cache,
                self._decider(groups, "prefill"),
                decode=False,
                logits_rows=torch.tensor(last, device=dev),
            )
        nxt = logits.argmax(-1).tolist()
        now = time.perf_counter()
        for i, st in enumerate(states):
            st.ttft_s = st.prefill_s = now - t_start
            self._emit(i, st, nxt[i])
        active = list(range(len(states)))
        cur = {i: nxt[i] for i in active}
        rows = list(range(len(states)))  # cache row of each active request
        while True:
            keep = []
            for i in active:
                st = states[i]
                if st.finish is None and st.req.cancelled is not None and st.req.cancelled.is_set():
                    st.finish = "cancelled"
                if st.finish is None and not st.guard.try_start_decode(
                    len(st.req.ids) + len(st.out_ids)
                ):
                    st.finish = "energy_budget"
                if st.finish is None:
                    keep.append(i)
                elif not st.done_s:
                    st.done_s = time.perf_counter() - t_start
            if not keep:
                break
            if keep != active:
                cache.keep_rows(torch.tensor([rows[active.index(i)] for i in keep], device=dev))
                rows = list(range(len(keep)))
                active = keep
            slots = [
                SeqSlot(
                    row0=j,
                    n=1,
                    cache_row=j,
                    pos0=len(states[i].req.ids) + len(states[i].out_ids) - 1,
                )
                for j, i in enumerate(active)
            ]
            groups = [(j, 1, states[i]) for j, i in enumerate(active)]
            with torch.inference_mode():
                logits = lean.forward(
                    torch.tensor([cur[i] for i in active], device=dev),
                    torch.tensor([s.pos0 for s in slots], device=dev),
                    slots,
                    cache,
                    self._decider(groups, "decode"),
                    decode=True,
                )
            nxt = logits.argmax(-1).tolist()
            for j, i in enumerate(active):
                cur[i] = nxt[j]
                self._emit(i, states[i], nxt[j])
