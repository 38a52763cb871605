"""The prefill attention-over-context energy term, measured out to the model's context and fitted
(issue 16).

    python tools/attention_fit.py [--lengths 256,512,1024,2048,4096,6144,8192] \
        [--json docs/results/attention_fit.json] [--plot docs/results/attention_fit.png] \
        [--write | --table PATH] [--chunk N]

The energy model charges a prompt of p tokens `attn_ctx * p (p + 1) / 2` joules of attention (all
layers; `EnergyModel`, energy/model.py): one constant per attended position. The calibration measures
that constant once, on a 256-token causal attention. Here, for each prompt length L, the attention
the runtime runs for the whole prompt is timed: `LeanModel._attend` (one layer, scaled by the
layers), in the chunks the runtime prefills (the scheduler's: a prompt of at most
`runtime/generation.PREFILL_CHUNK` tokens whole, a longer one in `DEFAULT_PREFILL_TOKENS`-token
chunks; `--chunk N`: always N), each chunk attending to the cache before it and causally within
itself, q/k/v random in the model's dtype. Joules: the estimate meter (time x nominal watts), as the packaged CPU table. The fit is
the one constant that minimises the squared *relative* error over the lengths (a = sum(P/J) /
sum((P/J)^2), P = L(L+1)/2 positions, J the measured joules), so short and long prompts count
alike; printed with each length's measured joules, the fitted and the table's modelled joules.

`--write` puts the fitted constant into this machine's packaged tables (three paths, and with
int4: the default adapter's) as the prefill `attn_ctx`, and records the lengths, measurements and fit in
`kernels["prefill_attention"]`; `--table PATH` does the same to one table file instead (a table
measured on the day with `python -m hest_core.energy.calibrate --out PATH`). Run it on a quiet machine: it times things.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hest_core import paths as reg  # noqa: E402
from hest_core.config import RuntimeConfig  # noqa: E402
from hest_core.dtypes import cpu_model_name  # noqa: E402
from hest_core.energy.calib_measure import measure  # noqa: E402
from hest_core.energy.calibrate import PACKAGED, table_name  # noqa: E402
from hest_core.energy.meters import EstimateMeter  # noqa: E402
from hest_core.energy.model import CalibrationTable  # noqa: E402
from hest_core.exec.kvcache import SeqSlot  # noqa: E402
from hest_core.exec.loading import build_lean, fingerprint, load_hf_model  # noqa: E402
from hest_core.runtime.generation import PREFILL_CHUNK  # noqa: E402
from hest_core.runtime.scheduler import DEFAULT_PREFILL_TOKENS  # noqa: E402


def runtime_chunk(length: int) -> int:
    """The chunk the scheduler prefills a `length`-token prompt in (tokens): the whole prompt up
    to PREFILL_CHUNK, else DEFAULT_PREFILL_TOKENS (Scheduler._chunks)."""
    return length if length <= PREFILL_CHUNK else min(PREFILL_CHUNK, DEFAULT_PREFILL_TOKENS)


def prompt_attention(lean, length: int, chunk: int | None = None):
    """A zero-argument callable running one layer's attention for a `length`-token prompt the
    way the runtime prefills it (chunks of `chunk` tokens; None: `runtime_chunk(length)`)."""
    chunk = runtime_chunk(length) if chunk is None else chunk
    s = lean.spec
    cache = lean.new_cache(1, length)
    dt = lean.dtype
    q = torch.randn(length, s.n_heads, s.head_dim, dtype=dt)
    k = torch.randn(length, s.n_kv_heads, s.head_dim, dtype=dt)
    v = torch.randn(length, s.n_kv_heads, s.head_dim, dtype=dt)
    bounds = [(a, min(a + chunk, length)) for a in range(0, length, chunk)]

    def run() -> None:
        with torch.inference_mode():
            for a, b in bounds:
                slot = SeqSlot(row0=0, n=b - a, cache_row=0, pos0=a)
                lean._attend(q[a:b], k[a:b], v[a:b], 0, [slot], cache, False)

    return run


def load_table(path: Path) -> CalibrationTable:
    """A packaged table under the path set its name says (`-int4`: four columns)."""
    reg.enable(
        ("fp16", "int8", "int4", "skip") if path.name.endswith("-int4.json") else reg.BUILTIN_NAMES
    )
    return CalibrationTable.load(path)


def fit(lengths: list[int], joules: list[float]) -> float:
    """The constant a minimising sum(((a P - J) / J)^2), P = L(L+1)/2."""
    r = [length * (length + 1) / 2 / j for length, j in zip(lengths, joules, strict=True)]
    return sum(r) / sum(x * x for x in r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="256,512,1024,2048,4096,6144,8192")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--write", action="store_true", help="put the fit into the packaged table")
    ap.add_argument("--table", default=None, help="put the fit into this table file instead")
    ap.add_argument(
        "--chunk", type=int, default=None, help="prefill chunk (default: the scheduler's)"
    )
    args = ap.parse_args()
    if args.write and args.table:
        ap.error("--write and --table are exclusive")
    lengths = [int(v) for v in args.lengths.split(",")]
    cfg = RuntimeConfig.from_env()
    hf = load_hf_model("default", config=cfg)
    lean = build_lean(hf, torch.bfloat16, torch.device("cpu"), max_positions=max(lengths))
    # this machine's packaged tables: the three-path one and the one with int4 (the default
    # adapter's); attention does not depend on the path set, so --write updates both
    base = table_name(fingerprint(hf), lean).removesuffix(".json").removesuffix("-int4")
    tables = [p for p in (PACKAGED / f"{base}.json", PACKAGED / f"{base}-int4.json") if p.is_file()]
    if args.table:
        tables = [Path(args.table)]
    if not tables:
        raise SystemExit(f"no packaged table {base}[-int4].json in {PACKAGED}")
    table = load_table(tables[-1])
    meter = EstimateMeter(cfg.nominal_watts)
    n_layers = lean.spec.n_layers
    load0 = os.getloadavg()[0]
    measured = []
    for length in lengths:
        _, j = measure(prompt_attention(lean, length, args.chunk), meter, lean.device)
        measured.append(j * n_layers)
        print(f"{length:5d} tokens: {measured[-1]:.4f} J of attention (all layers)", flush=True)
    a = fit(lengths, measured)
    old = table.prefill.attn_ctx
    rows = []
    print(f"\nfit: attn_ctx = {a:.4g} J per attended position (table: {old:.4g})")
    print(
        f"{'tokens':>6} {'measured J':>10} {'fit J':>8} {'fit err':>7} {'table J':>8} {'tbl err':>7}"
    )
    for length, j in zip(lengths, measured, strict=True):
        p = length * (length + 1) / 2
        rows.append(
            {"tokens": length, "measured_j": j, "fit_j": a * p, "table_j": old * p,
             "fit_rel_err": a * p / j - 1, "table_rel_err": old * p / j - 1}
        )  # fmt: skip
        r = rows[-1]
        print(
            f"{length:6d} {j:10.4f} {r['fit_j']:8.4f} {r['fit_rel_err']:+7.1%} "
            f"{r['table_j']:8.4f} {r['table_rel_err']:+7.1%}"
        )
    chunks = (
        f"{args.chunk}-token chunks"
        if args.chunk
        else f"the scheduler's chunks (whole up to {PREFILL_CHUNK} tokens, else "
        f"{runtime_chunk(PREFILL_CHUNK + 1)})"
    )
    record = {
        "method": f"tools/attention_fit.py: LeanModel._attend over whole prompts in {chunks}, "
        f"one layer x {n_layers}, estimate meter; least relative squared error over the lengths",
        "lengths": lengths,
        "measured_j": measured,
        "fit_attn_ctx": a,
        "previous_attn_ctx": old,
        "rows": rows,
        "cpu": cpu_model_name(),
        "threads": torch.get_num_threads(),
        "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        _plot(rows, a, old, Path(args.plot))
    if args.write or args.table:
        for path in tables:
            t = load_table(path)
            before = t.prefill.attn_ctx
            t.prefill.attn_ctx = a
            t.kernels["prefill_attention"] = record | {"previous_attn_ctx": before}
            t.save(path)
            print(f"wrote {path}: prefill attn_ctx {before:.4g} -> {a:.4g}")


def _plot(rows: list[dict], a: float, old: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["measured_j"] for r in rows], "o", label="measured (estimate meter)")
    grid = list(range(xs[0], xs[-1] + 1, max(1, (xs[-1] - xs[0]) // 200)))
    ax.plot(grid, [a * g * (g + 1) / 2 for g in grid], "-", label=f"fit: {a:.3g} J/position")
    ax.plot(grid, [old * g * (g + 1) / 2 for g in grid], "--", label=f"table: {old:.3g} J/position")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("attention joules per prompt (all layers)")
    ax.set_title("Prefill attention against prompt length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
