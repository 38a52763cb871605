"""Checks a calibration must pass before it is cached, and the median of repeated measurements.

A calibration is kernel timings on a machine that may be busy. One measured on a loaded 2-core
machine once had decode unit costs at the floor (1.2e-08 J for fp16, where a quiet rerun gave
6.9e-04), was cached, and then governed every budget on that machine and failed the tests. So a
table is measured in repeats and kept only when:

* no unit cost sits at the floor (`_phase_costs` lifts a unit that noise ate to 1e-3 of the
  dearest path: a unit is never free, so a floored cost means the measurement failed);
* the repeats agree: every unit cost and the head within `TOLERANCE` of their median;
* no path order flips between repeats (one repeat has fp16 dearer than int8 by more than the
  tolerance, another the reverse). Paths within the tolerance of each other are a tie, not a
  flip; a path dearer than fp16 in every repeat is not a fault either (int8 on a GPU at batch 1
  is; the engine's dominated-path substitution handles it).

A cached table is checked again before use (`checked_cache`), and for the ISA it was measured on
(`calib_isa.py`): one that fails either is set aside and measured again.
"""

from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path

from .. import paths as reg
from . import calib_isa
from .calib_rows import median_rows
from .model import CalibrationTable, PhaseCosts

log = logging.getLogger("hest.calibrate")

PHASES = ("prefill", "decode")
TOLERANCE = 0.25  # relative: repeats whose costs differ more than this did not settle
REPEATS = 3  # agreeing repeats a table needs
MAX_REPEATS = 6  # repeats measured at most before giving up (bounded time on a busy machine)


def floored(c: PhaseCosts) -> bool:
    """Whether a unit cost sits at `_phase_costs`' floor (the measurement lost it to noise)."""
    vals = [v for row in c.unit for v in row]
    floor = max(1e-3 * max(vals), 1e-9)
    return min(vals) <= floor * (1 + 1e-6)


def problems(t: CalibrationTable) -> list[str]:
    """What makes one table unusable on its own (a cached table is checked before use)."""
    out = []
    for ph in PHASES:
        c: PhaseCosts = getattr(t, ph)
        if floored(c):
            row = [f"{v:.3g}" for v in c.unit[0]]
            out.append(f"{ph} unit costs {row} J: one is at the floor (noise ate the measurement)")
        if c.head <= 0:
            out.append(f"{ph} head cost {c.head:.3g} J is not positive")
    return out


def checked_cache(cached: Path, isa: dict | None) -> CalibrationTable | None:
    """This device's cached table where it passes `problems` and was measured on
    this ISA (`isa`: `calib_isa.here()`, None off the CPU); one that fails either is set aside as
    `*.rejected` (None: measure again; `calib_isa.fits` logs why for the ISA)."""
    if not cached.is_file():
        return None
    table = CalibrationTable.load(cached)
    bad = problems(table)
    if not bad and calib_isa.fits(table, isa, "cached"):
        return table
    if bad:
        log.warning("cached calibration %s fails its checks (%s): measuring again", cached, bad)
    cached.replace(cached.with_suffix(".rejected"))
    return None


def _spread(vals: list[float]) -> float:
    med = statistics.median(vals)
    return (max(vals) - min(vals)) / med if med > 0 else float("inf")


def disagreements(tables: list[CalibrationTable], tol: float | None = None) -> list[str]:
    """Why these repeats do not agree (empty when they do); tol defaults to TOLERANCE."""
    tol = TOLERANCE if tol is None else tol
    out = []
    for ph in PHASES:
        costs = [getattr(t, ph) for t in tables]
        for p, name in enumerate(reg.names()):
            s = _spread([c.unit[0][p] for c in costs])
            if s > tol:
                out.append(f"{ph} {name} unit cost varies by {s:.0%} between repeats")
        s = _spread([c.head for c in costs])
        if s > tol:
            out.append(f"{ph} head cost varies by {s:.0%} between repeats")
        for a, b in reg.pairs():
            above = any(c.unit[0][a] > c.unit[0][b] * (1 + tol) for c in costs)
            below = any(c.unit[0][b] > c.unit[0][a] * (1 + tol) for c in costs)
            if above and below:
                out.append(f"{ph} path order of paths {a} and {b} flips between repeats")
    return out


def _median_phase(cs: list[PhaseCosts]) -> PhaseCosts:
    med = statistics.median
    n_layers, n_paths = len(cs[0].unit), len(cs[0].unit[0])
    unit = [[med(c.unit[li][p] for c in cs) for p in range(n_paths)] for li in range(n_layers)]
    shared = None
    if all(c.shared is not None for c in cs):  # batched decode: the median share, <= the unit
        shared = [
            [min(unit[li][p], med(c.shared[li][p] for c in cs)) for p in range(n_paths)]
            for li in range(n_layers)
        ]
    head = med(c.head for c in cs)
    split = None
    if all(c.split is not None for c in cs):
        split = [med(c.split[p] for c in cs) for p in range(n_paths)]
    return PhaseCosts(
        unit=unit,
        token_fixed=med(c.token_fixed for c in cs),
        attn_ctx=med(c.attn_ctx for c in cs),
        head=head,
        shared=shared,
        head_shared=min(head, med(c.head_shared for c in cs)),
        split=split,
        rows_unit=median_rows([c.rows_unit for c in cs]),
    )


def median_table(tables: list[CalibrationTable]) -> CalibrationTable:
    """The element-wise median of repeated tables (the first one's metadata)."""
    t0 = tables[0]
    return CalibrationTable(
        model=t0.model,
        model_fingerprint=t0.model_fingerprint,
        n_layers=t0.n_layers,
        device=t0.device,
        method=t0.method,
        meter=t0.meter,
        date=t0.date,
        dtype=t0.dtype,
        threads=t0.threads,
        prefill=_median_phase([t.prefill for t in tables]),
        decode=_median_phase([t.decode for t in tables]),
        kernels=dict(t0.kernels),
    )


def settle(tables: list[CalibrationTable], n: int | None = None) -> CalibrationTable | None:
    """The median of the last `n` (default REPEATS) repeats if each passes `problems` and they
    agree, else None."""
    n = REPEATS if n is None else n
    last = tables[-n:]
    if len(last) < n or any(problems(t) for t in last) or disagreements(last):
        return None
    return median_table(last)


def load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return -1.0


def sanity(prefill: PhaseCosts, decode: PhaseCosts) -> list[str]:
    """Physical orderings a calibration should show; a busy machine can break them."""
    out = []
    ps = reg.PATHS
    by_quality = sorted(ps, key=lambda p: (p.quality, p.index))
    for name, c in (("prefill", prefill), ("decode", decode)):
        u = c.unit[0]
        costs = [u[p.index] for p in by_quality]
        if any(a.quality < b.quality and u[a.index] < u[b.index] for a in ps for b in ps):
            order = " >= ".join(p.name for p in by_quality)
            vals = ", ".join(f"{v:.3g}" for v in costs)
            out.append(
                f"{name} unit costs are not ordered {order} ({vals} J): "
                "int8 is not cheaper here, or the machine was busy; rerun "
                "`python -m hest_core.energy.calibrate` on a quiet machine"
            )
    load, cores = load_avg(), os.cpu_count() or 1
    if load > 0.75 * cores:
        out.append(
            f"load average {load:.1f} on {cores} cores while calibrating: timings are disturbed"
        )
    return out
