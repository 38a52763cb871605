"""Continuous batching: scheduling per iteration (Orca's iteration-level scheduling, vLLM's
continuous batching), with chunked prefill.

Requests wait in a queue (`submit`, thread-safe). Each `step`:

1. admits waiting requests while fewer than `max_rows` are running, each into a free KV-cache row
   (`kvrows.CacheRows`), its guard charging the prompt's fixed work up front as before;
2. runs one prefill round for the requests still prefilling, in one flat forward: every prompt
   of at most `generation.PREFILL_CHUNK` tokens whole, and the next `prefill_tokens`-token chunk
   of a longer prompt while the round stays within `prefill_tokens` (Sarathi-Serve's token
   budget per iteration, for long prompts: a 4k-token prompt delays a short one, and the
   decoding requests' next tokens, by one chunk, not by its whole prefill). A request whose
   prompt is done takes its first token and joins the running batch;
3. runs one decode step for every running request (`BatchRunner._before_step` first:
   cancellation and the budget of the next token); requests that end leave, their rows freed,
   their result handed to `on_done`.

Everything a request does on its own (its paths and guard, clean endings, stop strings,
logprobs, streaming, its own errors) is `generation.BatchRunner`'s, unchanged: a request's tokens
depend on its own rows only, so it writes the same text alone or joining a running batch.
The runtime knows nothing of HTTP: the server calls `submit` and runs `serve_forever` in its
engine thread; `Engine.generate(list)` submits a static batch and steps until it is done.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from ..errors import HestError, RequestFailedError
from ..exec.kvcache import SeqSlot
from ..exec.kvrows import CacheRows
from . import generation
from .decoding import TextDelta
from .generation import BatchRunner
from .request import GenerationResult, PreparedRequest
from .results import failed_result, result_of
from .tickets import ForwardFailed, Ticket, budget_error, run_state, share_reading

log = logging.getLogger("hest.scheduler")

# prompts longer than PREFILL_CHUNK are prefilled in chunks of this many tokens, each joining a
# round that holds at most this many (the server's HEST_PREFILL_TOKENS). Why 512:
# docs/runtime.md ("The prefill token budget"), measured with the mixed long/short load test.
DEFAULT_PREFILL_TOKENS = 512
# while requests decode, long prompts' chunks run this many steps apart, so the decoding
# requests get this many tokens per chunk (docs/runtime.md, measured in docs/loadtest.md)
DECODE_STEPS_PER_CHUNK = 0
DEFAULT_MAX_ROWS = 16  # requests decoded at once by default (the server's HEST_MAX_BATCH_SIZE): as
# many as the fused decode layer takes (native.FUSED_MAX_ROWS; docs/runtime.md has the measurements)


def _written(t: Ticket) -> int:
    """KV-cache positions request t has written: its prompt so far, then the tokens before the
    one its next decode step writes (an upper bound: len(prompt) + len(generated))."""
    if t.pos < len(t.req.ids):
        return t.pos
    return len(t.req.ids) + len(t.st.out_ids)


def _check_count(name: str, value, least: int, also: str = "") -> None:
    """Raises ValueError unless `value` is an int (not a bool) >= `least`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}={value!r} must be an integer >= {least}{also}")


class Scheduler(BatchRunner):
    """Iteration-level scheduler over one engine. `max_rows`: the most requests prefilling or
    decoding at once (the rest wait). `reraise`: a failed batched forward raises out of `step`
    (Engine.generate's contract) instead of only ending the requests of that forward.
    `static`: admit waiting requests only when nothing runs (static batching: a batch runs to
    completion before the next starts), the baseline continuous batching is measured against.
    `prefill_tokens`: the chunk size of prompts longer than PREFILL_CHUNK, and the most tokens
    a round may hold for such a chunk to join it (`_chunks`; None: chunks of PREFILL_CHUNK
    tokens, every prefilling request's next chunk each round). `decode_steps_per_chunk`: while
    requests decode, long prompts' chunks run that many steps apart (0 or 1: every step)."""

    def __init__(
        self,
        engine,
        max_rows: int = DEFAULT_MAX_ROWS,
        *,
        reraise: bool = False,
        static: bool = False,
        prefill_tokens: int | None = DEFAULT_PREFILL_TOKENS,
        decode_steps_per_chunk: int = DECODE_STEPS_PER_CHUNK,
    ):
        super().__init__(engine, self._deliver)
        _check_count("max_rows", max_rows, 1)
        _check_count("decode_steps_per_chunk", decode_steps_per_chunk, 0)
        if prefill_tokens is not None:
            _check_count("prefill_tokens", prefill_tokens, 1, " or None")
        self.prefill_tokens = prefill_tokens
        self._passed: set[int] = set()  # keys of the requests the last prefill round passed over
        self.decode_steps_per_chunk = decode_steps_per_chunk
        self._since_long = 0  # decode steps since a long prompt's chunk last ran
        self.max_rows, self.reraise, self.static = max_rows, reraise, bool(static)
        self._cv = threading.Condition()
        self._pending: deque[Ticket] = deque()
        self._prefilling: list[Ticket] = []
        self._active: list[Ticket] = []  # decoding, in cache-row order
        self._done: list[Ticket] = []
        self._by_key: dict[int, Ticket] = {}
        self._rows = CacheRows(engine.lean, max_rows)
        self._window = None  # the meter window open while requests run
        self._keys = itertools.count()
        self._stop = False

    # ---- the queue (any thread) ------------------------------------------------------------------
    def submit(
        self,
        req: PreparedRequest,
        on_token: Callable[[TextDelta], None] | None = None,
        on_done: Callable[[GenerationResult], None] | None = None,
    ) -> Ticket:
        """Queue one checked request (`Engine.check`); it joins the running batch at the next
        step with a free row. `on_token(delta)` streams its text and `on_done(result)` is called
        once when it ends, both from the thread that runs `step`. Raises RuntimeError after
        `stop()`."""
        t = Ticket(next(self._keys), req, on_token, on_done, t0=time.perf_counter())
        with self._cv:
            if self._stop:
                raise RuntimeError("the scheduler was stopped; it takes no more requests")
            self._pending.append(t)
            self._cv.notify_all()
        return t

    @property
    def idle(self) -> bool:
        """Nothing queued, prefilling or decoding."""
        with self._cv:
            return not (self._pending or self._prefilling or self._active)

    @property
    def running(self) -> int:
        """Requests prefilling or decoding now (at most max_rows)."""
        return len(self._prefilling) + len(self._active)

    def stop(self) -> None:
        """End `serve_forever` after its current step; later `submit` calls raise."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()

    # ---- loops -----------------------------------------------------------------------------------
    def run_until_idle(self) -> None:
        """Step until every submitted request has ended (the caller holds the engine's lock)."""
        while not self.idle:
            self.step()

    def serve_forever(self, on_step: Callable[[int], None] | None = None) -> None:
        """Run steps until `stop()`, sleeping while there is nothing to do; each step holds the
        engine's lock, so `Engine.generate` calls from other threads wait between steps.
        `on_step(rows)` follows every decode step. An error of the scheduler itself (a bug)
        ends every request it holds with finish "error", and the loop goes on."""
        while True:
            with self._cv:
                while not self._stop and not (self._pending or self._prefilling or self._active):
                    self._cv.wait()
                if self._stop:
                    return
            try:
                with self.e._lock:
                    rows = self.step()
                if rows and on_step is not None:
                    on_step(rows)
            except Exception as err:
                log.exception("a scheduler step failed; ending the requests it held")
                self._fail_all(err)

    # ---- one iteration ---------------------------------------------------------------------------
    def step(self) -> int:
        """One iteration: admit, one prefill round, one decode step, retire the requests that
        ended. Returns the rows of the decode step (0: none ran). Not safe alongside other
        generation on the same engine: hold its lock. A failed batched forward ends the requests
        of that forward (finish "error"; the others go on) and raises again if `reraise`."""
        self._admit()
        failed: BaseException | None = None
        rows = 0
        try:
            if self._prefilling:
                self._prefill_round()
            if self._active:
                rows = self._decode_step()
                self._since_long += 1
        except ForwardFailed as err:
            failed = err.__cause__
        self._retire()
        if failed is not None and self.reraise:
            raise failed
        return rows

    def _admit(self) -> None:
        with self._cv:
            room = self.max_rows - self.running
            if self.static and self.running:
                room = 0  # static batching: the running batch ends before the next starts
            new = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        if not new:
            return
        ok = []
        for t in new:
            err = budget_error(self.e, t.req)
            if err is None:
                ok.append(t)
            else:  # a budget changed below its minimum after check() (a brownout): no work
                t.result = failed_result(self.e, t.req, err)
                self._hand_back(t)
        if not ok:
            return
        longest = max(len(t.req.ids) + t.req.max_new for t in ok)
        held = max(
            (len(t.req.ids) + t.req.max_new for t in self._prefilling + self._active), default=0
        )
        self._rows.ensure(self.running + len(ok), longest, held)
        if self._window is None:
            self._window = self.e.meter.begin()
        for t in ok:
            t.st = run_state(self.e, t.req, self.L)
            t.st.guard.start_prefill()  # the whole prompt's fixed work is charged up front
            self._rows.take(t)
            self._by_key[t.key] = t
            self._prefilling.append(t)

    def _chunks(self, live: list[Ticket]) -> list[tuple[Ticket, int]]:
        """(request, tokens) of this round's prefill. A prompt of at most PREFILL_CHUNK tokens is
        prefilled whole, in the first round after its admission, beside every other such prompt;
        a longer one in chunks of `chunk_size` tokens (the same chunks whoever else runs, so a
        request's paths and text do not depend on its batch mates), which join a round only
        while it holds at most `prefill_tokens` tokens, unless the last round passed that
        request over (then it goes whatever the round holds). While requests decode, long
        prompts' chunks run `decode_steps_per_chunk` (k) steps apart: k decode steps since the
        last chunk, the one in that chunk's step included. So a short prompt waits for at most
        one chunk of a long one, and the decoding requests get k tokens per long chunk."""
        whole, longs = [], []
        for t in live:
            (whole if len(t.req.ids) <= generation.PREFILL_CHUNK else longs).append(t)
        out = [(t, len(t.req.ids) - t.pos) for t in whole]
        if longs and self._active and self._since_long < self.decode_steps_per_chunk:
            return out  # the decoding requests' steps first (`decode_steps_per_chunk`)
        longs.sort(key=lambda t: (t.key not in self._passed, len(t.req.ids) - t.pos, t.key))
        total = sum(n for _, n in out)
        passed = set()
        for t in longs:
            n = min(self.chunk_size, len(t.req.ids) - t.pos)
            fits = self.prefill_tokens is None or total + n <= self.prefill_tokens
            if fits or not out or t.key in self._passed:
                out.append((t, n))
                total += n
            else:
                passed.add(t.key)
        self._passed = passed
        if len(out) > len(whole):  # a long prompt's chunk runs this round
            self._since_long = 0
        return out

    @property
    def chunk_size(self) -> int:
        """Prompt tokens of one prefill chunk of a prompt longer than PREFILL_CHUNK tokens:
        PREFILL_CHUNK, at most `prefill_tokens`."""
        size = generation.PREFILL_CHUNK
        return size if self.prefill_tokens is None else min(size, self.prefill_tokens)

    def _prefill_round(self) -> None:
        """This round's chunks (`_chunks`) in one flat forward; a chunk attends to the cache
        before it and causally within itself. Requests whose prompt is done take their first
        token and join the decoding batch."""
        for t in self._prefilling:
            if t.req.cancelled is not None and t.req.cancelled.is_set():
                t.st.finish = "cancelled"
        live = [t for t in self._prefilling if t.st.finish is None]
        if not live:
            return
        ids, pos, slots, groups, last, owners = [], [], [], [], [], []
        chunks = self._chunks(live)
        if not chunks:  # long prompts only, waiting for the decoding requests' steps
            return
        for t, n in chunks:
            chunk = t.req.ids[t.pos : t.pos + n]
            row0 = len(ids)
            ids.extend(chunk)
            pos.extend(range(t.pos, t.pos + n))
            slots.append(SeqSlot(row0=row0, n=n, cache_row=self._rows.row_of(t), pos0=t.pos))
            groups.append((row0, n, t.st))
            t.pos += n
            if t.pos == len(t.req.ids):  # this prompt's last chunk: its logits are needed
                last.append(row0 + n - 1)
                owners.append(t)
        live = [t for t, _ in chunks]
        decide = self._decider(groups, "prefill")
        logits = self._run_forward(live, ids, pos, slots, self._rows.cache, decide, False, last)
        if len(chunks) > 1 and self.e.energy.round_shares:  # the round's tokens shared its work
            total = len(ids)
            for t, n in chunks:
                t.st.guard.share_round(n, total)
        if not owners:
            return
        for t in owners:
            t.st.prefill_q = t.st.guard.spent
        nxt, lps = self._choose(logits, [t.st for t in owners])
        now = time.perf_counter()
        for j, t in enumerate(owners):
            t.st.ttft_s = t.st.prefill_s = now - t.t0
            t.cur = nxt[j]
            self._row(t.key, t.st, self._emit, t.key, t.st, nxt[j], lps[j])
            self._prefilling.remove(t)
            self._active.append(t)  # one that ended on its first token leaves at _settle

    def _decode_step(self) -> int:
        """One token for every decoding request, in one forward over cache rows 0..n-1."""
        for t in self._active:
            self._row(t.key, t.st, self._before_step, t.st)
        self._settle()
        active = self._active
        if not active:
            return 0
        # rows 0..n-1 with the fewest moves, each copying the positions its request has written
        self._active = active = self._rows.arrange(active, _written)
        n = len(active)
        slots = [
            SeqSlot(row0=j, n=1, cache_row=j, pos0=len(t.req.ids) + len(t.st.out_ids) - 1)
            for j, t in enumerate(active)
        ]
        decide = self._decider([(j, 1, t.st) for j, t in enumerate(active)], "decode")
        cache = self._rows.decode_view(n)
        ids, pos = [t.cur for t in active], [s.pos0 for s in slots]
        logits = self._run_forward(active, ids, pos, slots, cache, decide, True, None)
        if n > 1:  # the head's weight read was shared by the n rows (the units': `_decider`)
            for t in active:
                t.st.guard.share_head(n)
        nxt, lps = self._choose(logits, [t.st for t in active])
        for j, t in enumerate(active):
            t.cur = nxt[j]
            self._row(t.key, t.st, self._emit, t.key, t.st, nxt[j], lps[j])
        return n

    # ---- forwards --------------------------------------------------------------------------------
    def _forward(self, ids, positions, slots, cache, decide, decode, logits_rows):
        """`LeanModel.forward` (one place to observe or fault every batched forward)."""
        return self.e.lean.forward(ids, positions, slots, cache, decide, decode, logits_rows)

    def _run_forward(self, tickets, ids, pos, slots, cache, decide, decode, last):
        dev = self.e.device
        rows = None if last is None else torch.tensor(last, dtype=torch.long, device=dev)
        try:
            with torch.inference_mode():
                ids_t, pos_t = torch.tensor(ids, device=dev), torch.tensor(pos, device=dev)
                return self._forward(ids_t, pos_t, slots, cache, decide, decode, rows)
        except Exception as err:
            log.exception("a batched forward of %d requests failed", len(tickets))
            self._fail(tickets, err)
            raise ForwardFailed from err

    def _fail(self, tickets: list[Ticket], err: BaseException, force: bool = False) -> None:
        """End these requests with finish "error" (those that ended already too if `force`)."""
        for t in tickets:
            if t.st is None or t.st.finish == "error" or (t.st.finish and not force):
                continue
            t.st.error = (
                err
                if isinstance(err, HestError)
                else RequestFailedError(
                    f"the batched forward of this request failed ({type(err).__name__}: {err}); "
                    "requests outside that forward were served: retry it"
                )
            )
            t.st.finish = "error"

    # ---- requests that end -----------------------------------------------------------------------
    def _settle(self) -> None:
        """Move requests that ended out of the prefilling and decoding lists; free their rows."""
        now = time.perf_counter()
        for lst in (self._prefilling, self._active):
            for t in [t for t in lst if t.st.finish is not None]:
                lst.remove(t)
                t.st.done_s = t.st.done_s or now - t.t0
                self._rows.release(t)
                self._done.append(t)

    def _retire(self) -> None:
        """Requests that ended: final text, their share of the meter, on_done."""
        self._settle()
        if not self._done:
            return
        done, self._done = self._done, []
        self._close_window(done)
        for t in done:
            if t.st.finish != "error":
                try:
                    self._finish_text(t.key, t.st)
                except Exception as err:  # its own step: the rest go on
                    self._fail([t], err, force=True)
            t.result = result_of(self.e, t.st, t.measured_j, t.estimated_j)
            self._by_key.pop(t.key, None)
            self._hand_back(t)

    def _close_window(self, leaving: list[Ticket]) -> None:
        """Close the meter window and share its joules among every request that spent in it, by
        its modelled spend there; open the next one if requests still run."""
        if self._window is None:
            return
        reading = self.e.meter.end(self._window)
        live = self._prefilling + self._active
        share_reading(live + leaving, reading, self.e._nominal_watts())
        self._window = self.e.meter.begin() if live else None

    def _hand_back(self, t: Ticket) -> None:
        if t.on_done is None:
            return
        try:
            t.on_done(t.result)
        except Exception:  # the caller's callback must not stop the batch
            log.exception("on_done of request %d raised", t.key)

    def _deliver(self, key: int, delta: TextDelta) -> None:
        t = self._by_key.get(key)
        if t is not None and t.on_token is not None:
            t.on_token(delta)

    def _fail_all(self, err: BaseException) -> None:
        """End every request held (the scheduler's own state is not trusted after a bug)."""
        with self._cv:
            pending, self._pending = list(self._pending), deque()
        held = self._prefilling + self._active + self._done
        self._fail(held, err)
        self._prefilling, self._active, self._done = [], [], []
        self._rows = CacheRows(self.e.lean, self.max_rows)
        self._window = None
        for t in held:
            t.result = result_of(self.e, t.st, t.measured_j, t.estimated_j)
            self._hand_back(t)
        for t in pending:
            wrapped = RequestFailedError(f"the scheduler failed ({type(err).__name__}: {err})")
            t.result = failed_result(self.e, t.req, wrapped)
            self._hand_back(t)
        self._by_key.clear()
