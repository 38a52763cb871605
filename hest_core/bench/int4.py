"""Decode on the fused layer with the four paths (issues 13 and 15): one run, every ratio against
a baseline measured in the same run.

    python -m hest_core.bench.int4 [--json results/bench_int4.json] [--repeats 7] [--context 512]

The default model as the engine builds it with `HEST_PATHS=fp16,int8,int4,skip` (`Engine._build`:
the shipped adapter's z merged into the 16-bit and int8 copies, the int4 copies on the GGUF's
Q4_1 blocks with the adapter's low-rank term beside them, `int4.DEFAULT_MODE`), bf16, torch's
threads, every row at position `--context` of its KV cache. Measured (medians of `--repeats`
samples, each an untimed call then two timed ones in a row, as a decode loop repeats its step;
the samples of all variants interleaved, so load from other jobs spreads over them alike; the
load average is printed before and after):

* `int4_vs_int8_decode_b1`: a whole decode step (`LeanModel.forward`: embedding, the fused
  layers, the lm_head) with every unit on int4, over the same on int8 (issue 13: <= 0.8);
  `..._layers_b1` the same for the fused layers alone.
* `mixed_vs_ideal_decode_b{1,8,16}`: the fused layers of a step whose rows draw a path per
  layer (the four paths with equal shares, seeded), over the ideal = per layer, the sum of each
  used path's time at its row count there (a path's time at n rows: the step with every row on
  it, / layers) (issue 15: <= 1.15).
* `fused_vs_loop_{path}_b{1,8,16}`: the whole step on the fused layer over the PyTorch loop
  (`FusedDecode.enabled = False`), every row on one path: what `native.FUSED_MAX_ROWS` rests on.
* `products_m{1,4,8,16}_ms`: the 120 layer products of a step (30 layers' own weights, so they
  come from memory as at decode) per kernel: gemv.c's bf16 and int8 loops, the AMX tiles (bf16,
  int8), q4.c, against oneDNN (prepacked bf16), `_weight_int8pack_mm` and W8A8 `_int_mm`.

`--threads 1` times one core (the OpenMP barriers of a 2-thread step stall for whole scheduler
slices when other jobs hold the cores: on a loaded machine only 1-thread figures mean much).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from .. import paths as reg
from ..config import RuntimeConfig
from ..exec import native
from ..exec.kvcache import SeqSlot
from ..exec.loading import DEFAULT_MODEL, fingerprint, load_hf_model
from ..exec.model import LeanModel
from ..exec.ops import rms_norm
from ..exec.quant import w8a8_matmul
from ..exec.routing import const_decider
from ..runtime.engine import Engine

FOUR = ("fp16", "int8", "int4", "skip")
BATCHES = (1, 8, 16)


def build(progress: bool = True) -> tuple[LeanModel, dict]:
    """The default model's LeanModel with the int4 copies, as the engine builds it."""
    reg.enable(FOUR)
    hf = load_hf_model("default", progress=progress)
    ad = Engine._resolve_adapter("default", DEFAULT_MODEL)
    cfg = RuntimeConfig.from_env()
    cpu = torch.device("cpu")
    lean, info = Engine._build(
        hf, fingerprint(hf), DEFAULT_MODEL, ad, cpu, torch.bfloat16, cfg, progress, False
    )
    return lean, {"adapter": None if ad is None else "default", **(info or {})}


class Step:
    """One decode step of `rows` rows at position `context` (all rows), callable repeatedly:
    `layers(decide)` times the fused layers alone, `full(decide)` the whole forward."""

    def __init__(self, lean: LeanModel, rows: int, context: int):
        self.lean, self.rows = lean, rows
        g = torch.Generator().manual_seed(rows)
        self.ids = torch.randint(0, lean.spec.vocab, (rows,), generator=g)
        self.pos = torch.full((rows,), context)
        self.slots = [SeqSlot(i, 1, i, context) for i in range(rows)]
        self.cache = lean.new_cache(rows, context + 1)
        self.x0 = lean.embed[self.ids].clone()
        self.h0 = rms_norm(self.x0, lean.layers[0].ln1, lean.spec.eps)

    def layers(self, decide) -> None:
        x, h = self.x0.clone(), self.h0.clone()
        self.lean.fused.forward(x, h, self.pos, self.slots, self.cache, decide)

    def full(self, decide, fused: bool = True) -> None:
        self.lean.fused.enabled = fused
        try:
            self.lean.forward(self.ids, self.pos, self.slots, self.cache, decide, True)
        finally:
            self.lean.fused.enabled = True


def plan(rows: int, n_layers: int, seed: int = 0) -> list[torch.Tensor]:
    """Per layer, a path index for every row: the four paths with equal shares, drawn."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, reg.n_paths(), (rows,), generator=g) for _ in range(n_layers)]


def plan_decider(p: list[torch.Tensor]):
    counts = [torch.bincount(q, minlength=reg.n_paths()).tolist() for q in p]

    def decide(li, h):
        return p[li], counts[li]

    return decide


def measure(variants: dict, repeats: int, inner: int = 2) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable. Each sample is one untimed call
    then `inner` timed ones in a row (the steady state of a decode loop, which repeats the same
    step: the weights it read last step may still be in the last-level cache); the samples of all
    variants interleaved round-robin, so load from other jobs spreads over them alike."""
    ts: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            fn()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            ts[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in ts.items()}


def variants(lean: LeanModel, context: int) -> tuple[dict, dict]:
    """The callables to time, and the mixed plans (batch -> per-layer path indices)."""
    L, idx = lean.spec.n_layers, {p: reg.index(p) for p in FOUR}
    steps = {b: Step(lean, b, context) for b in range(1, max(BATCHES) + 1)}
    plans = {b: plan(b, L, seed=b) for b in BATCHES}
    need = {int(n) for p in plans.values() for q in p for n in torch.bincount(q) if n > 0}
    v: dict = {}
    for name, i in idx.items():
        for n in sorted(need | set(BATCHES)):
            v[f"layers_{name}_{n}"] = lambda s=steps[n], i=i: s.layers(const_decider(i))
        for b in BATCHES:
            d = const_decider(i)
            v[f"full_{name}_b{b}"] = lambda s=steps[b], d=d: s.full(d)
            v[f"loop_{name}_b{b}"] = lambda s=steps[b], d=d: s.full(d, fused=False)
    for b, p in plans.items():
        v[f"layers_mix_b{b}"] = lambda s=steps[b], d=plan_decider(p): s.layers(d)
    return v, plans


W16 = {"qkv": "wqkv", "o": "wo", "gu": "wgu", "down": "wdown"}  # LayerWeights names


def _kernels(lean: LeanModel) -> dict:
    """name -> fn(layer weights, product name, x): one product on that kernel."""
    from ..exec import q4 as q4mod

    nat, k4, mm = native.get(), q4mod.get(), torch.ops.mkldnn._linear_pointwise
    assert nat is not None

    def i8(lw, n):
        return getattr(lw, n + "8")

    ks = {
        "bf16_gemv": lambda lw, n, x: nat.gemv16(x, getattr(lw, W16[n]), None),
        "bf16_onednn": lambda lw, n, x: mm(x, lw.packed[W16[n]], None, "none", [], ""),
        "int8_vnni": lambda lw, n, x: nat.gemv8(x, i8(lw, n).q, i8(lw, n).scale, None),
        "int8_woq_torch": lambda lw, n, x: torch.ops.aten._weight_int8pack_mm(
            x, i8(lw, n).q, i8(lw, n).scale_half
        ),
        "int8_w8a8": lambda lw, n, x: w8a8_matmul(x, i8(lw, n).q, i8(lw, n).scale),
    }
    if nat.amx:
        ks["bf16_amx"] = lambda lw, n, x: nat.gemv_amx(x, getattr(lw, W16[n]), None)
        ks["int8_amx"] = lambda lw, n, x: nat.gemv_amx(x, i8(lw, n).q, i8(lw, n).scale)
    if k4 is not None and lean.layers[0].qkv4 is not None:
        ks["q4"] = lambda lw, n, x: k4.gemv(x, getattr(lw, n + "4").w)
    return ks


def product_variants(lean: LeanModel, rows=(1, 4, 8, 16)) -> dict:
    """Callables doing the 120 products of one decode step on each kernel (module doc)."""
    s = lean.spec
    depth = {"qkv": s.hidden, "o": s.q_dim, "gu": s.hidden, "down": s.intermediate}
    v: dict = {}
    for m in rows:
        xs = {n: torch.randn(m, k, dtype=torch.bfloat16) for n, k in depth.items()}
        trip = [(lw, n, xs[n]) for lw in lean.layers for n in W16]
        for name, fn in _kernels(lean).items():
            v[f"p_{name}_m{m}"] = lambda fn=fn, trip=trip: [fn(*a) for a in trip]
    return v


def ratios(t: dict[str, float], plans: dict, n_layers: int) -> dict[str, tuple[float, str]]:
    """The reported ratios (value, target) from the medians `t`."""
    out = {
        "int4_vs_int8_decode_b1": (t["full_int4_b1"] / t["full_int8_b1"], "<= 0.8"),
        "int4_vs_int8_decode_layers_b1": (t["layers_int4_1"] / t["layers_int8_1"], "(report)"),
    }
    for b, p in plans.items():
        ideal = 0.0
        for q in p:
            for i, n in enumerate(torch.bincount(q, minlength=reg.n_paths()).tolist()):
                if n:
                    ideal += t[f"layers_{reg.get(i).name}_{n}"] / n_layers
        t[f"ideal_mix_b{b}"] = ideal
        out[f"mixed_vs_ideal_decode_b{b}"] = (t[f"layers_mix_b{b}"] / ideal, "<= 1.15")
    for name in FOUR:
        for b in BATCHES:
            r = t[f"full_{name}_b{b}"] / t[f"loop_{name}_b{b}"]
            out[f"fused_vs_loop_{name}_b{b}"] = (r, "(report: < 1 favours the fused layer)")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m hest_core.bench.int4", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--json", default="results/bench_int4.json")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--context", type=int, default=512, help="KV positions before the step")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    print(f"[bench_int4] load average {load0[0]:.2f}; building the model", flush=True)
    lean, info = build()
    if native.get() is None:
        raise SystemExit(f"the native kernels are off here ({native.status()}): nothing to time")
    v, plans = variants(lean, args.context)
    v |= product_variants(lean)
    print(f"[bench_int4] timing {len(v)} variants x {args.repeats}", flush=True)
    with torch.inference_mode():
        t = measure(v, args.repeats)
    rs = ratios(t, plans, lean.spec.n_layers)
    r = {
        "threads": torch.get_num_threads(),
        "native_kernels": native.status(),
        "int4": info,
        "context": args.context,
        "repeats": args.repeats,
        "load_avg_before": load0,
        "load_avg_after": os.getloadavg(),
        "times_ms": {k: v * 1e3 for k, v in sorted(t.items())},
        "ratios": {k: v for k, (v, _) in rs.items()},
        "targets": {k: tg for k, (_, tg) in rs.items()},
        "bench_s": time.perf_counter() - t0,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1))
    print(f"\n{'ratio':36s} {'value':>8s}  target")
    for k, (val, tg) in rs.items():
        print(f"{k:36s} {val:8.3f}  {tg}")
    print()
    for k in sorted(t):
        if k.startswith(("full_", "loop_", "ideal_", "layers_mix", "p_")):
            print(f"{k:36s} {t[k] * 1e3:8.2f} ms/step")
    print(f"\nload average before {load0[0]:.2f}, after {r['load_avg_after'][0]:.2f}")
    print(f"wrote {out} in {r['bench_s']:.0f} s")


if __name__ == "__main__":
    main()
