"""Energy model arithmetic, calibration tables and meters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hest_core.config import RuntimeConfig
from hest_core.energy.meters import EstimateMeter, NvmlMeter, RaplMeter, pick_meter
from hest_core.energy.model import CalibrationTable, EnergyModel, PhaseCosts
from hest_core.errors import CalibrationError, MeterUnavailableError


def table(L=4) -> CalibrationTable:
    return CalibrationTable(
        model="m",
        model_fingerprint="f",
        n_layers=L,
        device="cpu-test",
        method="estimate: test",
        meter="estimate",
        date="2026-01-01T00:00:00Z",
        dtype="bf16",
        threads=2,
        prefill=PhaseCosts([[3.0, 2.0, 1.0]] * L, token_fixed=0.5, attn_ctx=0.01, head=7.0),
        decode=PhaseCosts([[30.0, 20.0, 10.0]] * L, token_fixed=5.0, attn_ctx=0.1, head=70.0),
    )


@pytest.mark.parametrize("p, max_new", [(1, 1), (10, 1), (10, 2), (37, 15), (500, 128)])
def test_closed_forms_equal_explicit_sums(p, max_new):
    em = EnergyModel(table())
    t = em.table
    pre = (
        sum(t.prefill.token_fixed + t.prefill.attn_ctx * (i + 1) + 4 * 3.0 for i in range(p))
        + t.prefill.head
    )
    dec = sum(
        t.decode.token_fixed + t.decode.attn_ctx * (p + i) + t.decode.head + 4 * 30.0
        for i in range(1, max_new)
    )
    assert em.fp16_cost(p, max_new) == pytest.approx(pre + dec, rel=1e-12)
    pre_min = pre - p * 4 * 2.0
    first_dec = (
        (t.decode.token_fixed + t.decode.attn_ctx * (p + 1) + t.decode.head + 4 * 10.0)
        if max_new >= 2
        else 0
    )
    assert em.min_feasible(p, max_new) == pytest.approx(pre_min + first_dec, rel=1e-12)
    assert em.min_feasible(p, max_new) < em.fp16_cost(p, max_new)


def test_table_round_trip(tmp_path):
    t = table()
    t.save(tmp_path / "t.json")
    back = CalibrationTable.load(tmp_path / "t.json")
    assert back.to_json() == t.to_json() and back.source == str(tmp_path / "t.json")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(version=99), "version"),
        (lambda d: d["prefill"].update(unit=[[1.0, 1.0]] * 4), "3 costs"),
        (lambda d: d["decode"].update(head=-1.0), "negative"),
        (lambda d: d.pop("decode"), "cannot read"),
    ],
)
def test_bad_tables_are_refused(tmp_path, edit, match):
    d = table().to_json()
    edit(d)
    (tmp_path / "t.json").write_text(json.dumps(d))
    with pytest.raises(CalibrationError, match=match):
        CalibrationTable.load(tmp_path / "t.json")


def test_estimate_meter_is_time_times_watts():
    m = EstimateMeter(watts=40.0)
    w = m.begin()
    sum(range(200_000))
    r = m.end(w)
    assert r.meter == "estimate" and not r.measured
    assert r.energy_j == pytest.approx(r.elapsed_s * 40.0)


def test_rapl_meter_reads_powercap_counters_with_wrap(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("1000000\n")
    (zone / "max_energy_range_uj").write_text("2000000\n")
    sub = tmp_path / "intel-rapl:0:0"  # a sub-zone: counted inside its package, not again
    sub.mkdir()
    (sub / "energy_uj").write_text("5\n")
    m = RaplMeter(str(tmp_path))
    w = m.begin()
    (zone / "energy_uj").write_text("1500000\n")
    assert m.end(w).energy_j == pytest.approx(0.5)
    w = m.begin()
    (zone / "energy_uj").write_text("100000\n")  # wrapped past 2 J
    assert m.end(w).energy_j == pytest.approx(0.6)


def _readable(make) -> bool:
    try:
        make()
        return True
    except Exception:
        return False


def test_auto_falls_back_to_estimate_but_an_explicit_choice_does_not(monkeypatch):
    """Issue 11, item 5: HEST_METER=nvml without NVML, or a misspelt name, was silently replaced
    by the estimate meter."""
    monkeypatch.delenv("HEST_METER", raising=False)
    assert pick_meter("cpu", "estimate").name == "estimate"
    assert pick_meter("cpu").name in ("rapl", "estimate")  # auto never raises
    assert pick_meter("cuda", "auto").name in ("nvml", "estimate")
    if not _readable(NvmlMeter):
        with pytest.raises(MeterUnavailableError, match="nvidia-ml-py.*HEST_METER=auto"):
            pick_meter("cuda", "nvml")
        monkeypatch.setenv("HEST_METER", "nvml")  # read once, by RuntimeConfig.from_env()
        with pytest.raises(MeterUnavailableError, match="'nvml' was asked for"):
            pick_meter("cpu", RuntimeConfig.from_env().meter)
        monkeypatch.delenv("HEST_METER")
    if not _readable(RaplMeter):
        with pytest.raises(MeterUnavailableError, match="chmod a\\+r"):
            pick_meter("cpu", "rapl")
    with pytest.raises(MeterUnavailableError, match="'nvlm' is not one of auto, nvml, rapl"):
        pick_meter("cpu", "nvlm")


def test_calibrate_command_writes_a_loadable_table(tmp_path):
    out = tmp_path / "cal.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hest_core.energy.calibrate",
            "--model",
            "tiny:llama",
            "--out",
            str(out),
            "--watts",
            "25",
            "--repeats",
            "2",
            "--max-repeats",
            "2",
            "--force",  # a busy machine may not settle: the table is written all the same
            "--window-scale",
            "0.2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    t = CalibrationTable.load(out)
    assert t.n_layers == 3 and "25 W" in t.method and t.meter == "estimate"
    # the mixed-path prefill step wrote each path's weight pass (calib_split)
    assert len(t.prefill.split) == 3 and all(v >= 0 for v in t.prefill.split)
    assert t.kernels["prefill_split"]["split"] == t.prefill.split
    assert t.decode.host == t.decode.host_step == 0  # the loop's work: tools/host_fit.py
    em = EnergyModel(t)
    assert 0 < em.min_feasible(50, 8) < em.fp16_cost(50, 8)
    assert "wrote" in r.stdout
    assert "settled after 2 repeats" in r.stdout or "did NOT settle after 2 repeats" in r.stdout


def test_cli_summarize_json(tmp_path):
    art = tmp_path / "a.txt"
    art.write_text("The council voted to expand the bus network after record ridership. " * 5)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hest_core",
            "summarize",
            str(art),
            "--model",
            "tiny:llama",
            "--adapter",
            "none",
            "--energy-budget-ratio",
            "0.8",
            "--max-new-tokens",
            "6",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["stats"]["modelled_j"] <= d["stats"]["budget_j"] and d["stats"]["meter"] == "estimate"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "hest_core",
            "summarize",
            str(art),
            "--model",
            "tiny:llama",
            "--adapter",
            "none",
            "--energy-budget-ratio",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "energy_budget_ratio" in bad.stderr


def test_dominated_paths_are_substituted_by_better_ones():
    t = table(L=3)
    assert EnergyModel(t).substitutions() == {}  # costs in quality order: nothing changes
    assert EnergyModel(t).sub["decode"] == [(0, 1, 2)] * 3
    # a GPU at batch 1: int8 dearer than fp16 everywhere, skip dearer than fp16 on layer 1
    t.decode.unit = [[30.0, 90.0, 10.0], [30.0, 90.0, 40.0], [30.0, 30.0, 10.0]]
    em = EnergyModel(t)
    assert em.sub["decode"] == [(0, 0, 2), (0, 0, 0), (0, 0, 2)]  # a tie goes to the better path
    assert em.sub["prefill"] == [(0, 1, 2)] * 3
    assert em.substitutions() == {"decode": {"int8": "fp16", "skip": "fp16"}}


def test_decode_calibration_times_the_fused_layer_where_it_runs(monkeypatch):
    """With the fused native layer, decode's norms/rope/attention cannot be timed apart: the
    calibration then derives attention from whole steps at two contexts (not from PyTorch SDPA,
    which decode no longer runs)."""
    import torch

    from hest_core.energy import calib_measure
    from hest_core.exec import native
    from hest_core.exec.loading import build_lean, load_hf_model

    calibrate = calib_measure  # the measurements moved out of calibrate.py (its size limit)
    monkeypatch.setattr(calibrate, "WINDOW_SCALE", 0.2)  # what is timed matters here, not how well

    lean = build_lean(load_hf_model("tiny:llama"), torch.bfloat16, torch.device("cpu"), 256)
    for lw in lean.layers:  # what calibrate() sets from its kernel choice on this CPU
        for lin in lw.int8_linears():
            lin.woq_max_rows = 4
    fused_here = native.get() is not None
    assert calibrate._fused_decode(lean, 1) == fused_here
    seen = []
    orig = calibrate._phase_fused_decode
    monkeypatch.setattr(calibrate, "_phase_fused_decode", lambda *a: seen.append(a[2:]) or orig(*a))
    d = calibrate._phase(lean, EstimateMeter(30), 1, 96)
    assert seen == ([(1, 96)] if fused_here else [])
    assert d.attn_ctx >= 0 and d.head > 0 and d.token_fixed > 0
    assert all(v > 0 for v in d.unit[0]) and d.unit[0][2] <= d.unit[0][1]
    lean.fused.enabled = False  # HEST_FUSED=0: the PyTorch loop, timed kernel by kernel
    assert not calibrate._fused_decode(lean, 1)
    calibrate._phase(lean, EstimateMeter(30), 1, 96)
    assert len(seen) == (1 if fused_here else 0)


def test_cli_summarize_text_and_bad_policy(tmp_path):
    """The human-readable answer names energy, paths and tokens; an unknown policy is exit 2
    with the registered policies listed (int4 among them only when HEST_PATHS registers it)."""
    art = tmp_path / "a.txt"
    art.write_text("The council voted to expand the bus network after record ridership. " * 5)
    base = [sys.executable, "-m", "hest_core", "summarize", str(art), "--model", "tiny:llama"]
    base += ["--adapter", "none", "--max-new-tokens", "4"]
    r = subprocess.run([*base, "--policy", "int8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "J modelled of a" in r.stdout and "paths: {" in r.stdout and "generated" in r.stdout
    bad = subprocess.run([*base, "--policy", "int3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "'fp16', 'int8', 'skip'" in bad.stderr
