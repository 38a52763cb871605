"""The measurements of a calibration (`calibrate.py` runs them): timing windows of a meter, the
fixed costs from their kernels, the unit costs from whole forward passes with every unit on one
path, and the int8 kernel choice. Batched decode steps are `calib_rows.py`'s.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .. import paths as reg
from ..exec.model import LeanModel
from ..exec.ops import apply_rope, linear16, rms_norm
from ..exec.routing import const_decider
from .meters import EstimateMeter, Meter
from .model import PhaseCosts

# Scales every timing window. 1.0 for real tables; the test suite lowers it to measure the tiny
# models quickly (their tables are then noisier, which the repeat checks are there to catch).
WINDOW_SCALE = 1.0


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(
    fn, meter: Meter, dev: torch.device, min_s: float = 0.05, reps: int = 5
) -> tuple[float, float]:
    """(seconds, joules) per call over `reps` windows of >= min_s x WINDOW_SCALE each (and at
    least the meter's shortest meaningful window): the least time; the least estimated or the
    median measured J."""
    min_s = max(min_s * WINDOW_SCALE, meter.min_window_s)
    for _ in range(3):
        fn()
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(1, int(min_s / one))
    secs, joules = [], []
    for _ in range(reps):
        w = meter.begin()
        for _ in range(n):
            fn()
        _sync(dev)
        r = meter.end(w)
        secs.append(r.elapsed_s / n)
        joules.append(r.energy_j / n)
    if isinstance(meter, EstimateMeter):
        return min(secs), min(joules)  # time x watts: the fastest window is the least disturbed
    return min(secs), sorted(joules)[len(joules) // 2]  # a real counter's error has both signs


def _kernel_choice(lean: LeanModel, meter: Meter) -> dict:
    """Largest row count at which weight-only int8 beats W8A8 (0: W8A8 everywhere)."""
    lw = lean.layers[0]
    dev, res = lean.device, {}
    if dev.type != "cpu":
        return {"woq_max_rows": 0, "note": "weight-only int8 kernel is CPU-only here; W8A8 used"}
    best, contiguous = 0, True
    for m in (1, 2, 4, 8, 16):
        x = torch.randn(m, lean.spec.hidden, dtype=lean.dtype, device=dev)
        lw.gu8.woq_max_rows = 0
        t_a8, _ = measure(lambda x=x: lw.gu8(x), meter, dev)
        lw.gu8.woq_max_rows = 10**9
        t_wo, _ = measure(lambda x=x: lw.gu8(x), meter, dev)
        res[f"gate_up_m{m}_w8a8_s"] = t_a8
        res[f"gate_up_m{m}_woq_s"] = t_wo
        contiguous = contiguous and t_wo < t_a8
        if contiguous:
            best = m
    lw.gu8.woq_max_rows = 0
    res["woq_max_rows"] = best
    return res


def _phase(lean: LeanModel, meter: Meter, m: int, ctx: int | None) -> PhaseCosts:
    """Fixed costs from their kernels; unit costs from whole forward passes with every unit on
    one path, minus the fixed part (so per-layer overhead lands in the unit costs it belongs to)."""
    from ..adapter.controller import Controller

    s, lw, dev, dt = lean.spec, lean.layers[0], lean.device, lean.dtype
    decode = ctx is not None
    if decode and _fused_decode(lean, m):
        return _phase_fused_decode(lean, meter, m, ctx)
    x = torch.randn(m, s.hidden, dtype=dt, device=dev)
    ctl = Controller(s.hidden, s.n_layers).to(dev)
    beta = torch.zeros(m, device=dev)
    with torch.inference_mode():
        cos = lean.rope_cos[:m, None, :]
        sin = lean.rope_sin[:m, None, :]
        q = torch.randn(m, s.n_heads, s.head_dim, dtype=dt, device=dev)

        def fixed():
            h = rms_norm(x, lw.ln1, s.eps)
            ctl(h, 0, beta)
            apply_rope(q, cos, sin)
            h = h + x
            rms_norm(h, lw.ln2, s.eps)

        tok_fixed = measure(fixed, meter, dev)[1] / m * s.n_layers
        ids = torch.randint(0, s.vocab, (m,), device=dev)
        tok_fixed += measure(lambda: lean.embed[ids], meter, dev)[1] / m
        x1 = x[-1:]
        head = _head_j(lean, meter, x1)
        kvh, g = s.n_kv_heads, s.n_heads // s.n_kv_heads
        if not decode:  # causal attention over m tokens: m(m+1)/2 positions
            qq = torch.randn(1, s.n_heads, m, s.head_dim, dtype=dt, device=dev)
            kk = torch.randn(1, kvh, m, s.head_dim, dtype=dt, device=dev)
            j = measure(
                lambda: F.scaled_dot_product_attention(qq, kk, kk, is_causal=True, enable_gqa=True),
                meter,
                dev,
            )[1]
            attn = j / (m * (m + 1) / 2) * s.n_layers
            fixed_total = m * tok_fixed + attn * m * (m + 1) / 2 + head
        else:  # one query row's attention: cost grows with the context
            js = []
            for c in (64, ctx):
                qq = torch.randn(1, kvh, g, s.head_dim, dtype=dt, device=dev)
                kk = torch.randn(1, kvh, c, s.head_dim, dtype=dt, device=dev)
                js.append(
                    measure(
                        lambda qq=qq, kk=kk: F.scaled_dot_product_attention(qq, kk, kk), meter, dev
                    )[1]
                )
            attn = max(0.0, (js[1] - js[0]) / (ctx - 64)) * s.n_layers
            tok_fixed += max(0.0, js[0] - attn / s.n_layers * 64) * s.n_layers
            fixed_total = tok_fixed + attn * ctx + head
        # whole forward passes, one path everywhere (every registered path)
        u = [
            max(_forward_j(lean, meter, m, ctx, p) - fixed_total, 0.0) / (m * s.n_layers)
            for p in range(reg.n_paths())
        ]
    return _phase_costs(s.n_layers, u, tok_fixed, attn, head)


def _fused_decode(lean: LeanModel, m: int) -> bool:
    """Whether a decode step of m rows runs through the fused native layer here."""
    fused = getattr(lean, "fused", None)
    if fused is None:
        return False
    return fused.usable(torch.zeros(m, dtype=torch.long), lean.new_cache(m, 2))


def _phase_fused_decode(lean: LeanModel, meter: Meter, m: int, ctx: int) -> PhaseCosts:
    """Decode through the fused layer: norms, rope, attention and residuals run inside each
    layer's one native call and cannot be timed apart from it. So attention per position is the
    slope of whole skip-path steps over five contexts; the token's fixed part is the embedding plus
    what the runtime runs beside the layers (the C controller at batch 1); the head is timed on
    its own; the norms, rope and residuals land in the unit costs (every path pays them)."""
    from ..adapter.controller import Controller
    from ..adapter.native_controller import NativeController

    s, dev, dt = lean.spec, lean.device, lean.dtype
    with torch.inference_mode():
        ids = torch.randint(0, s.vocab, (m,), device=dev)
        tok_fixed = measure(lambda: lean.embed[ids], meter, dev)[1] / m
        nctl = NativeController.of(Controller(s.hidden, s.n_layers), 0.0) if m == 1 else None
        if nctl is not None:
            h = torch.randn(1, s.hidden, dtype=dt)
            tok_fixed += measure(
                lambda: [nctl.logits(li, h) for li in range(s.n_layers)], meter, dev
            )[1]
        x1 = torch.randn(1, s.hidden, dtype=dt, device=dev)
        head = _head_j(lean, meter, x1)
    # attention per position: least-squares slope of skip steps over five contexts (skip
    # steps are mostly attention, so the slope is the least disturbed by weight traffic)
    cs = [64 + i * (ctx - 64) // 4 for i in range(5)]
    js = [_forward_j(lean, meter, m, c, reg.lightest()) for c in cs]
    cm, jm = sum(cs) / 5, sum(js) / 5
    slope = sum((c - cm) * (j - jm) for c, j in zip(cs, js, strict=True))
    attn = max(0.0, slope / sum((c - cm) ** 2 for c in cs) / m)
    full = [_forward_j(lean, meter, m, ctx, p) for p in range(reg.n_paths())]
    fixed_total = m * (tok_fixed + attn * ctx) + head
    u = [max(j - fixed_total, 0.0) / (m * s.n_layers) for j in full]
    return _phase_costs(s.n_layers, u, tok_fixed, attn, head)


def _head_j(lean: LeanModel, meter: Meter, x1: torch.Tensor) -> float:
    """The final norm and lm_head for one row, through the same kernel the forward pass uses."""
    s = lean.spec
    return measure(
        lambda: linear16(rms_norm(x1, lean.norm, s.eps), lean.lm_head, lean.lm_head_packed),
        meter,
        lean.device,
    )[1]


def _forward_j(lean: LeanModel, meter: Meter, m: int, ctx: int | None, path: int) -> float:
    """Joules of one whole forward pass (embedding, every layer on `path`, the head): m prompt
    rows from position 0, or (ctx given) one decode step of m rows at context ctx."""
    from ..exec.kvcache import SeqSlot

    s, dev = lean.spec, lean.device
    decode = ctx is not None
    cache = lean.new_cache(1, (ctx or m) + 1)
    for t in cache.k + cache.v:
        t.normal_()
    pos0 = ctx - 1 if decode else 0
    slots = [SeqSlot(row0=0, n=m, cache_row=0, pos0=pos0)]
    tok = torch.randint(0, s.vocab, (m,), device=dev)
    positions = torch.arange(pos0, pos0 + m, device=dev)
    last = torch.tensor([m - 1], device=dev)
    dec = const_decider(path)
    with torch.inference_mode():
        return measure(
            lambda: lean.forward(tok, positions, slots, cache, dec, decode, last),
            meter,
            dev,
            min_s=0.15,
            reps=7,
        )[1]


def _phase_costs(n_layers: int, u: list[float], tok_fixed: float, attn: float, head: float):
    for p in reg.PATHS:  # skip's work is a subset of int8's: timing noise must not invert them
        if p.calib_cap is not None:
            u[p.index] = min(u[p.index], u[reg.index(p.calib_cap)])
    floor = max(1e-3 * max(u), 1e-9)
    u = [max(v, floor) for v in u]  # a unit is never free (noise can eat a tiny model's units)
    return PhaseCosts(
        unit=[list(u) for _ in range(n_layers)],
        token_fixed=tok_fixed,
        attn_ctx=attn,
        head=head,
    )
