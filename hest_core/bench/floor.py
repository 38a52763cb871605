"""The int4 path's decode at batch 1 against its bandwidth floor (issue 13), and where a step's
time goes. One run, every figure measured in it.

    python -m hest_core.bench.floor [--json results/bench_floor.json] [--tokens 64]
        [--repeats 5] [--threads N] [--profile-steps 40]

The ratio (`int4_decode_vs_bandwidth_floor_b1`, target <= 1.5):

    engine decode ms per token, batch 1, on the `int4` policy
    / (bytes the int4 path reads per token / measured memory bandwidth)

* numerator: `Engine.generate` on the default model with the shipped adapter, `policy="int4"`,
  one request (the first article of `--article`, 64 new tokens, end of text off), the decode
  phase's seconds over its tokens after the first (as `python -m hest_core.bench` times fp16).
  It is the whole engine: 30 fused layers, the lm_head, the embedding, greedy choice, the
  request's bookkeeping.
* bytes per token: what a batch-1 int4 step must read once: the 210 Q4_1 weights as packed
  (20 bytes per 32 weights, scales included), any low-rank terms beside them, the lm_head as the
  step runs it (the model's Q8_0 blocks, 34 bytes per 32 weights, where attached; else bf16),
  the norms and the one embedding row. The KV cache the step also reads grows with the context:
  it is printed apart and in a second ratio (`..._with_kv`), not in the headline one.
* bandwidth: a plain streaming read of 2 GiB (64-byte loads, no prefetch: q4.c's
  `hest_q4_stream_read`) on the same threads, median of 3, read just before each request (this
  host's speed drifts minute to minute, so each request is divided by the bandwidth measured
  beside it); the ratio is the median over `--repeats` such pairs. CPU model and threads printed.
* the same ratio on session 9's kernels (`..._session9_kernels`): each repeat also runs one
  request with decode attention at runtime shapes (a `-DHEST_ATT_GENERIC` build) and the bf16
  lm_head, which is what this engine ran before; same bytes counted, so the two compare.

Then the profile of a batch-1 int4 step at the request's context (`Step` of bench/int4.py, the
decode loop's steady state): the fused layers, the lm_head, the rest of `LeanModel.forward`, and
inside the layers (a `-DHEST_PROFILE` build of the same kernels: native.profiling) the wall time
of each step of a layer call summed over the 30 layers, so the products (the weight stream) stand
apart from attention, norms, rope, the region's fork/join and Python between calls.
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
from ..dtypes import cpu_model_name
from ..exec import native, q4
from ..exec.routing import const_decider
from ..runtime.engine import Engine, GenerationRequest
from .int4 import FOUR, Step

PRODUCTS = ("qkv", "o", "gate_up", "down")


def bandwidth(threads: int, repeats: int, buf: torch.Tensor) -> float:
    """Bytes/s of a plain streaming read of `buf` (2 GiB: far past any cache) on `threads`
    threads, the median of `repeats`."""
    k4 = q4.get()
    if k4 is None:
        raise SystemExit(f"[bench_floor] the int4 kernel is {q4.status()}: no floor to measure")
    k4.stream_read(buf, threads)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        k4.stream_read(buf, threads)
        ts.append(time.perf_counter() - t0)
    return buf.numel() / statistics.median(ts)


def bytes_per_token(lean) -> dict[str, int]:
    """What a batch-1 int4 decode step reads once (module doc), by part."""
    pb = lean.param_bytes()
    low = 0
    for lw in lean.layers:
        for m in (lw.qkv4, lw.o4, lw.gu4, lw.down4):
            if m is not None and m.low is not None:
                low += (m.low.a.numel() + m.low.b.numel()) * 2
    norms = sum(lw.ln1.numel() + lw.ln2.numel() for lw in lean.layers) * 2 + lean.norm.numel() * 2
    head = pb["lm_head_q8"] or pb["lm_head"]
    return {
        "q4_weights": pb["int4"],
        "low_rank": low,
        "lm_head": head,
        "norms_and_embedding_row": norms + lean.spec.hidden * 2,
    }


def kv_bytes(lean, context: int) -> int:
    """Bytes of K and V a decode step at `context` positions reads (every layer, bf16)."""
    s = lean.spec
    return 2 * s.n_layers * s.n_kv_heads * context * s.head_dim * 2


def _request_s(eng: Engine, req: GenerationRequest) -> tuple[float, int]:
    """(decode seconds per token after the first, prompt tokens) of one request."""
    st = eng.generate([req])[0].stats
    return st.decode_s / (st.completion_tokens - 1), st.prompt_tokens


def engine_decode(eng: Engine, text: str, tokens: int, repeats: int, threads: int) -> dict:
    """Per repeat, in this order: a 2 GiB streaming read (3 samples, median), a request on the
    current kernels, a request on session 9's (attention at runtime shapes, -DHEST_ATT_GENERIC,
    and the bf16 lm_head): batch-1 decode seconds per token, the bandwidth beside them."""
    saved, eng.eos_ids, q8 = eng.eos_ids, set(), eng.lean.head_q8
    req = GenerationRequest(text, energy_budget_ratio=1.0, max_new_tokens=tokens, clean_end=False)
    out: dict[str, list[float]] = {"bw": [], "now": [], "before": []}
    buf = torch.ones(2**31, dtype=torch.uint8)
    try:
        _request_s(eng, req)  # warm-up
        for _ in range(repeats):
            out["bw"].append(bandwidth(threads, 3, buf))
            now, prompt = _request_s(eng, req)
            out["now"].append(now)
            with native.variant(["-DHEST_ATT_GENERIC"], "gemv-att-generic"):
                eng.lean.head_q8 = None
                out["before"].append(_request_s(eng, req)[0])
                eng.lean.head_q8 = q8
    finally:
        eng.eos_ids, eng.lean.head_q8 = saved, q8
    return {"prompt": prompt, **out}


def _step_split(lean, step: Step, decide, n: int) -> dict[str, float]:
    """Median seconds of the pieces of `n` consecutive whole steps (as LeanModel.forward runs
    them: the embedding and first norm, the fused layers, the lm_head)."""
    pc, ts = time.perf_counter, {"embed_norm": [], "layers": [], "head": [], "step": []}
    from ..exec.ops import rms_norm

    with torch.inference_mode():
        for _ in range(n + 2):
            t0 = pc()
            x = lean.embed[step.ids]
            h = rms_norm(x, lean.layers[0].ln1, lean.spec.eps)
            t1 = pc()
            lean.fused.usable(step.ids, step.cache)
            lean.fused.forward(x, h, step.pos, step.slots, step.cache, decide)
            t2 = pc()
            lean.logits(h)
            t3 = pc()
            for k, v in zip(ts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                ts[k].append(v)
    return {k: statistics.median(v[2:]) for k, v in ts.items()}


def head_ab(lean, step: Step, decide, n: int) -> dict[str, float]:
    """Whole steps with the lm_head on its Q8_0 blocks and on the bf16 copy (the same logits),
    alternating step by step: ms per step, medians (what the Q8_0 head is worth here)."""
    q8 = lean.head_q8
    if q8 is None:
        return {}
    ts: dict[str, list[float]] = {"head_q8": [], "head_bf16": []}
    try:
        with torch.inference_mode():
            for i in range(2 * n + 4):
                name = "head_q8" if i % 2 else "head_bf16"
                lean.head_q8 = q8 if i % 2 else None
                t0 = time.perf_counter()
                step.full(decide)
                ts[name].append(time.perf_counter() - t0)
    finally:
        lean.head_q8 = q8
    return {f"step_{k}_ms": statistics.median(v[2:]) * 1e3 for k, v in ts.items()}


def profile(lean, context: int, steps: int) -> dict:
    """Where a batch-1 int4 step's time goes (module doc): ms per step."""
    step = Step(lean, 1, context)
    decide = const_decider(reg.index("int4"))
    out = {f"{k}_ms": v * 1e3 for k, v in _step_split(lean, step, decide, steps).items()}
    out |= head_ab(lean, step, decide, steps)
    with native.profiling() as prof:
        if prof is None:
            return out
        _step_split(lean, step, decide, 2)  # warm the profiling build
        for i in range(len(prof)):
            prof[i] = 0.0
        x, h, wall = step.x0.clone(), step.h0.clone(), 0.0
        with torch.inference_mode():
            for _ in range(steps):
                t0 = time.perf_counter()
                lean.fused.forward(x, h, step.pos, step.slots, step.cache, decide)
                wall += time.perf_counter() - t0
        per = {k: prof[i] / steps * 1e3 for i, k in enumerate(native.PROF_STEPS)}
    out["profiled_layers_ms"] = wall / steps * 1e3  # means, as the timers' sums
    out["layer_steps_ms"] = per
    out["products_ms"] = sum(per[k] for k in PRODUCTS)
    out["python_between_calls_ms"] = max(0.0, out["profiled_layers_ms"] - sum(per.values()))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m hest_core.bench.floor", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--json", default="results/bench_floor.json")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default: torch's")
    ap.add_argument("--profile-steps", type=int, default=40)
    ap.add_argument("--article", default="../shared/data/cnndm/test.jsonl")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    text = json.loads(Path(args.article).read_text().splitlines()[0])["article"]
    r: dict = {"cpu": cpu_model_name(), "threads": threads, "load_before": os.getloadavg()}
    r["date"] = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    print(f"[bench_floor] {r['cpu']}, {threads} threads; loading the int4 engine", flush=True)
    eng = Engine.from_pretrained("default", policy="int4", paths=FOUR, progress=False)
    r["native_kernels"], r["int4"] = native.status(), eng.info().get("int4")
    print("[bench_floor] engine decode at batch 1, beside 2 GiB streaming reads", flush=True)
    d = engine_decode(eng, text, args.tokens, args.repeats, threads)
    r["prompt_tokens"], r["context"] = d["prompt"], d["prompt"] + args.tokens // 2
    print("[bench_floor] profile of a step", flush=True)
    r["profile"] = profile(eng.lean, r["context"], args.profile_steps)
    parts = bytes_per_token(eng.lean)
    nbytes, kv = sum(parts.values()), kv_bytes(eng.lean, r["context"])
    r |= {"bytes_per_token": parts, "bytes_per_token_total": nbytes, "kv_bytes_mid": kv}
    r["samples"] = d
    med = statistics.median
    r["bandwidth_gb_s"] = med(d["bw"]) / 1e9
    r["decode_int4_b1_ms"] = med(d["now"]) * 1e3
    r["decode_int4_b1_session9_kernels_ms"] = med(d["before"]) * 1e3
    r["floor_ms"] = nbytes / med(d["bw"]) * 1e3
    # per repeat: decode over the floor at the bandwidth read just before it; the median
    for key, name in (("now", ""), ("before", "_session9_kernels")):
        ratios = [t * bw / nbytes for t, bw in zip(d[key], d["bw"], strict=True)]
        r[f"int4_decode_vs_bandwidth_floor_b1{name}"] = med(ratios)
    kv_ratios = [t * bw / (nbytes + kv) for t, bw in zip(d["now"], d["bw"], strict=True)]
    r["int4_decode_vs_bandwidth_floor_b1_with_kv"] = med(kv_ratios)
    r["load_after"] = os.getloadavg()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1))
    report(r)
    print(f"wrote {out}")


def report(r: dict) -> None:
    """Print the ratio, what its floor is made of, and the profile."""
    bp, mb = r["bytes_per_token"], 1e6
    print(f"\n{r['cpu']} | {r['threads']} threads | {r['date']} | load "
          f"{r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}")  # fmt: skip
    print(f"bytes per token: {r['bytes_per_token_total'] / mb:.1f} MB = "
          + " + ".join(f"{k} {v / mb:.2f}" for k, v in bp.items())
          + f"  (the KV cache at {r['context']} positions: {r['kv_bytes_mid'] / mb:.1f} MB more, "
          "not counted)")  # fmt: skip
    print(f"bandwidth: {r['bandwidth_gb_s']:.2f} GB/s (2 GiB streaming read, {r['threads']} "
          f"threads, median over the repeats) -> floor {r['floor_ms']:.2f} ms/token")  # fmt: skip
    print(f"engine int4 decode, batch 1: {r['decode_int4_b1_ms']:.2f} ms/token "
          f"({r['prompt_tokens']}-token prompt)")  # fmt: skip
    print("\nratios: median over repeats of (decode ms) / (bytes / the bandwidth read before it)")
    print(f"{'int4_decode_vs_bandwidth_floor_b1':44s} {r['int4_decode_vs_bandwidth_floor_b1']:7.3f}"
          "  target <= 1.5")  # fmt: skip
    print(f"{'int4_decode_vs_bandwidth_floor_b1_with_kv':44s} "
          f"{r['int4_decode_vs_bandwidth_floor_b1_with_kv']:7.3f}  (report)")  # fmt: skip
    print(f"{'  the same on session 9 kernels':44s} "
          f"{r['int4_decode_vs_bandwidth_floor_b1_session9_kernels']:7.3f}  (before: "
          f"{r['decode_int4_b1_session9_kernels_ms']:.2f} ms/token)")  # fmt: skip
    p = r["profile"]
    print("\nprofile of one batch-1 int4 step (ms, medians over steps):")
    for k in ("step_ms", "embed_norm_ms", "layers_ms", "head_ms"):
        print(f"  {k[:-3]:24s} {p[k]:7.3f}")
    if "step_head_q8_ms" in p:
        print(f"  whole step, head on Q8_0 / on bf16 (alternating): {p['step_head_q8_ms']:.3f} / "
              f"{p['step_head_bf16_ms']:.3f}")  # fmt: skip
    if "layer_steps_ms" in p:
        print(
            f"  inside the 30 layer calls (profiling build, layers {p['profiled_layers_ms']:.3f}):"
        )
        for k, v in p["layer_steps_ms"].items():
            print(f"    {k:22s} {v:7.3f}")
        print(f"    {'python between calls':22s} {p['python_between_calls_ms']:7.3f}")
        print(f"    {'products (weights)':22s} {p['products_ms']:7.3f}")


if __name__ == "__main__":
    main()
