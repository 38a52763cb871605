"""The adapter's int4 low-rank terms in the energy model (issue 14): a calibration table is
measured on a model without them; an engine whose adapter brings them raises the table's int4
costs by what they add (`rescale_table`), the decode part measured when the engine loads
(`measure_lowrank_decode`). docs/runtime.md, "The int4 path with a trained z"."""

from __future__ import annotations

import copy
import logging
import math

from .. import paths as reg
from ..exec.int4 import GROUPS, lowrank_factors
from ..exec.model import LeanModel
from .calib_measure import _forward_j

log = logging.getLogger("hest.energy")


def measure_lowrank_decode(lean: LeanModel, meter, ctx: int = 576, rounds: int = 3) -> dict:
    """Joules the low-rank terms add to one decode step of one row with every unit on int4, at
    context `ctx`: the same step timed (`meter`, as calibration times it) with the terms and with
    them taken off, interleaved `rounds` times, the least of each. Returns {"with_j",
    "without_j", "delta_j"} (delta >= 0); the terms are back on when it returns, also on error.
    About 1 s per step kind and round on the default model."""
    p = reg.find("int4")
    ctx = min(ctx, lean.rope_cos.shape[0] - 1)
    lows = [(c, c.low) for lw in lean.layers for n in GROUPS if (c := getattr(lw, n, None))]
    with_j, without_j = [], []
    for _ in range(rounds):
        with_j.append(_forward_j(lean, meter, 1, ctx, p))
        try:
            for c, _ in lows:
                c.low = None
            without_j.append(_forward_j(lean, meter, 1, ctx, p))
        finally:
            for c, low in lows:
                c.low = low
    a, b = min(with_j), min(without_j)
    return {"with_j": a, "without_j": b, "delta_j": max(0.0, a - b)}


def rescale_table(table, lean: LeanModel, meter=None):
    """`table` with its int4 unit costs raised by this model's low-rank terms (issue 14), where
    the table was measured on a model without them (`kernels["int4_lowrank"]` all 1.0, or
    absent as in every table before it): decode by the measured joules the terms add to a step
    (`measure_lowrank_decode`, with `meter`), spread over the layers by their terms' bytes;
    prefill by `lowrank_factors`' multiply-add model (int4 prefill is the 16-bit GEMM plus the
    term; the energy model runs fp16 there wherever that is no dearer). Without a meter the
    decode costs follow the bytes model too. The same table where int4 is not registered, the
    model has no term, or the table was measured with the same terms; else a copy whose
    `kernels["int4_lowrank_rescaled"]` says what was done. A table measured with other terms
    than this model's is used as it is, with a warning (recalibrate for this adapter)."""
    p = reg.find("int4")
    ours = lowrank_factors(lean) if p is not None else None
    if ours is None or all(v == 1.0 for f in ours.values() for v in f):
        return table
    L = table.n_layers
    theirs = (table.kernels or {}).get("int4_lowrank") or {}
    if all(
        len(theirs.get(ph, [])) == L
        and all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(theirs[ph], f, strict=True))
        for ph, f in ours.items()
    ):  # measured with these very terms (calibrate records them rounded to 6 places)
        return table
    if any(v != 1.0 for f in theirs.values() for v in f):
        log.warning(
            "the calibration table was measured with another adapter's int4 low-rank terms: "
            "its int4 costs are used as they are; recalibrate for this adapter"
        )
        return table
    out = copy.deepcopy(table)
    pre, dec = out.prefill, out.decode
    for li in range(L):
        pre.unit[li][p] *= ours["prefill"][li]
    record: dict = {"prefill": "multiply-add model", "prefill_mean": sum(ours["prefill"]) / L}
    extra = [f - 1.0 for f in ours["decode"]]
    if meter is not None:
        m = measure_lowrank_decode(lean, meter)
        weights = [e / sum(extra) for e in extra]
        for li in range(L):
            dec.unit[li][p] += m["delta_j"] * weights[li]
        record |= {"decode": "measured", **m}
    else:
        for li in range(L):
            dec.unit[li][p] *= ours["decode"][li]
        record |= {"decode": "bytes model", "decode_mean": sum(ours["decode"]) / L}
    out.kernels["int4_lowrank_rescaled"] = record
    out.source = table.source
    return out
