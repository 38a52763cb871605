"""Batched decode in the calibration: how a decode step's cost grows with its rows.

A decode step of m rows reads each layer's weights of a path once for all the rows on that path
(and the lm_head once for all rows): at small m the step is memory-bound, so m rows cost far
less than m single-row steps. The energy model (`model.py`) takes a step's cost on path p in
layer l with m rows on it as

    cost_p(m) = s_p + m (u_p - s_p)        u_p: the batch-1 unit cost (the table's unit)

and the head's likewise (head_shared). This module measures whole decode steps of m rows, every
unit on one path (m sequences, one row each, at the calibration's decode context), for m in
`ROWS`, and fits s_p by least squares through the batch-1 point the table already holds:
minimising sum_m (m u_p - (m-1) s_p - g_p(m))^2 over s_p gives

    s_p = sum_m (m-1) (m u_p - g_p(m)) / sum_m (m-1)^2

where g_p(m) is the measured gated part of the step per layer (the step's joules minus the
per-row fixed work, minus the modelled head, over the layers). s_p is clamped to [0, u_p], so a
row's share (u_p - s_p) + s_p / m is at most u_p at every m (the guard relies on it).

A line is not what the kernels do: they change with the rows (on the Xeon with AMX, 16-bit
products run on the tiles from 5 rows, int4 ones from 9), so the table also gets the measured
curve itself (`curve`): rows_unit[p][m-1] = g_p(m) / g_p(1) for m = 1..max(rows), taken within
one run (a ratio, so it applies to the table's own batch-1 unit costs), linear between measured
m, each row's share g / m made non-increasing in m (pool-adjacent-violators: a batch mate
joining never raises a row's share) and at most 1. The energy model prices a step from the
curve where a table has it (model.py).
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import replace

import torch

from .. import paths as reg
from ..dtypes import cpu_model_name
from ..exec.kvcache import SeqSlot
from ..exec.model import LeanModel
from ..exec.ops import linear16, rms_norm
from ..exec.routing import const_decider
from . import calib_isa
from . import calib_measure as cm
from .meters import Meter
from .model import PhaseCosts

# rows per decode step measured by `calibrate` (an engine's first start on a CPU without a
# packaged table: every repeat times them, ~3 s per m on the default model at 2 threads): both
# sides of each m where the Xeon's kernels change (16-bit on the AMX tiles from 5 rows, int8 and
# int4 from 9), linear between; `tools/package_shares.py`, for the packaged tables, takes every
# m up to the scheduler's 16 (ROWS_ALL)
ROWS = (1, 2, 4, 5, 8, 9, 12, 16)
ROWS_ALL = tuple(range(1, 17))


def through_one(ms: list[int], ys: list[float], y1: float) -> float:
    """The shared part s of y(m) = m y1 - (m - 1) s fitted by least squares to the points
    (ms[i], ys[i]) (the line through (1, y1)); 0.0 when every m is 1. Unclamped."""
    den = sum((m - 1) ** 2 for m in ms)
    if den == 0:
        return 0.0
    return sum((m - 1) * (m * y1 - y) for m, y in zip(ms, ys, strict=True)) / den


def _non_increasing(v: list[float]) -> list[float]:
    """The least-squares non-increasing sequence closest to v (pool adjacent violators, equal
    weights): runs that rise are replaced by their mean."""
    blocks: list[list[float]] = []  # [mean, count]
    for x in v:
        blocks.append([x, 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            (a, n), (b, k) = blocks[-2], blocks.pop()
            blocks[-1] = [(a * n + b * k) / (n + k), n + k]
    return [m for m, n in blocks for _ in range(int(n))]


def _steps(share: list[float]) -> list[float]:
    """Step multiples g(m) = m x share(m), m = 1.., from each row's share of an m-row step:
    shares clamped at 1, made non-increasing (`_non_increasing`), 1 at one row."""
    share = _non_increasing([min(1.0, a) for a in share])
    share[0] = 1.0
    return [a * m for m, a in enumerate(share, 1)]


def curve(ms: list[int], g: list[float]) -> list[float] | None:
    """A path's step multiples rows_unit (module docstring) for m = 1..max(ms) from its gated
    step joules g measured at the distinct m in ms (1 among them): g(m) / g(1), linear between
    measured m; each row's share g / m clamped to (0, 1] and made non-increasing in m. None when
    the one-row figure is not positive (nothing to scale by: a timing too small to read).
    Raises ValueError when ms lacks m = 1."""
    pts = dict(zip(ms, g, strict=True))
    if 1 not in pts:
        raise ValueError(f"the curve needs a one-row step among the rows measured, got {ms}")
    if pts[1] <= 0:
        return None
    xs = sorted(pts)
    full = []
    for m in range(1, xs[-1] + 1):
        hi = next(x for x in xs if x >= m)
        lo = max(x for x in xs if x <= m)
        y = pts[lo] if hi == lo else pts[lo] + (pts[hi] - pts[lo]) * (m - lo) / (hi - lo)
        full.append(max(1e-6, y / pts[1] / m))
    return _steps(full)


def median_rows(curves: list[list[list[float]] | None]) -> list[list[float]] | None:
    """The element-wise median of repeated rows_unit curves (each (P, M)), each row's share
    made non-increasing again (`curve`'s rules); None when any repeat has none."""
    if not curves or any(c is None for c in curves):
        return None
    out = []
    for p in range(len(curves[0])):
        M = len(curves[0][p])
        out.append(
            _steps([statistics.median(c[p][m - 1] / m for c in curves) for m in range(1, M + 1)])
        )
    return out


def step_j(lean: LeanModel, meter: Meter, m: int, ctx: int, path: int, cache=None) -> float:
    """Joules of one whole decode step of m rows (m sequences in cache rows 0..m-1, each one
    token at position ctx - 1), every unit on `path`, logits for every row. `cache`: a KVCache
    of m rows and > ctx positions to reuse (None: a new one, filled with noise)."""
    s, dev = lean.spec, lean.device
    if cache is None:
        cache = noisy_cache(lean, m, ctx)
    slots = [SeqSlot(row0=j, n=1, cache_row=j, pos0=ctx - 1) for j in range(m)]
    tok = torch.randint(0, s.vocab, (m,), device=dev)
    positions = torch.full((m,), ctx - 1, dtype=torch.long, device=dev)
    dec = const_decider(path)
    with torch.inference_mode():
        return cm.measure(
            lambda: lean.forward(tok, positions, slots, cache, dec, True, None),
            meter,
            dev,
            min_s=0.1,
            reps=5,
        )[1]


def noisy_cache(lean: LeanModel, m: int, ctx: int):
    """A KV cache of m rows x (ctx + 1) positions of random keys and values."""
    cache = lean.new_cache(m, ctx + 1)
    for t in cache.k + cache.v:
        t.normal_()
    return cache


def head_j(lean: LeanModel, meter: Meter, m: int) -> float:
    """Joules of the final norm and lm_head for m rows (the forward pass's own kernel)."""
    s = lean.spec
    x = torch.randn(m, s.hidden, dtype=lean.dtype, device=lean.device)
    with torch.inference_mode():
        return cm.measure(
            lambda: linear16(rms_norm(x, lean.norm, s.eps), lean.lm_head, lean.lm_head_packed),
            meter,
            lean.device,
        )[1]


def measure_rows(
    lean: LeanModel,
    meter: Meter,
    decode: PhaseCosts,
    ctx: int,
    rows: tuple[int, ...] = ROWS,
    say: Callable[[str], None] = lambda msg: None,
) -> tuple[PhaseCosts, dict]:
    """The decode costs `decode` (batch 1, from `calib_measure._phase`) with their shared parts
    fitted from whole steps of each m in `rows` (m > 1; 1 is `decode` itself) and the measured
    curve rows_unit (`curve`, from steps of 1 row and of each m, timed in this run), and a
    record of the fit: {"rows", "ctx", "step_j": {path: [J per step per m]}, "step_j_1": {path:
    J of a one-row step}, "head_j", "fit_error": {path: largest |model - measured| / measured
    over the m}, "rows_unit"}. With no m > 1: `decode` unchanged (shared None) and an empty
    record. Units are joules (as the meter reads them)."""
    ms = sorted({int(m) for m in rows if int(m) > 1})
    if not ms:
        return decode, {}
    L, P = lean.spec.n_layers, reg.n_paths()
    u1 = decode.unit[0]
    per_row = decode.token_fixed + decode.attn_ctx * ctx  # embedding, controller, attention
    heads = [head_j(lean, meter, m) for m in ms]
    hs = min(max(through_one(ms, heads, decode.head), 0.0), decode.head)

    def head_at(m: int) -> float:
        return hs + m * (decode.head - hs)

    shared, steps, errs, ones = [], {}, {}, {}
    cache = noisy_cache(lean, 1, ctx)
    for p in range(P):  # a one-row step in this run: the curve's scale
        ones[reg.names()[p]] = step_j(lean, meter, 1, ctx, p, cache)
    for m in ms:  # one cache per m, every path on it
        cache = noisy_cache(lean, m, ctx)
        for p in range(P):
            steps.setdefault(reg.names()[p], []).append(step_j(lean, meter, m, ctx, p, cache))
        say(f"  decode steps of {m} rows timed on every path")
        del cache
    curves = []
    for p, name in enumerate(reg.names()):
        js = steps[name]
        g = [(j - m * per_row - head_at(m)) / L for m, j in zip(ms, js, strict=True)]
        g1 = (ones[name] - per_row - head_at(1)) / L
        curves.append(curve([1, *ms], [g1, *g]))
        s = min(max(through_one(ms, g, u1[p]), 0.0), u1[p])
        shared.append(s)
        model = [m * per_row + head_at(m) + L * (s + m * (u1[p] - s)) for m in ms]
        errs[name] = max(abs(a - b) / b for a, b in zip(model, js, strict=True))
    record = {
        "rows": [1, *ms],
        "ctx": ctx,
        "step_j": steps,
        "step_j_1": ones,
        "head_j": heads,
        "fit_error": errs,
    }
    rows_unit = None if any(c is None for c in curves) else curves
    record["rows_unit"] = rows_unit
    out = replace(
        decode, shared=[list(shared) for _ in range(L)], head_shared=hs, rows_unit=rows_unit
    )
    return out, record


def cpu_record() -> dict:
    """What the CPU is (model name, logical CPUs, torch threads, machine) and the ISA features
    its costs depend on (`calib_isa.here()`: "isa", "amx_used"), for the table."""
    name = cpu_model_name() or platform.processor() or "unknown"
    return {
        "model_name": name,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        **calib_isa.here(),
    }
