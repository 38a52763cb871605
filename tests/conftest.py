"""Shared fixtures. Engines are expensive: one per model per session.

Every engine the tests build runs under a FIXED calibration table written here (issue 11: the
suite once passed or failed with whatever table a machine had measured and cached, and one
measured on a busy machine failed four tests). `HEST_CALIBRATION` points at a directory holding,
per model fingerprint, `<fingerprint>.json`:

* the default model: its packaged table (measured on the 2-core Intel Xeon it was built on);
* each tiny test model: the default model's packaged costs with the per-layer unit costs scaled
  by 30 / n_layers, so a token's cost splits between the gated units, the fixed work and the
  head as it does on the real model (the tiny model's own 49152-row head would otherwise be
  ~95% of a token and no path choice would matter).

Beside each `<fingerprint>.json` (the built-in three paths) lies `<fingerprint>-int4.json`, the
same table with a 4th column for the opt-in `int4` path (issue 13): per unit, halfway between
int8's and skip's cost, so int4 sits in the cost order where its quality puts it. An engine picks
the one with a column per registered path (`calibrate.resolve`), so an engine that registers int4
(`paths=`, `HEST_PATHS`, or an adapter trained with it, as the shipped default adapter is) gets
four columns without being told. `int4_tables` (a fixture) is a directory of the same files for
tests that pass `calibration=` explicitly.

The path registry is process-wide (hest_core/paths.py): whatever a test module or a test
registers (an engine on the four-path default adapter registers int4) is taken back after it
(`_registry_per_module`, `_registry_per_test`), so every other test runs on the built-in three.
Session-scoped engines are built on the built-in three and must be used only there.

`shared_tables` (a fixture) writes the same tables with fixed batched-decode shares (issue 15):
per decode unit SHARED_UNIT of its cost, and HEAD_SHARED of the head, are paid once per decode
step by its rows, so a test can predict each row's attributed joules exactly. The default tables
carry whatever shares the packaged table measured (scaled with the units for the tiny models).

`split_tables` (a fixture) writes the shared tables with a fixed mixed-path prefill pass as
well: per path, SPLIT_UNITS rows' worth of its first-layer prefill unit cost (`prefill.split`).

These are test inputs, not results. Tests of the calibration itself measure on their own.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from hest_core import Engine
from hest_core import paths as reg
from hest_core.energy.calibrate import PACKAGED
from hest_core.exec.loading import TINY, fingerprint, load_hf_model

REFERENCE = PACKAGED / "491473d3fa8f25ad-intel-r-xeon-r-processor-bf16-2t-native.json"


SHARED_UNIT, HEAD_SHARED = 0.75, 0.9  # `shared_tables`: the shared parts of decode costs
SPLIT_UNITS = 8  # `split_tables`: a minority path's prefill weight pass, in rows of its unit cost


def _with_split(t: dict) -> dict:
    """A table whose prefill charges a minority path SPLIT_UNITS rows of its unit cost."""
    t = json.loads(json.dumps(t))
    t["method"] += f"; prefill split {SPLIT_UNITS} rows of the first layer's units (fixed)"
    t["prefill"]["split"] = [v * SPLIT_UNITS for v in t["prefill"]["unit"][0]]
    return t


def _with_shares(t: dict) -> dict:
    """A table whose decode steps share SHARED_UNIT of each unit and HEAD_SHARED of the head."""
    t = json.loads(json.dumps(t))
    t["method"] += f"; decode shares {SHARED_UNIT} of units, {HEAD_SHARED} of the head (fixed)"
    d = t["decode"]
    d["shared"] = [[v * SHARED_UNIT for v in r] for r in d["unit"]]
    d["head_shared"] = d["head"] * HEAD_SHARED
    return t


def _with_int4(t: dict) -> dict:
    """A table with an int4 column (index 3): halfway between int8's (1) and skip's (2) cost."""
    t = json.loads(json.dumps(t))
    t["method"] += "; int4 column: halfway between int8 and skip (fixed test input)"
    for ph in ("prefill", "decode"):
        t[ph]["unit"] = [[*r, (r[1] + r[2]) / 2] for r in t[ph]["unit"]]
        if t[ph].get("shared") is not None:
            t[ph]["shared"] = [[*r, (r[1] + r[2]) / 2] for r in t[ph]["shared"]]
        if t[ph].get("split") is not None:
            r = t[ph]["split"]
            t[ph]["split"] = [*r, (r[1] + r[2]) / 2]
    return t


def _write(out: Path, t: dict, shares: bool, split: bool = False) -> None:
    """`<fingerprint>.json` (the built-in three paths) and `<fingerprint>-int4.json` of `t`."""
    t = _with_shares(t) if shares else t
    t = _with_split(t) if split else t
    (out / f"{t['model_fingerprint']}.json").write_text(json.dumps(t))
    (out / f"{t['model_fingerprint']}-int4.json").write_text(json.dumps(_with_int4(t)))


def _write_fixed_tables(out: Path, shares: bool = False, split: bool = False) -> None:
    ref = json.loads(REFERENCE.read_text())
    ref["prefill"].pop("split", None)  # the packaged table's measured one, if any: not fixed
    ref["kernels"].pop("prefill_split", None)
    for k in ("round_tokens", "round_cap", "round_tokens_ctrl", "round_cap_ctrl"):
        ref["prefill"].pop(k, None)  # a measured round fit, if any: not fixed either
    ref["decode"].pop("rows_unit", None)  # nor measured steps of 1..16 rows
    ref["kernels"].pop("prefill_round", None)
    ref["kernels"].pop("prefill_round_ctrl", None)
    _write(out, ref, shares, split)
    for kind in TINY:
        hf = load_hf_model(kind)
        n = hf.config.num_hidden_layers
        t = json.loads(json.dumps(ref))
        t |= {"model": kind, "model_fingerprint": fingerprint(hf), "n_layers": n}
        t["method"] = "fixed test table: the default model's packaged costs, units x 30/L"
        for ph in ("prefill", "decode"):
            row = [v * ref["n_layers"] / n for v in ref[ph]["unit"][0]]
            t[ph]["unit"] = [list(row) for _ in range(n)]
            if ref[ph].get("shared") is not None:  # measured shares scale with their units
                row = [v * ref["n_layers"] / n for v in ref[ph]["shared"][0]]
                t[ph]["shared"] = [list(row) for _ in range(n)]
        _write(out, t, shares, split)


def pytest_configure(config) -> None:
    if os.environ.get("HEST_CALIBRATION"):
        return  # a caller chose the tables (and a server test's subprocess inherits them)
    out = Path(tempfile.mkdtemp(prefix="hest-test-calibration-"))
    _write_fixed_tables(out)
    os.environ["HEST_CALIBRATION"] = str(out)


@pytest.fixture(scope="session")
def int4_tables(tmp_path_factory) -> Path:
    """A directory of the fixed tables with an int4 column (see the module docstring)."""
    out = tmp_path_factory.mktemp("calibration-int4")
    _write_fixed_tables(out)
    return out


@pytest.fixture(scope="session")
def shared_tables(tmp_path_factory) -> Path:
    """A directory of the fixed tables with fixed batched-decode shares (module docstring)."""
    out = tmp_path_factory.mktemp("calibration-shared")
    _write_fixed_tables(out, shares=True)
    return out


@pytest.fixture(scope="session")
def split_tables(tmp_path_factory) -> Path:
    """`shared_tables` with a fixed mixed-path prefill pass (module docstring)."""
    out = tmp_path_factory.mktemp("calibration-split")
    _write_fixed_tables(out, shares=True, split=True)
    return out


@pytest.fixture(scope="module", autouse=True)
def _registry_per_module():
    """The path registry as it was before the module (module docstring)."""
    with reg.restored():
        yield


@pytest.fixture(autouse=True)
def _registry_per_test():
    """The path registry as it was before the test (its module's fixtures' paths stay)."""
    with reg.restored():
        yield


def builtin_engine(*args, **kw) -> Engine:
    """A session-scoped engine: built on the built-in three paths (module docstring)."""
    assert reg.names() == reg.BUILTIN_NAMES, (
        f"a session-scoped engine built while {reg.names()} are registered would break every "
        "later test; request it from a module that registers no optional path"
    )
    return Engine.from_pretrained(*args, **kw)


@pytest.fixture(scope="session")
def tiny_engine() -> Engine:
    return builtin_engine("tiny:llama", adapter=None, progress=False)


@pytest.fixture(scope="session")
def default_engine() -> Engine:
    """The real default model (SmolLM2-135M-Instruct), no adapter."""
    return builtin_engine("default", adapter=None, progress=False)
