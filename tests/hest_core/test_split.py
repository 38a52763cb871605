"""Mixed-path prefill (issue 16's 4k / 512 ratio, issue 15's attribution): a prefill layer whose
rows take several paths reads each path's weights, so the energy model charges each minority
path's weight pass (`prefill.split`, `EnergyModel.split_premium_q`), the guard fits and commits it
and batch mates on the same path share it (`split_rebate_q`); the runtime runs a small minority
beside its majority without gathering the majority's rows (`exec.model._in_place`), with the
same tokens. Tiny-model engines run under `split_tables` (conftest: a pass of SPLIT_UNITS rows)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hest_core import Engine, GenerationRequest
from hest_core import paths as reg
from hest_core.energy import calib_split
from hest_core.energy.calibrate import PREFILL_T
from hest_core.energy.model import PJ, SPLIT_ROWS, CalibrationTable, EnergyModel, PhaseCosts
from hest_core.errors import CalibrationError
from hest_core.exec import model as lean_model
from hest_core.runtime.guard import BudgetGuard
from tests.conftest import REFERENCE, SPLIT_UNITS

TEXTS = [
    "The city council voted on Tuesday to expand the bus network after a year of delays. " * 3,
    "The museum reopened its west wing with a show of river photographs. " * 4,
    "Heavy rain closed two mountain roads and delayed the harvest by a week. " * 2,
]
SPLIT = [0.02, 0.03, 0.01]  # J per layer: fp16, int8, skip


def _table(split=SPLIT) -> CalibrationTable:
    t = json.loads(REFERENCE.read_text())
    t["prefill"]["split"] = split
    t["prefill"] = PhaseCosts(**t["prefill"])
    t["decode"] = PhaseCosts(**t["decode"])
    return CalibrationTable(**t)


def test_split_rows_are_the_calibrations_prefill_rows() -> None:
    assert SPLIT_ROWS == PREFILL_T


def test_premium_charges_minority_paths_only() -> None:
    em = EnergyModel(_table())
    s = [math.ceil(v * PJ) for v in SPLIT]
    assert em.split_premium_q([100, 0, 0]) == 0  # one path: nothing more
    # 90 on fp16 (majority), 10 on int8: int8's pass less what its 10 rows' units carry
    assert em.split_premium_q([90, 10, 0]) == -(-s[1] * (SPLIT_ROWS - 10) // SPLIT_ROWS)
    both = em.split_premium_q([80, 10, 10])
    assert both == em.split_premium_q([80, 10, 0]) + em.split_premium_q([80, 0, 10])
    assert em.split_premium_q([300, SPLIT_ROWS, 0]) == 0  # a full pass's rows carry it
    # a tie: the first most-used path is the majority, the other pays
    assert em.split_premium_q([5, 5, 0]) == -(-s[1] * (SPLIT_ROWS - 5) // SPLIT_ROWS)
    assert EnergyModel(_table(None)).split_premium_q([90, 10, 0]) == 0  # not measured


def test_rebate_shares_a_pass_among_the_rounds_rows() -> None:
    em = EnergyModel(_table())
    mine = [90, 10, 0]
    charged = em.split_premium_q(mine)
    assert em.split_rebate_q(mine, mine) == 0  # alone: nothing shared
    # a mate ran 30 more int8 rows: this request keeps 10/40 of what 40 rows leave uncharged
    kept = -(-em._pass_left_q(1, 40) * 10 // 40)
    assert em.split_rebate_q(mine, [150, 40, 0]) == charged - kept
    # int8 was the round's majority: its pass is its rows' own, all given back
    assert em.split_rebate_q(mine, [90, 400, 0]) == charged
    for on in ([90, 10, 0], [95, 11, 3], [200, 255, 1], [91, 500, 7]):
        assert 0 <= em.split_rebate_q(mine, on) <= charged


def test_split_is_checked() -> None:
    t = json.loads(REFERENCE.read_text())
    with pytest.raises(CalibrationError, match="prefill.split must be 3"):
        PhaseCosts(**(t["prefill"] | {"split": [0.1, 0.2]})).check(30, "prefill")
    with pytest.raises(CalibrationError, match="prefill.split must be"):
        PhaseCosts(**(t["prefill"] | {"split": [0.1, -0.2, 0.0]})).check(30, "prefill")
    with pytest.raises(CalibrationError, match="for prefill only"):
        PhaseCosts(**(t["decode"] | {"split": [0.1, 0.2, 0.0]})).check(30, "decode")


def test_split_travels_with_the_table(tmp_path) -> None:
    path = tmp_path / "t.json"
    _table().save(path)
    assert CalibrationTable.load(path).prefill.split == SPLIT


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.integers(0, 2), min_size=1, max_size=40),
    left=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_fit_keeps_units_and_passes_within_the_limit(rows, left, seed) -> None:
    """Whatever the controller chose and however little is left, the fitted layer's units and
    minority passes stay within the guard's limit (the hard limit always affords every row on
    the cheapest path, which pays no pass)."""
    em = EnergyModel(_table())
    n = len(rows)
    full = em.request_cost_q(n, 2, em.ref)
    least = em.request_cost_q(n, 2, None)
    g = BudgetGuard(em, least + int(left * (full - least)), n, 2, "hard")
    g.start_prefill()
    g.begin_prefill_chunk(n)
    paths = torch.tensor(rows)
    counts = torch.bincount(paths, minlength=3).tolist()
    logits = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    for li in range(em.L):
        lim = g.limit(li, n)
        new, c = g.fit(li, paths, logits, counts)
        assert sum(c) == n and torch.bincount(new, minlength=3).tolist() == c
        units = sum(k * u for k, u in zip(c, em.unit_q["prefill"][li], strict=True))
        assert units + em.split_premium_q(c) <= lim
        g.commit(li, c)
        assert g.spent <= g.budget


# ---- engines: the charge as the runtime runs it -------------------------------------------------
@pytest.fixture(scope="module")
def hest_split(split_tables) -> Engine:
    e = Engine.from_pretrained("tiny:qwen3", adapter=None, calibration=split_tables, progress=False)
    e.max_article_tokens = 64
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a controller that mixes paths in most layers
        for p in e.controller.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)
    return e


def _prefill_only(text: str) -> GenerationRequest:
    return GenerationRequest(text, energy_budget_ratio=1.0, max_new_tokens=1, clean_end=False)


def test_a_request_pays_its_minority_passes(hest_split: Engine) -> None:
    """prefill_j is its units, fixed work and head (the same request without the pass: the
    table's other costs) plus each layer's minority passes from the paths it ran."""
    e = hest_split
    em = e.energy
    assert em.splits and SPLIT_UNITS > 0
    r = e.generate([_prefill_only(TEXTS[0])])[0]
    counts = r.stats.paths_per_layer
    names = reg.names()
    premium = sum(em.split_premium_q([c[n] for n in names]) for c in counts)
    assert premium > 0  # the mixing controller split some layer
    units = sum(
        sum(c[n] * em.unit_q["prefill"][li][p] for p, n in enumerate(names))
        for li, c in enumerate(counts)
    )
    p = r.stats.prompt_tokens
    assert round(r.stats.prefill_j * PJ) == em.prefill_fixed_q(p) + units + premium


def test_batch_mates_share_their_minority_passes(hest_split: Engine) -> None:
    """The same prompts prefilled in one round pay less for their passes than alone, never
    more, and every one stays within its budget."""
    e = hest_split
    alone = [e.generate([_prefill_only(t)])[0].stats for t in TEXTS]
    together = [r.stats for r in e.generate([_prefill_only(t) for t in TEXTS])]
    for a, b in zip(alone, together, strict=True):
        assert a.paths_per_layer == b.paths_per_layer  # the same work
        assert b.prefill_j <= a.prefill_j + 1e-12 and b.modelled_j <= b.budget_j
    assert sum(b.prefill_j for b in together) < sum(a.prefill_j for a in alone)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batch=st.lists(
        st.tuples(st.integers(0, len(TEXTS) - 1), st.floats(0.0, 1.2), st.integers(1, 8)),
        min_size=1,
        max_size=4,
    ),
    mode=st.sampled_from(["paced", "hard"]),
)
def test_budget_holds_with_minority_passes(hest_split: Engine, batch, mode) -> None:
    """Random budgets from the minimum up, batches prefilled together: attributed joules stay
    within every budget with the passes charged."""
    e = hest_split
    e.guard_mode = mode
    reqs = []
    for i, pos, max_new in batch:
        probe = e.check(
            GenerationRequest(TEXTS[i], energy_budget_ratio=1.0, max_new_tokens=max_new)
        )
        budget = probe.min_j + pos * (probe.fp16_cost_j - probe.min_j)
        reqs.append(GenerationRequest(TEXTS[i], energy_budget_j=budget, max_new_tokens=max_new))
    for r in e.generate(reqs):
        s = r.stats
        assert r.finish_reason in ("stop", "length", "energy_budget"), r.error
        assert s.modelled_j <= s.budget_j
        assert s.prefill_j + s.decode_j == pytest.approx(s.modelled_j)
    e.guard_mode = "hard"


def test_in_place_minority_writes_the_same_tokens(hest_split: Engine, monkeypatch) -> None:
    """A small minority run beside its majority's product over every row (the majority's rows
    not gathered) gives the tokens the gathered form gives."""
    e = hest_split
    reqs = [GenerationRequest(t, energy_budget_ratio=1.0, max_new_tokens=6) for t in TEXTS]
    monkeypatch.setattr(lean_model, "IN_PLACE_SHARE", 0.0)
    gathered = [r.text for r in e.generate(reqs)]
    monkeypatch.setattr(lean_model, "IN_PLACE_SHARE", 0.5)  # in place wherever it can be
    assert [r.text for r in e.generate(reqs)] == gathered


def test_in_place_is_chosen_for_a_small_minority_only() -> None:
    from hest_core.exec import q4

    assert lean_model.KERNEL_ROWS == q4.MAX_ROWS
    rows = {"a": torch.arange(100), "b": torch.arange(100, 110)}
    assert lean_model._in_place(rows, 110) == "a"
    rows = {"a": torch.arange(60), "b": torch.arange(60, 110)}
    assert lean_model._in_place(rows, 110) is None  # too large a minority: gather each
    rows = {"a": torch.arange(14), "b": torch.arange(14, 15)}
    assert lean_model._in_place(rows, 15) is None  # a few rows: the 4-bit kernel's size


def test_measure_split_on_the_tiny_model(tiny_engine) -> None:
    """The calibration step measures every path's pass (>= 0) beside its majority and writes it
    where the energy model reads it."""
    e = tiny_engine
    table = e.energy.table
    rec = calib_split.measure_split(e.lean, e.meter, table, repeats=1)
    assert len(rec["split"]) == reg.n_paths() and all(v >= 0 for v in rec["split"])
    assert set(rec["measured"]) == set(reg.names())
    t = CalibrationTable.load(table.source)
    calib_split.write_split(t, rec)
    assert EnergyModel(t).split_q == tuple(math.ceil(v * PJ) for v in rec["split"])
