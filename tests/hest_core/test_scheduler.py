"""Continuous batching (hest_core/runtime/scheduler.py) on the real tiny model: a request that joins a
running batch writes what it writes alone, rows leave and join between decode steps, a long
prompt's prefill rounds interleave with the running decodes, and a failed forward ends only the
requests in it."""

from __future__ import annotations

import threading

import pytest

from hest_core import Engine, GenerationRequest
from hest_core.energy.model import PJ
from hest_core.exec import native
from hest_core.runtime import generation
from hest_core.runtime.scheduler import Scheduler

BASE = "The city council voted on Tuesday to expand the bus network after a year of delays. "
TEXTS = [
    BASE * 3,
    "The museum reopened its west wing with a show of river photographs. " * 4,
    "Heavy rain closed two mountain roads and delayed the harvest by a week. " * 2,
    "A local bakery won the regional prize for its rye bread and cinnamon rolls. " * 5,
    "The school board approved a later start time for the high schools. " * 3,
    "Engineers finished testing the new bridge over the harbour on Friday. " * 4,
]


def _req(i: int, max_new: int = 16, **kw) -> GenerationRequest:
    kw = {"energy_budget_ratio": 1.0, "clean_end": False} | kw
    return GenerationRequest(TEXTS[i], max_new_tokens=max_new, **kw)


def _same(ticket, alone) -> None:
    """The request of `ticket` wrote what `alone` wrote and, at batch-1 prices, was charged the
    same joules; what batch mates shared with it (guard.rebated) is all that it paid less.
    `ticket` may be a bare GenerationResult: then only that it paid no more."""
    joined = getattr(ticket, "result", ticket)
    assert joined.error is None and alone.error is None
    assert (joined.text, joined.finish_reason) == (alone.text, alone.finish_reason)
    assert joined.stats.completion_tokens == alone.stats.completion_tokens
    assert joined.stats.paths == alone.stats.paths
    if joined is not ticket:
        g = ticket.st.guard
        assert g.charged / PJ == pytest.approx(alone.stats.modelled_j, rel=1e-12)
        assert joined.stats.modelled_j == pytest.approx(g.spent / PJ, rel=1e-12)
    assert joined.stats.modelled_j <= alone.stats.modelled_j * (1 + 1e-12)
    assert joined.stats.prefill_j == pytest.approx(alone.stats.prefill_j, rel=1e-12)


def _steps(sched: Scheduler, n: int) -> list[int]:
    return [sched.step() for _ in range(n)]


@pytest.mark.parametrize(
    "joiners,fused_rows",
    [(1, 16), (5, 16), (5, 4)],
    ids=["fused-rows", "fused-amx-rows", "past-fused-rows"],
)
def test_joining_mid_way_writes_what_it_writes_alone(
    tiny_engine: Engine, joiners: int, fused_rows: int, monkeypatch
):
    """Greedy: request 0 runs, the others join at different steps (5 joiners: 6 rows, on the fused
    layer's AMX products where the CPU has them; with the fused layer held to 4 rows, past it onto
    the PyTorch loop); every one writes the same tokens, paths and joules as alone."""
    monkeypatch.setattr(native, "FUSED_MAX_ROWS", fused_rows)
    reqs = [_req(0, max_new=40)] + [_req(i, max_new=12) for i in range(1, joiners + 1)]
    alone = [tiny_engine.generate([r])[0] for r in reqs]
    sched = tiny_engine.scheduler(max_rows=8)
    tickets = [sched.submit(tiny_engine.check(reqs[0]))]
    rows = _steps(sched, 3)  # prefill + first token, then decode steps
    for r in reqs[1:]:
        tickets.append(sched.submit(tiny_engine.check(r)))
        rows += _steps(sched, 2)
    while not sched.idle:
        rows.append(sched.step())
    assert max(rows) == joiners + 1, rows  # they really decoded together
    for t, a in zip(tickets, alone, strict=True):
        _same(t, a)


def test_rows_leave_and_waiting_requests_join(tiny_engine: Engine):
    """max_rows=2 and five requests: never more than two decode at once, each waiting request
    joins as a row frees, and each still writes what it writes alone."""
    reqs = [_req(i, max_new=6 + 3 * i) for i in range(5)]
    alone = [tiny_engine.generate([r])[0] for r in reqs]
    sched = tiny_engine.scheduler(max_rows=2)
    done: list[int] = []
    tickets = [
        sched.submit(tiny_engine.check(r), on_done=lambda res, k=k: done.append(k))
        for k, r in enumerate(reqs)
    ]
    rows = []
    while not sched.idle:
        assert sched.running <= 2
        rows.append(sched.step())
    assert max(rows) == 2 and sorted(done) == list(range(5))
    for t, a in zip(tickets, alone, strict=True):
        _same(t, a)


def test_long_prompt_prefill_interleaves_with_running_decodes(tiny_engine: Engine, monkeypatch):
    """A ~250-token prompt prefilled in rounds of 32 tokens joins a running request: that request
    gets a decode step between every two rounds, and both write what they write alone."""
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 32)
    short, long_ = _req(1, max_new=30), GenerationRequest(BASE * 12, max_new_tokens=8)
    alone = [tiny_engine.generate([r])[0] for r in (short, long_)]
    sched = tiny_engine.scheduler()
    sched.decode_steps_per_chunk = 0  # a chunk every round (pacing: the test below)
    tokens: list[int] = []
    first = sched.submit(tiny_engine.check(short), on_token=lambda d: tokens.append(1))
    while first.st is None or len(first.st.out_ids) < 2:  # its own prefill rounds, then decoding
        sched.step()
    p = tiny_engine.check(long_)
    assert len(p.ids) > 6 * 32  # several rounds
    second = sched.submit(p)
    rounds = 0
    while second.st is None or second.st.ttft_s == 0.0:
        before = len(first.st.out_ids)
        sched.step()
        rounds += 1
        assert len(first.st.out_ids) == before + 1, "a prefill round stalled the running decode"
    assert rounds == -(-len(p.ids) // 32)
    while not sched.idle:
        sched.step()
    _same(first, alone[0])
    _same(second, alone[1])
    assert tokens, "the running request streamed while the other prefilled"


def test_prefill_token_budget_lets_a_short_prompt_pass_a_long_one(tiny_engine: Engine, monkeypatch):
    """`prefill_tokens`: a short prompt (<= PREFILL_CHUNK) submitted after a long one is
    prefilled whole in the first round, and the long one's chunk waits while the round would pass
    the budget; passed over, it goes in the next round beside a new short prompt. A long prompt
    runs in chunks of the budget, alone or not, so both write what they write alone (and take
    the same paths). Bad budgets are refused."""
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 128)
    long_, short = GenerationRequest(BASE * 24, max_new_tokens=4), _req(2, max_new=8)
    sched = tiny_engine.scheduler(prefill_tokens=100)
    sched.decode_steps_per_chunk = 0  # a chunk every round (pacing: the test below)
    assert sched.chunk_size == 100
    seen: list[int] = []
    real = sched._forward

    def spy(ids, positions, slots, cache, decide, decode, logits_rows):
        if not decode:
            seen.append(len(ids))
        return real(ids, positions, slots, cache, decide, decode, logits_rows)

    sched._forward = spy
    pl, ps = tiny_engine.check(long_), tiny_engine.check(short)
    assert len(ps.ids) <= 100 and len(pl.ids) > 3 * 100
    alone = []
    for p in (pl, ps):
        t = sched.submit(p)
        while not sched.idle:
            sched.step()
        alone.append(t.result)
    assert seen[:3] == [100, 100, 100]  # a request alone: chunks of the budget
    seen.clear()
    a, b = sched.submit(tiny_engine.check(long_)), sched.submit(tiny_engine.check(short))
    sched.step()
    assert b.st.ttft_s > 0 and a.st.ttft_s == 0.0  # the short one passed the long one
    assert seen == [len(ps.ids)] and a.pos == 0  # the long one's chunk did not fit beside it
    c = sched.submit(tiny_engine.check(_req(1, max_new=2)))
    sched.step()  # passed over last round, the long one goes beside the new short one
    assert seen[1] == len(c.req.ids) + 100 and a.pos == 100 and c.st.ttft_s > 0
    while not sched.idle:
        sched.step()
    assert sum(seen) == len(pl.ids) + len(ps.ids) + len(c.req.ids)
    _same(a, alone[0])
    _same(b, alone[1])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="prefill_tokens"):
            tiny_engine.scheduler(prefill_tokens=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="decode_steps_per_chunk"):
            tiny_engine.scheduler(decode_steps_per_chunk=bad)


def test_long_prompt_chunks_wait_for_the_decoding_requests_steps(tiny_engine: Engine, monkeypatch):
    """`decode_steps_per_chunk` k: while a request decodes, a long prompt's chunks run k steps
    apart (k decode steps since the last chunk, the one in that chunk's step included), so the
    decoding request gets k tokens per chunk; both write what they write alone."""
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 64)
    short, long_ = _req(1, max_new=40), GenerationRequest(BASE * 12, max_new_tokens=4)
    alone = [tiny_engine.generate([r])[0] for r in (short, long_)]
    sched = tiny_engine.scheduler(prefill_tokens=64, decode_steps_per_chunk=2)
    first = sched.submit(tiny_engine.check(short))
    while first.st is None or len(first.st.out_ids) < 2:
        sched.step()
    p = tiny_engine.check(long_)
    second = sched.submit(p)
    rounds, chunk_steps = 0, []
    while second.st is None or second.st.ttft_s == 0.0:
        before = second.pos
        sched.step()
        rounds += 1
        if second.pos != before:
            chunk_steps.append(rounds)
    assert first.st.finish is None, "the decoding request outlived the long prefill"
    gaps = [b - a for a, b in zip(chunk_steps, chunk_steps[1:], strict=False)]
    assert gaps and set(gaps) == {2}  # one decode-only step between chunks
    while not sched.idle:
        sched.step()
    _same(first, alone[0])
    _same(second, alone[1])


def test_a_failed_forward_ends_only_its_requests(tiny_engine: Engine, monkeypatch):
    """The prefill forward of a joining request raises: that request ends with finish "error"
    (RequestFailedError naming the cause); the request decoding meanwhile is not touched."""
    reqs = [_req(0, max_new=20), _req(2, max_new=8)]
    alone = tiny_engine.generate([reqs[0]])[0]
    real = Scheduler._forward
    marker = tiny_engine.check(reqs[1]).ids

    def forward(self, ids, *rest):
        if not rest[4] and ids.tolist() == marker:  # the joiner's prefill (decode=False)
            raise RuntimeError("injected forward failure")
        return real(self, ids, *rest)

    monkeypatch.setattr(Scheduler, "_forward", forward)
    sched = tiny_engine.scheduler()
    ok = sched.submit(tiny_engine.check(reqs[0]))
    _steps(sched, 3)
    bad = sched.submit(tiny_engine.check(reqs[1]))
    while not sched.idle:
        sched.step()
    assert bad.result.finish_reason == "error" and "injected" in str(bad.result.error)
    _same(ok, alone)


def test_cancelled_while_waiting_or_prefilling_spends_little(tiny_engine: Engine):
    """A request cancelled before its prefill ends leaves with finish "cancelled" and no text;
    the running one is served."""
    ev = threading.Event()
    sched = tiny_engine.scheduler()
    ok = sched.submit(tiny_engine.check(_req(0, max_new=10)))
    _steps(sched, 2)
    gone = sched.submit(tiny_engine.check(_req(3, cancelled=ev)))
    ev.set()
    while not sched.idle:
        sched.step()
    assert gone.result.finish_reason == "cancelled" and gone.result.text == ""
    assert gone.result.stats.completion_tokens == 0
    assert ok.result.finish_reason in ("length", "stop")


def test_static_generate_is_one_scheduler_batch(tiny_engine: Engine):
    """Engine.generate(list) still answers in order, each as alone, and max_rows is checked."""
    reqs = [_req(i, max_new=8) for i in (4, 5, 1)]
    batch = tiny_engine.generate(reqs)
    for r, res in zip(reqs, batch, strict=True):
        _same(res, tiny_engine.generate([r])[0])
    with pytest.raises(ValueError, match="max_rows"):
        tiny_engine.scheduler(max_rows=0)


def test_static_batching_waits_for_the_running_batch(tiny_engine: Engine):
    """`static=True` (the baseline the load test compares with): a request submitted while a
    batch runs starts only once that batch has ended, and still writes what it writes alone."""
    a, b = _req(0, max_new=12), _req(1, max_new=6)
    alone = [tiny_engine.generate([r])[0] for r in (a, b)]
    sched = tiny_engine.scheduler(max_rows=4, static=True)
    first = sched.submit(tiny_engine.check(a))
    sched.step()
    second = sched.submit(tiny_engine.check(b))
    while first.result is None:
        sched.step()
        assert second.st is None, "joined a running static batch"
    while not sched.idle:
        sched.step()
    _same(first, alone[0])
    _same(second, alone[1])


@pytest.mark.slow  # the real default model, timed
def test_the_closed_loop_tool_prints_its_ceiling_from_its_own_figures():
    """`tools/closed_loop_inproc.py --ceiling` (docs/loadtest.md, session 20): a short closed
    loop of 2 clients, then the ceiling line, whose requests/s is 1 / (prompt tokens x the
    shared round's ms a token + completion tokens x the step's ms / its rows), as it prints."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "closed_loop_inproc.py"
    out = subprocess.run(
        [sys.executable, str(tool), "--clients", "2", "--requests", "6"]
        + ["--max-new-tokens", "12", "--ceiling"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    form = (
        r"ceiling at 2 clients: ([\d.]+) requests/s = 1 / \(([\d.]+) prompt tokens x ([\d.]+) ms "
        r"\(one round of 16 prompts\) \+ ([\d.]+) tokens x ([\d.]+) ms / (\d+) rows\)"
    )
    m = re.search(form, out.stdout)
    assert m, out.stdout[-2000:]
    rps, prompt, price, gen, step, rows = (float(x) for x in m.groups())
    assert rows == 2 and 0 < price < 5 and 0 < step < 1000 and 1 <= gen <= 12
    assert rps == pytest.approx(1e3 / (prompt * price + gen * step / rows), rel=0.02)
