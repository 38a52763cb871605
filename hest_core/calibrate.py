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
import logging
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import calib_check, native
from . import paths as reg
from .config import RuntimeConfig
from .dtypes import dtype_name
from .energy import CalibrationTable, PhaseCosts
from .meters import EstimateMeter, Meter, pick_meter
from .model import LeanModel, apply_rope, const_decider, linear16, rms_norm

log = logging.getLogger("hest.calibrate")

PACKAGED = Path(__file__).parent / "calibration"
PREFILL_T = 256
# Scales every timing window. 1.0 for real tables; the test suite lowers it to measure the tiny
# models quickly (their tables are then noisier, which the repeat checks are there to catch).
WINDOW_SCALE = 1.0
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
    # opt-in paths (int4) add columns: their tables are apart from the built-in three's
    extra = "".join(f"-{n}" for n in reg.names()[len(reg.BUILTIN_NAMES) :])
    return f"{fp}-{device_key(lean.device)}-{dtype_name(lean.dtype)}-{threads}t{nat}{extra}.json"


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


def _load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return -1.0


def _sanity(prefill: PhaseCosts, decode: PhaseCosts) -> list[str]:
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
    lean: LeanModel,
    fp: str,
    meter: Meter | None = None,
    progress: bool = True,
    repeats: int | None = None,
    max_repeats: int | None = None,
) -> CalibrationTable:
    """Measure this device's table in repeats until `repeats` consecutive ones pass
    `calib_check.problems` and agree (`calib_check.disagreements`), at most `max_repeats`; returns
    their median with `kernels["settled"] = True`. When they never settle: the median of every
    repeat with `kernels["settled"] = False` and the reasons in `kernels["unsettled"]` (resolve()
    then caches nothing). Each repeat takes ~6 s on the default model at 2 threads."""
    if meter is None:
        cfg = RuntimeConfig.from_env()
        meter = pick_meter(lean.device.type, cfg.meter, cfg.nominal_watts)
    repeats = calib_check.REPEATS if repeats is None else repeats
    max_repeats = calib_check.MAX_REPEATS if max_repeats is None else max_repeats
    say = (lambda msg: print(f"[hest] {msg}", flush=True)) if progress else (lambda msg: None)
    say(f"calibrating energy costs on {device_key(lean.device)} with {meter.describe()}")
    t0 = time.perf_counter()
    kernels = _kernel_choice(lean, meter)
    dummy = CalibrationTable("", "", 0, "", "", "", "", "", 0, None, None, kernels)  # type: ignore[arg-type]
    apply_kernel_choices(lean, dummy)
    tables: list[CalibrationTable] = []
    settled = None
    while settled is None and len(tables) < max(repeats, max_repeats):
        tables.append(_measure_once(lean, fp, meter, kernels))
        bad = calib_check.problems(tables[-1])
        say(f"calibration repeat {len(tables)}: " + ("; ".join(bad) if bad else "ok"))
        settled = calib_check.settle(tables, repeats)
    table = settled or calib_check.median_table(tables)
    k = table.kernels
    k["settled"], k["repeats"] = settled is not None, len(tables)
    if settled is None:
        last = tables[-repeats:]
        k["unsettled"] = [p for t in last for p in calib_check.problems(t)]
        k["unsettled"] += calib_check.disagreements(last)
    k["load_avg_1m"] = round(_load_avg(), 2)
    k["warnings"] = _sanity(table.prefill, table.decode)
    for w in k["warnings"]:
        say(f"warning: {w}")
    k["calibration_s"] = round(time.perf_counter() - t0, 2)
    state = "settled" if settled is not None else "did NOT settle"
    say(f"calibration {state} after {len(tables)} repeats in {k['calibration_s']} s")
    return table


def _measure_once(lean: LeanModel, fp: str, meter: Meter, kernels: dict) -> CalibrationTable:
    """One measurement of every cost (no checks)."""
    prefill = _phase(lean, meter, min(PREFILL_T, lean.rope_cos.shape[0]), None)
    decode = _phase(lean, meter, 1, min(DECODE_CTX, lean.rope_cos.shape[0] - 1))
    method = meter.describe()
    if isinstance(meter, EstimateMeter):
        method = f"estimate: kernel time x nominal {meter.watts:g} W"
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
        kernels=dict(kernels),
    )


def resolve(
    lean: LeanModel,
    fp: str,
    path,
    meter: Meter,
    progress: bool = True,
    config: RuntimeConfig | None = None,
) -> CalibrationTable:
    """The table this engine runs under, in this order:

    1. `path` (or `config.calibration`, $HEST_CALIBRATION; config None: from the environment,
       as is the cache directory): a table file, or a directory searched for this device's
       table name and then `<fingerprint>.json` (a table for this model from any device);
    2. this device's cached table, unless it fails `calib_check.problems` (then it is set aside
       as `*.rejected` and measured again);
    3. the table packaged for this device;
    4. measured now in repeats (`calibrate`) and cached only if the repeats settled; if they did
       not, the packaged table of this CPU family where one exists, else the unsettled
       measurement for this process only. Nothing unsettled is ever cached.

    Raises CalibrationError for an explicit table file that cannot be read."""
    name = table_name(fp, lean)
    cfg = config or RuntimeConfig.from_env()
    path = path or cfg.calibration
    if path is not None:
        p = Path(path)
        if not p.is_dir():
            return CalibrationTable.load(p)
        for cand in (p / name, p / f"{fp}.json"):
            if cand.is_file():
                return CalibrationTable.load(cand)
    cached = cfg.cache_dir / "calibration" / name
    if cached.is_file():
        table = CalibrationTable.load(cached)
        bad = calib_check.problems(table)
        if not bad:
            return table
        log.warning("cached calibration %s fails its checks (%s): measuring again", cached, bad)
        cached.replace(cached.with_suffix(".rejected"))
    if (PACKAGED / name).is_file():
        return CalibrationTable.load(PACKAGED / name)
    table = calibrate(lean, fp, meter, progress)
    if table.kernels.get("settled"):
        table.save(cached)
        table.source = str(cached)
        return table
    why = "; ".join(table.kernels.get("unsettled", [])) or "repeats disagree"
    family = packaged_family(fp, lean)
    if family is not None:
        log.warning(
            "this machine's calibration did not settle (%s); using the packaged table for this "
            "CPU family, %s, and caching nothing. Run `make calibrate` on a quiet machine",
            why,
            family.name,
        )
        return CalibrationTable.load(family)
    log.warning(
        "this machine's calibration did not settle (%s) and no packaged table fits this CPU "
        "family: using the measurement for this process only, caching nothing. Run "
        "`make calibrate` on a quiet machine",
        why,
    )
    table.source = "measured at start (did not settle; not cached)"
    return table


def packaged_family(fp: str, lean: LeanModel) -> Path | None:
    """A packaged table for this model, dtype, threads and kernels from a CPU of the same vendor
    (e.g. another Intel Xeon), or None."""
    name = table_name(fp, lean)
    dev = device_key(lean.device)
    suffix = name[len(fp) + 1 + len(dev) :]
    vendor = dev.split("-")[0]
    for p in sorted(PACKAGED.glob(f"{fp}-{vendor}-*{suffix}")):
        if p.name.endswith(suffix) and p.name[len(fp) + 1 : -len(suffix)].split("-")[0] == vendor:
            return p
    return None


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
    ap.add_argument(
        "--force", action="store_true", help="write the table even if its repeats did not settle"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=calib_check.REPEATS,
        help="consecutive repeats that must agree (default %(default)s)",
    )
    ap.add_argument(
        "--max-repeats",
        type=int,
        default=calib_check.MAX_REPEATS,
        help="repeats measured at most before giving up (default %(default)s)",
    )
    ap.add_argument(
        "--window-scale",
        type=float,
        default=1.0,
        help="scale every timing window (below 1: faster and noisier; tests use 0.2)",
    )
    args = ap.parse_args(argv)
    global WINDOW_SCALE
    WINDOW_SCALE = args.window_scale
    from .dtypes import resolve_device, resolve_dtype
    from .loading import build_lean, fingerprint, load_hf_model

    cfg = (
        RuntimeConfig.from_env()
    )  # this command's boundary: HEST_METER, _NOMINAL_WATTS, _CACHE_DIR
    dev = resolve_device(args.device)
    reg.enable(cfg.paths)  # HEST_PATHS: opt-in paths are measured too
    hf = load_hf_model(args.model, config=cfg)
    fp = fingerprint(hf)
    lean = build_lean(hf, resolve_dtype("auto", dev), dev, max_positions=4096)
    if reg.find("int4") is not None:
        from .int4 import attach_for_model

        attach_for_model(lean, hf, args.model)  # the base weights' blocks (tables hold no z)
    meter = (
        EstimateMeter(args.watts or cfg.nominal_watts)
        if args.meter == "estimate" or args.watts
        else pick_meter(dev.type, args.meter or cfg.meter, cfg.nominal_watts)
    )
    table = calibrate(lean, fp, meter, repeats=args.repeats, max_repeats=args.max_repeats)
    name = table_name(fp, lean)
    out = (
        Path(args.out)
        if args.out
        else (PACKAGED if args.package else cfg.cache_dir / "calibration") / name
    )
    if not table.kernels.get("settled") and not args.force:
        raise SystemExit(
            f"the calibration did not settle after {table.kernels['repeats']} repeats "
            f"({'; '.join(table.kernels.get('unsettled', []))}): nothing written. Rerun on a "
            "quiet machine, or pass --force to write it anyway"
        )
    table.save(out)
    s = lean.spec
    for ph in ("prefill", "decode"):
        c = getattr(table, ph)
        units = "  ".join(f"{p.name} {c.unit[0][p.index] * s.n_layers:.4g} J" for p in reg.PATHS)
        print(
            f"{ph:8s} per token, all layers: {units}  fixed {c.token_fixed:.4g} J  "
            f"attn/pos {c.attn_ctx:.3g} J  head {c.head:.4g} J"
        )
    print(f"kernel choice: weight-only int8 up to {table.kernels['woq_max_rows']} rows, W8A8 above")
    print(f"wrote {out} ({table.method})")


if __name__ == "__main__":
    main()
