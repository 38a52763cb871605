"""Per-device calibration: time each kernel here, times the power a meter reads (or a nominal
wattage where no meter exists), into a table of joules per unit of work.

    python -m hest_core.calibrate [--model default] [--out PATH] [--watts 30]

All layers of a Llama-layout model have the same shapes, so one layer's kernels are timed and
the cost is used for every layer (the table still has a row per layer, so a per-layer
measurement can replace it). Decode costs are measured at batch 1 (the most expensive per token;
batched decode costs less, so the model stays conservative).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import native
from .dtypes import dtype_name
from .energy import CalibrationTable, PhaseCosts
from .meters import EstimateMeter, Meter, pick_meter
from .model import LeanModel, apply_rope, const_decider, linear16, rms_norm
from .paths import cache_dir

PACKAGED = Path(__file__).parent / "calibration"
PREFILL_T = 256
DECODE_CTX = 576


def device_key(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]


def table_name(fp: str, lean: LeanModel) -> str:
    threads = torch.get_num_threads() if lean.device.type == "cpu" else 0
    # the native decode kernels change the costs: tables with and without them are apart
    nat = "-native" if lean.device.type == "cpu" and native.get() is not None else ""
    return f"{fp}-{device_key(lean.device)}-{dtype_name(lean.dtype)}-{threads}t{nat}.json"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(
    fn, meter: Meter, dev: torch.device, min_s: float = 0.05, reps: int = 5
) -> tuple[float, float]:
    """(seconds, joules) per call over `reps` windows of >= min_s each (and at least the meter's
    shortest meaningful window): the least time; the least estimated or the median measured J."""
    min_s = max(min_s, meter.min_window_s)
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


def apply_kernel_choices(lean: LeanModel, table: CalibrationTable) -> None:
    rows = int(table.kernels.get("woq_max_rows", 0))
    for lw in lean.layers:
        for m in lw.int8_linears():
            m.woq_max_rows = rows


def _phase(lean: LeanModel, meter: Meter, m: int, ctx: int | None) -> PhaseCosts:
    """Fixed costs from their kernels; unit costs from whole forward passes with every unit on
    one path, minus the fixed part (so per-layer overhead lands in the unit costs it belongs to)."""
    from .controller import Controller

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
        # whole forward passes, one path everywhere
        u = [
            max(_forward_j(lean, meter, m, ctx, p) - fixed_total, 0.0) / (m * s.n_layers)
            for p in range(3)
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
    from .controller import Controller
    from .fused import NativeController

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
    js = [_forward_j(lean, meter, m, c, 2) for c in cs]
    cm, jm = sum(cs) / 5, sum(js) / 5
    slope = sum((c - cm) * (j - jm) for c, j in zip(cs, js, strict=True))
    attn = max(0.0, slope / sum((c - cm) ** 2 for c in cs) / m)
    full = [_forward_j(lean, meter, m, ctx, p) for p in range(3)]
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
    from .model import SeqSlot

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
    u[2] = min(u[2], u[1])  # skip's work is a subset of int8's: timing noise must not invert them
    floor = max(1e-3 * max(u), 1e-9)
    u = [max(v, floor) for v in u]  # a unit is never free (noise can eat a tiny model's units)
    return PhaseCosts(
        unit=[list(u) for _ in range(n_layers)],
        token_fixed=tok_fixed,
        attn_ctx=attn,
        head=head,
    )


def _load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return -1.0


def _sanity(prefill: PhaseCosts, decode: PhaseCosts) -> list[str]:
    """Physical orderings a calibration should show; a busy machine can break them."""
    out = []
    for name, c in (("prefill", prefill), ("decode", decode)):
        f, i, s = c.unit[0]
        if not f >= i >= s:
            out.append(
                f"{name} unit costs are not ordered fp16 >= int8 >= skip ({f:.3g}, {i:.3g}, {s:.3g} J): "
                "int8 is not cheaper here, or the machine was busy; rerun `python -m hest_core.calibrate` "
                "on a quiet machine"
            )
    load, cores = _load_avg(), os.cpu_count() or 1
    if load > 0.75 * cores:
        out.append(
            f"load average {load:.1f} on {cores} cores while calibrating: timings are disturbed"
        )
    return out


def calibrate(
    lean: LeanModel, fp: str, meter: Meter | None = None, progress: bool = True
) -> CalibrationTable:
    meter = meter or pick_meter(lean.device.type)
    if progress:
        print(
            f"[hest] calibrating energy costs on {device_key(lean.device)} with {meter.describe()}",
            flush=True,
        )
    t0 = time.perf_counter()
    kernels = _kernel_choice(lean, meter)
    dummy = CalibrationTable("", "", 0, "", "", "", "", "", 0, None, None, kernels)  # type: ignore[arg-type]
    apply_kernel_choices(lean, dummy)
    prefill = _phase(lean, meter, min(PREFILL_T, lean.rope_cos.shape[0]), None)
    decode = _phase(lean, meter, 1, DECODE_CTX)
    kernels["load_avg_1m"] = round(_load_avg(), 2)
    kernels["warnings"] = _sanity(prefill, decode)
    for w in kernels["warnings"]:
        print(f"[hest] warning: {w}", flush=True)
    method = meter.describe()
    if isinstance(meter, EstimateMeter):
        method = f"estimate: kernel time x nominal {meter.watts:g} W"
    kernels["calibration_s"] = round(time.perf_counter() - t0, 2)
    if progress:
        print(f"[hest] calibrated in {kernels['calibration_s']} s", flush=True)
    return CalibrationTable(
        model=lean.spec.name,
        model_fingerprint=fp,
        n_layers=lean.spec.n_layers,
        device=device_key(lean.device),
        method=method,
        meter=meter.name,
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        dtype=dtype_name(lean.dtype),
        threads=torch.get_num_threads() if lean.device.type == "cpu" else 0,
        prefill=prefill,
        decode=decode,
        kernels=kernels,
    )


def resolve(
    lean: LeanModel, fp: str, path, meter: Meter, progress: bool = True
) -> CalibrationTable:
    """An explicit table, else this device's cached or packaged one, else calibrate now and cache."""
    if path is not None:
        return CalibrationTable.load(path)
    name = table_name(fp, lean)
    for p in (cache_dir() / "calibration" / name, PACKAGED / name):
        if p.is_file():
            return CalibrationTable.load(p)
    table = calibrate(lean, fp, meter, progress)
    out = cache_dir() / "calibration" / name
    table.save(out)
    table.source = str(out)
    return table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m hest_core.calibrate", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--meter", default=None, choices=["nvml", "rapl", "estimate"])
    ap.add_argument(
        "--watts", type=float, default=None, help="nominal watts for the estimate meter"
    )
    ap.add_argument("--out", default=None, help="where to write the table (default: the cache)")
    ap.add_argument(
        "--package",
        action="store_true",
        help="write into hest_core/calibration/ (ships with the code)",
    )
    args = ap.parse_args(argv)
    from .dtypes import resolve_device, resolve_dtype
    from .loading import build_lean, fingerprint, load_hf_model

    dev = resolve_device(args.device)
    hf = load_hf_model(args.model)
    fp = fingerprint(hf)
    lean = build_lean(hf, resolve_dtype("auto", dev), dev, max_positions=4096)
    meter = (
        EstimateMeter(args.watts)
        if args.meter == "estimate" or args.watts
        else pick_meter(dev.type, args.meter)
    )
    table = calibrate(lean, fp, meter)
    name = table_name(fp, lean)
    out = (
        Path(args.out)
        if args.out
        else (PACKAGED if args.package else cache_dir() / "calibration") / name
    )
    table.save(out)
    s = lean.spec
    for ph in ("prefill", "decode"):
        c = getattr(table, ph)
        u = c.unit[0]
        print(
            f"{ph:8s} per token, all layers: fp16 {u[0] * s.n_layers:.4g} J  int8 {u[1] * s.n_layers:.4g} J  "
            f"skip {u[2] * s.n_layers:.4g} J  fixed {c.token_fixed:.4g} J  attn/pos {c.attn_ctx:.3g} J  head {c.head:.4g} J"
        )
    print(f"kernel choice: weight-only int8 up to {table.kernels['woq_max_rows']} rows, W8A8 above")
    print(f"wrote {out} ({table.method})")


if __name__ == "__main__":
    main()
