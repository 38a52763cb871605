"""The controller's work (`calib_ctrl`, `PhaseCosts.ctrl` / `ctrl_step`): charged as fixed work
only where a controller chooses the paths, never in the budget ratio's all-fp16 reference; the
table's checks; a real measurement on the tiny model, and a table file written with it."""

from __future__ import annotations

import json
import math

import pytest

from hest_core import Engine, GenerationRequest
from hest_core.energy.meters import EstimateMeter
from hest_core.energy.model import PJ, CalibrationTable, EnergyModel, PhaseCosts
from hest_core.errors import CalibrationError
from hest_core.runtime import calib_ctrl
from tests.conftest import REFERENCE

PRE, DEC, STEP = 0.0006, 0.011, 0.009  # J per prompt token, per row per step, per step


def _table(pre=0.0, dec=0.0, step=0.0) -> CalibrationTable:
    t = json.loads(REFERENCE.read_text())
    t["prefill"]["ctrl"] = pre
    t["decode"]["ctrl"], t["decode"]["ctrl_step"] = dec, step
    t["prefill"] = PhaseCosts(**t["prefill"])
    t["decode"] = PhaseCosts(**t["decode"])
    return CalibrationTable(**t)


def test_ctrl_is_charged_as_fixed_work_only_where_a_controller_chooses():
    t = _table(PRE, DEC, STEP)
    base, plain, em = EnergyModel(_table()), EnergyModel(t), EnergyModel(t, controlled=True)
    assert em.controlled and not plain.controlled
    # a fixed-path policy's model on the same table charges none of it
    assert plain.prefill_fixed(300) == base.prefill_fixed(300)
    assert plain.decode_fixed(40) == base.decode_fixed(40)
    assert em.prefill_fixed(300) == pytest.approx(base.prefill_fixed(300) + 300 * PRE)
    assert em.decode_fixed(40) == pytest.approx(base.decode_fixed(40) + DEC + STEP)
    assert em.decode_fixed_q(40) >= base.decode_fixed_q(40) + math.ceil((DEC + STEP) * PJ) - 2
    paths = [[0] * em.L, [1] * em.L]
    step = em.decode_step_j([50, 60], paths)
    assert step == pytest.approx(base.decode_step_j([50, 60], paths) + 2 * DEC + STEP)
    # whole requests pay it; the ratio's reference (the fixed fp16 policy's cost) does not
    got = em.request_cost(100, 9, 0)
    assert got == pytest.approx(base.request_cost(100, 9, 0) + 100 * PRE + 8 * (DEC + STEP))
    assert em.fp16_cost(100, 9) == pytest.approx(base.fp16_cost(100, 9))
    assert em.reference_cost_q(100, 9) == base.request_cost_q(100, 9, 0)
    assert em.reference_cost_q(100, 9) < em.request_cost_q(100, 9, 0)
    # m rows of a step share ctrl_step like the head's shared part
    gap = em.head_rebate_q(4) - base.head_rebate_q(4)
    assert gap == pytest.approx(math.floor(STEP * PJ) * 3 / 4, rel=1e-6, abs=2)
    # a table without controller costs: controlled changes nothing
    assert not EnergyModel(_table(), controlled=True).controlled


def test_table_checks_ctrl():
    t = _table(PRE, DEC, STEP)
    t.prefill.check(30, "prefill")
    t.decode.check(30, "decode")
    bad = _table(PRE)
    bad.prefill.ctrl_step = 0.001
    with pytest.raises(CalibrationError, match="prefill has ctrl_step"):
        bad.prefill.check(30, "prefill")
    with pytest.raises(CalibrationError, match="negative"):
        _table(dec=-1e-3).decode.check(30, "decode")
    with pytest.raises(CalibrationError, match="negative"):
        _table(pre=float("nan")).prefill.check(30, "prefill")


def test_an_engine_charges_it_for_its_controller_policy_only(shared_tables, tmp_path):
    src = next(p for p in shared_tables.iterdir() if not p.name.endswith("-int4.json"))
    t = json.loads(src.read_text())
    t["prefill"]["ctrl"], t["decode"]["ctrl"], t["decode"]["ctrl_step"] = PRE, DEC, STEP
    path = tmp_path / src.name
    path.write_text(json.dumps(t))
    kw = dict(calibration=path, progress=False)
    hest = Engine.from_pretrained("tiny:llama", **kw)
    fixed = Engine.from_pretrained("tiny:llama", adapter=None, policy="fp16", **kw)
    assert hest.energy.controlled and not fixed.energy.controlled

    def req():
        return GenerationRequest(
            "The council met on Tuesday. " * 6, max_new_tokens=4, energy_budget_ratio=2.0
        )

    a, b = hest.check(req()), fixed.check(req())
    assert a.fp16_q == b.fp16_q  # the same reference, with or without a controller
    s = hest.generate([req()])[0].stats
    # the same request on the table without them: the same paths, less the controller's work
    bare = Engine.from_pretrained("tiny:llama", calibration=src, progress=False)
    s0 = bare.generate([req()])[0].stats
    assert (s.paths, s.completion_tokens) == (s0.paths, s0.completion_tokens)
    n, steps = s.prompt_tokens, s.completion_tokens - 1
    extra = n * PRE + steps * (DEC + STEP)
    assert s.modelled_j - s0.modelled_j == pytest.approx(extra, rel=1e-6)
    f = fixed.generate([req()])[0].stats
    f0 = (
        Engine.from_pretrained(
            "tiny:llama", adapter=None, policy="fp16", calibration=src, progress=False
        )
        .generate([req()])[0]
        .stats
    )
    assert f.modelled_j == pytest.approx(f0.modelled_j, rel=1e-9)  # a fixed policy: none of it


def test_measured_on_the_tiny_model(shared_tables, tmp_path):
    """What `tools/host_fit.py --what controller` runs: a controller engine against fixed-path
    engines on the table file, measured and written into it; the table then loads and a
    controller engine on it charges what was written."""
    src = next(p for p in shared_tables.iterdir() if not p.name.endswith("-int4.json"))
    path = tmp_path / src.name
    path.write_text(src.read_text())
    said = []
    rec = calib_ctrl.measure_into(path, "tiny:llama", EstimateMeter(25.0), say=said.append)
    assert rec["prefill_ctrl"] >= 0 and rec["ctrl"] >= 0 and rec["ctrl_step"] >= 0
    assert len(rec["points"]["prefill"]) == len(calib_ctrl.PROMPTS) * calib_ctrl.REPEATS
    for p in rec["points"]["prefill"]:
        assert p["tokens"] > 0 and p["measured_j"] > 0 and p["fixed_measured_j"] > 0
        assert math.isfinite(p["x_j"])
    assert set(rec["points"]["decode"]) == {"1", "4", "16"}
    t = CalibrationTable.load(path)
    assert (t.prefill.ctrl, t.decode.ctrl, t.decode.ctrl_step) == (
        rec["prefill_ctrl"],
        rec["ctrl"],
        rec["ctrl_step"],
    )
    assert t.kernels["controller"]["points"] == rec["points"]
    assert said and "controller" in said[0]
    before = path.read_text()
    calib_ctrl.measure_into(path, "tiny:llama", EstimateMeter(25.0), write=False)
    assert path.read_text() == before
    fixed = Engine.from_pretrained("tiny:llama", adapter=None, policy="fp16", progress=False)
    with pytest.raises(ValueError, match="controller engine"):
        calib_ctrl.measure_ctrl(fixed, {}, EstimateMeter(25.0))
