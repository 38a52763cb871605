"""A calibration table records the ISA its costs depend on and is used only where it matches.

Under KVM a Xeon with AMX and one without both report "Intel(R) Xeon(R) Processor": the packaged
three-path table from the one without AMX modelled fp16 prefill at 2.9x what the meter read on
the one with it. Table names carry "-amx" where AMX is used, a table records `kernels.cpu.isa`
and `amx_used`, and a cached or packaged table from another ISA is measured again / skipped; an
explicit one is used with a warning; one without a record (older tables) is used as before."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hest_core.energy import calib_check, calib_isa, calib_measure, calibrate
from hest_core.energy.meters import EstimateMeter
from hest_core.energy.model import CalibrationTable, PhaseCosts
from hest_core.exec import native
from hest_core.exec.loading import build_lean, fingerprint, load_hf_model

# the flags of the two Xeons (the subset that matters, plus some that do not)
NO_AMX = ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"]
NO_AMX += ["avx512_bf16", "avx512_fp16"]
AMX = [*NO_AMX, "amx_tile", "amx_bf16", "amx_int8"]
FAKE_DECODE = [6.9e-4, 7.1e-4, 6.1e-4]  # a table's decode unit costs no measurement gives


@pytest.mark.parametrize(
    "flags,native_amx,cap,key",
    [
        (AMX, True, None, "-amx"),  # this host: oneDNN and the fused layer on tiles
        (AMX, False, None, "-amx"),  # no native kernels: oneDNN's GEMMs still use AMX
        (AMX, True, "AVX512_CORE_BF16", "-amx"),  # oneDNN capped, the fused layer is not
        (AMX, False, "AVX512_CORE_BF16", ""),  # AMX used by nothing
        (AMX, False, "avx512_core_amx", "-amx"),
        (AMX, False, "ALL", "-amx"),
        (NO_AMX, True, None, ""),  # the Xeon without AMX (the native state cannot say otherwise)
        ([*NO_AMX, "amx_tile"], True, None, ""),  # tiles without bf16 products: unused
        ([], False, None, ""),  # flags unreadable (not Linux x86)
    ],
)
def test_the_name_key_is_amx_exactly_when_amx_is_used(flags, native_amx, cap, key):
    rec = calib_isa.record(flags, native_amx, cap)
    assert calib_isa.name_key(rec) == key
    assert rec["isa"] == sorted(f for f in flags if f in calib_isa.COST_FLAGS)
    assert "avx512_fp16" not in rec["isa"] and "sse4_2" not in rec["isa"]


@pytest.fixture
def tiny_lean_fp():
    hf = load_hf_model("tiny:llama")
    return build_lean(hf, torch.bfloat16, torch.device("cpu"), 512), fingerprint(hf)


def test_table_names_carry_the_key_and_keep_the_old_names_without_amx(tiny_lean_fp):
    lean, fp = tiny_lean_fp
    t = torch.get_num_threads()
    plain = calibrate.table_name(fp, lean, calib_isa.record(NO_AMX, False, None))
    amx = calibrate.table_name(fp, lean, calib_isa.record(AMX, True, None))
    assert f"-{t}t-" in plain or plain.endswith(f"-{t}t.json")
    assert "amx" not in plain and amx == plain.replace(f"-{t}t", f"-{t}t-amx", 1)
    here = calibrate.table_name(fp, lean)  # this host's record
    assert here == (amx if calib_isa.name_key(calib_isa.here()) else plain)


def test_mismatch_names_what_differs():
    amx, plain = calib_isa.record(AMX, True, None), calib_isa.record(NO_AMX, False, None)
    assert calib_isa.mismatch(amx, amx) == []
    assert calib_isa.mismatch({"model_name": "Intel(R) Xeon(R) Processor"}, amx) is None
    assert calib_isa.mismatch(None, amx) is None
    why = calib_isa.mismatch(plain, amx)
    assert "flags only this CPU has: amx_bf16,amx_int8,amx_tile" in why
    assert "AMX used by onednn: False in the table, True here" in why
    capped = calib_isa.record(AMX, True, "AVX512_CORE_BF16")  # same flags, oneDNN without AMX
    assert calib_isa.mismatch(capped, amx) == ["AMX used by onednn: False in the table, True here"]


def _table(fp: str, n_layers: int, cpu: dict | None) -> CalibrationTable:
    """A table that passes its checks, with `cpu` as kernels.cpu (None: no record)."""

    def phase(u):
        return PhaseCosts([list(u) for _ in range(n_layers)], 1e-4, 1e-6, 1e-3)

    kernels = {"woq_max_rows": 4} | ({"cpu": cpu} if cpu is not None else {})
    t = CalibrationTable(
        "tiny:llama", fp, n_layers, "cpu-test", "estimate", "estimate", "2026-11-30", "bf16",
        2, phase([6.0e-4, 4.0e-4, 1.0e-4]), phase(FAKE_DECODE), kernels,
    )  # fmt: skip
    assert calib_check.problems(t) == []
    return t


def _other_isa() -> dict:
    """This host's record with avx512_vnni flipped: another ISA under the same table name."""
    rec = calib_isa.here()
    return dict(rec, isa=sorted(set(rec["isa"]) ^ {"avx512_vnni"}))


@pytest.fixture
def no_tables(tmp_path, monkeypatch):
    """No explicit, cached or packaged table; measurements short (tiny model, 2 repeats)."""
    monkeypatch.delenv("HEST_CALIBRATION", raising=False)
    monkeypatch.setenv("HEST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "PACKAGED", tmp_path / "packaged")
    monkeypatch.setattr(calib_check, "REPEATS", 2)
    monkeypatch.setattr(calib_check, "MAX_REPEATS", 2)
    monkeypatch.setattr(calib_measure, "WINDOW_SCALE", 0.2)
    return tmp_path


def test_a_cached_table_of_another_isa_is_set_aside_and_measured_again(
    tiny_lean_fp, no_tables, caplog
):
    lean, fp = tiny_lean_fp
    caplog.set_level(logging.INFO, logger="hest.calibrate")
    cached = no_tables / "calibration" / calibrate.table_name(fp, lean)
    _table(fp, lean.spec.n_layers, _other_isa()).save(cached)
    table = calibrate.resolve(lean, fp, None, EstimateMeter(30), progress=False)
    assert table.decode.unit[0] != FAKE_DECODE  # measured here
    assert cached.with_suffix(".rejected").is_file()
    assert any(
        "cached calibration" in r.message and "another ISA" in r.message for r in caplog.records
    )
    assert table.kernels["cpu"]["isa"] == calib_isa.here()["isa"]  # the new one records it
    assert table.kernels["cpu"]["amx_used"] == calib_isa.here()["amx_used"]


def test_a_packaged_table_of_another_isa_is_skipped(tiny_lean_fp, no_tables, caplog):
    lean, fp = tiny_lean_fp
    caplog.set_level(logging.INFO, logger="hest.calibrate")
    packaged = calibrate.PACKAGED / calibrate.table_name(fp, lean)
    _table(fp, lean.spec.n_layers, _other_isa()).save(packaged)
    table = calibrate.resolve(lean, fp, None, EstimateMeter(30), progress=False)
    assert table.source != str(packaged) and table.decode.unit[0] != FAKE_DECODE
    assert any("packaged calibration" in r.message for r in caplog.records)
    assert calibrate.packaged_family(fp, lean) is None  # nor the fallback of an unsettled start


def test_a_packaged_table_of_this_isa_or_none_is_used(tiny_lean_fp, no_tables, caplog):
    lean, fp = tiny_lean_fp
    caplog.set_level(logging.INFO, logger="hest.calibrate")
    packaged = calibrate.PACKAGED / calibrate.table_name(fp, lean)
    _table(fp, lean.spec.n_layers, calib_isa.here()).save(packaged)
    table = calibrate.resolve(lean, fp, None, EstimateMeter(30), progress=False)
    assert table.source == str(packaged) and table.decode.unit[0] == FAKE_DECODE
    _table(fp, lean.spec.n_layers, None).save(packaged)  # an older table: no record
    for _ in range(2):
        table = calibrate.resolve(lean, fp, None, EstimateMeter(30), progress=False)
        assert table.source == str(packaged) and table.decode.unit[0] == FAKE_DECODE
    assert [r.message for r in caplog.records].count(
        f"calibration {packaged}: ISA unknown (the table records none); using it"
    ) == 1


def test_an_explicit_table_of_another_isa_is_used_with_a_warning(tiny_lean_fp, tmp_path, caplog):
    lean, fp = tiny_lean_fp
    caplog.set_level(logging.INFO, logger="hest.calibrate")
    path = tmp_path / "given.json"
    _table(fp, lean.spec.n_layers, _other_isa()).save(path)
    table = calibrate.resolve(lean, fp, path, EstimateMeter(30), progress=False)
    assert table.source == str(path) and table.decode.unit[0] == FAKE_DECODE
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "another ISA" in warned[0].message
    assert "avx512_vnni" in warned[0].message and "using it as given" in warned[0].message


def test_the_packaged_tables_record_their_isa_where_their_name_says_amx():
    """The AMX host's tables carry "-amx" and a record with AMX used; the session-2 tables from
    the Xeon without AMX keep their names and record none."""
    for p in sorted(calibrate.PACKAGED.glob("*.json")):
        cpu = json.loads(p.read_text())["kernels"].get("cpu", {})
        if "-amx" in p.name:
            assert calib_isa.name_key(cpu) == "-amx" and "amx_bf16" in cpu["isa"], p.name
        else:
            assert "isa" not in cpu, p.name


def test_turning_the_fused_layers_tiles_off_is_recorded():
    """A table measured with the fused layer's AMX tiles off (tools/calibrate_no_amx.py) records
    them as unused: the record follows `Native.set_amx`, not the library's start-up state."""
    nat = native.get()
    if nat is None or not nat.amx:
        pytest.skip("no native kernels with AMX tiles on this CPU")
    try:
        assert nat.set_amx(False) is False
        assert calib_isa.here()["amx_used"]["native"] is False
    finally:
        nat.set_amx(True)
    assert calib_isa.here()["amx_used"]["native"] is True
