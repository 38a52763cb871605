"""Energy per request under batching (issue 15, item 2): the rows of a decode step share its
weight reads (`EnergyModel.unit_rebate_q`, `BudgetGuard.share`), the calibration fits the shared
part from steps of several rows (`calib_rows.py`), and the budget invariant holds whoever joins
or leaves the batch. The tiny-model tests run under `shared_tables` (conftest: fixed shares of
SHARED_UNIT per decode unit and HEAD_SHARED of the head), so each rebate is predicted exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hest_core import Engine, GenerationRequest
from hest_core import paths as reg
from hest_core.energy import calib_rows
from hest_core.energy.calibrate import PACKAGED
from hest_core.energy.model import PJ, CalibrationTable, EnergyModel, PhaseCosts
from hest_core.errors import CalibrationError
from tests.conftest import HEAD_SHARED, REFERENCE, SHARED_UNIT

TEXTS = [
    "The city council voted on Tuesday to expand the bus network after a year of delays. " * 3,
    "The museum reopened its west wing with a show of river photographs. " * 4,
    "Heavy rain closed two mountain roads and delayed the harvest by a week. " * 2,
    "A local bakery won the regional prize for its rye bread and cinnamon rolls. " * 5,
    "The school board approved a later start time for the high schools. " * 3,
]


def _phase(unit, shared=None, head_shared=0.0, n_layers=2) -> PhaseCosts:
    return PhaseCosts(
        [list(unit) for _ in range(n_layers)],
        1e-4,
        1e-6,
        1e-3,
        None if shared is None else [list(shared) for _ in range(n_layers)],
        head_shared,
    )


def _table(shared=None, head_shared=0.0) -> CalibrationTable:
    return CalibrationTable(
        "tiny:llama",
        "f" * 16,
        2,
        "cpu-test",
        "estimate",
        "estimate",
        "2026-11-30",
        "bf16",
        2,
        _phase([6e-4, 4e-4, 1e-4]),
        _phase([7e-4, 4e-4, 6e-5], shared, head_shared),
    )


# ---- the table and the model ---------------------------------------------------------------------
def test_a_batch1_table_loads_and_shares_nothing(tmp_path):
    """Tables written before batched attribution (no shared terms) are today's model: every
    rebate is 0. The packaged tables load."""
    d = json.loads(REFERENCE.read_text())
    for ph in ("prefill", "decode"):
        d[ph].pop("shared", None)
        d[ph].pop("head_shared", None)
    (tmp_path / "old.json").write_text(json.dumps(d))
    em = EnergyModel(CalibrationTable.load(tmp_path / "old.json"))
    assert not em.shares
    assert em.unit_rebate_q(0, em.ref, 16) == 0 and em.head_rebate_q(16) == 0
    for p in PACKAGED.glob("*.json"):
        if p.stem.endswith("-int4"):  # a four-column table loads under the four-path registry
            with reg.registered("int4", **reg.OPTIONAL["int4"]):
                EnergyModel(CalibrationTable.load(p))
        else:
            EnergyModel(CalibrationTable.load(p))


def test_shared_terms_round_trip_and_bad_ones_are_refused(tmp_path):
    t = _table([5e-4, 3e-4, 1e-5], 8e-4)
    t.save(tmp_path / "t.json")
    back = CalibrationTable.load(tmp_path / "t.json")
    assert back.decode.shared == t.decode.shared and back.decode.head_shared == 8e-4
    for edit, match in [
        (lambda d: d["decode"].update(shared=[[8e-4, 3e-4, 1e-5]] * 2), "outside 0..its unit"),
        (lambda d: d["decode"].update(shared=[[1e-4, 1e-4]] * 2), "rows of 3 costs like unit"),
        (lambda d: d["decode"].update(head_shared=2e-3), "above its head"),
        (lambda d: d["prefill"].update(head_shared=1e-4), "only decode steps share"),
    ]:
        d = t.to_json()
        edit(d)
        (tmp_path / "bad.json").write_text(json.dumps(d))
        with pytest.raises(CalibrationError, match=match):
            CalibrationTable.load(tmp_path / "bad.json")


@settings(max_examples=200, deadline=None)
@given(frac=st.floats(0.0, 1.0), unit=st.floats(1e-6, 1e-1), m=st.integers(1, 64))
def test_a_rows_share_never_exceeds_its_batch1_cost(frac, unit, m):
    """At every m the m rows together pay at least the step's modelled cost s + m (u - s) (in
    picojoules, rounded up) and each at most its batch-1 cost u; nothing at m = 1."""
    t = _table([min(7e-4, unit) * frac, 4e-4 * frac, 6e-5 * frac], 1e-3 * frac)
    t.decode.unit = [[min(7e-4, unit), 4e-4, 6e-5]] * 2
    em = EnergyModel(t)
    for p in range(3):
        u, s = em.unit_q["decode"][0][p], em.shared_q[0][p]
        r = em.unit_rebate_q(0, p, m)
        assert 0 <= r <= s <= u
        assert m * (u - r) >= s + m * (u - s)  # the rows pay at least the step
        assert m * (u - r) - (s + m * (u - s)) < m  # and no more than rounding (< 1 pJ a row)
        assert em.unit_rebate_q(0, p, 1) == 0
        assert em.unit_rebate_q(0, p, m + 1) >= r  # a mate joining never raises a share
    assert 0 <= em.head_rebate_q(m) <= em.head_shared_q


def test_decode_step_j_is_the_formula():
    t = _table([5e-4, 3e-4, 1e-5], 8e-4)
    em = EnergyModel(t)
    # 3 rows; layer 0: two on fp16, one on skip; layer 1: all int8
    paths = [[0, 1], [0, 1], [2, 1]]
    want = 3 * 1e-4 + 1e-6 * (10 + 11 + 12) + 8e-4 + 3 * (1e-3 - 8e-4)
    want += 5e-4 + 2 * (7e-4 - 5e-4) + 1e-5 + (6e-5 - 1e-5) + 3e-4 + 3 * (4e-4 - 3e-4)
    assert em.decode_step_j([10, 11, 12], paths) == pytest.approx(want, rel=1e-12)
    assert EnergyModel(_table()).decode_step_j([10], [[0, 0]]) == pytest.approx(
        1e-4 + 1e-5 + 1e-3 + 2 * 7e-4, rel=1e-12
    )


# ---- measured steps of 1..M rows (rows_unit) ---------------------------------------------------------
def _curved(rows_unit) -> EnergyModel:
    t = _table([5e-4, 3e-4, 1e-5], 8e-4)
    t.decode.rows_unit = rows_unit
    return EnergyModel(t)


# fp16 flat from 5 rows on (a tile kernel), int8 a line, skip every row its own
CURVE = [
    [1.0, 1.5, 2.0, 2.5, 2.5, 2.6, 2.8, 3.0],
    [1.0, 1.8, 2.6, 3.4, 4.2, 5.0, 5.8, 6.6],
    [float(m) for m in range(1, 9)],
]


def test_a_measured_curve_prices_each_row_by_its_steps_rows():
    """With rows_unit a row on path p in an m-row step pays unit x g(m) / m (rounded up): the
    rebate is the rest of its unit; past the measured m, the last m's share; the step's modelled
    joules are unit x g(m) per layer and path."""
    em = _curved(CURVE)
    assert em.shares
    for li in range(2):
        for p in range(3):
            u = em.unit_q["decode"][li][p]
            for m in range(1, 12):
                k = min(m, 8)
                share = math.ceil(u * (CURVE[p][k - 1] / k))
                assert em.unit_rebate_q(li, p, m) == u - share
    assert em.unit_rebate_q(0, 2, 7) == 0  # skip: nothing shared
    assert em.unit_rebate_q(0, 0, 1) == 0
    # fp16's rows at 8 pay 3/8 of the unit each, at 16 the same share (not extrapolated)
    u = em.unit_q["decode"][0][0]
    assert em.unit_rebate_q(0, 0, 16) == u - math.ceil(u * (3.0 / 8))
    paths = [[0, 1]] * 5 + [[2, 1]]  # layer 0: five on fp16, one on skip; layer 1: six on int8
    ctx = [10] * 6
    c = em.ph["decode"]
    want = 6 * c.token_fixed + c.attn_ctx * 60 + 8e-4 + 6 * (1e-3 - 8e-4)
    want += 7e-4 * 2.5 + 6e-5 * 1.0 + 4e-4 * 5.0
    assert em.decode_step_j(ctx, paths) == pytest.approx(want, rel=1e-12)
    assert em.decode_step_j([10] * 16, [[0, 0]] * 16) == pytest.approx(
        16 * c.token_fixed + c.attn_ctx * 160 + 8e-4 + 16 * 2e-4 + 2 * 7e-4 * 3.0 * 2, rel=1e-12
    )


@settings(max_examples=100, deadline=None)
@given(
    shares=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=16),
    m=st.integers(1, 40),
)
def test_a_curves_rows_pay_their_step_and_never_more_than_alone(shares, m):
    """For any measured curve (made a valid one by `calib_rows.curve`), the m rows together pay
    at least the step's modelled cost (picojoules, rounded up), each at most its unit, and a
    mate joining never raises a row's share."""
    ms = list(range(1, len(shares) + 1))
    g = calib_rows.curve(ms, [a * k for a, k in zip(shares, ms, strict=True)])
    em = _curved([g, g, [float(k) for k in ms]])
    for p in range(3):
        u = em.unit_q["decode"][0][p]
        r = em.unit_rebate_q(0, p, m)
        k = min(m, len(g) if p < 2 else len(ms))
        step = u * em.ph["decode"].rows_unit[p][k - 1] * m / k
        assert 0 <= r <= u
        assert m * (u - r) >= step - 1e-6 * u
        assert em.unit_rebate_q(0, p, m + 1) >= r


def test_rows_unit_round_trips_and_bad_curves_are_refused(tmp_path):
    t = _table([5e-4, 3e-4, 1e-5], 8e-4)
    t.decode.rows_unit = CURVE
    t.save(tmp_path / "t.json")
    assert CalibrationTable.load(tmp_path / "t.json").decode.rows_unit == CURVE
    for edit, match in [
        (lambda d: d["decode"].update(rows_unit=CURVE[:2]), "must be 3 rows"),
        (
            lambda d: d["decode"].update(rows_unit=[r[:4] for r in CURVE[:2]] + [CURVE[2]]),
            "one length",
        ),
        (lambda d: d["decode"].update(rows_unit=[[1.2, 2.0]] * 3), "must start at 1"),
        (lambda d: d["decode"].update(rows_unit=[[1.0, 2.5]] * 3), r"in \(0, 1\]"),
        (lambda d: d["decode"].update(rows_unit=[[1.0, 1.2, 2.4]] * 3), "never rise"),
        (lambda d: d["prefill"].update(rows_unit=CURVE), "for decode steps"),
    ]:
        d = t.to_json()
        edit(d)
        (tmp_path / "bad.json").write_text(json.dumps(d))
        with pytest.raises(CalibrationError, match=match):
            CalibrationTable.load(tmp_path / "bad.json")


def test_the_curve_from_measured_steps():
    """`calib_rows.curve`: g(m) / g(1), linear between measured m, each row's share clamped to
    (0, 1] and made non-increasing (a rise pooled with its neighbours); None without a positive
    one-row figure; ValueError without one."""
    assert calib_rows.curve([1, 2, 4], [2.0, 3.0, 4.0]) == pytest.approx([1.0, 1.5, 1.75, 2.0])
    # 1 row 1.0; 2 rows 2.4 (share 1.2: clamped to 1); 3 rows 1.2 (0.4); 4 rows 2.0 (0.5: a rise)
    got = calib_rows.curve([1, 2, 3, 4], [1.0, 2.4, 1.2, 2.0])
    share = [g / m for m, g in enumerate(got, 1)]
    assert share == pytest.approx([1.0, 1.0, 0.45, 0.45])
    assert calib_rows.curve([1, 2], [0.0, 1.0]) is None
    with pytest.raises(ValueError, match="one-row step"):
        calib_rows.curve([2, 4], [1.0, 2.0])
    med = calib_rows.median_rows([[[1.0, 2.0, 2.0]], [[1.0, 1.0, 3.0]], [[1.0, 1.6, 2.1]]])
    assert len(med) == 1 and med[0] == pytest.approx([1.0, 1.6, 2.1])
    assert calib_rows.median_rows([[[1.0, 2.0]], None]) is None


# ---- the calibration's fit -----------------------------------------------------------------------
def test_through_one_recovers_the_shared_part():
    s, u = 3.0, 5.0
    ms = [2, 4, 8, 16]
    assert calib_rows.through_one(ms, [s + m * (u - s) for m in ms], u) == pytest.approx(s)
    assert calib_rows.through_one([1, 1], [5.0, 5.0], 5.0) == 0.0


def test_measure_rows_fits_each_paths_share_from_whole_steps(monkeypatch, tiny_engine):
    """Whole steps of m rows that follow the model exactly give its shares back; a share the
    data puts above the unit (or below 0) is clamped into 0..unit."""
    lean = tiny_engine.lean
    L, ctx = lean.spec.n_layers, 64
    d = _phase([7e-4, 4e-4, 6e-5], n_layers=L)
    true = [5e-4, 2e-4, 0.0]
    head_s = 8e-4

    def step(lean_, meter, m, ctx_, p, cache=None):
        per_row = d.token_fixed + d.attn_ctx * ctx_
        head = head_s + m * (d.head - head_s)
        # skip's data says more than its whole unit is shared: clamped to the unit
        s = true[p] if p < 2 else d.unit[0][2] * 3
        return m * per_row + head + L * (s + m * (d.unit[0][p] - s))

    monkeypatch.setattr(calib_rows, "step_j", step)
    monkeypatch.setattr(calib_rows, "noisy_cache", lambda *a: None)
    monkeypatch.setattr(
        calib_rows, "head_j", lambda lean_, meter, m: head_s + m * (d.head - head_s)
    )
    out, rec = calib_rows.measure_rows(lean, None, d, ctx)
    assert out.shared[0][:2] == pytest.approx(true[:2], rel=1e-9)
    assert out.shared[0][2] == d.unit[0][2]  # clamped
    assert out.head_shared == pytest.approx(head_s, rel=1e-9)
    assert rec["rows"] == list(calib_rows.ROWS) and rec["fit_error"]["fp16"] < 1e-9
    # the measured curve: a step of m rows in one row's units, from the same steps
    for p in range(2):
        u, s = d.unit[0][p], true[p]
        want = [(s + m * (u - s)) / u for m in range(1, 17)]  # linear between measured m: exact
        assert out.rows_unit[p] == pytest.approx(want, rel=1e-9)
    # skip's data falls below nothing past one row: each share clamped, never rising
    share = [g / m for m, g in enumerate(out.rows_unit[2], 1)]
    assert share[0] == 1.0 and all(0 < b <= a for a, b in zip(share, share[1:], strict=False))
    same, none = calib_rows.measure_rows(lean, None, d, ctx, rows=(1,))
    assert same is d and none == {}


# ---- attribution inside the scheduler --------------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_shared(shared_tables) -> Engine:
    return Engine.from_pretrained(
        "tiny:llama", adapter=None, policy="fp16", calibration=shared_tables, progress=False
    )


def _watch_decode_rows(sched) -> list[list[int]]:
    """The ticket keys of every decode step's rows, in order (a wrapper on `_run_forward`)."""
    seen: list[list[int]] = []
    real = sched._run_forward

    def run(tickets, ids, pos, slots, cache, decide, decode, last):
        if decode:
            seen.append([t.key for t in tickets])
        return real(tickets, ids, pos, slots, cache, decide, decode, last)

    sched._run_forward = run
    return seen


def _req(i: int, max_new: int) -> GenerationRequest:
    return GenerationRequest(
        TEXTS[i], energy_budget_ratio=1.0, max_new_tokens=max_new, clean_end=False
    )


def test_attributed_joules_fall_by_the_share_of_the_shared_reads(fp16_shared: Engine):
    """Request 0 decodes alone, then mates join at different steps and one leaves early: its
    attributed joules fall below its batch-1 joules by exactly its share of the shared reads,
    sum over its decode steps of n rows of (1 - 1/n) x (L x shared unit + shared head) (to the
    picojoule rounding), and it writes what it writes alone."""
    e = fp16_shared
    em, L = e.energy, e.lean.spec.n_layers
    reqs = [_req(0, 24), _req(1, 4), _req(2, 12), _req(3, 12)]
    alone = [e.generate([r])[0] for r in reqs]
    sched = e.scheduler(max_rows=8)
    seen = _watch_decode_rows(sched)
    tickets = [sched.submit(e.check(reqs[0]))]
    for _ in range(4):
        sched.step()
    for r in reqs[1:]:
        tickets.append(sched.submit(e.check(r)))
        sched.step()
    while not sched.idle:
        sched.step()
    assert max(len(s) for s in seen) == 4 and min(len(s) for s in seen) == 1
    u, hd = em.unit["decode"][0][em.ref], em.ph["decode"].head
    for t, a in zip(tickets, alone, strict=True):
        res, g = t.result, t.st.guard
        assert (res.text, res.stats.completion_tokens) == (a.text, a.stats.completion_tokens)
        steps = [len(s) for s in seen if t.key in s]
        exact = sum(
            sum(em.unit_rebate_q(li, em.ref, n) for li in range(L)) + em.head_rebate_q(n)
            for n in steps
        )
        assert g.rebated == exact
        predicted_j = sum((1 - 1 / n) * (L * SHARED_UNIT * u + HEAD_SHARED * hd) for n in steps)
        assert g.rebated / PJ == pytest.approx(predicted_j, abs=(L + 1) * len(steps) / PJ)
        assert g.charged / PJ == pytest.approx(a.stats.modelled_j, rel=1e-12)  # batch-1 price
        assert res.stats.modelled_j == pytest.approx(a.stats.modelled_j - exact / PJ, rel=1e-12)
        assert res.stats.prefill_j == pytest.approx(a.stats.prefill_j, rel=1e-12)
        assert res.stats.prefill_j + res.stats.decode_j == pytest.approx(res.stats.modelled_j)
        if max(steps) > 1:
            assert res.stats.modelled_j < a.stats.modelled_j


@pytest.fixture(scope="module")
def fp16_curved(shared_tables, tmp_path_factory) -> Engine:
    """The tiny llama on its fixed table with measured-looking steps of 1..8 rows (rows_unit)."""
    from hest_core.exec.loading import fingerprint, load_hf_model

    fp = fingerprint(load_hf_model("tiny:llama"))
    d = json.loads((shared_tables / f"{fp}.json").read_text())
    d["decode"]["rows_unit"] = CURVE
    path = tmp_path_factory.mktemp("curved") / f"{fp}.json"
    path.write_text(json.dumps(d))
    return Engine.from_pretrained(
        "tiny:llama", adapter=None, policy="fp16", calibration=path, progress=False
    )


@pytest.mark.parametrize("which", ["line", "curve"])
def test_each_step_charges_less_as_mates_join_and_more_as_they_leave(which, request):
    """Request 0's attributed cost of each decode step follows its batch: at n rows it is the
    batch-1 step at that context less the rebates of n rows, so it falls while three mates run
    and rises back once they have left; with shares fitted as a line and with measured steps
    (rows_unit)."""
    e = request.getfixturevalue("fp16_shared" if which == "line" else "fp16_curved")
    assert (e.energy.rows_q is not None) == (which == "curve")
    em, L = e.energy, e.lean.spec.n_layers
    sched = e.scheduler(max_rows=8)
    seen = _watch_decode_rows(sched)
    first = sched.submit(e.check(_req(0, 30)))
    per_step: list[tuple[int, int]] = []  # (rows, picojoules charged to request 0)

    def step():
        st_ = first.st
        decoding = st_ is not None and st_.out_ids and st_.finish is None
        if decoding:
            before, ctx, k = st_.guard.spent, len(st_.req.ids) + len(st_.out_ids), len(seen)
        sched.step()
        if decoding and len(seen) > k and first.key in seen[-1]:
            n = len(seen[-1])
            batch1 = em.decode_fixed_q(ctx) + L * em.unit_q["decode"][0][em.ref]
            rebate = L * em.unit_rebate_q(0, em.ref, n) + em.head_rebate_q(n)
            assert st_.guard.spent - before == batch1 - rebate
            per_step.append((n, st_.guard.spent - before))

    for _ in range(3):
        step()
    mates = [sched.submit(e.check(_req(i, 6))) for i in (1, 2, 3)]
    while any(m.result is None for m in mates):
        step()
    for _ in range(3):
        step()
    while not sched.idle:
        sched.step()
    rows = [n for n, _ in per_step]
    assert rows[0] == 1 and 4 in rows and rows[-1] == 1, rows
    ones = [q for n, q in per_step if n == 1]
    fours = [q for n, q in per_step if n == 4]
    assert max(fours) < min(ones)  # sharing lowered the step; alone again, it rose back
    assert per_step[-1][1] > max(fours)


# ---- the budget invariant with mates joining and leaving -----------------------------------------
@pytest.fixture(scope="module")
def hest_shared(shared_tables) -> Engine:
    e = Engine.from_pretrained(
        "tiny:qwen3", adapter=None, calibration=shared_tables, progress=False
    )
    e.max_article_tokens = 64
    return e


join_st = st.tuples(
    st.integers(0, len(TEXTS) - 1),
    st.floats(0.0, 1.4),  # budget between the minimum and 1.4 x fp16
    st.integers(1, 12),  # max_new_tokens
    st.integers(0, 6),  # steps before it is submitted (after the previous one)
)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batch=st.lists(join_st, min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["paced", "hard"]),
    max_rows=st.integers(1, 6),
)
def test_budget_holds_as_mates_join_and_leave(hest_shared: Engine, batch, seed, mode, max_rows):
    """Random controllers, budgets, join times and batch sizes: every request's attributed
    joules stay within its budget and at most its batch-1 charge, and the phases add up. (Its
    batch-1 charge may pass the budget: what sharing gave back pays for later tokens.)"""
    e = hest_shared
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in e.controller.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)
    e.guard_mode = mode
    sched = e.scheduler(max_rows=max_rows)
    tickets = []
    for i, pos, max_new, wait in batch:
        probe = e.check(
            GenerationRequest(TEXTS[i], energy_budget_ratio=1.0, max_new_tokens=max_new)
        )
        budget = probe.min_j + pos * (probe.fp16_cost_j - probe.min_j)
        req = GenerationRequest(
            TEXTS[i], energy_budget_j=max(budget, probe.min_j), max_new_tokens=max_new
        )
        for _ in range(wait):
            sched.step()
        tickets.append(sched.submit(e.check(req)))
    while not sched.idle:
        sched.step()
    for t in tickets:
        s = t.result.stats
        assert t.result.finish_reason in ("stop", "length", "energy_budget"), t.result.error
        assert s.modelled_j <= s.budget_j
        assert t.st.guard.rebated >= 0 and t.st.guard.spent <= t.st.guard.charged
        assert s.prefill_j + s.decode_j == pytest.approx(s.modelled_j)
        assert math.isfinite(s.estimated_j) and s.estimated_j >= 0


# ---- the real model: modelled energy of whole batched runs against the estimate meter -------------
def _whole_run(e: Engine, rows: int, max_new: int) -> tuple[float, float]:
    """(modelled J, estimate-meter J) of one static batch of `rows` requests, all fp16."""
    reqs = [
        GenerationRequest(
            TEXTS[i % len(TEXTS)] + f" Report {i}.",
            energy_budget_ratio=1.0,
            max_new_tokens=max_new,
            clean_end=False,
        )
        for i in range(rows)
    ]
    res = e.generate(reqs)
    assert all(r.error is None for r in res)
    return sum(r.stats.modelled_j for r in res), sum(r.stats.estimated_j for r in res)


def _ratios(e: Engine, rows_list, max_new: int, tries: int) -> dict[int, float]:
    """Per batch size, modelled / estimated joules of whole runs. The estimate meter is wall
    time x watts: a busy machine only adds time, so of `tries` runs the least disturbed (the
    largest ratio) is kept."""
    out = {}
    for rows in rows_list:
        out[rows] = max(m / est for m, est in (_whole_run(e, rows, max_new) for _ in range(tries)))
    return out


def _check_against_meter(e: Engine, rows_list, max_new: int, tries: int) -> None:
    """The modelled/estimate ratio at every batch size is within 15% of its 1-row value (the
    table's absolute level is the calibration's business; the batch dependence is this issue's).
    Without shared terms, 16 rows would be modelled several times their wall-time estimate."""
    if not e.energy.shares:
        pytest.skip(
            "the table has no batched-decode shares: run `python tools/package_shares.py` (or "
            "`make calibrate`) on a quiet machine (docs/runtime.md, 'Batched decode')"
        )
    e.generate([GenerationRequest(TEXTS[0], energy_budget_ratio=1.0, max_new_tokens=4)])  # warm
    r = _ratios(e, [1, *rows_list], max_new, tries)
    rel = {k: v / r[1] for k, v in r.items()}
    assert all(abs(v - 1) <= 0.15 for v in rel.values()), (r, rel)


@pytest.mark.slow  # it times the machine (the estimate meter is wall time): not for a shared CI box
def test_batched_runs_are_modelled_within_15pct_of_the_estimate_meter(default_engine: Engine):
    """Whole runs of 1, 4, 8 and 16 concurrent requests on the real default model: modelled
    joules against the estimate meter's, each batch size against the 1-row ratio. Run it on a
    quiet machine: `pytest -m slow -k estimate_meter`."""
    _check_against_meter(default_engine, [4, 8, 16], max_new=24, tries=2)


@pytest.mark.slow
def test_batched_runs_against_the_estimate_meter_longer(default_engine: Engine):
    """The same, longer runs and more tries (a quieter figure for a report)."""
    _check_against_meter(default_engine, [2, 4, 8, 12, 16], max_new=64, tries=3)


@pytest.mark.slow  # it times the machine
def test_served_engine_batched_runs_within_15pct_of_the_estimate_meter():
    """The engine `make serve` runs (the default adapter on its four-path table, with its
    batched-decode shares and prefill round fit): whole static batches of 1, 4, 8 and 16 CNN/DM-
    like articles, every batch size run in turn in each repeat (a drift of the host's speed hits
    them alike), modelled / estimate of each batch size within 15% of one request's (medians of
    5). Needs the shipped model and adapter; on a quiet machine: `pytest -m slow -k served`."""
    import statistics
    from pathlib import Path

    data = Path(__file__).resolve().parents[3] / "shared" / "data" / "cnndm" / "train.jsonl"
    if data.exists():
        arts = [json.loads(line)["article"] for line in data.read_text().splitlines()[200:216]]
    else:  # no shared data beside the checkout: the built-in texts, longer
        arts = [(t + " ") * 8 for t in TEXTS]
    from hest_core.energy.calibrate import PACKAGED

    e = Engine.from_pretrained(progress=False, calibration=PACKAGED)  # not the tests' fixed ones
    if not (e.energy.shares and e.energy.round_shares):
        pytest.skip("the served table has no batched-decode shares or prefill round fit here")

    def ratio(rows: int) -> float:
        reqs = [
            GenerationRequest(
                arts[i % len(arts)], energy_budget_ratio=1.0, max_new_tokens=48, clean_end=False
            )
            for i in range(rows)
        ]
        res = e.generate(reqs)
        return sum(r.stats.modelled_j for r in res) / sum(r.stats.estimated_j for r in res)

    ratio(1)  # warm
    got: dict[int, list[float]] = {m: [] for m in (1, 4, 8, 16)}
    for _ in range(5):
        for m in got:
            got[m].append(ratio(m))
    med = {m: statistics.median(v) for m, v in got.items()}
    rel = {m: v / med[1] for m, v in med.items()}
    print("modelled / estimate relative to one request:", {m: round(v, 3) for m, v in rel.items()})
    assert all(abs(v - 1) <= 0.15 for v in rel.values()), (med, rel)


# ---- a decode step's guards: the one-row-per-request form against the general one ----------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_decode_steps_rows_fit_the_same_in_either_form(hest_shared: Engine, seed):
    """`generation._rows_each` (a decode step: one row per request, read once) leaves every
    guard, count and path as `_rows_grouped` (the general form) does, demotions included:
    budgets from generous to nearly spent, every layer, share on and off."""
    import copy

    from hest_core.runtime.generation import _rows_each, _rows_grouped
    from hest_core.runtime.tickets import run_state

    e = hest_shared
    g = torch.Generator().manual_seed(seed)
    P = len(e.energy.paths)
    states = []
    for i in range(9):
        p = e.check(GenerationRequest(TEXTS[i % len(TEXTS)], max_new_tokens=8))
        s = run_state(e, p, e.lean.spec.n_layers)
        assert s.guard.try_start_decode(len(p.ids) + 1)
        # from plenty left to less than one unit on the dearest path (demotions)
        s.guard.spent = s.guard.budget - int(s.guard.budget * (0.5 ** (2 * i)))
        states.append(s)
    demoted = 0
    for share in (True, False):
        a = copy.deepcopy(states)
        b = copy.deepcopy(states)
        ga = [(j, 1, s) for j, s in enumerate(a)]
        gb = [(j, 1, s) for j, s in enumerate(b)]
        for li in range(e.lean.spec.n_layers):
            paths = torch.randint(0, P, (len(states),), generator=g)
            logits = torch.randn(len(states), P, generator=g)
            pa, ta = _rows_each(ga, li, paths.clone(), share)
            pb, tb = _rows_grouped(gb, li, paths.clone(), logits, share, False)
            assert pa.tolist() == pb.tolist() and ta == tb
            demoted += int((pa != paths).sum())
        for x, y in zip(a, b, strict=True):
            assert (x.guard.spent, x.guard.rebated, x.guard.demotions) == (
                y.guard.spent,
                y.guard.rebated,
                y.guard.demotions,
            )
            assert (x.guard.rem_fp16, x.guard.rem_min) == (y.guard.rem_fp16, y.guard.rem_min)
            assert x.layer_counts == y.layer_counts
    assert demoted > 0  # the tight budgets did demote


@pytest.mark.slow  # the real default model, timed
def test_the_batched_energy_tool_reports_both_views():
    """`tools/batched_energy.py` (the figures docs/runtime.md cites): `steps` prints each path's
    whole steps measured and modelled, 1.00 / 1.00 at one row; `split` each batch size's ratios
    relative to one request's, 1.000 at one row."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "batched_energy.py"
    run = [sys.executable, str(tool)]
    out = subprocess.run(
        [*run, "steps", "--rows", "1,2"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [x for x in out.stdout.splitlines() if "rows:" in x]
    paths = lines[0].count(" / ")  # the engine's paths (the shipped adapter registers int4)
    assert len(lines) == 2 and paths >= 3 and lines[0].count("1.00 / 1.00") == paths
    out = subprocess.run(
        [*run, "split", "--rows", "1,2", "--repeats", "1", "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [x for x in out.stdout.splitlines() if x.startswith("rows")]
    assert len(lines) == 2 and lines[0].count("(1.000)") == 2 and "(relative 1.000)" in lines[0]
    bad = subprocess.run([*run, "split", "--rows", "2,4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "must start at 1" in bad.stderr
