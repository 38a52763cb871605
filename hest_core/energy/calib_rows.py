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
"""

from __future__ import annotations

import os
import platform
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

ROWS = (1, 2, 4, 8, 16)  # rows per decode step measured (1 is the table's own batch-1 cost)


def through_one(ms: list[int], ys: list[float], y1: float) -> float:
    """The shared part s of y(m) = m y1 - (m - 1) s fitted by least squares to the points
    (ms[i], ys[i]) (the line through (1, y1)); 0.0 when every m is 1. Unclamped."""
    den = sum((m - 1) ** 2 for m in ms)
    if den == 0:
        return 0.0
    return sum((m - 1) * (m * y1 - y) for m, y in zip(ms, ys, strict=True)) / den


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
    fitted from whole steps of each m in `rows` (m > 1; 1 is `decode` itself), and a record of
    the fit: {"rows", "ctx", "step_j": {path: [J per step per m]}, "head_j", "fit_error": {path:
    largest |model - measured| / measured over the m}}. With no m > 1: `decode` unchanged
    (shared None) and an empty record. Units are joules (as the meter reads them)."""
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

    shared, steps, errs = [], {}, {}
    for m in ms:  # one cache per m, every path on it
        cache = noisy_cache(lean, m, ctx)
        for p in range(P):
            steps.setdefault(reg.names()[p], []).append(step_j(lean, meter, m, ctx, p, cache))
        say(f"  decode steps of {m} rows timed on every path")
        del cache
    for p, name in enumerate(reg.names()):
        js = steps[name]
        g = [(j - m * per_row - head_at(m)) / L for m, j in zip(ms, js, strict=True)]
        s = min(max(through_one(ms, g, u1[p]), 0.0), u1[p])
        shared.append(s)
        model = [m * per_row + head_at(m) + L * (s + m * (u1[p] - s)) for m in ms]
        errs[name] = max(abs(a - b) / b for a, b in zip(model, js, strict=True))
    record = {
        "rows": [1, *ms],
        "ctx": ctx,
        "step_j": steps,
        "head_j": heads,
        "fit_error": errs,
    }
    out = replace(decode, shared=[list(shared) for _ in range(L)], head_shared=hs)
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
