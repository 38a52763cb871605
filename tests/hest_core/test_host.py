"""The serving loop's work per decode step (`calib_host`, `PhaseCosts.host` / `host_step`): the
fit of h(m) = a + b m, the energy model charging it as fixed decode work (per row, and per step
shared by the rows like the head's shared part), the table's checks, and a real measurement on
the tiny model through its scheduler."""

from __future__ import annotations

import json
import math

import pytest

from hest_core import Engine, GenerationRequest
from hest_core.energy.meters import EstimateMeter
from hest_core.energy.model import PJ, CalibrationTable, EnergyModel, PhaseCosts
from hest_core.errors import CalibrationError
from hest_core.runtime import calib_host
from tests.conftest import REFERENCE

HOST, HOST_STEP = 0.004, 0.01  # J per row per step, J per step


def _table(host=0.0, host_step=0.0, phase="decode") -> CalibrationTable:
    t = json.loads(REFERENCE.read_text())
    t[phase]["host"], t[phase]["host_step"] = host, host_step
    t["prefill"] = PhaseCosts(**t["prefill"])
    t["decode"] = PhaseCosts(**t["decode"])
    return CalibrationTable(**t)


def test_fit_goes_through_the_one_row_points_and_keeps_both_parts_non_negative():
    # an exact line: a + b = h(1), b from the others
    a, b = calib_host.fit_host([1, 4, 16, 1, 4, 16], [0.03, 0.06, 0.18, 0.03, 0.06, 0.18])
    assert a == pytest.approx(0.02) and b == pytest.approx(0.01)
    # bent like the measurements (h(4) ~ h(1), h(16) large): one row keeps its own figure
    a, b = calib_host.fit_host([1, 1, 4, 16], [0.019, 0.021, 0.022, 0.117])
    assert a + b == pytest.approx(0.02) and b == pytest.approx((3 * 0.002 + 15 * 0.097) / (9 + 225))
    # more rows cheaper than one (noise): nothing per row, all per step
    assert calib_host.fit_host([1, 16], [0.02, 0.01]) == (pytest.approx(0.02), 0.0)
    # steeper than h(1) per row: nothing per step
    assert calib_host.fit_host([1, 16], [0.001, 0.32]) == (0.0, pytest.approx(0.001))
    assert calib_host.fit_host([4, 4], [0.08, 0.08]) == (0.0, pytest.approx(0.02))  # no m = 1
    assert calib_host.fit_host([1, 4], [-0.01, -0.02]) == (0.0, 0.0)  # noise below 0


def test_host_is_charged_as_fixed_decode_work():
    base, em = EnergyModel(_table()), EnergyModel(_table(HOST, HOST_STEP))
    for ctx in (10, 500):
        assert em.decode_fixed(ctx) == pytest.approx(base.decode_fixed(ctx) + HOST + HOST_STEP)
        assert (
            em.decode_fixed_q(ctx)
            >= base.decode_fixed_q(ctx) + math.ceil((HOST + HOST_STEP) * PJ) - 2
        )
    assert em.prefill_fixed(300) == base.prefill_fixed(300)  # prefill pays none of it
    paths = [[0] * em.L, [1] * em.L, [0] * em.L]
    step = em.decode_step_j([50, 60, 70], paths)
    assert step == pytest.approx(base.decode_step_j([50, 60, 70], paths) + 3 * HOST + HOST_STEP)
    # whole requests: (max_new - 1) decode steps of one row each
    assert em.fp16_cost(100, 9) == pytest.approx(base.fp16_cost(100, 9) + 8 * (HOST + HOST_STEP))
    # m rows of a step share host_step like the head's shared part: each gives back its share
    gap = em.head_rebate_q(4) - base.head_rebate_q(4)
    assert gap == pytest.approx(math.floor(HOST_STEP * PJ) * 3 / 4, rel=1e-6, abs=2)
    assert em.head_rebate_q(1) == 0


def test_table_checks_host():
    _table(HOST, HOST_STEP).decode.check(30, "decode")
    with pytest.raises(CalibrationError, match="prefill has host costs"):
        _table(HOST, 0.0, phase="prefill").prefill.check(30, "prefill")
    with pytest.raises(CalibrationError, match="negative"):
        _table(-1e-3).decode.check(30, "decode")


def test_measured_on_the_tiny_model_through_its_scheduler(shared_tables):
    eng = Engine.from_pretrained(
        "tiny:llama", adapter=None, policy="fp16", calibration=shared_tables, progress=False
    )
    rec = calib_host.measure_host(eng, EstimateMeter(25.0), rows=(1, 4), repeats=1)
    assert rec["host"] >= 0 and rec["host_step"] >= 0
    assert set(rec["points"]) == {"1", "4"}
    for pts in rec["points"].values():
        assert all(p["loop_j"] > 0 and p["forward_j"] > 0 and p["ctx"] > 0 for p in pts)
    assert eng.generate([GenerationRequest("A short note. " * 5, max_new_tokens=3)])[0].text
    hest = Engine.from_pretrained("tiny:llama", calibration=shared_tables, progress=False)
    with pytest.raises(ValueError, match="fixed-path engine"):
        calib_host.measure_host(hest, EstimateMeter(25.0))


def test_measured_into_a_table_file(shared_tables, tmp_path):
    """What `tools/host_fit.py` runs: an engine on the table file, the loop measured and
    written into it; a table with the loop's work loads and charges it."""
    src = next(p for p in shared_tables.iterdir() if not p.name.endswith("-int4.json"))
    path = tmp_path / src.name
    path.write_text(src.read_text())
    said = []
    rec = calib_host.measure_into(path, "tiny:llama", EstimateMeter(25.0), say=said.append)
    t = CalibrationTable.load(path)
    assert (t.decode.host, t.decode.host_step) == (rec["host"], rec["host_step"])
    assert t.kernels["decode_host"]["points"] == rec["points"]
    assert said and "serving loop" in said[0]
    em = EnergyModel(t)
    base = EnergyModel(CalibrationTable.load(src))
    assert em.decode_fixed(40) == pytest.approx(
        base.decode_fixed(40) + t.decode.host + t.decode.host_step
    )
    before = path.read_text()
    calib_host.measure_into(path, "tiny:llama", EstimateMeter(25.0), write=False)
    assert path.read_text() == before
