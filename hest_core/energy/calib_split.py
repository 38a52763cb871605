"""Mixed-path prefill in the calibration: what a minority path costs beyond its rows' units.

The prefill unit costs are measured with every row of a `SPLIT_ROWS`-token forward on one path,
so each carries 1/SPLIT_ROWS of that path's weight pass. When a layer's rows take several paths,
each path's weights are read in full however few rows take it, and its rows are gathered and
scattered (`LeanModel._by_kind` / `_mlp`): session 13 measured a 556-token HEST prefill 1.2x
the time of an fp16 one that the model charged more for (docs/runtime.md, "Mixed-path prefill").

For each path p this times a whole `SPLIT_ROWS`-token prefill forward with `MINORITY_ROWS` rows
on p and the rest on a majority path q in every layer, against the same forward all on q, and
takes the difference less what the unit costs already charge for moving those rows from q to p:

    d_p = (E(mix) - E(all q)) / L - k mean_l (unit[l][p] - unit[l][q]),   k = MINORITY_ROWS

d_p is the pass k rows leave uncharged, split[p] (SPLIT_ROWS - k) / SPLIT_ROWS in the energy
model's terms (`model.EnergyModel.split_premium_q`), so split[p] = d_p SPLIT_ROWS /
(SPLIT_ROWS - k), clamped at 0. q is the reference path (fp16) for every other path, and the
cheapest other path with an MLP for the reference itself.

Scale: the differences are measured now, the unit costs may come from another day (a packaged
table); both energies are first rescaled by the table's modelled E(all q) over the measured one,
so split is in the table's joules (`scale` in the record).
"""

from __future__ import annotations

import statistics
import time

import torch

from .. import paths as reg
from ..exec.kvcache import SeqSlot
from .calib_measure import measure
from .meters import Meter
from .model import SPLIT_ROWS, CalibrationTable, EnergyModel

MINORITY_ROWS = 16  # rows on the minority path in every layer (a HEST prompt's few fp16 rows)


def majority_of(p: int, unit_sum: list[float]) -> int:
    """The majority path measured beside minority path p: the reference path, or for the
    reference itself the cheapest other path that runs an MLP (prefill unit sums `unit_sum`)."""
    ref = reg.ref()
    if p != ref:
        return ref
    others = [q for q in range(len(unit_sum)) if q != ref and reg.get(q).mlp is not None]
    return min(others, key=unit_sum.__getitem__) if others else ref


def _forward(lean, ids, pos, slots, cache, paths: torch.Tensor, last: torch.Tensor | None = None):
    """A zero-argument callable: one prefill forward of `ids` with row i on path paths[i] in
    every layer, logits for the rows `last` (default: the last row only, what a prompt's prefill
    computes)."""
    counts = torch.bincount(paths, minlength=reg.n_paths()).tolist()
    if last is None:
        last = torch.tensor([ids.shape[0] - 1], device=ids.device)

    def decide(li: int, h: torch.Tensor):
        return paths, counts

    def run() -> None:
        with torch.inference_mode():
            lean.forward(ids, pos, slots, cache, decide, False, last)

    return run


def measure_split(
    lean, meter: Meter, table: CalibrationTable, repeats: int = 3, rows: int = SPLIT_ROWS
) -> dict:
    """Measure split[p] for every path (module docstring) against `table`'s unit costs; returns
    the record: split (P,) J, the measured joules, scale, method, date. `rows`: the forward's
    tokens (SPLIT_ROWS, capped at the model's positions)."""
    em = EnergyModel(table)
    P, L = reg.n_paths(), lean.spec.n_layers
    n = min(rows, lean.rope_cos.shape[0])
    k = min(MINORITY_ROWS, n // 4)
    dev = lean.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lean.spec.vocab, (n,), generator=g).to(dev)
    pos = torch.arange(n, device=dev)
    slots = [SeqSlot(row0=0, n=n, cache_row=0, pos0=0)]
    cache = lean.new_cache(1, n)
    unit = em.unit["prefill"]
    split, measured = [0.0] * P, {}
    for p in range(P):
        q = majority_of(p, em.unit_sum["prefill"])
        if q == p:
            continue
        alone = torch.full((n,), q, dtype=torch.long, device=dev)
        mixed = alone.clone()
        mixed[torch.arange(0, n, n // k, device=dev)[:k]] = p  # k rows spread over the prompt
        e_q, e_mix = [], []
        for _ in range(repeats):  # interleaved, so a drift hits both alike
            e_q.append(measure(_forward(lean, ids, pos, slots, cache, alone), meter, dev)[1])
            e_mix.append(measure(_forward(lean, ids, pos, slots, cache, mixed), meter, dev)[1])
        jq, jm = statistics.median(e_q), statistics.median(e_mix)
        modelled_q = em.prefill_fixed(n) + n * em.unit_sum["prefill"][q]
        scale = modelled_q / jq if jq > 0 else 1.0
        moved = k * sum(unit[li][p] - unit[li][q] for li in range(L)) / L
        d = (jm - jq) * scale / L - moved
        split[p] = max(0.0, d * SPLIT_ROWS / (SPLIT_ROWS - k))
        measured[reg.get(p).name] = {
            "majority": reg.get(q).name,
            "all_majority_j": jq,
            "mixed_j": jm,
            "scale": scale,
        }
    return {
        "method": f"calib_split: a {n}-token prefill forward with {k} rows on the path in every "
        f"layer against all on the majority path, {meter.name} meter, median of {repeats}",
        "split": split,
        "measured": measured,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_split(table: CalibrationTable, record: dict) -> None:
    """Write a `measure_split` record into `table` (in place): prefill.split and
    kernels["prefill_split"]."""
    table.prefill.split = list(record["split"])
    table.kernels["prefill_split"] = record
